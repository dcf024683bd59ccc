"""MadaKV's hierarchical compression compensation: per-head demands at every layer, and the budgets that
carry each layer's over- or under-spending to the layers after it. The passes put one demand node per layer
and one compensation node after the last (the same two-phase shape as MEDA's allocation)."""

from __future__ import annotations

from fractions import Fraction

import torch

from mmkv_compile.kernels.reference import (
    INVALID,
    budget_stage,
    coverage_demand,
    forced_stage,
    score_stage,
)
from mmkv_compile.policy import Policy, ceil_fraction


def head_demand(query, keys, labels, positions, scaling: float, policy: Policy) -> torch.Tensor:
    """int64 ``[B, Hkv, 3]``: each head's coverage demand (free slots), its valid slots and its forced ones."""
    scores = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    selection, _ = score_stage(policy, query, keys, labels, positions, scores, scaling, True)
    counts = budget_stage(policy, labels, None, query.shape[2], True)
    forced = forced_stage(policy, labels, counts) & (labels != INVALID)
    demand = coverage_demand(policy, selection, labels, forced)
    return torch.stack([demand, (labels != INVALID).sum(-1), forced.sum(-1)], dim=-1)


def compensate_layer_budgets(demands: torch.Tensor, budget: float, cap: float) -> torch.Tensor:
    """Slots each layer, row and KV head keeps, int64 ``[L, B, Hkv]``, from ``demands [L, B, Hkv, 3]``.

    Every head of every layer starts from the uniform budget ``ceil(budget * valid)``, its forced slots
    (the observation window) included. The free part of all of them together is the row's total. Layers
    take it in order: layer ``l``'s even share per head is what remains divided by the heads of the layers
    left (``phi_l``, so ``phi_{l+1} = phi_l - K_l / (H (L - l))`` with ``K_l`` the layer's overspend); each head
    keeps its coverage demand, at most ``cap * phi_l``; the last layer gets exactly what remains. So the
    layers' budgets sum to the uniform total exactly, unless a head cannot hold its share.
    """
    demand, valid, forced = demands.long().unbind(-1)
    fraction = Fraction(budget).limit_denominator(1 << 16)
    free = (ceil_fraction(valid, fraction) - forced).clamp(min=0)
    room = (valid - forced).clamp(min=0)
    num_layers, _, num_heads = demand.shape
    remaining = free.sum(dim=(0, 2))  # [B]
    head = torch.arange(num_heads, device=demand.device)
    counts = []
    for layer in range(num_layers):
        if layer == num_layers - 1:
            kept = remaining.unsqueeze(-1) // num_heads + (head < remaining.unsqueeze(-1) % num_heads)
        else:
            even = remaining.double() / (num_heads * (num_layers - layer))
            limit = torch.minimum((cap * even).floor().long(), remaining // num_heads)
            kept = torch.minimum(demand[layer], limit.unsqueeze(-1))
        kept = torch.minimum(kept.clamp(min=0), room[layer])
        remaining = remaining - kept.sum(-1)
        counts.append(forced[layer] + kept)
    return torch.stack(counts)

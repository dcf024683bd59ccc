"""MadaKV's hierarchical compression compensation: per-head demands at every layer, and the budgets that
carry each layer's over- or under-spending to the layers after it. The passes put one demand node per layer
and one compensation node after the last (the same two-phase shape as MEDA's allocation)."""

from __future__ import annotations

import torch

from mmkv_compile.kernels import heads
from mmkv_compile.kernels.reference import (
    INVALID,
    budget_stage,
    coverage_demand,
    forced_stage,
    live_slots,
    score_stage,
)
from mmkv_compile.policy import Policy, exact_fraction
from mmkv_compile.state import SlotState


def head_demand(query, keys, labels, positions, scaling: float, policy: Policy) -> torch.Tensor:
    """int64 ``[B, Hkv, 3]``: each head's coverage demand (free slots), its live slots and its forced ones, for
    every KV head of the layer (under tensor parallelism, every rank's heads in head order)."""
    empty = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    state = SlotState(keys, keys, labels, positions, empty, empty, empty.bool())
    selection = score_stage(policy, query, state, scaling, True).selection
    live = live_slots(labels, positions, policy.placement.window)
    counts = budget_stage(policy, live, labels != INVALID, query.shape[2], True)
    forced = forced_stage(policy, live, counts)
    demand = coverage_demand(policy, selection, torch.where(live, labels, -1).to(labels.dtype), forced)
    return heads.gather_heads(torch.stack([demand, live.sum(-1), forced.sum(-1)], dim=-1), policy.placement.heads)


def compensate_layer_budgets(demands: torch.Tensor, budget: float, cap: float) -> torch.Tensor:
    """Slots each layer keeps per row, int64 ``[L, B]``, from ``demands [L, B, Hkv, 3]``.

    Every head of a layer is padded to the layer's longest, so a layer costs its neediest head's count in
    every head: demands are taken per layer as the largest over its heads. Each layer starts from the uniform
    budget ``floor(budget * live)``, its forced slots (the observation window) included; the free part of all
    layers together is the row's total. Layers take it in order: layer ``l``'s even share is what remains
    divided by the layers left (``phi_l``, so ``phi_{l+1} = phi_l - K_l / (L - l)`` with ``K_l`` the layer's
    overspend); a layer keeps its demand, at most ``cap * phi_l``; the last layer gets what remains. So the
    layers' budgets never sum to more than the uniform total.
    """
    demand, live, forced = demands.long().amax(dim=2).unbind(-1)  # [L, B] each
    fraction = exact_fraction(budget)
    uniform = live * fraction.numerator // fraction.denominator
    forced = torch.minimum(forced, uniform)
    room = (live - forced).clamp(min=0)
    remaining = (uniform - forced).sum(0)  # [B]
    num_layers = demand.shape[0]
    counts = []
    for layer in range(num_layers):
        if layer == num_layers - 1:
            kept = remaining
        else:
            even = remaining.double() / (num_layers - layer)
            limit = torch.minimum((cap * even).floor().long(), remaining)
            kept = torch.minimum(demand[layer], limit)
        kept = torch.minimum(kept.clamp(min=0), room[layer])
        remaining = remaining - kept
        counts.append(forced[layer] + kept)
    return torch.stack(counts)

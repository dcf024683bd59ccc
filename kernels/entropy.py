"""Per-layer attention entropy (MEDA's layer signal) and the allocation of per-layer budgets from it."""

from __future__ import annotations

import torch

from mmkv_compile.kernels.reference import INVALID, QUERY_CHUNK, visible_keys
from mmkv_compile.labels import Modality

TEXT = int(Modality.TEXT)


def _block_entropy(query, keys, labels, positions, scaling: float, query_ok, key_ok) -> torch.Tensor:
    """Mean entropy ``[B]`` of the softmax of queries where ``query_ok`` over keys where ``key_ok``
    (``[B, Hkv, S]`` masks), causal, averaged over the rows that see at least one key and over heads."""
    batch, num_kv, seq, dim = keys.shape
    group = query.shape[1] // num_kv
    num_new = query.shape[2]
    total = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    rows = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    for start in range(0, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        visible = visible_keys(labels, positions, slots) & key_ok.unsqueeze(-2) & query_ok[..., slots].unsqueeze(-1)
        q = query[:, :, start:stop].float().reshape(batch, num_kv, group, stop - start, dim)
        logits = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
        log_p = torch.log_softmax(logits, dim=-1)
        entropy = -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)  # [B, Hkv, G, Lq]
        seen = visible.any(-1).unsqueeze(2).expand_as(entropy)
        total += torch.where(seen, entropy, 0.0).sum(dim=(1, 2, 3)).double()
        rows += seen.sum(dim=(1, 2, 3)).double()
    return torch.where(rows > 0, total / rows.clamp(min=1), 0.0)


def layer_entropy(query, keys, labels, positions, scaling: float, signal: str) -> torch.Tensor:
    """MEDA's layer signal ``[B]`` float32.

    ``cross_modal`` (the paper, Eq. 4-6): entropy of text queries over visual keys plus that of visual
    queries over text keys, each softmax restricted to its block and made causal. ``attention`` (the
    official code): mean row entropy of the full causal attention.
    """
    valid = labels != INVALID
    text = valid & (labels == TEXT)
    visual = valid & (labels != TEXT)
    if signal == "attention":
        return _block_entropy(query, keys, labels, positions, scaling, valid, valid).float()
    text_to_visual = _block_entropy(query, keys, labels, positions, scaling, text, visual)
    visual_to_text = _block_entropy(query, keys, labels, positions, scaling, visual, text)
    return (text_to_visual + visual_to_text).float()


def allocate_layer_budgets(entropies: torch.Tensor, budget: float, floor: float) -> torch.Tensor:
    """Per-layer budget fractions ``[L, B]`` from per-layer entropies ``[L, B]`` (MEDA Eq. 7).

    The paper's ``softmax_l(E) * L * budget``, kept within ``[floor, 1]``: the clamp is applied to
    ``lambda * softmax_l(E)`` with the per-row ``lambda`` (found by bisection) that makes the fractions
    average to ``budget``, so clamping never changes the total (when ``floor <= budget <= 1``).
    """
    num_layers = entropies.shape[0]
    target = num_layers * budget
    share = torch.softmax(entropies.double(), dim=0)
    low = torch.zeros(share.shape[1], dtype=torch.float64, device=share.device)
    high = torch.full_like(low, num_layers / share.min().clamp(min=1e-300).item())
    for _ in range(200):  # the total is monotone in lambda
        mid = (low + high) / 2
        total = (mid * share).clamp(min=floor, max=1.0).sum(0)
        low = torch.where(total < target, mid, low)
        high = torch.where(total < target, high, mid)
    return (high * share).clamp(min=floor, max=1.0).float()

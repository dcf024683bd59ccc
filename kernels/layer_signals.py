"""What each layer's attention measures (MEDA's entropy, VL-Cache's density), and how those signals
become per-layer budgets. The passes put one signal node per layer and one allocation after the last."""

from __future__ import annotations

import torch

from mmkv_compile.kernels.reference import INVALID, QUERY_CHUNK, TEXT, post_vision_queries, visible_keys

DENSITY_THRESHOLD = 0.01  # VL-Cache's ThresholdFilter: entries below 1% of their row's maximum are sparse


def _mean_row_statistic(query, keys, labels, positions, scaling: float, query_ok, key_ok, statistic) -> torch.Tensor:
    """Mean over heads and over query rows where ``query_ok`` (that see at least one key where ``key_ok``)
    of ``statistic(log_probs, visible)`` per row, the softmax restricted to those keys and causal: ``[B]``."""
    batch, num_kv, seq, dim = keys.shape
    group = query.shape[1] // num_kv
    num_new = query.shape[2]
    total = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    rows = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    for start in range(0, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        visible = visible_keys(labels, positions, slots) & key_ok.unsqueeze(-2) & query_ok[..., slots].unsqueeze(-1)
        visible = visible.unsqueeze(2)  # [B, Hkv, 1, Lq, S]
        q = query[:, :, start:stop].float().reshape(batch, num_kv, group, stop - start, dim)
        logits = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
        log_p = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        per_row = statistic(log_p, visible)  # [B, Hkv, G, Lq]
        seen = visible.any(-1).expand_as(per_row)
        total += torch.where(seen, per_row, 0.0).sum(dim=(1, 2, 3)).double()
        rows += seen.sum(dim=(1, 2, 3)).double()
    return torch.where(rows > 0, total / rows.clamp(min=1), 0.0)


def _entropy(log_p: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)


def _density(log_p: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    probs = log_p.exp()
    dense = probs >= DENSITY_THRESHOLD * probs.amax(dim=-1, keepdim=True)
    return (dense & visible).sum(-1) / visible.sum(-1).clamp(min=1)


def layer_signal(query, keys, labels, positions, scaling: float, signal: str) -> torch.Tensor:
    """One number per row ``[B]`` float32 describing a layer's attention.

    ``cross_modal`` (MEDA's paper, Eq. 4-6): entropy of text queries over visual keys plus that of visual
    queries over text keys, each softmax restricted to its block and causal. ``attention`` (MEDA's code):
    mean row entropy of the full causal attention. ``density`` (VL-Cache): the share of entries of the
    post-vision queries' attention at least 1% of their row's maximum.
    """
    from mmkv_compile.ops import kernel_choice  # lazily: ops imports the kernels

    if kernel_choice(keys.device) == "triton":
        from mmkv_compile.kernels import triton_signals

        return triton_signals.layer_signal(query, keys, labels, positions, scaling, signal)
    valid = labels != INVALID
    if signal == "attention":
        return _mean_row_statistic(query, keys, labels, positions, scaling, valid, valid, _entropy).float()
    if signal == "density":
        post_vision = post_vision_queries(labels, positions)
        return _mean_row_statistic(query, keys, labels, positions, scaling, post_vision, valid, _density).float()
    if signal != "cross_modal":
        raise ValueError(f"unknown layer signal {signal!r}")
    text = valid & (labels == TEXT)
    visual = valid & (labels != TEXT)
    text_to_visual = _mean_row_statistic(query, keys, labels, positions, scaling, text, visual, _entropy)
    visual_to_text = _mean_row_statistic(query, keys, labels, positions, scaling, visual, text, _entropy)
    return (text_to_visual + visual_to_text).float()


def allocate_layer_budgets(signals: torch.Tensor, budget: float, floor: float, rule: str = "softmax") -> torch.Tensor:
    """Per-layer budget fractions ``[L, B]`` from per-layer signals ``[L, B]``.

    ``softmax``: MEDA's ``softmax_l(E) * L * budget``. ``proportional``: VL-Cache's budgets in proportion to
    each layer's density. Either share is kept within ``[floor, 1]`` by clamping ``lambda * share`` with
    the per-row ``lambda`` (found by bisection) that keeps the fractions' mean at ``budget``, so clamping
    never changes the total (when ``floor <= budget <= 1``).
    """
    num_layers = signals.shape[0]
    target = num_layers * budget
    if rule == "softmax":
        share = torch.softmax(signals.double(), dim=0)
    elif rule == "proportional":
        positive = signals.double().clamp(min=0)
        total = positive.sum(0, keepdim=True)
        share = torch.where(total > 0, positive / total.clamp(min=1e-300), 1.0 / num_layers)
    else:
        raise ValueError(f"unknown allocation rule {rule!r}")
    low = torch.zeros(share.shape[1], dtype=torch.float64, device=share.device)
    smallest = share[share > 0].min().item() if bool((share > 0).any()) else 1.0
    high = torch.full_like(low, num_layers / smallest)
    for _ in range(200):  # the total is monotone in lambda
        mid = (low + high) / 2
        total = (mid * share).clamp(min=floor, max=1.0).sum(0)
        low = torch.where(total < target, mid, low)
        high = torch.where(total < target, high, mid)
    return (high * share).clamp(min=floor, max=1.0).float()

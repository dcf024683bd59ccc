"""What each layer's attention measures (MEDA's entropy, VL-Cache's density), and how those signals
become per-layer budgets. The passes put one signal node per layer and one allocation after the last."""

from __future__ import annotations

import torch

from mmkv_compile.kernels import heads
from mmkv_compile.kernels.reference import INVALID, QUERY_CHUNK, TEXT, live_slots, post_vision_queries, visible_keys
from mmkv_compile.policy import exact_fraction

DENSITY_THRESHOLD = 0.01  # VL-Cache's ThresholdFilter: entries below 1% of their row's maximum are sparse


def _row_statistic_sums(
    query, keys, labels, positions, scaling: float, query_ok, key_ok, statistic, window: int = 0
) -> torch.Tensor:
    """``statistic(log_probs, visible)`` summed over heads and over query rows where ``query_ok`` (that see at
    least one key where ``key_ok``), the softmax restricted to those keys and causal, and the number of such
    rows: float64 ``[B, 2]`` (a sum, so a layer split over ranks adds its parts before the mean)."""
    batch, num_kv, seq, dim = keys.shape
    group = query.shape[1] // num_kv
    num_new = query.shape[2]
    total = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    rows = torch.zeros(batch, dtype=torch.float64, device=keys.device)
    for start in range(0, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        visible = (
            visible_keys(labels, positions, slots, window) & key_ok.unsqueeze(-2) & query_ok[..., slots].unsqueeze(-1)
        )
        visible = visible.unsqueeze(2)  # [B, Hkv, 1, Lq, S]
        q = query[:, :, start:stop].float().reshape(batch, num_kv, group, stop - start, dim)
        logits = (q @ keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
        log_p = torch.log_softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        per_row = statistic(log_p, visible)  # [B, Hkv, G, Lq]
        seen = visible.any(-1).expand_as(per_row)
        total += torch.where(seen, per_row, 0.0).sum(dim=(1, 2, 3)).double()
        rows += seen.sum(dim=(1, 2, 3)).double()
    return torch.stack([total, rows], dim=-1)


def row_means(sums: torch.Tensor) -> torch.Tensor:
    """Means from ``[..., 2]`` (sum, rows) pairs; 0 where no row counted."""
    total, rows = sums.unbind(-1)
    return torch.where(rows > 0, total / rows.clamp(min=1), 0.0)


def _entropy(log_p: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * torch.nan_to_num(log_p, neginf=0.0)).sum(-1)


def _density(log_p: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    probs = log_p.exp()
    dense = probs >= DENSITY_THRESHOLD * probs.amax(dim=-1, keepdim=True)
    return (dense & visible).sum(-1) / visible.sum(-1).clamp(min=1)


def layer_signal(
    query, keys, labels, positions, scaling: float, signal: str, window: int = 0, group: str = ""
) -> torch.Tensor:
    """What a layer's attention measures, per row: float64 ``[B, 2]``, the signal and the layer's live slots
    (the count its budget is a share of). ``window``: the layer's sliding window (0 for none); ``group``: under
    tensor parallelism, the process group whose ranks hold the layer's other heads (``kernels/heads.py``).

    ``cross_modal`` (MEDA's paper, Eq. 4-6): entropy of text queries over visual keys plus that of visual
    queries over text keys, each softmax restricted to its block and causal. ``attention`` (MEDA's code):
    mean row entropy of the full causal attention. ``density`` (VL-Cache): the share of entries of the
    post-vision queries' attention at least 1% of their row's maximum. Each is a mean over every head.
    """
    from mmkv_compile.ops import kernel_choice  # lazily: ops imports the kernels

    live = live_slots(labels, positions, window).sum(-1)[:, 0].double()
    if kernel_choice(keys.device) == "triton":
        from mmkv_compile.kernels import triton_signals

        sums = triton_signals.layer_signal_sums(query, keys, labels, positions, scaling, signal, window)
    else:
        sums = _layer_signal_sums(query, keys, labels, positions, scaling, signal, window)
    value = row_means(heads.sum_over_ranks(sums, group)).sum(-1).float()  # the signal is float32
    return torch.stack([value.double(), live], dim=-1)


def _layer_signal_sums(query, keys, labels, positions, scaling: float, signal: str, window: int) -> torch.Tensor:
    """float64 ``[B, parts, 2]``: each part's (sum, rows); the signal is the sum of the parts' means."""
    valid = labels != INVALID
    if signal == "attention":
        parts = [(valid, valid, _entropy)]
    elif signal == "density":
        parts = [(post_vision_queries(labels, positions), valid, _density)]
    else:
        text = valid & (labels == TEXT)
        visual = valid & (labels != TEXT)
        parts = [(text, visual, _entropy), (visual, text, _entropy)]
    return torch.stack(
        [
            _row_statistic_sums(query, keys, labels, positions, scaling, rows, columns, statistic, window)
            for rows, columns, statistic in parts
        ],
        dim=1,
    )


def allocate_layer_budgets(signals: torch.Tensor, budget: float, floor: float, rule: str = "softmax") -> torch.Tensor:
    """Slots each layer keeps per row, int64 ``[L, B]``, from ``signals [L, B, 2]`` (signal, live slots).

    ``softmax``: MEDA's ``softmax_l(E) * L * budget``. ``proportional``: VL-Cache's budgets in proportion to
    each layer's density. Either share becomes a per-layer fraction within ``[floor, 1]`` whose mean is
    ``budget`` (:func:`layer_fractions`); the counts follow those fractions of each layer's live slots and sum
    to exactly the uniform total ``sum_l floor(budget * live_l)`` (largest remainders first), so allocating
    moves slots between layers but never adds any.
    """
    fractions = layer_fractions(signals[..., 0], budget, floor, rule).double()
    live = signals[..., 1].round().long()
    fraction = exact_fraction(budget)  # as the operator counts its uniform budget
    target = (live * fraction.numerator // fraction.denominator).sum(0)  # [B]
    wanted = fractions * live.double()
    total = wanted.sum(0, keepdim=True)
    wanted = torch.where(total > 0, wanted * target.double().unsqueeze(0) / total.clamp(min=1e-300), 0.0)
    counts = torch.minimum(wanted.floor().long(), live)
    # what rounding down left: one more slot each to the layers with the largest remainders and room ...
    left = (target - counts.sum(0)).clamp(min=0)
    order = torch.argsort(torch.where(live > counts, wanted - counts, -1.0), dim=0, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0]).unsqueeze(1).expand_as(order))
    counts = counts + ((rank < left.unsqueeze(0)) & (live > counts)).long()
    # ... and what full layers could not take, to the others in the same order, as far as their room goes
    left = (target - counts.sum(0)).clamp(min=0)
    room = (live - counts).gather(0, order)
    extra = torch.minimum((left.unsqueeze(0) - (room.cumsum(0) - room)).clamp(min=0), room)
    return counts + torch.zeros_like(counts).scatter(0, order, extra)


def layer_fractions(signals: torch.Tensor, budget: float, floor: float, rule: str = "softmax") -> torch.Tensor:
    """Per-layer budget fractions ``[L, B]`` from per-layer signals ``[L, B]``, each within ``[floor, 1]``,
    averaging to ``budget``: ``lambda * share`` clamped, with the per-row ``lambda`` (found by bisection) that
    keeps the mean at ``budget``, so clamping never changes the total (when ``floor <= budget <= 1``)."""
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

"""Pure-PyTorch reference of the score-evict-merge operator: the CPU kernel and the oracle for Triton.

Shapes: ``query [B, Hq, Lq, D]`` (the current step's queries, the last ``Lq`` slots), ``keys/values
[B, Hkv, S, D]``, ``labels [B, Hkv, S]`` int8, ``positions [B, Hkv, S]`` int64, ``scores [B, Hkv, S]``
float32. Slots are kept in position order; a slot labelled INVALID is padding or unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkv_compile.labels import Modality
from mmkv_compile.policy import Policy, ceil_fraction, output_length, scheduled

INVALID = int(Modality.INVALID)
TEXT = int(Modality.TEXT)
QUERY_CHUNK = 256  # queries scored at once by the all-queries score, to bound memory
MERGE_CHUNK = 1024  # evicted slots compared with the kept ones at once, to bound memory


def visible_keys(labels: torch.Tensor, positions: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, Lq, S]``: key slot valid, not after the query, and the query slot itself valid."""
    query_pos = positions[..., query_slots]  # [B, Hkv, Lq]
    query_valid = labels[..., query_slots] != INVALID
    key_valid = labels != INVALID
    causal = positions.unsqueeze(-2) <= query_pos.unsqueeze(-1)
    return causal & key_valid.unsqueeze(-2) & query_valid.unsqueeze(-1)


def post_vision_queries(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: valid slots after the last image/video slot of their row (every valid slot
    when a row has none)."""
    valid = labels != INVALID
    visual = valid & (labels != TEXT)
    last_visual = torch.where(visual, positions, -1).amax(dim=-1, keepdim=True)
    return valid & (positions > last_visual)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention ``[B, Hkv, G, Lq, S]`` in float32; rows with no visible key are all zero."""
    batch, num_kv, seq, dim = keys.shape
    group = query.shape[1] // num_kv
    q = query.float().reshape(batch, num_kv, group, query.shape[2], dim)
    logits = torch.matmul(q, keys.float().unsqueeze(2).transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def attention_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    num_queries: int,
    scaling: float,
    group_reduce: str = "mean",
    query_ok: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key slot receives from the last ``num_queries`` queries, summed: ``[B, Hkv, S]``.
    ``query_ok`` (bool ``[B, Hkv, S]``) restricts the sum to some query slots."""
    seq = keys.shape[2]
    num_new = query.shape[2]
    group = query.shape[1] // keys.shape[1]
    per_head = torch.zeros((*keys.shape[:2], group, seq), dtype=torch.float32, device=keys.device)
    for start in range(num_new - num_queries, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        probs = attention_probs(query[:, :, start:stop], keys, visible_keys(labels, positions, slots), scaling)
        if query_ok is not None:
            probs = probs * query_ok[..., slots].unsqueeze(2).unsqueeze(-1)
        per_head += probs.sum(dim=3)
    # The GQA group is reduced after summing over every query, so chunking never changes the result.
    return per_head.amax(dim=2) if group_reduce == "max" else per_head.mean(dim=2)


def pool_scores(policy: Policy, scores: torch.Tensor) -> torch.Tensor:
    """1-D pooling over neighbouring slots (SnapKV keeps clusters, not isolated tokens)."""
    if policy.pool == "none" or policy.kernel_size <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = policy.kernel_size // 2
    if policy.pool == "max":
        pooled = F.max_pool1d(flat, policy.kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, policy.kernel_size, stride=1, padding=pad)
    return pooled[..., : scores.shape[-1]].reshape(scores.shape)


def score_stage(
    policy: Policy,
    query,
    keys,
    labels,
    positions,
    scores,
    scaling: float,
    prefill: bool,
    column_sums=attention_column_sums,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (selection score, new running score state), both ``[B, Hkv, S]`` float32.

    ``column_sums`` computes attention column sums (the Triton kernel passes its own); the rest is shared.
    """
    num_new = query.shape[2]
    if policy.score == "none":
        fresh = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    elif policy.score == "position":
        fresh = positions.float()
    elif policy.score in ("window", "all_queries"):
        num_queries = min(policy.window, num_new) if policy.score == "window" else num_new
        fresh = column_sums(query, keys, labels, positions, num_queries, scaling, policy.group_reduce)
    elif policy.score == "post_vision":  # VL-Cache: the language queries after the last image (in torch)
        post_vision = post_vision_queries(labels, positions)
        fresh = attention_column_sums(
            query, keys, labels, positions, num_new, scaling, policy.group_reduce, post_vision
        )
    else:
        raise ValueError(f"unknown score stage {policy.score!r}")
    if policy.accumulate and not prefill:
        state = scores.float() + fresh
    else:
        state = fresh
    selection = pool_scores(policy, state) if prefill else state
    if policy.share_across_heads:  # one token set for the whole layer
        selection = selection.mean(dim=1, keepdim=True).expand_as(selection)
    return selection, state


def forced_stage(policy: Policy, labels: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: slots always kept (sinks, recent window, whole modalities).

    ``counts`` (the budget per row and head) sizes a recent window given as a fraction of the budget.
    """
    valid = labels != INVALID
    forced = torch.zeros_like(valid)
    if policy.sinks:
        forced |= valid & (valid.cumsum(-1) <= policy.sinks)
    recent = torch.full(labels.shape[:2], policy.recent, dtype=torch.int64, device=labels.device)
    if policy.recent_fraction and counts is not None:
        recent = torch.maximum(recent, (counts.double() * policy.recent_fraction).floor().long())
    if policy.recent or policy.recent_fraction:
        from_end = valid.flip(-1).cumsum(-1).flip(-1)
        forced |= valid & (from_end <= recent.unsqueeze(-1))
    for label in policy.keep_labels:
        forced |= labels == label
    return forced


def budget_stage(
    policy: Policy,
    labels: torch.Tensor,
    num_forced: torch.Tensor | None,
    num_new: int,
    prefill: bool,
    fractions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slots each (row, KV head) keeps: int64 ``[B, Hkv]``.

    ``num_forced`` is needed only when forced slots come on top of the budget (``forced_in_budget=False``).
    """
    valid = labels != INVALID
    num_valid = valid.sum(-1)
    if policy.keeps_everything:
        return num_valid
    if prefill or isinstance(policy.budget, int):
        if policy.forced_in_budget:
            pool = num_valid
        else:
            pool = num_valid - num_forced
        if fractions is not None:  # per-row budgets allocated across layers in the graph
            base = (pool.double() * fractions.double().view(-1, 1)).ceil().long()
        elif isinstance(policy.budget, int):
            base = torch.clamp(pool, max=policy.budget)
        else:
            base = ceil_fraction(pool, policy.budget_fraction())
        base = scheduled(policy, base, pool)
        counts = base if policy.forced_in_budget else base + num_forced
    else:
        # A float budget while decoding holds each row at the valid slots it had before this step.
        counts = valid[..., : labels.shape[-1] - num_new].sum(-1)
    return torch.minimum(counts, num_valid)


def head_budget_stage(
    policy: Policy, selection: torch.Tensor, labels: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """AdaKV: spread a layer's budget over its KV heads by a top-k over all heads' scores together.

    Each head keeps its forced slots, ``head_floor`` of its uniform share, and the rest of its share in
    proportion to how many of the layer-wide top scores it holds. Returns counts ``[B, Hkv]``.
    """
    valid = labels != INVALID
    num_forced = (forced & valid).sum(-1)
    uniform_free = (counts - num_forced).clamp(min=0)
    candidates = valid & ~forced
    flat = torch.where(candidates, selection, float("-inf")).flatten(1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    )
    won = (ranks < uniform_free.sum(-1, keepdim=True)).view(selection.shape) & candidates
    wins = won.sum(-1).double()
    free = ((1 - policy.head_floor) * wins + policy.head_floor * uniform_free.double()).floor().long()
    return torch.minimum(num_forced + free, valid.sum(-1))


def select_stage(
    selection: torch.Tensor, labels: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor, out_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank slots by (forced, valid, score), keep the top ``counts``; return slot indices
    ``[B, Hkv, out_len]`` in position order and a bool mask of which of them are kept."""
    valid = labels != INVALID
    tier = valid.to(torch.int8) + (forced & valid).to(torch.int8)
    order = torch.argsort(selection, dim=-1, descending=True, stable=True)
    order = order.gather(-1, torch.argsort(tier.gather(-1, order), dim=-1, descending=True, stable=True))
    top = order[..., :out_len]
    ranks = torch.arange(out_len, device=labels.device)
    kept_by_rank = ranks < counts.unsqueeze(-1)
    slots, perm = torch.sort(top, dim=-1)
    return slots, kept_by_rank.gather(-1, perm)


def gather_stage(tensors, slots: torch.Tensor, kept: torch.Tensor):
    """Gather the kept slots of every state tensor; unused slots are INVALID with zero K/V and weight."""
    keys, values, labels, positions, scores, weights = tensors
    index_kv = slots.unsqueeze(-1).expand(*slots.shape, keys.shape[-1])
    kept_kv = kept.unsqueeze(-1)
    return (
        torch.where(kept_kv, keys.gather(2, index_kv), 0),
        torch.where(kept_kv, values.gather(2, index_kv), 0),
        torch.where(kept, labels.gather(2, slots), INVALID).to(labels.dtype),
        torch.where(kept, positions.gather(2, slots), -1),
        torch.where(kept, scores.gather(2, slots), 0.0),
        torch.where(kept, weights.gather(2, slots), 0.0),
    )


def merge_stage(policy: Policy, state, slots: torch.Tensor, kept: torch.Tensor, kept_state):
    """Merge every evicted slot into its most similar kept slot (cosine of keys, same row and KV head).

    Rules, for a kept slot ``c`` receiving evicted slots ``e`` (weights ``w`` count original tokens, so a
    slot merged again later stays an exact mean):
      avg       k_c <- (w_c k_c + sum w_e k_e) / (w_c + sum w_e)                  (MEDA, LOOK-M A-merge)
      pivot     as avg, with each k_e first averaged with k_c                      (LOOK-M P-merge)
      weighted  as avg, with each k_e scaled by its cosine similarity to k_c       (LOOK-M W-merge)
    Values follow the keys' assignment and rule.
    """
    if policy.merge == "none":
        return kept_state
    keys, values, labels, _, _, weights = state
    new_keys, new_values, new_labels, new_positions, new_scores, new_weights = kept_state
    survived = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device).scatter(2, slots, kept)
    evicted = (labels != INVALID) & ~survived
    targets = F.normalize(new_keys.float(), dim=-1)
    sum_keys = torch.zeros(new_keys.shape, dtype=torch.float32, device=keys.device)
    sum_values = torch.zeros_like(sum_keys)
    sum_weights = torch.zeros(new_weights.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, keys.shape[2], MERGE_CHUNK):
        chunk = slice(start, start + MERGE_CHUNK)
        k_e, v_e = keys[:, :, chunk].float(), values[:, :, chunk].float()
        similarity = F.normalize(k_e, dim=-1) @ targets.transpose(-1, -2)
        similarity = similarity.masked_fill(~kept.unsqueeze(2), float("-inf"))
        best, target = similarity.max(dim=-1)
        w = weights[:, :, chunk] * (evicted[:, :, chunk] & torch.isfinite(best))
        index = target.unsqueeze(-1).expand_as(k_e)
        if policy.merge == "pivot":
            k_e = (k_e + new_keys.float().gather(2, index)) / 2
            v_e = (v_e + new_values.float().gather(2, index)) / 2
        elif policy.merge == "weighted":
            factor = torch.nan_to_num(best, neginf=0.0).unsqueeze(-1)
            k_e, v_e = k_e * factor, v_e * factor
        sum_keys.scatter_add_(2, index, w.unsqueeze(-1) * k_e)
        sum_values.scatter_add_(2, index, w.unsqueeze(-1) * v_e)
        sum_weights.scatter_add_(2, target, w)
    total = new_weights + sum_weights
    received = (sum_weights > 0).unsqueeze(-1)
    denominator = total.clamp(min=1e-12).unsqueeze(-1)
    merged_keys = (new_weights.unsqueeze(-1) * new_keys.float() + sum_keys) / denominator
    merged_values = (new_weights.unsqueeze(-1) * new_values.float() + sum_values) / denominator
    return (
        torch.where(received, merged_keys.to(new_keys.dtype), new_keys),
        torch.where(received, merged_values.to(new_values.dtype), new_values),
        new_labels,
        new_positions,
        new_scores,
        total,
    )


def select_slots(
    policy: Policy,
    selection: torch.Tensor,
    labels: torch.Tensor,
    num_new: int,
    prefill: bool,
    fractions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget, forced keep and select: the slots that survive ``[B, Hkv, out_len]`` and which are kept."""
    if policy.forced_in_budget:
        counts = budget_stage(policy, labels, None, num_new, prefill, fractions)
        forced = forced_stage(policy, labels, counts)
        if policy.head_budget == "global_topk" and prefill:
            counts = head_budget_stage(policy, selection, labels, forced, counts)
    else:
        forced = forced_stage(policy, labels, None)
        counts = budget_stage(policy, labels, forced.sum(-1), num_new, prefill, fractions)
    out_len = None if fractions is not None else output_length(policy, labels.shape[-1], num_new, prefill)
    if out_len is None:  # forced slots come on top of the budget: the longest row sets the length
        out_len = int(counts.max()) if counts.numel() else 0
    return select_stage(selection, labels, forced, counts, out_len)


def score_evict_merge(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    policy: str,
    prefill: bool,
    budget_fractions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Reference kernel: score, budget/keep/select, gather, merge. Outputs never alias inputs."""
    pol = Policy.from_string(policy)
    selection, new_scores = score_stage(pol, query, keys, labels, positions, scores, scaling, prefill)
    slots, kept = select_slots(pol, selection, labels, query.shape[2], prefill, budget_fractions)
    state = (keys, values, labels, positions, new_scores, weights)
    return merge_stage(pol, state, slots, kept, gather_stage(state, slots, kept))

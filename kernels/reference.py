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
MEDIA_LABELS = (int(Modality.IMAGE), int(Modality.VIDEO), int(Modality.AUDIO))
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
    elif policy.score == "retention":
        num_queries = min(policy.window, num_new)
        fresh = column_sums(query, keys, labels, positions, num_queries, scaling, policy.group_reduce)
    elif policy.score == "dual_attention":
        if prefill:  # HAE's dual-attention pruning; its keep rule is in dual_attention_candidates
            return dual_attention(query, keys, labels, positions, scaling)
        fresh = column_sums(query, keys, labels, positions, num_new, scaling, policy.group_reduce)
    else:
        raise ValueError(f"unknown score stage {policy.score!r}")
    if policy.accumulate and not prefill:
        state = scores.float() + fresh
    else:
        state = fresh
    selection = pool_scores(policy, state) if prefill else state
    if policy.score == "retention":
        selection = retention_scores(state, labels, policy.retention_mix)
    if policy.share_across_heads:  # one token set for the whole layer
        selection = selection.mean(dim=1, keepdim=True).expand_as(selection)
    return selection, state


def modality_buckets(labels: torch.Tensor) -> torch.Tensor:
    """Bucket of each slot for memories and entropies: 0 text, 1 image/video/audio (the visual side)."""
    return (labels != TEXT).long()


def retention_scores(attention: torch.Tensor, labels: torch.Tensor, mix: float) -> torch.Tensor:
    """RetentiveKV's ``R = mix * a + (1 - mix) * H``: ``a`` is the slot's share of the attention its row
    and head gave out, ``H = -p log p`` with ``p`` its share within its side (text or visual): a slot
    in a diffuse side (high entropy) may matter later, so it scores higher than its attention alone."""
    valid = labels != INVALID
    attention = torch.where(valid, attention, 0.0)
    share = attention / attention.sum(-1, keepdim=True).clamp(min=1e-30)
    bucket = modality_buckets(labels)
    side_total = torch.zeros((*labels.shape[:2], 2), dtype=attention.dtype, device=labels.device)
    side_total.scatter_add_(-1, bucket, attention)
    p = attention / side_total.gather(-1, bucket).clamp(min=1e-30)
    entropy = -p * torch.log(p.clamp(min=1e-30))
    return torch.where(valid, mix * share + (1 - mix) * entropy, 0.0)


def dual_attention(query, keys, labels, positions, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HAE's dual-attention scores of each slot from the text queries after the last visual slot, attention
    averaged over every query head: global ``G`` (summed over those queries) and individual ``I`` (their
    maximum). Returns ``(G, I)``, each ``[B, Hkv, S]`` and equal over KV heads (one decision per row)."""
    batch, num_kv, seq, _ = keys.shape
    num_new = query.shape[2]
    text_after = post_vision_queries(labels, positions) & (labels == TEXT)
    total = torch.zeros(batch, seq, dtype=torch.float32, device=keys.device)
    peak = torch.zeros_like(total)
    for start in range(0, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        probs = attention_probs(query[:, :, start:stop], keys, visible_keys(labels, positions, slots), scaling)
        probs = probs.mean(dim=(1, 2)) * text_after[:, 0, slots].unsqueeze(-1)  # [B, Lq, S]
        total += probs.sum(1)
        peak = torch.maximum(peak, probs.amax(1))
    expand = (batch, num_kv, seq)
    return total.unsqueeze(1).expand(expand), peak.unsqueeze(1).expand(expand)


def dual_attention_counts(policy: Policy, global_attention, individual, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """HAE's prefill keep rule: a visual slot is a candidate for eviction when its global attention is below
    ``global_threshold`` of the visual total and its individual attention below ``individual_threshold``;
    at most ``1 - budget`` of a row's visual slots go. Returns (forced mask, counts)."""
    valid = labels != INVALID
    visual = valid & (labels != TEXT)
    visual_total = torch.where(visual, global_attention, 0.0).sum(-1, keepdim=True)
    candidate = (
        visual
        & (global_attention < policy.global_threshold * visual_total)
        & (individual < policy.individual_threshold)
    )
    num_visual = visual.sum(-1)
    if isinstance(policy.budget, int):
        cap = (num_visual - policy.budget).clamp(min=0)
    else:
        cap = num_visual - ceil_fraction(num_visual, policy.budget_fraction())
    counts = valid.sum(-1) - torch.minimum(candidate.sum(-1), cap)
    return valid & ~candidate, counts


def broadcast_keep(positions: torch.Tensor, labels: torch.Tensor, keep_positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: slots whose position is among ``keep_positions [B, K]`` (HAE's index
    broadcasting: the first layer's decision, reused by later layers without scoring them)."""
    wanted = torch.where(keep_positions >= 0, keep_positions, torch.iinfo(keep_positions.dtype).max)
    wanted = wanted.sort(-1).values.unsqueeze(1).expand(*positions.shape[:2], -1).contiguous()
    index = torch.searchsorted(wanted, positions.contiguous()).clamp(max=wanted.shape[-1] - 1)
    return (labels != INVALID) & (wanted.gather(-1, index) == positions)


def coverage_demand(policy: Policy, selection: torch.Tensor, labels: torch.Tensor, forced: torch.Tensor):
    """MadaKV's demand per (row, KV head): for each modality, the fewest free slots whose scores cover
    ``coverage`` of that modality's free score mass, summed over modalities. int64 ``[B, Hkv]``."""
    free = (labels != INVALID) & ~forced
    demand = torch.zeros(labels.shape[:2], dtype=torch.int64, device=labels.device)
    for label in (TEXT, *MEDIA_LABELS):
        mine = free & (labels == label)
        mass = torch.where(mine, selection.clamp(min=0), 0.0).sort(-1, descending=True).values
        covered = mass.cumsum(-1)
        goal = policy.coverage * covered[..., -1:]
        needed = (covered < goal).sum(-1) + (goal[..., 0] > 0).long()
        demand += torch.minimum(needed, mine.sum(-1))
    return demand


def modality_split_stage(
    selection: torch.Tensor, labels: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """MadaKV's per-head modality split: a head's free budget goes to each modality in proportion to that
    modality's share of the head's free scores, and each modality keeps its own top slots. Returns the
    slots this chooses, added to ``forced``; the few slots rounding leaves go to the best scores left."""
    free = (labels != INVALID) & ~forced
    free_budget = (counts - (forced & (labels != INVALID)).sum(-1)).clamp(min=0).double()
    mass = torch.where(free, selection.clamp(min=0), 0.0).double()
    total = mass.sum(-1)
    chosen = forced.clone()
    for label in (TEXT, *MEDIA_LABELS):
        mine = free & (labels == label)
        share = torch.where(total > 0, torch.where(mine, mass, 0.0).sum(-1) / total.clamp(min=1e-300), 0.0)
        quota = (free_budget * share).floor().long()
        order = torch.argsort(torch.where(mine, selection, float("-inf")), dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
        )
        chosen |= mine & (rank < quota.unsqueeze(-1))
    return chosen


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
    if counts is not None:  # a window wider than the budget keeps the newest slots the budget holds
        recent = torch.minimum(recent, counts)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank slots by (forced, valid, score), keep the top ``counts``; return slot indices
    ``[B, Hkv, out_len]`` in position order, a bool mask of which of them are kept, and their ranks."""
    valid = labels != INVALID
    tier = valid.to(torch.int8) + (forced & valid).to(torch.int8)
    order = torch.argsort(selection, dim=-1, descending=True, stable=True)
    order = order.gather(-1, torch.argsort(tier.gather(-1, order), dim=-1, descending=True, stable=True))
    top = order[..., :out_len]
    ranks = torch.arange(out_len, device=labels.device).expand_as(top)
    slots, perm = torch.sort(top, dim=-1)
    kept_rank = ranks.gather(-1, perm)
    return slots, kept_rank < counts.unsqueeze(-1), kept_rank


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


def nearest_kept(keys: torch.Tensor, kept_keys: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot of ``keys [B, Hkv, S, D]``, its most cosine-similar kept slot of ``kept_keys
    [B, Hkv, K, D]`` (only where ``kept [B, Hkv, K]``): (similarity, index), both ``[B, Hkv, S]``.
    Ties go to the lower index; a row with nothing kept gets similarity -inf."""
    if kept_keys.shape[2] == 0:  # nothing kept anywhere (e.g. an all-padding batch): nothing to merge into
        empty = torch.full(keys.shape[:3], float("-inf"), device=keys.device)
        return empty, torch.zeros(keys.shape[:3], dtype=torch.int64, device=keys.device)
    targets = F.normalize(kept_keys.float(), dim=-1)
    best = torch.empty(keys.shape[:3], dtype=torch.float32, device=keys.device)
    index = torch.empty(keys.shape[:3], dtype=torch.int64, device=keys.device)
    for start in range(0, keys.shape[2], MERGE_CHUNK):
        chunk = slice(start, start + MERGE_CHUNK)
        similarity = F.normalize(keys[:, :, chunk].float(), dim=-1) @ targets.transpose(-1, -2)
        similarity = similarity.masked_fill(~kept.unsqueeze(2), float("-inf"))
        best[:, :, chunk], index[:, :, chunk] = similarity.max(dim=-1)
    return best, index


def merge_stage(policy: Policy, state, slots: torch.Tensor, kept: torch.Tensor, kept_state, nearest=nearest_kept):
    """Merge every evicted slot into its most similar kept slot (cosine of keys, same row and KV head).

    Rules, for a kept slot ``c`` receiving evicted slots ``e`` (weights ``w`` count original tokens, so a
    slot merged again later stays an exact mean):
      avg       k_c <- (w_c k_c + sum w_e k_e) / (w_c + sum w_e)                  (MEDA, LOOK-M A-merge)
      pivot     as avg, with each k_e first averaged with k_c                      (LOOK-M P-merge)
      weighted  as avg, with each k_e scaled by its cosine similarity to k_c       (LOOK-M W-merge)
    Values follow the keys' assignment and rule. ``nearest`` finds each slot's target (the Triton kernel
    passes its own).
    """
    if policy.merge == "none" or kept_state[0].shape[2] == 0:  # nothing to merge, or nothing to merge into
        return kept_state
    keys, values, labels, _, _, weights = state
    new_keys, new_values, new_labels, new_positions, new_scores, new_weights = kept_state
    survived = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device).scatter(2, slots, kept)
    evicted = (labels != INVALID) & ~survived
    best_all, target_all = nearest(keys, new_keys, kept)
    sum_keys = torch.zeros(new_keys.shape, dtype=torch.float32, device=keys.device)
    sum_values = torch.zeros_like(sum_keys)
    sum_weights = torch.zeros(new_weights.shape, dtype=torch.float32, device=keys.device)
    for start in range(0, keys.shape[2], MERGE_CHUNK):
        chunk = slice(start, start + MERGE_CHUNK)
        k_e, v_e = keys[:, :, chunk].float(), values[:, :, chunk].float()
        best, target = best_all[:, :, chunk], target_all[:, :, chunk]
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


def keep_and_budget(
    policy: Policy,
    selection: torch.Tensor,
    labels: torch.Tensor,
    num_new: int,
    prefill: bool,
    fractions: torch.Tensor | None = None,
    head_budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget and forced keep: (slots always kept ``[B, Hkv, S]``, slots each row and KV head keeps ``[B, Hkv]``)."""
    if head_budgets is not None and not policy.keeps_everything:  # counts allocated across layers (MadaKV)
        counts = torch.minimum(head_budgets, (labels != INVALID).sum(-1))
        forced = forced_stage(policy, labels, counts)
    elif policy.forced_in_budget:
        counts = budget_stage(policy, labels, None, num_new, prefill, fractions)
        forced = forced_stage(policy, labels, counts)
        if policy.head_budget == "global_topk" and prefill:
            counts = head_budget_stage(policy, selection, labels, forced, counts)
    else:
        forced = forced_stage(policy, labels, None)
        counts = budget_stage(policy, labels, forced.sum(-1), num_new, prefill, fractions)
    if policy.modality_split and prefill:
        forced = modality_split_stage(selection, labels, forced, counts)
    return forced, counts


def select_slots(
    policy: Policy,
    selection: torch.Tensor,
    labels: torch.Tensor,
    num_new: int,
    prefill: bool,
    fractions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget, forced keep and select: the slots that survive ``[B, Hkv, out_len]`` and which are kept."""
    forced, counts = keep_and_budget(policy, selection, labels, num_new, prefill, fractions)
    return select_stage(
        selection, labels, forced, counts, _out_length(policy, labels, counts, num_new, prefill, fractions)
    )[:2]


def _out_length(policy: Policy, labels, counts, num_new: int, prefill: bool, data_dependent: object = None) -> int:
    """Physical slots out (memory slots excluded): from shapes when the policy allows, else the longest row."""
    memory = 0 if policy.keeps_everything else policy.memory_slots
    total = labels.shape[-1] + (0 if prefill else memory)  # memory slots are in the input after prefill
    length = None if data_dependent is not None else output_length(policy, total, num_new, prefill)
    if length is None:
        return int(counts.max()) if counts.numel() else 0
    return length - memory


def split_memory(policy: Policy, state, prefill: bool):
    """(memory slots, regular slots) of a state. Memory slots (``merge="absorb"``) sit at the front of every
    row; before the first compression they do not exist yet and start empty (INVALID, weight 0)."""
    if not policy.memory_slots or policy.keeps_everything:
        return None, state
    if not prefill:
        front = policy.memory_slots
        return tuple(t[:, :, :front] for t in state), tuple(t[:, :, front:] for t in state)
    empty = []
    for number, tensor in enumerate(state):
        shape = (*tensor.shape[:2], policy.memory_slots, *tensor.shape[3:])
        fill = {2: INVALID, 3: -1}.get(number, 0)
        empty.append(torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device))
    return tuple(empty), state


def absorb_stage(policy: Policy, memory, state, survived: torch.Tensor, attention: torch.Tensor):
    """RetentiveKV's state absorption: every evicted slot joins its side's memory slot (text, or visual) in
    its row and KV head. A memory slot holds the weighted mean of the keys and values it absorbed and their
    total weight; before absorbing, its weight is kept by a factor ``h`` from the side's attention entropy
    this step (``min_retention + (1 - min_retention) * H / log n``): while attention over a side is diffuse
    its memory is kept whole, when it is focused the memory fades. Returns the new memory slots."""
    keys, values, labels, _, _, weights = state
    mem_keys, mem_values, mem_labels, mem_positions, mem_scores, mem_weights = memory
    valid = labels != INVALID
    bucket = modality_buckets(labels)
    evicted = valid & ~survived
    sides = policy.memory_slots
    absorbed_w = torch.where(evicted, weights.abs(), 0.0)
    sum_w = torch.zeros((*labels.shape[:2], sides), dtype=torch.float32, device=labels.device)
    sum_w.scatter_add_(-1, bucket, absorbed_w)
    index = bucket.unsqueeze(-1).expand_as(keys)
    sum_k = torch.zeros((*labels.shape[:2], sides, keys.shape[-1]), dtype=torch.float32, device=keys.device)
    sum_v = torch.zeros_like(sum_k)
    sum_k.scatter_add_(2, index, absorbed_w.unsqueeze(-1) * keys.float())
    sum_v.scatter_add_(2, index, absorbed_w.unsqueeze(-1) * values.float())
    # the retention factor per side, from the entropy of this step's attention over the side's slots
    attention = torch.where(valid, attention.clamp(min=0), 0.0)
    side_total = torch.zeros_like(sum_w).scatter_add_(-1, bucket, attention)
    p = attention / side_total.gather(-1, bucket).clamp(min=1e-30)
    plogp = torch.where(valid, -p * torch.log(p.clamp(min=1e-30)), 0.0)
    entropy = torch.zeros_like(sum_w).scatter_add_(-1, bucket, plogp)
    count = torch.zeros_like(sum_w).scatter_add_(-1, bucket, valid.float())
    normalized = torch.where(count > 1, entropy / torch.log(count.clamp(min=2)), 1.0).clamp(0, 1)
    retention = policy.min_retention + (1 - policy.min_retention) * normalized
    kept_w = mem_weights.float() * retention
    total = kept_w + sum_w
    denominator = total.clamp(min=1e-30).unsqueeze(-1)
    new_keys = (kept_w.unsqueeze(-1) * mem_keys.float() + sum_k) / denominator
    new_values = (kept_w.unsqueeze(-1) * mem_values.float() + sum_v) / denominator
    side_labels = torch.tensor([TEXT, int(Modality.IMAGE)], dtype=labels.dtype, device=labels.device)
    filled = total > 0
    return (
        torch.where(filled.unsqueeze(-1), new_keys, 0).to(keys.dtype),
        torch.where(filled.unsqueeze(-1), new_values, 0).to(values.dtype),
        torch.where(filled, side_labels.expand_as(mem_labels), INVALID).to(labels.dtype),
        torch.full_like(mem_positions, -1),
        torch.zeros_like(mem_scores),
        total.to(mem_weights.dtype),
    )


def park_stage(policy: Policy, kept_state, kept: torch.Tensor, kept_rank: torch.Tensor, counts: torch.Tensor):
    """HAE's recycle bin: of the slots a row keeps, the last ``recycle_bin`` by rank are parked: held and
    scored, but not attended (their weight is stored negated). A parked slot whose score climbs back into
    the row's top ``counts - recycle_bin`` is active again; one that falls out of the bin is deleted."""
    active = kept & (kept_rank < (counts - policy.recycle_bin).clamp(min=0).unsqueeze(-1))
    weights = kept_state[5].abs()
    return (*kept_state[:5], torch.where(active, weights, -weights))


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
    head_budgets: torch.Tensor | None = None,
    keep_positions: torch.Tensor | None = None,
    column_sums=attention_column_sums,
    gather=None,
    nearest=nearest_kept,
) -> tuple[torch.Tensor, ...]:
    """The operator's stages in order: score, budget and keep, select, gather, then merge, absorb or park.
    Outputs never alias inputs.

    ``column_sums``, ``gather`` and ``nearest`` are the stages a faster kernel may replace (the Triton
    operator passes its own); every other stage is shared.
    """
    pol = Policy.from_string(policy)
    memory, state = split_memory(pol, (keys, values, labels, positions, scores, weights), prefill)
    keys, values, labels, positions, scores, weights = state
    num_new = query.shape[2]
    if keep_positions is not None:  # HAE's later layers: the first layer's kept positions, no scoring
        forced = broadcast_keep(positions, labels, keep_positions)
        counts = forced.sum(-1)
        selection = new_scores = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    else:
        selection, new_scores = score_stage(pol, query, keys, labels, positions, scores, scaling, prefill, column_sums)
        if pol.score == "dual_attention" and prefill:
            forced, counts = dual_attention_counts(pol, selection, new_scores, labels)
            new_scores = selection
        else:
            forced, counts = keep_and_budget(pol, selection, labels, num_new, prefill, budget_fractions, head_budgets)
    dynamic = budget_fractions if head_budgets is None else head_budgets
    out_len = _out_length(pol, labels, counts, num_new, prefill, dynamic)
    slots, kept, kept_rank = select_stage(selection, labels, forced, counts, out_len)
    state = (keys, values, labels, positions, new_scores, weights)
    kept_state = (gather or gather_stage)(state, slots, kept)
    if pol.recycle_bin and not prefill and not pol.keeps_everything:
        return park_stage(pol, kept_state, kept, kept_rank, counts)
    if memory is not None:
        survived = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device).scatter(2, slots, kept)
        memory = absorb_stage(pol, memory, state, survived, new_scores)
        return tuple(torch.cat([m, k], dim=2) for m, k in zip(memory, kept_state, strict=True))
    return merge_stage(pol, state, slots, kept, kept_state, nearest)

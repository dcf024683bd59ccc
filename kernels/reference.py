"""Pure-PyTorch reference of the score-evict-merge operator: the CPU kernel and the oracle for Triton.

Shapes: ``query [B, Hq, Lq, D]`` (the current step's queries, the last ``Lq`` slots) and a
:class:`~mmkv_compile.state.SlotState` of ``[B, Hkv, S, ...]`` tensors. Slots are kept in position order; a
slot labelled INVALID is padding or unused. The stages, in the order :func:`score_evict_merge` runs them:

  score    :func:`score_stage`       how useful each slot is
  budget   :func:`budget_stage`      how many slots each (row, KV head) keeps (never more than the budget)
  keep     :func:`keep_and_budget`   the order slots are kept in: forced, priority labels, the rest, demoted
  select   :func:`select_stage`      the top slots of that order
  gather   :func:`gather_stage`      the kept slots' state
  merge    :func:`merge_stage`, :func:`absorb_stage`, :func:`park_stage`   what happens to the others
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mmkv_compile.kernels import heads
from mmkv_compile.labels import Modality
from mmkv_compile.policy import Policy, layer_count, output_length
from mmkv_compile.state import SlotState

INVALID = int(Modality.INVALID)
TEXT = int(Modality.TEXT)
MEDIA_LABELS = (int(Modality.IMAGE), int(Modality.VIDEO), int(Modality.AUDIO))
QUERY_CHUNK = 256  # queries scored at once by the all-queries score, to bound memory
MERGE_CHUNK = 1024  # evicted slots compared with the kept ones at once, to bound memory

# The keep order of a slot: a higher tier is kept first, the score orders slots within a tier.
DROPPED, DEMOTED, REGULAR, PRIORITY, FORCED = 0, 1, 2, 3, 4


# -- visibility ---------------------------------------------------------------------------------------


def visible_keys(labels: torch.Tensor, positions: torch.Tensor, query_slots: torch.Tensor, window: int = 0):
    """Bool ``[B, Hkv, Lq, S]``: key slot valid, not after the query (and, under a sliding ``window``, less
    than ``window`` positions before it), and the query slot itself valid."""
    return visible_to(labels, positions, labels[..., query_slots], positions[..., query_slots], window)


def visible_to(labels, positions, query_labels, query_positions, window: int = 0) -> torch.Tensor:
    """:func:`visible_keys` for queries given by their labels and positions ``[B, Hkv, Lq]``."""
    query_pos = query_positions.unsqueeze(-1)  # [B, Hkv, Lq, 1]
    key_pos = positions.unsqueeze(-2)
    seen = key_pos <= query_pos
    if window:
        seen = seen & (key_pos > query_pos - window)
    return seen & (labels != INVALID).unsqueeze(-2) & (query_labels != INVALID).unsqueeze(-1)


def live_slots(labels: torch.Tensor, positions: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: valid slots the next query can still attend to (all valid slots without a window;
    under a sliding window, those less than ``window - 1`` positions before the row's newest token)."""
    valid = labels != INVALID
    if not window:
        return valid
    newest = torch.where(valid, positions, -1).amax(dim=-1, keepdim=True)
    return valid & (positions > newest + 1 - window)


def post_vision_queries(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: valid slots after the last image/video slot of their row (every valid slot
    when a row has none)."""
    valid = labels != INVALID
    visual = valid & (labels != TEXT)
    last_visual = torch.where(visual, positions, -1).amax(dim=-1, keepdim=True)
    return valid & (positions > last_visual)


# -- score ----------------------------------------------------------------------------------------------


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
    window: int = 0,
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
        visible = visible_keys(labels, positions, slots, window)
        probs = attention_probs(query[:, :, start:stop], keys, visible, scaling)
        if query_ok is not None:
            probs = probs * query_ok[..., slots].unsqueeze(2).unsqueeze(-1)
        per_head += probs.sum(dim=3)
    # The GQA group is reduced after summing over every query, so chunking never changes the result.
    return per_head.amax(dim=2) if group_reduce == "max" else per_head.mean(dim=2)


def pool_scores(policy: Policy, scores: torch.Tensor) -> torch.Tensor:
    """1-D pooling over neighbouring slots (SnapKV keeps clusters, not isolated tokens)."""
    stage = policy.score
    if stage.pool == "none" or stage.kernel_size <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = stage.kernel_size // 2
    if stage.pool == "max":
        pooled = F.max_pool1d(flat, stage.kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, stage.kernel_size, stride=1, padding=pad)
    return pooled[..., : scores.shape[-1]].reshape(scores.shape)


class Scores(NamedTuple):
    """What the score stage gives the later stages, each ``[B, Hkv, S]`` float32."""

    selection: torch.Tensor  # orders the slots within a keep tier
    running: torch.Tensor  # stored as the slots' new running score
    individual: torch.Tensor | None = None  # HAE's individual attention (its keep rule needs both)


def score_stage(policy: Policy, query, state: SlotState, scaling: float, prefill: bool, column_sums=None) -> Scores:
    """Score every slot. ``column_sums`` computes attention column sums (the Triton kernel passes its own)."""
    column_sums = column_sums or attention_column_sums
    stage, window, group = policy.score, policy.placement.window, policy.placement.heads
    keys, labels, positions = state.keys, state.labels, state.positions
    num_new = query.shape[2]
    if stage.kind == "none":
        fresh = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    elif stage.kind == "position":
        fresh = positions.float()
    elif stage.kind in ("window", "all_queries", "retention"):
        num_queries = num_new if stage.kind == "all_queries" else min(stage.window, num_new)
        fresh = column_sums(query, keys, labels, positions, num_queries, scaling, stage.group_reduce, window=window)
    elif stage.kind == "post_vision":  # VL-Cache: the language queries after the last image
        post_vision = post_vision_queries(labels, positions)
        fresh = attention_column_sums(
            query, keys, labels, positions, num_new, scaling, stage.group_reduce, post_vision, window
        )
    elif prefill:  # dual_attention: HAE's dual-attention pruning at the prompt
        global_attention, individual = dual_attention(query, keys, labels, positions, scaling, window, group)
        return Scores(global_attention, global_attention, individual)
    else:  # dual_attention while decoding: accumulated attention of the new queries
        fresh = column_sums(query, keys, labels, positions, num_new, scaling, stage.group_reduce, window=window)
    running = state.scores.float() + fresh if stage.accumulate and not prefill else fresh
    selection = pool_scores(policy, running) if prefill else running
    if stage.kind == "retention":
        selection = retention_scores(running, labels, stage.retention_mix)
    if stage.share_across_heads:  # one token set for the whole layer, from every rank's heads
        selection = heads.gather_heads(selection, group).mean(dim=1, keepdim=True).expand_as(selection)
    return Scores(selection, running)


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


def dual_attention(query, keys, labels, positions, scaling: float, window: int = 0, group: str = ""):
    """HAE's dual-attention scores of each slot from the text queries after the last visual slot, attention
    averaged over every query head (of every rank in ``group``): global ``G`` (summed over those queries) and
    individual ``I`` (their maximum). Returns ``(G, I)``, each ``[B, Hkv, S]`` and equal over KV heads (one
    decision per row)."""
    batch, num_kv, seq, _ = keys.shape
    num_new = query.shape[2]
    query_heads = query.shape[1] * heads.world_size(group)
    text_after = post_vision_queries(labels, positions) & (labels == TEXT)
    total = torch.zeros(batch, seq, dtype=torch.float32, device=keys.device)
    peak = torch.zeros_like(total)
    for start in range(0, num_new, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_new)
        slots = torch.arange(seq - num_new + start, seq - num_new + stop, device=keys.device)
        visible = visible_keys(labels, positions, slots, window)
        probs = attention_probs(query[:, :, start:stop], keys, visible, scaling)
        probs = heads.sum_over_ranks(probs.sum(dim=(1, 2)), group) / query_heads
        probs = probs * text_after[:, 0, slots].unsqueeze(-1)  # [B, Lq, S]
        total += probs.sum(1)
        peak = torch.maximum(peak, probs.amax(1))
    expand = (batch, num_kv, seq)
    return total.unsqueeze(1).expand(expand), peak.unsqueeze(1).expand(expand)


# -- budget ---------------------------------------------------------------------------------------------


def budget_stage(
    policy: Policy,
    live: torch.Tensor,
    valid: torch.Tensor,
    num_new: int,
    prefill: bool,
    layer_budgets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slots each (row, KV head) keeps at this layer, int64 ``[B, Hkv]``: the budget's share of the row's live
    slots under the layer schedule, or ``layer_budgets`` (int64 ``[B]``) allocated across layers in the graph.
    After the prompt, a float budget holds each row at the ``valid`` slots it held before this step plus the
    budget's share of the step's own: none for one generated token, a prompt's share for a follow-up prompt (a
    later turn appended to the cache), so every prompt token, in whichever turn, is kept at the budget's rate.
    Held, not live: under a sliding window a slot leaving the window frees its place for a newer one instead of
    shrinking the layer step by step."""
    num_live = live.sum(-1)
    if policy.keeps_everything:
        return num_live
    if layer_budgets is not None:
        counts = layer_budgets.to(num_live.dtype).view(-1, 1).expand_as(num_live)
    elif prefill or not policy.budget.is_fraction:
        counts = layer_count(policy, num_live)
    else:
        old = live.shape[-1] - num_new
        counts = valid[..., :old].sum(-1) + layer_count(policy, live[..., old:].sum(-1))
    return torch.minimum(counts, num_live)


def head_budget_stage(
    policy: Policy, selection: torch.Tensor, live: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """AdaKV: spread a layer's budget over its KV heads by a top-k over all heads' scores together (every
    rank's heads under tensor parallelism: the ranking is the one-process ranking, in head order).

    Each head keeps its forced slots, ``head_floor`` of its uniform share, and the rest of its share in
    proportion to how many of the layer-wide top scores it holds, at most its uniform count: every head's
    slots are padded to one length, so a head above the uniform count would hold memory beyond the budget.
    Returns counts ``[B, Hkv]``.
    """
    group = policy.placement.heads
    num_forced = (forced & live).sum(-1)
    uniform_free = (counts - num_forced).clamp(min=0)
    candidates = live & ~forced
    everyone = heads.gather_heads(torch.where(candidates, selection, float("-inf")), group)
    flat = everyone.flatten(1)
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    )
    layer_free = heads.sum_over_ranks(uniform_free.sum(-1, keepdim=True), group)
    won = heads.local_heads((ranks < layer_free).view(everyone.shape), group) & candidates
    wins = won.sum(-1).double()
    floor = policy.budget.head_floor
    free = ((1 - floor) * wins + floor * uniform_free.double()).floor().long()
    return torch.minimum(num_forced + free, counts)


# -- keep -----------------------------------------------------------------------------------------------


def forced_stage(policy: Policy, live: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: slots always kept, the ``sinks`` first live slots and the recent window, both
    shrunk to fit in ``counts`` (a window wider than the budget keeps the newest slots the budget holds)."""
    keep = policy.keep
    forced = torch.zeros_like(live)
    sinks = torch.clamp(counts, max=keep.sinks)
    if keep.sinks:
        forced |= live & (live.cumsum(-1) <= sinks.unsqueeze(-1))
    recent = torch.full_like(counts, keep.recent)
    if keep.recent_fraction:
        recent = torch.maximum(recent, (counts.double() * keep.recent_fraction).floor().long())
    recent = torch.minimum(recent, counts - sinks)
    if keep.recent or keep.recent_fraction:
        from_end = live.flip(-1).cumsum(-1).flip(-1)
        forced |= live & (from_end <= recent.unsqueeze(-1))
    return forced


def slot_tiers(policy: Policy, labels: torch.Tensor, live: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """The keep tier of every slot (int8): forced, then the priority labels, then the rest; dead slots last."""
    tier = torch.where(live, REGULAR, DROPPED).to(torch.int8)
    for label in policy.keep.priority_labels:
        tier = torch.where(live & (labels == label), PRIORITY, tier).to(torch.int8)
    return torch.where(forced & live, FORCED, tier).to(torch.int8)


def coverage_demand(policy: Policy, selection: torch.Tensor, labels: torch.Tensor, forced: torch.Tensor):
    """MadaKV's demand per (row, KV head): for each modality, the fewest free slots whose scores cover
    ``coverage`` of that modality's free score mass, summed over modalities. int64 ``[B, Hkv]``."""
    free = (labels != INVALID) & ~forced
    demand = torch.zeros(labels.shape[:2], dtype=torch.int64, device=labels.device)
    for label in (TEXT, *MEDIA_LABELS):
        mine = free & (labels == label)
        mass = torch.where(mine, selection.clamp(min=0), 0.0).sort(-1, descending=True).values
        covered = mass.cumsum(-1)
        goal = policy.budget.coverage * covered[..., -1:]
        needed = (covered < goal).sum(-1) + (goal[..., 0] > 0).long()
        demand += torch.minimum(needed, mine.sum(-1))
    return demand


def modality_split_stage(
    selection: torch.Tensor, labels: torch.Tensor, live: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """MadaKV's per-head modality split: a head's free budget goes to each modality in proportion to that
    modality's share of the head's free scores, and each modality keeps its own top slots. Returns the
    slots this chooses, added to ``forced``; the few slots rounding leaves go to the best scores left."""
    free = live & ~forced
    free_budget = (counts - (forced & live).sum(-1)).clamp(min=0).double()
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


def dual_attention_keep(policy: Policy, scores: Scores, labels: torch.Tensor, live: torch.Tensor, counts):
    """HAE's prefill keep rule: a visual slot is a candidate for eviction when its global attention is below
    ``global_threshold`` of the visual total and its individual attention below ``individual_threshold``.
    Candidates are never kept, text comes first, and the row keeps at most its budget. Returns (tiers, counts)."""
    stage = policy.score
    visual = live & (labels != TEXT)
    global_attention = scores.selection
    visual_total = torch.where(visual, global_attention, 0.0).sum(-1, keepdim=True)
    candidate = (
        visual
        & (global_attention < stage.global_threshold * visual_total)
        & (scores.individual < stage.individual_threshold)
    )
    counts = torch.minimum(counts, live.sum(-1) - candidate.sum(-1))
    tier = torch.where(live, REGULAR, DROPPED).to(torch.int8)
    tier = torch.where(candidate, DEMOTED, tier).to(torch.int8)
    tier = torch.where(live & (labels == TEXT), PRIORITY, tier).to(torch.int8)
    return tier, counts


def broadcast_keep(positions: torch.Tensor, live: torch.Tensor, keep_positions: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: live slots whose position is among ``keep_positions [B, K]`` (HAE's index
    broadcasting: the first layer's decision, reused by later layers without scoring them)."""
    beyond = torch.iinfo(keep_positions.dtype).max  # matches no position
    wanted = torch.where(keep_positions >= 0, keep_positions, beyond)
    wanted = torch.nn.functional.pad(wanted, (0, 1), value=beyond)  # never empty, though the first layer kept none
    wanted = wanted.sort(-1).values.unsqueeze(1).expand(*positions.shape[:2], -1).contiguous()
    index = torch.searchsorted(wanted, positions.contiguous()).clamp(max=wanted.shape[-1] - 1)
    return live & (wanted.gather(-1, index) == positions)


def keep_and_budget(
    policy: Policy,
    scores: Scores,
    labels: torch.Tensor,
    live: torch.Tensor,
    num_new: int,
    prefill: bool,
    layer_budgets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget and keep order: (tier of every slot ``[B, Hkv, S]``, slots each row and KV head keeps ``[B, Hkv]``)."""
    counts = budget_stage(policy, live, labels != INVALID, num_new, prefill, layer_budgets)
    if scores.individual is not None:
        return dual_attention_keep(policy, scores, labels, live, counts)
    forced = forced_stage(policy, live, counts)
    if policy.budget.head_budget == "global_topk" and prefill:
        counts = head_budget_stage(policy, scores.selection, live, forced, counts)
    if policy.keep.modality_split and prefill:
        forced = modality_split_stage(scores.selection, labels, live, forced, counts)
    return slot_tiers(policy, labels, live, forced), counts


# -- select and gather ----------------------------------------------------------------------------------


def select_stage(
    selection: torch.Tensor, tier: torch.Tensor, counts: torch.Tensor, out_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank slots by (tier, score), keep the top ``counts``; return slot indices ``[B, Hkv, out_len]`` in
    position order, a bool mask of which of them are kept, and their ranks."""
    order = torch.argsort(selection, dim=-1, descending=True, stable=True)
    order = order.gather(-1, torch.argsort(tier.gather(-1, order), dim=-1, descending=True, stable=True))
    top = order[..., :out_len]
    ranks = torch.arange(out_len, device=tier.device).expand_as(top)
    slots, perm = torch.sort(top, dim=-1)
    kept_rank = ranks.gather(-1, perm)
    kept = (kept_rank < counts.unsqueeze(-1)) & (tier.gather(-1, slots) != DROPPED)
    return slots, kept, kept_rank


def gather_stage(state: SlotState, slots: torch.Tensor, kept: torch.Tensor) -> SlotState:
    """Gather the kept slots of every state tensor; unused slots are INVALID with zero K/V and weight."""
    index_kv = slots.unsqueeze(-1).expand(*slots.shape, state.keys.shape[-1])
    kept_kv = kept.unsqueeze(-1)
    return SlotState(
        keys=torch.where(kept_kv, state.keys.gather(2, index_kv), 0),
        values=torch.where(kept_kv, state.values.gather(2, index_kv), 0),
        labels=torch.where(kept, state.labels.gather(2, slots), INVALID).to(state.labels.dtype),
        positions=torch.where(kept, state.positions.gather(2, slots), -1),
        scores=torch.where(kept, state.scores.gather(2, slots), 0.0),
        weights=torch.where(kept, state.weights.gather(2, slots), 0.0),
        parked=kept & state.parked.gather(2, slots),
    )


# -- merge ----------------------------------------------------------------------------------------------


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


def survivors(shape_like: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, Hkv, S]``: the input slots that were kept."""
    return torch.zeros(shape_like.shape, dtype=torch.bool, device=shape_like.device).scatter(2, slots, kept)


def merge_stage(
    policy: Policy, state: SlotState, evicted: torch.Tensor, kept: torch.Tensor, kept_state: SlotState, nearest=None
) -> SlotState:
    """Merge every ``evicted`` slot into its most similar kept slot (cosine of keys, same row and KV head).

    Rules, for a kept slot ``c`` receiving evicted slots ``e`` (weights ``w`` count original tokens, so a
    slot merged again later stays an exact mean):
      avg       k_c <- (w_c k_c + sum w_e k_e) / (w_c + sum w_e)                  (MEDA, LOOK-M A-merge)
      pivot     as avg, with each k_e first averaged with k_c                      (LOOK-M P-merge)
      weighted  as avg, with each k_e scaled by its cosine similarity to k_c       (LOOK-M W-merge)
    Values follow the keys' assignment and rule. ``nearest`` finds each slot's target (the Triton kernel
    passes its own).
    """
    rule = policy.merge.rule
    if rule == "none" or kept_state.keys.shape[2] == 0:  # nothing to merge, or nothing to merge into
        return kept_state
    nearest = nearest or nearest_kept
    keys, values, weights = state.keys, state.values, state.weights
    new_keys, new_values, new_weights = kept_state.keys, kept_state.values, kept_state.weights
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
        if rule == "pivot":
            k_e = (k_e + new_keys.float().gather(2, index)) / 2
            v_e = (v_e + new_values.float().gather(2, index)) / 2
        elif rule == "weighted":
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
    return kept_state._replace(
        keys=torch.where(received, merged_keys.to(new_keys.dtype), new_keys),
        values=torch.where(received, merged_values.to(new_values.dtype), new_values),
        weights=total,
    )


def split_memory(policy: Policy, state: SlotState, prefill: bool) -> tuple[SlotState | None, SlotState]:
    """(memory slots, regular slots) of a state. Memory slots (merge ``absorb``) sit at the front of every
    row; before the first compression they do not exist yet and start empty (INVALID, weight 0)."""
    front = policy.merge.memory_slots
    if not front or policy.keeps_everything:
        return None, state
    if not prefill:
        return state.map(lambda t: t[:, :, :front]), state.map(lambda t: t[:, :, front:])
    empty = state.with_length(front)
    return (
        SlotState(
            keys=empty.keys.zero_(),
            values=empty.values.zero_(),
            labels=empty.labels.fill_(INVALID),
            positions=empty.positions.fill_(-1),
            scores=empty.scores.zero_(),
            weights=empty.weights.zero_(),
            parked=empty.parked.zero_(),
        ),
        state,
    )


def absorb_stage(policy: Policy, memory: SlotState, state: SlotState, absorbed: torch.Tensor, attention):
    """RetentiveKV's state absorption: every ``absorbed`` slot joins its side's memory slot (text, or visual) in
    its row and KV head. A memory slot holds the weighted mean of the keys and values it absorbed and their
    total weight; before absorbing, its weight is kept by a factor ``h`` from the side's attention entropy
    this step (``min_retention + (1 - min_retention) * H / log n``): while attention over a side is diffuse
    its memory is kept whole, when it is focused the memory fades. Returns the new memory slots."""
    keys, values, labels = state.keys, state.values, state.labels
    valid = labels != INVALID
    bucket = modality_buckets(labels)
    sides = policy.merge.memory_slots
    absorbed_w = torch.where(absorbed, state.weights, 0.0)
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
    retention = policy.merge.min_retention + (1 - policy.merge.min_retention) * normalized
    kept_w = memory.weights.float() * retention
    total = kept_w + sum_w
    denominator = total.clamp(min=1e-30).unsqueeze(-1)
    new_keys = (kept_w.unsqueeze(-1) * memory.keys.float() + sum_k) / denominator
    new_values = (kept_w.unsqueeze(-1) * memory.values.float() + sum_v) / denominator
    side_labels = torch.tensor([TEXT, int(Modality.IMAGE)], dtype=labels.dtype, device=labels.device)
    filled = total > 0
    return SlotState(
        keys=torch.where(filled.unsqueeze(-1), new_keys, 0).to(keys.dtype),
        values=torch.where(filled.unsqueeze(-1), new_values, 0).to(values.dtype),
        labels=torch.where(filled, side_labels.expand_as(memory.labels), INVALID).to(labels.dtype),
        positions=torch.full_like(memory.positions, -1),
        scores=torch.zeros_like(memory.scores),
        weights=total.to(memory.weights.dtype),
        parked=torch.zeros_like(memory.parked),
    )


def park_stage(policy: Policy, kept_state: SlotState, kept: torch.Tensor, kept_rank: torch.Tensor, counts):
    """HAE's recycle bin: of the slots a row keeps, the last ``recycle_bin`` by rank are parked: held and
    scored, but not attended. A parked slot whose score climbs back into the row's top
    ``counts - recycle_bin`` is active again; one that falls out of the bin is deleted."""
    active = kept & (kept_rank < (counts - policy.merge.recycle_bin).clamp(min=0).unsqueeze(-1))
    return kept_state._replace(parked=kept & ~active)


# -- the operator ---------------------------------------------------------------------------------------


def kept_length(policy: Policy, labels, counts, num_new: int, prefill: bool, data_dependent: bool) -> int:
    """Physical slots out (memory slots excluded): from shapes when the policy allows, else the longest row."""
    memory = 0 if policy.keeps_everything else policy.merge.memory_slots
    total = labels.shape[-1] + (0 if prefill else memory)  # memory slots are in the input after prefill
    length = None if data_dependent else output_length(policy, total, num_new, prefill)
    if length is None:
        return int(counts.max()) if counts.numel() else 0
    return length - memory


def score_evict_merge(
    query: torch.Tensor,
    state: SlotState,
    scaling: float,
    policy: str,
    prefill: bool,
    layer_budgets: torch.Tensor | None = None,
    keep_positions: torch.Tensor | None = None,
    column_sums=None,
    gather=None,
    nearest=None,
) -> SlotState:
    """The operator's stages in order: score, budget and keep, select, gather, then merge, absorb or park.
    Outputs never alias inputs.

    ``column_sums``, ``gather`` and ``nearest`` are the stages a faster kernel may replace (the Triton
    operator passes its own); every other stage is shared.
    """
    pol = Policy.from_string(policy)
    memory, state = split_memory(pol, state, prefill)
    labels = state.labels
    num_new = query.shape[2]
    live = live_slots(labels, state.positions, pol.placement.window)
    if keep_positions is not None:  # HAE's later layers: the first layer's kept positions, no scoring
        chosen = broadcast_keep(state.positions, live, keep_positions)
        counts = torch.minimum(budget_stage(pol, live, labels != INVALID, num_new, prefill), chosen.sum(-1))
        tier = torch.where(chosen, FORCED, DROPPED).to(torch.int8)
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        scores = Scores(zeros, zeros)
    else:
        scores = score_stage(pol, query, state, scaling, prefill, column_sums)
        tier, counts = keep_and_budget(pol, scores, labels, live, num_new, prefill, layer_budgets)
    out_len = kept_length(pol, labels, counts, num_new, prefill, layer_budgets is not None)
    slots, kept, kept_rank = select_stage(scores.selection, tier, counts, out_len)
    state = state._replace(scores=scores.running)
    kept_state = (gather or gather_stage)(state, slots, kept)
    if pol.merge.recycle_bin and not prefill and not pol.keeps_everything:
        return park_stage(pol, kept_state, kept, kept_rank, counts)
    evicted = live & ~survivors(labels, slots, kept)
    if memory is not None:
        memory = absorb_stage(pol, memory, state, evicted, scores.running)
        return SlotState(*(torch.cat([m, k], dim=2) for m, k in zip(memory, kept_state, strict=True)))
    return merge_stage(pol, state, evicted, kept, kept_state, nearest)

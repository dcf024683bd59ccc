"""The score-evict-merge operator on its own: registration, hand-computed cases, budget arithmetic, padding."""

from __future__ import annotations

import math

import pytest
import torch
from support import IMAGE, INVALID, TEXT, kept_positions, policy_of, random_state, run_op, slot_state

from mmkv_compile.policy import LayerPlacement
from mmkv_compile.state import SlotState


def _call(query, state, method, budget, prefill=True, scaling=None, **params):
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return run_op(policy_of(method, budget, **params), query, state, prefill, scaling)


OPCHECK_CASES = [
    ("snapkv", 0.5, True, {"window": 3}),
    ("h2o", 6, False, {}),
    ("streaming_llm", 5, True, {"sinks": 2}),
    ("text_prior", 0.5, True, {"window": 3}),
    ("meda", 0.5, True, {}),
]


@pytest.mark.parametrize("method,budget,prefill,params", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(method, budget, prefill, params):
    query, state = random_state(num_new=None if prefill else 1)
    state.labels[..., :4] = IMAGE
    policy = policy_of(method, budget, **params)
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if policy.static_output_length:
        tests.append("test_aot_dispatch_dynamic")
    args = (query, *state, 0.35, policy.to_string(), prefill)
    torch.library.opcheck(torch.ops.mmkv.score_evict_merge.default, args, test_utils=tests)


@pytest.mark.parametrize("num_new,window", [(2, 0), (1, 6), (1, 4)], ids=["full", "window-full", "window-slides"])
def test_opcheck_cache_append(num_new, window):
    """Real outputs match the fake kernel's sizes and strides (a compiled region receiving them asserts both),
    also when a sliding window drops the oldest slot."""
    _, state = random_state(seq=6)
    _, new = random_state(seq=num_new)
    args = (*state, new.keys, new.values, new.labels, new.positions, LayerPlacement(0, 2, window).to_string())
    torch.library.opcheck(torch.ops.mmkv.cache_append.default, args)


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    query, state = random_state(seq=10)
    out = _call(query, state, "streaming_llm", 5, sinks=2)
    assert out.positions[0, 0].tolist() == [0, 1, 7, 8, 9]
    assert (out.labels == TEXT).all()


def test_snapkv_hand_computed_scores_and_kept_slots():
    """One window query [1, 0] against keys [a_j, 0] with scale 1: the scores are softmax(a)."""
    a = torch.tensor([0.0, 5.0, 0.0, 4.0, 0.0, 0.0])
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, :, 0] = a
    query = torch.zeros(1, 1, 6, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    out = _call(query, slot_state(keys), "snapkv", 3, scaling=1.0, window=1, pool="none")
    assert out.positions[0, 0].tolist() == [1, 3, 5]  # the window slot (5) is forced, then the two best scores
    expected = torch.softmax(a, 0)[[1, 3, 5]]
    torch.testing.assert_close(out.scores[0, 0], expected)
    torch.testing.assert_close(out.keys[0, 0, :, 0], a[[1, 3, 5]])


def test_gqa_scores_are_reduced_over_the_group_before_selection():
    """Two query heads share one KV head: one favours slot 1, the other slot 2 more weakly. The group
    mean keeps slot 1; the group max keeps whichever single head is more peaked."""
    keys = torch.zeros(1, 1, 4, 2)
    keys[0, 0, 1] = torch.tensor([6.0, 0.0])
    keys[0, 0, 2] = torch.tensor([0.0, 9.0])
    query = torch.zeros(1, 2, 4, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    query[0, 1, -1] = torch.tensor([0.0, 0.5])
    state = slot_state(keys)
    kept_mean = _call(query, state, "snapkv", 2, scaling=1.0, window=1, pool="none", group_reduce="mean").positions
    kept_max = _call(query, state, "snapkv", 2, scaling=1.0, window=1, pool="none", group_reduce="max").positions
    p0 = torch.softmax(torch.tensor([0.0, 6.0, 0.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 0.0, 4.5, 0.0]), 0)
    best_mean = int(torch.argmax((p0 + p1)[:3]))
    best_max = int(torch.argmax(torch.maximum(p0, p1)[:3]))
    assert kept_mean[0, 0].tolist() == sorted([best_mean, 3])
    assert kept_max[0, 0].tolist() == sorted([best_max, 3])


@pytest.mark.parametrize(
    "budget,valid,expected", [(0.25, 10, 2), (0.5, 10, 5), (0.3, 7, 2), (1.0, 7, 7), (4, 10, 4), (20, 10, 10)]
)
def test_budget_arithmetic(budget, valid, expected):
    """A float budget keeps floor(budget * n) of a row's n tokens: at most that share, never more."""
    query, state = random_state(seq=10)
    state.labels[:, :, : 10 - valid] = INVALID
    out = _call(query, state, "snapkv", budget, window=1)
    kept = (out.labels[0] != INVALID).sum(-1)
    assert kept.tolist() == [expected, expected]
    if isinstance(budget, float):
        assert out.labels.shape[-1] == math.floor(budget * 10)


def test_text_prior_spends_the_budget_on_text_first():
    """4 text and 8 image slots. At 0.5 (6 slots) all 4 text slots come first, then the 2 best images; at
    0.25 (3 slots) the budget holds only text: the 3 best-scored text slots and no image."""
    query, state = random_state(seq=12)
    state.labels[..., 2:10] = IMAGE
    for budget, text, image in ((0.5, 4, 2), (0.25, 3, 0)):
        out = _call(query, state, "text_prior", budget, window=2)
        for head in range(2):
            row = out.labels[0, head]
            assert int((row == TEXT).sum()) == text and int((row == IMAGE).sum()) == image


@pytest.mark.parametrize("method,params", [("snapkv", {"window": 3}), ("h2o", {}), ("streaming_llm", {"sinks": 2})])
def test_left_padding_keeps_what_the_row_keeps_alone(method, params):
    pad, seq = 3, 11
    query, alone = random_state(batch=1, seq=seq - pad, num_new=seq - pad, seed=1)

    def padded(t):
        if t.dim() == 4:
            return torch.cat([torch.zeros_like(t[..., :pad, :]), t], dim=-2)
        return torch.cat([torch.zeros_like(t[..., :pad]), t], dim=-1)

    state = alone.map(padded)._replace(positions=torch.arange(seq).expand(1, 2, seq).contiguous())
    state.labels[..., :pad] = INVALID
    padded_query = torch.cat([torch.zeros_like(query[:, :, :pad]), query], dim=2)
    out_alone = _call(query, alone, method, 0.5, **params)
    out_padded = _call(padded_query, state, method, 0.5, **params)
    valid = out_padded.labels != INVALID
    assert torch.equal(out_padded.positions[valid].view(1, 2, -1) - pad, out_alone.positions)
    torch.testing.assert_close(out_padded.keys[valid].view(out_alone.keys.shape), out_alone.keys)


def test_outputs_never_alias_inputs():
    query, state = random_state(seq=6)
    outputs = _call(query, state, "snapkv", 1.0, window=2)
    for out, original in zip(outputs, state, strict=True):
        assert out.data_ptr() != original.data_ptr()
    for out, original in zip(outputs[:4], state[:4], strict=True):  # budget 1.0 keeps keys..positions as they are
        assert torch.equal(out, original)


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_all_query_scores_do_not_depend_on_query_chunking(monkeypatch, group_reduce):
    from mmkv_compile.kernels import reference

    query, state = random_state(seq=9, groups=2)
    policy = policy_of("snapkv", 0.45, window=9, pool="none", group_reduce=group_reduce)
    whole = run_op(policy, query, state, scaling=0.3)
    monkeypatch.setattr(reference, "QUERY_CHUNK", 2)
    chunked = run_op(policy, query, state, scaling=0.3)
    assert torch.equal(whole.positions, chunked.positions)
    torch.testing.assert_close(whole.scores, chunked.scores)


def test_sliding_window_layer_keeps_only_what_its_window_can_still_see():
    """A layer with a sliding window of 5 over 12 prompt tokens: its next query sees the 4 newest, so at
    budget 0.5 it keeps floor(0.5 * 4) = 2 of them, scored with windowed attention."""
    query, state = random_state(seq=12, seed=3)
    policy = policy_of("snapkv", 0.5, window=2, pool="none")
    out = run_op(policy.at_layer(LayerPlacement(window=5)), query, state)
    assert out.labels.shape[-1] == 2
    assert set(out.positions[0, 0].tolist()) <= {8, 9, 10, 11}
    assert isinstance(out, SlotState)


# -- method stages, by hand-computed cases -------------------------------------------------------------


def test_adakv_moves_budget_away_from_a_head_that_needs_less():
    """Head 0's window query puts ~0.5 on slots 1 and 2 and ~1e-4 elsewhere; head 1's attention is flat
    (0.1 per slot). Uniform: 4 per head, 1 of them the window. With alpha=0 the layer-wide top-6 of the
    free slots is head 0's two peaks and four of head 1's slots: head 0 keeps 1+2; head 1 would take 1+4 but
    keeps at most the uniform 4, since heads are padded to one length and the budget bounds that length."""
    seq, dim = 10, 4
    keys = torch.zeros(1, 2, seq, dim)
    keys[0, 0, 1, 0] = keys[0, 0, 2, 0] = 8.0
    query = torch.zeros(1, 2, seq, dim)
    query[0, 0, -1, 0] = 1.0
    out = run_op(policy_of("adakv", 4, window=1, pool="none", alpha=0.0), query, slot_state(keys))
    assert (out.labels[0] != INVALID).sum(-1).tolist() == [3, 4]
    assert kept_positions(out) == [1, 2, 9]
    assert out.labels.shape[-1] == 4  # the padded length is the uniform budget, never more
    floored = run_op(policy_of("adakv", 4, window=1, pool="none", alpha=1.0), query, slot_state(keys))
    assert (floored.labels[0] != INVALID).sum(-1).tolist() == [4, 4]  # alpha=1 is uniform


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_head_budgets_stay_within_the_uniform_budget(alpha):
    torch.manual_seed(1)
    heads, seq = 4, 40
    policy = policy_of("adakv", 0.25, window=4, alpha=alpha)
    out = run_op(policy, torch.randn(1, heads * 2, seq, 8), slot_state(torch.randn(1, heads, seq, 8)))
    counts = (out.labels[0] != INVALID).sum(-1)
    uniform = seq // 4
    assert int(counts.max()) <= uniform and out.labels.shape[-1] == uniform
    assert int(counts.min()) >= 4 + int(alpha * (uniform - 4))  # window + the floor
    if alpha < 1:
        assert int(counts.sum()) < heads * uniform  # some head gave slots up


def test_tova_keeps_one_token_set_for_the_whole_layer():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    out = run_op(policy_of("tova", 5), query, slot_state(keys), scaling=0.35)
    assert torch.equal(out.positions[0, 0], out.positions[0, 1])
    assert 11 in out.positions[0, 0].tolist()  # the newest token
    # Hand check: the kept set is the top-4 of the last query's head-averaged attention, plus the newest.
    logits = torch.einsum("bhd,bhsd->bhs", query[:, :, -1], keys.repeat_interleave(2, 1)) * 0.35
    mean = torch.softmax(logits, -1).mean(1)[0]
    mean[11] = float("inf")
    assert out.positions[0, 0].tolist() == sorted(torch.topk(mean, 5).indices.tolist())


def _merge_case(merge: str):
    """Four image slots: k0=[2,0] and k1=[0,2] win the prompt's attention; k2 is closest to k0, k3 to k1."""
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.9, 0.1], [0.1, 0.9]]).view(1, 1, 4, 2)
    query = torch.full((1, 1, 4, 2), 3.0)
    labels = torch.ones(1, 1, 4, dtype=torch.int8)  # all image: no text priority
    return run_op(policy_of("look_m", 2, merge=merge), query, slot_state(keys, labels))


@pytest.mark.parametrize("merge", ["avg", "pivot", "weighted"])
def test_look_m_merges_each_evicted_token_into_its_nearest_kept_token(merge):
    k0, k1, k2, k3 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.9, 0.1], [0.1, 0.9]])
    cos2, cos3 = float(torch.cosine_similarity(k2, k0, 0)), float(torch.cosine_similarity(k3, k1, 0))
    expected = {
        "avg": [(k0 + k2) / 2, (k1 + k3) / 2],
        "pivot": [(k0 + (k2 + k0) / 2) / 2, (k1 + (k3 + k1) / 2) / 2],
        "weighted": [(k0 + cos2 * k2) / 2, (k1 + cos3 * k3) / 2],
    }[merge]
    out = _merge_case(merge)
    assert out.positions[0, 0].tolist() == [0, 1]
    torch.testing.assert_close(out.keys[0, 0], torch.stack(expected))
    torch.testing.assert_close(out.values[0, 0], torch.stack(expected))  # values follow the keys' assignment
    assert out.weights[0, 0].tolist() == [2.0, 2.0]


def test_merge_counts_keep_repeated_merges_exact():
    """A kept slot that already stands for 2 tokens absorbs one more: the result is the mean of all 3."""
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.2]]).view(1, 1, 3, 2)
    state = slot_state(keys, torch.ones(1, 1, 3, dtype=torch.int8), weights=torch.tensor([[[2.0, 1.0, 1.0]]]))
    out = run_op(policy_of("look_m", 2, merge="avg"), torch.full((1, 1, 3, 2), 3.0), state)
    assert out.positions[0, 0].tolist() == [0, 1]
    torch.testing.assert_close(out.keys[0, 0, 0], (2 * keys[0, 0, 0] + keys[0, 0, 2]) / 3)
    assert out.weights[0, 0].tolist() == [3.0, 1.0]


def test_merging_with_nothing_kept_returns_an_empty_state():
    """A row allocated no slots keeps nothing; merging has no target and must not fail."""
    query, state = random_state(batch=2, seq=12, seed=4)
    state = state._replace(labels=torch.full((2, 2, 12), IMAGE, dtype=torch.int8))
    out = run_op(policy_of("meda", 0.5), query, state, layer_budgets=torch.zeros(2, dtype=torch.int64))
    assert out.keys.shape[2] == 0


def test_madakv_splits_a_heads_budget_by_modality():
    """Window query (slot 9, forced) logits: text slot 0 -> 3, text 1-4 -> -5, image 5-8 -> 1.5, itself 0.
    Free mass: text e^3 + 4e^-5 = 20.11, image 4e^1.5 = 17.93: of 4 free slots text gets floor(4 * 0.529) = 2,
    image floor(4 * 0.471) = 1, and the slot rounding leaves goes to the best left (image 6). A global top-4
    would keep 0, 5, 6, 7 instead."""
    logits = torch.tensor([3.0, -5, -5, -5, -5, 1.5, 1.5, 1.5, 1.5, 0.0])
    keys = torch.zeros(1, 1, 10, 2)
    keys[0, 0, :, 0] = logits
    query = torch.zeros(1, 1, 10, 2)
    query[0, 0, -1, 0] = 1.0
    labels = torch.tensor([TEXT] * 5 + [IMAGE] * 4 + [TEXT], dtype=torch.int8).view(1, 1, 10)
    out = run_op(policy_of("madakv", 0.5, window=1), query, slot_state(keys, labels), layer_budgets=torch.tensor([5]))
    assert kept_positions(out) == [0, 1, 5, 6, 9]
    plain = run_op(policy_of("snapkv", 5, window=1, pool="none"), query, slot_state(keys, labels))
    assert kept_positions(plain) == [0, 5, 6, 7, 9]


def test_coverage_demand_hand_computed():
    """coverage 0.75: text scores 0.5, 0.3, 0.1, 0.1 need 2 slots (0.5 < 0.75 <= 0.8); image 0.9, 0.05,
    0.05 needs 1; the forced slot does not count."""
    from mmkv_compile.kernels import reference as ref

    selection = torch.tensor([[[0.5, 0.3, 0.1, 0.1, 0.9, 0.05, 0.05, 7.0]]])
    labels = torch.tensor([[[TEXT] * 4 + [IMAGE] * 3 + [TEXT]]], dtype=torch.int8)
    forced = torch.zeros(1, 1, 8, dtype=torch.bool)
    forced[..., -1] = True
    assert ref.coverage_demand(policy_of("madakv", 0.5, coverage=0.75), selection, labels, forced).tolist() == [[3]]


def test_retention_score_hand_computed():
    from mmkv_compile.kernels import reference as ref

    attention = torch.tensor([[[0.4, 0.1, 0.25, 0.25]]])
    labels = torch.tensor([[[TEXT, TEXT, IMAGE, IMAGE]]], dtype=torch.int8)
    within = [0.8, 0.2, 0.5, 0.5]  # each slot's share of its side's attention
    want = [0.5 * a + 0.5 * (-p * math.log(p)) for a, p in zip([0.4, 0.1, 0.25, 0.25], within, strict=True)]
    assert ref.retention_scores(attention, labels, 0.5)[0, 0].tolist() == pytest.approx(want, abs=1e-6)


def _absorb_case():
    """6 slots (4 text, 2 image), a query that attends uniformly (zero query), budget 2 regular slots with
    the newest forced: every slot but the newest and one other is absorbed."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 6, 4, generator=generator)
    values = torch.randn(1, 1, 6, 4, generator=generator)
    labels = torch.tensor([[[TEXT, IMAGE, TEXT, IMAGE, TEXT, TEXT]]], dtype=torch.int8)
    return keys, values, labels


def _append(state: SlotState, key, value, label: int, position: int) -> SlotState:
    one = slot_state(key, torch.tensor([[[label]]], dtype=torch.int8), values=value,
                     positions=torch.tensor([[[position]]]))  # fmt: skip
    return SlotState(*(torch.cat([a, b], dim=2) for a, b in zip(state, one, strict=True)))


def test_retentivekv_absorbs_evicted_tokens_into_exact_means():
    keys, values, labels = _absorb_case()
    policy = policy_of("retentivekv", 2, window=1, recent=1, min_retention=1.0)
    out = run_op(policy, torch.zeros(1, 1, 6, 4), slot_state(keys, labels, values=values))
    assert out.labels[0, 0, :2].tolist() == [TEXT, IMAGE]  # the two memory slots lead the row
    kept = out.positions[0, 0, 2:][out.labels[0, 0, 2:] != INVALID].tolist()
    assert len(kept) == 2 and kept[-1] == 5
    for side, label in enumerate((TEXT, IMAGE)):
        absorbed = [i for i in range(6) if labels[0, 0, i] == label and i not in kept]
        assert out.weights[0, 0, side].item() == len(absorbed)
        torch.testing.assert_close(out.keys[0, 0, side], keys[0, 0, absorbed].mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.values[0, 0, side], values[0, 0, absorbed].mean(0), atol=1e-6, rtol=0)
    # a decode step: one more token arrives, the cache holds 2 regular slots, one more text slot is absorbed
    new_key, new_value = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    again = run_op(policy, torch.zeros(1, 1, 1, 4), _append(out, new_key, new_value, TEXT, 6), prefill=False)
    all_keys = torch.cat([keys, new_key], dim=2)[0, 0]
    regular = again.positions[0, 0, 2:][again.labels[0, 0, 2:] != INVALID].tolist()
    absorbed = [i for i in range(7) if i not in regular and (i == 6 or labels[0, 0, i] == TEXT)]
    assert again.weights[0, 0, 0].item() == len(absorbed)  # the weight counts every token the memory holds
    torch.testing.assert_close(again.keys[0, 0, 0], all_keys[absorbed].mean(0), atol=1e-5, rtol=0)


def test_retentivekv_memory_fades_by_entropy():
    """Attention over the text side focused on one slot (entropy 0): the text memory keeps min_retention
    of its weight before absorbing; the image side is even over its slots (entropy at its maximum): kept whole."""
    from mmkv_compile.kernels import reference as ref

    keys, values, labels = _absorb_case()
    policy = policy_of("retentivekv", 2, window=1, recent=1, min_retention=0.5)
    memory = slot_state(torch.zeros(1, 1, 2, 4), torch.tensor([[[TEXT, IMAGE]]], dtype=torch.int8),
                        positions=torch.full((1, 1, 2), -1), weights=torch.tensor([[[4.0, 3.0]]]))  # fmt: skip
    state = slot_state(keys, labels, values=values)
    nothing = torch.zeros(1, 1, 6, dtype=torch.bool)  # nothing absorbed this step
    attention = torch.tensor([[[0.0, 0.5, 0.0, 0.5, 1.0, 0.0]]])  # text: one-hot on slot 4; image: even
    new = ref.absorb_stage(policy, memory, state, nothing, attention)
    assert new.weights.flatten().tolist() == pytest.approx([4.0 * 0.5, 3.0 * 1.0])


def test_weighted_memory_slot_reads_back_like_the_tokens_it_absorbed():
    """Tokens with one key and value, absorbed into a memory slot of weight 3, give the same attention
    output as the three tokens themselves: the log-weight bias is the readout's gate."""
    from mmkv_compile.masks import slot_attention_mask

    generator = torch.Generator().manual_seed(1)
    kept_keys = torch.randn(1, 2, 4, 8, generator=generator)
    kept_values = torch.randn(1, 2, 4, 8, generator=generator)
    dup_key, dup_value = torch.randn(1, 2, 1, 8, generator=generator), torch.randn(1, 2, 1, 8, generator=generator)
    query = torch.randn(1, 4, 1, 8, generator=generator)
    full_keys = torch.cat([dup_key.expand(1, 2, 3, 8), kept_keys], dim=2)
    full_values = torch.cat([dup_value.expand(1, 2, 3, 8), kept_values], dim=2)
    full = torch.nn.functional.scaled_dot_product_attention(query, full_keys, full_values, enable_gqa=True)
    keys, values = torch.cat([dup_key, kept_keys], dim=2), torch.cat([dup_value, kept_values], dim=2)
    labels = torch.zeros(1, 2, 5, dtype=torch.int8)
    positions = torch.tensor([-1, 3, 4, 5, 6]).expand(1, 2, 5)
    weights = torch.tensor([3.0, 1, 1, 1, 1]).expand(1, 2, 5)
    mask = slot_attention_mask(labels, positions, query, weights=weights)
    read = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(read, full, atol=1e-5, rtol=0)
    plain = slot_attention_mask(labels, positions, query)
    unweighted = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=plain, enable_gqa=True)
    assert (unweighted - full).abs().max() > 1e-3  # without the weight, the memory is under-read


def test_dual_attention_matches_a_hand_loop():
    from mmkv_compile.kernels import reference as ref

    generator = torch.Generator().manual_seed(2)
    seq = 9
    keys, query = torch.randn(1, 2, seq, 4, generator=generator), torch.randn(1, 4, seq, 4, generator=generator)
    labels = torch.tensor([[[TEXT, TEXT, IMAGE, IMAGE, IMAGE, TEXT, IMAGE, TEXT, TEXT]]], dtype=torch.int8)
    labels = labels.expand(1, 2, seq)
    positions = torch.arange(seq).expand(1, 2, seq)
    total, peak = ref.dual_attention(query, keys, labels, positions, 0.5)
    want_total, want_peak = torch.zeros(seq), torch.zeros(seq)
    for t in (7, 8):  # the text queries after the last image slot (6)
        probs = torch.stack([
            torch.softmax((query[0, h, t] @ keys[0, h // 2, : t + 1].T) * 0.5, dim=-1) for h in range(4)
        ]).mean(0)  # fmt: skip
        want_total[: t + 1] += probs
        want_peak[: t + 1] = torch.maximum(want_peak[: t + 1], probs)
    torch.testing.assert_close(total[0, 1], want_total, atol=1e-6, rtol=0)
    torch.testing.assert_close(peak[0, 0], want_peak, atol=1e-6, rtol=0)


def test_dual_attention_keep_rule_within_the_budget():
    """Threshold 0.15 of the visual total: slots with G < 0.15 and I < 0.1 are candidates (2, 3, 5; slot 4
    has a peak) and are never kept. At budget 0.6 (4 of 7 slots) the text slots (0, 1, 6) come first and the
    best non-candidate image (4) fills the last slot; at budget 1.0 every non-candidate is kept."""
    from mmkv_compile.kernels import reference as ref

    scores = ref.Scores(
        torch.tensor([[[0.9, 0.1, 0.11, 0.05, 0.12, 0.14, 0.5]]]),
        torch.tensor([[[0.9, 0.1, 0.11, 0.05, 0.12, 0.14, 0.5]]]),
        torch.tensor([[[0.9, 0.05, 0.05, 0.05, 0.2, 0.05, 0.5]]]),
    )
    labels = torch.tensor([[[TEXT, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT]]], dtype=torch.int8)
    live = labels != INVALID
    visual_total = 0.11 + 0.05 + 0.12 + 0.14
    for budget, counts, kept in ((0.6, 4, [0, 1, 4, 6]), (1.0, 4, [0, 1, 4, 6])):
        policy = policy_of("hae", budget, global_threshold=0.15 / visual_total, individual_threshold=0.1)
        tier, got = ref.dual_attention_keep(policy, scores, labels, live, torch.tensor([[7 * budget]]).long())
        assert got.tolist() == [[counts]]
        slots, keep, _ = ref.select_stage(scores.selection, tier, got, counts)
        assert slots[0, 0][keep[0, 0]].tolist() == kept
    policy = policy_of("hae", 0.3, global_threshold=0.15 / visual_total, individual_threshold=0.1)
    tier, got = ref.dual_attention_keep(policy, scores, labels, live, torch.tensor([[2]]))
    slots, keep, _ = ref.select_stage(scores.selection, tier, got, 2)
    assert slots[0, 0][keep[0, 0]].tolist() == [0, 6]  # budget 2: the two best text slots


def test_recycle_bin_parks_and_restores():
    """6 slots held at 5 (one new token). Zero query: fresh attention is flat, so the accumulated scores
    decide. With a bin of 2, ranks 3-4 are parked (kept, not attended) and rank 5 is deleted.
    When a parked slot's score climbs back, the next step makes it active again."""
    from mmkv_compile.masks import slot_attention_mask

    keys = torch.randn(1, 1, 6, 4)
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 3.0, 0.0]]])
    policy = policy_of("hae", 0.5, recycle_bin=2, recent=1)
    out = run_op(policy, torch.zeros(1, 1, 1, 4), slot_state(keys, scores=scores), prefill=False)
    assert out.positions[0, 0].tolist() == [0, 2, 3, 4, 5]  # slot 1 (lowest score) deleted
    assert out.parked[0, 0].tolist() == [False, False, True, True, False]  # 3 and 4 parked, newest forced
    mask = slot_attention_mask(out.labels, out.positions, torch.zeros(1, 1, 1, 4), parked=out.parked)
    assert mask[0, 0, 0].tolist() == [True, True, False, False, True]
    # slot 3 now scores highest; a new token arrives
    rescored = out._replace(scores=out.scores.clone())
    rescored.scores[0, 0, 2] = 100.0
    again = run_op(policy, torch.zeros(1, 1, 1, 4), _append(rescored, torch.randn(1, 1, 1, 4),
                                                            torch.randn(1, 1, 1, 4), TEXT, 6), prefill=False)  # fmt: skip
    active = again.positions[0, 0][~again.parked[0, 0]].tolist()
    assert 3 in active and 6 in active

"""The four seed methods' own stages, by hand-computed cases: MadaKV (modality split, coverage demand,
layer compensation), RetentiveKV (retention score, absorption, weighted read-back), HAE (dual attention,
index broadcasting, recycle bin). Then properties every method's policy must keep."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build

import mmkv_compile
from mmkv_compile.kernels import reference as ref
from mmkv_compile.kernels.compensation import compensate_layer_budgets
from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.methods import METHODS, build_method
from mmkv_compile.policy import ceil_fraction

INVALID, TEXT, IMAGE = -1, 0, 1


def _state(keys, labels, scores=None, weights=None, values=None):
    batch, heads, seq, _ = keys.shape
    positions = torch.arange(seq).expand(batch, heads, seq).contiguous()
    scores = torch.zeros(batch, heads, seq) if scores is None else scores
    weights = torch.ones(batch, heads, seq) if weights is None else weights
    values = keys.clone() if values is None else values
    return keys, values, labels, positions, scores, weights


def _op(policy, query, state, prefill=True, **budgets):
    return torch.ops.mmkv.score_evict_merge(query, *state, 1.0, policy.to_string(), prefill, **budgets)


def _kept_positions(out, head=0):
    labels, positions = out[2][0, head], out[3][0, head]
    return positions[labels != INVALID].tolist()


# -- MadaKV ----------------------------------------------------------------------------------------


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
    policy = build_method("madakv", window=1).policy(0.5)
    out = _op(policy, query, _state(keys, labels), head_budgets=torch.tensor([[5]]))
    assert _kept_positions(out) == [0, 1, 5, 6, 9]
    plain = build_method("snapkv", window=1, pool="none").policy(5)
    assert _kept_positions(_op(plain, query, _state(keys, labels))) == [0, 5, 6, 7, 9]


def test_coverage_demand_hand_computed():
    """coverage 0.75: text scores 0.5, 0.3, 0.1, 0.1 need 2 slots (0.5 < 0.75 <= 0.8); image 0.9, 0.05,
    0.05 needs 1; the forced slot does not count."""
    selection = torch.tensor([[[0.5, 0.3, 0.1, 0.1, 0.9, 0.05, 0.05, 7.0]]])
    labels = torch.tensor([[[TEXT] * 4 + [IMAGE] * 3 + [TEXT]]], dtype=torch.int8)
    forced = torch.zeros(1, 1, 8, dtype=torch.bool)
    forced[..., -1] = True
    policy = build_method("madakv", coverage=0.75).policy(0.5)
    assert ref.coverage_demand(policy, selection, labels, forced).tolist() == [[3]]


def test_compensation_carries_overspending_to_later_layers():
    """3 layers, 1 head, 10 valid slots, 1 forced, budget 0.5: 5 per layer, 4 free, 12 free in all.
    Layer 0 asks for 2 (even share 4): keeps 2. Layer 1's share is 10/2 = 5; it asks for 9 (cap 2 x 5):
    keeps 9. The last layer gets the 1 left. Kept: 3, 10, 2 = 15 = 3 x 5."""
    demands = torch.tensor([[[[2, 10, 1]]], [[[9, 10, 1]]], [[[7, 10, 1]]]])
    counts = compensate_layer_budgets(demands, 0.5, 2.0)
    assert counts.flatten().tolist() == [3, 10, 2]


@pytest.mark.parametrize("seed", range(5))
def test_compensated_budgets_sum_to_the_uniform_total(seed):
    generator = torch.Generator().manual_seed(seed)
    layers, batch, heads, valid, forced, budget = 7, 2, 3, 200, 8, 0.3
    demand = torch.randint(0, valid - forced, (layers, batch, heads), generator=generator)
    demands = torch.stack([demand, torch.full_like(demand, valid), torch.full_like(demand, forced)], dim=-1)
    counts = compensate_layer_budgets(demands, budget, 2.0)
    uniform = ceil_fraction(valid, build_method("madakv").policy(budget).budget_fraction())
    assert counts.sum(dim=(0, 2)).tolist() == [layers * heads * uniform] * batch
    assert bool((counts >= forced).all()) and bool((counts <= valid).all())
    assert not torch.equal(counts[0], counts[1])  # budgets really move between layers and heads


def test_madakv_layer_and_head_budgets_sum_to_the_total_on_a_model():
    tiny = build("llava")
    model = mmkv_compile.apply_eagerly(build("llava").model, "madakv", 0.25, window=4)
    cache = mmkv_compile.MMKVCache(model.config)
    with torch.no_grad():
        model(**tiny.inputs, past_key_values=cache, use_cache=True)
    prompt = tiny.inputs["input_ids"].shape[1]
    per_head = [(layer.labels[0] != INVALID).sum(-1) for layer in cache.mmkv_layers]
    heads = per_head[0].numel()
    assert sum(int(c.sum()) for c in per_head) == len(per_head) * heads * math.ceil(0.25 * prompt)
    assert len({tuple(c.tolist()) for c in per_head}) > 1 or len(set(per_head[0].tolist())) > 1
    # padded per-head layout: a layer stores its largest head's count, no more
    assert all(layer.keys.shape[2] == int(c.max()) for layer, c in zip(cache.mmkv_layers, per_head, strict=True))


# -- RetentiveKV -----------------------------------------------------------------------------------


def test_retention_score_hand_computed():
    attention = torch.tensor([[[0.4, 0.1, 0.25, 0.25]]])
    labels = torch.tensor([[[TEXT, TEXT, IMAGE, IMAGE]]], dtype=torch.int8)
    within = [0.8, 0.2, 0.5, 0.5]  # each slot's share of its side's attention
    want = [0.5 * a + 0.5 * (-p * math.log(p)) for a, p in zip([0.4, 0.1, 0.25, 0.25], within, strict=True)]
    got = ref.retention_scores(attention, labels, 0.5)[0, 0].tolist()
    assert got == pytest.approx(want, abs=1e-6)


def _absorb_case():
    """6 slots (4 text, 2 image), a query that attends uniformly (zero query), budget 2 regular slots with
    the newest forced: every slot but the newest and one other is absorbed."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 6, 4, generator=generator)
    values = torch.randn(1, 1, 6, 4, generator=generator)
    labels = torch.tensor([[[TEXT, IMAGE, TEXT, IMAGE, TEXT, TEXT]]], dtype=torch.int8)
    return keys, values, labels


def test_retentivekv_absorbs_evicted_tokens_into_exact_means():
    keys, values, labels = _absorb_case()
    policy = build_method("retentivekv", window=1, recent=1, min_retention=1.0).policy(2)
    out = _op(policy, torch.zeros(1, 1, 6, 4), _state(keys, labels, values=values))
    out_keys, out_values, out_labels, out_positions, _, out_weights = (t[0, 0] for t in out)
    assert out_labels[:2].tolist() == [TEXT, IMAGE]  # the two memory slots lead the row
    kept = out_positions[2:][out_labels[2:] != INVALID].tolist()
    assert len(kept) == 2 and kept[-1] == 5
    for side, label in enumerate((TEXT, IMAGE)):
        absorbed = [i for i in range(6) if labels[0, 0, i] == label and i not in kept]
        assert out_weights[side].item() == len(absorbed)
        torch.testing.assert_close(out_keys[side], keys[0, 0, absorbed].mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out_values[side], values[0, 0, absorbed].mean(0), atol=1e-6, rtol=0)
    # a decode step: one more token arrives, the cache holds 2 regular slots, one more text slot is absorbed
    new_key, new_value = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    step = [torch.cat([a, b], dim=2) for a, b in zip(out[:2], (new_key, new_value), strict=True)]
    step_labels = torch.cat([out[2], torch.tensor([[[TEXT]]], dtype=torch.int8)], dim=2)
    step_positions = torch.cat([out[3], torch.tensor([[[6]]])], dim=2)
    step_state = (*step, step_labels, step_positions, torch.cat([out[4], torch.zeros(1, 1, 1)], 2),
                  torch.cat([out[5], torch.ones(1, 1, 1)], 2))  # fmt: skip
    again = _op(policy, torch.zeros(1, 1, 1, 4), step_state, prefill=False)
    all_keys = torch.cat([keys, new_key], dim=2)[0, 0]
    regular = again[3][0, 0, 2:][again[2][0, 0, 2:] != INVALID].tolist()
    absorbed = [i for i in range(7) if i not in regular and (i == 6 or labels[0, 0, i] == TEXT)]
    assert again[5][0, 0, 0].item() == len(absorbed)  # the weight counts every token the memory holds
    torch.testing.assert_close(again[0][0, 0, 0], all_keys[absorbed].mean(0), atol=1e-5, rtol=0)


def test_retentivekv_memory_fades_by_entropy():
    """Attention over the text side focused on one slot (entropy 0): the text memory keeps min_retention
    of its weight before absorbing; the image side has no slots left (nothing to be uncertain about): kept whole."""
    keys, values, labels = _absorb_case()
    policy = build_method("retentivekv", window=1, recent=1, min_retention=0.5).policy(2)
    memory = (torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.tensor([[[TEXT, IMAGE]]], dtype=torch.int8),
              torch.full((1, 1, 2), -1), torch.zeros(1, 1, 2), torch.tensor([[[4.0, 3.0]]]))  # fmt: skip
    state = _state(keys, labels, values=values)
    survived = torch.ones(1, 1, 6, dtype=torch.bool)  # nothing absorbed this step
    attention = torch.tensor([[[0.0, 0.5, 0.0, 0.5, 1.0, 0.0]]])  # text: one-hot on slot 4; image: even
    new = ref.absorb_stage(policy, memory, state, survived, attention)
    assert new[5].flatten().tolist() == pytest.approx([4.0 * 0.5, 3.0 * 1.0])


def test_weighted_memory_slot_reads_back_like_the_tokens_it_absorbed():
    """Tokens with one key and value, absorbed into a memory slot of weight 3, give the same attention
    output as the three tokens themselves: the log-weight bias is the readout's gate."""
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
    mask = slot_attention_mask(labels, positions, query, None, weights, weighted=True)
    read = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(read, full, atol=1e-5, rtol=0)
    plain = slot_attention_mask(labels, positions, query)
    unweighted = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=plain, enable_gqa=True)
    assert (unweighted - full).abs().max() > 1e-3  # without the weight, the memory is under-read


# -- HAE -------------------------------------------------------------------------------------------


def test_dual_attention_matches_a_hand_loop():
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


def test_dual_attention_keep_rule_and_cap():
    """Threshold 0.15 of the visual total: slots with G < 0.15 and I < 0.1 are candidates (2, 3, 5; slot 4
    has a peak); budget 0.5 of 4 visual slots caps the evicted at 2: the lower-G candidates (3, then 2) go."""
    global_attention = torch.tensor([[[0.9, 0.1, 0.11, 0.05, 0.12, 0.14, 0.5]]])
    individual = torch.tensor([[[0.9, 0.05, 0.05, 0.05, 0.2, 0.05, 0.5]]])
    labels = torch.tensor([[[TEXT, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT]]], dtype=torch.int8)
    visual_total = 0.11 + 0.05 + 0.12 + 0.14
    policy = build_method("hae", global_threshold=0.15 / visual_total, individual_threshold=0.1).policy(0.5)
    forced, counts = ref.dual_attention_counts(policy, global_attention, individual, labels)
    assert forced[0, 0].tolist() == [True, True, False, False, True, False, True]
    assert counts.tolist() == [[5]]
    slots, kept, _ = ref.select_stage(global_attention, labels, forced, counts, 5)
    assert slots[0, 0][kept[0, 0]].tolist() == [0, 1, 4, 5, 6]


def test_hae_broadcasts_the_first_layers_decision_to_every_layer():
    tiny = build("llava")
    options = {"global_threshold": 0.5, "individual_threshold": 1.0}
    model = mmkv_compile.apply_eagerly(build("llava").model, "hae", 0.25, **options)
    cache = mmkv_compile.MMKVCache(model.config)
    with torch.no_grad():
        model(**tiny.inputs, past_key_values=cache, use_cache=True)
    first = cache.mmkv_layers[0]
    assert first.get_physical_length() < tiny.inputs["input_ids"].shape[1]
    for layer in cache.mmkv_layers[1:]:
        assert torch.equal(layer.positions, first.positions)
    image = int((first.labels[0, 0] == IMAGE).sum())
    assert image >= math.ceil(0.25 * tiny.num_image_tokens)  # at most 1 - budget of the image tokens go
    assert int((first.labels[0, 0] == TEXT).sum()) == tiny.inputs["input_ids"].shape[1] - tiny.num_image_tokens


def test_recycle_bin_parks_and_restores():
    """6 slots held at 5 (one new token). Zero query: fresh attention is flat, so the accumulated scores
    decide. With a bin of 2, ranks 3-4 are parked (weight negated, not attended) and rank 5 is deleted.
    When a parked slot's score climbs back, the next step makes it active again."""
    keys = torch.randn(1, 1, 6, 4)
    labels = torch.zeros(1, 1, 6, dtype=torch.int8)
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 3.0, 0.0]]])
    policy = build_method("hae", recycle_bin=2, recent=1).policy(0.5)
    out = _op(policy, torch.zeros(1, 1, 1, 4), _state(keys, labels, scores=scores), prefill=False)
    assert out[3][0, 0].tolist() == [0, 2, 3, 4, 5]  # slot 1 (lowest score) deleted
    assert (out[5][0, 0] > 0).tolist() == [True, True, False, False, True]  # 3 and 4 parked, newest forced
    mask = slot_attention_mask(out[2], out[3], torch.zeros(1, 1, 1, 4), None, out[5])
    assert mask[0, 0, 0].tolist() == [True, True, False, False, True]
    # slot 3 now scores highest; a new token arrives
    rescored = out[4].clone()
    rescored[0, 0, 2] = 100.0
    step_keys = torch.cat([out[0], torch.randn(1, 1, 1, 4)], dim=2)
    step = (step_keys, step_keys.clone(), torch.cat([out[2], labels[..., :1]], 2),
            torch.cat([out[3], torch.tensor([[[6]]])], 2), torch.cat([rescored, torch.zeros(1, 1, 1)], 2),
            torch.cat([out[5], torch.ones(1, 1, 1)], 2))  # fmt: skip
    again = _op(policy, torch.zeros(1, 1, 1, 4), step, prefill=False)
    active = again[3][0, 0][again[5][0, 0] > 0].tolist()
    assert 3 in active and 6 in active


# -- every method ----------------------------------------------------------------------------------


def _random_prompt(seed: int, seq: int = 64):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, seq, 8, generator=generator)
    query = torch.randn(2, 4, seq, 8, generator=generator)
    labels = torch.zeros(2, 2, seq, dtype=torch.int8)
    labels[:, :, 10:40] = IMAGE
    labels[1, :, :5] = INVALID  # left padding in row 1
    return query, keys, labels


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"full"}))
def test_every_method_respects_its_budget_and_forced_slots(method):
    query, keys, labels = _random_prompt(3)
    budget = 0.25
    options = {"window": 4} if "window" in METHODS[method].parameters() else {}
    policy = build_method(method, **options).policy(budget)
    budgets = {}
    if policy.layer_schedule == "allocated":
        budgets["budget_fractions"] = torch.tensor([budget, budget])
    if policy.layer_schedule == "compensated":
        valid = (labels != INVALID).sum(-1)
        budgets["head_budgets"] = ceil_fraction(valid, policy.budget_fraction())
    positions = torch.arange(64).expand(2, 2, 64).contiguous()
    out = _op(policy, query, _state(keys, labels), **budgets)
    out_labels = out[2][:, :, policy.memory_slots :]
    out_positions = out[3][:, :, policy.memory_slots :]
    valid = labels != INVALID
    for row in range(2):
        for head in range(2):
            kept = set(out_positions[row, head][out_labels[row, head] != INVALID].tolist())
            row_valid = positions[row, head][valid[row, head]].tolist()
            assert kept <= set(row_valid)  # padding is never kept
            allowed = ceil_fraction(len(row_valid), policy.budget_fraction())
            if policy.keep_labels:  # text kept on top of the budget: the budget counts the rest
                text = [p for p in row_valid if labels[row, head, p] == TEXT]
                assert set(text) <= kept
                allowed = len(text) + ceil_fraction(len(row_valid) - len(text), policy.budget_fraction())
            if policy.score == "dual_attention":  # HAE: text kept; at most 1 - budget of the visual slots go
                visual = [p for p in row_valid if labels[row, head, p] != TEXT]
                assert len(kept) >= len(row_valid) - len(visual) + ceil_fraction(len(visual), policy.budget_fraction())
                continue
            if policy.head_budget == "uniform":
                assert len(kept) <= allowed, (row, head)
            recent = min(max(policy.recent, math.floor(allowed * policy.recent_fraction)), allowed)
            assert set(row_valid[len(row_valid) - recent :]) <= kept  # the recent window (within the budget)
            assert set(row_valid[: policy.sinks]) <= kept  # the sinks


def test_merging_with_nothing_kept_returns_an_empty_state():
    """An all-image row with a zero budget fraction keeps nothing; merging has no target and must not fail."""
    query, keys, _ = _random_prompt(4, seq=12)
    labels = torch.full((2, 2, 12), IMAGE, dtype=torch.int8)
    policy = build_method("meda").policy(0.5)
    out = _op(policy, query, _state(keys, labels), budget_fractions=torch.zeros(2))
    assert out[0].shape[2] == 0

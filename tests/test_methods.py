"""Method presets: hand-checked kept slots, budget properties (per layer, per head), and compiled vs
the eagerly called operator on LLaVA and Qwen2-VL."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build, generate

import mmkv_compile
from mmkv_compile.methods import METHODS, build_method
from mmkv_compile.policy import ceil_fraction

INVALID = -1


def _op(policy, query, keys, labels=None, positions=None, scaling=1.0, prefill=True, scores=None):
    batch, heads, seq, _ = keys.shape
    labels = torch.zeros(batch, heads, seq, dtype=torch.int8) if labels is None else labels
    positions = torch.arange(seq).expand(batch, heads, seq).contiguous() if positions is None else positions
    scores = torch.zeros(batch, heads, seq) if scores is None else scores
    weights = torch.ones(batch, heads, seq)
    return torch.ops.mmkv.score_evict_merge(
        query, keys, keys.clone(), labels, positions, scores, weights, scaling, policy.to_string(), prefill
    )


@pytest.mark.parametrize("num_layers", [2, 5, 30])
@pytest.mark.parametrize("budget,prompt", [(0.5, 100), (0.2, 333), (0.1, 2048), (64, 500)])
def test_pyramid_layer_budgets_sum_to_the_total(num_layers, budget, prompt):
    policy = build_method("pyramidkv", window=8).policy(budget)
    per_layer = [policy.at_layer(layer, num_layers) for layer in range(num_layers)]
    uniform = ceil_fraction(prompt, policy.budget_fraction()) if isinstance(budget, float) else budget
    counts = []
    for layer_policy in per_layer:
        labels = torch.zeros(1, 1, prompt, dtype=torch.int8)
        keys = torch.randn(1, 1, prompt, 4)
        counts.append(int((_op(layer_policy, torch.randn(1, 1, prompt, 4), keys, labels)[2] != INVALID).sum()))
    assert counts == sorted(counts, reverse=True)  # the pyramid falls layer by layer
    assert counts[0] > counts[-1] >= 8  # the window is always kept
    assert abs(sum(counts) - num_layers * uniform) <= num_layers  # one ceil per layer at most


def test_adakv_moves_budget_to_the_head_that_needs_it():
    """Head 0's window query puts ~0.5 on slots 1 and 2 and ~1e-4 elsewhere; head 1's attention is flat
    (0.1 per slot). Uniform: 4 per head, 1 of them the window. With alpha=0 the layer-wide top-6 of the
    free slots is head 0's two peaks and four of head 1's slots: head 0 keeps 1+2, head 1 keeps 1+4."""
    seq, dim = 10, 4
    keys = torch.zeros(1, 2, seq, dim)
    keys[0, 0, 1, 0] = keys[0, 0, 2, 0] = 8.0
    query = torch.zeros(1, 2, seq, dim)
    query[0, 0, -1, 0] = 1.0
    policy = build_method("adakv", window=1, pool="none", alpha=0.0).policy(4)
    _, _, labels, positions, _, _ = _op(policy, query, keys)
    counts = (labels[0] != INVALID).sum(-1).tolist()
    assert counts == [3, 5]
    assert positions[0, 0][labels[0, 0] != INVALID].tolist() == [1, 2, 9]
    floored = build_method("adakv", window=1, pool="none", alpha=1.0).policy(4)
    assert (_op(floored, query, keys)[2][0] != INVALID).sum(-1).tolist() == [4, 4]  # alpha=1 is uniform


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_head_budgets_sum_to_the_layer_total(alpha):
    torch.manual_seed(1)
    heads, seq = 4, 40
    policy = build_method("adakv", window=4, alpha=alpha).policy(0.25)
    labels = _op(policy, torch.randn(1, heads * 2, seq, 8), torch.randn(1, heads, seq, 8))[2]
    counts = (labels[0] != INVALID).sum(-1)
    uniform = ceil_fraction(seq, policy.budget_fraction())
    assert heads * uniform - heads <= int(counts.sum()) <= heads * uniform
    assert int(counts.min()) >= 4 + int(alpha * (uniform - 4))  # window + the floor
    assert labels.shape[-1] == int(counts.max())  # padded to the largest head, not to the worst case


def test_tova_keeps_one_token_set_for_the_whole_layer():
    torch.manual_seed(0)
    policy = build_method("tova").policy(5)
    _, _, _, positions, _, _ = _op(policy, torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), scaling=0.35)
    assert torch.equal(positions[0, 0], positions[0, 1])
    assert 11 in positions[0, 0].tolist()  # the newest token
    # Hand check: the kept set is the top-4 of the last query's head-averaged attention, plus the newest.
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    logits = torch.einsum("bhd,bhsd->bhs", query[:, :, -1], keys.repeat_interleave(2, 1)) * 0.35
    mean = torch.softmax(logits, -1).mean(1)[0]
    mean[11] = float("inf")
    assert positions[0, 0].tolist() == sorted(torch.topk(mean, 5).indices.tolist())


def _merge_case(merge: str):
    """Four image slots: k0=[2,0] and k1=[0,2] win the prompt's attention; k2 is closest to k0, k3 to k1."""
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.9, 0.1], [0.1, 0.9]]).view(1, 1, 4, 2)
    query = torch.full((1, 1, 4, 2), 3.0)
    labels = torch.ones(1, 1, 4, dtype=torch.int8)  # all image: nothing forced
    return _op(build_method("look_m", merge=merge).policy(2), query, keys, labels)


@pytest.mark.parametrize("merge", ["avg", "pivot", "weighted"])
def test_look_m_merges_each_evicted_token_into_its_nearest_kept_token(merge):
    k0, k1, k2, k3 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.9, 0.1], [0.1, 0.9]])
    cos2, cos3 = float(torch.cosine_similarity(k2, k0, 0)), float(torch.cosine_similarity(k3, k1, 0))
    expected = {
        "avg": [(k0 + k2) / 2, (k1 + k3) / 2],
        "pivot": [(k0 + (k2 + k0) / 2) / 2, (k1 + (k3 + k1) / 2) / 2],
        "weighted": [(k0 + cos2 * k2) / 2, (k1 + cos3 * k3) / 2],
    }[merge]
    keys, values, labels, positions, _, weights = _merge_case(merge)
    assert positions[0, 0].tolist() == [0, 1]
    torch.testing.assert_close(keys[0, 0], torch.stack(expected))
    torch.testing.assert_close(values[0, 0], torch.stack(expected))  # values follow the keys' assignment
    assert weights[0, 0].tolist() == [2.0, 2.0]


def test_merge_counts_keep_repeated_merges_exact():
    """A kept slot that already stands for 2 tokens absorbs one more: the result is the mean of all 3."""
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.2]]).view(1, 1, 3, 2)
    weights = torch.tensor([[[2.0, 1.0, 1.0]]])
    policy = build_method("look_m", merge="avg").policy(2).to_string()
    labels = torch.ones(1, 1, 3, dtype=torch.int8)
    positions = torch.arange(3).view(1, 1, 3)
    out = torch.ops.mmkv.score_evict_merge(
        torch.full((1, 1, 3, 2), 3.0),
        keys,
        keys.clone(),
        labels,
        positions,
        torch.zeros(1, 1, 3),
        weights,
        1.0,
        policy,
        True,
    )
    assert out[3][0, 0].tolist() == [0, 1]
    torch.testing.assert_close(out[0][0, 0, 0], (2 * keys[0, 0, 0] + keys[0, 0, 2]) / 3)
    assert out[5][0, 0].tolist() == [3.0, 1.0]


def test_layer_entropy_signals_hand_computed():
    """Equal keys give uniform attention: each query row's entropy is log(number of keys it sees)."""
    from mmkv_compile.kernels.layer_signals import layer_signal

    seq = 6
    keys = torch.ones(1, 1, seq, 2)
    query = torch.ones(1, 1, seq, 2)
    labels = torch.tensor([[[0, 1, 1, 1, 0, 0]]], dtype=torch.int8)  # text, 3 image, 2 text
    positions = torch.arange(seq).view(1, 1, seq)
    full = layer_signal(query, keys, labels, positions, 1.0, "attention")
    expected = sum(math.log(n) for n in range(1, seq + 1)) / seq
    torch.testing.assert_close(full, torch.tensor([expected]))
    # Cross-modal: text rows 4, 5 see the 3 image keys (log 3); image rows 1-3 see text key 0 (log 1 = 0).
    cross = layer_signal(query, keys, labels, positions, 1.0, "cross_modal")
    torch.testing.assert_close(cross, torch.tensor([math.log(3)]))


def test_meda_allocation_follows_entropy_and_keeps_the_total():
    from mmkv_compile.kernels.layer_signals import allocate_layer_budgets

    torch.manual_seed(0)
    entropies = torch.randn(30, 3) * 2
    fractions = allocate_layer_budgets(entropies, 0.2, 0.01)
    torch.testing.assert_close(fractions.mean(0), torch.full((3,), 0.2))
    assert float(fractions.min()) >= 0.01 - 1e-7 and float(fractions.max()) <= 1.0  # float32 storage
    order = entropies[:, 0].argsort()
    assert torch.all(fractions[order, 0].diff() >= -1e-6)  # more entropy, more budget
    capped = allocate_layer_budgets(torch.tensor([[9.0], [0.0], [0.0], [0.0]]), 0.6, 0.01)
    torch.testing.assert_close(
        capped[:, 0], torch.tensor([1.0, 0.6 * 4 / 3 - 1 / 3, 0.6 * 4 / 3 - 1 / 3, 0.6 * 4 / 3 - 1 / 3])
    )


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_meda_layer_budgets_sum_to_the_total(name):
    tiny = build(name, layers=4)
    model = mmkv_compile.compile(build(name, layers=4).model, "meda", 0.25, inductor=False)
    _, _, cache = generate(model, tiny.inputs, 2)
    images = tiny.num_image_tokens
    kept = [int((layer.labels[0, 0] == 1).sum()) for layer in cache.mmkv_layers]
    text = int((tiny.inputs["input_ids"][0] != tiny.image_token_id).sum())
    assert all(int((layer.labels[0, 0] == 0).sum()) == text + 1 for layer in cache.mmkv_layers)  # all text kept
    assert 4 * images * 0.25 <= sum(kept) <= 4 * images * 0.25 + 4  # one ceil per layer


def _cross_modal_entropy(attentions, visual: torch.Tensor) -> torch.Tensor:
    """MEDA's layer signal computed from a model's own attention probabilities ``[1, H, n, n]`` per layer:
    entropy of text rows renormalized over visual keys plus visual rows over text keys, causal."""
    n = visual.shape[0]
    causal = torch.ones(n, n).tril().bool()
    signal = []
    for probs in attentions:
        total = 0.0
        for rows, keys in ((~visual, visual), (visual, ~visual)):
            block = probs[0][:, rows][:, :, keys] * causal[rows][:, keys]
            mass = block.sum(-1, keepdim=True)
            seen = (mass > 0).squeeze(-1)
            p = block / mass.clamp(min=1e-30)
            entropy = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
            total += float(entropy[seen].mean()) if seen.any() else 0.0
        signal.append(total)
    return torch.tensor(signal).view(-1, 1)


def test_meda_budgets_follow_the_models_own_attention_entropy():
    """Independent of the operator's code: entropies from the uncompiled model's attention maps
    (output_attentions) set the per-layer image budgets the compiled model keeps."""
    from mmkv_compile.kernels.layer_signals import allocate_layer_budgets

    def sharpened():
        tiny = build("llava", "eager", layers=4)
        for index, layer in enumerate(tiny.model.model.language_model.layers):
            layer.self_attn.q_proj.weight.data *= 20.0**index  # later layers attend more sharply
        return tiny

    tiny = sharpened()
    with torch.no_grad():
        attentions = tiny.model(**tiny.inputs, output_attentions=True).attentions
    visual = tiny.inputs["input_ids"][0] == tiny.image_token_id
    fractions = allocate_layer_budgets(_cross_modal_entropy(attentions, visual), 0.25, 0.01)[:, 0]
    assert float(fractions.max() - fractions.min()) > 0.05  # the layers really differ
    model = mmkv_compile.compile(sharpened().model, "meda", 0.25, inductor=False)
    _, _, cache = generate(model, tiny.inputs, 1)
    images = int(visual.sum())
    for layer, fraction in zip(cache.mmkv_layers, fractions.tolist(), strict=True):
        kept = int((layer.labels[0, 0] == 1).sum())
        expected = fraction * images
        assert kept == math.ceil(expected) or abs(expected - round(expected)) < 1e-3


def test_density_signal_and_post_vision_scores_hand_computed():
    """Keys [0,1,2 text, 3,4 image, 5,6 text]; the post-vision queries are slots 5 and 6. Key 1 is huge
    for every query, so each row has one dominant entry and the rest fall under 1% of its maximum."""
    from mmkv_compile.kernels.layer_signals import layer_signal
    from mmkv_compile.kernels.reference import post_vision_queries

    seq = 7
    labels = torch.tensor([[[0, 0, 0, 1, 1, 0, 0]]], dtype=torch.int8)
    positions = torch.arange(seq).view(1, 1, seq)
    assert post_vision_queries(labels, positions)[0, 0].tolist() == [False] * 5 + [True, True]
    keys = torch.zeros(1, 1, seq, 2)
    keys[0, 0, 1, 0] = 20.0
    query = torch.zeros(1, 1, seq, 2)
    query[..., 0] = 1.0
    density = layer_signal(query, keys, labels, positions, 1.0, "density")
    torch.testing.assert_close(density, torch.tensor([(1 / 6 + 1 / 7) / 2]))  # one dense entry per row
    policy = build_method("vl_cache").policy(0.5)
    _, _, _, kept, _, _ = _op(policy, query, keys, labels, positions)
    assert 1 in kept[0, 0].tolist()  # the key the post-vision queries attend to


def test_proportional_allocation_keeps_the_total():
    from mmkv_compile.kernels.layer_signals import allocate_layer_budgets

    densities = torch.tensor([[0.1], [0.2], [0.3], [0.4]])
    fractions = allocate_layer_budgets(densities, 0.25, 0.01, "proportional")[:, 0]
    torch.testing.assert_close(fractions, torch.tensor([0.1, 0.2, 0.3, 0.4]))  # proportional, mean 0.25
    capped = allocate_layer_budgets(torch.tensor([[0.7], [0.1], [0.1], [0.1]]), 0.5, 0.01, "proportional")[:, 0]
    torch.testing.assert_close(capped.mean(), torch.tensor(0.5))
    assert float(capped[0]) == 1.0


def test_meda_rejects_an_int_budget():
    with pytest.raises(ValueError, match="meda: budget must be a float"):
        mmkv_compile.compile(build("llava").model, "meda", 64)


def test_every_method_is_listed_with_its_parameters():
    listing = mmkv_compile.methods()
    assert set(listing) == set(METHODS)
    assert listing["pyramidkv"]["parameters"]["beta"] == 20.0
    assert listing["adakv"]["parameters"]["alpha"] == 0.2


CASES = [
    ("pyramidkv", 0.5, {"window": 4}),
    ("adakv", 0.5, {"window": 4}),
    ("tova", 0.5, {}),
    ("look_m", 0.25, {}),
    ("meda", 0.25, {}),
    ("vl_cache", 0.25, {}),
    ("madakv", 0.25, {"window": 4}),
    ("retentivekv", 0.25, {"window": 4, "recent": 2}),
    # thresholds high enough that random weights leave candidates; a bin of 2 parks slots at every decode step
    ("hae", 0.25, {"global_threshold": 0.5, "individual_threshold": 1.0, "recycle_bin": 2}),
]


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method,budget,options", CASES, ids=[c[0] for c in CASES])
def test_compiled_equals_eager_operator(name, method, budget, options):
    tiny = build(name)
    tokens, logits, cache = generate(
        mmkv_compile.compile(build(name).model, method, budget, inductor=False, **options), tiny.inputs, 6
    )
    ref_tokens, ref_logits, ref_cache = generate(
        mmkv_compile.apply_eagerly(build(name).model, method, budget, **options), tiny.inputs, 6
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for layer, ref_layer in zip(cache.mmkv_layers, ref_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=0)
    assert cache.get_physical_length() < cache.get_seq_length()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_full_budget_is_identity_for_every_method(method):
    tiny = build("llava")
    ref_tokens, ref_logits, _ = generate(tiny.model, tiny.inputs, 4)
    options = {"window": 4} if "window" in METHODS[method].parameters() else {}
    tokens, logits, cache = generate(
        mmkv_compile.compile(build("llava").model, method, 1.0, inductor=False, **options), tiny.inputs, 4
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert cache.get_physical_length() == cache.get_seq_length()

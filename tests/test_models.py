"""End to end on tiny Llama, LLaVA and Qwen2-VL (sdpa and eager): identity at full budget, compiled
equal to the eagerly called operator, physical compression, modality labels."""

from __future__ import annotations

import pytest
import torch
from conftest import ATTENTIONS, MODELS, build, generate

import mmkv_compile
from mmkv_compile import MMKVCache, Modality

STEPS = 8
CASES = [(m, a) for m in MODELS for a in ATTENTIONS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{a}" for m, a in CASES])
def uncompiled(request):
    """The uncompiled model's greedy run: the reference for identity."""
    name, attn = request.param
    tiny = build(name, attn)
    tokens, logits, cache = generate(tiny.model, tiny.inputs, STEPS)
    return name, attn, tiny, tokens, logits


@pytest.mark.parametrize("method,budget", [("full", 0.5), ("snapkv", 1.0)])
def test_full_budget_is_identity(uncompiled, method, budget):
    name, attn, tiny, ref_tokens, ref_logits = uncompiled
    model = (
        mmkv_compile.compile(build(name, attn).model, method, budget, inductor=False, window=4)
        if method != "full"
        else (mmkv_compile.compile(build(name, attn).model, method, budget, inductor=False))
    )
    tokens, logits, cache = generate(model, tiny.inputs, STEPS)
    assert isinstance(cache, MMKVCache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    prompt_and_steps = tiny.inputs["input_ids"].shape[1] + STEPS - 1
    assert cache.get_seq_length() == prompt_and_steps
    assert cache.get_physical_length() == prompt_and_steps


METHODS = [
    ("snapkv", 0.5, {"window": 4}),
    ("h2o", 0.5, {}),
    ("text_prior", 0.5, {"window": 4}),
    ("streaming_llm", 10, {}),
]


@pytest.mark.parametrize("method,budget,options", METHODS, ids=[m[0] for m in METHODS])
def test_compiled_equals_eager_operator(uncompiled, method, budget, options):
    """The compiled graph and the operator called eagerly from an attention function keep the same
    slots and the same K/V at every layer."""
    name, attn, tiny, _, _ = uncompiled
    compiled = mmkv_compile.compile(build(name, attn).model, method, budget, inductor=False, **options)
    reference = mmkv_compile.apply_eagerly(build(name, attn).model, method, budget, **options)
    tokens, logits, cache = generate(compiled, tiny.inputs, STEPS)
    ref_tokens, ref_logits, ref_cache = generate(reference, tiny.inputs, STEPS)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)
        assert torch.equal(layer.labels, ref_layer.labels)
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=0)
    if method != "text_prior" or name != "llama":  # text_prior keeps a text-only prompt whole
        assert cache.get_physical_length() < cache.get_seq_length()


def test_past_key_values_hold_the_kept_length():
    """Memory is freed, not masked: the stored tensors have the kept length."""
    tiny = build("llava")
    model = mmkv_compile.compile(build("llava").model, "snapkv", 0.25, inductor=False, window=4)
    _, _, cache = generate(model, tiny.inputs, STEPS)
    prompt = tiny.inputs["input_ids"].shape[1]
    kept = -(-prompt // 4)  # ceil(0.25 * prompt)
    for layer in cache.layers:
        assert layer.keys.shape[2] == layer.values.shape[2] == kept + STEPS - 1
        assert layer.labels.shape[2] == layer.positions.shape[2] == kept + STEPS - 1
    full = MMKVCache(tiny.model.config)
    with torch.no_grad():
        tiny.model(**tiny.inputs, past_key_values=full)
    assert cache.nbytes()["kv"] < full.nbytes()["kv"] * (kept + STEPS) / prompt


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_labels_count_image_placeholders(name):
    tiny = build(name)
    model = mmkv_compile.compile(build(name).model, "full", inductor=False)
    _, _, cache = generate(model, tiny.inputs, 2)
    placeholders = int((tiny.inputs["input_ids"] == tiny.image_token_id).sum())
    assert placeholders == tiny.num_image_tokens
    for layer in cache.layers:
        assert int((layer.labels == int(Modality.IMAGE)).sum(-1).unique().item()) == placeholders


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_text_prior_keeps_every_text_token(name):
    tiny = build(name)
    model = mmkv_compile.compile(build(name).model, "text_prior", 0.25, inductor=False, window=4)
    _, _, cache = generate(model, tiny.inputs, 2)
    ids = tiny.inputs["input_ids"][0]
    text_positions = set(torch.nonzero(ids != tiny.image_token_id).flatten().tolist())
    image_total = int((ids == tiny.image_token_id).sum())
    for layer in cache.layers:
        for head in range(layer.positions.shape[1]):
            kept = set(layer.positions[0, head].tolist())
            assert text_positions <= kept
            kept_images = int((layer.labels[0, head] == int(Modality.IMAGE)).sum())
            assert kept_images == -(-image_total // 4)


def test_inductor_compiled_equals_eager_operator():
    """The default path: the rewritten graph compiled by Inductor (C++ on CPU)."""
    tiny = build("llava")
    compiled = mmkv_compile.compile(build("llava").model, "h2o", 0.5)
    reference = mmkv_compile.apply_eagerly(build("llava").model, "h2o", 0.5)
    tokens, logits, cache = generate(compiled, tiny.inputs, 4)
    ref_tokens, ref_logits, ref_cache = generate(reference, tiny.inputs, 4)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for layer, ref_layer in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)
        torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_sliding_window_layers_are_left_alone(attn):
    """Gemma3: full-attention layers are compressed; sliding-window layers keep transformers' own cache
    layer and mask, and explain says so."""
    tiny = build("gemma3_text", attn)
    report = mmkv_compile.explain(tiny.model, "h2o", 0.5, **tiny.inputs)
    prefill = [s for phase, s in report.sites() if phase == "prefill"]
    assert [s.evicts for s in prefill] == [False, True, False, True]
    assert all("sliding-window" in s.reason for s in prefill if not s.evicts)
    ref_tokens, ref_logits, _ = generate(tiny.model, tiny.inputs, STEPS)
    tokens, logits, _ = generate(
        mmkv_compile.compile(build("gemma3_text", attn).model, "full", inductor=False), tiny.inputs, STEPS
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    tokens, logits, cache = generate(
        mmkv_compile.compile(build("gemma3_text", attn).model, "h2o", 0.5, inductor=False), tiny.inputs, STEPS
    )
    ref_tokens, ref_logits, ref_cache = generate(
        mmkv_compile.apply_eagerly(build("gemma3_text", attn).model, "h2o", 0.5), tiny.inputs, STEPS
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer", "MMKVLayer"] * 2
    for layer, ref_layer in zip(cache.mmkv_layers, ref_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)
        assert layer.get_physical_length() < layer.get_seq_length()

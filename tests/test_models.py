"""End to end on tiny Llama, LLaVA and Qwen2-VL (sdpa and eager): identity at full budget, compiled
equal to the eagerly called operator, physical compression, modality labels; sliding-window decoders with their
real windows (Phi-3, Mistral) and interleaved ones (Gemma3)."""

from __future__ import annotations

import pytest
import torch
from support import build, generate, valid_slots

import mmkv_compile
from mmkv_compile import MMKVCache, Modality
from mmkv_compile.compat import output_cache

STEPS = 8
MODELS = ("llama", "llava", "qwen2_vl")
ATTENTIONS = ("sdpa", "eager")
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
    kept = prompt // 4  # at most a quarter of the prompt
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
def test_interleaved_sliding_window_layers_compress_within_their_window(attn):
    """Gemma3 (window 6, a 20-token prompt): full-attention layers keep floor(0.5 * 20) = 10 slots, sliding
    layers floor(0.5 * 5) = 2 of the 5 tokens their next query can see, and hold as many while decoding; the
    full budget reproduces the uncompiled model, and the compressed model equals the eager reference."""
    tiny = build("gemma3_text", attn)
    report = mmkv_compile.explain(tiny.model, "h2o", 0.5, **tiny.inputs)
    prefill = [s for phase, s in report.sites() if phase == "prefill"]
    assert [s.evicts for s in prefill] == [True] * 4 and not report.warnings
    ref_tokens, ref_logits, _ = generate(tiny.model, tiny.inputs, STEPS)
    tokens, logits, _ = generate(
        mmkv_compile.compile(build("gemma3_text", attn).model, "full", inductor=False), tiny.inputs, STEPS
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    compiled = mmkv_compile.compile(build("gemma3_text", attn).model, "h2o", 0.5, inductor=False)
    with torch.no_grad():
        cache = output_cache(compiled(**tiny.inputs, use_cache=True))
    assert [layer.get_physical_length() for layer in cache.layers] == [2, 10, 2, 10]
    tokens, logits, cache = generate(compiled, tiny.inputs, STEPS)
    ref_tokens, ref_logits, ref_cache = generate(
        mmkv_compile.apply_eagerly(build("gemma3_text", attn).model, "h2o", 0.5), tiny.inputs, STEPS
    )
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    for layer, ref_layer in zip(cache.mmkv_layers, ref_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)
        assert layer.get_physical_length() < layer.get_seq_length()
    # every layer holds its prompt's count while decoding, sliding ones too as their slots leave the window
    assert [int(held.min()) for held in valid_slots(cache)] == [2, 10, 2, 10]


@pytest.mark.parametrize("name,prompt", [("phi3", 245), ("mistral", 120)])
def test_real_sliding_windows_compress_like_full_attention_inside_the_window(name, prompt):
    """Phi-3 (sliding_window 2047) and Mistral-7B-v0.1 (4096): every layer is a sliding layer, and a prompt far
    inside the window compresses exactly as a full-attention layer would."""
    tiny = build(name, prompt_len=prompt)
    model = mmkv_compile.compile(build(name, prompt_len=prompt).model, "snapkv", 0.25, inductor=False, window=4)
    tokens, _, cache = generate(model, tiny.inputs, STEPS)
    assert all(layer.window > prompt for layer in cache.mmkv_layers)
    assert [layer.get_physical_length() for layer in cache.mmkv_layers] == [prompt // 4 + STEPS - 1] * 2
    ref_tokens, _, ref_cache = generate(
        mmkv_compile.apply_eagerly(build(name, prompt_len=prompt).model, "snapkv", 0.25, window=4), tiny.inputs, STEPS
    )
    assert torch.equal(tokens, ref_tokens)
    for layer, ref_layer in zip(cache.mmkv_layers, ref_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, ref_layer.positions)


@pytest.mark.parametrize("method", ["full", "snapkv", "h2o"])
def test_past_the_window_a_sliding_layer_keeps_its_budgets_share_of_the_window(method):
    """Phi-3 with a 16-token window and a 40-token prompt: the next query sees 15 tokens, so snapkv keeps
    floor(0.5 * 15) = 7; while decoding the layer never holds more than its window (like transformers' own
    sliding layer), and h2o (evicting at every step) holds those 7 as its slots leave the window, one new token
    taking the place of one that left. ``full`` reproduces the uncompiled model past the window."""
    tiny = build("phi3", prompt_len=40, sliding_window=16)
    ref_tokens, ref_logits, _ = generate(tiny.model, tiny.inputs, 20)
    budget = 1.0 if method == "full" else 0.5
    model = mmkv_compile.compile(build("phi3", prompt_len=40, sliding_window=16).model, method, budget,
                                 inductor=False)  # fmt: skip
    with torch.no_grad():
        cache = output_cache(model(**tiny.inputs, use_cache=True))
    if method != "full":
        assert [layer.get_physical_length() for layer in cache.mmkv_layers] == [7, 7]
    tokens, logits, cache = generate(model, tiny.inputs, 20)
    assert all(layer.get_physical_length() <= 16 for layer in cache.mmkv_layers)
    if method == "h2o":
        assert all(bool((held == 7).all()) for held in valid_slots(cache))
    if method == "full":
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    else:
        eager = mmkv_compile.apply_eagerly(build("phi3", prompt_len=40, sliding_window=16).model, method, budget)
        assert torch.equal(tokens, generate(eager, tiny.inputs, 20)[0])

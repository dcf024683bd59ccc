"""Method presets: their parameters and errors, the budget as an upper bound for every method (on the operator
over random prompts, and on compiled models), the compiled model equal to the eager reference, identity at a
full budget."""

from __future__ import annotations

import math

import pytest
import torch
from support import IMAGE, INVALID, TEXT, build, generate, policy_of, run_op, slot_state

import mmkv_compile
from mmkv_compile.compat import output_cache
from mmkv_compile.methods import METHODS
from mmkv_compile.policy import LayerPlacement

COMPRESSING = sorted(set(METHODS) - {"full"})
FRACTION_ONLY = {"meda", "vl_cache", "madakv", "hae"}


def test_every_method_is_listed_with_its_parameters():
    listing = mmkv_compile.methods()
    assert set(listing) == set(METHODS)
    assert listing["pyramidkv"]["parameters"]["beta"] == 20.0
    assert listing["adakv"]["parameters"]["alpha"] == 0.2
    assert listing["snapkv"]["parameters"] == {"window": 32, "kernel_size": 5, "pool": "avg", "group_reduce": "mean"}
    assert all(entry["description"] and entry["paper"] for entry in listing.values())


def test_meda_rejects_an_int_budget():
    with pytest.raises(ValueError, match="meda: budget must be a float"):
        mmkv_compile.compile(build("llava").model, "meda", 64)


@pytest.mark.parametrize("method,option", [("snapkv", "window"), ("streaming_llm", "sinks"), ("retentivekv", "recent")])
def test_a_default_wider_than_a_small_budget_shrinks_to_fit(method, option):
    """The user set only the budget: the default window (sinks, recent) shrinks to the budget; set explicitly,
    the same value is a conflict and raises."""
    default = METHODS[method].parameters()[option]
    tiny = build("llama", prompt_len=40)
    model = mmkv_compile.compile(build("llama", prompt_len=40).model, method, default - 1, inductor=False)
    _, _, cache = generate(model, tiny.inputs, 1)
    memory = 2 if method == "retentivekv" else 0  # its memory slots come on top
    assert all(layer.get_physical_length() - memory <= default - 1 for layer in cache.mmkv_layers)
    with pytest.raises(ValueError, match=f"{option}={default} is larger than the budget"):
        mmkv_compile.compile(tiny.model, method, default - 1, **{option: default})


# -- the budget is an upper bound ------------------------------------------------------------------------


def _random_prompt(generator, batch: int, seq: int, image_share: float, pad: int):
    labels = torch.where(torch.rand(batch, 1, seq, generator=generator) < image_share, IMAGE, TEXT).to(torch.int8)
    labels = labels.expand(batch, 2, seq).contiguous()
    labels[-1, :, :pad] = INVALID  # left padding in the last row
    keys = torch.randn(batch, 2, seq, 8, generator=generator)
    query = torch.randn(batch, 4, seq, 8, generator=generator)
    return query, keys, labels


def _live_counts(labels, window: int):
    from mmkv_compile.kernels.reference import live_slots

    positions = torch.arange(labels.shape[-1]).expand(labels.shape)
    return live_slots(labels, positions, window).sum(-1)[:, 0]


@pytest.mark.parametrize("method", COMPRESSING)
def test_every_method_keeps_at_most_its_budget_on_random_prompts(method):
    """Over random prompt lengths, modality mixes, padding, budgets and windows: every layer of every row keeps at
    most floor(budget * n) of its n live tokens (plus memory slots), in the memory it holds (padded heads count),
    and never a padding slot. Per-layer schedules are checked over their layers together."""
    generator = torch.Generator().manual_seed(sum(map(ord, method)))
    for trial in range(6):
        seq = int(torch.randint(12, 90, (1,), generator=generator))
        budget = [0.1, 0.2, 0.5, 0.75][trial % 4] if method in FRACTION_ONLY or trial % 3 else int(seq * 0.3)
        window = 0 if trial % 2 else int(torch.randint(6, 40, (1,), generator=generator))
        query, keys, labels = _random_prompt(generator, 2, seq, [0.0, 0.5, 0.9][trial % 3], pad=trial % 5)
        policy = policy_of(method, budget, **({"window": 4} if "window" in METHODS[method].parameters() else {}))
        live = _live_counts(labels, window)
        allowed = live * policy.budget.fraction().numerator // policy.budget.fraction().denominator
        if isinstance(budget, int):
            allowed = torch.clamp(live, max=budget)
        extra = {"layer_budgets": allowed} if policy.budget.needs_all_layers() else {}  # as the allocation gives
        memory = policy.merge.memory_slots
        kept, held = 0, 0
        for index in range(2):  # two layers: per-layer schedules (pyramid) are bounded over the layers together
            placement = LayerPlacement(index=index, count=2, window=window)
            out = run_op(policy.at_layer(placement), query, slot_state(keys, labels), **extra)
            kept = kept + (out.labels[:, :, memory:] != INVALID).sum(-1)
            held += out.labels.shape[-1] - memory  # the padded length every head holds
        limit = 2 * allowed.unsqueeze(-1)
        assert bool((kept <= limit).all()), (trial, kept.tolist(), limit.tolist())
        assert held <= int(limit.max()), (trial, held, limit.tolist())
        regular = out.labels[-1, :, memory:] != INVALID
        assert bool((out.positions[-1, :, memory:][regular] >= trial % 5).all())  # no padding kept


# Options that make each method compress on tiny random-weight models: HAE's thresholds high enough that random
# weights leave candidates, and a bin of 2 that parks slots at every decode step.
OPTIONS = {
    "snapkv": {"window": 4}, "pyramidkv": {"window": 4}, "adakv": {"window": 4}, "madakv": {"window": 4},
    "retentivekv": {"window": 4, "recent": 2}, "text_prior": {"window": 4},
    "hae": {"global_threshold": 0.5, "individual_threshold": 1.0, "recycle_bin": 2},
}  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_vl"])
@pytest.mark.parametrize("method", COMPRESSING)
def test_compiled_model_keeps_its_budget_and_equals_the_eager_reference(name, method):
    """The compiled model, over 6 greedy steps: the same tokens, logits and kept slots as the eagerly called
    operator, and at most the budget's share of the prompt plus the new tokens per row over its compressed layers
    together (plus memory slots), counted in the slots it stores. (One generate compiles the prompt and the step;
    a direct call first would compile the prompt twice, its keyword arguments differing from generate's.)"""
    budget, options = 0.3, OPTIONS.get(method, {})
    tiny = build(name)
    compiled = mmkv_compile.compile(build(name).model, method, budget, inductor=False, **options)
    tokens, logits, cache = generate(compiled, tiny.inputs, 6)
    prompt = tiny.inputs["input_ids"].shape[1]
    new = cache.get_seq_length() - prompt
    memory = 2 if method == "retentivekv" else 0
    stored = sum(layer.get_physical_length() - memory for layer in cache.mmkv_layers)
    assert new > 0 and 1 <= stored <= len(cache.mmkv_layers) * (math.floor(budget * prompt) + new)
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


def test_text_first_methods_spend_the_budget_on_text_first():
    """text_prior, look_m and MEDA on a LLaVA prompt: a layer keeps images only once all its text fits."""
    tiny = build("llava")
    ids = tiny.inputs["input_ids"][0]
    text = int((ids != tiny.image_token_id).sum())
    for method, budget in (("text_prior", 0.3), ("text_prior", 0.75), ("look_m", 0.75), ("meda", 0.5)):
        model = mmkv_compile.compile(build("llava").model, method, budget, inductor=False)
        with torch.no_grad():
            cache = output_cache(model(**tiny.inputs, use_cache=True))
        for layer in cache.mmkv_layers:
            labels = layer.labels[0, 0]
            kept_text, kept_image = int((labels == TEXT).sum()), int((labels == IMAGE).sum())
            assert kept_image == 0 or kept_text == text, (method, budget, kept_text, kept_image)
            assert kept_text + kept_image <= math.floor(budget * len(ids)) * (2 if method == "meda" else 1)

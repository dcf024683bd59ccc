"""A follow-up prompt: several tokens appended to a cache that already holds a compressed prompt (the next turn of
a conversation, passed back with the returned cache). It is compressed at the budget's rate like the first prompt,
for every method, so the budget holds over a whole conversation."""

from __future__ import annotations

import pytest
import torch
from support import (
    IMAGE,
    INVALID,
    SCORE_EVICT_MERGE,
    TEXT,
    CaptureBackend,
    build,
    compile_with,
    count_ops,
    valid_slots,
)
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile.compat import output_cache
from mmkv_compile.passes.find_sites import cache_appends

FOLLOW_UP = 9  # tokens of the second turn's text
NEW_TOKENS = 4, 5  # generated in the first and the second turn


def _two_turns(model, inputs: dict, extra: torch.Tensor, **second_inputs):
    """generate, then generate again over the returned cache with ``extra`` appended to the sequence (and
    ``second_inputs``, e.g. a new image's pixels): (second turn's output, its cache)."""
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=NEW_TOKENS[0], min_new_tokens=NEW_TOKENS[0],
                               do_sample=False, return_dict_in_generate=True)  # fmt: skip
        ids = torch.cat([first.sequences, extra.expand(first.sequences.shape[0], -1)], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["attention_mask"].shape[1] :])], 1)
        second = model.generate(input_ids=ids, attention_mask=mask, past_key_values=output_cache(first),
                                max_new_tokens=NEW_TOKENS[1], min_new_tokens=NEW_TOKENS[1], do_sample=False,
                                return_dict_in_generate=True, output_logits=True, **second_inputs)  # fmt: skip
    return second, output_cache(second)


def _assert_within_budget(cache, budget: float, prompt_tokens: int) -> None:
    """Every layer holds at most the budget's share of both turns' prompt tokens plus the generated ones."""
    bound = int(budget * prompt_tokens) + sum(NEW_TOKENS)
    assert max(int(v.max()) for v in valid_slots(cache)) <= bound


def _extra(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (1, FOLLOW_UP), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["snapkv", "h2o", "retentivekv", "hae", "pyramidkv"])
def test_a_follow_up_prompt_is_compressed_as_the_eager_reference_compresses_it(method):
    """Tokens, logits and every layer's kept positions of the second turn match the uncompiled reference, and the
    cache stays within the budget of both turns' prompt tokens plus the generated ones."""
    tiny = build("llava")
    budget = 0.5
    reference, reference_cache = _two_turns(mmkv_compile.apply_eagerly(build("llava").model, method, budget),
                                            tiny.inputs, _extra())  # fmt: skip
    compiled, cache = _two_turns(mmkv_compile.compile(build("llava").model, method, budget, inductor=False),
                                 tiny.inputs, _extra())  # fmt: skip
    assert torch.equal(compiled.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(reference.logits), atol=1e-5, rtol=0)
    for got, want in zip(cache.mmkv_layers, reference_cache.mmkv_layers, strict=True):
        assert torch.equal(got.positions, want.positions) and torch.equal(got.labels, want.labels)
    prompt_tokens = tiny.inputs["input_ids"].shape[1] + FOLLOW_UP
    _assert_within_budget(cache, budget, prompt_tokens)


def test_a_follow_up_prompt_keeps_the_budget_share_of_its_own_tokens():
    """snapkv 0.5 (compresses prompts only), counted by hand: the first prompt keeps half its tokens, the
    generated tokens stay, the follow-up (the last generated token plus the new text) keeps half of its own."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5, inductor=False)
    _, cache = _two_turns(model, tiny.inputs, _extra())
    prompt = tiny.inputs["input_ids"].shape[1]
    first_turn = prompt // 2 + NEW_TOKENS[0] - 1  # the last generated token is not cached yet
    follow_up = 1 + FOLLOW_UP
    expected = first_turn + follow_up // 2 + NEW_TOKENS[1] - 1
    assert [int(v.max()) for v in valid_slots(cache)] == [expected] * len(cache.mmkv_layers)
    assert cache.get_seq_length() == prompt + NEW_TOKENS[0] + FOLLOW_UP + NEW_TOKENS[1] - 1


def _kept(full: DynamicCache, positions: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache of the slots at ``positions`` (per layer, ``[B, Hkv, S]`` indices into ``full``)."""
    kept = DynamicCache()
    for index, (layer, slots) in enumerate(zip(full.layers, positions, strict=True)):
        gather = slots.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        kept.update(layer.keys.gather(2, gather), layer.values.gather(2, gather), index)
    return kept


def test_a_follow_up_prompt_attends_and_keeps_what_the_uncompiled_model_would():
    """Independent check (no mmkv code in the reference): the uncompiled model over a DynamicCache holding exactly
    the kept slots, with the follow-up at its logical positions, gives the compiled follow-up's logits; and the
    next token, over the slots the follow-up kept (gathered from that reference cache), gives the compiled
    step's logits."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5, inductor=False, window=4)
    reference = tiny.model
    prompt = tiny.inputs["input_ids"]
    follow_up = _extra()
    with torch.no_grad():
        cache = output_cache(model(**tiny.inputs, use_cache=True))
        kept_before = [layer.positions.clone() for layer in cache.mmkv_layers]
        chunk = model(input_ids=follow_up, past_key_values=cache, use_cache=True)

        full = DynamicCache()
        reference(**tiny.inputs, past_key_values=full, use_cache=True)
        kept = _kept(full, kept_before)
        logical = torch.arange(prompt.shape[1], prompt.shape[1] + FOLLOW_UP)[None]
        expected = reference(input_ids=follow_up, past_key_values=kept, position_ids=logical, use_cache=True)
        torch.testing.assert_close(chunk.logits, expected.logits, atol=1e-5, rtol=0)

        valid = valid_slots(cache)[0]
        assert int(valid.max()) == prompt.shape[1] // 2 + FOLLOW_UP // 2  # the follow-up was compressed
        # the reference cache holds the kept prompt slots, then the follow-up's: map kept positions to its slots
        order = [torch.cat([before, logical.expand(*before.shape[:2], -1)], -1) for before in kept_before]
        slots = [(o.unsqueeze(-1) == layer.positions.unsqueeze(-2)).int().argmax(-2)
                 for o, layer in zip(order, cache.mmkv_layers, strict=True)]  # fmt: skip
        token = chunk.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, past_key_values=cache, use_cache=True)
        after = _kept(kept, slots)
        position = torch.tensor([[prompt.shape[1] + FOLLOW_UP]])
        expected = reference(input_ids=token, past_key_values=after, position_ids=position, use_cache=True)
        torch.testing.assert_close(step.logits, expected.logits, atol=1e-5, rtol=0)


def test_only_a_one_token_step_appends_uncompressed():
    """Graph level: snapkv puts no operator in the one-token decode graph, one per layer in the follow-up's."""
    tiny = build("llama")
    backend = CaptureBackend(method="snapkv", budget=0.5)
    model = build("llama").model
    model.forward = compile_with(model, backend)
    with torch.no_grad():
        cache = output_cache(model(**tiny.inputs, use_cache=True))
        model(input_ids=tiny.inputs["input_ids"][:, :1], past_key_values=cache, use_cache=True)
        model(input_ids=_extra(), past_key_values=cache, use_cache=True)
    decoder_graphs = [after for before, after in backend.graphs if cache_appends(before.graph)]
    assert [count_ops(g, SCORE_EVICT_MERGE) for g in decoder_graphs] == [2, 0, 2]
    assert [r.phase for r in backend.reports if r.sites] == ["prefill", "decode", "decode"]


@pytest.mark.parametrize("method", ["snapkv", "madakv"])
def test_a_follow_up_turn_with_a_new_image_labels_and_compresses_it(method):
    """A second turn carrying a new image (its placeholder tokens and pixels): the compiled model matches the eager
    reference, every kept slot's label is the modality of the token at its position (image exactly where the
    turns' image placeholders were), and the cache stays within the budget of both turns' prompts."""
    tiny = build("llava")
    generator = torch.Generator().manual_seed(3)
    extra = torch.cat([torch.randint(3, 80, (1, 3), generator=generator),
                       torch.full((1, tiny.num_image_tokens), tiny.image_token_id),
                       torch.randint(3, 80, (1, 5), generator=generator)], dim=1)  # fmt: skip
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    runs = []
    for model in (mmkv_compile.apply_eagerly(build("llava").model, method, 0.5),
                  mmkv_compile.compile(build("llava").model, method, 0.5, inductor=False)):  # fmt: skip
        runs.append(_two_turns(model, tiny.inputs, extra, pixel_values=pixels))
    (reference, reference_cache), (compiled, cache) = runs
    assert torch.equal(compiled.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(reference.logits), atol=1e-5, rtol=0)
    is_image = compiled.sequences[0] == tiny.image_token_id
    for got, want in zip(cache.mmkv_layers, reference_cache.mmkv_layers, strict=True):
        assert torch.equal(got.positions, want.positions) and torch.equal(got.labels, want.labels)
        valid = got.labels != INVALID
        expected = torch.where(is_image[got.positions], IMAGE, TEXT)
        assert torch.equal(got.labels[valid].long(), expected[valid].long())
        second_image = valid & is_image[got.positions] & (got.positions >= tiny.inputs["input_ids"].shape[1])
        assert second_image.any()  # the new image's slots are in the cache, labelled as image
    _assert_within_budget(cache, 0.5, tiny.inputs["input_ids"].shape[1] + extra.shape[1])


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3", "idefics3"])
def test_a_follow_up_on_families_with_their_own_positions_and_masks(name):
    """Qwen2-VL's M-RoPE deltas, Gemma3's interleaved windows and bidirectional image attention, Idefics3: at
    budget 1.0 the compiled model's second turn has the uncompiled model's tokens and logits; at 0.5 it equals
    the eager reference and keeps the budget of both turns' prompts."""
    from mmkv_compile.testing.zoo import FAMILIES

    family = FAMILIES[name]
    if not family.available():
        pytest.skip(f"the installed transformers has no {family.module}")
    extra = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(5))
    reference = family.build("sdpa")
    compiled = family.build("sdpa")
    mmkv_compile.compile(compiled.model, "snapkv", 1.0, inductor=False)
    want, _ = _two_turns(reference.model, reference.inputs, extra)
    got, cache = _two_turns(compiled.model, compiled.inputs, extra)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=0)
    assert cache.mmkv_layers  # the compiled route's cache, not a fallback

    eager, eager_cache = _two_turns(mmkv_compile.apply_eagerly(family.build("sdpa").model, "snapkv", 0.5),
                                    reference.inputs, extra)  # fmt: skip
    compressed = family.build("sdpa")
    mmkv_compile.compile(compressed.model, "snapkv", 0.5, inductor=False)
    got, cache = _two_turns(compressed.model, compressed.inputs, extra)
    assert torch.equal(got.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(eager.logits), atol=1e-5, rtol=0)
    for layer, eager_layer in zip(cache.mmkv_layers, eager_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, eager_layer.positions)
    _assert_within_budget(cache, 0.5, reference.inputs["input_ids"].shape[1] + extra.shape[1])

"""Decoding over a compressed cache: batches with padding, positions after eviction, recompiles, and
methods that hold the cache at the budget."""

from __future__ import annotations

import pytest
import torch
from support import build, generate, valid_slots
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile.compat import output_cache


def _left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def _llava_batch(tiny):
    """Two LLaVA prompts with an image each and different text lengths, left-padded."""
    ids = tiny.inputs["input_ids"][0]
    image = ids == tiny.image_token_id
    first_image = int(image.nonzero()[0])
    short = torch.cat([ids[first_image - 3 : first_image + tiny.num_image_tokens], ids[-4:]])
    rows = [ids, short]
    pixels = torch.randn(2, *tiny.inputs["pixel_values"].shape[1:])
    return rows, pixels


@pytest.mark.parametrize(
    "method,budget,options", [("snapkv", 0.5, {"window": 4}), ("h2o", 0.5, {}), ("streaming_llm", 12, {})]
)
@pytest.mark.parametrize("name", ["llama", "llava"])
def test_padded_batch_equals_each_prompt_alone(name, method, budget, options):
    tiny = build(name)
    model = mmkv_compile.compile(build(name).model, method, budget, inductor=False, **options)
    if name == "llava":
        rows, pixels = _llava_batch(tiny)
    else:
        ids = tiny.inputs["input_ids"][0]
        rows, pixels = [ids, ids[5:17]], None
    ids, mask = _left_pad(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    if pixels is not None:
        batch["pixel_values"] = pixels
    tokens, _, cache = generate(model, batch, 10)
    assert cache.get_physical_length() < cache.get_seq_length()
    for i, row in enumerate(rows):
        alone = {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
        if pixels is not None:
            alone["pixel_values"] = pixels[i : i + 1]
        alone_tokens, _, alone_cache = generate(model, alone, 10)
        assert torch.equal(tokens[i], alone_tokens[0]), f"row {i}"
        valid = cache.layers[0].labels[i] != -1
        assert int(valid.sum()) == int((alone_cache.layers[0].labels[0] != -1).sum())


def _kept_dynamic_cache(prefill_cache: DynamicCache, mmkv_cache) -> DynamicCache:
    """A DynamicCache holding exactly the K/V slots the mmkv cache kept, gathered from an uncompiled prefill."""
    kept = DynamicCache()
    for idx, (layer, full) in enumerate(zip(mmkv_cache.layers, prefill_cache.layers, strict=True)):
        index = layer.positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, full.keys.shape[-1])
        kept.update(full.keys.gather(2, index), full.values.gather(2, index), idx)
    return kept


@pytest.mark.parametrize("name", ["llama", "qwen2_vl"])
def test_decode_continues_from_logical_positions(name):
    """Independent check: the uncompiled model over a DynamicCache with the kept slots and explicit
    logical positions gives the compiled model's first decode logits. Positions taken from the physical
    length instead (what a plain DynamicCache would do) give different logits."""
    tiny = build(name)
    model = mmkv_compile.compile(build(name).model, "snapkv", 0.5, inductor=False, window=4)
    with torch.no_grad():
        out = model(**tiny.inputs, use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        # No attention mask: the model derives positions from the cache (Qwen2-VL: plus its rope_deltas).
        step = model(input_ids=token, past_key_values=cache, use_cache=True)
        reference = tiny.model
        full = DynamicCache()
        reference(**tiny.inputs, past_key_values=full, use_cache=True)
        logical = tiny.inputs["input_ids"].shape[1]
        physical = cache.layers[0].positions.shape[-1] - 1  # the compiled step appended one slot

        def decode_at(position: int):
            positions = torch.tensor([[position]])
            if name == "qwen2_vl":  # M-RoPE: text positions on all three axes, shifted by rope_deltas
                positions = positions.expand(3, 1, 1) + reference.model.rope_deltas
            kept = _kept_dynamic_cache(full, _prefix(cache))
            return reference(input_ids=token, past_key_values=kept, position_ids=positions, use_cache=True).logits

        torch.testing.assert_close(step.logits, decode_at(logical), atol=1e-5, rtol=0)
        assert not torch.allclose(step.logits, decode_at(physical), atol=1e-3)


class _Prefix:
    def __init__(self, layers):
        self.layers = layers


class _Slots:
    def __init__(self, positions):
        self.positions = positions


def _prefix(cache):
    """The cache's slots before the last appended one."""
    return _Prefix([_Slots(layer.positions[..., :-1]) for layer in cache.layers])


def _count_frames():
    return torch._dynamo.utils.counters["frames"]["ok"]


@pytest.mark.parametrize("method,budget", [("snapkv", 0.5), ("h2o", 12)])
def test_decoding_compiles_once(method, budget):
    """The first decode step compiles; the cache and mask lengths that grow every step are dynamic from then on."""
    tiny = build("llava")
    model = mmkv_compile.compile(build("llava").model, method, budget, inductor=False)
    with torch.no_grad():
        out = model(**tiny.inputs, use_cache=True)
        cache, mask = output_cache(out), tiny.inputs["attention_mask"]

        def step(out):
            nonlocal mask
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            return model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)

        after_prefill = _count_frames()
        out = step(out)
        before = _count_frames()
        assert before > after_prefill  # the counter does see decode compiles
        for _ in range(16):
            out = step(out)
    assert _count_frames() == before


@pytest.mark.parametrize("method,budget", [("h2o", 12), ("streaming_llm", 12), ("h2o", 0.5)])
def test_decode_time_methods_hold_the_cache_at_budget(method, budget):
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, method, budget, inductor=False)
    _, _, cache = generate(model, tiny.inputs, 64)
    held = budget if isinstance(budget, int) else tiny.inputs["input_ids"].shape[1] // 2
    assert cache.get_seq_length() == tiny.inputs["input_ids"].shape[1] + 63
    for layer in cache.layers:
        assert layer.keys.shape[2] == held
        assert int((layer.labels != -1).sum(-1).min()) == held
    if method == "streaming_llm":  # sinks stay, the rest is the most recent window
        positions = cache.layers[0].positions[0, 0].tolist()
        assert positions[:4] == [0, 1, 2, 3]
        assert positions[4:] == list(range(cache.get_seq_length() - held + 4, cache.get_seq_length()))


@pytest.mark.parametrize("method", ["h2o", "streaming_llm", "hae"])
def test_a_budget_that_keeps_no_prompt_token_decodes_over_an_empty_cache(method):
    """A 4-token prompt at budget 0.2 keeps floor(0.8) = 0 slots, and these methods hold each layer at that size:
    every decode step reads a cache emptied by eviction. Independent reference: with nothing cached, each step
    is the uncompiled model on its one token at its logical position."""
    tiny = build("llama", prompt_len=4)
    model = mmkv_compile.compile(build("llama", prompt_len=4).model, method, 0.2, inductor=False)
    tokens, logits, cache = generate(model, tiny.inputs, 5)
    assert all(int((layer.labels != -1).sum()) == 0 for layer in cache.mmkv_layers)
    with torch.no_grad():
        expected = [tiny.model(**tiny.inputs).logits[:, -1]]
        for step, token in enumerate(tokens[0, :-1].tolist()):
            position = torch.tensor([[4 + step]])
            expected.append(tiny.model(input_ids=torch.tensor([[token]]), position_ids=position).logits[:, -1])
    torch.testing.assert_close(logits, torch.stack(expected, dim=1), atol=1e-5, rtol=0)


def _beam_search(model, inputs: dict, steps: int, **options):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=3,
            return_dict_in_generate=True, output_scores=True, **options,
        )  # fmt: skip
    return out.sequences, out.sequences_scores, output_cache(out)


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_at_full_budget_is_the_uncompiled_models(num_return_sequences):
    """Independent check: beam search reorders the cache every step (``reorder_cache``); at budget 1.0 the compiled
    LLaVA (labels and capacity buffers reordered with it) gives the uncompiled model's beams and scores."""
    tiny = build("llava")
    model = mmkv_compile.compile(build("llava").model, "snapkv", 1.0, inductor=False)
    ours = _beam_search(model, tiny.inputs, 6, num_return_sequences=num_return_sequences)
    reference = _beam_search(tiny.model, tiny.inputs, 6, num_return_sequences=num_return_sequences)
    assert torch.equal(ours[0], reference[0])
    torch.testing.assert_close(ours[1], reference[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["snapkv", "h2o", "madakv"])
def test_beam_search_compresses_as_the_eager_reference(method):
    """Beam search over a compressed cache: the beams, scores and kept slots of the eager reference, and every
    beam within the budget."""
    tiny = build("llava")
    model = mmkv_compile.compile(build("llava").model, method, 0.5, inductor=False)
    eager = mmkv_compile.apply_eagerly(build("llava").model, method, 0.5)
    steps, prompt = 6, tiny.inputs["input_ids"].shape[1]
    (ours, our_scores, cache), (theirs, their_scores, their_cache) = (
        _beam_search(m, tiny.inputs, steps) for m in (model, eager)
    )
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_scores, their_scores, atol=1e-5, rtol=0)
    for layer, their_layer in zip(cache.mmkv_layers, their_cache.mmkv_layers, strict=True):
        assert torch.equal(layer.positions, their_layer.positions) and torch.equal(layer.labels, their_layer.labels)
    # the last step's token is appended by the call that would produce the next one: steps - 1 held
    assert all(int(held.max()) <= prompt // 2 + steps - 1 for held in valid_slots(cache))

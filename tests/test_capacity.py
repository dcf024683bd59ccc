"""Decoding into capacity buffers: new tokens are written in place after the kept slots, decode graphs keep
their shapes, and what the model computes is exactly what the uncompiled reference computes."""

from __future__ import annotations

import pytest
import torch
from support import CaptureBackend, build, compile_with, generate, random_state

import mmkv_compile
from mmkv_compile import ops
from mmkv_compile.compat import output_cache
from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.passes.find_sites import CACHE_WRITE
from mmkv_compile.passes.graph_utils import SDPA_TARGETS, is_call, sdpa_arguments
from mmkv_compile.state import STATE_FIELDS

STEPS = 24


@pytest.fixture(scope="module")
def references():
    """Per (model, method, budget): the uncompiled reference's tokens, logits and cache after STEPS tokens."""
    done = {}

    def reference(name, method, budget):
        if (name, method, budget) not in done:
            model = mmkv_compile.apply_eagerly(build(name).model, method, budget)
            done[name, method, budget] = generate(model, build(name).inputs, STEPS)
        return done[name, method, budget]

    return reference


def _same_cache(cache, reference) -> None:
    for ours, theirs in zip(cache.mmkv_layers, reference.mmkv_layers, strict=True):
        assert torch.equal(ours.positions, theirs.positions)
        assert torch.equal(ours.labels, theirs.labels)
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=0)
    assert cache.nbytes()["kv"] == reference.nbytes()["kv"]


@pytest.mark.parametrize(
    "name,method,budget",
    [("llava", "snapkv", 0.5), ("llama", "pyramidkv", 0.4), ("llava", "madakv", 0.3), ("qwen2_vl", "adakv", 0.5)],
)
def test_in_place_decode_matches_the_reference(references, name, method, budget):
    model = mmkv_compile.compile(build(name).model, method, budget, inductor=False)
    tokens, logits, cache = generate(model, build(name).inputs, STEPS)
    ref_tokens, ref_logits, ref_cache = references(name, method, budget)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    _same_cache(cache, ref_cache)
    prompt = build(name).inputs["input_ids"].shape[1]
    for layer in cache.mmkv_layers:
        assert layer.buffers is not None  # the decode steps really wrote in place
        # generate was asked for STEPS tokens: the buffers were sized for them, once
        assert layer.buffers.keys.shape[2] == layer.filled + 1
        assert layer.keys.shape[2] == layer.filled < prompt + STEPS - 1  # the fields show the held slots only
    assert cache.nbytes()["reserved"] > 0


def test_in_place_decode_with_inductor(references):
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5)
    tokens, logits, cache = generate(model, build("llama").inputs, STEPS)
    ref_tokens, ref_logits, ref_cache = references("llama", "snapkv", 0.5)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    _same_cache(cache, ref_cache)


def _frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


def _decode_by_hand(model, inputs, steps: int, each=None):
    """Greedy decode one call per token, as generate does (no generate: the buffers grow in chunks)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, mask = output_cache(out), inputs["attention_mask"]
        tokens = []
        for step in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            if each is not None:
                each(step, cache)
    return torch.cat(tokens, dim=-1), cache


def test_buffers_are_written_in_place_and_decoding_compiles_once():
    """256 decode steps: the buffers are allocated once (the same memory every step, the state fields views of
    it) and nothing compiles after the first decode step (the growing lengths are dynamic from the start)."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5, inductor=False)
    seen = {}

    def each(step, cache):
        layer = cache.mmkv_layers[0]
        seen.setdefault("pointer", layer.buffers.keys.data_ptr())
        assert layer.buffers.keys.data_ptr() == seen["pointer"]
        assert layer.keys.untyped_storage().data_ptr() == seen["pointer"]
        if step == 0:
            seen["frames"] = _frames()

    _, cache = _decode_by_hand(model, tiny.inputs, 256, each)
    assert _frames() == seen["frames"]
    assert cache.mmkv_layers[0].keys.shape[2] == cache.mmkv_layers[0].filled


def test_buffers_grow_in_chunks_and_stay_exact(monkeypatch):
    """Without generate's max_new_tokens the buffers gain CAPACITY_CHUNK slots when full (here 3, so they grow
    often): the tokens and cache still equal the reference's, and growing stops costing compiles once the cache
    length is dynamic."""
    monkeypatch.setattr(mmkv_compile.api, "CAPACITY_CHUNK", 3)
    tiny = build("llava")
    reference = mmkv_compile.apply_eagerly(build("llava").model, "snapkv", 0.5)
    model = mmkv_compile.compile(build("llava").model, "snapkv", 0.5, inductor=False)
    capacities, frames = [], []

    def each(step, cache):
        capacities.append(cache.mmkv_layers[0].buffers.keys.shape[2])
        frames.append(_frames())

    tokens, cache = _decode_by_hand(model, tiny.inputs, 16, each)
    ref_tokens, ref_cache = _decode_by_hand(reference, tiny.inputs, 16)
    assert torch.equal(tokens, ref_tokens)
    _same_cache(cache, ref_cache)
    grown_at = [i for i in range(1, len(capacities)) if capacities[i] > capacities[i - 1]]
    assert len(grown_at) >= 3
    assert frames[-1] == frames[grown_at[1]]  # the second growth and everything after compile nothing


def test_decode_graph_writes_in_place():
    tiny = build("llava")
    backend = CaptureBackend(method="snapkv", budget=0.5)
    forward = compile_with(build("llava").model, backend)
    with torch.no_grad():
        out = forward(**tiny.inputs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([tiny.inputs["attention_mask"], torch.ones_like(token)], dim=-1)
        forward(input_ids=token, attention_mask=mask, past_key_values=output_cache(out), use_cache=True)
    decode = [(i, after) for i, (before, after) in enumerate(backend.graphs) if any(
        n.target in CACHE_WRITE for n in before.graph.nodes)]  # fmt: skip
    assert decode, "no decode graph wrote into capacity buffers"
    index, after = decode[-1]
    layers = build("llava").model.config.text_config.num_hidden_layers
    report = backend.reports[index]
    assert report.passes["lower_cache_writes"] == layers  # each write became in-place slice copies
    assert not [n for n in after.graph.nodes if n.target in CACHE_WRITE or n.target is ops.CACHE_APPEND]
    assert sum(1 for n in after.graph.nodes if n.target is torch.ops.aten.copy_.default) >= 4 * layers
    assert all(site.mask_rebuilt for site in report.sites if site.cache == "mmkv")
    # a layer's buffers (one per state field) share one length symbol: Dynamo gives each marked-dynamic size its
    # own, and each symbol costs guards, tracing and region checks
    writes = [n for n in backend.graphs[index][0].graph.nodes if n.target in CACHE_WRITE]
    capacities = {str(buffer.meta["example_value"].shape[2]) for n in writes for buffer in n.args[: len(STATE_FIELDS)]}
    assert len(capacities) == layers, capacities
    # each step's attention reads the buffers' own key/value heads, not a per-step repeated copy of the cache
    # (transformers 5.2 traces repeat_kv for a masked grouped-query call)
    attention = [sdpa_arguments(n) for n in after.graph.nodes if is_call(n, SDPA_TARGETS)]
    assert len(attention) == layers
    assert all(a["key"].op == "placeholder" and a["value"].op == "placeholder" and a["enable_gqa"] for a in attention)


def test_cache_write_writes_at_start_and_refuses_to_overflow():
    _, state = random_state(seq=5, seed=0)
    buffers = state.with_room(3)
    _, new = random_state(seq=2, seed=1)
    new_slots = (new.keys, new.values, new.labels, new.positions + 100)
    ops.cache_write(buffers, new_slots, 5, "0:1:0:")
    assert torch.equal(buffers.keys[:, :, :5], state.keys) and torch.equal(buffers.keys[:, :, 5:7], new.keys)
    assert torch.equal(buffers.positions[:, :, 5:7], new.positions + 100)
    assert buffers.labels[0, 0, 7] == -1 and buffers.positions[0, 0, 7] == -1  # the slot still unused
    assert float(buffers.scores[:, :, 5:7].abs().sum()) == 0 and bool((buffers.weights[:, :, 5:7] == 1).all())
    with pytest.raises(RuntimeError, match="overflow a capacity of 8"):
        ops.cache_write(buffers, new_slots, 7, "0:1:0:")


def test_mask_over_buffers_equals_mask_over_held_slots():
    """The rebuilt mask over capacity buffers: the held slots as over a plain state, the unused ones hidden."""
    query, state = random_state(seq=9, num_new=1, seed=2)
    plain = slot_attention_mask(state.labels, state.positions, query, window=4)
    buffers = state.with_room(5)
    over_buffers = slot_attention_mask(buffers.labels, buffers.positions, query, window=4,
                                       query_labels=state.labels[..., -1:], query_positions=state.positions[..., -1:])  # fmt: skip
    assert torch.equal(over_buffers[..., :9], plain)
    assert not over_buffers[..., 9:].any()


def test_capacity_buffers_refuse_an_eager_step():
    """A decode step over capacity buffers that Dynamo did not compile would attend their unused slots: it
    raises instead."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5, inductor=False)
    _, _, cache = generate(model, tiny.inputs, 3)
    assert cache.mmkv_layers[0].buffers is not None
    mmkv_compile.uncompile(model)
    token = torch.zeros((1, 1), dtype=torch.long)
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside a compiled graph"):
        model(input_ids=token, past_key_values=cache, use_cache=True)


def test_a_generate_of_another_length_compiles_nothing_new():
    """Buffers sized for 12 tokens instead of 6 have another length: the decode graphs serve both."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.5, inductor=False)
    generate(model, tiny.inputs, 6)
    before = _frames()
    _, _, cache = generate(model, tiny.inputs, 12)
    assert _frames() == before
    assert cache.mmkv_layers[0].buffers.keys.shape[2] == cache.mmkv_layers[0].filled + 1


def test_static_cache_generate_decodes_in_buffers_sized_from_its_length(references):
    """generate(cache_implementation="static") with ``max_length`` (no ``max_new_tokens``): the StaticCache is
    replaced by a fixed-capacity MMKVCache whose buffers take their room from the StaticCache's length, once;
    tokens, logits and cache are the reference's."""
    inputs = build("llava").inputs
    prompt = inputs["input_ids"].shape[1]
    model = mmkv_compile.compile(build("llava").model, "snapkv", 0.5, inductor=False)
    assert model.generation_config.max_new_tokens is None
    with torch.no_grad():
        out = model.generate(
            **inputs, max_length=prompt + STEPS, min_length=prompt + STEPS, do_sample=False,
            cache_implementation="static", return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    ref_tokens, ref_logits, ref_cache = references("llava", "snapkv", 0.5)
    assert torch.equal(out.sequences[:, prompt:], ref_tokens)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref_logits, atol=1e-4, rtol=0)
    cache = output_cache(out)
    _same_cache(cache, ref_cache)
    for layer in cache.mmkv_layers:
        held_after_prompt = layer.filled - (STEPS - 1)  # generate appends every new token but the last
        room = layer.buffers.keys.shape[2] - held_after_prompt
        assert STEPS - 1 <= room <= STEPS  # the StaticCache's room, allocated once (a CAPACITY_CHUNK is 256)

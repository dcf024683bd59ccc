"""Bad options raise ValueError naming the option before anything compiles; graphs the passes do not
understand compile unchanged with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile import MMKVCache, MMKVWarning
from mmkv_compile.passes.insert_op import InsertScoreEvictMerge

BAD_OPTIONS = [
    ({"method": "snapkvv"}, "method='snapkvv' is unknown; choose one of"),
    ({"budget": 0.0}, "budget=0.0"),
    ({"budget": -3}, "budget=-3"),
    ({"budget": 1.5}, "budget=1.5"),
    ({"budget": "0.5"}, "budget must be a float in \\(0, 1\\]"),
    ({"budget": True}, "budget must be"),
    ({"method": "snapkv", "budget": 16, "window": 32}, "window=32 is larger than the budget"),
    ({"method": "streaming_llm", "budget": 3, "sinks": 4}, "sinks=4 is larger than the budget"),
    ({"method": "snapkv", "pool": "median"}, "pool='median' is not allowed; choose one of"),
    ({"method": "snapkv", "window": 0}, "window must be an int >= 1"),
    ({"method": "snapkv", "kernel_size": 4}, "kernel_size=4 must be odd"),
    ({"method": "h2o", "recent_ratio": 2.0}, "recent_ratio must be a float in \\[0, 1\\]"),
    ({"method": "snapkv", "sinks": 4}, "unknown option\\(s\\) sinks"),
    ({"inductor": "yes"}, "inductor must be True or False"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_option_raises_before_compiling(options, message):
    tiny = build("llama")
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with pytest.raises(ValueError, match=message):
        mmkv_compile.compile(tiny.model, **options)
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames
    assert "forward" not in tiny.model.__dict__  # the model was left alone


def test_bad_option_through_torch_compile_names_the_option():
    tiny = build("llama")
    compiled = torch.compile(tiny.model, backend="mmkv", options={"budget": 2.5})
    with pytest.raises(Exception, match="budget=2.5") as info:
        compiled(**tiny.inputs, past_key_values=MMKVCache(tiny.model.config))
    cause = info.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, ValueError)


def _run(model, inputs, cache):
    with torch.no_grad():
        return model(**inputs, past_key_values=cache, use_cache=True).logits


def test_plain_dynamic_cache_compiles_unchanged_with_one_warning():
    tiny = build("llama")
    reference = _run(tiny.model, tiny.inputs, DynamicCache())
    compiled = torch.compile(
        tiny.model, backend="mmkv", options={"method": "snapkv", "budget": 0.25, "inductor": False}
    )
    cache = DynamicCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = _run(compiled, tiny.inputs, cache)
    ours = [w for w in caught if issubclass(w.category, MMKVWarning)]
    assert len(ours) == 1 and "DynamicCache" in str(ours[0].message)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    assert cache.get_seq_length() == tiny.inputs["input_ids"].shape[1]  # nothing evicted


def test_a_failing_pass_falls_back_to_the_unchanged_graph(monkeypatch):
    def broken(self, gm, ctx):
        raise RuntimeError("pattern not understood")

    monkeypatch.setattr(InsertScoreEvictMerge, "run", broken)
    tiny = build("llava")
    reference = _run(tiny.model, tiny.inputs, MMKVCache(tiny.model.config))
    model = mmkv_compile.compile(build("llava").model, "snapkv", 0.25, inductor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(**tiny.inputs, use_cache=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, MMKVWarning)]
    assert any("pattern not understood" in m and "compiled unchanged" in m for m in messages)
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
    assert out.past_key_values.get_physical_length() == tiny.inputs["input_ids"].shape[1]


def test_methods_lists_every_method_with_paper_and_parameters():
    listing = mmkv_compile.methods()
    assert set(listing) >= {"full", "streaming_llm", "snapkv", "h2o", "text_prior"}
    assert listing["snapkv"]["parameters"] == {"window": 32, "kernel_size": 5, "pool": "avg", "group_reduce": "mean"}
    assert all(entry["description"] and entry["paper"] for entry in listing.values())

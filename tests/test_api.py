"""The public entry points: options and their errors, fallbacks and their one warning, explain against what
generate does, both names of transformers' cache argument, and compression that does not depend on what the
process compiled before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from support import build, generate
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile import MMKVCache, MMKVWarning
from mmkv_compile.compat import cache_argument, output_cache
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
    ({"method": "h2o", "recent_ratio": 2.0}, "recent_ratio must be a number in \\[0, 1\\]"),
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
        compiled(**tiny.inputs)
    cause = info.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, ValueError)


def _run(model, inputs, cache):
    with torch.no_grad():
        return model(**inputs, **{cache_argument(model): cache}, use_cache=True).logits


def test_a_users_own_dynamic_cache_compiles_unchanged_with_one_warning():
    tiny = build("llama")
    reference = _run(tiny.model, tiny.inputs, DynamicCache())
    options = {"method": "snapkv", "budget": 0.25, "inductor": False}
    compiled = torch.compile(build("llama").model, backend="mmkv", options=options)
    cache = DynamicCache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = _run(compiled, tiny.inputs, cache)
    ours = [w for w in caught if issubclass(w.category, MMKVWarning)]
    assert len(ours) == 1 and "DynamicCache" in str(ours[0].message) and "snapkv" in str(ours[0].message)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    assert cache.get_seq_length() == tiny.inputs["input_ids"].shape[1]  # nothing evicted: the user's cache


def test_inductor_caches_compiled_graphs_under_the_operators_fingerprint(monkeypatch):
    """Inductor's on-disk cache does not see a custom op's fake implementation: the backend tags the key with a
    hash of mmkv's source while it compiles, and leaves the user's tag as it was."""
    import torch._inductor.compile_fx as inductor

    from mmkv_compile.sources import source_fingerprint

    seen, real = [], inductor.compile_fx
    monkeypatch.setattr(
        inductor, "compile_fx", lambda *a, **k: seen.append(torch.compiler.config.cache_key_tag) or real(*a, **k)
    )
    with torch.compiler.config.patch(cache_key_tag="user-"):
        torch.compile(lambda x: x * 2, backend="mmkv")(torch.ones(3))
        assert torch.compiler.config.cache_key_tag == "user-"
    assert seen == [f"user-mmkv-{source_fingerprint()}"]


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
        torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
        assert output_cache(out).get_physical_length() == tiny.inputs["input_ids"].shape[1]
        token = out.logits[:, -1:].argmax(-1)
        model(input_ids=token, past_key_values=output_cache(out), use_cache=True)
    # One reason, said once: the decode graph reached the backend and fell back for the same reason.
    messages = {str(w.message) for w in caught if issubclass(w.category, MMKVWarning)}
    assert len(messages) == 1 and "pattern not understood" in messages.pop()
    phases = [(r.phase, bool(r.fallback)) for r in mmkv_compile.compiled_reports(model)]
    assert ("prefill", True) in phases and ("decode", True) in phases


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_argument_under_either_name(name):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``: a call passes it under either."""
    tiny = build("llama")
    model = mmkv_compile.compile(build("llama").model, "snapkv", 0.25, inductor=False, window=4)
    cache = MMKVCache(tiny.model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**tiny.inputs, **{name: cache}, use_cache=True)
    assert output_cache(out) is cache
    assert cache.get_physical_length() == tiny.inputs["input_ids"].shape[1] // 4


ROUTES = ["compile", "torch.compile", "apply_eagerly"]


def _on_route(route: str, model):
    if route == "compile":
        return mmkv_compile.compile(model, "snapkv", 0.25, inductor=False)
    if route == "apply_eagerly":
        return mmkv_compile.apply_eagerly(model, "snapkv", 0.25)
    return torch.compile(model, backend="mmkv", options={"budget": 0.25, "inductor": False})


@pytest.mark.parametrize("route", ROUTES)
def test_use_cache_false_says_once_that_nothing_is_compressed(route):
    """Without a cache there is nothing to compress: the model's own output, and one warning that says why."""
    tiny = build("llama")
    with torch.no_grad():
        reference = tiny.model(**tiny.inputs, use_cache=False).logits
    model = _on_route(route, build("llama").model)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [model(**tiny.inputs, use_cache=False) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
        assert output_cache(out) is None
    ours = [str(w.message) for w in caught if issubclass(w.category, MMKVWarning)]
    assert len(ours) == 1 and "use_cache=False" in ours[0] and "nothing to compress" in ours[0], ours


# -- explain --------------------------------------------------------------------------------------------------


def test_explain_reports_every_graph_and_site():
    tiny = build("llava")
    report = mmkv_compile.explain(tiny.model, "h2o", 0.5, **tiny.inputs)
    phases = {g.phase for g in report.graphs}
    assert {"prefill", "decode"} <= phases
    lm_sites = [s for phase, s in report.sites() if phase == "prefill" and s.cache == "mmkv"]
    assert [s.layer for s in lm_sites] == [0, 1] and all(s.evicts and s.gqa_groups == 2 for s in lm_sites)
    vision = [s for _, s in report.sites() if s.cache == "none"]  # generate may run the vision tower eagerly
    assert not any(s.rewritten for s in vision)
    decode = [s for phase, s in report.sites() if phase == "decode" and s.cache == "mmkv"]
    assert decode and all(s.evicts and s.mask_rebuilt for s in decode)
    text = str(report)
    assert "layer   0" in text and "evict+mask" in text
    assert report.to_dict()["graphs"][0]["sites"] is not None
    assert "forward" not in tiny.model.__dict__  # explain leaves the model alone


@pytest.mark.parametrize("method", ["look_m", "meda", "hae", "snapkv"])
def test_explain_says_what_generate_does(method):
    """explain runs generate through the same path: where it reports eviction at the prompt, generate's cache
    is compressed, layer by layer, with the same warnings."""
    tiny = build("llava")
    report = mmkv_compile.explain(build("llava").model, method, 0.3, **tiny.inputs)
    model = mmkv_compile.compile(build("llava").model, method, 0.3, inductor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, cache = generate(model, tiny.inputs, 2)
    ours = {str(w.message) for w in caught if issubclass(w.category, MMKVWarning)}
    evicting = sorted({s.layer for p, s in report.sites() if p == "prefill" and s.evicts})
    compressed = [i for i, layer in enumerate(cache.mmkv_layers) if layer.is_compressed()]
    assert evicting == compressed == [0, 1]
    assert set(report.warnings) == ours


WARM_PROCESS = """
import json, torch, mmkv_compile
from support import build
from torch._dynamo.utils import counters
tiny = build("llama")
model = mmkv_compile.compile(tiny.model, "snapkv", 0.5)
with torch.no_grad():
    model.generate(**tiny.inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps(dict(counters["aot_autograd"])))
"""


def test_a_second_process_takes_the_prefill_and_decode_graphs_from_the_compile_caches(tmp_path):
    """The rewritten graphs (the operator, the rebuilt masks, the lowered cache writes), compiled region by
    region, are ones AOTAutograd's on-disk cache accepts: a second process with the same cache folder traces none
    of their regions again."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def run() -> dict:
        result = subprocess.run([sys.executable, "-c", WARM_PROCESS], capture_output=True, text=True, env=env,
                                timeout=600, cwd=os.path.dirname(__file__))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    # each graph is compiled region by region: every compiled region is saved, then read back
    assert cold["total"] >= 2 and cold.get("autograd_cache_saved") == cold["total"]
    assert warm.get("autograd_cache_hit") == cold["total"] and not warm.get("autograd_cache_bypass")


# -- the backend's own route ------------------------------------------------------------------------------


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=os.path.dirname(__file__))  # fmt: skip


TORCH_COMPILE_ROUTE = """
import json, sys, warnings, torch
from support import build
from mmkv_compile.compat import output_cache
warnings.simplefilter("always")
options = {"method": "snapkv", "budget": 0.25, "inductor": False, "window": 4}
kept = {}
for name in ("llama", "llava"):
    tiny = build(name)
    compiled = torch.compile(tiny.model, backend="mmkv", options=options)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lengths = [[l.keys.shape[-2] for l in output_cache(compiled(**tiny.inputs)).layers] for _ in range(2)]
        step = compiled(**tiny.inputs)
        token = step.logits[:, -1:].argmax(-1)
        mask = torch.cat([tiny.inputs["attention_mask"], torch.ones_like(token)], -1)
        after = compiled(input_ids=token, attention_mask=mask, past_key_values=output_cache(step))
    kept[name] = {"lengths": lengths, "decode": [l.keys.shape[-2] for l in output_cache(after).layers],
                  "logical": output_cache(after).get_seq_length(), "prompt": tiny.inputs["input_ids"].shape[1],
                  "warnings": [str(w.message) for w in caught if "mmkv" in str(w.message)]}
print(json.dumps(kept))
"""


def test_torch_compile_with_the_mmkv_backend_compresses_plain_calls():
    """``torch.compile(model, backend="mmkv", options=...)`` and plain calls, with no cache built by hand, in a
    fresh process. A text decoder compresses from its first call; LLaVA's graph breaks before its decoder, so its
    first call runs uncompressed and says so, and every call after it compresses; decoding continues from the
    logical positions."""
    result = _python(TORCH_COMPILE_ROUTE)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = json.loads(result.stdout.strip().splitlines()[-1])
    llama, llava = kept["llama"], kept["llava"]
    assert llama["lengths"] == [[llama["prompt"] // 4] * 2] * 2 and not llama["warnings"]
    assert llava["lengths"][0] == [llava["prompt"]] * 2 and llava["lengths"][1] == [llava["prompt"] // 4] * 2
    assert len(llava["warnings"]) == 1 and "first call ran uncompressed" in llava["warnings"][0]
    for model in (llama, llava):
        assert model["decode"] == [model["prompt"] // 4 + 1] * 2 and model["logical"] == model["prompt"] + 1


MANY_MODELS = """
import json, sys, warnings, torch
from support import build
import mmkv_compile
from mmkv_compile.compat import cache_argument, output_cache
plan = json.loads(sys.argv[1])
kept = []
for family, method in plan:
    tiny, eager = build(family), mmkv_compile.apply_eagerly(build(family).model, method, 0.5)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny.model(**tiny.inputs)  # an uncompiled run first, as in a notebook
        compiled = torch.compile(tiny.model, backend="mmkv", options={"method": method, "budget": 0.5, "inductor": False})
        runs = {}
        for name, model, calls in (("compiled", compiled, 2 if family == "llava" else 1), ("eager", eager, 1)):
            for _ in range(calls):  # LLaVA's first compiled call runs uncompressed (its graph breaks first)
                out = model(**tiny.inputs, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([tiny.inputs["attention_mask"], torch.ones_like(token)], -1)
            step = model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_argument(tiny.model): output_cache(out)})
            cache = output_cache(step)
            runs[name] = [layer.positions[0].tolist() for layer in cache.mmkv_layers] if hasattr(cache, "mmkv_layers") else None
    kept.append({**runs, "warnings": [str(w.message) for w in caught if "mmkv" in str(w.message)]})
print(json.dumps(kept))
"""


def test_many_models_through_torch_compile_in_one_process_each_compress():
    """``torch.compile(model, backend="mmkv")`` with its default arguments on eight models in one process, after
    uncompiled runs (six text models and two LLaVAs, methods in turn): each compresses its prompt and decode step
    exactly as the eager reference does. Every transformers forward runs through frames all models share, whose
    recompile limit (8) used to be spent by the fourth or fifth model: it then ran uncompiled, uncompressed, and
    nothing said so."""
    methods = sorted(set(mmkv_compile.methods()) - {"full"})
    plan = [("llava" if i % 4 == 3 else "llama", methods[i % len(methods)]) for i in range(8)]
    kept, _ = _run_script(MANY_MODELS, json.dumps(plan))
    for (family, method), model in zip(plan, kept):
        assert model["compiled"] is not None, (family, method, model["warnings"])
        assert model["compiled"] == model["eager"], (family, method)
        expected = {"first call ran uncompressed"} if family == "llava" else set()
        assert {w for w in expected if any(w in m for m in model["warnings"])} == expected, model["warnings"]
        assert all(any(w in m for w in expected | {"recompile_limit"}) for m in model["warnings"]), model["warnings"]


@pytest.mark.parametrize("isolate", [False, True], ids=["default-region", "isolate_recompiles"])
def test_an_adopted_model_reuses_its_compiled_prompt_and_step(isolate):
    """The backend counts an adopted model's calls in a recompile region of its own unless the user's
    torch.compile isolates them already: either way the second identical prompt and decode step find the code
    the first ones compiled (stored where the later calls look) and compile nothing."""
    from torch._dynamo.utils import counters

    tiny = build("llama")
    compiled = torch.compile(
        tiny.model, backend="mmkv", options={"method": "snapkv", "budget": 0.5, "inductor": False},
        isolate_recompiles=isolate,
    )  # fmt: skip
    compiles = []
    with torch.no_grad():
        for _ in range(2):
            before = counters["stats"]["unique_graphs"]
            out = compiled(**tiny.inputs, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([tiny.inputs["attention_mask"], torch.ones_like(token)], -1)
            step = compiled(input_ids=token, attention_mask=mask, use_cache=True, **{
                cache_argument(tiny.model): output_cache(out)})  # fmt: skip
            compiles.append(counters["stats"]["unique_graphs"] - before)
            assert output_cache(step).is_compressed()
    assert compiles[0] >= 2 and compiles[1] == 0, compiles


DISTINCT_FAMILIES = """
import json, sys, warnings, torch
import mmkv_compile
from mmkv_compile.compat import output_cache
from mmkv_compile.testing.zoo import FAMILIES
seen = []
for name in json.loads(sys.argv[1]):
    zoo = FAMILIES[name].build("sdpa")
    compiled = torch.compile(zoo.model, backend="mmkv", options={"method": "snapkv", "budget": 0.5, "inductor": False})
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(**zoo.inputs, use_cache=True)  # its graph breaks before the decoder: uncompressed, and said so
        cache = output_cache(compiled(**zoo.inputs, use_cache=True))
    compressed = hasattr(cache, "is_compressed") and cache.is_compressed()
    seen.append({"family": name, "compressed": compressed, "warnings": [str(w.message) for w in caught]})
print(json.dumps(seen))
"""


def test_vision_families_through_torch_compile_compress_or_an_earlier_one_said_they_would_not():
    """Distinct multimodal families through ``torch.compile(backend="mmkv")`` with default arguments: each first
    call compiles entries on transformers' shared frames in Dynamo's default region before the backend sees the
    model, so after a few families the next runs uncompiled, where nothing of mmkv runs. No model may stop
    compressing silently: the family before it warns that the shared frames' recompile limit is nearly spent."""
    families = ["gemma3", "idefics3", "llava_next", "smolvlm", "internvl"]
    seen, _ = _run_script(DISTINCT_FAMILIES, json.dumps(families))
    assert seen[0]["compressed"], seen[0]
    for index, model in enumerate(seen):
        first_call = [w for w in model["warnings"] if "this first call ran uncompressed" in w]
        assert model["compressed"] == bool(first_call), model  # a model the backend saw is told so, and compresses
        announced = any("recompile_limit" in w for earlier in seen[:index] for w in earlier["warnings"])
        assert model["compressed"] or announced, [(m["family"], m["compressed"], m["warnings"]) for m in seen]


# -- isolation ------------------------------------------------------------------------------------------------

ISOLATION = """
import json, sys, warnings, torch
from support import build
import mmkv_compile
from mmkv_compile.compat import output_cache
warnings.simplefilter("ignore")
order = json.loads(sys.argv[1])
tiny = build("llava")


def kept(model) -> list:
    with torch.no_grad():
        cache = output_cache(model(**tiny.inputs, use_cache=True))
    return [layer.positions[0].tolist() for layer in cache.mmkv_layers]


# the reference first, before Dynamo has seen anything: the operator called eagerly from attention
eager = {method: kept(mmkv_compile.apply_eagerly(build("llava").model, method, 0.3)) for method in order}
# what a notebook did before: uncompiled runs, a StaticCache, a pass that fails, another LLaVA
# and, standing for hundreds of models compiled before, Dynamo's process-wide cap on compiles per frame spent
torch._dynamo.config.accumulated_recompile_limit = 1
with torch.no_grad():
    tiny.model.generate(**tiny.inputs, max_new_tokens=2, do_sample=False)
    static = mmkv_compile.compile(build("llava").model, "snapkv", 0.5)
    static.generate(**tiny.inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    torch.compile(build("llama").model, backend="mmkv", options={"budget": 0.5})(**build("llama").inputs)
    # another head size (attention scale) and prompt length, through the frame LLaVA's graph break resumes in
    other = build("llava", hidden=96, text_after=14)
    mmkv_compile.compile(other.model, "snapkv", 0.5, inductor=False).generate(
        **other.inputs, max_new_tokens=2, do_sample=False)
compiled = {
    method: kept(mmkv_compile.compile(build("llava").model, method, 0.3, inductor=method in ("h2o", "look_m")))
    for method in order
}
print(json.dumps({"eager": eager, "compiled": compiled}))
"""


def _run_script(script: str, *argv: str) -> tuple[dict, str]:
    """Run ``script`` in a fresh process beside the tests: (the JSON its last line prints, its stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=1500,
        cwd=os.path.dirname(__file__), env={k: v for k, v in os.environ.items() if not k.startswith("TRITON")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_every_method_compresses_in_one_process_as_it_does_alone():
    """Every method compiled one after another in one process, in a shuffled order after uncompiled runs,
    fallbacks and Dynamo's accumulated recompile limit spent, keeps exactly the positions the operator called
    eagerly keeps (computed first in that process, before Dynamo ran; a compiled model in a fresh process keeps
    those too: ``test_methods``)."""
    import random

    order = sorted(set(mmkv_compile.methods()) - {"full"})
    random.Random(7).shuffle(order)
    kept, _ = _run_script(ISOLATION, json.dumps(order))
    for method in order:
        assert kept["compiled"][method] == kept["eager"][method], method


BACKEND_ROUTE = """
import json, sys, warnings, torch
from support import build
import mmkv_compile
from mmkv_compile.compat import output_cache
warnings.simplefilter("always")
attn, history = sys.argv[1], sys.argv[2]
kept = {}
# the tiny LLaVA first (unless alone), then one of another head size: transformers' attention code is shared,
# so Dynamo traces the second one's attention scale as a symbolic float
for name, sizes in [("first", {}), ("other", {"hidden": 96, "text_after": 14})][history == "alone":]:
    built = build("llava", attn=attn, **sizes)
    compiled = torch.compile(built.model, backend="mmkv", options={"method": "h2o", "budget": 0.5})
    cache = mmkv_compile.MMKVCache(built.model.config)
    with torch.no_grad():
        out = compiled(**built.inputs, past_key_values=cache, use_cache=True)
        step = compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=output_cache(out), use_cache=True)
    layers = output_cache(step).mmkv_layers
    kept[name] = {"positions": [layer.positions[0].tolist() for layer in layers], "logits": step.logits[0, -1].tolist()}
print(json.dumps(kept))
"""


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_backend_route_compresses_a_second_model_as_it_does_alone(attn):
    """``torch.compile(model, backend="mmkv")`` on a LLaVA after one of another head size (its attention scale
    then reaches the graph as a symbolic float) keeps the positions, and gives the logits, of a fresh process,
    with Inductor compiling the prompt and the decode step, and no warning."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        (after, warned), (alone, _) = pool.map(
            lambda history: _run_script(BACKEND_ROUTE, attn, history), ["after", "alone"]
        )
    assert "MMKVWarning" not in warned, warned[-3000:]
    other, fresh = after["other"], alone["other"]
    assert other["positions"] == fresh["positions"]
    assert len(fresh["positions"][0][0]) <= 36 // 2  # compressed: h2o keeps half of the 36-token prompt
    torch.testing.assert_close(torch.tensor(other["logits"]), torch.tensor(fresh["logits"]), rtol=1e-4, atol=1e-4)


def test_a_compressed_cache_refuses_a_step_dynamo_ran_eagerly():
    """When Dynamo runs a call eagerly (here: the torch.compile call's recompile_limit is spent by the prompt
    graph), the cache the backend compressed stops the step instead of letting uncompiled attention read its kept slots."""
    built = build("llama")
    compiled = torch.compile(
        built.model, backend="mmkv", options={"method": "snapkv", "budget": 0.5, "inductor": False},
        recompile_limit=1, isolate_recompiles=True,
    )  # fmt: skip
    cache = MMKVCache(built.model.config)
    with torch.no_grad():
        out = compiled(**built.inputs, past_key_values=cache, use_cache=True)
        assert cache.is_compressed()
        with pytest.raises(RuntimeError, match="outside such a graph: Dynamo ran the call eagerly.*isolate_recompiles"):
            compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)

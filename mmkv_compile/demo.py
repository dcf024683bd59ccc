"""``mmkv demo``: the main job on an embedded default, a tiny LLaVA built from config classes.

It prints the attention sites the passes find, the KV bytes before and after compression, whether the
full budget reproduces the uncompiled tokens, and decode tokens/s compressed vs uncompressed, all
measured in this run.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import mmkv_compile
from mmkv_compile.cache import MMKVCache
from mmkv_compile.compat import output_cache
from mmkv_compile.methods import compresses


@dataclass
class DemoSettings:
    method: str = "snapkv"
    budget: float | int = 0.25
    images: int = 4
    new_tokens: int = 32
    repeats: int = 3
    inductor: bool = True
    seed: int = 0


def demo_model(images: int, seed: int = 0):
    """A LLaVA with a 4-layer GQA Llama decoder and ``images`` 14x14-patch images in its prompt."""
    from mmkv_compile.testing.tiny import tiny_llava

    tiny = tiny_llava(layers=4, hidden=256, heads=8, kv_heads=2, image_size=112, patch=8, text_before=12,
                      text_between=8, text_after=24, images=images, vision_hidden=64, vision_layers=2,
                      vocab=1024, seed=seed)  # fmt: skip
    return tiny.model, tiny.inputs


def _kv_bytes(cache) -> int:
    """Keys and values held by any transformers cache."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def _generate(model, inputs, new_tokens: int):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              return_dict_in_generate=True)  # fmt: skip


def _decode_rate(model, inputs, new_tokens: int, repeats: int, bar) -> float:
    """Decode tokens/s: (N - 1) tokens over the time a N-token generate takes beyond a 1-token one."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        _generate(model, inputs, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        _generate(model, inputs, new_tokens)
        total = time.perf_counter() - start
        rates.append((new_tokens - 1) / max(total - prefill, 1e-9))
        bar.update(1)
    return statistics.median(rates)


def run_demo(settings: DemoSettings, out=print) -> dict:
    """Run the demo; return what it printed as data."""
    torch.manual_seed(settings.seed)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break notices from the model's own code are noise here
    stages = 4 + 3 * settings.repeats
    bar = tqdm(total=stages, desc="mmkv demo", unit="step", leave=False)
    bar.set_postfix_str("building the model")
    model, inputs = demo_model(settings.images, settings.seed)
    prompt_len = inputs["input_ids"].shape[1]
    bar.update(1)

    bar.set_postfix_str("finding attention sites")
    report = mmkv_compile.explain(model, settings.method, settings.budget, **inputs)
    bar.update(1)

    bar.set_postfix_str("uncompiled reference")
    reference = _generate(model, inputs, settings.new_tokens)
    full_bytes = _kv_bytes(output_cache(reference))
    bar.update(1)

    bar.set_postfix_str("compiling (full budget and compressed)")
    full_model, _ = demo_model(settings.images, settings.seed)
    mmkv_compile.compile(full_model, "full", inductor=settings.inductor)
    full_run = _generate(full_model, inputs, settings.new_tokens)
    compressed_model, _ = demo_model(settings.images, settings.seed)
    mmkv_compile.compile(compressed_model, settings.method, settings.budget, inductor=settings.inductor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed_run = _generate(compressed_model, inputs, settings.new_tokens)
    bar.update(1)
    cache = output_cache(compressed_run)
    if compresses(settings.method) and not (isinstance(cache, MMKVCache) and cache.is_compressed()):
        bar.close()
        reasons = [str(w.message) for w in caught if issubclass(w.category, mmkv_compile.MMKVWarning)]
        out(f"mmkv demo: {settings.method} at budget {settings.budget} compressed nothing on this prompt "
            f"({prompt_len} tokens).")  # fmt: skip
        for reason in reasons + report.warnings or ["no warning was given (please report this)"]:
            out(f"  {reason}")
        return {"prompt_tokens": prompt_len, "compressed": False, "reasons": reasons,
                "full_budget_reproduces_tokens": None}  # fmt: skip

    bar.set_postfix_str("timing decode")
    rate_uncompiled = _decode_rate(model, inputs, settings.new_tokens, settings.repeats, bar)
    rate_full = _decode_rate(full_model, inputs, settings.new_tokens, settings.repeats, bar)
    rate_compressed = _decode_rate(compressed_model, inputs, settings.new_tokens, settings.repeats, bar)
    bar.close()

    sizes = cache.nbytes()
    identical = torch.equal(full_run.sequences, reference.sequences)
    lm_sites = [s for phase, s in report.sites() if phase == "prefill" and s.cache == "mmkv"]
    other_sites = [s for phase, s in report.sites() if phase in ("prefill", "no mmkv cache") and s.cache != "mmkv"]
    result = {
        "compressed": compresses(settings.method),
        "prompt_tokens": prompt_len,
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_index).sum()),
        "sites_rewritten": sum(s.evicts for s in lm_sites),
        "sites_found": len(lm_sites) + len(other_sites),
        "kv_bytes_full": full_bytes,
        "kv_bytes_compressed": sizes["kv"],
        "metadata_bytes": sizes["metadata"],
        "full_budget_reproduces_tokens": identical,
        "decode_tokens_per_s": {
            "uncompiled": rate_uncompiled,
            "mmkv_full": rate_full,
            "mmkv_compressed": rate_compressed,
        },
    }
    out(f"mmkv demo: tiny LLaVA (random weights), {prompt_len}-token prompt with {result['image_tokens']} image tokens")
    out(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"inductor={'on' if settings.inductor else 'off'}")  # fmt: skip
    out(
        f"method={settings.method} budget={settings.budget}, {settings.new_tokens} new tokens, medians of {settings.repeats}"
    )
    out("")
    out("attention sites (prefill graphs):")
    for site in lm_sites + other_sites:
        what = "rewritten" if site.evicts else f"left alone: {site.reason}"
        layer = "-" if site.layer is None else site.layer
        out(f"  layer {layer}: {site.kind}, cache={site.cache}, gqa groups={site.gqa_groups}, {what}")
    out("")
    saved = 1 - sizes["kv"] / full_bytes
    out(f"KV bytes after {settings.new_tokens} tokens: full {full_bytes:,} -> compressed {sizes['kv']:,} "
        f"({saved:.0%} less; label/position/score metadata {sizes['metadata']:,} bytes)")  # fmt: skip
    out(f"logical length {cache.get_seq_length()}, physical length {cache.get_physical_length()} slots per layer")
    out(f"full budget reproduces the uncompiled tokens: {'yes' if identical else 'NO'}")
    out("")
    out("decode tokens/s (median)       tok/s   vs uncompiled")
    for name, rate in result["decode_tokens_per_s"].items():
        out(f"  {name:<26} {rate:8.1f}   {rate / rate_uncompiled:5.2f}x")
    return result

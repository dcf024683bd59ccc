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
from dataclasses import dataclass

import torch
from tqdm import tqdm

import mmkv_compile
from mmkv_compile.cache import MMKVCache


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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    image_token, vocab, image_size, patch = 1000, 1024, 112, 8
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=64)  # fmt: skip
    text = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = 0
    per_image = (image_size // patch) ** 2
    pieces = [torch.randint(3, 900, (1, 12))]
    for _ in range(images):
        pieces += [torch.full((1, per_image), image_token), torch.randint(3, 900, (1, 8))]
    pieces.append(torch.randint(3, 900, (1, 24)))
    ids = torch.cat(pieces, dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(images, 3, image_size, image_size)}  # fmt: skip
    return model, inputs


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
    full_bytes = reference.past_key_values.layers[0].keys.nbytes * 2 * len(reference.past_key_values.layers)
    bar.update(1)

    bar.set_postfix_str("compiling (full budget and compressed)")
    full_model, _ = demo_model(settings.images, settings.seed)
    mmkv_compile.compile(full_model, "full", inductor=settings.inductor)
    full_run = _generate(full_model, inputs, settings.new_tokens)
    compressed_model, _ = demo_model(settings.images, settings.seed)
    mmkv_compile.compile(compressed_model, settings.method, settings.budget, inductor=settings.inductor)
    compressed_run = _generate(compressed_model, inputs, settings.new_tokens)
    bar.update(1)

    bar.set_postfix_str("timing decode")
    rate_uncompiled = _decode_rate(model, inputs, settings.new_tokens, settings.repeats, bar)
    rate_full = _decode_rate(full_model, inputs, settings.new_tokens, settings.repeats, bar)
    rate_compressed = _decode_rate(compressed_model, inputs, settings.new_tokens, settings.repeats, bar)
    bar.close()

    cache: MMKVCache = compressed_run.past_key_values
    sizes = cache.nbytes()
    identical = torch.equal(full_run.sequences, reference.sequences)
    lm_sites = [s for phase, s in report.sites() if phase == "prefill" and s.cache == "mmkv"]
    other_sites = [s for phase, s in report.sites() if phase in ("prefill", "no mmkv cache") and s.cache != "mmkv"]
    result = {
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

"""Compress a tiny LLaVA with several methods and compare what each keeps against the full cache.

    python examples/compare_methods.py [--budget 0.25] [--methods snapkv madakv retentivekv hae]

The model is built from transformers config classes with random weights (no download), so the tokens it
generates are meaningless; what matters is how far each method's logits move from the full cache's, and
how much memory its cache holds.
"""

from __future__ import annotations

import argparse

import torch

import mmkv_compile
from mmkv_compile.compat import output_cache
from mmkv_compile.testing.tiny import tiny_llava


def generate(model, inputs: dict, steps: int):
    """Greedy decoding; returns (per-step logits [B, steps, V], the cache)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    return torch.stack(out.logits, dim=1), output_cache(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["snapkv", "look_m", "meda", "madakv", "retentivekv", "hae"])
    args = parser.parse_args()

    tiny = tiny_llava(image_size=56, patch=4)  # 196 image tokens
    full_logits, _ = generate(mmkv_compile.compile(tiny_llava(image_size=56, patch=4).model, "full", 1.0,
                                                   inductor=False), tiny.inputs, args.steps)  # fmt: skip
    print(f"prompt: {tiny.inputs['input_ids'].shape[1]} tokens, {tiny.num_image_tokens} of them image placeholders")
    print(f"{'method':<12} {'KV bytes':>10} {'layer 0 kept':>13} {'max |dlogit|':>13}")
    for method in args.methods:
        model = tiny_llava(image_size=56, patch=4).model
        logits, cache = generate(
            mmkv_compile.compile(model, method, args.budget, inductor=False), tiny.inputs, args.steps
        )
        kept = cache.get_physical_length() / cache.get_seq_length()
        drift = (logits - full_logits).abs().max().item()
        print(f"{method:<12} {cache.nbytes()['kv']:>10,} {kept:>13.1%} {drift:>13.4f}")


if __name__ == "__main__":
    main()

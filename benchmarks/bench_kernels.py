"""Time the Triton score-evict-merge against the PyTorch reference and against attention, on a CUDA GPU.

Shapes are one layer of an 8B model (32 query heads, 8 KV heads, head dim 128, bfloat16, random weights; the
model has 32 layers, each running the operator once per compression) at the prompt lengths given on the
command line. Everything below is measured side by side in one run and printed as markdown:

  (a) the operator on a prompt (SnapKV, H2O, LOOK-M's pivot merge) and one H2O decode step, next to the same
      layer's prefill attention (SDPA, causal, over the whole prompt) and the PyTorch reference operator;
      the per-layer signals of MEDA and VL-Cache likewise. Targets: SnapKV <= 3% of prefill, >= 5x reference.
  (b) the gather of the kept K/V rows and the merge stage, in GB/s next to a device-to-device copy of the
      same bytes. Target: >= 60% of the copy.
  (c) one decode step's attention (SDPA, 1 query) over the cache compressed to the budget vs the full cache.
      Target: >= 2.5x at budget 0.2.

    python benchmarks/bench_kernels.py                   # prompts of 4096, 8192 and 32768 tokens
    python benchmarks/bench_kernels.py 32768 --reps 50
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --smoke   # tiny shapes on CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

TARGET_PREFILL_SHARE = 0.03  # (a) the window-scored operator, as a share of the layer's prefill attention
TARGET_REFERENCE_SPEEDUP = 5.0  # (a) over the PyTorch reference
TARGET_COPY_SHARE = 0.60  # (b) of a device-to-device copy's bandwidth
TARGET_DECODE_SPEEDUP = 2.5  # (c) decode attention over the compressed cache vs the full one


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lengths", nargs="*", type=int, default=None, help="prompt lengths (default 4096 8192 32768)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt kept")
    parser.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20, help="timed runs of the Triton kernels (median reported)")
    parser.add_argument("--ref-reps", type=int, default=5, help="timed runs of the (slow) reference")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (a test that the script runs)"
    )
    args = parser.parse_args(argv)
    args.heads, args.kv_heads, args.head_dim, args.dtype = 32, 8, 128, torch.bfloat16
    if args.smoke:  # the interpreter runs every program in Python: a few tiles per kernel
        args.heads, args.kv_heads, args.head_dim = 4, 2, 16
        args.lengths = args.lengths or [40]
        args.warmup, args.reps, args.ref_reps, args.window = 0, 1, 1, 4
    args.lengths = args.lengths or [4096, 8192, 32768]
    return args


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds: CUDA events on the GPU, ``perf_counter`` on CPU (smoke)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
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


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _out_of_memory() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,) if torch.cuda.is_available() else ()


def make_state(args: argparse.Namespace, seq: int, num_new: int, device: torch.device, image: bool = False) -> dict:
    """A cache of ``seq`` valid slots whose last ``num_new`` are this step's queries. With ``image`` the middle
    60% of the prompt is image tokens (label 1) between text, as a multimodal prompt (LOOK-M, MEDA, VL-Cache)."""
    gen = torch.Generator(device=device).manual_seed(seq)
    batch, heads, kv_heads, dim = args.batch, args.heads, args.kv_heads, args.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=args.dtype)

    labels = torch.zeros(batch, kv_heads, seq, dtype=torch.int8, device=device)
    if image:
        labels[..., seq // 5 : 4 * seq // 5] = 1
    from mmkv_compile.state import SlotState

    shape = (batch, kv_heads, seq)
    return dict(
        query=randn(batch, heads, num_new, dim),
        state=SlotState(
            keys=randn(batch, kv_heads, seq, dim),
            values=randn(batch, kv_heads, seq, dim),
            labels=labels,
            positions=torch.arange(seq, device=device).expand(shape).contiguous(),
            scores=torch.rand(shape, generator=gen, device=device),
            weights=torch.ones(shape, device=device),  # every slot stands for one token
            parked=torch.zeros(shape, dtype=torch.bool, device=device),
        ),
    )


def prefill_attention_ms(args: argparse.Namespace, state: dict, device: torch.device) -> float:
    """The layer's own prefill attention: causal SDPA of every prompt query over the prompt.

    K/V are repeated to the query heads outside the timed region (as transformers' ``repeat_kv`` does), so
    SDPA can pick its flash kernel whatever its GQA support; only the attention itself is timed."""
    group = args.heads // args.kv_heads
    query = state["query"]
    keys = state["state"].keys.repeat_interleave(group, dim=1)
    values = state["state"].values.repeat_interleave(group, dim=1)
    return time_ms(
        lambda: F.scaled_dot_product_attention(query, keys, values, is_causal=True), args.warmup, args.reps, device
    )


def bench_operator(args: argparse.Namespace, device: torch.device) -> list[str]:
    """(a): the operator next to the layer's prefill attention and the reference."""
    from mmkv_compile.kernels import reference, triton_kernels
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import output_length

    rows = [
        "| prompt | case | slots in | prefill attention ms | reference ms | triton ms | triton % of prefill "
        "| speedup vs reference | equal to reference |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    snapkv = build_method("snapkv", window=args.window).policy(args.budget)
    h2o = build_method("h2o").policy(args.budget)
    look_m = build_method("look_m", merge="pivot").policy(args.budget)

    for length in args.lengths:
        prompt = make_state(args, length, length, device)
        prefill_ms = prefill_attention_ms(args, prompt, device)
        del prompt
        kept_after_prefill = output_length(h2o, length, length, True)  # the cache a decode step starts from
        cases = [
            ("snapkv prefill", snapkv, length, length, True, False),
            ("h2o prefill", h2o, length, length, True, False),
            ("look_m pivot-merge prefill", look_m, length, length, True, True),
            ("h2o decode step", h2o, kept_after_prefill + 1, 1, False, False),
        ]
        for name, policy, seq, num_new, prefill, image in cases:
            state = make_state(args, seq, num_new, device, image)
            call = (state["query"], state["state"], args.head_dim**-0.5, policy.to_string(), prefill)
            triton_ms = time_ms(lambda c=call: triton_kernels.score_evict_merge(*c), args.warmup, args.reps, device)
            got = triton_kernels.score_evict_merge(*call)
            share = f"{100 * triton_ms / prefill_ms:.2f}%" if prefill else "-"
            try:
                ref_ms = time_ms(lambda c=call: reference.score_evict_merge(*c), 1, args.ref_reps, device)
                want = reference.score_evict_merge(*call)
                equal = "kept positions yes" if torch.equal(got[3], want[3]) else "kept positions NO"
                ref_text, speedup = f"{ref_ms:.3f}", f"{ref_ms / triton_ms:.1f}x"
            except _out_of_memory():
                ref_text, speedup, equal = "out of memory", "-", "-"
            del state, got, call
            _free(device)
            rows.append(
                f"| {length} | {name} | {seq} | {prefill_ms:.3f} | {ref_text} | {triton_ms:.3f} | {share} "
                f"| {speedup} | {equal} |"
            )
        rows.extend(signal_rows(args, device, length, prefill_ms))
        _free(device)
    return rows


def signal_rows(args: argparse.Namespace, device: torch.device, length: int, prefill_ms: float) -> list[str]:
    """(a) continued: MEDA's and VL-Cache's per-layer signals (every prompt query's softmax, two passes)."""
    from mmkv_compile.kernels import layer_signals, triton_signals

    state = make_state(args, length, length, device, image=True)
    slots = state["state"]
    call = (state["query"], slots.keys, slots.labels, slots.positions, args.head_dim**-0.5)
    rows = []
    for signal in ("cross_modal", "density"):

        def triton_signal(s=signal):
            return layer_signals.row_means(triton_signals.layer_signal_sums(*call, s)).sum(-1).float()

        triton_ms = time_ms(triton_signal, args.warmup, args.reps, device)
        got = triton_signal()
        try:
            os.environ["MMKV_KERNEL"] = "reference"  # the torch version, even on CUDA tensors
            ref_ms = time_ms(lambda s=signal: layer_signals.layer_signal(*call, s), 1, args.ref_reps, device)
            want = layer_signals.layer_signal(*call, signal)[:, 0].float()  # (signal, live slots)
            diff = f"max abs diff {(got - want).abs().max().item():.1e}"
            ref_text, speedup = f"{ref_ms:.3f}", f"{ref_ms / triton_ms:.1f}x"
        except _out_of_memory():
            ref_text, speedup, diff = "out of memory", "-", "-"
        finally:
            os.environ.pop("MMKV_KERNEL", None)
        rows.append(
            f"| {length} | layer signal {signal} | {length} | {prefill_ms:.3f} | {ref_text} | {triton_ms:.3f} "
            f"| {100 * triton_ms / prefill_ms:.2f}% | {speedup} | {diff} |"
        )
    return rows


def bench_gather(args: argparse.Namespace, device: torch.device) -> list[str]:
    """(b): the gather and the merge stage against a copy of the same bytes."""
    rows = [
        "| prompt | stage | kept slots | triton ms | reference ms | copy ms | triton GB/s | copy GB/s | % of copy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in args.lengths:
        rows.append(gather_row(args, device, length))
        _free(device)
        rows.append(merge_row(args, device, length))
        _free(device)
    return rows


def copy_ms(args: argparse.Namespace, device: torch.device, num_bytes: int) -> float:
    """A device-to-device copy of ``num_bytes``: each byte read once and written once."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), args.warmup, args.reps, device)


def _bandwidth_row(length, stage, kept_len, triton_ms, ref_ms, copy, moved_bytes) -> str:
    triton_gbs, copy_gbs = moved_bytes / triton_ms / 1e6, moved_bytes / copy / 1e6
    return (
        f"| {length} | {stage} | {kept_len} | {triton_ms:.4f} | {ref_ms:.4f} | {copy:.4f} | {triton_gbs:.0f} "
        f"| {copy_gbs:.0f} | {100 * copy / triton_ms:.0f}% |"
    )


def _random_selection(args: argparse.Namespace, device: torch.device, length: int):
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import output_length

    kept_len = output_length(build_method("h2o").policy(args.budget), length, length, True)
    shape = (args.batch, args.kv_heads)
    slots = torch.rand(*shape, length, device=device).argsort(-1)[..., :kept_len].sort(-1).values
    kept = torch.ones(*shape, kept_len, dtype=torch.bool, device=device)
    return kept_len, slots, kept


def gather_row(args: argparse.Namespace, device: torch.device, length: int) -> str:
    """Gather a random budget-sized subset of a ``length``-slot cache (K/V plus the per-slot metadata)."""
    from mmkv_compile.kernels import reference, triton_kernels

    state = make_state(args, length, 1, device)
    kept_len, slots, kept = _random_selection(args, device, length)
    tensors = state["state"]
    gather_ms = time_ms(lambda: triton_kernels.gather_stage(tensors, slots, kept), args.warmup, args.reps, device)
    ref_ms = time_ms(lambda: reference.gather_stage(tensors, slots, kept), args.warmup, args.reps, device)
    # The copy moves the same K/V bytes (the per-slot metadata is not counted): read once, written once.
    kv_bytes = 2 * args.batch * args.kv_heads * kept_len * args.head_dim * tensors.keys.element_size()
    return _bandwidth_row(length, "gather", kept_len, gather_ms, ref_ms, copy_ms(args, device, kv_bytes), 2 * kv_bytes)


def merge_row(args: argparse.Namespace, device: torch.device, length: int) -> str:
    """The merge stage (assignment and weighted sums) of a budget-sized kept set: Triton assignment vs the
    reference's. Bytes counted: every slot's K/V read once, the kept K/V read once and written once."""
    from mmkv_compile.kernels import reference, triton_kernels
    from mmkv_compile.methods import build_method

    policy = build_method("look_m", merge="pivot").policy(args.budget)
    state = make_state(args, length, 1, device)
    kept_len, slots, kept = _random_selection(args, device, length)
    full = state["state"]
    kept_state = reference.gather_stage(full, slots, kept)
    evicted = ~reference.survivors(full.labels, slots, kept)

    def run(nearest):
        return reference.merge_stage(policy, full, evicted, kept, kept_state, nearest)

    triton_ms = time_ms(lambda: run(triton_kernels.nearest_kept), args.warmup, args.reps, device)
    ref_ms = time_ms(lambda: run(reference.nearest_kept), 1, args.ref_reps, device)
    row_bytes = args.batch * args.kv_heads * args.head_dim * full.keys.element_size() * 2  # K and V
    moved = row_bytes * (length + 2 * kept_len)
    return _bandwidth_row(length, "merge", kept_len, triton_ms, ref_ms, copy_ms(args, device, moved // 2), moved)


def bench_decode(args: argparse.Namespace, device: torch.device) -> list[str]:
    """(c): one decode step's attention over the compressed cache vs the full one."""
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import output_length

    rows = [
        "| prompt | full cache slots | compressed slots | full ms | compressed ms | speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    policy = build_method("snapkv", window=args.window).policy(args.budget)
    for length in args.lengths:
        kept_len = output_length(policy, length, length, True)
        full_ms, kept_ms = decode_times(args, device, length, kept_len)
        rows.append(f"| {length} | {length} | {kept_len} | {full_ms:.4f} | {kept_ms:.4f} | {full_ms / kept_ms:.2f}x |")
        _free(device)
    return rows


def decode_times(args: argparse.Namespace, device: torch.device, length: int, kept_len: int) -> tuple[float, float]:
    """(full ms, compressed ms) of one query's attention over ``length`` slots and over ``kept_len`` of them."""
    state = make_state(args, length, 1, device)
    query, full_k, full_v = state["query"], state["state"].keys, state["state"].values
    # Compressed slots are contiguous copies, as the operator returns them; every row is full (no mask).
    kept_k, kept_v = full_k[:, :, :kept_len].clone(), full_v[:, :, :kept_len].clone()

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, k, v, enable_gqa=True)

    full_ms = time_ms(lambda: attend(full_k, full_v), args.warmup, args.reps, device)
    kept_ms = time_ms(lambda: attend(kept_k, kept_v), args.warmup, args.reps, device)
    return full_ms, kept_ms


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown report; returns the exit status."""
    args = parse_args(argv)
    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 before triton is imported.", file=sys.stderr)
            return 1
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, below
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine.", file=sys.stderr)
        return 1
    else:
        device = torch.device("cuda")
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton (pip install 'mmkv-compile[triton]').", file=sys.stderr)
        return 1
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench_kernels.py", *argv])])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter (smoke run)"
    reps = f"median of {args.reps} runs ({args.ref_reps} for the references) after {args.warmup} warmup runs"
    lines = [
        "## score-evict-merge: Triton vs reference vs attention",
        "",
        f"- device: {name}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        f"- one layer: batch {args.batch}, {args.heads} query heads, {args.kv_heads} KV heads, head dim "
        f"{args.head_dim}, {str(args.dtype).removeprefix('torch.')}, random weights, budget {args.budget}; {reps}",
        *(["- SMOKE RUN: tiny shapes through the Triton interpreter on CPU; the timings mean nothing"] * args.smoke),
        "",
        f"(a) The operator vs the layer's prefill attention (causal SDPA over the prompt) and the reference. "
        f"Targets for SnapKV: <= {100 * TARGET_PREFILL_SHARE:.0f}% of prefill, >= {TARGET_REFERENCE_SPEEDUP:.0f}x "
        f"the reference.",
        "",
        *bench_operator(args, device),
        "",
        f"(b) Gather of the kept K/V rows (plus labels, positions, scores, weights) and the merge stage vs a "
        f"device-to-device copy of the same K/V bytes (GB/s counts bytes read plus written). "
        f"Target: >= {100 * TARGET_COPY_SHARE:.0f}% of the copy.",
        "",
        *bench_gather(args, device),
        "",
        f"(c) One decode step's attention (SDPA, 1 query) over the cache compressed to {args.budget} vs the full "
        f"cache. Target: >= {TARGET_DECODE_SPEEDUP}x.",
        "",
        *bench_decode(args, device),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

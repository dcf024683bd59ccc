"""``mmkv bench speed --warm-compile``: compile time cold, in the bench's process, and warm, in a second process.

With ``--warm-compile`` the bench's process compiles into an empty Inductor cache folder of its own (so its
``compile s`` is cold whatever ran before), and after each compiled cell a second Python process sets the same
variant up on a fresh model, runs one ``generate`` of the same prompt, and reports its own compile time: the
time a user's next process pays once the caches hold the graphs (Dynamo traces again; AOTAutograd and Inductor
read what the first process wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

from mmkv_compile.bench import variants
from mmkv_compile.bench.models import TinyScale, load_bench_model

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def empty_compile_caches():
    """Point Inductor's (and Triton's) on-disk caches at a new empty folder for the block; child processes
    inherit it through the environment."""
    before = {name: os.environ.get(name) for name in CACHE_VARIABLES}
    with tempfile.TemporaryDirectory(prefix="mmkv-bench-compile-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
        try:
            yield folder
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def warm_compile_s(settings, variant: variants.Variant, context: int) -> float:
    """Compile seconds of ``variant`` on a ``context``-token prompt in a second process (see the module)."""
    job = {
        "model": settings.model, "scale": asdict(settings.scale), "device": settings.device, "dtype": settings.dtype,
        "seed": settings.seed, "batch": settings.batch, "new_tokens": settings.new_tokens, "context": context,
        "variant": asdict(variant),
    }  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "mmkv_compile.bench.warm", json.dumps(job)], capture_output=True,
                            text=True, env=os.environ.copy())  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the warm-compile process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["compile_s"]


def _main(job: dict) -> dict:
    import torch

    from mmkv_compile.bench.speed import compile_stats, timed_generate

    torch.manual_seed(job["seed"])
    bench = load_bench_model(job["model"], TinyScale(**job["scale"]), job["device"], getattr(torch, job["dtype"]))
    variant = variants.Variant(**job["variant"])
    inputs = bench.batch(bench.prompt, job["context"], job["batch"])
    model = bench.fresh()
    run_inside = variants.setup(variant, model, inputs["input_ids"].shape[-1])
    before = compile_stats()
    timed_generate(model, inputs, job["new_tokens"], run_inside)
    return {"compile_s": compile_stats()["compile_s"] - before["compile_s"]}


if __name__ == "__main__":
    print(json.dumps(_main(json.loads(sys.argv[1]))))

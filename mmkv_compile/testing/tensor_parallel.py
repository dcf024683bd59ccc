"""Every method under transformers' tensor parallelism against the one-process run, on each rank.

    torchrun --nproc-per-node 2 -m mmkv_compile.testing.tensor_parallel --out DIR [--methods ...] [--inductor]

Each rank loads a tiny text decoder and a tiny LLaVA from one checkpoint whole, run by
``mmkv_compile.apply_eagerly`` (the one-process reference, computed on every rank), and with ``tp_plan="auto"``
(its KV heads sharded over the ranks), run by each route: eagerly (the same operators and collectives, every
method) and compiled with ``mmkv_compile.compile`` (the methods whose decisions reduce over heads, and snapkv,
which does not: compiling a tensor-parallel model is slow, its DTensor weights are traced). All generate
greedily.
The rank then compares its cache with the slice of the
one-process cache that holds its KV heads, layer by layer, and writes what it found to ``DIR/rank{r}.json``
(``tests/test_tensor_parallel.py`` reads and asserts it). A tensor-parallel model is loaded afresh for every
method: a deep copy of one breaks its process group.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import mmkv_compile
from mmkv_compile.cache import MMKVCache, MMKVLayer
from mmkv_compile.compat import output_cache
from mmkv_compile.methods import METHODS, build_method
from mmkv_compile.testing.tiny import tiny_llama, tiny_llava

NEW_TOKENS = 6
BUDGET = 0.3
# 4 KV heads (8 query heads) so each of 2 ranks holds 2: reductions inside a rank and across ranks both count
SHAPES = dict(hidden=64, heads=8, kv_heads=4, layers=3)


def build_models(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Save the two tiny models under ``root`` (rank 0) and return their prompts (every rank, same seeds)."""
    text = tiny_llama(prompt_len=120, **SHAPES)
    vision = tiny_llava(images=3, image_size=32, patch=8, text_before=8, text_between=4, text_after=24, **SHAPES)
    if dist.get_rank() == 0:
        text.model.save_pretrained(root / "text")
        vision.model.save_pretrained(root / "llava")
    dist.barrier()
    return {"text": text.inputs, "llava": vision.inputs}


def load(path: Path, tensor_parallel: bool) -> torch.nn.Module:
    """The checkpoint, sharded over the ranks or whole."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if config.model_type == "llama" else AutoModelForImageTextToText
    extra = {"tp_plan": "auto"} if tensor_parallel else {}
    model = auto.from_pretrained(path, dtype=torch.float32, **extra).eval()
    model.generation_config.pad_token_id = 0
    return model


def run(model: torch.nn.Module, inputs: dict, method: str, inductor: bool | None) -> tuple[list[int], MMKVCache]:
    """Greedy tokens and the final cache: compiled (``inductor`` True or False) or eagerly (None: the operators
    called from the attention functions, the reference the compiled graphs are tested against)."""
    if inductor is None:
        mmkv_compile.apply_eagerly(model, method, BUDGET)
    else:
        mmkv_compile.compile(model, method, BUDGET, inductor=inductor)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), output_cache(out)


def compare(whole: MMKVCache, sharded: MMKVCache) -> dict:
    """This rank's cache against the one-process cache's slice of its KV heads, layer by layer."""
    rank = dist.get_rank()
    layers = []
    for full, part in zip(whole.layers, sharded.layers, strict=True):
        if not isinstance(full, MMKVLayer):
            continue
        heads = part.keys.shape[1]
        mine = slice(rank * heads, (rank + 1) * heads)
        same_length = full.keys.shape[2] == part.keys.shape[2]
        layers.append(
            {
                "heads": [heads, full.keys.shape[1]],
                "slots": [part.keys.shape[2], full.keys.shape[2]],
                "positions_equal": same_length and torch.equal(full.positions[:, mine], part.positions),
                "labels_equal": same_length and torch.equal(full.labels[:, mine], part.labels),
                "values_close": same_length and torch.allclose(full.values[:, mine], part.values, atol=1e-5),
                "kv_bytes": [part.nbytes()["kv"], full.nbytes()["kv"]],
                "logical": part.get_seq_length(),
            }
        )
    return {"layers": layers}


def communicating_methods() -> list[str]:
    """The methods whose decisions reduce over a layer's heads, so over ranks (``Policy.reduces_over_heads``)."""
    return [name for name in sorted(METHODS) if build_method(name).policy(BUDGET).reduces_over_heads]


def graph_breaks() -> int:
    """Graph breaks Dynamo has counted in this process so far."""
    return sum(counters["graph_break"].values())


def model_graph_breaks(path: Path, inputs: dict, inductor: bool) -> int:
    """The graph breaks of the model itself, compiled whole (LLaVA's own placeholder check breaks its graph):
    what a tensor-parallel compile may have, and no more."""
    before = graph_breaks()
    run(load(path, False), inputs, "snapkv", inductor)
    return graph_breaks() - before


def check(path: Path, inputs: dict, method: str, routes: list[str], inductor: bool) -> dict:
    """One method on one model: the one-process reference, then this rank's shard by each route."""
    tokens_whole, whole = run(load(path, False), inputs, method, None)
    found = {}
    for route in routes:
        start, breaks = time.perf_counter(), graph_breaks()
        tokens, sharded = run(load(path, True), inputs, method, inductor if route == "compiled" else None)
        found[route] = compare(whole, sharded) | {
            "tokens": [tokens, tokens_whole],
            "graph_breaks": graph_breaks() - breaks,
            "seconds": time.perf_counter() - start,
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS), help="run by the eager route")
    parser.add_argument(
        "--compiled",
        nargs="*",
        default=None,
        help="also run compiled (default: the methods that reduce over heads, and snapkv)",
    )
    parser.add_argument("--models", nargs="*", default=["text", "llava"])
    parser.add_argument("--inductor", action="store_true")
    args = parser.parse_args()
    compiled = set(communicating_methods() + ["snapkv"] if args.compiled is None else args.compiled)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        shared = [scratch if rank == 0 else None]
        dist.broadcast_object_list(shared)
        prompts = build_models(Path(shared[0]))
        for name in args.models:
            path = Path(shared[0]) / name
            own_breaks = model_graph_breaks(path, prompts[name], args.inductor) if compiled else 0
            for method in sorted(set(args.methods) | compiled):
                routes = ["eager"] * (method in args.methods) + ["compiled"] * (method in compiled)
                entry = {"model": name, "method": method, "model_graph_breaks": own_breaks}
                try:
                    entry["routes"] = check(path, prompts[name], method, routes, args.inductor)
                except Exception as exc:  # reported per method, so one failure does not hide the others
                    entry["error"] = f"{type(exc).__name__}: {exc}"
                results.append(entry)
        dist.barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

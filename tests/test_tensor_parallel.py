"""Tensor parallelism (transformers' ``tp_plan="auto"``): every method, on 2 gloo processes, keeps on each rank
exactly the slots the one-process run keeps in that rank's KV heads, and generates the same tokens.

The run itself is ``mmkv_compile/testing/tensor_parallel.py`` under ``torchrun`` (one subprocess for the
module); the tests read what each rank found. Errors that need no second process are tested in this one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import mmkv_compile
from mmkv_compile.cache import MMKVCache
from mmkv_compile.methods import METHODS, compresses
from mmkv_compile.testing.tensor_parallel import communicating_methods
from mmkv_compile.testing.tiny import tiny_llama

WORLD = 2
MODELS = ("text", "llava")
RUN_SECONDS = 1500

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Per rank, the driver's entries keyed by (model, method)."""
    out = tmp_path_factory.mktemp("tensor_parallel")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               "-m", "mmkv_compile.testing.tensor_parallel", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_SECONDS)
    assert done.returncode == 0, done.stderr[-4000:]
    found = []
    for rank in range(WORLD):
        entries = json.loads((out / f"rank{rank}.json").read_text())
        found.append({(e["model"], e["method"]): e for e in entries})
    return found


COMPILED = sorted(set(communicating_methods() + ["snapkv"]))  # the driver's default
CASES = [(method, "eager") for method in sorted(METHODS)] + [(method, "compiled") for method in COMPILED]


def test_the_methods_that_need_collectives_are_the_ones_that_reduce_over_heads():
    assert communicating_methods() == ["adakv", "hae", "madakv", "meda", "tova", "vl_cache"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method,route", CASES)
def test_each_rank_keeps_the_one_process_slots_of_its_heads(ranks, model, method, route):
    for rank, entries in enumerate(ranks):
        entry = entries[(model, method)]
        assert "error" not in entry, f"rank {rank}: {entry.get('error')}"
        found = entry["routes"][route]
        tokens_tp, tokens_whole = found["tokens"]
        assert tokens_tp == tokens_whole, f"rank {rank}: tokens differ"
        for layer, kept in enumerate(found["layers"]):
            where = f"rank {rank}, layer {layer}"
            local, total = kept["heads"]
            assert local * WORLD == total, f"{where}: holds {local} of {total} KV heads"
            assert kept["slots"][0] == kept["slots"][1], f"{where}: slots {kept['slots']}"
            assert kept["positions_equal"] and kept["labels_equal"], f"{where}: kept other slots"
            assert kept["values_close"], f"{where}: values differ"
            kv_rank, kv_whole = kept["kv_bytes"]
            assert kv_rank * WORLD == kv_whole, f"{where}: {kv_rank} bytes is not 1/{WORLD} of {kv_whole}"
            if compresses(method):
                assert kept["slots"][0] < kept["logical"], f"{where}: nothing evicted"
        own = entry["model_graph_breaks"] if route == "compiled" else 0
        assert found["graph_breaks"] == own, f"rank {rank}: {found['graph_breaks']} graph breaks, the model's own {own}"


class _Group:
    """What head_group reads of a process group."""

    def __init__(self, size: int) -> None:
        self._size, self.group_name = size, "tp-stub"

    def size(self) -> int:
        return self._size


class _Mesh:
    """What head_group reads of transformers' device mesh: a 1-D mesh (transformers 5.2's shape)."""

    mesh_dim_names = None

    def __init__(self, size: int) -> None:
        self.group = _Group(size)

    def get_group(self) -> _Group:
        return self.group


def _sharded(world: int) -> torch.nn.Module:
    """A tiny Llama (2 KV heads) that says it is split over ``world`` ranks, as transformers marks a TP model."""
    model = tiny_llama().model
    model._tp_size, model._device_mesh = world, _Mesh(world)
    return model


def test_kv_heads_that_do_not_divide_over_the_ranks_fail_before_compiling():
    model = _sharded(3)
    with pytest.raises(ValueError, match="KV heads to divide evenly.*has 2"):
        mmkv_compile.compile(model, "snapkv", 0.5, inductor=False)
    assert "forward" not in model.__dict__  # nothing was compiled


def test_a_cache_built_without_the_head_group_is_refused():
    tiny = tiny_llama()
    model = tiny.model
    model._tp_size, model._device_mesh = WORLD, _Mesh(WORLD)
    mmkv_compile.apply_eagerly(model, "tova", 0.5)
    with pytest.raises(ValueError, match="tensor parallelism.*head_group"):
        model(**tiny.inputs, past_key_values=MMKVCache(model.config))

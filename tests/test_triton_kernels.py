"""The Triton score-evict-merge against the PyTorch reference (the spec).

Without a GPU the kernels run under the Triton interpreter. ``TRITON_INTERPRET`` must be set before triton is
imported, so every interpreted case runs in one subprocess (this file run as a script with ``--worker``); each
case reports back as one JSON line and is asserted by its own parametrized test. Inputs are fresh random
tensors each run; a failure prints the seed (rerun with ``MMKV_TEST_SEED=<seed>``). Every buffer a kernel fills
starts poisoned (NaN, or 123 for integers), so an element a kernel forgets to write fails the comparison.

Covered: the whole operator (``run_case``), the scoring kernels alone (``check_column_sums``), the merge
assignment (``check_nearest``), the per-layer signals (``check_signal``), the dispatch through ``torch.ops.mmkv``
with ``MMKV_KERNEL=triton`` (``via_ops``), and ``benchmarks/bench_kernels.py --smoke``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# name -> case parameters. Sizes are deliberately not multiples of the interpreter's tiles (16 keys, 8 rows).
CASES: dict[str, dict] = {
    "snapkv_g1_d8": dict(method="snapkv", options={"window": 4}, budget=0.5, group=1, seq=37, dim=8),
    "snapkv_g2_d16_strided_query": dict(
        method="snapkv", options={"window": 4}, budget=0.5, group=2, seq=53, dim=16, strided_query=True
    ),
    "snapkv_g4_d32": dict(method="snapkv", options={"window": 4}, budget=0.5, group=4, seq=70, dim=32),
    "snapkv_g2_d64": dict(method="snapkv", options={"window": 4}, budget=0.5, group=2, seq=29, dim=64),
    "snapkv_g1_d128": dict(method="snapkv", options={"window": 4}, budget=0.5, group=1, seq=23, dim=128),
    "snapkv_max_reduce_chunked": dict(
        method="snapkv",
        options={"window": 11, "group_reduce": "max", "pool": "max"},
        budget=0.4,
        group=4,
        seq=45,
        dim=16,
        query_chunk=4,
    ),
    "snapkv_fp16": dict(method="snapkv", options={"window": 4}, budget=0.5, group=2, seq=41, dim=16, dtype="float16"),
    "snapkv_bf16": dict(method="snapkv", options={"window": 4}, budget=0.5, group=4, seq=41, dim=16, dtype="bfloat16"),
    "h2o_prefill_g2": dict(method="h2o", budget=0.5, group=2, seq=45, dim=16),
    "h2o_prefill_empty_row": dict(method="h2o", budget=0.3, group=1, seq=33, dim=8, pad="all"),
    "h2o_decode_1": dict(method="h2o", budget=0.5, group=2, seq=50, dim=16, num_new=1, prefill=False),
    "h2o_decode_3_bf16": dict(
        method="h2o", budget=0.5, group=4, seq=47, dim=16, num_new=3, prefill=False, dtype="bfloat16"
    ),
    "h2o_decode_int_budget": dict(method="h2o", budget=20, group=2, seq=43, dim=24, num_new=2, prefill=False),
    "streaming_llm_prefill": dict(method="streaming_llm", budget=10, group=2, seq=31, dim=16),
    "streaming_llm_decode": dict(method="streaming_llm", budget=10, group=2, seq=11, dim=16, num_new=1, prefill=False),
    "text_prior_mixed_labels": dict(
        method="text_prior", options={"window": 4}, budget=0.5, group=2, seq=60, dim=16, label_mix=True
    ),
    "full_keeps_everything": dict(method="full", budget=1.0, group=1, seq=19, dim=8),
    "pyramidkv_layer_schedule": dict(
        method="pyramidkv", options={"window": 4}, budget=0.5, group=2, seq=40, dim=16, layer=2, num_layers=3
    ),
    "adakv_per_head_budgets": dict(method="adakv", options={"window": 4}, budget=0.4, group=2, seq=45, dim=16),
    "tova_shared_across_heads": dict(method="tova", budget=12, group=2, seq=30, dim=16),
    "look_m_pivot_merge": dict(method="look_m", budget=0.3, group=2, seq=44, dim=16, label_mix=True),
    "look_m_avg_merge_bf16": dict(
        method="look_m", options={"merge": "avg"}, budget=0.3, group=2, seq=37, dim=16, label_mix=True, dtype="bfloat16"
    ),
    "tova_decode": dict(method="tova", budget=12, group=2, seq=13, dim=16, num_new=1, prefill=False),
    "dispatch_through_torch_ops": dict(
        method="snapkv", options={"window": 4}, budget=0.5, group=2, seq=33, dim=16, via_ops=True
    ),
    "column_sums_splits_mean": dict(kind="column_sums", group=2, seq=61, dim=16, num_new=61, reduce="mean"),
    "column_sums_splits_max": dict(kind="column_sums", group=4, seq=35, dim=8, num_new=9, reduce="max"),
    "column_sums_sliding_window": dict(
        kind="column_sums", group=2, seq=53, dim=16, num_new=53, reduce="mean", attention_window=9
    ),  # fmt: skip
    # Merge assignment alone: kept sets not multiples of the 16-slot tiles, duplicate kept keys (ties), zero
    # keys, a row and KV head with nothing kept.
    "nearest_fp32_d24": dict(kind="nearest", group=1, seq=45, kept_len=21, dim=24),
    "nearest_bf16_d16": dict(kind="nearest", group=1, seq=37, kept_len=35, dim=16, dtype="bfloat16"),
    "nearest_fp16_d128": dict(kind="nearest", group=1, seq=19, kept_len=5, dim=128, dtype="float16"),
    # Merging policies through the whole operator (nearest_kept in Triton, the rest shared).
    "look_m_weighted_merge": dict(
        method="look_m",
        options={"merge": "weighted"},
        budget=0.3,
        group=2,
        seq=39,
        dim=16,
        label_mix=True,
        exact_kv=False,
    ),
    "look_m_pivot_via_ops": dict(
        method="look_m", options={"merge": "pivot"}, budget=0.5, group=2, seq=35, dim=16, label_mix=True, via_ops=True
    ),
    "meda_layer_budgets_via_ops": dict(
        method="meda", budget=0.4, group=2, seq=41, dim=16, label_mix=True, via_ops=True, layer_budgets=[12, 24]
    ),
    "meda_layer_budgets_empty_row": dict(
        method="meda", budget=0.4, group=1, seq=26, dim=8, label_mix=True, pad="all", layer_budgets=[13, 5]
    ),
    # Budgets allocated elsewhere in the graph (MadaKV's per-layer counts, HAE's broadcast positions).
    "madakv_layer_budgets": dict(
        method="madakv",
        options={"window": 4},
        budget=0.5,
        group=2,
        seq=38,
        dim=16,
        label_mix=True,
        layer_budgets=[19, 3],
    ),  # fmt: skip
    # A sliding-window layer: windowed attention scores, only the slots the next query can see kept.
    "snapkv_sliding_window": dict(
        method="snapkv", options={"window": 6}, budget=0.5, group=2, seq=47, dim=16, attention_window=20
    ),  # fmt: skip
    "h2o_decode_sliding_window": dict(
        method="h2o", budget=0.5, group=2, seq=40, dim=16, num_new=1, prefill=False, attention_window=16
    ),  # fmt: skip
    "hae_keep_positions": dict(method="hae", budget=0.5, group=2, seq=34, dim=16, label_mix=True, keep_positions=9),
    # Per-layer signals: row 0 text, image, text; row 1 padded, text only (no visual token).
    "signal_attention_fp32": dict(kind="signal", signal="attention", group=2, seq=37, dim=16),
    "signal_cross_modal_fp32": dict(kind="signal", signal="cross_modal", group=4, seq=43, dim=8),
    "signal_density_fp32": dict(kind="signal", signal="density", group=2, seq=41, dim=24),
    "signal_cross_modal_decode_holes": dict(
        kind="signal", signal="cross_modal", group=2, seq=35, dim=16, num_new=5, prefill=False
    ),
    "signal_density_strided_query": dict(
        kind="signal", signal="density", group=1, seq=30, dim=16, num_new=9, prefill=False, strided_query=True
    ),
    "signal_attention_bf16": dict(kind="signal", signal="attention", group=2, seq=33, dim=16, dtype="bfloat16"),
    "signal_cross_modal_fp16": dict(kind="signal", signal="cross_modal", group=2, seq=29, dim=16, dtype="float16"),
    "signal_density_via_ops": dict(kind="signal", signal="density", group=2, seq=31, dim=16, via_ops=True),
    "signal_cross_modal_sliding_window": dict(
        kind="signal", signal="cross_modal", group=2, seq=45, dim=16, attention_window=11
    ),  # fmt: skip
}


# ------------------------------------------------------------------------------------------------------
# pytest side (no triton kernels imported here)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_results() -> dict[str, dict]:
    """Run every interpreted case in one subprocess; map case name -> its report."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MMKV_KERNEL", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            results[report["case"]] = report
    if not results:
        pytest.fail(
            f"worker produced no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_matches_reference(worker_results, case):
    report = worker_results.get(case)
    assert report is not None, f"{case}: no report from the worker (did it crash?)"
    assert report["ok"], f"{case} failed with seed {report['seed']} (rerun with MMKV_TEST_SEED):\n{report['error']}"


def test_bench_kernels_smoke():
    """``benchmarks/bench_kernels.py --smoke`` runs every table end to end (tiny shapes, interpreter, CPU)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MMKV_KERNEL", None)
    script = ROOT / "benchmarks" / "bench_kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for case in ("snapkv prefill", "look_m pivot-merge prefill", "layer signal density", "| gather |", "| merge |"):
        assert case in out, f"{case!r} missing from:\n{out}"
    assert "SMOKE RUN" in out and "(c) One decode step" in out
    assert "kept positions NO" not in out, out  # every operator case agreed with the reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "method,options,prefill,num_new,dtype",
    [
        ("snapkv", {"window": 32}, True, None, torch.bfloat16),
        ("snapkv", {"window": 32, "group_reduce": "max"}, True, None, torch.float16),
        ("h2o", {}, True, None, torch.bfloat16),
        ("h2o", {}, False, 1, torch.bfloat16),
        ("h2o", {}, True, None, torch.float32),
        ("text_prior", {}, True, None, torch.bfloat16),
        ("look_m", {"merge": "pivot"}, True, None, torch.bfloat16),
        ("look_m", {"merge": "avg"}, True, None, torch.float32),
    ],
)
def test_cuda_matches_reference(method, options, prefill, num_new, dtype):
    """A realistic shape on the GPU: 32 query heads, 8 KV heads, head dim 128."""
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    params = dict(
        method=method, options=options, budget=0.2, group=4, num_kv=8, seq=1500, dim=128, prefill=prefill,
        num_new=num_new, dtype=str(dtype).removeprefix("torch."), label_mix=method == "text_prior",
    )  # fmt: skip
    error = run_case(params, seed, torch.device("cuda"))
    assert error is None, f"seed {seed}:\n{error}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "params",
    [
        dict(kind="nearest", seq=1500, kept_len=300, dim=128, dtype="bfloat16"),
        dict(kind="nearest", seq=1000, kept_len=257, dim=128),
        dict(kind="signal", signal="cross_modal", group=4, num_kv=8, seq=1200, dim=128, dtype="bfloat16"),
        dict(kind="signal", signal="density", group=4, num_kv=8, seq=1200, dim=128),
        dict(kind="signal", signal="attention", group=4, num_kv=8, seq=900, dim=128, dtype="float16"),
    ],
    ids=lambda p: f"{p['kind']}-{p.get('signal', '')}-{p.get('dtype', 'float32')}",
)
def test_cuda_stages_match_reference(params):
    """The merge assignment and the layer signals on the GPU, at an 8B model's head shapes."""
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    error = run_case({"group": 1, **params}, seed, torch.device("cuda"))
    assert error is None, f"seed {seed}:\n{error}"


# ------------------------------------------------------------------------------------------------------
# Shared by both sides: inputs and the comparison
# ------------------------------------------------------------------------------------------------------


def make_inputs(params: dict, gen: torch.Generator, device: torch.device) -> dict:
    """Random operator inputs. Row 1 of the batch is left-padded with INVALID slots (or all INVALID with
    ``pad="all"``); decode inputs have holes (evicted slots), gaps in positions and a nonzero score state."""
    batch, num_kv, group = params.get("batch", 2), params.get("num_kv", 2), params["group"]
    seq, dim = params["seq"], params["dim"]
    prefill = params.get("prefill", True)
    num_new = params.get("num_new") or seq
    dtype = getattr(torch, params.get("dtype", "float32"))

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if params.get("strided_query"):
        query = randn(batch, num_new, num_kv * group, dim).transpose(1, 2)  # [B, L, H, D] seen as [B, H, L, D]
    else:
        query = randn(batch, num_kv * group, num_new, dim)
    keys, values = randn(batch, num_kv, seq, dim), randn(batch, num_kv, seq, dim)

    if params.get("label_mix"):
        labels = torch.randint(0, 2, (batch, num_kv, seq), generator=gen).to(torch.int8)
    else:
        labels = torch.zeros(batch, num_kv, seq, dtype=torch.int8)
    # Positions grow with the slot; after decode steps they have gaps where slots were evicted.
    max_gap = 1 if prefill else 3
    positions = torch.randint(1, max_gap + 1, (batch, num_kv, seq), generator=gen).cumsum(-1) - 1
    scores = torch.zeros(batch, num_kv, seq)
    if prefill:
        pad = seq if params.get("pad") == "all" else int(torch.randint(1, max(2, seq // 3), (1,), generator=gen))
        labels[1, :, :pad] = -1
        positions[1] -= pad
    else:
        past = seq - num_new
        holes = torch.rand(batch, num_kv, past, generator=gen) < 0.15
        labels[..., :past][holes] = -1
        scores[..., :past] = torch.rand(batch, num_kv, past, generator=gen) * 3
    # INVALID slots carry garbage positions and scores: only the labels may decide validity.
    invalid = labels == -1
    positions[invalid] = torch.randint(-5, 2 * seq, (int(invalid.sum()),), generator=gen)
    scores[invalid] = 0.0
    # Slots merged earlier stand for several tokens.
    weights = torch.randint(1, 4, (batch, num_kv, seq), generator=gen).float()
    return dict(
        query=query.to(device), keys=keys.to(device), values=values.to(device), labels=labels.to(device),
        positions=positions.to(device), scores=scores.to(device), weights=weights.to(device),
        parked=torch.zeros(labels.shape, dtype=torch.bool, device=device), scaling=dim**-0.5, prefill=prefill,
    )  # fmt: skip


def policy_string(params: dict) -> str:
    from mmkv_compile.methods import build_method
    from mmkv_compile.policy import LayerPlacement

    policy = build_method(params["method"], **params.get("options", {})).policy(params["budget"])
    placement = LayerPlacement(params.get("layer", 0), params.get("num_layers", 1), params.get("attention_window", 0))
    return policy.at_layer(placement).to_string()


def compare_outputs(got, want, dtype: torch.dtype, exact_kv: bool = True) -> str | None:
    """None when the Triton outputs match the reference's, else what differs. ``exact_kv=False`` allows float32
    rounding in keys and values (LOOK-M's weighted merge scales them by the similarity, rounded differently)."""
    names = ("keys", "values", "labels", "positions", "scores", "weights", "parked")
    problems = []
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            problems.append(f"{name}: shape/dtype {tuple(g.shape)} {g.dtype} != {tuple(w.shape)} {w.dtype}")
        elif name in ("labels", "positions", "parked"):
            if not torch.equal(g, w):
                problems.append(f"{name} differ at {(g != w).nonzero()[:5].tolist()}\n got {g}\nwant {w}")
        elif name in ("scores", "weights"):
            if not torch.allclose(g, w, rtol=1e-5, atol=1e-6):
                problems.append(f"{name}: max abs diff {(g - w).abs().max().item():.3g}")
        elif not exact_kv:
            rtol = 1e-5 if dtype == torch.float32 else 1e-2
            if not torch.allclose(g.float(), w.float(), rtol=rtol, atol=rtol / 10):
                problems.append(f"{name}: max abs diff {(g.float() - w.float()).abs().max().item():.3g} ({dtype})")
        elif not torch.equal(g, w):  # a copy, or a merge from the same assignment: bit-exact in every dtype
            problems.append(f"{name}: max abs diff {(g.float() - w.float()).abs().max().item():.3g} ({dtype})")
    return "\n".join(problems) or None


def run_case(params: dict, seed: int, device: torch.device) -> str | None:
    """Run one case with the Triton path and the reference; None on a match, else the differences."""
    from mmkv_compile.kernels import reference as ref
    from mmkv_compile.kernels import triton_kernels as tk
    from mmkv_compile.policy import Policy
    from mmkv_compile.state import SlotState

    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(params, gen, device)
    dtype = inputs["keys"].dtype
    kind = params.get("kind")
    if kind == "column_sums":
        return check_column_sums(params, inputs, gen)
    if kind == "nearest":
        return check_nearest(params, gen, device)
    if kind == "signal":
        return check_signal(params, inputs)

    policy = policy_string(params)
    state = SlotState(*(inputs[n] for n in ("keys", "values", "labels", "positions", "scores", "weights", "parked")))
    budgets = {}
    if params.get("layer_budgets") is not None:
        budgets["layer_budgets"] = torch.tensor(params["layer_budgets"], device=device)
    if params.get("keep_positions") is not None:  # some valid positions of each row, padded with -1
        valid_positions = torch.where(inputs["labels"][:, 0] != -1, inputs["positions"][:, 0], -1)
        chosen = valid_positions[
            :, torch.randperm(valid_positions.shape[-1], generator=gen)[: params["keep_positions"]]
        ]
        budgets["keep_positions"] = torch.cat([chosen, torch.full_like(chosen[:, :2], -1)], dim=-1)
    call = (inputs["query"], state, inputs["scaling"], policy, inputs["prefill"])
    chunk = ref.QUERY_CHUNK
    ref.QUERY_CHUNK = params.get("query_chunk", chunk)  # both implementations read it at call time
    try:
        want = ref.score_evict_merge(*call, **budgets)
        if params.get("via_ops"):
            import mmkv_compile.ops  # noqa: F401  (registers torch.ops.mmkv)

            calls = []
            original = tk.score_evict_merge
            tk.score_evict_merge = lambda *a, **k: calls.append(1) or original(*a, **k)
            os.environ["MMKV_KERNEL"] = "triton"
            try:
                query, _, scaling, policy_text, prefill = call
                got = torch.ops.mmkv.score_evict_merge(query, *state, scaling, policy_text, prefill, **budgets)
            finally:
                del os.environ["MMKV_KERNEL"]
                tk.score_evict_merge = original
            if calls != [1]:
                return f"MMKV_KERNEL=triton did not dispatch to the Triton kernel (calls: {calls})"
        else:
            got = tk.score_evict_merge(*call, **budgets)
    finally:
        ref.QUERY_CHUNK = chunk
    error = compare_outputs(got, want, dtype, params.get("exact_kv", True))
    pol = Policy.from_string(policy)
    if error is None and pol.merge.rule != "none" and not bool((want[5] > 1 + inputs["weights"].max()).any()):
        error = "no kept slot received a merge: the case does not exercise the merge assignment"
    if error is None and pol.score.kind in ("window", "all_queries"):
        # Guard against a vacuous pass: the attention scores must actually steer the selection.
        if not bool((want[4] > 0).any()):
            error = "reference scores are all zero: the case does not exercise the scoring kernels"
    return error


def check_column_sums(params: dict, inputs: dict, gen: torch.Generator) -> str | None:
    """The scoring kernels alone, with INVALID slots anywhere (query slots included) and forced key splits."""
    from mmkv_compile.kernels import reference as ref
    from mmkv_compile.kernels import triton_kernels as tk

    labels = inputs["labels"].clone()
    labels[torch.rand(labels.shape, generator=gen) < 0.2] = -1
    labels[0, 0, -2:] = -1  # two query rows with no visible key at all
    num_queries = params["num_new"]
    query = inputs["query"][:, :, -num_queries:]
    window = params.get("attention_window", 0)
    want = ref.attention_column_sums(
        query, inputs["keys"], labels, inputs["positions"], num_queries, inputs["scaling"], params["reduce"],
        window=window,
    )  # fmt: skip
    problems = []
    for splits in (1, 3, None):
        got = tk.attention_column_sums(
            query, inputs["keys"], labels, inputs["positions"], num_queries, inputs["scaling"],
            params["reduce"], key_splits=splits, window=window,
        )  # fmt: skip
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            problems.append(f"key_splits={splits}: max abs diff {(got - want).abs().max().item():.3g}")
    return "\n".join(problems) or None


def check_nearest(params: dict, gen: torch.Generator, device: torch.device) -> str | None:
    """The merge assignment alone: indices exact and similarities within 1e-5 where the reference's is finite,
    -inf exactly where it is -inf (rows with nothing kept)."""
    from mmkv_compile.kernels import reference as ref
    from mmkv_compile.kernels import triton_kernels as tk

    batch, num_kv, seq, kept_len, dim = 2, 2, params["seq"], params["kept_len"], params["dim"]
    dtype = getattr(torch, params.get("dtype", "float32"))
    keys = torch.randn(batch, num_kv, seq, dim, generator=gen).to(dtype)
    kept_keys = torch.randn(batch, num_kv, kept_len, dim, generator=gen).to(dtype)
    kept = torch.rand(batch, num_kv, kept_len, generator=gen) < 0.7
    kept[0, 0, :2] = True
    kept_keys[0, 0, 1] = kept_keys[0, 0, 0]  # an exact tie: the lower index must win
    keys[0, 0, :3] = kept_keys[0, 0, 0] * 2  # ... for these slots (cosine 1 with both)
    kept[0, 1, -1] = True
    keys[0, 1, 4] = 0  # a zero key: similarity 0 with every kept slot, the first kept one wins
    kept_keys[1, 0, -1] = 0  # a zero kept key
    kept[1, 1] = False  # a row and KV head with nothing kept
    keys, kept_keys, kept = keys.to(device), kept_keys.to(device), kept.to(device)
    want_best, want_index = ref.nearest_kept(keys, kept_keys, kept)
    got_best, got_index = tk.nearest_kept(keys, kept_keys, kept)
    finite = torch.isfinite(want_best)
    problems = []
    if got_best.dtype != torch.float32 or got_index.dtype != torch.int64 or got_best.shape != want_best.shape:
        problems.append(f"dtypes/shapes {got_best.dtype} {got_index.dtype} {tuple(got_best.shape)}")
    elif not torch.equal(torch.isfinite(got_best), finite) or not bool((got_best[~finite] == float("-inf")).all()):
        problems.append(f"-inf differs: got {got_best}\nwant {want_best}")
    else:
        wrong = (got_index != want_index) & finite
        # A different index is accepted only at a near-tie that float32 rounding decides: its cosine (computed
        # as the reference does) within 1e-6 of the best. The planted exact ties must match exactly.
        picked = F.normalize(kept_keys.float(), dim=-1).gather(
            2, got_index.clamp(0, kept_len - 1).unsqueeze(-1).expand(*got_index.shape, dim)
        )
        picked_sim = (F.normalize(keys.float(), dim=-1) * picked).sum(-1)
        near_tie = (picked_sim - want_best).abs() <= 1e-6
        near_tie[0, 0, :3] = near_tie[0, 1, 4] = False
        if bool((wrong & ~near_tie).any()):
            problems.append(f"indices differ at {(wrong & ~near_tie).nonzero()[:5].tolist()}")
        if not torch.allclose(got_best[finite], want_best[finite], rtol=1e-5, atol=1e-6):
            problems.append(f"similarity: max abs diff {(got_best - want_best)[finite].abs().max().item():.3g}")
        if not bool((got_index[~finite] >= 0).all() and (got_index[~finite] < kept_len).all()):
            problems.append("rows with nothing kept must still get an index in range (the merge scatters with it)")
    if not problems and not (
        int(want_index[0, 0, 2]) == 0 and int(want_index[0, 1, 4]) == int(kept[0, 1].int().argmax())
    ):
        problems.append("the reference did not break the planted ties as expected: the case is vacuous")
    return "\n".join(problems) or None


def signal_labels(inputs: dict) -> torch.Tensor:
    """Labels for the signal cases: row 0 text, then an image block, then text (so post-vision queries exist);
    row 1 keeps make_inputs' INVALID padding/holes and is text only (no visual token)."""
    labels = inputs["labels"].clone()
    seq = labels.shape[-1]
    start, stop = seq // 5, seq // 2
    valid0 = labels[0] != -1
    labels[0] = torch.where(valid0, 0, -1).to(labels.dtype)
    labels[0, :, start:stop] = torch.where(valid0[:, start:stop], 1, -1).to(labels.dtype)
    labels[1] = torch.where(labels[1] != -1, 0, -1).to(labels.dtype)
    return labels


def check_signal(params: dict, inputs: dict) -> str | None:
    """One layer signal, Triton against the torch version: within 1e-5 (float32) or 1e-2 relative (half)."""
    from mmkv_compile.kernels import layer_signals as ls
    from mmkv_compile.kernels import triton_signals as ts
    from mmkv_compile.policy import LayerPlacement

    labels = signal_labels(inputs)
    signal = params["signal"]
    window = params.get("attention_window", 0)
    call = (inputs["query"], inputs["keys"], labels, inputs["positions"], inputs["scaling"], signal, window)
    os.environ["MMKV_KERNEL"] = "reference"  # the torch version, on CUDA tensors too
    try:
        want = ls.layer_signal(*call)[:, 0].float()  # (signal, live slots): the signal
    finally:
        del os.environ["MMKV_KERNEL"]
    if params.get("via_ops"):
        import mmkv_compile.ops  # noqa: F401  (registers torch.ops.mmkv)

        calls = []
        original = ts.layer_signal_sums
        ts.layer_signal_sums = lambda *a: calls.append(1) or original(*a)
        os.environ["MMKV_KERNEL"] = "triton"
        try:
            placement = LayerPlacement(window=window).to_string()
            got = torch.ops.mmkv.layer_signal(*call[:-1], placement)[:, 0].float()
        finally:
            del os.environ["MMKV_KERNEL"]
            ts.layer_signal_sums = original
        if calls != [1]:
            return f"MMKV_KERNEL=triton did not dispatch to the Triton signal kernel (calls: {calls})"
    else:
        got = ls.row_means(ts.layer_signal_sums(*call)).sum(-1).float()
    if got.shape != want.shape or got.dtype != torch.float32:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    tol = 1e-5 if inputs["keys"].dtype == torch.float32 else 1e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol):
        return f"{signal}: got {got.tolist()} want {want.tolist()}"
    if not bool((want[0] > 0).all()):
        return f"{signal}: the reference's signal of row 0 is {want[0].item()}: the case is vacuous"
    return None


def _poisoned_empty(shape, dtype, device):
    """Stand-in for the kernels' allocator: any element a kernel forgets to write fails the comparison."""
    fill = float("nan") if dtype.is_floating_point else 123
    return torch.full(shape, fill, dtype=dtype, device=device)


def worker() -> None:
    """Subprocess entry: run every case under the interpreter, print one JSON report per case."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker must start with TRITON_INTERPRET=1"
    from mmkv_compile.kernels import triton_kernels as tk

    tk._empty = _poisoned_empty
    fixed = os.environ.get("MMKV_TEST_SEED")
    for name, params in CASES.items():
        seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
        try:
            error = run_case(params, seed, torch.device("cpu"))
        except Exception:
            error = traceback.format_exc()
        print(json.dumps({"case": name, "ok": error is None, "seed": seed, "error": error}), flush=True)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()

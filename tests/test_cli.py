"""`mmkv demo` end to end on a small setting: the output's structure, not its timings."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_reports_sites_bytes_identity_and_speed():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable,
        "-m",
        "mmkv_compile.cli",
        "demo",
        "--images",
        "1",
        "--new-tokens",
        "6",
        "--repeats",
        "1",
        "--no-inductor",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert len(re.findall(r"layer \d: sdpa, cache=mmkv, gqa groups=4, rewritten", out)) == 4
    full, compressed = map(
        lambda s: int(s.replace(",", "")), re.search(r"full ([\d,]+) -> compressed ([\d,]+)", out).groups()
    )
    assert compressed < full
    assert "full budget reproduces the uncompiled tokens: yes" in out
    for name in ("uncompiled", "mmkv_full", "mmkv_compressed"):
        assert re.search(rf"{name}\s+[\d.]+\s+[\d.]+x", out)


def test_demo_rejects_a_bad_budget():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, "-m", "mmkv_compile.cli", "demo", "--budget", "1.5"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert "budget=1.5" in result.stderr


def test_demo_says_why_when_nothing_is_compressed_and_exits_non_zero(monkeypatch):
    """A pass that fails leaves the model uncompressed: the demo says so, with the reason, instead of crashing."""
    from mmkv_compile import demo
    from mmkv_compile.passes.insert_op import InsertScoreEvictMerge

    def broken(self, gm, ctx):
        raise RuntimeError("pattern not understood")

    monkeypatch.setattr(InsertScoreEvictMerge, "run", broken)
    lines = []
    result = demo.run_demo(demo.DemoSettings(images=1, new_tokens=2, repeats=1, inductor=False), out=lines.append)
    assert result["compressed"] is False
    text = "\n".join(lines)
    assert "compressed nothing" in text and "pattern not understood" in text

"""PNG plots of the benchmark results (matplotlib, headless). Missing matplotlib skips the plots."""

from __future__ import annotations

import sys
from pathlib import Path

from mmkv_compile.methods import METHODS, compresses


def _varies_with_budget(row: dict) -> bool:
    """A row of a method whose budget means something (not ``full``; other kinds of row, such as random
    eviction, do)."""
    return row["method"] not in METHODS or compresses(row["method"])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _series_name(row: dict) -> str:
    if row["method"] is None:
        return row["variant"]
    return f"{row['variant']} {row['method']} {row['budget']}"


def plot_speed(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """``speed_vs_context.png`` (decode tok/s and KV MiB per context, one line per variant) and
    ``speed_vs_budget.png`` (the same against the budget, at the longest context)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = [row for row in rows if not row.get("reference")]  # the reference rows are other prompts
    out = Path(out_dir)
    written = []
    measures = (("decode_tok_s", "decode tokens/s"), ("kv_mib", "KV cache MiB"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(_series_name(row), []).append(row)
    for ax, (key, title) in zip(axes, measures):
        for name, points in series.items():
            points = sorted(points, key=lambda r: r["context"])
            style = "--" if points[0]["method"] is None else "-"
            ax.plot([p["context"] for p in points], [p[key] for p in points], style, marker="o", label=name)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    written.append(_save(fig, out / "speed_vs_context.png", plt))

    longest = max(row["context"] for row in rows)
    at_longest = [row for row in rows if row["context"] == longest]
    budgets = sorted({row["budget"] for row in at_longest if row["method"] is not None and _varies_with_budget(row)})
    if budgets:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (key, title) in zip(axes, measures):
            lines: dict[str, list[dict]] = {}
            for row in at_longest:
                if row["method"] is None:
                    ax.axhline(row[key], linestyle="--", color="gray" if row["kind"] == "uncompiled" else "black",
                               linewidth=1, label=row["variant"])  # fmt: skip
                elif _varies_with_budget(row):
                    lines.setdefault(f"{row['variant']} {row['method']}", []).append(row)
            for name, points in lines.items():
                points = sorted(points, key=lambda r: r["budget"])
                ax.plot([p["budget"] for p in points], [p[key] for p in points], marker="o", label=name)
            ax.set_xlabel("budget (share of the prompt kept)")
            ax.set_title(f"{title}, context {longest}")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        written.append(_save(fig, out / "speed_vs_budget.png", plt))
    return written


def plot_quality(rows: list[dict], passkey: list[dict], out_dir: str | Path) -> list[Path]:
    """``quality.png``: KL divergence and top-1 agreement against the budget per method, and a grid of
    passkey hits per run and depth."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    lines: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("budget") is not None and _varies_with_budget(row):
            name = row["source"] if row["method"] == row["source"] else f"{row['source']} {row['method']}"
            lines.setdefault(name, []).append(row)
    for ax, (key, title) in zip(axes[:2], (("kl", "KL(full || compressed), nats/token"), ("top1", "top-1 agreement"))):
        for name, points in lines.items():
            points = sorted(points, key=lambda r: r["budget"])
            style = ":" if name == "random" else "-"
            ax.plot([p["budget"] for p in points], [p[key] for p in points], style, marker="o", label=name)
        ax.set_xlabel("budget (share of the prompt kept)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    _passkey_grid(axes[2], passkey)
    fig.tight_layout()
    return [_save(fig, Path(out_dir) / "quality.png", plt)]


MODALITY_AWARE = ("madakv", "retentivekv", "hae", "meda", "look_m", "vl_cache", "text_prior")  # drawn solid


def plot_cards_quality(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """``quality_cards.png``: exact-match accuracy and KL to the full cache against the budget, one line per
    method (modality-aware methods solid, the others dashed, random eviction black and dotted), the full cache
    as a gray horizontal line."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    lines: dict[str, list[dict]] = {}
    full = [row for row in rows if row["source"] == "full cache"]
    for row in rows:
        if row.get("budget") is not None and _varies_with_budget(row):
            lines.setdefault(row["method"], []).append(row)
    colours = plt.get_cmap("tab20").colors  # one colour per method: the default cycle repeats after ten
    measures = (("accuracy", "exact-match accuracy"), ("kl", "KL(full || compressed) over the answer, nats/token"))
    for ax, (key, title) in zip(axes, measures):
        for index, (name, points) in enumerate(lines.items()):
            points = sorted(points, key=lambda r: r["budget"])
            style = ":" if name == "random" else "-" if name in MODALITY_AWARE else "--"
            colour = "black" if name == "random" else colours[index % len(colours)]
            ax.plot([p["budget"] for p in points], [p[key] for p in points], style, color=colour, marker="o",
                    label=name)  # fmt: skip
        for row in full:
            ax.axhline(row[key], color="gray", linewidth=1, label="full cache")
        ax.set_xscale("log")
        ax.set_xlabel("budget (share of the context kept, log scale)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return [_save(fig, Path(out_dir) / "quality_cards.png", plt)]


def _passkey_grid(ax, passkey: list[dict]) -> None:
    """Runs down, depths across; each cell is coloured by the share found and labelled hits/trials."""
    runs = list(dict.fromkeys(trial["run"] for trial in passkey))
    depths = sorted({trial["depth"] for trial in passkey})
    if not runs:
        ax.set_axis_off()
        return
    hits = [[[t["found"] for t in passkey if t["run"] == run and t["depth"] == d] for d in depths] for run in runs]
    share = [[sum(cell) / len(cell) if cell else float("nan") for cell in row] for row in hits]
    ax.imshow(share, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(hits):
        for j, cell in enumerate(row):
            ax.text(j, i, f"{sum(cell)}/{len(cell)}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(runs)), runs, fontsize=7)
    ax.set_xlabel("depth of the pass key (0 = start), all lengths")
    ax.set_title("passkey hits")


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

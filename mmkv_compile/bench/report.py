"""Outputs shared by the benchmarks: markdown tables, results.json, and the facts of the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

Column = tuple[str, str, Callable[[object], str]]  # (header, key in the row, formatter)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(digits: int, suffix: str = "") -> Callable[[object], str]:
    """A formatter: a float with ``digits`` decimals (``-`` for a missing value)."""

    def format_value(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, str):
            return value
        return f"{value:,.{digits}f}{suffix}"

    return format_value


def sig(digits: int) -> Callable[[object], str]:
    """A formatter: a float with ``digits`` significant digits (values from 1e-7 to 1 read well)."""

    def format_value(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        return f"{value:.{digits}g}"

    return format_value


def text(value) -> str:
    return "-" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    """A GitHub markdown table of ``rows`` with ``columns``."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(show(row.get(key)) for _, key, show in columns) + " |")
    return "\n".join(lines)


def machine() -> dict:
    """What the numbers were measured on."""
    import transformers

    facts = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        facts["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return facts


def finish(facts: dict) -> None:
    """Add the load average at the end: other processes competing for the cores make timings noisy."""
    if hasattr(os, "getloadavg"):
        facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]


def machine_line(facts: dict) -> str:
    """One line for the printed report."""
    where = facts.get("gpu") or f"{facts['machine']}, {facts['cpu_cores']} cores, {facts['torch_threads']} threads"
    load = facts.get("load_average_at_start")
    extra = f", load average {load[0]}" if load else ""
    return f"machine: {where}; torch {facts['torch']}, transformers {facts['transformers']}{extra}; {facts['date']}"


def write(out_dir: str | Path, table: str, results: dict) -> list[Path]:
    """Write ``table.md`` and ``results.json`` into ``out_dir`` (created); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_path, json_path = out / "table.md", out / "results.json"
    table_path.write_text(table + "\n")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return [table_path, json_path]

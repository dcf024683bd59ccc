"""``mmkv bench speed --memory-cap``: the largest batch each variant fits in a memory cap, and the throughput
of that batch.

A compressed cache leaves room for more sequences in the same memory; this table states that gain as tokens
per second. The cap bounds what one ``generate`` call adds at its peak over the loaded (and, for the compiled
variants, already compiled) model: keys and values, activations and the compressor's temporaries, measured as
the speed table's ``peak +MiB`` is (CUDA max allocated, or the process RSS on CPU). The search doubles the
batch while it fits, then bisects between the last fit and the first miss, so it assumes a larger batch never
needs less memory. A probe whose call compiled is run again, so that compilation's own memory is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from tqdm import tqdm

from mmkv_compile.bench import report, variants
from mmkv_compile.bench.memory import PeakMemory
from mmkv_compile.bench.models import BenchModel
from mmkv_compile.bench.speed import MIB, SpeedSettings, compile_stats, timed_generate


@dataclass(frozen=True)
class Probe:
    """One batch size tried: its rows and the bytes one generate call added at its peak."""

    rows: int
    peak_added: int


def largest_batch(peak_added: Callable[[int], int], cap: int, limit: int) -> tuple[int, list[Probe]]:
    """The largest batch in ``[1, limit]`` whose ``peak_added(rows)`` is at most ``cap`` bytes (0 if one row does
    not fit), and every probe tried: doubling while it fits, then bisection. ``peak_added`` must not decrease as
    rows grow."""
    probes: list[Probe] = []

    def fits(rows: int) -> bool:
        probes.append(Probe(rows, peak_added(rows)))
        return probes[-1].peak_added <= cap

    if not fits(1):
        return 0, probes
    low, high = 1, None
    while high is None:
        bigger = min(2 * low, limit)
        if bigger == low:
            return low, probes
        if fits(bigger):
            low = bigger
        else:
            high = bigger
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, probes


def _peak_of_generate(bench: BenchModel, model, run_inside, length: int, settings: SpeedSettings, bar):
    """``peak_added(rows)`` for :func:`largest_batch`: one generate of ``rows`` left-padded prompts, measured."""

    def peak_added(rows: int) -> int:
        bar.set_postfix_str(f"{rows} rows")
        bar.update(1)
        inputs = bench.batch(bench.prompt, length, rows)
        for _ in range(2):  # a call that compiled is measured again
            frames = compile_stats()["frames_compiled"]
            memory = PeakMemory(settings.device)
            memory.start()
            timed_generate(model, inputs, settings.new_tokens, run_inside)
            memory.stop()
            if compile_stats()["frames_compiled"] == frames:
                return memory.added
        raise RuntimeError(f"{rows} rows compiled again on a second identical call: its memory cannot be measured")

    return peak_added


def fit_variant(bench: BenchModel, variant: variants.Variant, length: int, settings: SpeedSettings) -> dict:
    """The largest batch of ``length``-token prompts ``variant`` fits under ``settings.memory_cap_mib``, and the
    medians of ``repeats`` timed runs of that batch."""
    cap = int(settings.memory_cap_mib * MIB)
    model = bench.fresh()
    run_inside = variants.setup(variant, model, length)
    with tqdm(desc=f"--memory-cap, context {length}: {variant.label}", unit="probe") as bar:
        peak_added = _peak_of_generate(bench, model, run_inside, length, settings, bar)
        rows, probes = largest_batch(peak_added, cap, settings.max_batch)
    runs = []
    if rows:
        inputs = bench.batch(bench.prompt, length, rows)
        runs = [timed_generate(model, inputs, settings.new_tokens, run_inside) for _ in range(settings.repeats)]
    del model
    decode = report.median([run["decode_tok_s"] for run in runs]) if runs else 0.0
    total = report.median([run["total_s"] for run in runs]) if runs else None
    misses = [probe for probe in probes if probe.peak_added > cap]
    fitted = next((probe for probe in reversed(probes) if probe.rows == rows), None)
    return {
        "context": length,
        "variant": variant.label,
        "kind": variant.kind,
        "method": variant.method,
        "budget": variant.budget,
        "fits_batch": rows,
        "peak_added_mib": fitted.peak_added / MIB if fitted else None,
        "stopped_by": f"batch {misses[-1].rows}: {misses[-1].peak_added / MIB:,.0f} MiB" if misses else "--max-batch",
        "decode_tok_s": decode,
        "batch_tok_s": decode * rows,
        "end_to_end_tok_s": rows * settings.new_tokens / total if total else 0.0,
        "kv_mib": runs[-1]["kv_bytes"] / MIB if runs else None,
        "probes": [asdict(probe) for probe in probes],
        "runs": runs,
    }


def fit_rows(bench: BenchModel, plan: list[variants.Variant], settings: SpeedSettings) -> list[dict]:
    """:func:`fit_variant` for every context and variant, with each row's throughput as a ratio to the uncompiled
    full cache's at the same context (``x throughput``)."""
    rows = [fit_variant(bench, variant, length, settings) for length in settings.contexts for variant in plan]
    full = {row["context"]: row for row in rows if row["kind"] == "uncompiled"}
    for row in rows:
        base = full.get(row["context"])
        row["x_throughput"] = row["batch_tok_s"] / base["batch_tok_s"] if base and base["batch_tok_s"] else None
    return rows


COLUMNS: list[report.Column] = [
    ("context", "context", report.text),
    ("variant", "variant", report.text),
    ("method", "method", report.text),
    ("budget", "budget", report.text),
    ("largest batch", "fits_batch", report.text),
    ("peak +MiB", "peak_added_mib", report.fmt(0)),
    ("next batch", "stopped_by", report.text),
    ("all rows tok/s", "batch_tok_s", report.fmt(1)),
    ("x throughput", "x_throughput", report.fmt(2, "x")),
    ("end to end tok/s", "end_to_end_tok_s", report.fmt(1)),
    ("KV MiB", "kv_mib", report.fmt(2)),
]

LEGEND = (
    "Largest batch (rows of different lengths, left-padded, the longest as long as the context) whose generate call "
    "adds at most {cap:,.0f} MiB ({memory}) at its peak over the loaded model, searched up to --max-batch "
    "{max_batch}; peak +MiB: that batch's peak; next batch: the smallest batch tried that did not fit. "
    "all rows tok/s: decode tokens per second of the whole batch (medians of {repeats} runs, {new_tokens} new "
    "tokens); x throughput: ratio to (a) uncompiled at the same context; end to end tok/s: new tokens of all rows "
    "over the whole generate call; KV MiB: keys+values of that batch's cache after generate."
)

"""``mmkv bench speed``: prefill time, decode tokens/s, memory, KV bytes, compile time and recompiles of
each variant (variants.py), side by side in one process, as medians and as ratios to the uncompiled model.

Every (context, variant) cell compiles a fresh copy of the model, in the same process as the cells before it,
with nothing reset: a compiled model must compress the same way whatever the process compiled before. Compile
statistics are the differences of Dynamo's counters across the cell. One warm-up call (which compiles) precedes
``repeats`` timed calls of ``generate``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from mmkv_compile.bench import report, variants
from mmkv_compile.bench.kvpress_adapter import has_press, kvpress_missing
from mmkv_compile.bench.memory import PeakMemory
from mmkv_compile.bench.models import BenchModel, TinyScale, load_bench_model
from mmkv_compile.bench.warm import empty_compile_caches, warm_compile_s
from mmkv_compile.cache import MMKVCache
from mmkv_compile.compat import output_cache
from mmkv_compile.policy import BudgetStage

MIB = 1 << 20


@dataclass
class SpeedSettings:
    """What ``mmkv bench speed`` runs (see its ``--help``)."""

    model: str = "smollm2"
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    budgets: list[float | int] = field(default_factory=lambda: [0.5, 0.25])
    methods: list[str] = field(default_factory=lambda: ["snapkv", "h2o", "streaming_llm"])
    variants: list[str] = field(default_factory=lambda: list(variants.KINDS))
    repeats: int = 3
    new_tokens: int = 32
    batch: int = 1  # rows per generate call, of different lengths, left-padded
    memory_cap_mib: float | None = None  # also find each variant's largest batch under this cap (fit.py)
    max_batch: int = 64  # where that search stops
    warm_compile: bool = False  # cold compile here, warm in a second process (warm.py)
    out: str | None = "bench-out/speed"
    device: str = "cpu"
    dtype: str = "float32"
    scale: TinyScale = field(default_factory=TinyScale)
    seed: int = 0


class _StepClock(LogitsProcessor):
    """Records the time at which each new token's logits are ready (generate calls it once per token)."""

    def __init__(self, cuda: bool):
        self.cuda, self.times = cuda, []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def cache_bytes(cache) -> tuple[int, int, int]:
    """(keys+values bytes, per-slot metadata bytes, unused capacity bytes) held by a cache: an MMKVCache or a
    transformers cache."""
    if isinstance(cache, MMKVCache):
        sizes = cache.nbytes()
        return sizes["kv"], sizes["metadata"], sizes["reserved"]
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total, 0, 0


def timed_generate(model, inputs: dict, new_tokens: int, context) -> dict:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens: prefill seconds (until the first token's
    logits), decode tokens/s (the other tokens), and the bytes of the cache it returns."""
    clock = _StepClock(next(model.parameters()).is_cuda)
    start = time.perf_counter()
    with torch.no_grad(), context():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    total = time.perf_counter() - start
    kv, metadata, reserved = cache_bytes(output_cache(out))
    first, last = clock.times[0], clock.times[-1]
    return {
        "prefill_s": first - start,
        "decode_tok_s": (len(clock.times) - 1) / max(last - first, 1e-9),
        "total_s": total,
        "kv_bytes": kv,
        "metadata_bytes": metadata,
        "reserved_bytes": reserved,
    }


def compile_stats() -> dict:
    """Dynamo's counters and compilation metrics so far in this process (cells take differences)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    metrics = get_compilation_metrics()
    return {
        "compile_s": sum(m.entire_frame_compile_time_s or 0.0 for m in metrics),
        "recompiles": sum(m.recompile_reason is not None for m in metrics),
        "frames_compiled": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _since(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in after}


def measure(
    bench: BenchModel, variant: variants.Variant, inputs: dict, settings: SpeedSettings, bar, context: int | None = None
) -> dict:
    """One cell: warm up (compiling), then ``repeats`` timed runs; medians of each measure. ``context``: the
    row's context when the prompt is a reference row's other length."""
    before = compile_stats()
    model = bench.fresh()
    rows, prompt = inputs["input_ids"].shape
    run_inside = variants.setup(variant, model, prompt)
    warmup = timed_generate(model, inputs, settings.new_tokens, run_inside)
    bar.update(1)
    after_warmup = _since(before, compile_stats())
    memory = PeakMemory(settings.device)
    memory.start()
    runs = []
    for _ in range(settings.repeats):
        runs.append(timed_generate(model, inputs, settings.new_tokens, run_inside))
        bar.update(1)
    memory.stop()
    stats = _since(before, compile_stats())
    del model
    row = {
        "context": context or prompt,
        "prompt": prompt,
        "variant": variant.label,
        "kind": variant.kind,
        "reference": variant.reference,
        "method": variant.method,
        "budget": variant.budget,
        "batch": rows,
        **{key: report.median([run[key] for run in runs]) for key in ("prefill_s", "decode_tok_s", "total_s")},
        "kv_bytes": runs[-1]["kv_bytes"],
        "metadata_bytes": runs[-1]["metadata_bytes"],
        "reserved_bytes": runs[-1]["reserved_bytes"],
        "peak_added_bytes": memory.added,
        "peak_bytes": memory.peak,
        "first_call_s": warmup["total_s"],
        "compile_s": stats["compile_s"] if variant.compiled else None,
        "warm_compile_s": warm_compile_s(settings, variant, prompt)
        if variant.compiled and settings.warm_compile
        else None,
        "recompiles": stats["recompiles"] if variant.compiled else None,
        # compiles during the timed runs mean the timings include compilation: should be 0
        "frames_compiled_while_timed": stats["frames_compiled"] - after_warmup["frames_compiled"],
        "graphs": stats["graphs"],
        "graph_breaks": stats["graph_breaks"],
        "runs": runs,
    }
    row["batch_tok_s"] = row["decode_tok_s"] * rows  # every row gets one token per step
    row["kv_mib"] = row["kv_bytes"] / MIB
    row["peak_added_mib"] = row["peak_added_bytes"] / MIB
    return row


def add_ratios(rows: list[dict]) -> None:
    """Ratios to (a) uncompiled at the same context: x prefill (time), x decode (tokens/s), x KV, x peak."""
    baselines = {row["context"]: row for row in rows if row["kind"] == "uncompiled" and not row["reference"]}
    for row in rows:
        base = baselines.get(row["context"])
        for key, ratio in (("prefill_s", "x_prefill"), ("decode_tok_s", "x_decode"),
                           ("kv_bytes", "x_kv"), ("peak_added_bytes", "x_peak")):  # fmt: skip
            row[ratio] = row[key] / base[key] if base and base[key] else None
    bound = next((row for row in rows if row["reference"] == "weights bound"), None)
    for row in rows:
        row["of_bound"] = row["decode_tok_s"] / bound["decode_tok_s"] if bound and bound["decode_tok_s"] else None


COLUMNS: list[report.Column] = [
    ("context", "context", report.text),
    ("prompt", "prompt", report.text),
    ("variant", "variant", report.text),
    ("method", "method", report.text),
    ("budget", "budget", report.text),
    ("prefill s", "prefill_s", report.fmt(2)),
    ("x prefill", "x_prefill", report.fmt(2, "x")),
    ("decode tok/s", "decode_tok_s", report.fmt(1)),
    ("x decode", "x_decode", report.fmt(2, "x")),
    ("batch", "batch", report.text),
    ("all rows tok/s", "batch_tok_s", report.fmt(1)),
    ("of bound", "of_bound", report.fmt(2)),
    ("end to end s", "total_s", report.fmt(2)),
    ("KV MiB", "kv_mib", report.fmt(2)),
    ("x KV", "x_kv", report.fmt(2, "x")),
    ("peak +MiB", "peak_added_mib", report.fmt(0)),
    ("x peak", "x_peak", report.fmt(2, "x")),
    ("compile s", "compile_s", report.fmt(1)),
    ("warm compile s", "warm_compile_s", report.fmt(1)),
    ("recompiles", "recompiles", report.text),
]

LEGEND = (
    "Medians of {repeats} timed runs after one warm-up run, {new_tokens} new tokens, {batch_text}. "
    "x = ratio to (a) uncompiled at the same context (x prefill: time ratio; x decode: tokens/s ratio, above 1 is faster). "
    "KV MiB: keys+values in the cache after generate (mmkv's per-slot labels/positions/scores, and the unused room "
    "of its capacity buffers, are in results.json). "
    "peak +MiB: highest {memory} during the timed runs above its level before them. "
    "compile s: Dynamo frame compile time (Inductor included); with --warm-compile it is cold (an empty cache "
    "folder) and warm compile s is the same variant's compile time in a second process reusing the caches; "
    "recompiles: compiles caused by failed guards. "
    "Reference rows (uncompiled, other prompts): kept length = a prompt as long as the compressed cache at that "
    "budget; weights bound = a one-token prompt, a decode step that costs about its weights' traffic alone; "
    "of bound: decode tokens/s as a share of the weights bound's. "
    "end to end s: the whole generate call (prefill and every new token)."
)


def reference_rows(bench: BenchModel, length: int, settings: SpeedSettings, bar) -> list[dict]:
    """The uncompiled model on a prompt of each budget's kept length (text only, so any model takes it)."""
    rows = []
    for budget in settings.budgets:
        kept = max(int(BudgetStage(amount=budget).uniform_count(length)), 1)  # as the operator counts it
        variant = variants.Variant("uncompiled", budget=budget, reference="kept length")
        inputs = bench.batch(bench.text_prompt, kept, settings.batch)
        rows.append(measure(bench, variant, inputs, settings, bar, context=length))
    return rows


def run_speed(settings: SpeedSettings, out=print) -> dict:
    """Run the speed benchmark; print the table (through ``out``), write outputs; return the results."""
    with empty_compile_caches() if settings.warm_compile else contextlib.nullcontext():
        return _run_speed(settings, out)


def _run_speed(settings: SpeedSettings, out) -> dict:
    if settings.new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (decode speed is measured over the tokens after the first)")
    if settings.batch < 1:
        raise ValueError(f"--batch must be an int >= 1 (rows per generate call), got {settings.batch}")
    if settings.memory_cap_mib is not None and not settings.memory_cap_mib > 0:
        raise ValueError(f"--memory-cap must be a number of MiB > 0, got {settings.memory_cap_mib}")
    if settings.max_batch < 1:
        raise ValueError(f"--max-batch must be an int >= 1, got {settings.max_batch}")
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break notices from models' own code are noise here
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    bench = load_bench_model(settings.model, settings.scale, settings.device, dtype)
    missing = kvpress_missing() if "kvpress" in settings.variants else None
    kinds = [kind for kind in settings.variants if not (kind == "kvpress" and missing)]
    plan = variants.plan(settings.methods, settings.budgets, kinds, has_press)
    facts = report.machine()
    rows = []
    references = "uncompiled" in kinds
    cells = len(settings.contexts) * (len(plan) + (len(settings.budgets) if references else 0)) + references
    # the --memory-cap search is not counted: its number of probes is not known in advance
    bar = tqdm(total=cells * (settings.repeats + 1), desc="mmkv bench speed", unit="run")
    for length in settings.contexts:
        inputs = bench.batch(bench.prompt, length, settings.batch)
        for variant in plan:
            bar.set_postfix_str(f"context {length}: {variant.label} {variant.method or ''} {variant.budget or ''}")
            rows.append(measure(bench, variant, inputs, settings, bar))
        if references:
            bar.set_postfix_str(f"context {length}: reference rows")
            rows += reference_rows(bench, length, settings, bar)
    if references:
        bound = variants.Variant("uncompiled", reference="weights bound")
        rows.append(measure(bench, bound, bench.batch(bench.text_prompt, 1, settings.batch), settings, bar, context=1))
    bar.close()
    report.finish(facts)
    add_ratios(rows)
    memory = PeakMemory(settings.device).source
    batch_text = (
        "batch 1"
        if settings.batch == 1
        else (
            f"batch {settings.batch} (rows of different lengths, left-padded; decode tok/s per row, "
            "all rows tok/s = the batch's tokens per second)"
        )
    )
    legend = LEGEND.format(repeats=settings.repeats, new_tokens=settings.new_tokens, memory=memory,
                           batch_text=batch_text)  # fmt: skip
    table = report.markdown_table(rows, COLUMNS)
    header = [
        f"mmkv bench speed: model {bench.name} ({'real' if bench.real_weights else 'random'} weights), "
        f"{settings.device} {settings.dtype}",
        report.machine_line(facts),
    ]
    if missing:
        header.append(missing)
    text = "\n".join(header) + "\n\n" + table + "\n\n" + legend
    results = {"settings": _settings_dict(settings), "machine": facts, "kvpress": missing or "installed",
               "legend": legend, "rows": rows}  # fmt: skip
    if settings.memory_cap_mib is not None:
        from mmkv_compile.bench import fit

        fitted = fit.fit_rows(bench, plan, settings)
        report.finish(facts)
        fit_legend = fit.LEGEND.format(cap=settings.memory_cap_mib, memory=memory, max_batch=settings.max_batch,
                                       repeats=settings.repeats, new_tokens=settings.new_tokens)  # fmt: skip
        text += "\n\n" + report.markdown_table(fitted, fit.COLUMNS) + "\n\n" + fit_legend
        results.update(memory_cap_rows=fitted, memory_cap_legend=fit_legend)
    out(text)
    if settings.out:
        written = report.write(settings.out, text, results)
        from mmkv_compile.bench.plots import plot_speed

        written += plot_speed(rows, settings.out)
        out("\nwrote " + ", ".join(str(path) for path in written))
    return results


def _settings_dict(settings: SpeedSettings) -> dict:
    from dataclasses import asdict

    return asdict(settings)

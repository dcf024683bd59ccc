"""``mmkv bench quality``: what compression costs in accuracy, on real weights and real text.

Two measures per method and budget, each against the full cache as the ceiling:

* teacher-forced KL divergence and top-1 agreement: the prompt (``context`` tokens of Python's help text)
  is prefilled through the compressed model, then the next ``continuation`` tokens of the same text are
  fed one per call (as ``generate`` does) and each next-token distribution is compared with the one the
  uncompiled model gives with every token cached. KL(full || compressed), nats per token, mean.
* passkey retrieval: "The pass key is NNNNN. Remember it." hidden in the text at several depths and
  lengths, then "What is the pass key? The pass key is"; a hit when the greedy answer holds the digits.

Methods are compressed the way the product does it, ``mmkv_compile.compile(model, method, budget)``.
A ``random`` row evicts at random at the same budget (after an uncompiled prefill): the floor a method
must beat. kvpress presses run at the same budgets when kvpress is installed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile.bench import corpus, report
from mmkv_compile.bench.kvpress_adapter import KVPress, has_press, kvpress_missing
from mmkv_compile.bench.models import BenchModel, TinyScale, load_bench_model
from mmkv_compile.cache import MMKVCache
from mmkv_compile.methods import compresses
from mmkv_compile.policy import BudgetStage

ANSWER_TOKENS = 8
CACHES = ("full", "mmkv", "random", "kvpress")  # the kinds of row: ceiling, product, floor, other library


@dataclass
class QualitySettings:
    """What ``mmkv bench quality`` runs (see its ``--help``)."""

    model: str = "smollm2"
    context: int = 1024
    continuation: int = 64
    budgets: list[float | int] = field(default_factory=lambda: [0.5, 0.2])
    methods: list[str] = field(default_factory=lambda: ["snapkv", "h2o", "streaming_llm", "text_prior"])
    passkey_lengths: list[int] = field(default_factory=lambda: [1024])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    teacher_forcing: str = "step"
    caches: list[str] = field(default_factory=lambda: list(CACHES))
    inductor: bool = True
    out: str | None = "bench-out/quality"
    device: str = "cpu"
    dtype: str = "float32"
    scale: TinyScale = field(default_factory=TinyScale)
    seed: int = 0


@dataclass
class Run:
    """One row: how the cache was made (``source``), the method and budget."""

    source: str  # "full cache", "mmkv", "random" or "kvpress"
    method: str
    budget: float | int | None

    @property
    def name(self) -> str:
        if self.budget is None:
            return self.source
        what = self.source if self.method == self.source else f"{self.source} {self.method}"
        return f"{what} {self.budget}"


# -- teacher forcing ---------------------------------------------------------------------------------


def continuation_logits(
    model,
    context_ids: torch.Tensor,
    continuation: torch.Tensor,
    cache,
    mode: str = "step",
    during_prefill=contextlib.nullcontext,
    after_prefill=None,
    logical_positions: bool = False,
) -> torch.Tensor:
    """Prefill ``context_ids`` [1, C] into ``cache``, then feed ``continuation`` [1, T]; return the T
    next-token logits [T, V] that follow each continuation token.

    ``mode="step"`` feeds one token per call, ``"chunk"`` all T in one call (valid where the cache's model
    builds masks over its stored slots, as mmkv's does). ``logical_positions`` passes each token's true
    position explicitly, for caches whose length shrinks when compressed (kvpress's ``DynamicCache``).
    """
    context_len = context_ids.shape[-1]
    with torch.no_grad():
        with during_prefill():
            model(input_ids=context_ids, past_key_values=cache, use_cache=True)
        if after_prefill is not None:
            after_prefill(cache)
        if mode == "chunk":
            return model(input_ids=continuation, past_key_values=cache, use_cache=True).logits[0].float()
        logits = []
        for i in range(continuation.shape[-1]):
            kwargs = {}
            if logical_positions:
                kwargs["cache_position"] = torch.tensor([context_len + i], device=context_ids.device)
            out = model(input_ids=continuation[:, i : i + 1], past_key_values=cache, use_cache=True, **kwargs)
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


def kl_and_top1(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || logits) per position (nats) and the share of positions with the same argmax."""
    p_log = reference.log_softmax(-1)
    q_log = logits.log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    top1 = (reference.argmax(-1) == logits.argmax(-1)).float()
    return float(kl.mean()), float(top1.mean())


# -- the random baseline -------------------------------------------------------------------------------


def keep_count(budget: float | int, length: int) -> int:
    """Slots kept out of ``length`` at ``budget``, as the operator counts them."""
    return BudgetStage(amount=budget).uniform_count(length)


def random_keep(cache: MMKVCache, budget: float | int, generator: torch.Generator) -> None:
    """Evict at random: each (row, KV head) of each layer keeps ``keep_count`` slots drawn uniformly,
    in position order. No scores, no forced sinks or window: the floor any policy should beat."""
    for layer in cache.mmkv_layers:
        batch, heads, length, dim = layer.keys.shape
        keep = keep_count(budget, length)
        draw = torch.rand(batch, heads, length, generator=generator).to(layer.keys.device)
        slots = draw.argsort(-1)[..., :keep].sort(-1).values
        index = slots.unsqueeze(-1).expand(batch, heads, keep, dim)
        layer.set_state(t.gather(2, index if t.dim() == 4 else slots) for t in layer.state())


# -- passkey -------------------------------------------------------------------------------------------


def greedy_answer(model, ids: torch.Tensor, cache, after_prefill) -> list[int]:
    """``ANSWER_TOKENS`` greedy tokens after ``ids``, one forward per token, with ``after_prefill(cache)``
    compressing the cache between the prompt and the first answer token (``generate`` has no hook there)."""
    tokens = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        after_prefill(cache)
        for _ in range(ANSWER_TOKENS):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens


def generate_answer(model, ids: torch.Tensor, during=contextlib.nullcontext) -> list[int]:
    """``ANSWER_TOKENS`` greedy tokens from ``model.generate`` (the product's path)."""
    with torch.no_grad(), during():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                             min_new_tokens=ANSWER_TOKENS, do_sample=False)  # fmt: skip
    return out[0, ids.shape[-1] :].tolist()


# -- the benchmark -------------------------------------------------------------------------------------


class _Bench:
    """State shared by the runs: the model, the text, the reference logits and the passkey prompts."""

    def __init__(self, settings: QualitySettings, bench: BenchModel):
        self.settings, self.bench = settings, bench
        device = bench.device
        ids = corpus.token_ids(bench.codec, settings.context + settings.continuation)
        self.context = torch.tensor([ids[: settings.context]], device=device)
        self.continuation = torch.tensor([ids[settings.context :]], device=device)
        self.prompts = [
            corpus.passkey_prompt(bench.codec, length, depth, seed=settings.seed * 1000 + number)
            for number, (length, depth) in enumerate(
                (length, depth) for length in settings.passkey_lengths for depth in settings.passkey_depths
            )
        ]
        with torch.no_grad():  # the ceiling: every token cached, one forward over context + continuation
            whole = torch.cat([self.context, self.continuation], dim=-1)
            logits = bench.fresh()(input_ids=whole).logits[0].float()
        self.reference = logits[settings.context :]  # the predictions after each continuation token
        self.trials: list[dict] = []

    def passkey(self, run: Run, answer) -> dict:
        """Run every passkey prompt through ``answer(ids) -> token ids``; record and count the hits."""
        found = 0
        for prompt in self.prompts:
            ids = torch.tensor([prompt.ids], device=self.bench.device)
            text = self.bench.codec.decode(answer(ids))
            hit = prompt.key in text
            found += hit
            self.trials.append({"run": run.name, "length": prompt.length, "depth": prompt.depth, "key": prompt.key,
                                "answer": text, "found": hit})  # fmt: skip
        return {"passkey_found": found, "passkey_trials": len(self.prompts)}


def _run_full(state: _Bench, run: Run) -> dict:
    model = state.bench.fresh()
    cache = DynamicCache()
    logits = continuation_logits(model, state.context, state.continuation, cache, "step")
    kl, top1 = kl_and_top1(state.reference, logits)
    kept = cache.layers[0].keys.shape[-2]
    return {"kl": kl, "top1": top1, "kept_slots": kept, **state.passkey(run, lambda ids: generate_answer(model, ids))}


def _run_mmkv(state: _Bench, run: Run) -> dict:
    model = mmkv_compile.compile(state.bench.fresh(), run.method, run.budget, inductor=state.settings.inductor)
    cache = MMKVCache(model.config)
    logits = continuation_logits(model, state.context, state.continuation, cache, state.settings.teacher_forcing)
    kl, top1 = kl_and_top1(state.reference, logits)
    kept = cache.get_physical_length()
    return {"kl": kl, "top1": top1, "kept_slots": kept, **state.passkey(run, lambda ids: generate_answer(model, ids))}


def _run_random(state: _Bench, run: Run) -> dict:
    model = state.bench.fresh()
    generator = torch.Generator().manual_seed(state.settings.seed)

    def evict(cache):
        random_keep(cache, run.budget, generator)

    cache = MMKVCache(model.config)
    logits = continuation_logits(model, state.context, state.continuation, cache, "step", after_prefill=evict)
    kl, top1 = kl_and_top1(state.reference, logits)
    kept = cache.get_physical_length()
    found = state.passkey(run, lambda ids: greedy_answer(model, ids, MMKVCache(model.config), after_prefill=evict))
    return {"kl": kl, "top1": top1, "kept_slots": kept, **found}


def _run_kvpress(state: _Bench, run: Run) -> dict:
    model = state.bench.fresh()
    press = KVPress(run.method, run.budget, state.settings.context)
    press.prepare(model)
    cache = DynamicCache()
    logits = continuation_logits(model, state.context, state.continuation, cache, "step",
                                 during_prefill=lambda: press(model), logical_positions=True)  # fmt: skip
    kl, top1 = kl_and_top1(state.reference, logits)
    kept = cache.layers[0].keys.shape[-2]
    found = state.passkey(run, lambda ids: generate_answer(model, ids, during=lambda: press(model)))
    return {"kl": kl, "top1": top1, "kept_slots": kept, "press": press.description, **found}


COLUMNS: list[report.Column] = [
    ("cache", "source", report.text),
    ("method", "method", report.text),
    ("budget", "budget", report.text),
    ("kept slots", "kept_slots", report.text),
    ("KL nats/token", "kl", report.sig(3)),
    ("top-1 agreement", "top1", report.fmt(3)),
    ("passkey", "passkey", report.text),
]


def run_quality(settings: QualitySettings, out=print) -> dict:
    """Run the quality benchmark; print the table (through ``out``), write outputs; return the results."""
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch.manual_seed(settings.seed)
    bench = load_bench_model(settings.model, settings.scale, settings.device, getattr(torch, settings.dtype))
    facts = report.machine()
    missing = kvpress_missing() if "kvpress" in settings.caches else None
    runs = [Run("full cache", "full", None)] if "full" in settings.caches else []
    for method in settings.methods:
        for budget in settings.budgets if compresses(method) else [1.0]:
            if "mmkv" in settings.caches:
                runs.append(Run("mmkv", method, budget))
            if "kvpress" in settings.caches and not missing and has_press(method):
                runs.append(Run("kvpress", method, budget))
    if "random" in settings.caches:
        runs += [Run("random", "random", budget) for budget in settings.budgets]
    bar = tqdm(total=len(runs) + 1, desc="mmkv bench quality", unit="run")
    bar.set_postfix_str("reference logits")
    state = _Bench(settings, bench)
    bar.update(1)
    rows = []
    for run in runs:
        bar.set_postfix_str(run.name)
        do = {"full cache": _run_full, "mmkv": _run_mmkv, "random": _run_random, "kvpress": _run_kvpress}[run.source]
        result = do(state, run)
        result["passkey"] = f"{result['passkey_found']}/{result['passkey_trials']}"
        rows.append({"source": run.source, "method": run.method, "budget": run.budget, **result})
        bar.update(1)
    bar.close()
    report.finish(facts)
    table = report.markdown_table(rows, COLUMNS)
    kinds = (
        "one call per token" if settings.teacher_forcing == "step" else "one call (mmkv); one call per token (others)"
    )
    header = [
        f"mmkv bench quality: model {bench.name} ({'real' if bench.real_weights else 'random'} weights), "
        f"{settings.device} {settings.dtype}, inductor={'on' if settings.inductor else 'off'}",
        report.machine_line(facts),
        f"text: Python's help topics; context {settings.context} tokens, {settings.continuation} teacher-forced "
        f"tokens ({kinds}); passkey lengths {settings.passkey_lengths}, depths {settings.passkey_depths}",
    ]
    if missing:
        header.append(missing)
    legend = (
        "KL: mean KL(full || compressed) of the next-token distributions over the continuation, nats/token; "
        "top-1: share of positions where both pick the same token; passkey: hits/trials (greedy, "
        f"{ANSWER_TOKENS} tokens); kept slots: cache slots per layer and KV head after the continuation. "
        "full cache = the uncompiled model fed the same way (its KL is numerical noise), the ceiling; "
        "random = uniform random eviction at the same budget after an uncompiled prefill, the floor."
    )
    text = "\n".join(header) + "\n\n" + table + "\n\n" + legend
    out(text)
    results = {"settings": asdict(settings), "machine": facts, "kvpress": missing or "installed", "legend": legend,
               "rows": rows, "passkey_trials": state.trials}  # fmt: skip
    if settings.out:
        written = report.write(settings.out, text, results)
        from mmkv_compile.bench.plots import plot_quality

        written += plot_quality(rows, state.trials, settings.out)
        out("\nwrote " + ", ".join(str(path) for path in written))
    return results

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

A model trained on the cards task (``--model cards-vlm``, see :mod:`mmkv_compile.bench.cards`) is scored on
held-out multi-image questions instead (:func:`run_cards_quality`): exact-match accuracy per question kind,
KL to the full cache over the answer tokens, and the share of image and text slots each method keeps.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm
from transformers import DynamicCache

import mmkv_compile
from mmkv_compile.bench import cards, corpus, report
from mmkv_compile.bench.kvpress_adapter import KVPress, has_press, kvpress_missing
from mmkv_compile.bench.models import CARDS_TASK, BenchModel, TinyScale, load_bench_model
from mmkv_compile.cache import MMKVCache
from mmkv_compile.labels import Modality
from mmkv_compile.methods import compresses
from mmkv_compile.policy import BudgetStage

ANSWER_TOKENS = 8
CACHES = ("full", "mmkv", "random", "kvpress")  # the kinds of row: ceiling, product, floor, other library
TEXT_BUDGETS: list[float | int] = [0.5, 0.2]
TEXT_METHODS = ["snapkv", "h2o", "streaming_llm", "text_prior"]
# The cards task: budgets from "keeps everything" down to 10%, and the methods the issue compares: the
# modality-aware ones against the text-first ones (SnapKV, H2O, PyramidKV) and StreamingLLM's recency.
CARDS_BUDGETS: list[float | int] = [1.0, 0.5, 0.2, 0.1]
CARDS_METHODS = ["snapkv", "h2o", "pyramidkv", "streaming_llm", "madakv", "retentivekv", "hae", "meda", "look_m",
                 "vl_cache", "text_prior"]  # fmt: skip
OPERATORS = ("compiled", "eager")  # mmkv_compile.compile, or apply_eagerly (the reference it is tested against)


@dataclass
class QualitySettings:
    """What ``mmkv bench quality`` runs (see its ``--help``)."""

    model: str = "smollm2"
    context: int = 1024
    continuation: int = 64
    budgets: list[float | int] | None = None  # None: TEXT_BUDGETS, or CARDS_BUDGETS for the cards task
    methods: list[str] | None = None  # None: TEXT_METHODS, or CARDS_METHODS for the cards task
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
    questions: int = 100  # cards task: held-out questions per run, the kinds in turn
    images: int = 16  # cards task: images per prompt
    operator: str = "compiled"  # cards task: one of OPERATORS
    question_in_prompt: bool = False  # cards task: prefill the question with the context (see answer_logits)
    kinds: list[str] | None = None  # cards task: question kinds asked in turn (None: cards.BENCH_KINDS)


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


def plan_runs(settings: QualitySettings, kvpress: bool) -> list[Run]:
    """The rows a quality run computes, in table order: the full cache (ceiling), each method at each budget
    (with kvpress's matching press beside it when ``kvpress``), random eviction (floor)."""
    runs = [Run("full cache", "full", None)] if "full" in settings.caches else []
    for method in settings.methods:
        for budget in settings.budgets if compresses(method) else [1.0]:
            if "mmkv" in settings.caches:
                runs.append(Run("mmkv", method, budget))
            if kvpress and "kvpress" in settings.caches and has_press(method):
                runs.append(Run("kvpress", method, budget))
    if "random" in settings.caches:
        runs += [Run("random", "random", budget) for budget in settings.budgets]
    return runs


def score_runs(runs: list[Run], handlers: dict, state, bar) -> list[dict]:
    """One row per run, in order: its source, method and budget, then what the handler for its source measured
    on ``state``; ``bar`` shows progress and is closed at the end."""
    rows = []
    for run in runs:
        bar.set_postfix_str(run.name)
        rows.append(
            {"source": run.source, "method": run.method, "budget": run.budget, **handlers[run.source](state, run)}
        )
        bar.update(1)
    bar.close()
    return rows


def run_quality(settings: QualitySettings, out=print) -> dict:
    """Run the quality benchmark; print the table (through ``out``), write outputs; return the results."""
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch.manual_seed(settings.seed)
    bench = load_bench_model(settings.model, settings.scale, settings.device, getattr(torch, settings.dtype))
    if bench.task == CARDS_TASK:
        return run_cards_quality(settings, bench, out)
    settings = replace(settings, budgets=settings.budgets or TEXT_BUDGETS, methods=settings.methods or TEXT_METHODS)
    facts = report.machine()
    missing = kvpress_missing() if "kvpress" in settings.caches else None
    runs = plan_runs(settings, kvpress=not missing)
    bar = tqdm(total=len(runs) + 1, desc="mmkv bench quality", unit="run")
    bar.set_postfix_str("reference logits")
    state = _Bench(settings, bench)
    bar.update(1)
    handlers = {"full cache": _run_full, "mmkv": _run_mmkv, "random": _run_random, "kvpress": _run_kvpress}
    rows = score_runs(runs, handlers, state, bar)
    for row in rows:
        row["passkey"] = f"{row['passkey_found']}/{row['passkey_trials']}"
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


# -- the cards task: multi-image questions on a trained VLM -------------------------------------------


def cards_samples(settings: QualitySettings) -> list[cards.CardsSample]:
    """The held-out questions of ``settings.seed``: ``questions`` seeds from ``seed * questions`` on (so seeds
    pick disjoint sets), the question kinds (``settings.kinds``, default ``cards.BENCH_KINDS``) in turn so
    each kind is asked equally often."""
    first = settings.seed * settings.questions
    kinds = tuple(settings.kinds or cards.BENCH_KINDS)
    unknown = sorted(set(kinds) - set(cards.QUESTION_KINDS))
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; choose from {', '.join(cards.QUESTION_KINDS)}")
    seeds = cards.evaluation_seeds(settings.questions, seed=first)
    return [cards.make_sample(seed, settings.images, kinds[index % len(kinds)]) for index, seed in enumerate(seeds)]


def _call(model, cache, **inputs):
    if isinstance(cache, MMKVCache):
        cache.observe(inputs["input_ids"])  # labels for an uncompiled model (a compiled one observes again)
    return model(**inputs, past_key_values=cache, use_cache=True)


def kept_shares(cache, prompt_ids: torch.Tensor) -> dict[str, float]:
    """Share of the prompt's image slots and text slots still cached, over every layer and KV head."""
    if not isinstance(cache, MMKVCache) or not cache.mmkv_layers:
        return {"image_kept": 1.0, "text_kept": 1.0}
    images = int((prompt_ids == cards.IMAGE_TOKEN_ID).sum())
    counts = {"image_kept": (Modality.IMAGE, images), "text_kept": (Modality.TEXT, prompt_ids.numel() - images)}
    shares = {}
    for name, (modality, total) in counts.items():
        kept = [(layer.labels == int(modality)).sum(-1).float().mean() for layer in cache.mmkv_layers]
        shares[name] = float(torch.stack(kept).mean()) / total
    return shares


def answer_logits(
    model, sample: cards.CardsSample, cache, after_prefill=None, dtype=torch.float32, question_in_prompt: bool = False
) -> tuple[torch.Tensor, dict[str, float]]:
    """Prefill the context (images and the text fact) into ``cache``, let ``after_prefill(cache)`` evict,
    then feed the question and the expected answer one token per call (as ``generate`` feeds tokens).
    Returns the logits [A, V] that predict each of the A answer tokens (the answer word, then eos), and the
    kept shares right after the prefill.

    The question comes after the compression by default: a one-word answer to a question inside the prompt
    is read off the prefill's last position, which attends to the whole uncompressed prompt, so no method
    could change it (``question_in_prompt=True`` measures that setting: only the eos after the answer sees
    the compressed cache). After the prefill every method decides what to keep before it knows the
    question, as when one compressed cache serves the later turns of a chat."""
    asked = sample.input_ids.shape[-1]  # the answer's first token follows the question's last, at asked - 1
    split = asked if question_in_prompt else sample.question_start
    prompt = sample.input_ids[:, :split]
    feed = sample.input_ids[0, split:].tolist() + sample.answer_ids[:-1]
    logits = []
    with torch.no_grad():
        out = _call(model, cache, input_ids=prompt, pixel_values=sample.pixel_values.to(dtype))
        if question_in_prompt:
            logits.append(out.logits[0, -1].float())
        if after_prefill is not None:
            after_prefill(cache)
        shares = kept_shares(cache, prompt)
        for position, token in enumerate(feed, start=split):
            out = _call(model, cache, input_ids=torch.tensor([[token]]))
            if position >= asked - 1:
                logits.append(out.logits[0, -1].float())
    return torch.stack(logits), shares


class _Cards:
    """The held-out questions and the full cache's logits on them (the ceiling every row is compared with)."""

    def __init__(self, settings: QualitySettings, bench: BenchModel):
        self.settings, self.bench = settings, bench
        self.samples = cards_samples(settings)
        model = bench.fresh()
        self.reference = [self.logits(model, sample, DynamicCache())[0] for sample in self.samples]
        self.trials: list[dict] = []

    def logits(self, model, sample: cards.CardsSample, cache, after_prefill=None):
        return answer_logits(model, sample, cache, after_prefill, self.bench.dtype, self.settings.question_in_prompt)

    def score(self, run: Run, model, make_cache, after_prefill=None) -> dict:
        """Exact match (per kind and overall), mean KL over the answer tokens, and mean kept shares."""
        right, asked = dict.fromkeys(cards.QUESTION_KINDS, 0), dict.fromkeys(cards.QUESTION_KINDS, 0)
        kls, image_kept, text_kept = [], [], []
        for sample, reference in zip(self.samples, self.reference):
            logits, shares = self.logits(model, sample, make_cache(), after_prefill)
            predicted = logits.argmax(-1).tolist()
            hit = predicted == sample.answer_ids  # greedy decoding would give the same tokens
            right[sample.kind] += hit
            asked[sample.kind] += 1
            kls.append(kl_and_top1(reference, logits)[0])
            image_kept.append(shares["image_kept"])
            text_kept.append(shares["text_kept"])
            self.trials.append({"run": run.name, "seed": sample.seed, "kind": sample.kind, "question": sample.question,
                                "expected": sample.answer, "answer": cards.decode(predicted[:1]), "correct": hit})  # fmt: skip
        row = {f"accuracy_{kind}": right[kind] / asked[kind] for kind in cards.QUESTION_KINDS if asked[kind]}
        row.update(accuracy=sum(right.values()) / len(self.samples), kl=sum(kls) / len(kls),
                   image_kept=sum(image_kept) / len(image_kept), text_kept=sum(text_kept) / len(text_kept))  # fmt: skip
        return row


def _cards_full(state: _Cards, run: Run) -> dict:
    return state.score(run, state.bench.fresh(), DynamicCache)


def _cards_mmkv(state: _Cards, run: Run) -> dict:
    model, settings = state.bench.fresh(), state.settings
    if settings.operator == "eager":
        model = mmkv_compile.apply_eagerly(model, run.method, run.budget)
    else:
        model = mmkv_compile.compile(model, run.method, run.budget, inductor=settings.inductor)
    return state.score(run, model, lambda: MMKVCache(model.config))


def _cards_random(state: _Cards, run: Run) -> dict:
    model = state.bench.fresh()
    generator = torch.Generator().manual_seed(state.settings.seed)
    return state.score(
        run, model, lambda: MMKVCache(model.config), lambda cache: random_keep(cache, run.budget, generator)
    )


def cards_columns(kinds: tuple[str, ...]) -> list[report.Column]:
    """The cards table's columns: the run, the kept shares, accuracy and KL, then accuracy per asked kind."""
    return [
        ("cache", "source", report.text),
        ("method", "method", report.text),
        ("budget", "budget", report.text),
        ("image kept", "image_kept", report.fmt(3)),
        ("text kept", "text_kept", report.fmt(3)),
        ("accuracy", "accuracy", report.fmt(3)),
        ("KL nats/token", "kl", report.sig(3)),
        *((kind, f"accuracy_{kind}", report.fmt(2)) for kind in kinds),
    ]


def run_cards_quality(settings: QualitySettings, bench: BenchModel, out=print) -> dict:
    """The quality benchmark on the cards task (``bench.task == CARDS_TASK``): one row per run (full cache,
    each method at each budget, random eviction at each budget); print the table, write outputs (table.md,
    results.json, quality_cards.png); return the results."""
    if settings.operator not in OPERATORS:
        raise ValueError(f"operator {settings.operator!r}: choose one of {', '.join(OPERATORS)}")
    settings = replace(settings, budgets=settings.budgets or CARDS_BUDGETS, methods=settings.methods or CARDS_METHODS)
    facts = report.machine()
    runs = plan_runs(settings, kvpress=False)
    bar = tqdm(total=len(runs) + 1, desc="mmkv bench quality (cards)", unit="run")
    bar.set_postfix_str("full-cache reference")
    state = _Cards(settings, bench)
    bar.update(1)
    rows = score_runs(runs, {"full cache": _cards_full, "mmkv": _cards_mmkv, "random": _cards_random}, state, bar)
    report.finish(facts)
    sample = state.samples[0]
    operator = "apply_eagerly (the eager operator)" if settings.operator == "eager" else (
        f"mmkv_compile.compile, inductor={'on' if settings.inductor else 'off'}")  # fmt: skip
    header = [
        f"mmkv bench quality: model {bench.name} (trained weights), cards task, {settings.device} {settings.dtype}, "
        f"methods through {operator}",
        report.machine_line(facts),
        f"{len(state.samples)} held-out questions (seeds {state.samples[0].seed}-{state.samples[-1].seed}, kinds "
        f"{', '.join(dict.fromkeys(s.kind for s in state.samples))} in turn), {settings.images} images of {cards.TOKENS_PER_IMAGE} tokens each per prompt: a context of "
        f"{sample.question_start} tokens ({sample.image_token_count} image tokens), "
        + ("the question prefilled with it" if settings.question_in_prompt else "compressed before the question"),
    ]
    legend = (
        "accuracy: exact match of the greedy answer (word and eos); per-kind columns the same per question kind. "
        "KL: mean KL(full || compressed) over the answer tokens, nats/token. image kept / text kept: share of "
        "the context's image / text slots still cached after the prefill, mean over layers and KV heads. "
        + (
            "The context and the question are prefilled together, so the answer word comes from the uncompressed "
            "prefill; only the eos after it sees the compressed cache. "
            if settings.question_in_prompt
            else "The context (images and the text fact) is prefilled and compressed first, then the question is "
            "fed one token per call: a method must keep what a question it has not seen will need. "
        )
        + "full cache = the uncompiled model, the ceiling; random = uniform random eviction at the same budget, "
        "the floor."
    )
    text = (
        "\n".join(header)
        + "\n\n"
        + report.markdown_table(rows, cards_columns(tuple(dict.fromkeys(s.kind for s in state.samples))))
        + "\n\n"
        + legend
    )
    out(text)
    results = {"settings": asdict(settings), "machine": facts, "task": "cards", "legend": legend, "rows": rows,
               "trials": state.trials}  # fmt: skip
    if settings.out:
        written = report.write(settings.out, text, results)
        from mmkv_compile.bench.plots import plot_cards_quality

        written += plot_cards_quality(rows, settings.out)
        out("\nwrote " + ", ".join(str(path) for path in written))
    return results

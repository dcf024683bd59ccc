"""A compression policy: the settings of each stage of the one score-evict-merge operator.

Stages, in the order the operator runs them (docs/architecture.md):
  score   how useful each cached slot is (window attention, attention of all queries, recency, ...)
  budget  how many slots each (row, KV head) keeps at this layer: the budget's share of the prompt, spread
          over layers by a layer schedule and over KV heads by a head rule; never more than the share
  keep    which slots come first within that count: forced ones (sinks, recent window), then priority
          modalities, then the rest by score
  select  the top slots of that order
  merge   what happens to the rest: dropped, merged into their most similar kept slot, absorbed into memory
          slots, or parked in a recycle bin

A method (``mmkv_compile.methods``) is a preset of these stages. Each stage validates its settings where it is
built: an unknown choice raises and names the allowed ones. The policy travels into the graph as one canonical
string argument of ``torch.ops.mmkv.score_evict_merge`` (:meth:`Policy.to_string`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch

BUDGET_DENOMINATOR = 1 << 16  # float budgets are exact fractions with at most this denominator

MEMORY_SLOTS = 2  # merge "absorb": one memory slot for text, one for image/video/audio, at the front of a row


def exact_fraction(value: float) -> Fraction:
    """``value`` as an exact fraction, so slot counts are integer arithmetic on (Sym)ints everywhere."""
    return Fraction(value).limit_denominator(BUDGET_DENOMINATOR)


def _choose(stage: str, name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{stage}.{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _in_range(stage: str, name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{stage}.{name} must be a number in [{low}, {high}], got {value!r}")


def _at_least(stage: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{stage}.{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ScoreStage:
    """How useful each cached slot is.

    ``kind``: ``none`` (all equal), ``position`` (recency), ``window`` (attention of the last ``window``
    queries), ``all_queries`` (attention of every query), ``post_vision`` (of the queries after the last
    image, VL-Cache), ``retention`` (window attention mixed with within-modality entropy, RetentiveKV),
    ``dual_attention`` (HAE's global and individual attention of the text after the images).
    """

    KINDS = ("none", "position", "window", "all_queries", "post_vision", "retention", "dual_attention")
    POOLS = ("none", "max", "avg")
    GROUP_REDUCTIONS = ("mean", "max")

    kind: str = "window"
    window: int = 32
    group_reduce: str = "mean"  # how the query heads of a GQA group are combined
    pool: str = "none"  # 1-D pooling over neighbouring slots (prefill)
    kernel_size: int = 5
    accumulate: bool = False  # add each step's attention to the running score (H2O, TOVA-like decoding)
    share_across_heads: bool = False  # one token set per layer: scores averaged over KV heads (TOVA)
    retention_mix: float = 0.5  # kind "retention": weight of attention against entropy (RetentiveKV's lambda)
    global_threshold: float = 0.0015  # kind "dual_attention": a visual token's share of the global attention
    individual_threshold: float = 0.01  # kind "dual_attention": its largest attention from one text query

    def __post_init__(self) -> None:
        _choose("score", "kind", self.kind, self.KINDS)
        _choose("score", "pool", self.pool, self.POOLS)
        _choose("score", "group_reduce", self.group_reduce, self.GROUP_REDUCTIONS)
        _at_least("score", "window", self.window, 1)
        _at_least("score", "kernel_size", self.kernel_size, 1)
        for name in ("retention_mix", "global_threshold", "individual_threshold"):
            _in_range("score", name, getattr(self, name), 0.0, 1.0)


@dataclass(frozen=True)
class BudgetStage:
    """How many slots a (row, KV head) keeps at a layer.

    ``amount``: a float in (0, 1] keeps ``floor(amount * n)`` of a row's ``n`` tokens (those its layer can still
    attend to), an int keeps that many. ``layer_schedule`` spreads that over layers: ``uniform``, ``pyramid``
    (falling linearly, PyramidKV), ``allocated`` (from each layer's attention signal, MEDA and VL-Cache),
    ``compensated`` (from each layer's coverage demand, MadaKV), ``broadcast`` (the first layer decides, HAE).
    ``head_budget`` spreads a layer's budget over KV heads: ``uniform`` or ``global_topk`` (AdaKV; a head never
    keeps more than the uniform share, since every head's slots are padded to the same length).
    """

    LAYER_SCHEDULES = ("uniform", "pyramid", "allocated", "compensated", "broadcast")
    LAYER_SIGNALS = ("cross_modal", "attention", "density")
    ALLOCATIONS = ("softmax", "proportional")
    HEAD_BUDGETS = ("uniform", "global_topk")

    amount: float | int = 0.5
    layer_schedule: str = "uniform"
    pyramid_beta: float = 20.0
    layer_signal: str = "cross_modal"  # "allocated": what each layer measures
    allocation: str = "softmax"  # "allocated": how the signals become budgets
    layer_floor: float = 0.01  # "allocated": the smallest share of its tokens a layer keeps
    coverage: float = 0.9  # "compensated": share of a modality's score mass a head's demand covers
    compensation_cap: float = 2.0  # "compensated": a layer keeps at most this multiple of its even share
    head_budget: str = "uniform"
    head_floor: float = 0.2  # "global_topk": share of each head's uniform budget it always gets (AdaKV's alpha)

    def __post_init__(self) -> None:
        validate_budget(self.amount)
        _choose("budget", "layer_schedule", self.layer_schedule, self.LAYER_SCHEDULES)
        _choose("budget", "layer_signal", self.layer_signal, self.LAYER_SIGNALS)
        _choose("budget", "allocation", self.allocation, self.ALLOCATIONS)
        _choose("budget", "head_budget", self.head_budget, self.HEAD_BUDGETS)
        _in_range("budget", "pyramid_beta", self.pyramid_beta, 1.0, math.inf)
        _in_range("budget", "layer_floor", self.layer_floor, 0.0, 1.0)
        _in_range("budget", "coverage", self.coverage, 0.0, 1.0)
        _in_range("budget", "compensation_cap", self.compensation_cap, 1.0, math.inf)
        _in_range("budget", "head_floor", self.head_floor, 0.0, 1.0)

    @property
    def is_fraction(self) -> bool:
        return not isinstance(self.amount, int)

    def fraction(self) -> Fraction:
        """A float budget as an exact fraction, so counts are integer arithmetic on (Sym)ints."""
        return exact_fraction(self.amount)

    def uniform_count(self, live):
        """Slots kept out of ``live`` at a layer before any schedule: an int, a SymInt or an int tensor."""
        if isinstance(self.amount, int):
            return (
                torch.clamp(live, max=self.amount)
                if isinstance(live, torch.Tensor)
                else torch.sym_min(live, self.amount)
            )
        frac = self.fraction()
        return live * frac.numerator // frac.denominator

    def needs_all_layers(self) -> bool:
        """Whether a layer's count depends on the other layers (two phases inside the prefill graph)."""
        return self.layer_schedule in ("allocated", "compensated")


@dataclass(frozen=True)
class KeepStage:
    """Which slots come first within a row's count: ``sinks`` first tokens and the ``recent`` newest ones
    (or ``recent_fraction`` of the count) are forced; slots labelled one of ``priority_labels`` come next
    (a text-first method spends its budget on text first); ``modality_split`` splits a head's free count
    over modalities by their share of its scores (MadaKV). Forced slots shrink to fit the count."""

    sinks: int = 0
    recent: int = 0
    recent_fraction: float = 0.0
    priority_labels: tuple[int, ...] = ()
    modality_split: bool = False

    def __post_init__(self) -> None:
        _at_least("keep", "sinks", self.sinks, 0)
        _at_least("keep", "recent", self.recent, 0)
        _in_range("keep", "recent_fraction", self.recent_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class MergeStage:
    """What happens to evicted slots: ``none`` (dropped), ``avg``/``pivot``/``weighted`` (merged into the most
    similar kept slot, LOOK-M and MEDA), ``absorb`` (into a text and a visual memory slot, RetentiveKV).
    ``recycle_bin`` slots of a row are parked (held, scored, not attended) before deletion (HAE)."""

    RULES = ("none", "avg", "pivot", "weighted", "absorb")

    rule: str = "none"
    min_retention: float = 0.5  # "absorb": the smallest factor a memory's weight is kept by per step
    weighted_attention: bool = False  # a slot standing for w tokens gets log(w) added to its logits
    recycle_bin: int = 0

    def __post_init__(self) -> None:
        _choose("merge", "rule", self.rule, self.RULES)
        _in_range("merge", "min_retention", self.min_retention, 0.0, 1.0)
        _at_least("merge", "recycle_bin", self.recycle_bin, 0)

    @property
    def memory_slots(self) -> int:
        """Slots at the front of each row that hold absorbed tokens, else 0."""
        return MEMORY_SLOTS if self.rule == "absorb" else 0


@dataclass(frozen=True)
class LayerPlacement:
    """Where one operator call sits: its decoder layer, how many layers the cache has, the layer's attention
    window (0 for full attention), and the process group its KV heads are split over under tensor parallelism
    ("" when this process holds them all: ``kernels/heads.py``). Set per site from the cache layer, never by a
    method."""

    index: int = 0
    count: int = 1
    window: int = 0
    heads: str = ""

    def to_string(self) -> str:
        """The form ``mmkv::cache_append`` records in the graph."""
        return f"{self.index}:{self.count}:{self.window}:{self.heads}"

    @staticmethod
    def from_string(text: str) -> LayerPlacement:
        index, count, window, heads = text.split(":", 3)
        return LayerPlacement(int(index), int(count), int(window), heads)


@dataclass(frozen=True)
class Policy:
    """Stage settings of the operator. Build one through a method preset (``mmkv_compile.methods``)."""

    method: str  # for reports only: nothing branches on it
    score: ScoreStage = field(default_factory=ScoreStage)
    budget: BudgetStage = field(default_factory=BudgetStage)
    keep: KeepStage = field(default_factory=KeepStage)
    merge: MergeStage = field(default_factory=MergeStage)
    evict_while_decoding: bool = False
    compress: bool = True  # False: the cache keeps every token (labels and positions still tracked)
    placement: LayerPlacement = field(default_factory=LayerPlacement)

    @property
    def keeps_everything(self) -> bool:
        """True when no slot can ever be evicted (``compress=False``, or a float budget of 1.0)."""
        return not self.compress or (self.budget.is_fraction and self.budget.amount >= 1.0)

    @property
    def static_output_length(self) -> bool:
        """Whether the kept length follows from shapes alone (no data-dependent size)."""
        return self.keeps_everything or not self.budget.needs_all_layers()

    @property
    def reduces_over_heads(self) -> bool:
        """Whether a decision reduces over a layer's KV heads (so, under tensor parallelism, over ranks): TOVA's
        shared score, AdaKV's top-k over heads, HAE's dual attention, the allocated and compensated schedules'
        layer signals."""
        return not self.keeps_everything and (
            self.score.share_across_heads
            or self.score.kind == "dual_attention"
            or self.budget.head_budget == "global_topk"
            or self.budget.needs_all_layers()
        )

    def at_layer(self, placement: LayerPlacement) -> Policy:
        """This policy for one decoder layer."""
        return dataclasses.replace(self, placement=placement)

    def layer_share(self) -> Fraction:
        """This layer's share of the mean per-layer budget (1 unless the schedule is ``pyramid``).

        PyramidKV: an arithmetic sequence from ``2 - 1/beta`` at layer 0 down to ``1/beta`` at the last
        layer; the shares average to 1, so the layers' budgets sum to at most the uniform total.
        """
        count = self.placement.count
        if self.budget.layer_schedule != "pyramid" or count <= 1:
            return Fraction(1)
        beta = exact_fraction(self.budget.pyramid_beta)
        top, bottom = 2 - 1 / beta, 1 / beta
        return top - (top - bottom) * self.placement.index / (count - 1)

    def to_string(self) -> str:
        """Canonical string form, the operator's ``policy`` argument."""
        data = dataclasses.asdict(self)
        data["budget"]["amount_kind"] = "tokens" if isinstance(self.budget.amount, int) else "fraction"
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_string(text: str) -> Policy:
        """Inverse of :meth:`to_string` (cached: the kernel parses it on every call)."""
        return _parse_policy(text)


@lru_cache(maxsize=512)
def _parse_policy(text: str) -> Policy:
    data = json.loads(text)
    budget = data["budget"]
    kind = budget.pop("amount_kind")
    budget["amount"] = int(budget["amount"]) if kind == "tokens" else float(budget["amount"])
    data["keep"]["priority_labels"] = tuple(data["keep"]["priority_labels"])
    return Policy(
        method=data["method"],
        score=ScoreStage(**data["score"]),
        budget=BudgetStage(**budget),
        keep=KeepStage(**data["keep"]),
        merge=MergeStage(**data["merge"]),
        evict_while_decoding=data["evict_while_decoding"],
        compress=data["compress"],
        placement=LayerPlacement(**data["placement"]),
    )


def live_length(total, window: int):
    """Slots of ``total`` the next query can still attend to: all of them, or the ``window - 1`` newest under a
    sliding window of ``window`` (the next query sees itself and ``window - 1`` earlier tokens)."""
    if not window:
        return total
    return (
        torch.sym_min(total, window - 1) if not isinstance(total, torch.Tensor) else torch.clamp(total, max=window - 1)
    )


def layer_count(policy: Policy, live):
    """Slots a row keeps at this layer out of its ``live`` slots, for the single-phase schedules (uniform,
    pyramid; broadcast's first layer): ints, SymInts or int tensors alike.

    Pyramid: the recent window stays, the rest scales by the layer's share, rounded down, so the layers'
    counts never sum to more than the uniform total.
    """
    base = policy.budget.uniform_count(live)
    share = policy.layer_share()
    if share == 1:
        return base
    tensor = isinstance(base, torch.Tensor)
    recent = torch.clamp(base, max=policy.keep.recent) if tensor else torch.sym_min(base, policy.keep.recent)
    scaled = recent + (base - recent) * share.numerator // share.denominator
    return torch.minimum(scaled, live) if tensor else torch.sym_min(scaled, live)


def output_length(policy: Policy, total: int, num_new: int, prefill: bool):
    """Physical slots the operator returns for ``total`` input slots, or None if that depends on data.

    Works for ints and SymInts (the fake kernel calls it with symbolic sizes). Memory slots (merge
    ``absorb``) are added at prefill and carried through every later step. After the prompt, a float budget
    holds each layer at the size it had before the step plus the budget's share of the step's tokens (none for
    one token, since the share rounds down; a follow-up prompt's share for a later turn).
    """
    if policy.keeps_everything:
        return total
    memory = policy.merge.memory_slots
    if not prefill and policy.budget.is_fraction:
        return total - num_new + layer_count(policy, live_length(num_new, policy.placement.window))
    if not policy.static_output_length:
        return None
    regular = total if prefill else total - memory
    return memory + layer_count(policy, live_length(regular, policy.placement.window))


def validate_budget(budget) -> float | int:
    """Check a user budget: a float in (0, 1] or an int >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(
            f"budget must be a float in (0, 1] (fraction of the prompt kept) or an int >= 1 (tokens kept), "
            f"got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, float):
        if not (0.0 < budget <= 1.0) or math.isnan(budget):
            raise ValueError(
                f"budget={budget!r}: a float budget must be in (0, 1] (the fraction of tokens kept); "
                "use an int >= 1 for a number of tokens"
            )
        return budget
    if budget < 1:
        raise ValueError(f"budget={budget!r}: an int budget must be >= 1 (the number of tokens kept)")
    return int(budget)

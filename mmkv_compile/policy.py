"""A compression policy: the settings of each stage of the one score-evict-merge operator.

Stages, in order (see docs/design.md):
  score   how useful each cached slot is (window attention, attention of all queries, recency)
  budget  how many slots each (row, KV head) keeps
  keep    slots that are always kept (sinks, recent window, whole modalities)
  select  top-k by score among the rest
  merge   what happens to evicted slots: dropped, or merged into their most similar kept slot

A method (``mmkv_compile.methods``) is a preset of these fields. The policy travels into the graph as
one canonical string argument of ``torch.ops.mmkv.score_evict_merge``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch

SCORES = ("none", "position", "window", "all_queries", "post_vision", "retention", "dual_attention")
POOLS = ("none", "max", "avg")
GROUP_REDUCTIONS = ("mean", "max")
LAYER_SCHEDULES = ("uniform", "pyramid", "allocated", "compensated", "broadcast")
LAYER_SIGNALS = ("cross_modal", "attention", "density")
ALLOCATIONS = ("softmax", "proportional")
HEAD_BUDGETS = ("uniform", "global_topk")
MERGES = ("none", "avg", "pivot", "weighted", "absorb")
MEMORY_SLOTS = 2  # merge="absorb": one memory slot for text, one for image/video/audio, at the front of a row


@dataclass(frozen=True)
class Policy:
    """Stage settings of the operator. Build one through a method preset, not by hand."""

    method: str
    budget: float | int
    score: str = "window"
    window: int = 32
    group_reduce: str = "mean"
    pool: str = "none"
    kernel_size: int = 5
    accumulate: bool = False
    sinks: int = 0
    recent: int = 0
    recent_fraction: float = 0.0
    keep_labels: tuple[int, ...] = field(default_factory=tuple)
    forced_in_budget: bool = True
    evict_while_decoding: bool = False
    merge: str = "none"
    share_across_heads: bool = False  # one token set per layer: scores averaged over KV heads (TOVA)
    layer_schedule: str = "uniform"  # how the budget is spread over layers
    pyramid_beta: float = 20.0
    layer_signal: str = "cross_modal"  # layer_schedule="allocated": what each layer measures (see layer_signals)
    allocation: str = "softmax"  # layer_schedule="allocated": how the signals become budgets
    layer_floor: float = 0.01  # layer_schedule="allocated": the smallest per-layer fraction
    head_budget: str = "uniform"  # how a layer's budget is spread over KV heads
    head_floor: float = 0.2  # global_topk: share of each head's uniform budget it always gets (AdaKV's alpha)
    modality_split: bool = False  # a head's free budget split over modalities by their share of its scores (MadaKV)
    coverage: float = 0.9  # compensated: share of a modality's score mass a head's demand covers (MadaKV's theta)
    compensation_cap: float = 2.0  # compensated: a head keeps at most this multiple of its even share
    retention_mix: float = 0.5  # score="retention": weight of attention against entropy (RetentiveKV's lambda)
    min_retention: float = 0.5  # merge="absorb": the smallest factor a memory's weight is kept by per step
    weighted_attention: bool = False  # a slot standing for w tokens gets log(w) added to its logits
    global_threshold: float = 0.0015  # score="dual_attention": a visual token's share of the global attention
    individual_threshold: float = 0.01  # score="dual_attention": its largest attention from one text query
    recycle_bin: int = 0  # slots of a row's cache parked (kept, scored, not attended) before deletion (HAE)
    layer: int = 0  # set per attention site by the passes
    num_layers: int = 1

    # -- derived facts the passes and the fake kernel need -------------------------------------
    @property
    def keeps_everything(self) -> bool:
        """True when no slot can ever be evicted (``full``, or a float budget of 1.0)."""
        return self.method == "full" or (isinstance(self.budget, float) and self.budget >= 1.0)

    @property
    def static_output_length(self) -> bool:
        """Whether the kept length follows from shapes alone (no data-dependent size)."""
        if self.keeps_everything:
            return True
        if self.score == "dual_attention" or self.layer_schedule in ("compensated", "broadcast"):
            return False
        return (self.forced_in_budget or not self.keep_labels) and self.head_budget == "uniform"

    @property
    def memory_slots(self) -> int:
        """Slots at the front of each row that hold absorbed tokens (``merge="absorb"``), else 0."""
        return MEMORY_SLOTS if self.merge == "absorb" else 0

    def at_layer(self, layer: int, num_layers: int) -> Policy:
        """This policy for one decoder layer (per-layer schedules need to know which)."""
        return dataclasses.replace(self, layer=layer, num_layers=num_layers)

    def layer_share(self) -> Fraction:
        """This layer's share of the mean per-layer budget (1 for a uniform schedule).

        PyramidKV: an arithmetic sequence from ``2 - 1/beta`` at layer 0 down to ``1/beta`` at the last
        layer; the shares average to 1, so the layers' budgets sum to the configured total.
        """
        if self.layer_schedule != "pyramid" or self.num_layers <= 1:
            return Fraction(1)  # an allocated schedule's budgets arrive as per-row fractions instead
        beta = Fraction(self.pyramid_beta).limit_denominator(1 << 12)
        top, bottom = 2 - 1 / beta, 1 / beta
        return top - (top - bottom) * self.layer / (self.num_layers - 1)

    def to_string(self) -> str:
        """Canonical string form, the operator's ``policy`` argument."""
        data = asdict(self)
        data["budget_kind"] = "tokens" if isinstance(self.budget, int) else "fraction"
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_string(text: str) -> Policy:
        """Inverse of :meth:`to_string` (cached: the kernel parses it on every call)."""
        return _parse_policy(text)

    def budget_fraction(self) -> Fraction:
        """The float budget as an exact fraction, so lengths are integer arithmetic on (Sym)ints."""
        return Fraction(self.budget).limit_denominator(1 << 16)


@lru_cache(maxsize=256)
def _parse_policy(text: str) -> Policy:
    data = json.loads(text)
    kind = data.pop("budget_kind")
    data["budget"] = int(data["budget"]) if kind == "tokens" else float(data["budget"])
    data["keep_labels"] = tuple(data["keep_labels"])
    return Policy(**data)


def ceil_fraction(n, frac: Fraction):
    """``ceil(n * frac)`` in integer arithmetic; works for ints and SymInts."""
    return (n * frac.numerator + frac.denominator - 1) // frac.denominator


def output_length(policy: Policy, total: int, num_new: int, prefill: bool):
    """Physical length the operator returns for ``total`` input slots, or None if it depends on data.

    Works for ints and SymInts (the fake kernel calls it with symbolic sizes). Memory slots
    (``merge="absorb"``) are added at prefill and carried through every later step.
    """
    if policy.keeps_everything:
        return total
    if not prefill and not isinstance(policy.budget, int):
        return total - num_new  # held at the size it had before this step
    if not policy.static_output_length:
        return None
    memory = policy.memory_slots
    regular = total if prefill else total - memory
    if isinstance(policy.budget, int):
        return memory + torch.sym_min(regular, scheduled(policy, torch.sym_min(regular, policy.budget), regular))
    return memory + scheduled(policy, ceil_fraction(regular, policy.budget_fraction()), regular)


def scheduled(policy: Policy, base, limit):
    """Apply the layer schedule to a uniform per-layer count ``base`` (an int, SymInt or int tensor): the
    forced recent window stays, the rest scales by the layer's share; never more than ``limit``."""
    share = policy.layer_share()
    if share == 1:
        return base
    if isinstance(base, torch.Tensor):
        spread = (base - policy.recent).clamp(min=0)
        return torch.minimum(policy.recent + ceil_fraction(spread, share), limit)
    spread = torch.sym_max(base - policy.recent, 0)
    return torch.sym_min(policy.recent + ceil_fraction(spread, share), limit)


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

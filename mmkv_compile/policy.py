"""A compression policy: the settings of each stage of the one score-evict-merge operator.

Stages, in order (see docs/design.md):
  score   how useful each cached slot is (window attention, attention of all queries, recency)
  budget  how many slots each (row, KV head) keeps
  keep    slots that are always kept (sinks, recent window, whole modalities)
  select  top-k by score among the rest
  merge   what happens to evicted slots (dropped today)

A method (``mmkv_compile.methods``) is a preset of these fields. The policy travels into the graph as
one canonical string argument of ``torch.ops.mmkv.score_evict_merge``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache

SCORES = ("none", "position", "window", "all_queries")
POOLS = ("none", "max", "avg")
GROUP_REDUCTIONS = ("mean", "max")
MERGES = ("none",)


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

    # -- derived facts the passes and the fake kernel need -------------------------------------
    @property
    def keeps_everything(self) -> bool:
        """True when no slot can ever be evicted (``full``, or a float budget of 1.0)."""
        return self.method == "full" or (isinstance(self.budget, float) and self.budget >= 1.0)

    @property
    def static_output_length(self) -> bool:
        """Whether the kept length follows from shapes alone (no data-dependent size)."""
        return self.forced_in_budget or not self.keep_labels or self.keeps_everything

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

    Works for ints and SymInts (the fake kernel calls it with symbolic sizes).
    """
    if policy.keeps_everything:
        return total
    if not policy.static_output_length:
        return None
    if isinstance(policy.budget, int):
        return _sym_min(total, policy.budget)
    if prefill:
        return ceil_fraction(total, policy.budget_fraction())
    return total - num_new


def _sym_min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    import torch

    return torch.sym_min(a, b)


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

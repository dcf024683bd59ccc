"""H2O: heavy hitters by accumulated attention plus a recent window; holds the cache at the budget while decoding."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_number
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class H2O(Method):
    name = "h2o"
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023 (arXiv 2306.14048)"
    description = "attention accumulated over every query so far; a recent share of the budget is always kept"

    recent_ratio: float = 0.5

    def validate(self, budget: float | int) -> None:
        check_number(self.name, "recent_ratio", self.recent_ratio, 0, 1,
                     "share of the budget kept for recent tokens")  # fmt: skip

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, score=ScoreStage(kind="all_queries", accumulate=True), budget=BudgetStage(amount=budget),
            keep=KeepStage(recent_fraction=float(self.recent_ratio)), evict_while_decoding=True,
        )  # fmt: skip

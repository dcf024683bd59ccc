"""No compression: the reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method
from mmkv_compile.policy import BudgetStage, Policy, ScoreStage


@dataclass(frozen=True)
class Full(Method):
    name = "full"
    paper = "-"
    description = "keep every token (labels and positions are still tracked)"

    def policy(self, budget: float | int) -> Policy:
        return Policy(method=self.name, score=ScoreStage(kind="none"), budget=BudgetStage(amount=1.0), compress=False)

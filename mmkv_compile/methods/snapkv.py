"""SnapKV: score the prompt by the attention of its last `window` queries, pooled; prefill only."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_choice, check_int, check_odd
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class SnapKV(Method):
    name = "snapkv"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 (arXiv 2404.14469)"
    description = "observation-window attention, 1-D pooled, GQA group reduced; window kept; compresses the prompt"

    window: int = 32
    kernel_size: int = 5
    pool: str = "avg"
    group_reduce: str = "mean"

    def validate(self, budget: float | int) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel_size", self.kernel_size, 1)
        check_odd(self.name, "kernel_size", self.kernel_size)
        check_choice(self.name, "pool", self.pool, ScoreStage.POOLS)
        check_choice(self.name, "group_reduce", self.group_reduce, ScoreStage.GROUP_REDUCTIONS)
        self.check_fits_budget("window", budget)

    def score(self) -> ScoreStage:
        return ScoreStage(kind="window", window=self.window, pool=self.pool, kernel_size=self.kernel_size,
                          group_reduce=self.group_reduce)  # fmt: skip

    def policy(self, budget: float | int) -> Policy:
        return Policy(method=self.name, score=self.score(), budget=self.budget_stage(budget),
                      keep=KeepStage(recent=self.window))  # fmt: skip

    def budget_stage(self, budget: float | int) -> BudgetStage:
        """The budget stage (PyramidKV and AdaKV change only this)."""
        return BudgetStage(amount=budget)

"""Text prior: spend the budget on text first, then on image and video tokens by window attention."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.labels import Modality
from mmkv_compile.methods.base import Method, check_choice, check_int, check_odd
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class TextPrior(Method):
    name = "text_prior"
    paper = "the text prior of LOOK-M (Wan et al., EMNLP Findings 2024, arXiv 2406.18139), without merging"
    description = (
        "text first within the budget (the highest-scored text if it does not all fit), then image/video by score"
    )

    window: int = 32
    kernel_size: int = 5
    pool: str = "avg"

    def validate(self, budget: float | int) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel_size", self.kernel_size, 1)
        check_odd(self.name, "kernel_size", self.kernel_size)
        check_choice(self.name, "pool", self.pool, ScoreStage.POOLS)

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, score=ScoreStage(kind="window", window=self.window, pool=self.pool,
                                               kernel_size=self.kernel_size),
            budget=BudgetStage(amount=budget), keep=KeepStage(priority_labels=(int(Modality.TEXT),)),
        )  # fmt: skip

"""LOOK-M: text prior, image tokens ranked by prompt attention, evicted tokens merged into kept ones."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.labels import Modality
from mmkv_compile.methods.base import Method, check_choice
from mmkv_compile.policy import BudgetStage, KeepStage, MergeStage, Policy, ScoreStage

MERGE_RULES = ("pivot", "avg", "weighted")


@dataclass(frozen=True)
class LookM(Method):
    name = "look_m"
    paper = "Wan et al., LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference, EMNLP Findings 2024 (arXiv 2406.18139)"
    description = (
        "text first within the budget; image/video tokens by attention of all prompt queries; evicted ones merged "
        "(pivot/avg/weighted) into the most similar kept token"
    )

    merge: str = "pivot"

    def validate(self, budget: float | int) -> None:
        check_choice(self.name, "merge", self.merge, MERGE_RULES)

    def policy(self, budget: float | int) -> Policy:
        return Policy(method=self.name, score=ScoreStage(kind="all_queries"), budget=BudgetStage(amount=budget),
                      keep=KeepStage(priority_labels=(int(Modality.TEXT),)), merge=MergeStage(rule=self.merge))  # fmt: skip

"""MEDA: per-layer budgets from cross-modal attention entropy, text first, evicted tokens merged by average."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.labels import Modality
from mmkv_compile.methods.base import Method, check_choice, check_number
from mmkv_compile.policy import BudgetStage, KeepStage, MergeStage, Policy, ScoreStage

SIGNALS = ("cross_modal", "attention")

MERGE_RULES = ("avg", "pivot", "weighted", "none")


@dataclass(frozen=True)
class MEDA(Method):
    name = "meda"
    paper = "Wan et al., MEDA: Dynamic KV Cache Allocation for Efficient Multimodal Long-Context Inference, NAACL 2025 (arXiv 2502.17599)"
    description = (
        "layer budgets = softmax of each layer's cross-modal attention entropy (allocated at the end of prefill, "
        "inside the graph, summing to the uniform total); text first; image tokens by prompt attention; evicted "
        "ones averaged into the most similar kept"
    )

    signal: str = "cross_modal"
    merge: str = "avg"
    floor: float = 0.01

    def validate(self, budget: float | int) -> None:
        self.require_fraction(budget, "layers get shares of their tokens")
        check_choice(self.name, "signal", self.signal, SIGNALS)
        check_choice(self.name, "merge", self.merge, MERGE_RULES)
        check_number(self.name, "floor", self.floor, 0, budget, "the smallest layer share, at most the budget")
        if self.floor == 0:
            raise ValueError("meda: floor must be > 0 (the smallest layer share), got 0")

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, score=ScoreStage(kind="all_queries"),
            budget=BudgetStage(amount=budget, layer_schedule="allocated", layer_signal=self.signal,
                               allocation="softmax", layer_floor=float(self.floor)),
            keep=KeepStage(priority_labels=(int(Modality.TEXT),)), merge=MergeStage(rule=self.merge),
        )  # fmt: skip

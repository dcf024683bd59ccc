"""MEDA: per-layer budgets from cross-modal attention entropy, text kept, evicted tokens merged by average."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.labels import Modality
from mmkv_compile.methods.base import Method, check_choice, is_number
from mmkv_compile.policy import Policy

SIGNALS = ("cross_modal", "attention")

MERGE_RULES = ("avg", "pivot", "weighted", "none")


@dataclass(frozen=True)
class MEDA(Method):
    name = "meda"
    paper = "Wan et al., MEDA: Dynamic KV Cache Allocation for Efficient Multimodal Long-Context Inference, NAACL 2025 (arXiv 2502.17599)"
    description = (
        "layer budgets = softmax of each layer's cross-modal attention entropy (allocated at the end of prefill, "
        "inside the graph); text kept; image tokens by prompt attention; evicted ones averaged into the most similar kept"
    )

    signal: str = "cross_modal"
    merge: str = "avg"
    floor: float = 0.01

    def validate(self, budget: float | int) -> None:
        if not isinstance(budget, float):
            raise ValueError(
                f"meda: budget must be a float in (0, 1] (layers get fractions of their image tokens), got {budget!r}"
            )
        check_choice(self.name, "signal", self.signal, SIGNALS)
        check_choice(self.name, "merge", self.merge, MERGE_RULES)
        if not is_number(self.floor) or not 0 < self.floor <= budget:
            raise ValueError(
                f"meda: floor must be a float in (0, budget] (the smallest layer fraction), got {self.floor!r}"
            )

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="all_queries", keep_labels=(int(Modality.TEXT),),
            forced_in_budget=False, merge=self.merge, layer_schedule="allocated", layer_signal=self.signal, allocation="softmax",
            layer_floor=float(self.floor),
        )  # fmt: skip

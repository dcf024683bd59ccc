"""LOOK-M: text prior, image tokens ranked by prompt attention, evicted tokens merged into kept ones."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.labels import Modality
from mmkv_compile.methods.base import Method, check_choice
from mmkv_compile.policy import Policy

MERGE_RULES = ("pivot", "avg", "weighted")


@dataclass(frozen=True)
class LookM(Method):
    name = "look_m"
    paper = "Wan et al., LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference, EMNLP Findings 2024 (arXiv 2406.18139)"
    description = (
        "all text kept; image/video tokens by attention of all prompt queries; evicted ones merged (pivot/avg/weighted)"
    )

    merge: str = "pivot"

    def validate(self, budget: float | int) -> None:
        check_choice(self.name, "merge", self.merge, MERGE_RULES)

    def policy(self, budget: float | int) -> Policy:
        return Policy(method=self.name, budget=budget, score="all_queries", keep_labels=(int(Modality.TEXT),),
                      forced_in_budget=False, merge=self.merge)  # fmt: skip

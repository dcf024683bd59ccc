"""HAE: dual-attention pruning of visual tokens at the first layer, broadcast to every layer; a recycle bin
while decoding."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_int, check_number
from mmkv_compile.policy import BudgetStage, KeepStage, MergeStage, Policy, ScoreStage


@dataclass(frozen=True)
class HAE(Method):
    name = "hae"
    paper = "Ma et al., HAE: Hierarchical Adaptive Eviction for KV Cache Management in Multimodal Language Models, arXiv 2602.02197"
    description = (
        "prefill: visual tokens below both the global and the individual attention threshold of the text after "
        "them are evicted at the first layer, text first and at most the budget kept, the same positions at "
        "every layer; decoding: accumulated attention, the lowest slots parked in a recycle bin and restored if "
        "they rise"
    )

    global_threshold: float = 0.0015
    individual_threshold: float = 0.01
    recycle_bin: int = 8
    recent: int = 8

    def validate(self, budget: float | int) -> None:
        self.require_fraction(budget, "the share of the prompt kept")
        check_number(self.name, "global_threshold", self.global_threshold, 0, 1, "share of the global attention")
        check_number(self.name, "individual_threshold", self.individual_threshold, 0, 1, "largest single attention")
        check_int(self.name, "recycle_bin", self.recycle_bin, 0)
        check_int(self.name, "recent", self.recent, 1)

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name,
            score=ScoreStage(kind="dual_attention", accumulate=True, global_threshold=float(self.global_threshold),
                             individual_threshold=float(self.individual_threshold)),
            budget=BudgetStage(amount=budget, layer_schedule="broadcast"), keep=KeepStage(recent=self.recent),
            merge=MergeStage(recycle_bin=self.recycle_bin), evict_while_decoding=True,
        )  # fmt: skip

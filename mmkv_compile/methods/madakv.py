"""MadaKV: per-head modality budgets from each head's attention, and budgets compensated from layer to layer."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_choice, check_int, check_number
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class MadaKV(Method):
    name = "madakv"
    paper = "Li et al., MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-Context Inference, ACL 2025 (arXiv 2506.15724)"
    description = (
        "window attention; each head splits its budget over modalities by the attention it gives each (MPA); "
        "a layer keeps what covers `coverage` of its heads' attention, over- or under-spending moves budget to "
        "later layers (HCC), never more than the uniform total"
    )

    window: int = 32
    coverage: float = 0.9
    cap: float = 2.0
    group_reduce: str = "mean"

    def validate(self, budget: float | int) -> None:
        self.require_fraction(budget, "each layer's share of the prompt")
        check_int(self.name, "window", self.window, 1)
        check_choice(self.name, "group_reduce", self.group_reduce, ScoreStage.GROUP_REDUCTIONS)
        check_number(self.name, "coverage", self.coverage, 0, 1, "share of a modality's attention a head keeps")
        if self.coverage == 0:
            raise ValueError("madakv: coverage must be > 0 (share of a modality's attention a head keeps), got 0")
        check_number(self.name, "cap", self.cap, 1, float("inf"),
                     "most a layer may keep, in multiples of its even share")  # fmt: skip

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, score=ScoreStage(kind="window", window=self.window, group_reduce=self.group_reduce),
            budget=BudgetStage(amount=budget, layer_schedule="compensated", coverage=float(self.coverage),
                               compensation_cap=float(self.cap)),
            keep=KeepStage(recent=self.window, modality_split=True),
        )  # fmt: skip

"""MadaKV: per-head modality budgets from each head's attention, and budgets compensated from layer to layer."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_choice, check_fits_budget, check_int, is_number
from mmkv_compile.policy import GROUP_REDUCTIONS, Policy


@dataclass(frozen=True)
class MadaKV(Method):
    name = "madakv"
    paper = "Li et al., MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-Context Inference, ACL 2025 (arXiv 2506.15724)"
    description = (
        "window attention; each head splits its budget over modalities by the attention it gives each (MPA); "
        "a head keeps what covers `coverage` of that attention, over- or under-spending moves budget to later layers (HCC)"
    )

    window: int = 32
    coverage: float = 0.9
    cap: float = 2.0
    group_reduce: str = "mean"

    def validate(self, budget: float | int) -> None:
        if not isinstance(budget, float):
            raise ValueError(
                f"madakv: budget must be a float in (0, 1] (each head's share of the prompt), got {budget!r}"
            )
        check_int(self.name, "window", self.window, 1)
        check_fits_budget(self.name, "window", self.window, budget)
        check_choice(self.name, "group_reduce", self.group_reduce, GROUP_REDUCTIONS)
        if not is_number(self.coverage) or not 0 < self.coverage <= 1:
            raise ValueError(
                f"madakv: coverage must be a float in (0, 1] (share of a modality's attention a head keeps), got {self.coverage!r}"
            )
        if not is_number(self.cap) or self.cap < 1:
            raise ValueError(
                f"madakv: cap must be a number >= 1 (most a head may keep, in multiples of its even share), got {self.cap!r}"
            )

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="window", window=self.window, group_reduce=self.group_reduce,
            recent=self.window, modality_split=True, layer_schedule="compensated", coverage=float(self.coverage),
            compensation_cap=float(self.cap),
        )  # fmt: skip

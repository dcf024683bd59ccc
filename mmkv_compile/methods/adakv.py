"""AdaKV: SnapKV-style scores with per-head budgets from a top-k over all heads of a layer."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import check_number
from mmkv_compile.methods.snapkv import SnapKV
from mmkv_compile.policy import BudgetStage


@dataclass(frozen=True)
class AdaKV(SnapKV):
    name = "adakv"
    paper = "Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation, NeurIPS 2025 (arXiv 2407.11550)"
    description = (
        "per-head budgets: heads holding fewer of the layer's top scores keep fewer (floor `alpha`); "
        "no head keeps more than the uniform share, since heads are padded to one length"
    )

    kernel_size: int = 7
    pool: str = "max"
    alpha: float = 0.2

    def validate(self, budget: float | int) -> None:
        super().validate(budget)
        check_number(self.name, "alpha", self.alpha, 0, 1, "share of each head's uniform budget it always keeps")

    def budget_stage(self, budget: float | int) -> BudgetStage:
        return BudgetStage(amount=budget, head_budget="global_topk", head_floor=float(self.alpha))

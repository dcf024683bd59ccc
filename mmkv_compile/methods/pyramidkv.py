"""PyramidKV: SnapKV scores, with budgets decreasing arithmetically from the first layer to the last."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import check_number
from mmkv_compile.methods.snapkv import SnapKV
from mmkv_compile.policy import BudgetStage


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = "Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv 2406.02069)"
    description = "SnapKV scores; layer budgets fall linearly from first to last layer (ratio 2*beta-1), summing to at most the total"

    beta: float = 20.0

    def validate(self, budget: float | int) -> None:
        super().validate(budget)
        check_number(self.name, "beta", self.beta, 1, float("inf"),
                     "ratio of the first layer's share to the last's is 2*beta-1")  # fmt: skip

    def budget_stage(self, budget: float | int) -> BudgetStage:
        return BudgetStage(amount=budget, layer_schedule="pyramid", pyramid_beta=float(self.beta))

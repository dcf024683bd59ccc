"""AdaKV: SnapKV-style scores with per-head budgets from a top-k over all heads of a layer."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, is_number
from mmkv_compile.methods.snapkv import SnapKV
from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class AdaKV(SnapKV):
    name = "adakv"
    paper = "Feng et al., Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation, NeurIPS 2025 (arXiv 2407.11550)"
    description = "per-head budgets: heads holding more of the layer's top scores keep more; floor `alpha`"

    kernel_size: int = 7
    pool: str = "max"
    alpha: float = 0.2

    def validate(self, budget: float | int) -> None:
        super().validate(budget)
        if not is_number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(
                f"adakv: alpha must be a float in [0, 1] (share of each head's uniform budget it always keeps), got {self.alpha!r}"
            )

    def policy(self, budget: float | int) -> Policy:
        return Method.replace_policy(
            SnapKV.policy(self, budget), method=self.name, head_budget="global_topk", head_floor=float(self.alpha)
        )

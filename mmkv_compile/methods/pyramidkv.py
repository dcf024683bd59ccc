"""PyramidKV: SnapKV scores, with budgets decreasing arithmetically from the first layer to the last."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, is_number
from mmkv_compile.methods.snapkv import SnapKV
from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name = "pyramidkv"
    paper = "Cai et al., PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv 2406.02069)"
    description = (
        "SnapKV scores; layer budgets fall linearly from first to last layer (ratio 2*beta-1), summing to the total"
    )

    beta: float = 20.0

    def validate(self, budget: float | int) -> None:
        super().validate(budget)
        if not is_number(self.beta) or self.beta < 1:
            raise ValueError(
                f"pyramidkv: beta must be a number >= 1 (ratio of the first layer's share to the last's is 2*beta-1), got {self.beta!r}"
            )

    def policy(self, budget: float | int) -> Policy:
        return Method.replace_policy(
            SnapKV.policy(self, budget), method=self.name, layer_schedule="pyramid", pyramid_beta=float(self.beta)
        )

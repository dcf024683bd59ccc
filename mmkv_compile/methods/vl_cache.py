"""VL-Cache: post-vision attention scores and per-layer budgets in proportion to attention density."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_number
from mmkv_compile.policy import BudgetStage, Policy, ScoreStage


@dataclass(frozen=True)
class VLCache(Method):
    name = "vl_cache"
    paper = "Tu et al., VL-Cache: Sparsity and Modality-Aware KV Cache Compression for Vision-Language Model Inference, ICLR 2025 (arXiv 2410.23317)"
    description = (
        "scores = attention of the language queries after the last image; layer budgets in proportion to the "
        "density of that attention (allocated inside the prefill graph, summing to the uniform total)"
    )

    floor: float = 0.01

    def validate(self, budget: float | int) -> None:
        self.require_fraction(budget, "layers get shares of their tokens")
        check_number(self.name, "floor", self.floor, 0, budget, "the smallest layer share, at most the budget")
        if self.floor == 0:
            raise ValueError("vl_cache: floor must be > 0 (the smallest layer share), got 0")

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, score=ScoreStage(kind="post_vision"),
            budget=BudgetStage(amount=budget, layer_schedule="allocated", layer_signal="density",
                               allocation="proportional", layer_floor=float(self.floor)),
        )  # fmt: skip

"""VL-Cache: post-vision attention scores and per-layer budgets in proportion to attention density."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, is_number
from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class VLCache(Method):
    name = "vl_cache"
    paper = "Tu et al., VL-Cache: Sparsity and Modality-Aware KV Cache Compression for Vision-Language Model Inference, ICLR 2025 (arXiv 2410.23317)"
    description = (
        "scores = attention of the language queries after the last image; layer budgets in proportion to the "
        "density of that attention (allocated inside the prefill graph)"
    )

    floor: float = 0.01

    def validate(self, budget: float | int) -> None:
        if not isinstance(budget, float):
            raise ValueError(
                f"vl_cache: budget must be a float in (0, 1] (layers get fractions of their tokens), got {budget!r}"
            )
        if not is_number(self.floor) or not 0 < self.floor <= budget:
            raise ValueError(
                f"vl_cache: floor must be a float in (0, budget] (the smallest layer fraction), got {self.floor!r}"
            )

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="post_vision", layer_schedule="allocated", layer_signal="density",
            allocation="proportional", layer_floor=float(self.floor),
        )  # fmt: skip

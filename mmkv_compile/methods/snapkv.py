"""SnapKV: score the prompt by the attention of its last `window` queries, pooled; prefill only."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_choice, check_fits_budget, check_int, check_odd
from mmkv_compile.policy import GROUP_REDUCTIONS, POOLS, Policy


@dataclass(frozen=True)
class SnapKV(Method):
    name = "snapkv"
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024 (arXiv 2404.14469)"
    description = "observation-window attention, 1-D pooled, GQA group reduced; window kept; compresses the prompt"

    window: int = 32
    kernel_size: int = 5
    pool: str = "avg"
    group_reduce: str = "mean"

    def validate(self, budget: float | int) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel_size", self.kernel_size, 1)
        check_odd(self.name, "kernel_size", self.kernel_size)
        check_choice(self.name, "pool", self.pool, POOLS)
        check_choice(self.name, "group_reduce", self.group_reduce, GROUP_REDUCTIONS)
        check_fits_budget(self.name, "window", self.window, budget)

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="window", window=self.window, pool=self.pool,
            kernel_size=self.kernel_size, group_reduce=self.group_reduce, recent=self.window,
        )  # fmt: skip

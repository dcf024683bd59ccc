"""RetentiveKV: entropy-guided retention scores; evicted tokens are absorbed into memory slots read back by attention."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_int, check_number
from mmkv_compile.policy import BudgetStage, KeepStage, MergeStage, Policy, ScoreStage


@dataclass(frozen=True)
class RetentiveKV(Method):
    name = "retentivekv"
    paper = "Liu et al., RetentiveKV: State-Space Memory for Uncertainty-Aware Multimodal KV Cache Eviction, ACL 2026 Findings (arXiv 2605.04075)"
    description = (
        "score = lambda * attention + (1 - lambda) * within-modality attention entropy; a recent window kept; "
        "evicted tokens absorbed into a text and a visual memory slot (decayed by entropy), read back by every "
        "decode step's attention with their weight"
    )

    window: int = 32
    recent: int = 16
    lam: float = 0.5
    min_retention: float = 0.5

    def validate(self, budget: float | int) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "recent", self.recent, 0)
        self.check_fits_budget("recent", budget)
        check_number(self.name, "lam", self.lam, 0, 1, "weight of attention against entropy")
        check_number(self.name, "min_retention", self.min_retention, 0, 1, "smallest per-step memory retention")

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name,
            score=ScoreStage(kind="retention", window=self.window, accumulate=True, retention_mix=float(self.lam)),
            budget=BudgetStage(amount=budget), keep=KeepStage(recent=self.recent),
            merge=MergeStage(rule="absorb", min_retention=float(self.min_retention), weighted_attention=True),
            evict_while_decoding=True,
        )  # fmt: skip

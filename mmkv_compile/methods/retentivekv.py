"""RetentiveKV: entropy-guided retention scores; evicted tokens are absorbed into memory slots read back by attention."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_fits_budget, check_int, is_number
from mmkv_compile.policy import Policy


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
        check_fits_budget(self.name, "recent", self.recent, budget)
        for name, value in (("lam", self.lam), ("min_retention", self.min_retention)):
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"retentivekv: {name} must be a float in [0, 1], got {value!r}")

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="retention", window=self.window, recent=self.recent,
            accumulate=True, evict_while_decoding=True, merge="absorb", retention_mix=float(self.lam),
            min_retention=float(self.min_retention), weighted_attention=True,
        )  # fmt: skip

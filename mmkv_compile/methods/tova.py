"""TOVA: keep the tokens the last query attends to most, one token set per layer; evicts every step."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class TOVA(Method):
    name = "tova"
    paper = "Oren et al., Transformers are Multi-State RNNs (TOVA), arXiv 2401.06104"
    description = "attention of the last query averaged over all heads; held at the budget while decoding"

    def policy(self, budget: float | int) -> Policy:
        # The newest token is always kept (it has no attention history yet to defend it).
        return Policy(method=self.name, score=ScoreStage(kind="window", window=1, share_across_heads=True),
                      budget=BudgetStage(amount=budget), keep=KeepStage(recent=1), evict_while_decoding=True)  # fmt: skip

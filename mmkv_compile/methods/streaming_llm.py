"""StreamingLLM: attention sinks plus the most recent tokens, held at the budget while decoding."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_int
from mmkv_compile.policy import BudgetStage, KeepStage, Policy, ScoreStage


@dataclass(frozen=True)
class StreamingLLM(Method):
    name = "streaming_llm"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024 (arXiv 2309.17453)"
    description = "keep the first `sinks` tokens and the most recent ones; evicts while decoding"

    sinks: int = 4

    def validate(self, budget: float | int) -> None:
        check_int(self.name, "sinks", self.sinks, 0)
        self.check_fits_budget("sinks", budget)

    def policy(self, budget: float | int) -> Policy:
        # Recency is the score; sinks are forced. Positions stay the original ones (no pos-shift).
        return Policy(method=self.name, score=ScoreStage(kind="position"), budget=BudgetStage(amount=budget),
                      keep=KeepStage(sinks=self.sinks), evict_while_decoding=True)  # fmt: skip

"""HAE: dual-attention pruning of visual tokens at the first layer, broadcast to every layer; a recycle bin
while decoding."""

from __future__ import annotations

from dataclasses import dataclass

from mmkv_compile.methods.base import Method, check_int, is_number
from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class HAE(Method):
    name = "hae"
    paper = "Ma et al., HAE: Hierarchical Adaptive Eviction for KV Cache Management in Multimodal Language Models, arXiv 2602.02197"
    description = (
        "prefill: visual tokens below both the global and the individual attention threshold of the text after "
        "them are evicted at the first layer (at most 1 - budget of them), the same positions at every layer; "
        "decoding: accumulated attention, the lowest slots parked in a recycle bin and restored if they rise"
    )

    global_threshold: float = 0.0015
    individual_threshold: float = 0.01
    recycle_bin: int = 8
    recent: int = 8

    def validate(self, budget: float | int) -> None:
        if not isinstance(budget, float):
            raise ValueError(
                f"hae: budget must be a float in (0, 1] (the smallest share of visual tokens kept), got {budget!r}"
            )
        for name, value in (
            ("global_threshold", self.global_threshold),
            ("individual_threshold", self.individual_threshold),
        ):
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"hae: {name} must be a float in [0, 1], got {value!r}")
        check_int(self.name, "recycle_bin", self.recycle_bin, 0)
        check_int(self.name, "recent", self.recent, 1)

    def policy(self, budget: float | int) -> Policy:
        return Policy(
            method=self.name, budget=budget, score="dual_attention", accumulate=True, recent=self.recent,
            evict_while_decoding=True, layer_schedule="broadcast", global_threshold=float(self.global_threshold),
            individual_threshold=float(self.individual_threshold), recycle_bin=self.recycle_bin,
        )  # fmt: skip

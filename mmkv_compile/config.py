"""Backend options: parsed and validated before anything is compiled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmkv_compile.methods import METHODS, Method, build_method
from mmkv_compile.policy import Policy, validate_budget

DEFAULT_METHOD = "snapkv"
DEFAULT_BUDGET = 0.5
BACKEND_KEYS = ("method", "budget", "inductor")


@dataclass(frozen=True)
class CompressionConfig:
    """What the backend does: a method, its budget, and whether Inductor compiles the rewritten graph."""

    method: Method
    budget: float | int
    inductor: bool = True

    @property
    def policy(self) -> Policy:
        return self.method.policy(self.budget)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> CompressionConfig:
        """Parse ``torch.compile(..., options=...)``; raise ValueError naming any bad option."""
        options = dict(options or {})
        name = options.pop("method", DEFAULT_METHOD)
        if not isinstance(name, str) or name not in METHODS:
            raise ValueError(f"method={name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
        budget = validate_budget(options.pop("budget", DEFAULT_BUDGET))
        inductor = options.pop("inductor", True)
        if not isinstance(inductor, bool):
            raise ValueError(f"inductor must be True or False, got {inductor!r}")
        allowed = set(METHODS[name].parameters())
        unknown = sorted(set(options) - allowed)
        if unknown:
            params = ", ".join(sorted(allowed)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)}: mmkv takes {', '.join(BACKEND_KEYS)} "
                f"and the parameters of method {name!r}: {params}"
            )
        method = build_method(name, **options)
        method.validate(budget)
        return cls(method=method, budget=budget, inductor=inductor)

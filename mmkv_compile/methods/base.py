"""What every method preset shares: its name, paper, parameters, and the mapping to a Policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class Method:
    """A method is a preset of the operator's stages. Subclasses add their parameters as fields.

    ``explicit`` names the parameters the user set: a default the user did not set (a window, sinks, a recent
    window) shrinks to fit a small budget at run time, while an explicit one that cannot fit raises here.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    description: ClassVar[str]

    explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})

    def policy(self, budget: float | int) -> Policy:
        """The operator's stage settings for this method at ``budget``."""
        raise NotImplementedError

    def validate(self, budget: float | int) -> None:
        """Raise ValueError on parameters that cannot work together with ``budget``."""

    @classmethod
    def parameters(cls) -> dict[str, object]:
        """Parameter names and their defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls) if not f.metadata.get("internal")}

    def check_fits_budget(self, name: str, budget: float | int) -> None:
        """A forced count the user set explicitly must fit in an int budget (a default shrinks to fit, and a
        float budget is shrunk to per prompt at run time)."""
        value = getattr(self, name)
        if name in self.explicit and isinstance(budget, int) and value > budget:
            raise ValueError(
                f"{self.name}: {name}={value} is larger than the budget ({budget} tokens); lower {name} or raise budget"
            )

    def require_fraction(self, budget: float | int, why: str) -> None:
        """Methods whose budgets are shares of each layer's tokens take a float budget only."""
        if not isinstance(budget, float):
            raise ValueError(f"{self.name}: budget must be a float in (0, 1] ({why}), got {budget!r}")


def is_number(value) -> bool:
    """An int or float parameter (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(method: str, name: str, value, minimum: int) -> None:
    """Raise a ValueError naming the parameter unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method}: {name} must be an int >= {minimum}, got {value!r}")


def check_number(method: str, name: str, value, low: float, high: float, meaning: str) -> None:
    """Raise a ValueError naming the parameter unless ``value`` is a number in ``[low, high]``."""
    if not is_number(value) or not low <= value <= high:
        bounds = f"[{low}, {high}]" if high != float("inf") else f">= {low}"
        raise ValueError(f"{method}: {name} must be a number in {bounds} ({meaning}), got {value!r}")


def check_choice(method: str, name: str, value, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the parameter and its allowed values."""
    if value not in allowed:
        raise ValueError(f"{method}: {name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_odd(method: str, name: str, value: int) -> None:
    """Pooling kernels must be odd: an even one would centre its window between two slots."""
    if value % 2 == 0:
        raise ValueError(f"{method}: {name}={value} must be odd (1, 3, 5, 7, ...)")

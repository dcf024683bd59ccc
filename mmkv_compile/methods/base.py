"""What every method preset shares: its name, paper, parameters, and the mapping to a Policy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mmkv_compile.policy import Policy


@dataclass(frozen=True)
class Method:
    """A method is a preset of the operator's stages. Subclasses add their parameters as fields."""

    name: ClassVar[str]
    paper: ClassVar[str]
    description: ClassVar[str]

    def policy(self, budget: float | int) -> Policy:
        """The operator's stage settings for this method at ``budget``."""
        raise NotImplementedError

    def validate(self, budget: float | int) -> None:
        """Raise ValueError on parameters that cannot work together with ``budget``."""

    @staticmethod
    def replace_policy(policy: Policy, **changes) -> Policy:
        """A preset built on another one's policy."""
        return dataclasses.replace(policy, **changes)

    @classmethod
    def parameters(cls) -> dict[str, object]:
        """Parameter names and their defaults."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


def is_number(value) -> bool:
    """An int or float parameter (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(method: str, name: str, value, minimum: int) -> None:
    """Raise a ValueError naming the parameter unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method}: {name} must be an int >= {minimum}, got {value!r}")


def check_choice(method: str, name: str, value, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the parameter and its allowed values."""
    if value not in allowed:
        raise ValueError(f"{method}: {name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def check_odd(method: str, name: str, value: int) -> None:
    """Pooling kernels must be odd: an even one would centre its window between two slots."""
    if value % 2 == 0:
        raise ValueError(f"{method}: {name}={value} must be odd (1, 3, 5, 7, ...)")


def check_fits_budget(method: str, name: str, value: int, budget: float | int) -> None:
    """Forced slots must fit in an int budget (a float budget is checked per prompt at run time)."""
    if isinstance(budget, int) and value > budget:
        raise ValueError(
            f"{method}: {name}={value} is larger than the budget ({budget} tokens); lower {name} or raise budget"
        )

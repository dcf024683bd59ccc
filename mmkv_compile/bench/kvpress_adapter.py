"""kvpress (NVIDIA's KV-cache compression library) side by side with mmkv, when it is installed.

kvpress pins ``transformers<5.3``, so in this project's environment it is normally absent; run the
benchmarks from a separate environment to include it (docs/benchmarks.md). Each mmkv method maps to the
press that implements the same paper, with the parameters that mean the same thing carried over. kvpress
compresses the prompt only (at prefill); mmkv's ``h2o`` and ``streaming_llm`` also hold the cache at the
budget while decoding.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from mmkv_compile.methods import METHODS


@dataclass(frozen=True)
class PressSpec:
    """Which press matches a method, how its parameters are renamed, and what it needs."""

    press: str
    renamed: dict[str, str] = field(default_factory=dict)
    wraps: str | None = None  # AdaKV wraps a scorer press, which gets the ``inner`` parameters
    inner: dict[str, str] = field(default_factory=dict)
    eager_attention: bool = False  # the press reads the attention weights


WINDOW = {"window": "window_size", "kernel_size": "kernel_size"}
PRESSES: dict[str, PressSpec] = {
    "snapkv": PressSpec("SnapKVPress", WINDOW),
    "streaming_llm": PressSpec("StreamingLLMPress", {"sinks": "n_sink"}),
    "h2o": PressSpec("ObservedAttentionPress", eager_attention=True),
    "pyramidkv": PressSpec("PyramidKVPress", {**WINDOW, "beta": "beta"}),
    "tova": PressSpec("TOVAPress"),
    "adakv": PressSpec("AdaKVPress", {"alpha": "alpha_safeguard"}, wraps="SnapKVPress", inner=WINDOW),
}


def kvpress_missing() -> str | None:
    """None when ``import kvpress`` works, else a one-line reason to print."""
    try:
        import kvpress  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatible transformers failing inside kvpress
        detail = "" if isinstance(exc, ModuleNotFoundError) else f": {type(exc).__name__}: {exc}"
        return f"kvpress not installed{detail} (it needs transformers<5.3; see docs/benchmarks.md)"
    return None


def has_press(method: str) -> bool:
    """Whether kvpress has a press for ``method``."""
    return method in PRESSES


def compression_ratio(budget: float | int, prompt_len: int) -> float:
    """kvpress's ``compression_ratio`` is the share removed; an mmkv budget is the share (or count) kept."""
    kept = budget if isinstance(budget, float) else min(budget, prompt_len) / prompt_len
    return 1.0 - float(kept)


class KVPress:
    """The press for one method and budget, applied to a model around each call."""

    def __init__(self, method: str, budget: float | int, prompt_len: int):
        import kvpress

        spec = PRESSES[method]
        defaults = METHODS[method].parameters()

        def carried(renamed: dict[str, str]) -> dict:
            return {new: defaults[old] for old, new in renamed.items() if old in defaults}

        kwargs, ratio = carried(spec.renamed), compression_ratio(budget, prompt_len)
        if spec.wraps:
            inner_kwargs = carried(spec.inner)
            inner = getattr(kvpress, spec.wraps)(compression_ratio=ratio, **inner_kwargs)
            self.press = getattr(kvpress, spec.press)(press=inner, **kwargs)
            kwargs = {**kwargs, **inner_kwargs}
        else:
            self.press = getattr(kvpress, spec.press)(compression_ratio=ratio, **kwargs)
        self.spec = spec
        self.description = f"{spec.press}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"

    def prepare(self, model: torch.nn.Module) -> None:
        """Switch the model to eager attention when the press reads attention weights."""
        if self.spec.eager_attention:
            model.set_attn_implementation("eager")

    def __call__(self, model: torch.nn.Module) -> AbstractContextManager:
        """The press's context manager: hooks that compress the cache at prefill."""
        return self.press(model)

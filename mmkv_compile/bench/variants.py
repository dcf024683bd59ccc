"""The variants a benchmark compares, and how each is set up on a fresh copy of the model.

(a) ``uncompiled``: the model as loaded, full ``DynamicCache``
(b) ``eager``: the method's operator called eagerly from an attention function (``mmkv_compile.apply_eagerly``)
(c) ``inductor``: ``torch.compile`` with Inductor, full cache. ``torch.compile(model).generate()`` compiles
    nothing (generate calls the uncompiled module), so the bound forward is compiled and swapped in.
(d) ``mmkv``: ``mmkv_compile.compile(model, method, budget)``, the product
(e) ``kvpress``: the matching kvpress press, when kvpress is installed

With (a), two reference rows of the uncompiled model on other prompts (``REFERENCES``): ``kept length``, a prompt
as long as a compressed cache holds at each budget (a compressed cache should decode as fast as a short one),
and ``weights bound``, a one-token prompt (a decode step with an empty cache costs its weights' traffic).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

import mmkv_compile
from mmkv_compile.methods import compresses

KINDS = ("uncompiled", "eager", "inductor", "mmkv", "kvpress")
LETTERS = dict(zip(KINDS, "abcde"))
COMPRESSING = ("eager", "mmkv", "kvpress")
REFERENCES = ("kept length", "weights bound")


@dataclass(frozen=True)
class Variant:
    """One column of the comparison: a kind, and for the compressing kinds a method and budget."""

    kind: str
    method: str | None = None
    budget: float | int | None = None
    reference: str | None = None  # one of REFERENCES: the uncompiled model on another prompt

    @property
    def label(self) -> str:
        """``(d) mmkv``, ``(a) uncompiled, kept length`` etc."""
        label = f"({LETTERS[self.kind]}) {self.kind}"
        return f"{label}, {self.reference}" if self.reference else label

    @property
    def compiled(self) -> bool:
        return self.kind in ("inductor", "mmkv")


def plan(
    methods: list[str], budgets: list[float | int], kinds: list[str], has_press: Callable[[str], bool] = bool
) -> list[Variant]:
    """Every variant to run: the full-cache kinds once, then per method and budget each compressing kind
    (kvpress only for methods ``has_press`` accepts).

    ``full`` is a method with nothing to budget: it runs once, at budget 1.0.
    """
    variants = [Variant(kind) for kind in ("uncompiled", "inductor") if kind in kinds]
    for method in methods:
        for budget in budgets if compresses(method) else [1.0]:
            for kind in COMPRESSING:
                if kind in kinds and (kind != "kvpress" or has_press(method)):
                    variants.append(Variant(kind, method, budget))
    return variants


def setup(variant: Variant, model: torch.nn.Module, prompt_len: int) -> Callable[[], AbstractContextManager]:
    """Set ``variant`` up on ``model`` (in place). Returns what each call must run inside (a kvpress press;
    nothing for the others)."""
    if variant.kind == "eager":
        mmkv_compile.apply_eagerly(model, variant.method, variant.budget)
    elif variant.kind == "inductor":
        # The same hooks mmkv_compile.compile installs first, so the baseline does not pay graph breaks
        # that the product avoids.
        from mmkv_compile.api import install_output_hooks

        install_output_hooks(model)
        model.forward = torch.compile(type(model).forward.__get__(model))
    elif variant.kind == "mmkv":
        mmkv_compile.compile(model, variant.method, variant.budget)
    elif variant.kind == "kvpress":
        from mmkv_compile.bench.kvpress_adapter import KVPress

        press = KVPress(variant.method, variant.budget, prompt_len)
        press.prepare(model)
        return lambda: press(model)
    return contextlib.nullcontext

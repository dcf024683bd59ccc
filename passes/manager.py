"""Pass manager: runs graph passes in order and records what each one matched."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field

import torch.fx as fx

from mmkv_compile.config import CompressionConfig


@dataclass
class PassResult:
    """What one pass did to one graph."""

    name: str
    matches: int


@dataclass
class RewriteContext:
    """Shared state of one graph's pass pipeline: the config, the sites found, and the notes for reports."""

    config: CompressionConfig
    sites: list = field(default_factory=list)
    results: list[PassResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def policy(self):
        return self.config.policy


class GraphPass:
    """A pass finds or rewrites one thing. ``run`` returns how many places it matched."""

    name = "pass"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        raise NotImplementedError

    def uuid(self) -> str:
        """Hash of the pass's source, so caches keyed on it change when the pass does."""
        return hashlib.sha256(inspect.getsource(type(self)).encode()).hexdigest()


class PassManager:
    """Runs passes in order on a graph, then lints and recompiles it."""

    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    def __call__(self, gm: fx.GraphModule, ctx: RewriteContext) -> list[PassResult]:
        for graph_pass in self.passes:
            ctx.results.append(PassResult(graph_pass.name, graph_pass.run(gm, ctx)))
        gm.graph.lint()
        gm.recompile()
        return ctx.results

    def uuid(self) -> str:
        return hashlib.sha256("".join(p.uuid() for p in self.passes).encode()).hexdigest()

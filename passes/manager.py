"""Pass manager: runs graph passes in order and records what each one matched."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from mmkv_compile.policy import Policy


@dataclass
class PassResult:
    """What one pass did to one graph."""

    name: str
    matches: int


@dataclass
class RewriteContext:
    """What one graph's passes share: the policy, the attention sites found (each with its decision), and what
    each pass matched."""

    policy: Policy
    sites: list = field(default_factory=list)
    results: list[PassResult] = field(default_factory=list)


class GraphPass:
    """A pass finds or rewrites one thing. ``run`` returns how many places it matched."""

    name = "pass"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        raise NotImplementedError


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

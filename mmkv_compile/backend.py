"""The ``mmkv`` torch.compile backend.

``mmkv_backend`` is a plain function, the target of the ``torch_dynamo_backends`` entry point: nothing
registers it on import, so a fresh process never sees a "duplicate name" error.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from mmkv_compile.config import CompressionConfig
from mmkv_compile.passes.find_sites import FindAttentionSites
from mmkv_compile.passes.insert_op import InsertScoreEvictMerge, is_prefill
from mmkv_compile.passes.manager import PassManager, RewriteContext
from mmkv_compile.passes.rewrite_masks import RewriteAttentionMasks

log = logging.getLogger("mmkv_compile")


class MMKVWarning(UserWarning):
    """A graph, or part of it, was compiled without compression; the message says why."""


@dataclass
class SiteReport:
    """One attention site as ``explain`` reports it."""

    layer: int | None
    kind: str
    cache: str
    gqa_groups: int
    rewritten: bool
    evicts: bool
    mask_rebuilt: bool
    reason: str
    module: str


@dataclass
class GraphReport:
    """One captured graph: its phase, its sites, and what each pass matched."""

    index: int
    phase: str
    sites: list[SiteReport] = field(default_factory=list)
    passes: dict[str, int] = field(default_factory=dict)
    fallback: str = ""


def default_passes() -> PassManager:
    """The pass pipeline, in order."""
    return PassManager([FindAttentionSites(), InsertScoreEvictMerge(), RewriteAttentionMasks()])


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def rewrite_graph(gm: fx.GraphModule, config: CompressionConfig, index: int = 0) -> tuple[fx.GraphModule, GraphReport]:
    """Run the passes on a copy of ``gm``. On any failure, return ``gm`` unchanged with one warning."""
    ctx = RewriteContext(config)
    try:
        new_gm = _copy(gm)
        default_passes()(new_gm, ctx)
    except Exception as exc:  # never break the user's compile: fall back to the captured graph
        reason = f"the mmkv passes failed on this graph ({type(exc).__name__}: {exc}); compiled unchanged"
        warnings.warn(reason, MMKVWarning, stacklevel=2)
        log.debug("mmkv rewrite failed", exc_info=True)
        return gm, GraphReport(index, "unknown", fallback=reason)
    report = _report(ctx, index)
    _warn_uncompressed(ctx)
    return new_gm, report


def _report(ctx: RewriteContext, index: int) -> GraphReport:
    states = [s.state for s in ctx.sites if s.state is not None]
    if not states:
        phase = "no mmkv cache"
    else:
        phase = "prefill" if is_prefill(states[0]) else "decode"
    report = GraphReport(index, phase, passes={r.name: r.matches for r in ctx.results})
    for s in ctx.sites:
        report.sites.append(SiteReport(s.layer, s.kind, s.cache, s.gqa_groups, s.rewritten, s.evicts,
                                       s.mask_rebuilt, s.reason, s.module))  # fmt: skip
    return report


def _warn_uncompressed(ctx: RewriteContext) -> None:
    """One warning per graph where decoder attention reads a cache that is left uncompressed."""
    skipped = [s for s in ctx.sites if s.cache not in ("none", "mmkv") and not s.rewritten]
    if skipped and not any(s.rewritten for s in ctx.sites):
        warnings.warn(f"mmkv compiled a graph unchanged: {skipped[0].reason}", MMKVWarning, stacklevel=3)
    elif skipped:
        layers = sorted({s.layer for s in skipped if s.layer is not None})
        warnings.warn(f"mmkv left layers {layers} uncompressed: {skipped[0].reason}", MMKVWarning, stacklevel=3)


def mmkv_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None, **kwargs):
    """torch.compile backend: rewrite the Dynamo graph, then compile it with Inductor (or run it as is
    with ``options={"inductor": False}``)."""
    config = CompressionConfig.from_options(options)
    new_gm, report = rewrite_graph(gm, config, len(config.report) if config.report is not None else 0)
    if config.report is not None:
        config.report.append(report)
    if not config.inductor:
        return new_gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode and mode != "default" else {}
    return compile_fx(new_gm, example_inputs, config_patches=patches)


__all__ = ["GraphReport", "MMKVWarning", "SiteReport", "mmkv_backend", "rewrite_graph"]

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
from mmkv_compile.passes.find_sites import CACHE_APPEND, FindAttentionSites, describe_consumers
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
    warnings: list[str] = field(default_factory=list)


def default_passes() -> PassManager:
    """The pass pipeline, in order."""
    return PassManager([FindAttentionSites(), InsertScoreEvictMerge(), RewriteAttentionMasks()])


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def rewrite_graph(gm: fx.GraphModule, config: CompressionConfig, index: int = 0) -> tuple[fx.GraphModule, GraphReport]:
    """Run the passes on a copy of ``gm``. On any failure, return ``gm`` unchanged with one warning.

    A warning already given for an earlier graph of the same compiled model (``config.report``) is not
    repeated: prefill and decode graphs usually share the reason."""
    ctx = RewriteContext(config)
    try:
        new_gm = _copy(gm)
        default_passes()(new_gm, ctx)
    except Exception as exc:  # never break the user's compile: fall back to the captured graph
        reason = f"the mmkv passes failed on this graph ({type(exc).__name__}: {exc}); compiled unchanged"
        report = GraphReport(index, "unknown", fallback=reason)
        _warn(report, reason, config.report)
        log.debug("mmkv rewrite failed", exc_info=True)
        return gm, report
    report = _report(ctx, index, new_gm)
    _warn_uncompressed(ctx, report, config.report)
    _warn_unread_caches(ctx, report, config.report, new_gm)
    return new_gm, report


def _cache_updates(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CACHE_APPEND]


def _report(ctx: RewriteContext, index: int, gm: fx.GraphModule | None = None) -> GraphReport:
    states = [s.state for s in ctx.sites if s.state is not None] or (_cache_updates(gm) if gm is not None else [])
    if not states:
        phase = "no mmkv cache"
    else:
        phase = "prefill" if is_prefill(states[0]) else "decode"
    report = GraphReport(index, phase, passes={r.name: r.matches for r in ctx.results})
    for s in ctx.sites:
        report.sites.append(SiteReport(s.layer, s.kind, s.cache, s.gqa_groups, s.rewritten, s.evicts,
                                       s.mask_rebuilt, s.reason, s.module))  # fmt: skip
    return report


def _warn(report: GraphReport, message: str, earlier: list[GraphReport] | None) -> None:
    """Warn once per compiled model and message; the graph's report keeps the message either way."""
    report.warnings.append(message)
    if not any(message in previous.warnings for previous in earlier or ()):
        warnings.warn(message, MMKVWarning, stacklevel=4)


def _warn_uncompressed(ctx: RewriteContext, report: GraphReport, earlier: list[GraphReport] | None) -> None:
    """One warning where decoder attention reads a cache that is left uncompressed."""
    skipped = [s for s in ctx.sites if s.cache not in ("none", "mmkv") and not s.rewritten]
    if skipped and not any(s.rewritten for s in ctx.sites):
        _warn(report, f"mmkv compiled a graph unchanged: {skipped[0].reason}", earlier)
    elif skipped:
        layers = sorted({s.layer for s in skipped if s.layer is not None})
        _warn(report, f"mmkv left layers {layers} uncompressed: {skipped[0].reason}", earlier)


def _warn_unread_caches(ctx: RewriteContext, report: GraphReport, earlier, gm: fx.GraphModule) -> None:
    """One warning where the graph appends to MMKVCache layers that no understood attention site reads:
    the attention is written in a form the passes do not recognise; the message names what reads the keys."""
    read = {s.state for s in ctx.sites if s.state is not None}
    unread = [n for n in _cache_updates(gm) if n not in read]
    if not unread:
        return
    keys = next((u for u in unread[0].users if len(u.args) > 1 and u.args[1] == 0), None)
    consumers = describe_consumers(keys) if keys is not None else "nothing"
    _warn(report, f"mmkv left {len(unread)} of {len(unread) + len(read)} MMKVCache layers in this graph "
          f"uncompressed: no attention reading them was understood (their keys feed: {consumers})", earlier)  # fmt: skip


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

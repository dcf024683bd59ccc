"""The ``mmkv`` torch.compile backend.

``mmkv_backend`` is a plain function, the target of the ``torch_dynamo_backends`` entry point: nothing
registers it on import, so a fresh process never sees a "duplicate name" error. ``mmkv_compile.compile`` uses an
:class:`MMKVBackend` of its own, which keeps a report of every graph it rewrote.

The backend never raises once the options are valid: a backend that raises makes Dynamo skip the frame's code
for the rest of the process, so every model and method compiled after would silently lose compression.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
import torch.fx as fx

from mmkv_compile.adopt import (
    FIRST_CALL_REASON,
    NO_CACHE_REASON,
    RetraceWithMMKVCache,
    adopt_traced_call,
    count_in_own_region,
    hook,
    shared_frames_spent,
    traced_call_keeps_no_cache,
    uncached_outer_model,
)
from mmkv_compile.config import CompressionConfig
from mmkv_compile.passes.causal_attention import CausalPrefillAttention
from mmkv_compile.passes.find_sites import (
    CacheKind,
    Decision,
    FindAttentionSites,
    cache_appends,
    describe_consumers,
    is_prefill,
    writes_in_place,
)
from mmkv_compile.passes.graph_utils import symbolic_float
from mmkv_compile.passes.grouped_query_attention import GroupedQueryDecodeAttention
from mmkv_compile.passes.insert_op import InsertScoreEvictMerge
from mmkv_compile.passes.lower_cache_writes import LowerCacheWrites
from mmkv_compile.passes.manager import PassManager, RewriteContext
from mmkv_compile.passes.rewrite_masks import RewriteAttentionMasks
from mmkv_compile.policy import Policy
from mmkv_compile.regions import compile_regions
from mmkv_compile.reports import DECODE, NO_CACHE, PREFILL, GraphReport, MMKVWarning, SiteReport, Warner
from mmkv_compile.sources import source_fingerprint

log = logging.getLogger("mmkv_compile")


def default_passes() -> PassManager:
    """The pass pipeline, in order."""
    return PassManager(
        [
            FindAttentionSites(),
            InsertScoreEvictMerge(),
            RewriteAttentionMasks(),
            CausalPrefillAttention(),
            LowerCacheWrites(),
            GroupedQueryDecodeAttention(),
        ]
    )


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def rewrite_graph(gm: fx.GraphModule, policy: Policy, index: int = 0) -> tuple[fx.GraphModule, GraphReport]:
    """Run the passes on a copy of ``gm``; the report says what they did and why anything was left alone. On any
    failure, return ``gm`` unchanged (the report's ``fallback`` says why)."""
    ctx = RewriteContext(policy)
    try:
        new_gm = _copy(gm)
        default_passes()(new_gm, ctx)
    except Exception as exc:  # noqa: BLE001 - never break the user's compile: fall back to the captured graph
        log.debug("mmkv rewrite failed", exc_info=True)
        reason = f"the mmkv passes failed on this graph ({type(exc).__name__}: {exc}); compiled unchanged"
        return gm, GraphReport(index, _phase(cache_appends(gm.graph)), fallback=reason,
                               warnings=[f"mmkv ({policy.method}): {reason}"])  # fmt: skip
    report = _report(ctx, index, new_gm)
    report.warnings += _uncompressed_warnings(ctx, new_gm)
    return new_gm, report


def _report(ctx: RewriteContext, index: int, gm: fx.GraphModule) -> GraphReport:
    appends = [s.state for s in ctx.sites if s.state is not None] or cache_appends(gm.graph)
    report = GraphReport(index, _phase(appends), passes={r.name: r.matches for r in ctx.results})
    for s in ctx.sites:
        report.sites.append(SiteReport(s.layer, s.kind, s.cache.value, s.gqa_groups, s.decision.value, s.rewritten,
                                       s.evicts, s.mask_rebuilt, s.reason, s.module))  # fmt: skip
    return report


def _phase(appends: list) -> str:
    """A graph's phase, read from its first cache append: a failed rewrite's report keeps it too, so the decode
    step it compiled is not taken for one that never reached the backend."""
    return NO_CACHE if not appends else (PREFILL if is_prefill(appends[0]) else DECODE)


def _layers(sites) -> list[int]:
    return sorted({s.layer for s in sites if s.layer is not None})


def _uncompressed_warnings(ctx: RewriteContext, gm: fx.GraphModule) -> list[str]:
    """One message per reason decoder attention in this graph is left uncompressed, naming the layers."""
    method = ctx.policy.method
    messages = []
    decoder = [s for s in ctx.sites if s.cache not in (CacheKind.NONE,)]
    skipped = [s for s in decoder if s.decision is Decision.SKIP]
    if skipped:
        if not any(s.rewritten for s in ctx.sites):
            messages.append(f"mmkv ({method}) compiled a graph unchanged: {skipped[0].reason}")
        else:
            messages.append(f"mmkv ({method}) left layers {_layers(skipped)} uncompressed: {skipped[0].reason}")
    # MMKVCache layers appended to in this graph that no understood attention reads: the attention is written
    # in a form the passes do not recognise; the message names what reads the keys.
    read = {s.state for s in ctx.sites if s.state is not None}
    unread = [n for n in cache_appends(gm.graph) if n not in read]
    if unread:
        if writes_in_place(unread[0]):  # the keys buffer it writes into
            keys = unread[0].args[0]
        else:  # its keys output
            keys = next((u for u in unread[0].users if len(u.args) > 1 and u.args[1] == 0), None)
        consumers = describe_consumers(keys) if keys is not None else "nothing"
        messages.append(
            f"mmkv ({method}) left {len(unread)} of {len(unread) + len(read)} MMKVCache layers in this graph "
            f"uncompressed: no attention reading them was understood (their keys feed: {consumers})"
        )
    return messages


class MMKVBackend:
    """The backend of one compiled model: its config, a report of every graph it rewrote, one warning per reason."""

    def __init__(self, config: CompressionConfig, adopt_calls: bool = False):
        self.config = config
        self.reports: list[GraphReport] = []
        self.warner = Warner()
        self.adopt_calls = adopt_calls  # give cache-less calls an MMKVCache (the torch.compile(model) route)

    def rewrite(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, GraphReport]:
        """The passes on one captured graph (the test backend records what they did)."""
        return rewrite_graph(gm, self.config.policy, len(self.reports))

    def __call__(self, gm: fx.GraphModule, example_inputs, mode: str | None = None, **kwargs):
        new_gm, report = self.rewrite(gm)
        if self.adopt_calls:
            if adopt_traced_call():
                raise RetraceWithMMKVCache("mmkv gave the call an MMKVCache: its forward is traced again")
            outer = uncached_outer_model()
            newly_hooked = outer is not None and hook(outer)  # at its first graph, a vision tower's maybe
            if outer is not None and _reads_a_plain_cache(report):
                report.warnings = [f"mmkv ({self.config.method.name}): {FIRST_CALL_REASON}"]
            elif traced_call_keeps_no_cache():
                report.warnings.append(f"mmkv ({self.config.method.name}): {NO_CACHE_REASON}")
            if newly_hooked and (spent := shared_frames_spent()):
                report.warnings.append(f"mmkv ({self.config.method.name}): {spent}")
            count_in_own_region()
        self.reports.append(report)
        for message in report.warnings:
            self.warner.warn(message, stacklevel=4)
        if not self.config.inductor:
            return new_gm.forward
        return self._inductor(new_gm, example_inputs, report, mode)

    def _inductor(self, gm: fx.GraphModule, example_inputs, report: GraphReport, mode: str | None):
        """Compile the rewritten graph with Inductor, each repeated region once (``mmkv_compile.regions``), or
        whole when it has no regions; if Inductor fails, the graph runs without it (with a warning)."""
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(mode) if mode and mode != "default" else {}
        if report.phase == DECODE and all(_on_cpu(x) for x in example_inputs) and not _symbolic_operator_float(gm):
            # A decode step launches hundreds of small kernels; called from Inductor's C++ wrapper instead of its
            # Python one, SmolLM2 decoded about 5% faster on this project's CPU (docs/benchmarks.md).
            patches = {"cpp_wrapper": True, **patches}
        compile_fn = functools.partial(compile_fx, config_patches=patches)
        try:
            with _data_dependent_lengths(example_inputs, not self.config.policy.static_output_length), _cache_tag():
                try:
                    split = compile_regions(gm, compile_fn)
                except Exception as exc:  # noqa: BLE001 - compiled whole instead: the same code, slower to compile
                    log.debug("mmkv could not compile the graph by regions", exc_info=True)
                    split, report.whole_because = None, f"{type(exc).__name__}: {_first_line(exc)}"
                if split is not None:
                    report.regions = split[1]
                    return split[0].forward
                return compile_fn(gm, example_inputs)
        except Exception as exc:  # noqa: BLE001 - see the module docstring: the rewritten graph runs as it is
            log.debug("Inductor failed on the rewritten graph", exc_info=True)
            message = (
                f"mmkv ({self.config.method.name}): Inductor could not compile a rewritten graph "
                f"({type(exc).__name__}: {_first_line(exc)}); it runs without Inductor, with the same compression"
            )
            report.warnings.append(message)
            self.warner.warn(message, stacklevel=5)
            return gm.forward


def _symbolic_operator_float(gm: fx.GraphModule) -> bool:
    """Whether an mmkv operator reads a float Dynamo traced as a symbol (an attention scale, ``find_sites``).

    Inductor's C++ wrapper (torch 2.13) calls such an operator through a boxed path that writes string arguments
    into C++ unescaped, so the operator's policy string would not compile; the Python wrapper handles it."""
    return any(
        node.op == "call_function"
        and getattr(node.target, "namespace", None) == "mmkv"
        and any(symbolic_float(arg) is not None for arg in node.all_input_nodes)
        for node in gm.graph.nodes
    )


def _on_cpu(value) -> bool:
    return not isinstance(value, torch.Tensor) or value.device.type == "cpu"


def _cache_tag():
    """Inductor's on-disk cache does not key on a custom op's fake implementation: compiled code from another
    mmkv version would be reused with the wrong output layouts. The tag adds mmkv's source fingerprint."""
    tag = torch.compiler.config.cache_key_tag
    return torch.compiler.config.patch(cache_key_tag=f"{tag}mmkv-{source_fingerprint()}")


@contextlib.contextmanager
def _data_dependent_lengths(example_inputs, needed: bool):
    """Let this graph's shape environment hold the operator's data-dependent kept lengths (per-layer budgets
    allocated in the graph) while Inductor compiles it. Dynamo's own switch for this
    (``capture_dynamic_output_shape_ops``) would also change how it traces the model's code."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs) if needed else None
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:
        yield
        return
    before = shape_env.settings
    shape_env.settings = dataclasses.replace(before, allow_dynamic_output_shape_ops=True)
    try:
        yield
    finally:
        shape_env.settings = before


def _reads_a_plain_cache(report: GraphReport) -> bool:
    """Decoder attention in this graph reads a transformers cache, and no MMKVCache layer is in sight."""
    caches = {site.cache for site in report.sites}
    return CacheKind.TRANSFORMERS.value in caches and CacheKind.MMKV.value not in caches


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def mmkv_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None, **kwargs):
    """torch.compile backend: rewrite the Dynamo graph, then compile it with Inductor (or run it as is with
    ``options={"inductor": False}``). A model called without a cache gets an MMKVCache (``mmkv_compile.adopt``).
    Raises ValueError on bad options, before anything is compiled."""
    return MMKVBackend(CompressionConfig.from_options(options), adopt_calls=True)(gm, example_inputs, mode=mode)


__all__ = ["GraphReport", "MMKVBackend", "MMKVWarning", "SiteReport", "mmkv_backend", "rewrite_graph"]

"""Find attention sites and the KV-cache update each one reads.

Anchors: SDPA nodes, and softmax nodes between two matmuls (eager attention). From an anchor the pass
walks view-like ops (repeat_kv's expand/reshape, transposes, casts) back to where K and V come from:
``mmkv.cache_append`` or, for capacity buffers written in place, ``mmkv.cache_write`` (an MMKVCache layer),
``torch.cat`` (a plain DynamicCache), an in-place ``index_copy_`` or a cache placeholder (StaticCache), or
nothing (a vision encoder). This is tolerant of GQA style, scale as mul or div, casts and masks, where exact
patterns are not.
"""

from __future__ import annotations

import enum
import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from mmkv_compile import ops
from mmkv_compile.passes.graph_utils import (
    MATMUL_TARGETS,
    SDPA_TARGETS,
    SOFTMAX_TARGETS,
    example_value,
    is_call,
    is_method,
    is_view,
    layer_index,
    module_path,
    sdpa_arguments,
    strip_casts,
    strip_views,
    symbolic_float,
)
from mmkv_compile.passes.manager import GraphPass, RewriteContext
from mmkv_compile.policy import LayerPlacement

CACHE_APPEND = (torch.ops.mmkv.cache_append, ops.CACHE_APPEND)
CACHE_WRITE = (torch.ops.mmkv.cache_write, ops.CACHE_WRITE)
NEW_LABELS, NEW_POSITIONS = ops.NUM_FIELDS + 2, ops.NUM_FIELDS + 3  # where both ops take the step's slots


class CacheKind(enum.Enum):
    """Where an attention site's keys and values come from."""

    MMKV = "mmkv"  # an MMKVCache layer (mmkv.cache_append)
    TRANSFORMERS = "transformers_layer"  # a transformers cache layer (torch.cat): DynamicCache, chunked layers
    STATIC = "static_cache"  # fixed buffers written in place
    NONE = "none"  # no cache: a vision or audio encoder
    UNKNOWN = "unknown"  # keys and values disagree


class Decision(enum.Enum):
    """What the passes did with a site."""

    PENDING = "pending"  # found, not decided yet
    COMPRESS = "compress"  # the operator compresses its layer at this step
    APPEND = "append"  # this step only appends (a prefill-only method while decoding); the mask is rebuilt
    KEEP = "keep"  # the method keeps every token
    SKIP = "skip"  # left alone (``reason`` says why)


NO_CACHE_REASON = "attention reads no KV cache (a vision or audio encoder, or use_cache=False)"
DYNAMIC_CACHE_REASON = (
    "K/V come from a transformers cache layer (torch.cat), not an MMKVLayer: a plain DynamicCache, whose "
    "length would shift positions after eviction (use mmkv_compile.compile(model, ...), or pass "
    "cache=mmkv_compile.MMKVCache(model.config))"
)
OTHER_LAYER_REASON = (
    "a chunked-attention (or other non-full, non-sliding) layer: MMKVCache keeps transformers' own cache layer "
    "and mask for it, so mmkv leaves it uncompressed (the other layers of this graph are compressed)"
)
STATIC_CACHE_REASON = (
    "K/V come from a StaticCache that was not replaced (it already held tokens, or the call did not go through "
    "mmkv_compile.compile): fixed-size buffers written in place cannot shrink, so mmkv compiles the model "
    'unchanged (mmkv_compile.compile gives generate(cache_implementation="static") an MMKVCache of fixed '
    "capacity; or pass mmkv_compile.MMKVCache(model.config))"
)


@dataclass
class AttentionSite:
    """One attention call in a graph, what it reads, and what the passes decided for it."""

    anchor: fx.Node
    kind: str  # "sdpa" or "eager"
    layer: int | None  # decoder layer index, from the module stack (for reports)
    module: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    cache: CacheKind
    state: fx.Node | None = None  # the mmkv.cache_append (or mmkv.cache_write) node
    scaling: float | fx.Node | None = None  # a node where Dynamo traced the scale as a symbolic float
    gqa_groups: int = 1
    mask_add: tuple[fx.Node, int] | None = None  # eager: the add that applies the mask, and the mask's arg index
    logits_use: tuple[fx.Node, int] | None = None  # eager: where the scaled logits are consumed
    decision: Decision = Decision.PENDING
    mask_rebuilt: bool = False
    reason: str = ""

    def skip(self, reason: str) -> None:
        """Leave the site alone, saying why."""
        self.decision, self.reason = Decision.SKIP, reason

    @property
    def evicts(self) -> bool:
        return self.decision is Decision.COMPRESS

    @property
    def rewritten(self) -> bool:
        return self.evicts or self.mask_rebuilt

    @property
    def reads_mmkv_state(self) -> bool:
        return self.cache is CacheKind.MMKV and self.state is not None


def cache_layer_info(append: fx.Node) -> LayerPlacement:
    """The appending layer's rank among the compressed layers, their count and its attention window."""
    return LayerPlacement.from_string(append.args[-1])


def is_prefill(append: fx.Node) -> bool:
    """True when this append is the layer's first: its past is created empty in this graph (statically 0 slots,
    not read from the cache). A past read from the cache (a graph input) is a decode step's, even when eviction
    left it empty (a budget share that rounds down to 0 slots)."""
    if writes_in_place(append):
        return False
    past = example_value(append.args[0])
    created_here = append.args[0].op != "placeholder"
    return created_here and past is not None and isinstance(past.shape[2], int) and past.shape[2] == 0


def appends_one_token(append: fx.Node) -> bool:
    """Whether a cache update appends exactly one token (a generated one): statically one new label."""
    labels = example_value(step_slots(append)[0])
    return labels is not None and isinstance(labels.shape[-1], int) and labels.shape[-1] == 1


def writes_in_place(append: fx.Node) -> bool:
    """Whether a cache update is an ``mmkv.cache_write`` into capacity buffers (its state is its first args)."""
    return append.target in CACHE_WRITE


def cache_appends(graph: fx.Graph) -> list[fx.Node]:
    """Every ``mmkv.cache_append`` and ``mmkv.cache_write`` node of a graph, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in CACHE_APPEND + CACHE_WRITE]


def step_slots(append: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The (labels, positions) nodes of the tokens a cache update appends: the step's queries."""
    return append.args[NEW_LABELS], append.args[NEW_POSITIONS]


def classify_source(node: object) -> tuple[CacheKind, fx.Node | None, int | None]:
    """(cache kind, cache update node, state field index) of the tensor ``node`` views."""
    src = strip_views(node)
    if not isinstance(src, fx.Node):
        return CacheKind.NONE, None, None
    for user in src.users:  # a capacity buffer: cache_write wrote the step into it before attention reads it
        if user.op == "call_function" and user.target in CACHE_WRITE and src in user.args[: ops.NUM_FIELDS]:
            return CacheKind.MMKV, user, user.args.index(src)
    if src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[1], int):
        parent = src.args[0]
        if isinstance(parent, fx.Node) and parent.op == "call_function" and parent.target in CACHE_APPEND:
            return CacheKind.MMKV, parent, src.args[1]
    if is_call(src, {torch.cat}):
        return CacheKind.TRANSFORMERS, None, None
    if is_method(src, {"index_copy_", "index_copy", "index_put_"}) or (
        src.op == "placeholder" and ("past_key_values" in src.name or "_cache_" in src.name)
    ):
        return CacheKind.STATIC, None, None
    if any(is_method(user, {"index_copy_", "index_put_"}) for user in src.users):
        return CacheKind.STATIC, None, None
    return CacheKind.NONE, None, None


# Elementwise squashing applied to attention logits (soft-capping); it keeps their order.
SOFTCAP = {torch.tanh, torch.Tensor.tanh}


def describe_consumers(node: fx.Node, limit: int = 8) -> str:
    """The ops that consume a tensor, followed forward past views: ``matmul -> mul -> tanh -> ...``."""
    names, frontier = [], [node]
    while frontier and len(names) < limit:
        current = frontier.pop(0)
        users = [user for user in current.users if user.op in ("call_function", "call_method")]
        if not users:
            break
        user = users[0]
        if not is_view(user):
            target = user.target
            names.append(target if isinstance(target, str) else getattr(target, "__name__", str(target)))
        frontier = [user]
    return " -> ".join(names) or "nothing"


def _constant(value) -> float | None:
    return float(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else None


def _logits_root(node: object) -> tuple[fx.Node | None, float | fx.Node | None]:
    """Walk back from attention logits over casts and constant mul/div to the q @ k^T matmul.

    The scale is a float, or a symbolic float's node when that is the only factor (``q @ k^T * scaling``)."""
    scale, symbolic = 1.0, None
    node = strip_casts(node)
    while isinstance(node, fx.Node) and (
        is_call(node, {operator.mul, torch.mul})
        or is_call(node, {operator.truediv, torch.div})
        or is_call(node, SOFTCAP)
    ):
        if is_call(node, SOFTCAP):  # logit soft-capping, c * tanh(x / c): the scale passes through unchanged
            node = strip_casts(node.args[0])
            continue
        lhs, rhs = node.args[0], node.args[1]
        tensor, other = (lhs, rhs) if isinstance(lhs, fx.Node) and symbolic_float(lhs) is None else (rhs, lhs)
        divide = is_call(node, {operator.truediv, torch.div})
        factor = _constant(other)
        if factor is not None:
            scale = scale / factor if divide else scale * factor
        elif symbolic_float(other) is not None and symbolic is None and not divide:
            symbolic = other
        else:
            return None, None
        node = strip_casts(tensor)
    if not is_call(node, MATMUL_TARGETS):
        return None, None
    if symbolic is None:
        return node, scale
    return node, symbolic if scale == 1.0 else None


def _eager_site(softmax: fx.Node) -> dict | None:
    """Match ``matmul(q, k^T) [*|/ scale] [+ mask] -> softmax -> [cast|dropout] -> matmul(p, v)``."""
    pv = None
    frontier = list(softmax.users)
    while frontier:
        user = frontier.pop()
        if is_call(user, MATMUL_TARGETS) and user.args[0] is not None and strip_casts(user.args[0]) is softmax:
            pv = user
            break
        if is_method(user, {"to", "float", "type_as", "type"}) or is_call(
            user, {torch.nn.functional.dropout, torch.dropout}
        ):
            frontier.extend(user.users)
    if pv is None:
        return None
    logits_in = softmax.args[0]
    chain = strip_casts(logits_in)
    mask_add = None
    if is_call(chain, {operator.add, torch.add}):
        for idx in (0, 1):
            qk, scale = _logits_root(chain.args[idx])
            if qk is not None:
                mask_add = (chain, 1 - idx)
                break
        else:
            return None
    else:
        qk, scale = _logits_root(chain)
        if qk is None:
            return None
    logits_use = (softmax, 0) if chain is logits_in else None
    if logits_use is None:  # a cast sits between logits and softmax: the mask goes before the cast
        for user in chain.users:
            if user is logits_in or logits_in in user.users:
                logits_use = (user, list(user.args).index(chain))
                break
    return {
        "query": qk.args[0],
        "key": qk.args[1],
        "value": pv.args[1],
        "scaling": scale,
        "mask_add": mask_add,
        "logits_use": logits_use,
    }


def _sdpa_scaling(node: fx.Node) -> float | fx.Node | None:
    args = sdpa_arguments(node)
    if args["scale"] is None:
        query = example_value(args["query"])
        return 1.0 / math.sqrt(query.shape[-1]) if query is not None else None
    return _constant(args["scale"]) if symbolic_float(args["scale"]) is None else args["scale"]


class FindAttentionSites(GraphPass):
    """Record every attention site of the graph in ``ctx.sites``; match count = sites found."""

    name = "find_attention_sites"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        for node in gm.graph.nodes:
            if is_call(node, SDPA_TARGETS):
                fields = {
                    "query": node.args[0],
                    "key": node.args[1],
                    "value": node.args[2],
                    "scaling": _sdpa_scaling(node),
                }
                kind = "sdpa"
            elif is_call(node, SOFTMAX_TARGETS):
                fields = _eager_site(node)
                if fields is None:
                    continue
                kind = "eager"
            else:
                continue
            ctx.sites.append(self._describe(node, kind, fields))
        if any(site.cache is CacheKind.MMKV for site in ctx.sites):
            # The graph reads an MMKVCache, so a transformers layer beside its MMKVLayers is one MMKVCache
            # keeps for a layer type it leaves alone, not a plain DynamicCache.
            for site in ctx.sites:
                if site.cache is CacheKind.TRANSFORMERS:
                    site.reason = OTHER_LAYER_REASON
        return len(ctx.sites)

    @staticmethod
    def _describe(anchor: fx.Node, kind: str, fields: dict) -> AttentionSite:
        key_cache, state, key_idx = classify_source(fields["key"])
        value_cache, value_state, value_idx = classify_source(fields["value"])
        site = AttentionSite(anchor=anchor, kind=kind, layer=layer_index(anchor), module=module_path(anchor),
                             cache=key_cache, state=state, **fields)  # fmt: skip
        if key_cache is CacheKind.MMKV and (value_state is not state or (key_idx, value_idx) != (0, 1)):
            site.cache, site.state = CacheKind.UNKNOWN, None
            site.skip("keys and values come from different cache updates")
        elif key_cache is not value_cache:
            site.cache = CacheKind.UNKNOWN
            site.skip(f"keys come from {key_cache.value} but values from {value_cache.value}")
        elif key_cache is CacheKind.NONE:
            site.skip(NO_CACHE_REASON)
        elif key_cache is CacheKind.TRANSFORMERS:
            site.skip(DYNAMIC_CACHE_REASON)
        elif key_cache is CacheKind.STATIC:
            site.skip(STATIC_CACHE_REASON)
        elif site.scaling is None:
            site.skip("the attention scale is not a constant")
        query = example_value(site.query)
        keys = example_value(site.state.args[0] if site.state is not None else strip_views(site.key))
        if query is not None and keys is not None and keys.dim() == 4 and query.dim() == 4:
            site.gqa_groups = int(query.shape[1]) // int(keys.shape[1])
        return site

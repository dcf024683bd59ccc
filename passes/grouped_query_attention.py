"""Let a decode step's attention read the cache's key/value heads in place instead of a repeated copy.

With grouped-query attention each key/value head serves ``r`` query heads. Transformers (5.2 among the
releases supported) passes ``enable_gqa=True`` to SDPA only when there is no mask; with one (a decode step over
mmkv's cache always has one: the slots' mask) it first repeats the keys and values ``r`` times (``repeat_kv``:
index with ``None``, ``expand``, ``reshape``), which copies the whole cache in every layer at every step. This
pass finds that pattern on an SDPA call with one query row and gives SDPA the cache itself with
``enable_gqa=True``, which pairs query head ``i`` with key/value head ``i // r``, exactly as the copy did.
Prefill calls (more than one query row) are left alone: there the copy happens once, and a masked grouped call
may take a slower kernel on some devices. The pass reads nothing from the other passes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mmkv_compile.passes.graph_utils import (
    SDPA_TARGETS,
    example_value,
    is_call,
    is_method,
    prune_orphans,
    sdpa_arguments,
)
from mmkv_compile.passes.manager import GraphPass, RewriteContext

_ALL = slice(None, None, None)
_NEW_GROUP_AXIS = (_ALL, _ALL, None, _ALL, _ALL)  # repeat_kv's hidden_states[:, :, None, :, :]


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def repeated_heads(node: object) -> tuple[fx.Node, int | torch.SymInt] | None:
    """``(kv, r)`` when ``node`` is ``kv[:, :, None].expand(b, h, r, s, d).reshape(b, h * r, s, d)`` for a 4-D
    ``kv`` of shape ``(b, h, s, d)``; else None."""
    if not is_method(node, {"reshape", "view"}):
        return None
    expand = node.args[0]
    if not is_method(expand, {"expand"}):
        return None
    index = expand.args[0]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is operator.getitem):
        return None
    if not isinstance(index.args[1], tuple) or index.args[1] != _NEW_GROUP_AXIS:
        return None
    kv, out, grouped = index.args[0], example_value(node), example_value(expand)
    source = example_value(kv)
    if source is None or out is None or grouped is None or (source.dim(), grouped.dim(), out.dim()) != (4, 5, 4):
        return None
    b, h, s, d = source.shape
    repeats = grouped.shape[2]
    if not all(_same(x, y) for x, y in zip(grouped.shape, (b, h, repeats, s, d))):
        return None
    if not all(_same(x, y) for x, y in zip(out.shape, (b, h * repeats, s, d))):
        return None
    return kv, repeats


def _one_query_row(query: object) -> bool:
    value = example_value(query)
    return value is not None and value.dim() == 4 and _same(value.shape[2], 1)


class GroupedQueryDecodeAttention(GraphPass):
    """Match count = decode-step SDPA calls that now read the key/value heads in place."""

    name = "grouped_query_attention"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or not is_call(node, SDPA_TARGETS):
                continue
            args = sdpa_arguments(node)
            key, value = repeated_heads(args["key"]), repeated_heads(args["value"])
            if key is None or value is None or not _same(key[1], value[1]) or args["enable_gqa"]:
                continue
            if not _one_query_row(args["query"]):
                continue
            copies = (args["key"], args["value"])
            kwargs = {name: args[name] for name in ("attn_mask", "dropout_p", "is_causal", "scale")}
            node.args = (args["query"], key[0], value[0])
            node.kwargs = {**kwargs, "enable_gqa": True}
            prune_orphans(gm.graph, copies)
            count += 1
        return count

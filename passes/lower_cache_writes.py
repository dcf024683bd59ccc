"""Lower each ``mmkv.cache_write`` to in-place slice writes that Inductor fuses into the graph's own kernels.

``mmkv.cache_write`` is the anchor the other passes read (which buffers a decode step writes, and the step's own
labels and positions); as an opaque op it also costs a Python custom-op call per layer and token (0.4 ms each
on this project's CPU, about 10 ms per token for a 30-layer model). After the rewrite nothing reads it any more,
so this pass replaces it by what it does: ``buffer.narrow(2, start, n).copy_(new)`` per state field. It emits
aten operators, not tensor methods: AOTAutograd's cache accepts a graph of operators but bypasses one with a
method called on a node it has no example value for, and a bypass costs a second process the whole decode
graph's tracing again (about 40 s for a 30-layer model on this project's CPU). The pass reads nothing from the
other passes.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from mmkv_compile import ops
from mmkv_compile.passes.find_sites import CACHE_WRITE
from mmkv_compile.passes.graph_utils import example_value
from mmkv_compile.passes.manager import GraphPass, RewriteContext
from mmkv_compile.state import NEW_SLOT_FILLS

aten = torch.ops.aten


class LowerCacheWrites(GraphPass):
    """Match count = cache writes lowered."""

    name = "lower_cache_writes"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CACHE_WRITE]
        for node in writes:
            buffers = node.args[: ops.NUM_FIELDS]
            new_keys, new_values, new_labels, new_positions, start = node.args[ops.NUM_FIELDS : ops.NUM_FIELDS + 5]
            with gm.graph.inserting_before(node):
                length = _length(gm.graph, new_keys)
                for buffer, new in zip(
                    buffers, (new_keys, new_values, new_labels, new_positions, *NEW_SLOT_FILLS.values())
                ):
                    target = gm.graph.call_function(aten.narrow.default, (buffer, 2, start, length))
                    write = aten.copy_.default if isinstance(new, fx.Node) else aten.fill_.Scalar
                    gm.graph.call_function(write, (target, new))
            gm.graph.erase_node(node)
        return len(writes)


def _length(graph: fx.Graph, new_keys: fx.Node):
    """The number of slots a step writes: a constant when the trace knows it, else read at run time."""
    value = example_value(new_keys)
    if value is not None and isinstance(value.shape[2], int):
        return value.shape[2]
    return graph.call_function(aten.sym_size.int, (new_keys, 2))

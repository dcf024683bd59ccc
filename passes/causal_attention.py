"""Put square prefill attention back on SDPA's fused causal path when its mask is causal only.

Under tracing transformers always materializes the causal mask (it cannot look at the padding mask), where
eagerly it would call SDPA with ``is_causal=True`` and no mask. This pass replaces each SDPA call whose query and
key lengths are the same symbol (a prompt with an empty cache) and whose mask is a graph value by
``mmkv::causal_or_masked_attention``, fed by one ``mmkv::is_causal_mask`` check per distinct mask. A mask that
is not causal only (left padding, a sliding window shorter than the prompt, a vision encoder's) keeps SDPA's
masked path, so the output is the same either way. The pass reads nothing from the other passes.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mmkv_compile import ops
from mmkv_compile.passes.graph_utils import (
    SDPA_TARGETS,
    example_value,
    is_call,
    sdpa_arguments,
    with_example_value,
)
from mmkv_compile.passes.manager import GraphPass, RewriteContext

_VALUE_META = ("example_value", "val", "tensor_meta")  # fake values: the op's own is computed instead


def _square(query: fx.Node, key: fx.Node) -> bool:
    """Query and key lengths are provably the same (prefill with nothing cached before)."""
    q, k = example_value(query), example_value(key)
    if q is None or k is None or q.dim() < 2 or k.dim() < 2:
        return False
    return statically_known_true(q.shape[-2] == k.shape[-2])


class CausalPrefillAttention(GraphPass):
    """Match count = SDPA calls that take the fused causal path whenever their mask is causal only."""

    name = "causal_prefill_attention"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        checks: dict[fx.Node, fx.Node] = {}
        count = 0
        for node in list(gm.graph.nodes):
            if not is_call(node, SDPA_TARGETS) or node.op != "call_function":
                continue
            args = sdpa_arguments(node)
            mask = args["attn_mask"]
            if not isinstance(mask, fx.Node) or args["is_causal"] or args["dropout_p"] != 0.0:
                continue
            if not _square(args["query"], args["key"]):
                continue
            if mask not in checks:
                with gm.graph.inserting_after(mask):
                    checks[mask] = with_example_value(gm.graph.call_function(ops.IS_CAUSAL_MASK, (mask,)))
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(
                    ops.CAUSAL_OR_MASKED_ATTENTION,
                    (args["query"], args["key"], args["value"], mask, checks[mask], args["scale"], args["enable_gqa"]),
                )
            # the module stack and source from SDPA, not its fake value: the op returns its own layout
            fused.meta.update({key: value for key, value in node.meta.items() if key not in _VALUE_META})
            with_example_value(fused)
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            count += 1
        return count

"""Replace each rewritten site's attention mask with one built from the cached slots.

Needed whenever the cache may already be compressed (every step after the prompt): padding, per-row
budgets and evicted positions then live in the slots' labels and positions, not in transformers' mask.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from mmkv_compile.cache import STATE_FIELDS
from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.passes.graph_utils import example_value, prune_orphans
from mmkv_compile.passes.insert_op import is_prefill, state_outputs
from mmkv_compile.passes.manager import GraphPass, RewriteContext

LABELS, POSITIONS, WEIGHTS = (STATE_FIELDS.index(name) for name in ("labels", "positions", "weights"))


class RewriteAttentionMasks(GraphPass):
    """Match count = masks replaced."""

    name = "rewrite_attention_masks"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        if ctx.policy.method == "full":
            return 0
        count = 0
        for site in ctx.sites:
            if site.cache != "mmkv" or site.state is None or is_prefill(site.state):
                continue
            if site.reason and not site.reason.endswith("this step appends"):
                continue
            getters = state_outputs(site.state)
            with gm.graph.inserting_before(self._insertion_point(site)):
                labels, positions, weights = (
                    getters.get(index) or gm.graph.call_function(operator.getitem, (site.state, index))
                    for index in (LABELS, POSITIONS, WEIGHTS)
                )
                # weights matter only where slots can be parked or stand for several tokens in attention
                uses_weights = ctx.policy.recycle_bin > 0 or ctx.policy.weighted_attention
                slot_info = (labels, positions, weights if uses_weights else None, ctx.policy.weighted_attention)
                if site.kind == "sdpa":
                    self._sdpa(gm, site, slot_info)
                else:
                    self._eager(gm, site, slot_info)
            site.mask_rebuilt = True
            count += 1
        return count

    @staticmethod
    def _insertion_point(site) -> fx.Node:
        """Where the mask must exist: before the attention call, or before the eager mask add / logits use."""
        if site.kind == "sdpa":
            return site.anchor
        return site.mask_add[0] if site.mask_add is not None else site.logits_use[0]

    @staticmethod
    def _sdpa(gm: fx.GraphModule, site, slot_info: tuple) -> None:
        labels, positions, weights, weighted = slot_info
        mask = gm.graph.call_function(slot_attention_mask, (labels, positions, site.query, None, weights, weighted))
        anchor = site.anchor
        old = anchor.kwargs.get("attn_mask", anchor.args[3] if len(anchor.args) > 3 else None)
        args = list(anchor.args[:3]) + [mask] + list(anchor.args[4:])
        kwargs = {k: v for k, v in anchor.kwargs.items() if k != "attn_mask"}
        if len(args) > 5:
            args[5] = False
        else:
            kwargs["is_causal"] = False
        anchor.args, anchor.kwargs = tuple(args), kwargs
        prune_orphans(gm.graph, [old])

    @staticmethod
    def _eager(gm: fx.GraphModule, site, slot_info: tuple) -> None:
        labels, positions, weights, weighted = slot_info
        query = example_value(site.query)
        dtype = query.dtype if query is not None else None
        mask = gm.graph.call_function(slot_attention_mask, (labels, positions, site.query, dtype, weights, weighted))
        if site.mask_add is not None:
            add, index = site.mask_add
            old = add.args[index]
            add.update_arg(index, mask)
            prune_orphans(gm.graph, [old])
        else:
            consumer, index = site.logits_use
            logits = consumer.args[index]
            masked = gm.graph.call_function(operator.add, (logits, mask))
            consumer.update_arg(index, masked)

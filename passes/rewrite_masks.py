"""Replace each decode site's attention mask with one built from the cached slots.

Needed whenever the cache may already be compressed (every step after the prompt): padding, per-row budgets,
evicted positions, sliding windows and parked slots then live in the slots' labels and positions, not in
transformers' mask.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from mmkv_compile.masks import slot_attention_mask
from mmkv_compile.passes.find_sites import Decision, cache_layer_info, is_prefill, step_slots
from mmkv_compile.passes.graph_utils import example_value, mark_cacheable, prune_orphans, sdpa_arguments
from mmkv_compile.passes.insert_op import state_fields
from mmkv_compile.passes.manager import GraphPass, RewriteContext


class RewriteAttentionMasks(GraphPass):
    """Match count = masks replaced."""

    name = "rewrite_attention_masks"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        merge = ctx.policy.merge
        count = 0
        for site in ctx.sites:
            if site.decision not in (Decision.COMPRESS, Decision.APPEND) or is_prefill(site.state):
                continue
            state = state_fields(gm, site.state)
            query_labels, query_positions = step_slots(site.state)
            options = {"window": cache_layer_info(site.state).window, "query_labels": query_labels,
                       "query_positions": query_positions}  # fmt: skip
            if merge.recycle_bin:
                options["parked"] = state.parked
            if merge.weighted_attention:  # slots standing for several tokens weigh as those tokens
                options["weights"] = state.weights
            if site.kind == "eager":
                query = example_value(site.query)
                options["dtype"] = query.dtype if query is not None else None
            with gm.graph.inserting_before(self._insertion_point(site)):
                mask = gm.graph.call_function(slot_attention_mask, (state.labels, state.positions, site.query), options)
                mark_cacheable(mask)
                if site.kind == "sdpa":
                    self._sdpa(gm, site, mask)
                else:
                    self._eager(gm, site, mask)
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
    def _sdpa(gm: fx.GraphModule, site, mask: fx.Node) -> None:
        anchor = site.anchor
        args = sdpa_arguments(anchor)
        old = args["attn_mask"]
        anchor.args = (args.pop("query"), args.pop("key"), args.pop("value"))
        anchor.kwargs = {**args, "attn_mask": mask, "is_causal": False}
        prune_orphans(gm.graph, [old])

    @staticmethod
    def _eager(gm: fx.GraphModule, site, mask: fx.Node) -> None:
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

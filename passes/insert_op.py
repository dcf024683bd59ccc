"""Insert ``torch.ops.mmkv.score_evict_merge`` after each MMKVCache update and store its output.

The step's own attention still reads the full state (it needs every token once); only what the graph writes
back to the cache (its outputs) becomes the compressed state. How the operator calls are arranged over the
layers is the policy's layer schedule (``mmkv_compile.schedules``), run here with a graph emitter.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from mmkv_compile.passes.find_sites import (
    AttentionSite,
    Decision,
    appends_one_token,
    cache_layer_info,
    is_prefill,
    writes_in_place,
)
from mmkv_compile.passes.manager import GraphPass, RewriteContext
from mmkv_compile.schedules import GraphEmitter, LayerStep, schedule_for
from mmkv_compile.state import STATE_FIELDS, SlotState


def state_outputs(state: fx.Node) -> dict[int, fx.Node]:
    """The ``getitem(state, i)`` nodes, by output index."""
    return {
        user.args[1]: user
        for user in state.users
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)
    }


def state_fields(gm: fx.GraphModule, state: fx.Node) -> SlotState:
    """One node per field of a cache update's state: the ``getitem`` outputs of ``mmkv.cache_append`` (made where
    missing), or the capacity buffers ``mmkv.cache_write`` wrote into."""
    if writes_in_place(state):
        return SlotState(*state.args[: len(STATE_FIELDS)])
    getters = state_outputs(state)
    for index in range(len(STATE_FIELDS)):
        if index not in getters:
            with gm.graph.inserting_after(state):
                getters[index] = gm.graph.call_function(operator.getitem, (state, index))
    return SlotState(*(getters[i] for i in range(len(STATE_FIELDS))))


class InsertScoreEvictMerge(GraphPass):
    """One operator per cache update the policy compresses at this step; match count = cache updates compressed.

    A schedule that needs every layer first (``allocated``, ``compensated``) emits a signal node at each layer's
    site and, before the graph's outputs, one allocation node and each layer's operator (the step's own
    attention never needs the compressed state, so nothing waits for it). Such a schedule, and ``broadcast``,
    compresses only when the graph holds every compressed layer of the cache.
    """

    name = "insert_score_evict_merge"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        policy = ctx.policy
        output = next(n for n in gm.graph.nodes if n.op == "output")
        sites = [site for site in ctx.sites if site.reads_mmkv_state and site.decision is Decision.PENDING]
        if not sites:
            return 0
        prefill = is_prefill(sites[0].state)
        if policy.keeps_everything:
            return self._decide(sites, Decision.KEEP, f"method {policy.method!r} keeps every token")
        if not prefill and not policy.evict_while_decoding and appends_one_token(sites[0].state):
            return self._decide(
                sites, Decision.APPEND, f"{policy.method} compresses prompts only; this one-token step appends"
            )
        if any(writes_in_place(site.state) for site in sites):  # MMKVCache.reserve's callers prevent this
            return self._decide(sites, Decision.SKIP, "capacity buffers reached a step that evicts; left alone")
        schedule = schedule_for(policy, prefill)
        steps: dict[fx.Node, LayerStep] = {}
        for site in sites:  # several attention calls may read one cache update: the first one decides
            if site.state not in steps:
                steps[site.state] = LayerStep(cache_layer_info(site.state), site.query, state_fields(gm, site.state),
                                              site.scaling, prefill, site.state)  # fmt: skip
        if schedule.needs_every_layer:
            ranks = {step.placement.index for step in steps.values()}
            count = next(iter(steps.values())).placement.count
            if ranks != set(range(count)):
                reason = (
                    f"{policy.method}'s layer schedule ({policy.budget.layer_schedule}) needs all {count} compressed "
                    f"layers in one graph, but a graph break left {len(ranks)} in this one"
                )
                return self._decide(sites, Decision.SKIP, reason)
        for site_state, step in steps.items():
            first_site = next(s for s in sites if s.state is site_state)
            kept = schedule.layer(GraphEmitter(gm.graph, first_site.anchor), step)
            if kept is not None:
                self._store(output, step, kept)
        for step, kept in schedule.finish(GraphEmitter(gm.graph, output)):
            self._store(output, step, kept)
        self._decide(sites, Decision.COMPRESS, "")
        return len(steps)

    @staticmethod
    def _decide(sites: list[AttentionSite], decision: Decision, reason: str) -> int:
        """Record one decision for every site; nothing was inserted (so the match count is 0)."""
        for site in sites:
            site.decision, site.reason = decision, reason
        return 0

    @staticmethod
    def _store(output: fx.Node, step: LayerStep, kept: SlotState) -> None:
        """The graph stores the kept state instead of the full one."""
        for full, compressed in zip(step.state, kept, strict=True):
            output.replace_input_with(full, compressed)

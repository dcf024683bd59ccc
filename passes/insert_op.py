"""Insert ``torch.ops.mmkv.score_evict_merge`` after each MMKVCache update and store its output.

The step's own attention still reads the full state (it needs every token once); only what the
graph writes back to the cache (its outputs) becomes the compressed state.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from mmkv_compile import ops  # noqa: F401  (registers torch.ops.mmkv)
from mmkv_compile.cache import STATE_FIELDS
from mmkv_compile.passes.graph_utils import example_value
from mmkv_compile.passes.manager import GraphPass, RewriteContext

SCORE_EVICT_MERGE = torch.ops.mmkv.score_evict_merge.default
LAYER_SIGNAL = torch.ops.mmkv.layer_signal.default
ALLOCATE_LAYER_BUDGETS = torch.ops.mmkv.allocate_layer_budgets.default
HEAD_DEMAND = torch.ops.mmkv.head_demand.default
COMPENSATE_LAYER_BUDGETS = torch.ops.mmkv.compensate_layer_budgets.default
POSITIONS = STATE_FIELDS.index("positions")


def is_prefill(state: fx.Node) -> bool:
    """True when the cache held nothing before this update (its past length is statically 0)."""
    past = example_value(state.args[0])
    return past is not None and isinstance(past.shape[2], int) and past.shape[2] == 0


def state_outputs(state: fx.Node) -> dict[int, fx.Node]:
    """The ``getitem(state, i)`` nodes, by output index."""
    return {
        user.args[1]: user
        for user in state.users
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)
    }


class InsertScoreEvictMerge(GraphPass):
    """One operator per cache update the policy compresses at this step; match count = operators inserted.

    A per-layer allocation that needs every layer first (``layer_schedule="allocated"``: MEDA, VL-Cache;
    ``"compensated"``: MadaKV) is built in two phases inside the prefill graph: a signal (or demand) node at
    each layer's site, one allocation node after the last layer, then each layer's operator, fed its budget,
    just before the graph's outputs (the step's own attention never needs the compressed state, so nothing
    waits for it). ``"broadcast"`` (HAE) scores the first layer only; every later layer's operator keeps the
    positions the first one kept.
    """

    name = "insert_score_evict_merge"

    def run(self, gm: fx.GraphModule, ctx: RewriteContext) -> int:
        policy = ctx.policy
        output = next(n for n in gm.graph.nodes if n.op == "output")
        cached_layers = [s.layer for s in ctx.sites if s.cache not in ("none", "unknown") and s.layer is not None]
        num_layers = max(cached_layers) + 1 if cached_layers else 1
        handled: set[fx.Node] = set()
        deferred: list[tuple] = []
        first_kept: fx.Node | None = None  # "broadcast": the first layer's kept positions
        for site in ctx.sites:
            if site.cache != "mmkv" or site.reason:
                continue
            prefill = is_prefill(site.state)
            if policy.method == "full":
                site.reason = "method 'full' keeps every token"
                continue
            if not prefill and not policy.evict_while_decoding:
                site.reason = f"{policy.method} compresses the prompt only; this step appends"
                continue
            if site.state in handled:  # several attention calls read one cache update
                site.evicts = True
                continue
            if policy.layer_schedule != "uniform" and site.layer is None:
                site.reason = "a per-layer budget schedule needs the layer index, which the graph does not give"
                continue
            getters = state_outputs(site.state)
            state = [self._getter(gm, site.state, getters, i) for i in range(len(STATE_FIELDS))]
            layer_policy = policy.at_layer(site.layer or 0, num_layers).to_string()
            if policy.layer_schedule in ("allocated", "compensated") and prefill:
                with gm.graph.inserting_before(site.anchor):
                    query = site.query
                    if policy.score == "window":  # hold only the queries the score reads until the graph's end
                        window = (slice(None), slice(None), slice(-policy.window, None))
                        query = gm.graph.call_function(operator.getitem, (site.query, window))
                    if policy.layer_schedule == "allocated":
                        signal_args = (query, state[0], state[2], state[3], float(site.scaling))
                        signal = gm.graph.call_function(LAYER_SIGNAL, (*signal_args, policy.layer_signal))
                    else:
                        signal_args = (query, state[0], state[2], state[3], float(site.scaling))
                        signal = gm.graph.call_function(HEAD_DEMAND, (*signal_args, layer_policy))
                deferred.append((site, state, getters, layer_policy, signal, query))
            elif policy.layer_schedule == "broadcast" and prefill and first_kept is not None:
                with gm.graph.inserting_before(site.anchor):
                    self._insert(gm, output, site, state, getters, layer_policy, prefill, keep_positions=first_kept)
            else:
                with gm.graph.inserting_before(site.anchor):
                    op = self._insert(gm, output, site, state, getters, layer_policy, prefill)
                    if policy.layer_schedule == "broadcast" and prefill:
                        positions = gm.graph.call_function(operator.getitem, (op, POSITIONS))
                        first_kept = gm.graph.call_function(operator.getitem, (positions, (slice(None), 0)))
            handled.add(site.state)
            site.evicts = True
        if deferred:
            signals = [d[4] for d in deferred]
            with gm.graph.inserting_before(output):
                if policy.layer_schedule == "allocated":
                    allocation = (signals, float(policy.budget), float(policy.layer_floor), policy.allocation)
                    budgets = gm.graph.call_function(ALLOCATE_LAYER_BUDGETS, allocation)
                else:
                    compensation = (signals, float(policy.budget), float(policy.compensation_cap))
                    budgets = gm.graph.call_function(COMPENSATE_LAYER_BUDGETS, compensation)
                for number, (site, state, getters, layer_policy, _, query) in enumerate(deferred):
                    budget = gm.graph.call_function(operator.getitem, (budgets, number))
                    keyword = "budget_fractions" if policy.layer_schedule == "allocated" else "head_budgets"
                    self._insert(gm, output, site, state, getters, layer_policy, True, query, **{keyword: budget})
        return len(handled)

    @staticmethod
    def _insert(gm, output, site, state, getters, policy_text: str, prefill: bool, query=None, **budgets) -> fx.Node:
        """The operator on this layer's full state; the graph then stores its outputs instead."""
        args = (site.query if query is None else query, *state, float(site.scaling), policy_text, prefill)
        op = gm.graph.call_function(SCORE_EVICT_MERGE, args, budgets)
        kept = [gm.graph.call_function(operator.getitem, (op, i)) for i in range(len(STATE_FIELDS))]
        for i, getter in getters.items():
            output.replace_input_with(getter, kept[i])
        return op

    @staticmethod
    def _getter(gm: fx.GraphModule, state: fx.Node, getters: dict[int, fx.Node], index: int) -> fx.Node:
        if index not in getters:
            with gm.graph.inserting_after(state):
                getters[index] = gm.graph.call_function(operator.getitem, (state, index))
        return getters[index]

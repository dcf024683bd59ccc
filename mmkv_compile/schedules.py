"""Layer schedules: how a method's operator calls are arranged over a model's layers, defined once.

The graph pass and the eager reference both run these classes, through an :class:`Emitter`: the graph pass's
emitter inserts graph nodes, the eager one calls the operators at once. A schedule sees the layers in order
(:meth:`Schedule.layer`) and then once more at the end of the step (:meth:`Schedule.finish`):

  Schedule     one operator per layer, at that layer (uniform and pyramid budgets; every decode step)
  Allocated    a signal per layer, one allocation after the last, then each layer's operator with its budget
               (MEDA's entropy, VL-Cache's density)
  Compensated  the same two phases with each layer's coverage demand and the compensation across layers (MadaKV)
  Broadcast    the first layer scores and decides; every later layer keeps the positions it kept (HAE)

A layer's rank among the compressed layers, their count and its attention window come from the cache layer
(``MMKVLayer``), which records them in the graph as arguments of ``mmkv::cache_append``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.fx as fx

from mmkv_compile import ops
from mmkv_compile.policy import LayerPlacement, Policy
from mmkv_compile.state import SlotState


class Emitter(Protocol):
    """Where a schedule's operator calls go: into a graph (as nodes) or straight to the operators."""

    def op(self, target, *args, **kwargs) -> Any:
        """Call (or insert a call to) ``target``."""

    def item(self, value, index) -> Any:
        """``value[index]``."""


class EagerEmitter:
    """Runs the operators at once (the uncompiled reference path)."""

    def op(self, target, *args, **kwargs):
        return target(*args, **kwargs)

    def item(self, value, index):
        return value[index]


@dataclass
class GraphEmitter:
    """Inserts the operator calls into ``graph`` before the node ``before``."""

    graph: fx.Graph
    before: fx.Node

    def op(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.before):
            return self.graph.call_function(target, args, kwargs)

    def item(self, value, index) -> fx.Node:
        return self.op(operator.getitem, value, index)


@dataclass
class LayerStep:
    """What one layer hands its schedule at one step."""

    placement: LayerPlacement  # the layer's rank among the compressed layers, their count, its window
    query: Any  # the step's queries [B, Hq, Lq, D]
    state: SlotState  # the layer's full state after this step's append
    scaling: Any  # a float; in a graph, the node of a float Dynamo traced as a symbol
    prefill: bool
    owner: Any = None  # where the caller stores the kept state (an attention site, a cache layer)


@dataclass
class Schedule:
    """One operator per layer, at that layer."""

    policy: Policy

    needs_every_layer = False  # whether the step must see all the cache's compressed layers

    def layer(self, emit: Emitter, step: LayerStep) -> SlotState | None:
        """Handle one layer; return its kept state now, or None when :meth:`finish` gives it."""
        return self.compress(emit, step)

    def finish(self, emit: Emitter) -> list[tuple[LayerStep, SlotState]]:
        """After the last layer: the kept states of the layers :meth:`layer` deferred."""
        return []

    def layer_policy(self, step: LayerStep) -> str:
        return self.policy.at_layer(step.placement).to_string()

    def compress(self, emit: Emitter, step: LayerStep, query=None, **budgets) -> SlotState:
        """The operator on one layer's state."""
        query = step.query if query is None else query
        out = emit.op(ops.SCORE_EVICT_MERGE, query, *step.state, step.scaling, self.layer_policy(step),
                      step.prefill, **budgets)  # fmt: skip
        return SlotState(*(emit.item(out, i) for i in range(len(SlotState._fields))))


@dataclass
class TwoPhase(Schedule):
    """A per-layer signal at each layer; one allocation after the last layer; then every layer's operator with
    the slots it was allocated. Only the queries the score reads are held until the end of the step."""

    pending: list[tuple[LayerStep, Any, Any]] = field(default_factory=list)

    needs_every_layer = True

    def layer(self, emit: Emitter, step: LayerStep) -> None:
        query = step.query
        if self.policy.score.kind == "window":
            query = emit.item(query, (slice(None), slice(None), slice(-self.policy.score.window, None)))
        self.pending.append((step, query, self.signal(emit, step, query)))
        return None

    def finish(self, emit: Emitter) -> list[tuple[LayerStep, SlotState]]:
        if not self.pending:
            return []
        budgets = self.allocate(emit, [signal for _, _, signal in self.pending])
        done = [
            (step, self.compress(emit, step, query, layer_budgets=emit.item(budgets, number)))
            for number, (step, query, _) in enumerate(self.pending)
        ]
        self.pending = []
        return done

    def signal(self, emit: Emitter, step: LayerStep, query) -> Any:
        raise NotImplementedError

    def allocate(self, emit: Emitter, signals: list) -> Any:
        raise NotImplementedError


class Allocated(TwoPhase):
    """MEDA and VL-Cache: each layer's attention signal, then budgets from all the signals."""

    def signal(self, emit: Emitter, step: LayerStep, query) -> Any:
        state = step.state
        return emit.op(ops.LAYER_SIGNAL, query, state.keys, state.labels, state.positions, step.scaling,
                       self.policy.budget.layer_signal, step.placement.to_string())  # fmt: skip

    def allocate(self, emit: Emitter, signals: list) -> Any:
        budget = self.policy.budget
        return emit.op(ops.ALLOCATE_LAYER_BUDGETS, signals, float(budget.amount), float(budget.layer_floor),
                       budget.allocation)  # fmt: skip


class Compensated(TwoPhase):
    """MadaKV: each layer's coverage demand, then budgets compensated from layer to layer."""

    def signal(self, emit: Emitter, step: LayerStep, query) -> Any:
        state = step.state
        return emit.op(ops.HEAD_DEMAND, query, state.keys, state.labels, state.positions, step.scaling,
                       self.layer_policy(step))  # fmt: skip

    def allocate(self, emit: Emitter, signals: list) -> Any:
        budget = self.policy.budget
        return emit.op(ops.COMPENSATE_LAYER_BUDGETS, signals, float(budget.amount), float(budget.compensation_cap))


@dataclass
class Broadcast(Schedule):
    """HAE's index broadcasting: the first layer scores and decides, later layers keep its positions."""

    first_kept: Any = None  # the first layer's kept positions, [B, K]

    needs_every_layer = True

    def layer(self, emit: Emitter, step: LayerStep) -> SlotState:
        if self.first_kept is None:
            kept = self.compress(emit, step)
            self.first_kept = emit.item(kept.positions, (slice(None), 0))
            return kept
        return self.compress(emit, step, keep_positions=self.first_kept)


def schedule_for(policy: Policy, prefill: bool) -> Schedule:
    """The schedule a step runs: the policy's own at the prompt, one operator per layer while decoding."""
    kinds = {"allocated": Allocated, "compensated": Compensated, "broadcast": Broadcast}
    kind = kinds.get(policy.budget.layer_schedule) if prefill else None
    return (kind or Schedule)(policy)


__all__ = ["EagerEmitter", "Emitter", "GraphEmitter", "LayerStep", "Schedule", "schedule_for"]

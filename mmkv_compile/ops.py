"""The ``torch.ops.mmkv`` operators.

``mmkv::cache_append``       appends a step's slots to a layer's cached state; the passes anchor on it.
``mmkv::score_evict_merge``  scores the cached slots, evicts the least useful and returns the kept state.

Both are opaque custom ops: Dynamo and Inductor never trace into them. The CPU kernel is the PyTorch
reference; CUDA uses the Triton kernels. ``MMKV_KERNEL=reference|triton`` forces one for debugging.
"""

from __future__ import annotations

import os

import torch

from mmkv_compile.kernels import reference
from mmkv_compile.policy import Policy, output_length

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
KERNEL_CHOICES = ("auto", "reference", "triton")


def kernel_choice(device: torch.device) -> str:
    """Which implementation runs on ``device``: ``MMKV_KERNEL`` if set, else Triton on CUDA, reference elsewhere."""
    choice = os.environ.get("MMKV_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"MMKV_KERNEL={choice!r}: allowed values are {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice


@torch.library.custom_op("mmkv::cache_append", mutates_args=())
def cache_append(
    keys: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    weights: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    new_labels: torch.Tensor,
    new_positions: torch.Tensor,
) -> State:
    """Concatenate a step's slots after the cached ones (dim 2 of every state tensor); new slots start
    with score 0 and weight 1."""
    new_scores = torch.zeros(new_labels.shape, dtype=scores.dtype, device=scores.device)
    new_weights = torch.ones(new_labels.shape, dtype=weights.dtype, device=weights.device)
    old = (keys, values, labels, positions, scores, weights)
    new = (new_keys, new_values, new_labels, new_positions, new_scores, new_weights)
    return tuple(torch.cat([a, b], dim=2) for a, b in zip(old, new, strict=True))


def _with_length(state, length) -> State:
    """Empty tensors shaped like ``state`` but with ``length`` slots (dim 2)."""
    return tuple(t.new_empty((*t.shape[:2], length, *t.shape[3:])) for t in state)


@cache_append.register_fake
def _cache_append_fake(
    keys, values, labels, positions, scores, weights, new_keys, new_values, new_labels, new_positions
):
    return _with_length((keys, values, labels, positions, scores, weights), keys.shape[2] + new_keys.shape[2])


@torch.library.custom_op("mmkv::score_evict_merge", mutates_args=())
def score_evict_merge(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    weights: torch.Tensor,
    scaling: float,
    policy: str,
    prefill: bool,
    budget_fractions: torch.Tensor | None = None,
    head_budgets: torch.Tensor | None = None,
    keep_positions: torch.Tensor | None = None,
) -> State:
    """Score every cached slot, keep the policy's budget, merge what the policy merges; return the kept
    (keys, values, labels, positions, scores, weights).

    Budgets computed elsewhere in the graph replace the policy's own: ``budget_fractions`` (float ``[B]``)
    a fraction per row (MEDA, VL-Cache), ``head_budgets`` (int64 ``[B, Hkv]``) slots per row and KV head
    (MadaKV), ``keep_positions`` (int64 ``[B, K]``, -1 for none) the positions an earlier layer kept (HAE).

    ``query`` holds the step's queries (the last ``query.shape[2]`` slots); ``policy`` is a
    :class:`~mmkv_compile.policy.Policy` string; ``prefill`` says the cache held nothing before this step.
    """
    if kernel_choice(keys.device) == "triton":
        from mmkv_compile.kernels import triton_kernels

        kernel = triton_kernels.score_evict_merge
    else:
        kernel = reference.score_evict_merge
    return kernel(
        query, keys, values, labels, positions, scores, weights, scaling, policy, prefill,
        budget_fractions, head_budgets, keep_positions,
    )  # fmt: skip


@score_evict_merge.register_fake
def _score_evict_merge_fake(
    query, keys, values, labels, positions, scores, weights, scaling, policy, prefill,
    budget_fractions=None, head_budgets=None, keep_positions=None,
):  # fmt: skip
    pol = Policy.from_string(policy)
    allocated = budget_fractions is not None or head_budgets is not None or keep_positions is not None
    kept = None if allocated else output_length(pol, keys.shape[2], query.shape[2], prefill)
    if kept is None:
        kept = torch.library.get_ctx().new_dynamic_size(min=0, max=keys.shape[2])
    return _with_length((keys, values, labels, positions, scores, weights), kept)


@torch.library.custom_op("mmkv::layer_signal", mutates_args=())
def layer_signal(
    query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, scaling: float, signal: str
) -> torch.Tensor:
    """What a layer's attention measures per row ``[B]``, for budgets allocated across layers (MEDA, VL-Cache)."""
    from mmkv_compile.kernels import layer_signals

    return layer_signals.layer_signal(query, keys, labels, positions, scaling, signal)


@layer_signal.register_fake
def _layer_signal_fake(query, keys, labels, positions, scaling, signal):
    return keys.new_empty((keys.shape[0],), dtype=torch.float32)


@torch.library.custom_op("mmkv::allocate_layer_budgets", mutates_args=())
def allocate_layer_budgets(signals: list[torch.Tensor], budget: float, floor: float, rule: str) -> torch.Tensor:
    """Per-layer budget fractions ``[L, B]`` from each layer's signal ``[B]``, averaging to ``budget``."""
    from mmkv_compile.kernels import layer_signals

    return layer_signals.allocate_layer_budgets(torch.stack(signals), budget, floor, rule)


@allocate_layer_budgets.register_fake
def _allocate_fake(signals, budget, floor, rule):
    return signals[0].new_empty((len(signals), signals[0].shape[0]))


@torch.library.custom_op("mmkv::head_demand", mutates_args=())
def head_demand(
    query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, scaling: float, policy: str
) -> torch.Tensor:
    """What each KV head of a layer asks for, int64 ``[B, Hkv, 3]``: (coverage demand, valid slots, forced
    slots), for budgets compensated from layer to layer (MadaKV)."""
    from mmkv_compile.kernels import compensation

    return compensation.head_demand(query, keys, labels, positions, scaling, Policy.from_string(policy))


@head_demand.register_fake
def _head_demand_fake(query, keys, labels, positions, scaling, policy):
    return keys.new_empty((*keys.shape[:2], 3), dtype=torch.int64)


@torch.library.custom_op("mmkv::compensate_layer_budgets", mutates_args=())
def compensate_layer_budgets(demands: list[torch.Tensor], budget: float, cap: float) -> torch.Tensor:
    """Slots per layer, row and KV head, int64 ``[L, B, Hkv]``, from each layer's :func:`head_demand`."""
    from mmkv_compile.kernels import compensation

    return compensation.compensate_layer_budgets(torch.stack(demands), budget, cap)


@compensate_layer_budgets.register_fake
def _compensate_fake(demands, budget, cap):
    return demands[0].new_empty((len(demands), *demands[0].shape[:2]))

"""The ``torch.ops.mmkv`` operators.

``mmkv::cache_append``        appends a step's slots to a layer's cached state; the passes anchor on it.
``mmkv::cache_write``         writes a decode step's slots into a layer's capacity buffers in place (the
                              other anchor: a compressed cache decodes without copying itself every step).
``mmkv::score_evict_merge``   scores the cached slots, evicts the least useful and returns the kept state.
``mmkv::layer_signal`` / ``mmkv::allocate_layer_budgets``      MEDA's and VL-Cache's per-layer budgets.
``mmkv::head_demand`` / ``mmkv::compensate_layer_budgets``     MadaKV's per-layer budgets.
``mmkv::is_causal_mask`` / ``mmkv::causal_or_masked_attention``  prefill attention on SDPA's fused causal path
                                                                 when the traced mask is causal only.

All are opaque custom ops: Dynamo and Inductor never trace into them. A layer's state travels as the fields of
:class:`~mmkv_compile.state.SlotState`, so both state-carrying schemas are built from that one tuple. The CPU
kernel is the PyTorch reference; CUDA uses the Triton kernels. ``MMKV_KERNEL=reference|triton`` forces one.
"""

from __future__ import annotations

import os

import torch

from mmkv_compile.kernels import reference
from mmkv_compile.policy import LayerPlacement, Policy, output_length
from mmkv_compile.state import NEW_SLOT_FILLS, STATE_FIELDS, SlotState

KERNEL_CHOICES = ("auto", "reference", "triton")
_STATE_ARGS = ", ".join(f"Tensor {name}" for name in STATE_FIELDS)
_STATE_OUT = "(" + ", ".join("Tensor" for _ in STATE_FIELDS) + ")"
_NEW_SLOTS = "Tensor new_keys, Tensor new_values, Tensor new_labels, Tensor new_positions"
# Which layer appends, recorded in the graph as a constant argument of cache_append (a LayerPlacement string):
# the pass reads the layer's rank, the cache's compressed-layer count, the layer's window and, under tensor
# parallelism, the process group its KV heads are split over from there.
_LAYER_ARGS = "str placement"

_BUFFER_ARGS = ", ".join(f"Tensor(a{i}!) {name}" for i, name in enumerate(STATE_FIELDS))

SCHEMAS = {
    "cache_append": f"({_STATE_ARGS}, {_NEW_SLOTS}, {_LAYER_ARGS}) -> {_STATE_OUT}",
    "cache_write": f"({_BUFFER_ARGS}, {_NEW_SLOTS}, SymInt start, {_LAYER_ARGS}) -> ()",
    "score_evict_merge": (
        f"(Tensor query, {_STATE_ARGS}, float scaling, str policy, bool prefill, "
        f"Tensor? layer_budgets=None, Tensor? keep_positions=None) -> {_STATE_OUT}"
    ),
    "layer_signal": "(Tensor query, Tensor keys, Tensor labels, Tensor positions, float scaling, str signal, "
    "str placement) -> Tensor",
    "allocate_layer_budgets": "(Tensor[] signals, float budget, float floor, str rule) -> Tensor",
    "head_demand": "(Tensor query, Tensor keys, Tensor labels, Tensor positions, float scaling, str policy) -> Tensor",
    "compensate_layer_budgets": "(Tensor[] demands, float budget, float cap) -> Tensor",
    "is_causal_mask": "(Tensor mask) -> Tensor",
    "causal_or_masked_attention": "(Tensor query, Tensor key, Tensor value, Tensor mask, Tensor mask_is_causal, "
    "float? scale, bool enable_gqa) -> Tensor",
}
NUM_FIELDS = len(STATE_FIELDS)


def kernel_choice(device: torch.device) -> str:
    """Which implementation runs on ``device``: ``MMKV_KERNEL`` if set, else Triton on CUDA, reference elsewhere."""
    choice = os.environ.get("MMKV_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"MMKV_KERNEL={choice!r}: allowed values are {', '.join(KERNEL_CHOICES)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return choice


# -- cache_append -----------------------------------------------------------------------------------------


def _appended_length(old: int, new: int, window: int):
    """Slots after an append: a one-token step under a sliding window keeps the ``window`` newest (the new
    query sees itself and ``window - 1`` earlier tokens), as transformers' sliding layer does; a longer step
    keeps every slot, since its own early queries still need them."""
    if window and new == 1:
        return torch.sym_min(old + new, window)
    return old + new


def _cache_append(*args) -> tuple[torch.Tensor, ...]:
    """Concatenate a step's slots after the cached ones (dim 2 of every state tensor); new slots start with
    score 0, weight 1 and not parked."""
    state = SlotState(*args[:NUM_FIELDS])
    new_keys, new_values, new_labels, new_positions, placement = args[NUM_FIELDS:]
    window = LayerPlacement.from_string(placement).window
    new = SlotState(
        keys=new_keys,
        values=new_values,
        labels=new_labels,
        positions=new_positions,
        **{
            name: torch.full(new_labels.shape, fill, dtype=getattr(state, name).dtype, device=new_labels.device)
            for name, fill in NEW_SLOT_FILLS.items()
        },
    )
    length = _appended_length(state.keys.shape[2], new_keys.shape[2], window)
    # contiguous, as the fake kernel says: a sliding window's slice would otherwise keep the dropped slot's stride
    return tuple(torch.cat([old, add], dim=2)[:, :, -length:].contiguous() for old, add in zip(state, new, strict=True))


def _cache_write(*args) -> None:
    """Write a step's slots into capacity buffers at slot ``start`` (score 0, weight 1, not parked)."""
    buffers = SlotState(*args[:NUM_FIELDS])
    new_keys, new_values, new_labels, new_positions, start, placement = args[NUM_FIELDS:]
    num_new, capacity = new_keys.shape[2], buffers.keys.shape[2]
    if start + num_new > capacity:
        raise RuntimeError(
            f"mmkv.cache_write: {num_new} new slots at slot {start} overflow a capacity of {capacity} "
            f"({placement}); MMKVCache.reserve makes room before each call"
        )
    news = (new_keys, new_values, new_labels, new_positions, *NEW_SLOT_FILLS.values())
    for buffer, new in zip(buffers, news, strict=True):
        target = buffer.narrow(2, start, num_new)
        if isinstance(new, torch.Tensor):
            target.copy_(new)
        else:
            target.fill_(new)


def _cache_append_fake(*args):
    state = SlotState(*args[:NUM_FIELDS])
    window = LayerPlacement.from_string(args[-1]).window
    return tuple(state.with_length(_appended_length(state.keys.shape[2], args[NUM_FIELDS].shape[2], window)))


# -- score_evict_merge ------------------------------------------------------------------------------------


def _operator_args(args: tuple, layer_budgets, keep_positions):
    """(state, scaling, policy, prefill, layer_budgets, keep_positions) from the operator's flat arguments (the
    optional budgets arrive by keyword or by position)."""
    scaling, policy, prefill, *extra = args[NUM_FIELDS:]
    extra += [layer_budgets, keep_positions][len(extra) :]
    return SlotState(*args[:NUM_FIELDS]), scaling, policy, prefill, extra[0], extra[1]


def _score_evict_merge(query, *args, layer_budgets=None, keep_positions=None) -> tuple[torch.Tensor, ...]:
    """Score every cached slot, keep the policy's budget, merge what the policy merges; return the kept state.

    Budgets computed elsewhere in the graph replace the policy's own: ``layer_budgets`` (int64 ``[B]``) the
    slots each row keeps at this layer (MEDA, VL-Cache, MadaKV), ``keep_positions`` (int64 ``[B, K]``, -1 for
    none) the positions an earlier layer kept (HAE). ``query`` holds the step's queries (the last
    ``query.shape[2]`` slots); ``policy`` is a :class:`~mmkv_compile.policy.Policy` string; ``prefill`` says
    the cache held nothing before this step.
    """
    state, scaling, policy, prefill, layer_budgets, keep_positions = _operator_args(args, layer_budgets, keep_positions)
    if kernel_choice(state.keys.device) == "triton":
        from mmkv_compile.kernels import triton_kernels

        kernel = triton_kernels.score_evict_merge
    else:
        kernel = reference.score_evict_merge
    return tuple(kernel(query, state, scaling, policy, prefill, layer_budgets, keep_positions))


def _score_evict_merge_fake(query, *args, layer_budgets=None, keep_positions=None):
    state, _, policy, prefill, layer_budgets, _ = _operator_args(args, layer_budgets, keep_positions)
    kept = None
    if layer_budgets is None:
        kept = output_length(Policy.from_string(policy), state.keys.shape[2], query.shape[2], prefill)
    if kept is None:
        kept = _at_most(state.keys.shape[2])
    return tuple(state.with_length(kept))


def _at_most(length: int | torch.SymInt) -> torch.SymInt:
    """A data-dependent kept length, no longer than ``length``: a bound, when the prompt length is symbolic
    (a prompt graph compiled for any length), rather than the size's declared maximum."""
    ctx = torch.library.get_ctx()
    if isinstance(length, int):
        return ctx.new_dynamic_size(min=0, max=length)
    kept = ctx.new_dynamic_size()
    torch._check(kept <= length)
    return kept


# -- per-layer budgets ------------------------------------------------------------------------------------


def _layer_signal(query, keys, labels, positions, scaling, signal, placement):
    from mmkv_compile.kernels import layer_signals

    where = LayerPlacement.from_string(placement)
    return layer_signals.layer_signal(query, keys, labels, positions, scaling, signal, where.window, where.heads)


def _allocate(signals, budget, floor, rule):
    from mmkv_compile.kernels import layer_signals

    return layer_signals.allocate_layer_budgets(torch.stack(signals), budget, floor, rule)


def _head_demand(query, keys, labels, positions, scaling, policy):
    from mmkv_compile.kernels import compensation

    return compensation.head_demand(query, keys, labels, positions, scaling, Policy.from_string(policy))


def _head_demand_fake(query, keys, labels, positions, scaling, policy):
    from mmkv_compile.kernels import heads

    num_heads = keys.shape[1] * heads.world_size(Policy.from_string(policy).placement.heads)
    return keys.new_empty((keys.shape[0], num_heads, 3), dtype=torch.int64)


def _compensate(demands, budget, cap):
    from mmkv_compile.kernels import compensation

    return compensation.compensate_layer_budgets(torch.stack(demands), budget, cap)


def _is_causal_mask(mask):
    from mmkv_compile.kernels import attention

    return attention.is_causal_mask(mask)


def _causal_or_masked_attention(query, key, value, mask, mask_is_causal, scale, enable_gqa):
    from mmkv_compile.kernels import attention

    return attention.causal_or_masked_attention(query, key, value, mask, mask_is_causal, scale, enable_gqa)


def _attention_fake(query, key, value, *rest):
    batch, heads, length = query.shape[:-1]  # laid out as [B, L, H, D], like SDPA's fused kernels' output
    return query.new_empty((batch, length, heads, value.shape[-1])).transpose(1, 2)


torch.library.custom_op(
    "mmkv::cache_write", _cache_write, mutates_args=STATE_FIELDS, schema=SCHEMAS["cache_write"]
).register_fake(lambda *args: None)

for _name, _kernel, _fake in (
    ("cache_append", _cache_append, _cache_append_fake),
    ("score_evict_merge", _score_evict_merge, _score_evict_merge_fake),
    ("layer_signal", _layer_signal, lambda q, k, *rest: k.new_empty((k.shape[0], 2), dtype=torch.float64)),
    ("allocate_layer_budgets", _allocate, lambda s, *rest: s[0].new_empty((len(s), s[0].shape[0]), dtype=torch.int64)),
    ("head_demand", _head_demand, _head_demand_fake),
    ("compensate_layer_budgets", _compensate, lambda d, *rest: d[0].new_empty((len(d), d[0].shape[0]))),
    ("is_causal_mask", _is_causal_mask, lambda mask: mask.new_empty((), dtype=torch.bool)),
    ("causal_or_masked_attention", _causal_or_masked_attention, _attention_fake),
):
    torch.library.custom_op(f"mmkv::{_name}", _kernel, mutates_args=(), schema=SCHEMAS[_name]).register_fake(_fake)

CACHE_APPEND = torch.ops.mmkv.cache_append.default
CACHE_WRITE = torch.ops.mmkv.cache_write.default
SCORE_EVICT_MERGE = torch.ops.mmkv.score_evict_merge.default
LAYER_SIGNAL = torch.ops.mmkv.layer_signal.default
ALLOCATE_LAYER_BUDGETS = torch.ops.mmkv.allocate_layer_budgets.default
HEAD_DEMAND = torch.ops.mmkv.head_demand.default
COMPENSATE_LAYER_BUDGETS = torch.ops.mmkv.compensate_layer_budgets.default
IS_CAUSAL_MASK = torch.ops.mmkv.is_causal_mask.default
CAUSAL_OR_MASKED_ATTENTION = torch.ops.mmkv.causal_or_masked_attention.default


def cache_append(state: SlotState, new: tuple, placement: str) -> SlotState:
    """``mmkv::cache_append`` on a state and the step's (keys, values, labels, positions); ``placement`` is the
    layer's :meth:`LayerPlacement.to_string`."""
    return SlotState(*torch.ops.mmkv.cache_append(*state, *new, placement))


def cache_write(buffers: SlotState, new: tuple, start: int, placement: str) -> None:
    """``mmkv::cache_write``: the step's (keys, values, labels, positions) into ``buffers`` at slot ``start``."""
    torch.ops.mmkv.cache_write(*buffers, *new, start, placement)


def score_evict_merge(query, state: SlotState, scaling: float, policy: str, prefill: bool, **budgets) -> SlotState:
    """``mmkv::score_evict_merge`` on a state (``budgets``: ``layer_budgets`` or ``keep_positions``)."""
    return SlotState(*torch.ops.mmkv.score_evict_merge(query, *state, scaling, policy, prefill, **budgets))


__all__ = ["KERNEL_CHOICES", "cache_append", "cache_write", "kernel_choice", "score_evict_merge"]

"""``MMKVCache``: a transformers ``Cache`` whose layers carry what compression needs.

Each layer holds a :class:`~mmkv_compile.state.SlotState`: per cached slot and KV head, keys, values, a modality
label, the token's logical position, a running score, a weight and a parked flag. Eviction makes the physical
length (what is stored, what masks are sized by) shorter than the logical length (what positions continue from),
as in transformers' ``DynamicSlidingWindowLayer``.

Appends go through ``torch.ops.mmkv.cache_append``, so each layer's full state appears as one node in a
captured graph, with the layer's rank among the compressed layers, their count and its attention window as
constant arguments; the backend rewires that node's consumers. Uncompiled, the cache behaves like a
``DynamicCache`` that also records labels and positions.

Once a compiled model's prompt is compressed and its method evicts nothing while decoding, the compiled route
calls :meth:`MMKVCache.reserve` before each decode call: each full-attention layer then keeps its slots in
capacity buffers with unused slots after them, and ``torch.ops.mmkv.cache_write`` writes each new token in place
(no copy of the cache per token, and decode graphs whose shapes stay the same from step to step).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin

from mmkv_compile import ops
from mmkv_compile.labels import LABEL_DTYPE, Modality, labels_from_inputs, modality_token_ids
from mmkv_compile.policy import LayerPlacement
from mmkv_compile.state import POSITION_DTYPE, STATE_FIELDS, SlotState

# Unused slots a layer's capacity buffers gain each time they are (re)allocated: a growth copies the layer once,
# and its first one makes the decode graph's cache length dynamic (one recompile); 256 covers most generations.
CAPACITY_CHUNK = 256

# Layer types transformers names in configs: mmkv compresses full-attention and sliding-window layers; any
# other type (chunked, linear, dummy) keeps transformers' own cache layer and is left alone.
FULL, SLIDING = "full_attention", "sliding_attention"


UNCOMPILED_UPDATE = (
    "compressed layer {rank} of this MMKVCache holds what a graph the mmkv backend compiled kept, but this call "
    "updated it outside such a graph: Dynamo ran the call eagerly (TORCH_LOGS=recompiles says why; a "
    "torch.compile's recompile_limit may be spent: pass recompile_limit=64, isolate_recompiles=True to "
    "torch.compile, or use mmkv_compile.compile; a long session can also spend "
    "torch._dynamo.config.accumulated_recompile_limit). "
    "Uncompiled attention would read the kept slots without the method's masks and merged state"
)


class MMKVLayer(CacheLayerMixin):
    """One layer's compressed cache: a :class:`~mmkv_compile.state.SlotState` of ``[B, Hkv, S, ...]`` tensors.

    ``rank`` is the layer's place among the cache's compressed layers and ``count`` their number (what per-layer
    schedules read); ``window`` is its sliding attention window, 0 for full attention. A sliding layer keeps at
    most ``window`` slots while decoding, as transformers' sliding layer does. ``heads`` names the process group
    the layer's KV heads are split over under tensor parallelism ("" when this process holds them all).
    """

    is_croppable = False
    # generate() would wrap an already compiled forward in a second torch.compile if this were True.
    is_compileable = False

    def __init__(self, rank: int = 0, count: int = 1, window: int = 0, heads: str = "", **kwargs):
        super().__init__()
        self.placement = LayerPlacement(index=rank, count=count, window=window, heads=heads)
        # what the graph records; a str, since Dynamo makes ints that differ between layers symbolic inputs
        self.placement_text = self.placement.to_string()
        self.is_sliding = bool(window)
        self.labels = self.positions = self.scores = self.weights = self.parked = None
        self.logical_length = 0
        # Capacity buffers and the slots they hold (see MMKVCache.reserve); the fields above are views of them.
        self.buffers: SlotState | None = None
        self.filled = 0
        # Set by every compiled graph that updates the layer: its state is then the mmkv backend's to keep.
        self.written_by_graph = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.set_state(SlotState.empty(batch, heads, key_states.shape[-1], value_states.shape[-1],
                                       key_states.dtype, key_states.device))  # fmt: skip
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, labels: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a step's keys/values with their labels ``[B, L]`` (text when None); return the full state."""
        if torch.compiler.is_compiling():
            self.written_by_graph = True
        elif self.buffers is not None:
            raise RuntimeError(
                "an MMKVCache with capacity buffers was updated outside a compiled graph (Dynamo ran the call "
                "eagerly: TORCH_LOGS=recompiles says why); only the mmkv backend's rewritten masks hide the "
                "buffers' unused slots, so the step would attend them"
            )
        elif self.written_by_graph and self.is_compressed():
            raise RuntimeError(UNCOMPILED_UPDATE.format(rank=self.rank))
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, num_new, _ = key_states.shape
        if labels is None or labels.shape[-1] != num_new:
            labels = torch.zeros((batch, num_new), dtype=LABEL_DTYPE, device=key_states.device)
        new_labels = labels.to(device=key_states.device, dtype=LABEL_DTYPE).unsqueeze(1).expand(batch, heads, num_new)
        new_positions = torch.arange(num_new, device=key_states.device, dtype=POSITION_DTYPE) + self.logical_length
        new_positions = new_positions.expand(batch, heads, num_new)
        new = (key_states, value_states, new_labels.contiguous(), new_positions.contiguous())
        self.logical_length = self.logical_length + num_new
        if self.buffers is not None:
            # In place, and attention reads the whole buffers: the rewritten mask hides the unused slots.
            capacity = self.buffers.keys.shape[2]
            # Traced, this is a guard that gives all the buffers one length symbol instead of one each (symbols
            # cost guards, tracing time and region checks).
            if any(buffer.shape[2] != capacity for buffer in self.buffers):
                raise RuntimeError(f"layer {self.rank}'s capacity buffers differ in length")
            if self.filled + num_new > capacity:
                raise RuntimeError(f"{num_new} new slots overflow layer {self.rank}'s capacity buffers: call reserve")
            ops.cache_write(self.buffers, new, self.filled, self.placement_text)
            self.filled = self.filled + num_new
            return self.buffers.keys, self.buffers.values
        self.set_state(ops.cache_append(self.state(), new, self.placement_text))
        return self.keys, self.values

    def reserve(self, num_new: int, room: int = CAPACITY_CHUNK) -> None:
        """Make room for ``num_new`` slots in capacity buffers; when short, (re)allocate them with ``room`` unused
        slots (at least ``num_new``) after the held ones, copying those once."""
        if self.buffers is not None and self.filled + num_new <= self.buffers.keys.shape[2]:
            return
        state = self.state()
        self.set_state(state)  # drops the old buffers
        self.buffers = state.with_room(max(num_new, room))
        for buffer in self.buffers:  # another generate's capacity differs: one decode graph serves every capacity
            torch._dynamo.maybe_mark_dynamic(buffer, 2)
        self.filled = state.keys.shape[2]
        self.sync_views()

    def sync_views(self) -> None:
        """Point the state fields at the filled part of the capacity buffers (after a call wrote into them)."""
        if self.buffers is not None:
            for name, tensor in zip(STATE_FIELDS, self.buffers.narrow(self.filled), strict=True):
                setattr(self, name, tensor)

    @property
    def rank(self) -> int:
        return self.placement.index

    @property
    def count(self) -> int:
        return self.placement.count

    @property
    def window(self) -> int:
        return self.placement.window

    def state(self) -> SlotState:
        """The per-slot tensors."""
        return SlotState(*(getattr(self, name) for name in STATE_FIELDS))

    def set_state(self, state) -> None:
        """Hold ``state`` as it is (no capacity buffers)."""
        for name, tensor in zip(STATE_FIELDS, state, strict=True):
            setattr(self, name, tensor)
        self.buffers, self.filled = None, 0

    def get_seq_length(self) -> int:
        """Logical length: the tokens seen so far. Positions of new tokens continue from here."""
        return self.logical_length

    def get_physical_length(self) -> int:
        """Slots actually stored."""
        if self.buffers is not None:
            return self.filled
        return 0 if self.keys is None else self.keys.shape[-2]

    def is_compressed(self) -> bool:
        """Whether slots were evicted (not just dropped out of a sliding window)."""
        return self.is_initialized and self.get_physical_length() < min(
            self.logical_length, self.window or self.logical_length
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The usual mask over the slots this step attends to, which are the newest ones until something is
        evicted (then :meth:`MMKVCache.get_mask_sizes` takes over and the backend rebuilds every mask from the
        slots). A one-token step of a sliding layer attends to its ``window`` newest slots."""
        num_new = _query_length(query_length)
        if self.buffers is not None:  # attention reads the whole buffers; the backend rebuilds the mask
            return 1, self.logical_length + num_new - 1
        length = self.get_physical_length() + num_new
        if self.window and num_new == 1:
            length = min(length, self.window)
        return length, self.logical_length + num_new - length

    def get_max_cache_shape(self) -> int:
        """No maximum (transformers before 5.3 asks for it under this name)."""
        return -1

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.set_state((None,) * len(STATE_FIELDS))
        self.logical_length = 0
        self.is_initialized = False
        self.written_by_graph = False

    def _select_batch(self, fn) -> None:
        if self.is_initialized:
            self.set_state(self.state().map(fn))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back: evicted tokens are gone")

    def nbytes(self) -> dict[str, int]:
        """Bytes held: keys+values and the per-slot metadata (labels, positions, scores, weights, parked) of the
        stored slots, and the capacity buffers' unused slots (``reserved``)."""
        if not self.is_initialized:
            return {"kv": 0, "metadata": 0, "reserved": 0}
        state = self.state()
        held = sum(t.nbytes for t in state)
        allocated = sum(t.nbytes for t in self.buffers) if self.buffers is not None else held
        return {"kv": state.keys.nbytes + state.values.nbytes, "metadata": held - state.keys.nbytes -
                state.values.nbytes, "reserved": allocated - held}  # fmt: skip


class MMKVCache(Cache):
    """A cache for ``mmkv_compile``: one :class:`MMKVLayer` per full-attention or sliding-window decoder layer
    (transformers' own layer for any other type), plus the labels of the tokens the next forward call appends
    (set by :meth:`observe`).

    ``mmkv_compile.compile`` and the ``mmkv`` backend create and feed it. To drive a compiled model by hand,
    pass ``cache=MMKVCache(model.config)`` (``past_key_values=`` before transformers 5.24) and call
    :meth:`observe` with each call's inputs before it.

    ``heads``: under tensor parallelism, the process group the model's KV heads are split over
    (``mmkv_compile.compat.head_group(model)``; the compiled routes pass it), else "".

    ``room``: the unused slots capacity buffers get when first allocated, for a cache of fixed capacity (the
    compiled route sets it when it replaces a ``StaticCache``); None lets the compiled route choose.

    ``pending`` holds the eager reference path's unfinished cross-layer schedule during one forward call.
    """

    def __init__(self, config=None, heads: str = "", room: int | None = None, **kwargs):
        decoder = _decoder_config(config)
        self.heads = heads
        self.room = room
        layers = _layers_from_config(decoder, heads) if decoder is not None else None
        self.num_decoder_layers: int | None = getattr(decoder, "num_hidden_layers", None)
        if layers is None:
            super().__init__(layer_class_to_replicate=MMKVLayer)
        else:
            super().__init__(layers=layers)
        self.token_ids = modality_token_ids(config) if config is not None else {}
        self.incoming_labels: torch.Tensor | None = None
        self.pending: Any = None

    def observe(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Derive and hold the labels ``[B, L]`` of the tokens the next forward call appends."""
        num_new = batch = None
        if inputs_embeds is not None:
            batch, num_new = inputs_embeds.shape[:2]
        self.incoming_labels = labels_from_inputs(
            self.token_ids, input_ids, attention_mask, mm_token_type_ids, num_new=num_new, batch_size=batch
        )
        return self.incoming_labels

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            index = len(self.layers)
            self.layers.append(MMKVLayer(rank=index, count=self.num_decoder_layers or index + 1, heads=self.heads))
        layer = self.layers[layer_idx]
        if isinstance(layer, MMKVLayer):
            return layer.update(key_states, value_states, labels=self.incoming_labels)
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def mmkv_layers(self) -> list[MMKVLayer]:
        """The layers mmkv compresses (full and sliding attention); other types stay transformers' own."""
        return [layer for layer in self.layers if isinstance(layer, MMKVLayer)]

    def is_compressed(self) -> bool:
        """Whether any layer has evicted a slot its attention could still see."""
        return any(layer.is_compressed() for layer in self.mmkv_layers)

    def reserve(self, num_new: int, room: int = CAPACITY_CHUNK) -> None:
        """Before a call that appends ``num_new`` tokens and evicts nothing: give every full-attention layer
        capacity buffers with room for them (``room`` unused slots when they must be allocated), so the call
        writes in place (see the module docstring). Only for graphs the mmkv backend rewrites: their masks hide
        the buffers' unused slots."""
        for layer in self.mmkv_layers:
            if layer.is_initialized and not layer.is_sliding:
                layer.reserve(num_new, room)

    def release(self) -> None:
        """Before a call that appends several tokens after the prompt (a follow-up prompt, which is compressed):
        every layer holds its slots as plain tensors again, as before its first :meth:`reserve`."""
        for layer in self.mmkv_layers:
            if layer.buffers is not None:
                layer.set_state(layer.state())

    def sync_views(self) -> None:
        """After such a call: each layer's state fields show the slots it now holds."""
        for layer in self.mmkv_layers:
            layer.sync_views()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Sizes of the mask transformers builds for the compressed layers.

        Once any layer is compressed, the backend replaces every MMKVLayer's mask with one built from its
        slots, and layers may hold different numbers of slots (per-layer budgets) while transformers builds
        one mask for all of them: it then gets a single column at the newest token, which broadcasts over
        any layer's slots and is never used. Other layer types keep their own sizes.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, MMKVLayer) and self.is_compressed():
            return 1, layer.get_seq_length() + _query_length(query_length) - 1
        return super().get_mask_sizes(query_length, layer_idx)

    def get_physical_length(self, layer_idx: int = 0) -> int:
        """Slots stored in a layer (the logical length is :meth:`get_seq_length`)."""
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        return layer.get_physical_length() if isinstance(layer, MMKVLayer) else layer.keys.shape[-2]

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers: ``{"kv": ..., "metadata": ..., "reserved": ...}`` (see MMKVLayer.nbytes)."""
        total = {"kv": 0, "metadata": 0, "reserved": 0}
        for layer in self.layers:
            if isinstance(layer, MMKVLayer):
                for key, value in layer.nbytes().items():
                    total[key] += value
            elif getattr(layer, "keys", None) is not None:
                total["kv"] += layer.keys.nbytes + layer.values.nbytes
        return total

    def label_counts(self, layer_idx: int = 0) -> dict[str, int]:
        """Number of cached slots per modality in one compressible layer's KV head 0, summed over rows."""
        labels = self.mmkv_layers[layer_idx].labels[:, 0]
        return {m.name.lower(): int((labels == int(m)).sum()) for m in Modality if m != Modality.INVALID}


def _query_length(query_length) -> int:
    """transformers before 5.3 passes the step's ``cache_position`` tensor where later ones pass its length."""
    return query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length


def _decoder_config(config):
    if config is None:
        return None
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_kinds(decoder) -> tuple[list[str], list[dict]] | None:
    """(layer types, their cache-layer kwargs) as transformers reads them from a decoder config, or None when the
    config does not say (every layer full attention, created as it is used)."""
    describe = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if describe is not None:
        return describe(decoder)
    # transformers before get_layer_types_and_kwargs: the same reading DynamicCache(config=...) does there
    window = getattr(decoder, "sliding_window", None) or getattr(decoder, "attention_chunk_size", None)
    layer_types = getattr(decoder, "layer_types", None)
    if layer_types is None:
        if window is None:
            return None
        layer_types = [SLIDING] * decoder.num_hidden_layers
    return list(layer_types), [{} if t == FULL else {"sliding_window": window} for t in layer_types]


def _layers_from_config(decoder, heads: str = "") -> list | None:
    """One layer per decoder layer: an :class:`MMKVLayer` for full and sliding-window attention, transformers' own
    layer class for every other type (chunked, linear), which mmkv leaves alone. None when the config does not
    say (then layers are created as they are used)."""
    kinds = layer_kinds(decoder)
    if kinds is None:
        return None
    layer_types, layer_kwargs = kinds
    ours = [kind in (FULL, SLIDING) for kind in layer_types]
    count, layers = sum(ours), []
    for kind, kwargs, mine in zip(layer_types, layer_kwargs, ours, strict=True):
        if mine:
            window = int(kwargs.get("sliding_window") or 0) if kind == SLIDING else 0
            rank = sum(isinstance(x, MMKVLayer) for x in layers)
            layers.append(MMKVLayer(rank=rank, count=count, window=window, heads=heads))
        else:
            layers.append(cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
    return layers


__all__ = ["MMKVCache", "MMKVLayer", "Modality", "layer_kinds"]

"""``MMKVCache``: a transformers ``Cache`` whose layers carry what compression needs.

Each layer holds, per cached slot and KV head: keys, values, a modality label, the token's logical
position, and a running score. Eviction makes the physical length (what is stored, what masks are
sized by) shorter than the logical length (what positions continue from), as in transformers'
``DynamicSlidingWindowLayer``.

Appends go through ``torch.ops.mmkv.cache_append``, so each layer's full state appears as one node in a
captured graph; the backend rewires that node's consumers. Uncompiled, the cache behaves like a
``DynamicCache`` that also records labels and positions.
"""

from __future__ import annotations

import torch
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin

from mmkv_compile import ops  # noqa: F401  (registers torch.ops.mmkv)
from mmkv_compile.labels import LABEL_DTYPE, Modality, labels_from_inputs, modality_token_ids

POSITION_DTYPE = torch.int64
SCORE_DTYPE = torch.float32
# A layer's state, per slot: the operator's inputs and outputs come in this order.
STATE_FIELDS = ("keys", "values", "labels", "positions", "scores", "weights")


class MMKVLayer(CacheLayerMixin):
    """One layer's compressed cache: keys/values ``[B, Hkv, S, D]`` plus per slot a modality label, the token's
    logical position, a running score, and a weight (how many original tokens the slot stands for, > 1
    after merging)."""

    is_sliding = False
    is_croppable = False
    # generate() would wrap an already compiled forward in a second torch.compile if this were True.
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.labels: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.logical_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        device = key_states.device
        self.keys = key_states.new_empty((batch, heads, 0, key_states.shape[-1]))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.labels = torch.empty((batch, heads, 0), dtype=LABEL_DTYPE, device=device)
        self.positions = torch.empty((batch, heads, 0), dtype=POSITION_DTYPE, device=device)
        self.scores = torch.empty((batch, heads, 0), dtype=SCORE_DTYPE, device=device)
        self.weights = torch.empty((batch, heads, 0), dtype=SCORE_DTYPE, device=device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, labels: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a step's keys/values with their labels ``[B, L]`` (text when None); return the full state."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, num_new, _ = key_states.shape
        if labels is None or labels.shape[-1] != num_new:
            labels = torch.zeros((batch, num_new), dtype=LABEL_DTYPE, device=key_states.device)
        new_labels = labels.to(device=key_states.device, dtype=LABEL_DTYPE).unsqueeze(1).expand(batch, heads, num_new)
        new_positions = torch.arange(num_new, device=key_states.device, dtype=POSITION_DTYPE) + self.logical_length
        new_positions = new_positions.expand(batch, heads, num_new)
        self.set_state(torch.ops.mmkv.cache_append(
            *self.state(), key_states, value_states, new_labels.contiguous(), new_positions.contiguous()
        ))  # fmt: skip
        self.logical_length = self.logical_length + num_new
        return self.keys, self.values

    def state(self) -> tuple[torch.Tensor, ...]:
        """The per-slot tensors, in :data:`STATE_FIELDS` order."""
        return tuple(getattr(self, name) for name in STATE_FIELDS)

    def set_state(self, tensors) -> None:
        for name, tensor in zip(STATE_FIELDS, tensors, strict=True):
            setattr(self, name, tensor)

    def get_seq_length(self) -> int:
        """Logical length: the tokens seen so far. Positions of new tokens continue from here."""
        return self.logical_length

    def get_physical_length(self) -> int:
        """Slots actually stored."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The usual mask over the stored slots (see :meth:`MMKVCache.get_mask_sizes` once compressed)."""
        return self.get_physical_length() + _query_length(query_length), 0

    def get_max_cache_shape(self) -> int:
        """No maximum (transformers before 5.3 asks for it under this name)."""
        return -1

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.set_state((None,) * len(STATE_FIELDS))
        self.logical_length = 0
        self.is_initialized = False

    def _select_batch(self, fn) -> None:
        if self.is_initialized:
            self.set_state(fn(t) for t in self.state())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped back: evicted tokens are gone")

    def nbytes(self) -> dict[str, int]:
        """Bytes held: keys+values, and the per-slot metadata (labels, positions, scores, weights)."""
        if not self.is_initialized:
            return {"kv": 0, "metadata": 0}
        kv = self.keys.nbytes + self.values.nbytes
        meta = sum(t.nbytes for t in self.state()[2:])
        return {"kv": kv, "metadata": meta}


class MMKVCache(Cache):
    """A cache for ``mmkv_compile``: one :class:`MMKVLayer` per decoder layer, plus the labels of the
    tokens the next forward call appends (set by :meth:`observe`).

    ``mmkv_compile.compile`` creates and feeds it. To drive a ``torch.compile(model, backend="mmkv")``
    model by hand, pass ``past_key_values=MMKVCache(model.config)`` and call :meth:`observe` with each
    call's inputs before it.
    """

    def __init__(self, config=None, **kwargs):
        layers = _layers_from_config(config) if config is not None else None
        if layers is None:
            super().__init__(layer_class_to_replicate=MMKVLayer)
        else:
            super().__init__(layers=layers)
        self.token_ids = modality_token_ids(config) if config is not None else {}
        self.incoming_labels: torch.Tensor | None = None
        decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.num_decoder_layers: int | None = getattr(decoder, "num_hidden_layers", None)

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
            self.layers.append(MMKVLayer())
        layer = self.layers[layer_idx]
        if isinstance(layer, MMKVLayer):
            return layer.update(key_states, value_states, labels=self.incoming_labels)
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def mmkv_layers(self) -> list[MMKVLayer]:
        """The layers mmkv compresses (full attention); sliding or chunked layers stay transformers' own."""
        return [layer for layer in self.layers if isinstance(layer, MMKVLayer)]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Sizes of the mask transformers builds for the full-attention layers.

        Once any layer is compressed, the backend replaces every MMKVLayer's mask with one built from its
        slots, and layers may hold different numbers of slots (per-layer budgets) while transformers builds
        one mask for all of them: it then gets a single column at the newest token, which broadcasts over
        any layer's slots and is never used. Sliding or chunked layers keep their own sizes.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, MMKVLayer) and any(
            other.get_physical_length() < other.get_seq_length() for other in self.mmkv_layers
        ):
            return 1, layer.get_seq_length() + _query_length(query_length) - 1
        return super().get_mask_sizes(query_length, layer_idx)

    def last_mmkv_layer(self) -> int:
        """Index of the last layer mmkv compresses (the decoder's last layer unless it is sliding/chunked)."""
        count = self.num_decoder_layers or len(self.layers)
        if len(self.layers) >= count:
            return max(i for i, layer in enumerate(self.layers) if isinstance(layer, MMKVLayer))
        return count - 1

    def get_physical_length(self, layer_idx: int = 0) -> int:
        """Slots stored in a layer (the logical length is :meth:`get_seq_length`)."""
        if layer_idx >= len(self.layers):
            return 0
        layer = self.layers[layer_idx]
        return layer.get_physical_length() if isinstance(layer, MMKVLayer) else layer.keys.shape[-2]

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers: ``{"kv": ..., "metadata": ...}``."""
        total = {"kv": 0, "metadata": 0}
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


def _layers_from_config(config) -> list | None:
    """One layer per decoder layer: an :class:`MMKVLayer` for full attention, transformers' own layer class
    for every other type (sliding window, chunked, linear), which mmkv leaves alone. None when the config
    does not say (then layers are created as they are used)."""
    decoder = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    describe = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if describe is not None:
        layer_types, layer_kwargs = describe(decoder)
    else:  # transformers before get_layer_types_and_kwargs: layer_types and the window are plain attributes
        layer_types = getattr(decoder, "layer_types", None)
        if layer_types is None:
            return None
        window = getattr(decoder, "sliding_window", None) or getattr(decoder, "attention_chunk_size", None)
        layer_kwargs = [{} if t == "full_attention" else {"sliding_window": window} for t in layer_types]
    if all(t == "full_attention" for t in layer_types):
        return None
    return [
        MMKVLayer() if kind == "full_attention" else cache_utils.DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs)
        for kind, kwargs in zip(layer_types, layer_kwargs, strict=True)
    ]


__all__ = ["MMKVCache", "MMKVLayer", "Modality"]

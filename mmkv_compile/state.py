"""The per-slot state of one cache layer: what every cached slot carries, read by field everywhere.

The cache layers hold it, ``mmkv::cache_append`` extends it, ``mmkv::score_evict_merge`` returns the kept part
of it, and the operators' schemas list its fields in this order (``ops.py`` builds them from this tuple).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mmkv_compile.labels import LABEL_DTYPE, Modality

POSITION_DTYPE = torch.int64
SCORE_DTYPE = torch.float32
# What a slot's score, weight and parked flag start as when it is appended (or reserved, unused).
NEW_SLOT_FILLS = {"scores": 0, "weights": 1, "parked": False}


class SlotState(NamedTuple):
    """Per cached slot and KV head (every tensor is ``[B, Hkv, S, ...]``)."""

    keys: Any  # [B, Hkv, S, D]
    values: Any  # [B, Hkv, S, D]
    labels: Any  # int8 modality label; INVALID for padding and unused slots
    positions: Any  # int64 logical position of the token (-1 for a memory slot)
    scores: Any  # float32 running score (accumulating methods)
    weights: Any  # float32 how many original tokens the slot stands for (> 1 after merging)
    parked: Any  # bool: in the recycle bin (held and scored, not attended)

    @staticmethod
    def empty(batch: int, heads: int, head_dim: int, value_dim: int, dtype, device) -> SlotState:
        """A state with no slots."""
        return SlotState(
            keys=torch.empty((batch, heads, 0, head_dim), dtype=dtype, device=device),
            values=torch.empty((batch, heads, 0, value_dim), dtype=dtype, device=device),
            labels=torch.empty((batch, heads, 0), dtype=LABEL_DTYPE, device=device),
            positions=torch.empty((batch, heads, 0), dtype=POSITION_DTYPE, device=device),
            scores=torch.empty((batch, heads, 0), dtype=SCORE_DTYPE, device=device),
            weights=torch.empty((batch, heads, 0), dtype=SCORE_DTYPE, device=device),
            parked=torch.empty((batch, heads, 0), dtype=torch.bool, device=device),
        )

    def with_room(self, room: int) -> SlotState:
        """Buffers holding this state's slots followed by ``room`` unused ones (label INVALID, position -1, score
        0, weight 1, not parked): what ``mmkv::cache_write`` appends into in place."""
        unused = {"labels": int(Modality.INVALID), "positions": -1, **NEW_SLOT_FILLS}
        grown = []
        for name, tensor in zip(STATE_FIELDS, self, strict=True):
            buffer = tensor.new_full(
                (*tensor.shape[:2], tensor.shape[2] + room, *tensor.shape[3:]), unused.get(name, 0)
            )
            buffer[:, :, : tensor.shape[2]] = tensor
            grown.append(buffer)
        return SlotState(*grown)

    def narrow(self, length: int) -> SlotState:
        """Views of the first ``length`` slots."""
        return self.map(lambda t: t.narrow(2, 0, length))

    def map(self, fn) -> SlotState:
        """The state with ``fn`` applied to every field."""
        return SlotState(*(fn(t) for t in self))

    def with_length(self, length) -> SlotState:
        """Empty tensors shaped like this state but with ``length`` slots (for fake kernels)."""
        return self.map(lambda t: t.new_empty((*t.shape[:2], length, *t.shape[3:])))


STATE_FIELDS = SlotState._fields

__all__ = ["NEW_SLOT_FILLS", "POSITION_DTYPE", "SCORE_DTYPE", "STATE_FIELDS", "SlotState"]

"""Attention masks over a compressed cache, built from its slots' labels and positions.

Once slots are evicted, transformers' masks (built from the logical 2-D attention mask) no longer line
up with the stored slots; the backend replaces them at every rewritten site with this one.
"""

from __future__ import annotations

import torch

from mmkv_compile.kernels.reference import visible_keys


def slot_attention_mask(
    labels: torch.Tensor, positions: torch.Tensor, query: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Mask ``[B, Hq, Lq, S]`` for ``query [B, Hq, Lq, D]`` over slots with ``labels/positions [B, Hkv, S]``.

    A slot is visible when it is valid and not after the query; each query also sees its own slot, so
    padding rows stay finite. Returns bool (True = attend) or, with ``dtype``, an additive float mask.
    """
    num_heads, num_new = query.shape[1], query.shape[2]
    seq = labels.shape[-1]
    query_slots = torch.arange(seq - num_new, seq, device=labels.device)
    visible = visible_keys(labels, positions, query_slots)
    own_slot = torch.arange(seq, device=labels.device).unsqueeze(0) == query_slots.unsqueeze(1)
    visible = (visible | own_slot).repeat_interleave(num_heads // labels.shape[1], dim=1)
    if dtype is None:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=labels.device).masked_fill(~visible, torch.finfo(dtype).min)

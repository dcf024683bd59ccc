"""Attention masks over a compressed cache, built from its slots' labels and positions.

Once slots are evicted, transformers' masks (built from the logical 2-D attention mask) no longer line
up with the stored slots; the backend replaces them at every rewritten site with this one.
"""

from __future__ import annotations

import torch

from mmkv_compile.kernels.reference import visible_keys


def slot_attention_mask(
    labels: torch.Tensor,
    positions: torch.Tensor,
    query: torch.Tensor,
    dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
    weighted: bool = False,
) -> torch.Tensor:
    """Mask ``[B, Hq, Lq, S]`` for ``query [B, Hq, Lq, D]`` over slots with ``labels/positions [B, Hkv, S]``.

    A slot is visible when it is valid and not after the query; each query also sees its own slot, so
    padding rows stay finite. With ``weights``, a parked slot (negative weight) is not attended; with
    ``weighted``, a slot standing for ``w`` tokens gets ``log w`` added to its logits, so it weighs in the
    softmax as the ``w`` tokens it absorbed would (RetentiveKV's memory). Returns bool (True = attend) or,
    with ``dtype`` or ``weighted``, an additive float mask.
    """
    num_heads, num_new = query.shape[1], query.shape[2]
    seq = labels.shape[-1]
    groups = num_heads // labels.shape[1]
    query_slots = torch.arange(seq - num_new, seq, device=labels.device)
    visible = visible_keys(labels, positions, query_slots)
    if weights is not None:
        visible = visible & (weights > 0).unsqueeze(-2)
    own_slot = torch.arange(seq, device=labels.device).unsqueeze(0) == query_slots.unsqueeze(1)
    visible = (visible | own_slot).repeat_interleave(groups, dim=1)
    if dtype is None and not weighted:
        return visible
    dtype = dtype or query.dtype
    bias = torch.zeros(visible.shape, dtype=dtype, device=labels.device)
    if weighted and weights is not None:
        log_weight = torch.log(weights.float().clamp(min=1e-30)).to(dtype)
        bias = bias + log_weight.repeat_interleave(groups, dim=1).unsqueeze(-2)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)

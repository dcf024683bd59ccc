"""Attention masks over a compressed cache, built from its slots' labels and positions.

Once slots are evicted, transformers' masks (built from the logical 2-D attention mask) no longer line
up with the stored slots; the backend replaces them at every rewritten site with this one.
"""

from __future__ import annotations

import torch

from mmkv_compile.kernels.reference import visible_to


def slot_attention_mask(
    labels: torch.Tensor,
    positions: torch.Tensor,
    query: torch.Tensor,
    window: int = 0,
    parked: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    query_labels: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask ``[B, Hq, Lq, S]`` for ``query [B, Hq, Lq, D]`` over slots with ``labels/positions [B, Hkv, S]``.

    The query tokens' own slots are the last ``Lq`` unless ``query_labels/query_positions [B, Hkv, Lq]`` say
    which tokens they are (capacity buffers hold unused slots after them).

    A slot is visible when it is valid, not after the query and, under a sliding ``window``, less than
    ``window`` positions before it; a ``parked`` slot (recycle bin) is not attended. Each query also sees its own
    slot, so padding rows stay finite. With ``weights``, a slot standing for ``w`` tokens gets ``log w`` added to
    its logits, so it weighs in the softmax as the ``w`` tokens it absorbed would (RetentiveKV's memory).
    Returns bool (True = attend), or an additive float mask with ``dtype`` or ``weights``.
    """
    num_heads, num_new = query.shape[1], query.shape[2]
    seq = labels.shape[-1]
    groups = num_heads // labels.shape[1]
    if query_positions is None:
        query_labels, query_positions = labels[..., seq - num_new :], positions[..., seq - num_new :]
    visible = visible_to(labels, positions, query_labels, query_positions, window)
    if parked is not None:
        visible = visible & ~parked.unsqueeze(-2)
    # positions are unique among a row's slots, and unused or memory slots (-1) are never a query's own
    own_slot = positions.unsqueeze(-2) == query_positions.unsqueeze(-1)
    visible = (visible | own_slot).repeat_interleave(groups, dim=1)
    if dtype is None and weights is None:
        return visible
    dtype = dtype or query.dtype
    bias = torch.zeros(visible.shape, dtype=dtype, device=labels.device)
    if weights is not None:
        log_weight = torch.log(weights.float().clamp(min=1e-30)).to(dtype)
        bias = bias + log_weight.repeat_interleave(groups, dim=1).unsqueeze(-2)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)

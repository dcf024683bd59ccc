"""Prefill attention on SDPA's fused causal path when the mask turns out to be causal only.

Eagerly, transformers passes SDPA no mask for a prompt without padding (``is_causal=True``); under tracing it
cannot look at the padding mask, so the captured graph always carries an explicit ``[B, 1, L, L]`` mask, and
SDPA with an explicit mask is more than twice as slow at long context on CPU. These kernels restore the eager
choice at run time: one check per mask, then each attention takes the causal path when the check holds and the
mask otherwise (padded rows, sliding windows, anything else), so the result is exact either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def is_causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """0-d bool: ``mask`` (bool, or additive float) lets each query see exactly itself and the keys before it,
    with query and key positions aligned at the start (the square prefill case)."""
    queries, keys = mask.shape[-2], mask.shape[-1]
    if queries != keys:
        return torch.zeros((), dtype=torch.bool, device=mask.device)
    causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril_()
    if mask.dtype == torch.bool:
        return torch.eq(mask, causal).all()
    hidden = mask <= torch.finfo(mask.dtype).min  # finfo.min and -inf both hide a key
    return torch.where(causal, mask == 0, hidden).all()


def causal_or_masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    mask_is_causal: torch.Tensor,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ``is_causal=True`` when ``mask_is_causal`` holds, else with ``mask``.

    The output is ``[B, H, L, D]`` laid out as ``[B, L, H, D]`` (what the fused kernels write, and what the
    model's transpose back to ``[B, L, H, D]`` wants), whichever path ran: the graph was compiled for one layout.
    """
    if bool(mask_is_causal):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous().transpose(1, 2)

"""Triton kernels of the per-layer attention signals (``kernels/layer_signals.py`` is the spec).

One kernel, :func:`_row_signal_kernel`, computes a statistic of every query row's softmax without materializing
the ``[Lq, S]`` attention: its first loop over the keys finds the row's max logit and softmax sum (so its
log-sum-exp), its second loop recomputes the logits per key tile and accumulates either the entropy
``-sum p log p`` or VL-Cache's dense-entry count. Each program holds the whole GQA group of a block of queries,
so a key tile is loaded once per group. Which queries and keys take part is given by two per-slot codes:

  attention     every valid query over every valid key (MEDA's code)
  density       the post-vision queries over every valid key (VL-Cache)
  cross_modal   text queries over visual keys and visual queries over text keys, in one launch (MEDA's paper):
                a key is visible to a query when both are valid and their codes (1 text, 2 visual) differ

The per-row results ``[B, Hq, Lq]`` are averaged in torch (float64), as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkv_compile.kernels import triton_kernels as tk
from mmkv_compile.kernels.layer_signals import DENSITY_THRESHOLD
from mmkv_compile.kernels.reference import INVALID, TEXT, post_vision_queries

_NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: exp(-inf - _NEG_BIG) is 0, never NaN
_POS_BIG = tl.constexpr(2**62)  # larger than any position: the minimum over a tile with no visible key


@triton.jit
def _visible(q_code, q_pos, q_on, k_code, k_pos, k_on, window, CROSS: tl.constexpr):
    """Bool ``[rows, keys]``: the key takes part in the row's softmax (causal by position, within a sliding
    ``window`` when it is not 0)."""
    visible = q_on[:, None] & k_on[None, :] & (k_pos[None, :] <= q_pos[:, None])
    visible = visible & ((window == 0) | (k_pos[None, :] > q_pos[:, None] - window))
    if CROSS:
        visible = visible & (k_code[None, :] != q_code[:, None])
    return visible


@triton.jit
def _row_signal_kernel(
    q_ptr, k_ptr, qcode_ptr, kcode_ptr, pos_ptr, value_ptr, seen_ptr,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d,
    num_kv, seq, num_new, scaling, threshold, window,
    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    CROSS: tl.constexpr, DENSITY: tl.constexpr,
):  # fmt: skip
    """Per query row: entropy (or dense share) of its softmax over its visible keys, and whether it sees any.

    Program (b * Hkv + h, query block). Outputs ``value`` float32 and ``seen`` int8, both ``[B, Hq, Lq]``.
    """
    pid_bh = tl.program_id(0)
    q_block = tl.program_id(1)
    b = (pid_bh // num_kv).to(tl.int64)
    h = (pid_bh % num_kv).to(tl.int64)
    row_base = (b * num_kv + h) * seq  # codes and positions are contiguous [B, Hkv, S]

    rows = tl.arange(0, BLOCK_G * BLOCK_Q)
    g = rows // BLOCK_Q
    w = q_block * BLOCK_Q + rows % BLOCK_Q
    row_ok = (g < GROUP) & (w < num_new)
    q_slot = seq - num_new + w
    q_code = tl.load(qcode_ptr + row_base + q_slot, mask=row_ok, other=0)
    q_pos = tl.load(pos_ptr + row_base + q_slot, mask=row_ok, other=0)
    q_on = row_ok & (q_code != 0)
    q_pos_max = tl.max(tl.where(q_on, q_pos, -1), axis=0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    head = h * GROUP + g
    q_ptrs = q_ptr + b * sq_b + head[:, None] * sq_h + w[:, None] * sq_l + d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Loop 1: each row's max logit and softmax sum.
    row_max = tl.full([BLOCK_G * BLOCK_Q], _NEG_BIG, tl.float32)
    row_sum = tl.zeros([BLOCK_G * BLOCK_Q], tl.float32)
    for n0 in range(0, seq, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < seq
        k_code = tl.load(kcode_ptr + row_base + n, mask=n_ok, other=0)
        k_pos = tl.load(pos_ptr + row_base + n, mask=n_ok, other=0)
        k_on = n_ok & (k_code != 0)
        # Skip key tiles after every query of the block (half the work of a causal prefill).
        if tl.min(tl.where(k_on, k_pos, _POS_BIG), axis=0) <= q_pos_max:
            k_ptrs = k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :] * sk_d
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            visible = _visible(q_code, q_pos, q_on, k_code, k_pos, k_on, window, CROSS)
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max

    seen = row_sum > 0
    lse = row_max + tl.log(tl.where(seen, row_sum, 1.0))
    peak = tl.exp(row_max - lse)  # the row's largest probability

    # Loop 2: the statistic, from each entry's log-probability.
    acc = tl.zeros([BLOCK_G * BLOCK_Q], tl.float32)
    count = tl.zeros([BLOCK_G * BLOCK_Q], tl.float32)
    for n0 in range(0, seq, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < seq
        k_code = tl.load(kcode_ptr + row_base + n, mask=n_ok, other=0)
        k_pos = tl.load(pos_ptr + row_base + n, mask=n_ok, other=0)
        k_on = n_ok & (k_code != 0)
        if tl.min(tl.where(k_on, k_pos, _POS_BIG), axis=0) <= q_pos_max:
            k_ptrs = k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :] * sk_d
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            visible = _visible(q_code, q_pos, q_on, k_code, k_pos, k_on, window, CROSS)
            log_p = tl.where(visible, logits - lse[:, None], 0.0)
            p = tl.where(visible, tl.exp(log_p), 0.0)
            if DENSITY:
                dense = visible & (p >= threshold * peak[:, None])
                acc += tl.sum(dense.to(tl.float32), axis=1)
                count += tl.sum(visible.to(tl.float32), axis=1)
            else:
                acc += tl.sum(p * log_p, axis=1)

    if DENSITY:
        value = acc / tl.maximum(count, 1.0)
    else:
        value = -acc
    out = (pid_bh.to(tl.int64) * GROUP + g) * num_new + w  # [B, Hq, Lq] with Hq = Hkv * GROUP
    tl.store(value_ptr + out, tl.where(seen, value, 0.0), mask=row_ok)
    tl.store(seen_ptr + out, seen.to(tl.int8), mask=row_ok)


def row_signals(
    query: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    query_code: torch.Tensor,
    key_code: torch.Tensor,
    scaling: float,
    cross: bool,
    density: bool,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's softmax statistic: (value float32, seen bool), both ``[B, Hq, Lq]``.

    ``query_code`` / ``key_code`` (``[B, Hkv, S]``, nonzero where a slot takes part as a query / key) select
    the rows and keys; with ``cross`` a key is visible only to queries with a different code. ``density``
    gives the share of visible entries at least ``DENSITY_THRESHOLD`` of the row's largest, else the entropy.
    Rows that see no key get value 0 and seen False.
    """
    tk._check_device(keys)
    batch, num_kv, seq, dim = keys.shape
    num_heads, num_new = query.shape[1], query.shape[2]
    group = num_heads // num_kv
    value = tk._empty((batch, num_heads, num_new), torch.float32, keys.device)
    seen = tk._empty((batch, num_heads, num_new), torch.int8, keys.device)
    if value.numel() == 0:
        return value, seen.bool()
    if query.dtype != keys.dtype:  # tl.dot wants one input dtype; the reference computes in float32 anyway
        query, keys = query.float(), keys.float()
    block_g, block_q, block_n, block_d = tk._score_blocks(group, dim, keys.device)
    dot_fp32 = keys.dtype == torch.bfloat16 and tk._is_interpreted()  # the interpreter's dot misreads bfloat16
    precision = "ieee" if keys.dtype == torch.float32 or dot_fp32 else "tf32"  # fp32 logits must not go TF32
    _row_signal_kernel[(batch * num_kv, triton.cdiv(num_new, block_q))](
        query, keys, query_code.to(torch.int8).contiguous(), key_code.to(torch.int8).contiguous(),
        positions.contiguous(), value, seen, *query.stride(), *keys.stride(),
        num_kv, seq, num_new, scaling, DENSITY_THRESHOLD, window,
        GROUP=group, DIM=dim, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION=precision, DOT_FP32=dot_fp32, CROSS=cross, DENSITY=density,
    )  # fmt: skip
    return value, seen.bool()


def _row_sums(value: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Sum over heads and seen rows, and the number of seen rows, per batch row: float64 ``[B, 2]``."""
    total = torch.where(seen, value, 0.0).double().sum(dim=(1, 2))
    rows = seen.sum(dim=(1, 2)).double()
    return torch.stack([total, rows], dim=-1)


def layer_signal_sums(query, keys, labels, positions, scaling: float, signal: str, window: int = 0) -> torch.Tensor:
    """Triton version of the reference's per-part sums (``layer_signals._layer_signal_sums``): float64
    ``[B, parts, 2]``."""
    valid = labels != INVALID
    if signal == "attention":
        value, seen = row_signals(
            query, keys, positions, valid, valid, scaling, cross=False, density=False, window=window
        )
        return _row_sums(value, seen).unsqueeze(1)
    if signal == "density":
        post_vision = post_vision_queries(labels, positions)
        value, seen = row_signals(
            query, keys, positions, post_vision, valid, scaling, cross=False, density=True, window=window
        )
        return _row_sums(value, seen).unsqueeze(1)
    if signal != "cross_modal":
        raise ValueError(f"unknown layer signal {signal!r}")
    # 1 text, 2 visual, 0 invalid: one launch covers both directions; rows are split by their own code after.
    code = torch.where(valid, torch.where(labels == TEXT, 1, 2), 0).to(torch.int8)
    value, seen = row_signals(query, keys, positions, code, code, scaling, cross=True, density=False, window=window)
    group = query.shape[1] // keys.shape[1]
    row_code = code[..., keys.shape[2] - query.shape[2] :].repeat_interleave(group, dim=1)  # [B, Hq, Lq]
    return torch.stack([_row_sums(value, seen & (row_code == 1)), _row_sums(value, seen & (row_code == 2))], dim=1)

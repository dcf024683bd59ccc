"""Triton implementation of the score-evict-merge operator (the CUDA kernel; ``kernels/reference.py`` is the spec).

What runs where:
  score   Triton: two passes over the keys, never materializing the ``[Lq, S]`` attention.
          pass 1 (:func:`_row_stats_kernel`) finds each window query's softmax max and sum, split over key ranges;
          pass 2 (:func:`_column_sums_kernel`) recomputes the logits per key block and sums the probabilities
          over the window queries, per query head, then reduces over the GQA group (mean or max).
          Accumulation, pooling and the "none"/"position" scores are the reference's torch code.
  budget, forced keep, select   the reference's torch code (small ``[B, Hkv, S]`` tensors).
  gather  Triton (:func:`_gather_kernel`): copies the kept K/V rows and their labels, positions, scores and weights.
  merge   Triton finds each slot's most similar kept slot (:func:`_nearest_kept_kernel`: tiled dot products with a
          running max/argmax, never materializing the ``[S, K]`` similarities); the weighted sums are the reference's
          torch scatter (exact weights, bounded memory).
  absorb, park, HAE's dual attention, VL-Cache's post-vision score   the reference's torch code.

Every kernel also runs under ``TRITON_INTERPRET=1`` on CPU tensors (that is how the tests check it without a GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mmkv_compile.kernels import reference as ref
from mmkv_compile.state import SlotState

_NEG_BIG = tl.constexpr(-1.0e30)  # finite start for running maxima: exp(-inf - _NEG_BIG) is 0, never NaN
_POS_BIG = tl.constexpr(2**62)  # larger than any position: the minimum over a block with no valid key


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills; the tests swap this for a poisoning version to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _is_interpreted() -> bool:
    return isinstance(_gather_kernel, triton.runtime.interpreter.InterpretedFunction)


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError(
            f"the Triton score-evict-merge needs CUDA tensors (got {tensor.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run it on CPU, or use the reference kernel"
        )


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


@triton.jit
def _seen(k_pos, q_pos, window):
    """Bool ``[rows, keys]``: the key is not after the query and, under a sliding window, less than ``window``
    positions before it."""
    seen = k_pos[None, :] <= q_pos[:, None]
    return seen & ((window == 0) | (k_pos[None, :] > q_pos[:, None] - window))


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, lab_ptr, pos_ptr, max_ptr, sum_ptr,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d,
    num_kv, seq, num_new, first, num_win, keys_per_split, scaling, window,
    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Pass 1: softmax max and sum of each window query over the visible keys of one key range.

    Program (b * Hkv + h, query block, key split). Rows are the group's query heads times the block's
    queries, so each key tile is loaded once for the whole GQA group. Outputs ``[splits, B, Hq, num_win]``.
    """
    pid_bh = tl.program_id(0)
    q_block = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // num_kv).to(tl.int64)
    h = (pid_bh % num_kv).to(tl.int64)
    row_base = (b * num_kv + h) * seq  # labels/positions are contiguous [B, Hkv, S]

    rows = tl.arange(0, BLOCK_G * BLOCK_Q)
    g = rows // BLOCK_Q
    w = q_block * BLOCK_Q + rows % BLOCK_Q  # index within the window
    row_ok = (g < GROUP) & (w < num_win)
    q_slot = seq - num_new + first + w
    q_lab = tl.load(lab_ptr + row_base + q_slot, mask=row_ok, other=-1)
    q_pos = tl.load(pos_ptr + row_base + q_slot, mask=row_ok, other=0)
    q_valid = row_ok & (q_lab != -1)
    q_pos_max = tl.max(tl.where(q_valid, q_pos, -1), axis=0)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    head = h * GROUP + g
    q_ptrs = q_ptr + b * sq_b + head[:, None] * sq_h + (first + w)[:, None] * sq_l + d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    row_max = tl.full([BLOCK_G * BLOCK_Q], _NEG_BIG, tl.float32)
    row_sum = tl.zeros([BLOCK_G * BLOCK_Q], tl.float32)
    k_start = split * keys_per_split
    k_stop = tl.minimum(k_start + keys_per_split, seq)
    for n0 in range(k_start, k_stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < k_stop
        k_lab = tl.load(lab_ptr + row_base + n, mask=n_ok, other=-1)
        k_pos = tl.load(pos_ptr + row_base + n, mask=n_ok, other=0)
        k_valid = n_ok & (k_lab != -1)
        # Skip key tiles that lie after every query of the block (half the work of a causal prefill).
        if tl.min(tl.where(k_valid, k_pos, _POS_BIG), axis=0) <= q_pos_max:
            k_ptrs = k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :] * sk_d
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
            visible = q_valid[:, None] & k_valid[None, :] & _seen(k_pos, q_pos, window)
            logits = tl.where(visible, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max

    out = ((split * tl.num_programs(0) + pid_bh).to(tl.int64) * GROUP + g) * num_win + w
    tl.store(max_ptr + out, row_max, mask=row_ok)
    tl.store(sum_ptr + out, row_sum, mask=row_ok)


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, lab_ptr, pos_ptr, max_ptr, sum_ptr, out_ptr,
    sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d,
    num_kv, seq, num_new, first, num_win, chunk, scaling, window,
    GROUP: tl.constexpr, DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):  # fmt: skip
    """Pass 2: attention each key of one block receives from the window queries, ``[B, Hkv, S]``.

    Program (b * Hkv + h, key block): the key tile stays in registers while the loop walks the query
    blocks. The launcher passes one chunk spanning the window, so the group reduction (mean or max)
    is taken over each head's sum over every window query, as in the reference.
    """
    pid_bh = tl.program_id(0)
    k_block = tl.program_id(1)
    b = (pid_bh // num_kv).to(tl.int64)
    h = (pid_bh % num_kv).to(tl.int64)
    row_base = (b * num_kv + h) * seq

    n = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < seq
    k_lab = tl.load(lab_ptr + row_base + n, mask=n_ok, other=-1)
    k_pos = tl.load(pos_ptr + row_base + n, mask=n_ok, other=0)
    k_valid = n_ok & (k_lab != -1)
    k_pos_min = tl.min(tl.where(k_valid, k_pos, _POS_BIG), axis=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    k_ptrs = k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :] * sk_d
    k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)

    rows = tl.arange(0, BLOCK_G * BLOCK_Q)
    g = rows // BLOCK_Q
    head = h * GROUP + g
    stats_base = (pid_bh.to(tl.int64) * GROUP + g) * num_win  # into the combined [B, Hq, num_win] stats
    total = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, num_win, chunk):
        c1 = tl.minimum(c0 + chunk, num_win)
        per_head = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        for q0 in range(c0, c1, BLOCK_Q):
            w = q0 + rows % BLOCK_Q
            row_ok = (g < GROUP) & (w < c1)
            q_slot = seq - num_new + first + w
            q_lab = tl.load(lab_ptr + row_base + q_slot, mask=row_ok, other=-1)
            q_pos = tl.load(pos_ptr + row_base + q_slot, mask=row_ok, other=0)
            q_valid = row_ok & (q_lab != -1)
            if tl.max(tl.where(q_valid, q_pos, -1), axis=0) >= k_pos_min:
                q_ptrs = q_ptr + b * sq_b + head[:, None] * sq_h + (first + w)[:, None] * sq_l + d[None, :] * sq_d
                q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    q = q.to(tl.float32)
                row_max = tl.load(max_ptr + stats_base + w, mask=row_ok, other=0.0)
                row_sum = tl.load(sum_ptr + stats_base + w, mask=row_ok, other=0.0)
                # A row with no visible key has sum 0: it contributes nothing (the reference's nan_to_num).
                row_sum = tl.where(row_sum > 0, row_sum, 1.0)
                logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
                visible = q_valid[:, None] & k_valid[None, :] & _seen(k_pos, q_pos, window)
                logits = tl.where(visible, logits, float("-inf"))
                probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
                per_head += tl.sum(tl.reshape(probs, [BLOCK_G, BLOCK_Q, BLOCK_N]), axis=1)
        if REDUCE_MAX:
            total += tl.max(per_head, axis=0)  # padded heads are 0 and sums are >= 0: they never win
        else:
            total += tl.sum(per_head, axis=0) / GROUP
    tl.store(out_ptr + row_base + n, total, mask=n_ok)


def _score_blocks(group: int, dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_G, BLOCK_Q, BLOCK_N, BLOCK_D) of the scoring kernels."""
    block_g = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs K >= 16: pad small heads with zeros
    if device.type == "cuda":
        rows, block_n = 64, 64
    else:  # the interpreter: small tiles, so tiny test shapes still span several of them
        rows, block_n = 16, 16
    block_q = max(rows // block_g, 1)
    return block_g, block_q, block_n, block_d


@functools.lru_cache(maxsize=16)
def _target_programs(device: torch.device) -> int:
    """Programs worth launching at once: two waves of the GPU's SMs (a few under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def attention_column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    num_queries: int,
    scaling: float,
    group_reduce: str = "mean",
    key_splits: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Attention each key slot receives from the last ``num_queries`` queries, summed: float32 ``[B, Hkv, S]``.

    Same result as :func:`mmkv_compile.kernels.reference.attention_column_sums` (including its per-chunk
    group reduction), in O(B * Hq * num_queries) extra memory. ``key_splits`` forces the number of key
    ranges pass 1 is split into (tests); by default it is chosen to fill the GPU.
    """
    _check_device(keys)
    batch, num_kv, seq, dim = keys.shape
    num_new = query.shape[2]
    group = query.shape[1] // num_kv
    out = _empty((batch, num_kv, seq), torch.float32, keys.device)
    num_queries = min(num_queries, num_new)
    if out.numel() == 0:
        return out
    if num_queries <= 0:
        return out.zero_()
    if query.dtype != keys.dtype:  # tl.dot wants one input dtype; the reference computes in float32 anyway
        query, keys = query.float(), keys.float()
    labels = labels.contiguous()
    positions = positions.contiguous()
    first = num_new - num_queries
    block_g, block_q, block_n, block_d = _score_blocks(group, dim, keys.device)
    # The interpreter's dot reads bfloat16 as raw uint16 bits: there, upcast the tiles (exact) before tl.dot.
    dot_fp32 = keys.dtype == torch.bfloat16 and _is_interpreted()
    # float32 logits must not go through TF32 to match the reference; half types are exact products anyway.
    precision = "ieee" if keys.dtype == torch.float32 or dot_fp32 else "tf32"

    num_q_blocks = triton.cdiv(num_queries, block_q)
    num_k_blocks = triton.cdiv(seq, block_n)
    if key_splits is None:
        key_splits = triton.cdiv(_target_programs(keys.device), batch * num_kv * num_q_blocks)
    key_splits = max(1, min(key_splits, num_k_blocks))
    keys_per_split = triton.cdiv(num_k_blocks, key_splits) * block_n
    key_splits = triton.cdiv(seq, keys_per_split)

    stats_shape = (key_splits, batch, num_kv * group, num_queries)
    split_max = _empty(stats_shape, torch.float32, keys.device)
    split_sum = _empty(stats_shape, torch.float32, keys.device)
    strides = (*query.stride(), *keys.stride())
    meta = dict(GROUP=group, DIM=dim, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d)
    _row_stats_kernel[(batch * num_kv, num_q_blocks, key_splits)](
        query, keys, labels, positions, split_max, split_sum, *strides,
        num_kv, seq, num_new, first, num_queries, keys_per_split, scaling, window,
        PRECISION=precision, DOT_FP32=dot_fp32, **meta,
    )  # fmt: skip
    if key_splits == 1:
        row_max, row_sum = split_max[0], split_sum[0]
    else:  # merge the key ranges' partial softmax statistics
        row_max = split_max.amax(0)
        row_sum = (split_sum * torch.exp(split_max - row_max)).sum(0)

    _column_sums_kernel[(batch * num_kv, num_k_blocks)](
        query, keys, labels, positions, row_max, row_sum, out, *strides,
        num_kv, seq, num_new, first, num_queries, max(num_queries, 1), scaling, window,
        PRECISION=precision, DOT_FP32=dot_fp32, REDUCE_MAX=group_reduce == "max", **meta,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Gather
# --------------------------------------------------------------------------------------------------


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, lab_ptr, pos_ptr, score_ptr, w_ptr, slot_ptr, kept_ptr,
    k_out, v_out, lab_out, pos_out, score_out, w_out,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
    num_kv, seq, out_len,
    DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Copy output rows ``r`` of one (b, h) from input slot ``slots[b, h, r]``; rows not kept become INVALID.

    Program (b * Hkv + h, block of output rows); K/V rows are copied in ``BLOCK_D`` wide tiles.
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // num_kv).to(tl.int64)
    h = (pid_bh % num_kv).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < out_len
    out_row = pid_bh.to(tl.int64) * out_len + r
    slot = tl.load(slot_ptr + out_row, mask=r_ok, other=0)
    take = r_ok & (tl.load(kept_ptr + out_row, mask=r_ok, other=0) != 0)

    in_row = (b * num_kv + h) * seq + slot
    tl.store(lab_out + out_row, tl.load(lab_ptr + in_row, mask=take, other=-1), mask=r_ok)
    tl.store(pos_out + out_row, tl.load(pos_ptr + in_row, mask=take, other=-1), mask=r_ok)
    tl.store(score_out + out_row, tl.load(score_ptr + in_row, mask=take, other=0.0), mask=r_ok)
    tl.store(w_out + out_row, tl.load(w_ptr + in_row, mask=take, other=0.0), mask=r_ok)

    for d0 in tl.static_range(0, DIM, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        src_mask = take[:, None] & (d < DIM)[None, :]
        dst_mask = r_ok[:, None] & (d < DIM)[None, :]
        dst = out_row[:, None] * DIM + d[None, :]
        k_src = k_ptr + b * sk_b + h * sk_h + slot[:, None] * sk_s + d[None, :] * sk_d
        tl.store(k_out + dst, tl.load(k_src, mask=src_mask, other=0.0), mask=dst_mask)
        v_src = v_ptr + b * sv_b + h * sv_h + slot[:, None] * sv_s + d[None, :] * sv_d
        tl.store(v_out + dst, tl.load(v_src, mask=src_mask, other=0.0), mask=dst_mask)


def gather_kept(
    keys: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor,
    slots: torch.Tensor,
    kept: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Triton version of :func:`reference.gather_stage`: new contiguous tensors with ``slots.shape[-1]`` slots.

    ``slots`` int64 ``[B, Hkv, out_len]`` and ``kept`` bool of the same shape, as returned by the select stage.
    Returns (keys, values, labels, positions, scores), and the weights after them when ``weights`` is given.
    """
    _check_device(keys)
    batch, num_kv, seq, dim = keys.shape
    out_len = slots.shape[-1]
    device = keys.device
    new_keys = _empty((batch, num_kv, out_len, dim), keys.dtype, device)
    new_values = _empty((batch, num_kv, out_len, dim), values.dtype, device)
    new_labels = _empty((batch, num_kv, out_len), labels.dtype, device)
    new_positions = _empty((batch, num_kv, out_len), positions.dtype, device)
    new_scores = _empty((batch, num_kv, out_len), scores.dtype, device)
    # Without weights the kernel still needs somewhere to read and write them: a throwaway buffer.
    weights_in = scores if weights is None else weights
    new_weights = _empty((batch, num_kv, out_len), weights_in.dtype, device)
    out = (new_keys, new_values, new_labels, new_positions, new_scores)
    if weights is not None:
        out = (*out, new_weights)
    if new_labels.numel() == 0:
        return out
    block_r = 32 if device.type == "cuda" else 8
    block_d = min(triton.next_power_of_2(dim), 128)
    _gather_kernel[(batch * num_kv, triton.cdiv(out_len, block_r))](
        keys, values, labels.contiguous(), positions.contiguous(), scores.contiguous(), weights_in.contiguous(),
        slots.contiguous(), kept.to(torch.int8).contiguous(),
        new_keys, new_values, new_labels, new_positions, new_scores, new_weights,
        *keys.stride(), *values.stride(), num_kv, seq, out_len,
        DIM=dim, BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def gather_stage(state: SlotState, slots: torch.Tensor, kept: torch.Tensor) -> SlotState:
    """:func:`reference.gather_stage` in Triton: the kept slots of the state tensors in one kernel (the bool
    parked flags in torch)."""
    gathered = gather_kept(state.keys, state.values, state.labels, state.positions, state.scores, slots, kept,
                           state.weights)  # fmt: skip
    return SlotState(*gathered, parked=kept & state.parked.gather(2, slots))


# --------------------------------------------------------------------------------------------------
# Merge assignment
# --------------------------------------------------------------------------------------------------


@triton.jit
def _nearest_kept_kernel(
    k_ptr, t_ptr, kept_ptr, best_ptr, index_ptr,
    sk_b, sk_h, sk_s, sk_d, st_b, st_h, st_s, st_d,
    num_kv, seq, num_kept,
    DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Most cosine-similar kept slot of every slot of one block: program (b * Hkv + h, slot block).

    The slot tile stays in registers while the loop walks the kept slots in ``BLOCK_K`` tiles, keeping a
    running max and argmax per slot. Similarities are raw dot products scaled by both inverse norms: with
    half-precision inputs the products are exact in float32, so tensor cores give float32-accurate cosines.
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // num_kv).to(tl.int64)
    h = (pid_bh % num_kv).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < seq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    x = tl.load(
        k_ptr + b * sk_b + h * sk_h + s[:, None] * sk_s + d[None, :] * sk_d,
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    x32 = x.to(tl.float32)
    # F.normalize's eps: a zero key has similarity 0 with everything (then the lowest kept index wins).
    inv_x = 1.0 / tl.maximum(tl.sqrt(tl.sum(x32 * x32, axis=1)), 1e-12)
    if DOT_FP32:
        x = x32

    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    index = tl.zeros([BLOCK_S], tl.int64)
    kept_base = pid_bh.to(tl.int64) * num_kept  # kept is contiguous [B, Hkv, K]
    for k0 in range(0, num_kept, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kk_ok = kk < num_kept
        on = tl.load(kept_ptr + kept_base + kk, mask=kk_ok, other=0) != 0
        t = tl.load(
            t_ptr + b * st_b + h * st_h + kk[:, None] * st_s + d[None, :] * st_d,
            mask=kk_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        t32 = t.to(tl.float32)
        inv_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(t32 * t32, axis=1)), 1e-12)
        if DOT_FP32:
            t = t32
        dots = tl.dot(x, tl.trans(t), input_precision=PRECISION)
        sim = (dots * inv_x[:, None]) * inv_t[None, :]
        sim = tl.where(on[None, :], sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        # Ties go to the lower index: the smallest index reaching the tile's max, and only a strictly
        # better tile replaces an earlier one.
        tile_index = tl.min(tl.where(sim == tile_best[:, None], kk[None, :], num_kept), axis=1).to(tl.int64)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        index = tl.where(better, tile_index, index)

    out = pid_bh.to(tl.int64) * seq + s
    tl.store(best_ptr + out, best, mask=s_ok)
    tl.store(index_ptr + out, index, mask=s_ok)


def nearest_kept(keys: torch.Tensor, kept_keys: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`reference.nearest_kept`: for every slot of ``keys [B, Hkv, S, D]``, its most
    cosine-similar slot of ``kept_keys [B, Hkv, K, D]`` among those where ``kept [B, Hkv, K]``.

    Returns (similarity float32, index int64), both ``[B, Hkv, S]``; ties go to the lower index, and a row
    with nothing kept gets similarity -inf (index 0). Similarities agree with the reference to float32
    rounding (the reference normalizes before the product, this kernel after it).
    """
    _check_device(keys)
    batch, num_kv, seq, dim = keys.shape
    num_kept = kept_keys.shape[2]
    best = _empty((batch, num_kv, seq), torch.float32, keys.device)
    index = _empty((batch, num_kv, seq), torch.int64, keys.device)
    if best.numel() == 0:
        return best, index
    if num_kept == 0:  # nothing to compare with (the reference's max over an empty dim would raise)
        return best.fill_(float("-inf")), index.zero_()
    if kept_keys.dtype != keys.dtype:  # tl.dot wants one input dtype
        keys, kept_keys = keys.float(), kept_keys.float()
    interpreted = _is_interpreted()
    dot_fp32 = keys.dtype == torch.bfloat16 and interpreted  # the interpreter's dot misreads bfloat16
    if keys.dtype == torch.float32 or dot_fp32:
        # float32 cosines must not drop to TF32 (10-bit mantissa): 3xTF32 on the GPU is float32-accurate.
        precision = "ieee" if interpreted else "tf32x3"
    else:
        precision = "tf32"  # half inputs: exact products, float32 accumulation
    block_d = max(16, triton.next_power_of_2(dim))
    block_s, block_k = (64, 64) if keys.device.type == "cuda" else (16, 16)
    _nearest_kept_kernel[(batch * num_kv, triton.cdiv(seq, block_s))](
        keys, kept_keys, kept.to(torch.int8).contiguous(), best, index,
        *keys.stride(), *kept_keys.stride(), num_kv, seq, num_kept,
        DIM=dim, BLOCK_S=block_s, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision, DOT_FP32=dot_fp32,
    )  # fmt: skip
    return best, index


# --------------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------------


def score_evict_merge(
    query: torch.Tensor,
    state: SlotState,
    scaling: float,
    policy: str,
    prefill: bool,
    layer_budgets: torch.Tensor | None = None,
    keep_positions: torch.Tensor | None = None,
) -> SlotState:
    """Triton kernel of ``mmkv::score_evict_merge``; same signature and results as the reference.

    The reference's stage order with three stages swapped for Triton: attention column sums, the gather of
    the kept state and the merge assignment. Budget, keep order, selection and the other stages are the
    reference's torch code. Outputs never alias inputs.
    """
    _check_device(state.keys)
    return ref.score_evict_merge(
        query, state, scaling, policy, prefill, layer_budgets, keep_positions,
        column_sums=attention_column_sums, gather=gather_stage, nearest=nearest_kept,
    )  # fmt: skip

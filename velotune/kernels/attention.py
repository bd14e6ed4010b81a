"""Exact causal attention for padded or packed batches, with sliding window and logit soft-capping.

Layout: q [B, T, Hq, D], k and v [B, S, Hk, D] with Hq % Hk == 0 (grouped-query attention) and
S >= T. Query row i sits at absolute position S - T + i (bottom-right aligned, so a KV cache of
S - T earlier tokens works). A query at position i sees key j when j <= i, i - j < sliding_window
(Transformers' convention: the window counts the query itself), the key is not padding, and both
lie in the same packed document.

Packed batches: B == 1 and `cu_seqlens` (int32, [n_docs + 1], starting at 0, ending at T) marks
where each document starts; no attention crosses a boundary. Padded batches: `key_padding_mask`
[B, S] is 1 for real tokens, 0 for padding. Query rows that see no key return zeros.

On CUDA the Triton path runs a FlashAttention-2-style kernel: the forward keeps an online softmax
per query block and saves only the output and the per-row logsumexp; the backward recomputes the
probabilities from q, k and that logsumexp in two kernels (dq per query block; dk and dv per key
block, summing the GQA group in registers, deterministic). Key blocks that no query of a block can
see (causal, window, other documents, all-padding ranges) are never read; blocks every query sees
run without masks. `PLAIN_CAUSAL_BACKEND` may hand plain causal attention to PyTorch's SDPA, and
`PACKED_BACKEND` packed causal attention to PyTorch's FlashAttention varlen kernel
(`torch.nn.attention.varlen.varlen_attn`); `select_backend` says which runs for given inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.errors import KernelError
from velotune.kernels._dispatch import interpreting, kernel_mode, use_triton


# fmt: off
# The kernels keep their long argument lists packed, a few per line, to stay readable.
@triton.jit
def _tanh(x):
    # No tanh works both compiled and under the interpreter (libdevice is compiled-only). The
    # exp form loses relative precision near 0, so small arguments use the odd Taylor series,
    # whose first left-out term is below 1e-8 relative for |x| < 0.25.
    ax = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * ax)  # exp(-2|x|)
    far = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    series = -0.05396825396825397 + x2 * 0.021869488536155203
    series = 0.13333333333333333 + x2 * series
    series = -0.3333333333333333 + x2 * series
    near = ax * (1.0 + x2 * series)
    t = tl.where(ax < 0.25, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # Under the interpreter a bf16 tl.dot is computed wrongly: UPCAST does it in float32 instead.
    # IEEE (float32 inputs) keeps full float32 products rather than TF32's 10-bit mantissa.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    # Masks cost registers and predication: full tiles with a power-of-two head dim load without one.
    if CHECK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _store_tile(ptrs, value, row_ok, d_ok, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, value, mask=row_ok[:, None])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _logits(qk, scale_log2, cap_in, cap_out_log2, SOFTCAP: tl.constexpr):
    # Scores in base-2 units (log2(e) folded in, so softmax can use exp2), and the tanh that the
    # softcap gradient needs.
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        return t * cap_out_log2, t
    return qk * scale_log2, qk


@triton.jit
def _visible(q_pos, k_pos, q_doc, k_doc, k_real, kv_len, window,
             HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr):
    # Positions are absolute (query i sits at S - T + i); every operand broadcasts to the tile.
    ok = (k_pos <= q_pos) & (k_pos < kv_len)
    if HAS_WINDOW:
        ok = ok & (q_pos - k_pos < window)
    if PACKED:
        ok = ok & (q_doc == k_doc)
    if HAS_PAD:
        ok = ok & k_real
    return ok


@triton.jit
def _key_blocks(b, p_first, p_last, kv_len, window, DOC_START, KV_LO, KV_HI,
                BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr):
    """Key blocks a query block [p_first, p_last] (absolute positions) needs: (lo, n_blocks, f0, f1).

    Blocks start at key lo; blocks f0..f1-1 are visible to every query of the block and skip masking,
    the others are masked element by element. Keys outside [lo, lo + n_blocks * BLOCK_N) are never
    visible to this query block (causal, window, document and padding bounds), so they are not read.
    """
    lo = p_first * 0
    hi = tl.minimum(p_last + 1, kv_len)
    full_lo = lo
    if HAS_WINDOW:
        lo = tl.maximum(lo, p_first - window + 1)
        full_lo = tl.maximum(full_lo, p_last - window + 1)
    if PACKED:
        lo = tl.maximum(lo, tl.load(DOC_START + p_first))
        full_lo = tl.maximum(full_lo, tl.load(DOC_START + p_last))
    if HAS_PAD:
        lo = tl.maximum(lo, tl.load(KV_LO + b))
        hi = tl.minimum(hi, tl.load(KV_HI + b))
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    full_lo = tl.maximum(full_lo, lo)
    f0 = tl.minimum(tl.cdiv(full_lo - lo, BLOCK_N), n_blocks)
    f1 = tl.maximum(tl.minimum(tl.maximum(p_first + 1 - lo, 0) // BLOCK_N, n_blocks), f0)
    if HAS_PAD:  # padding holes can sit anywhere: mask every block
        f0 = n_blocks
        f1 = n_blocks
    return lo, n_blocks, f0, f1


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, start, q_pos, q_doc,
               DOC_START, PAD_ROW, kv_len, window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
               HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr,
               SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    k_pos = start + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base + k_pos[:, None] * stride_ks + cols[None, :], k_pos < kv_len, d_ok, MASKED, EVEN_D)
    v = _load_tile(v_base + k_pos[:, None] * stride_vs + cols[None, :], k_pos < kv_len, d_ok, MASKED, EVEN_D)
    qk = _mm(q, tl.trans(k), None, UPCAST, IEEE)
    s, _ = _logits(qk, scale_log2, cap_in, cap_out_log2, SOFTCAP)
    if MASKED:
        k_doc = k_pos
        k_real = k_pos < kv_len
        if PACKED:
            k_doc = tl.load(DOC_START + k_pos, mask=k_pos < kv_len, other=-1)
        if HAS_PAD:
            k_real = tl.load(PAD_ROW + k_pos, mask=k_pos < kv_len, other=0) != 0
        ok = _visible(q_pos[:, None], k_pos[None, :], q_doc[:, None], k_doc[None, :], k_real[None, :],
                      kv_len, window, HAS_WINDOW, PACKED, HAS_PAD)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps its max at -inf (so a later block still sets the true
        # max and scores far below 0 do not underflow); only the shift is 0, to give exp2(-inf) = 0
        # rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = m_new
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
    return acc, l_i, m_new


# Forward: one program per (batch x query head, query block); online softmax over the key blocks the
# query block can see (causal/window/document/padding ranges computed up front, blocks entirely
# outside are never read; blocks entirely inside run without masks).
# Floor: 2 * 2 * (visible query-key pairs) * D FLOPs (QK^T and PV), i.e. 2*T^2*Hq*D for causal S=T;
# bytes: q, o once, k and v once per query block.
# Saves for backward: out (input dtype) and the natural-log logsumexp per row (float32, [B, Hq, T];
# +inf for rows that see no key, which makes their recomputed probabilities 0).
@triton.jit
def _attn_fwd(
    Q, K, V, OUT, LSE, DOC_START, KV_LO, KV_HI, PAD,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh,
    q_len, kv_len, n_heads, group, window, scale_log2, cap_in, cap_out_log2, len_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    # Causal work grows with the query block: launch the longest blocks first.
    q_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offset = kv_len - q_len
    rows = q_start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = cols < HEAD_DIM
    q_pos = rows + offset
    b64 = b.to(tl.int64)
    q = _load_tile(Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qt + cols[None, :],
                   row_ok, d_ok, True, BLOCK_D == HEAD_DIM)
    q_doc = q_pos
    if PACKED:
        q_doc = tl.load(DOC_START + q_pos, mask=row_ok, other=-2)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    pad_row = PAD + b64 * kv_len
    p_first = q_start + offset
    p_last = tl.minimum(q_start + BLOCK_M, q_len) - 1 + offset
    lo, n_blocks, f0, f1 = _key_blocks(b, p_first, p_last, kv_len, window, DOC_START, KV_LO, KV_HI,
                                       BLOCK_N, HAS_WINDOW, PACKED, HAS_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Masked blocks are 0..f0-1 and f1..n_blocks-1, walked as one loop.
    for i in range(0, f0 + n_blocks - f1):
        blk = tl.where(i < f0, i, i - f0 + f1)
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo + blk * BLOCK_N, q_pos, q_doc,
            DOC_START, pad_row, kv_len, window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
            BLOCK_N, BLOCK_D == HEAD_DIM, True, HAS_WINDOW, PACKED, HAS_PAD, SOFTCAP, UPCAST, IEEE)
    for blk in range(f0, f1):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, lo + blk * BLOCK_N, q_pos, q_doc,
            DOC_START, pad_row, kv_len, window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
            BLOCK_N, BLOCK_D == HEAD_DIM, False, HAS_WINDOW, PACKED, HAS_PAD, SOFTCAP, UPCAST, IEEE)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    _store_tile(OUT + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :],
                out.to(OUT.dtype.element_ty), row_ok, d_ok, BLOCK_D == HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


# delta = rowsum(dO * O) per (batch, head, query), float32 [B, Hq, T]: the softmax-gradient term
# shared by every key of a row. Floor: read OUT and dO once.
@triton.jit
def _attn_bwd_delta(
    OUT, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_db, stride_dt, stride_dh, q_len, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < q_len)[:, None] & (cols < HEAD_DIM)[None, :]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dt + cols[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * q_len + rows, delta, mask=rows < q_len)


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, start, q_pos, q_doc,
              DOC_START, PAD_ROW, kv_len, window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
              HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr,
              SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    k_pos = start + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base + k_pos[:, None] * stride_ks + cols[None, :], k_pos < kv_len, d_ok, MASKED, EVEN_D)
    v = _load_tile(v_base + k_pos[:, None] * stride_vs + cols[None, :], k_pos < kv_len, d_ok, MASKED, EVEN_D)
    qk = _mm(q, tl.trans(k), None, UPCAST, IEEE)
    s, t = _logits(qk, scale_log2, cap_in, cap_out_log2, SOFTCAP)
    if MASKED:
        k_doc = k_pos
        k_real = k_pos < kv_len
        if PACKED:
            k_doc = tl.load(DOC_START + k_pos, mask=k_pos < kv_len, other=-1)
        if HAS_PAD:
            k_real = tl.load(PAD_ROW + k_pos, mask=k_pos < kv_len, other=0) != 0
        ok = _visible(q_pos[:, None], k_pos[None, :], q_doc[:, None], k_doc[None, :], k_real[None, :],
                      kv_len, window, HAS_WINDOW, PACKED, HAS_PAD)
        s = tl.where(ok, s, float("-inf"))  # before exp2: a hidden key may score far above the row's lse
    p = tl.exp2(s - lse2[:, None])
    dp = _mm(do, tl.trans(v), None, UPCAST, IEEE)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _mm(ds.to(k.dtype), k, dq, UPCAST, IEEE)


# dQ: one program per (batch x query head, query block), over the same key blocks as the forward.
# P = exp(s - lse) is recomputed; dS = P * (dP - delta) (times 1 - tanh^2 under softcap); dq = scale * dS k.
# Floor: 3 matmuls (QK^T, dO V^T, dS K) over the visible pairs.
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, DOC_START, KV_LO, KV_HI, PAD,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    q_len, kv_len, n_heads, group, window, scale, scale_log2, cap_in, cap_out_log2, len_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    q_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offset = kv_len - q_len
    rows = q_start + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = cols < HEAD_DIM
    q_pos = rows + offset
    b64 = b.to(tl.int64)
    q = _load_tile(Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qt + cols[None, :],
                   row_ok, d_ok, True, BLOCK_D == HEAD_DIM)
    do = _load_tile(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dot + cols[None, :],
                    row_ok, d_ok, True, BLOCK_D == HEAD_DIM)
    lse2 = tl.load(LSE + bh.to(tl.int64) * q_len + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0)
    q_doc = q_pos
    if PACKED:
        q_doc = tl.load(DOC_START + q_pos, mask=row_ok, other=-2)
    k_base = K + b64 * stride_kb + hk * stride_kh
    v_base = V + b64 * stride_vb + hk * stride_vh
    pad_row = PAD + b64 * kv_len
    p_first = q_start + offset
    p_last = tl.minimum(q_start + BLOCK_M, q_len) - 1 + offset
    lo, n_blocks, f0, f1 = _key_blocks(b, p_first, p_last, kv_len, window, DOC_START, KV_LO, KV_HI,
                                       BLOCK_N, HAS_WINDOW, PACKED, HAS_PAD)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, f0 + n_blocks - f1):
        blk = tl.where(i < f0, i, i - f0 + f1)
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, lo + blk * BLOCK_N,
                       q_pos, q_doc, DOC_START, pad_row, kv_len, window, scale_log2, cap_in, cap_out_log2,
                       cols, d_ok, BLOCK_N, BLOCK_D == HEAD_DIM, True, HAS_WINDOW, PACKED, HAS_PAD,
                       SOFTCAP, UPCAST, IEEE)
    for blk in range(f0, f1):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, lo + blk * BLOCK_N,
                       q_pos, q_doc, DOC_START, pad_row, kv_len, window, scale_log2, cap_in, cap_out_log2,
                       cols, d_ok, BLOCK_N, BLOCK_D == HEAD_DIM, False, HAS_WINDOW, PACKED, HAS_PAD,
                       SOFTCAP, UPCAST, IEEE)
    _store_tile(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + cols[None, :],
                (dq * scale).to(DQ.dtype.element_ty), row_ok, d_ok, BLOCK_D == HEAD_DIM)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start,
                k_pos, k_doc, k_real, q_len, offset, DOC_START, kv_len, window,
                scale_log2, cap_in, cap_out_log2, cols, d_ok,
                BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
                HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr,
                SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q = _load_tile(q_base + rows[:, None] * stride_qt + cols[None, :], row_ok, d_ok, MASKED, EVEN_D)
    do = _load_tile(do_base + rows[:, None] * stride_dot + cols[None, :], row_ok, d_ok, MASKED, EVEN_D)
    if MASKED:
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows) * 1.4426950408889634
        delta = tl.load(delta_base + rows)
    # Transposed tiles [keys, queries], so dk and dv accumulate without transposing them back.
    qk_t = _mm(k, tl.trans(q), None, UPCAST, IEEE)
    s_t, t_t = _logits(qk_t, scale_log2, cap_in, cap_out_log2, SOFTCAP)
    if MASKED:
        q_pos = rows + offset
        q_doc = q_pos
        if PACKED:
            q_doc = tl.load(DOC_START + q_pos, mask=rows < q_len, other=-2)
        ok = _visible(q_pos[None, :], k_pos[:, None], q_doc[None, :], k_doc[:, None], k_real[:, None],
                      kv_len, window, HAS_WINDOW, PACKED, HAS_PAD)
        s_t = tl.where(ok & row_ok[None, :], s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse2[None, :])
    dv = _mm(p_t.to(do.dtype), do, dv, UPCAST, IEEE)
    dp_t = _mm(v, tl.trans(do), None, UPCAST, IEEE)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk = _mm(ds_t.to(q.dtype), q, dk, UPCAST, IEEE)
    return dk, dv


# dK, dV: one program per (batch x kv head, key block). It loops over the `group` query heads that
# share the kv head and over the query blocks that can see the key block, so the GQA sum happens in
# registers (deterministic, no atomics). Floor: 4 matmuls (K Q^T, P^T dO, V dO^T, dS^T Q) per visible pair.
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC_START, DOC_END, KV_LO, KV_HI, PAD,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    q_len, kv_len, n_heads, n_kv_heads, group, window, scale, scale_log2, cap_in, cap_out_log2, len_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PACKED: tl.constexpr, HAS_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bhk = tl.program_id(0)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    k_start = tl.program_id(1) * BLOCK_N
    offset = kv_len - q_len
    k_pos = k_start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    key_ok = k_pos < kv_len
    d_ok = cols < HEAD_DIM
    b64 = b.to(tl.int64)
    k = _load_tile(K + b64 * stride_kb + hk * stride_kh + k_pos[:, None] * stride_ks + cols[None, :],
                   key_ok, d_ok, True, BLOCK_D == HEAD_DIM)
    v = _load_tile(V + b64 * stride_vb + hk * stride_vh + k_pos[:, None] * stride_vs + cols[None, :],
                   key_ok, d_ok, True, BLOCK_D == HEAD_DIM)
    k_doc = k_pos
    k_real = key_ok
    if PACKED:
        k_doc = tl.load(DOC_START + k_pos, mask=key_ok, other=-1)
    if HAS_PAD:
        k_real = tl.load(PAD + b64 * kv_len + k_pos, mask=key_ok, other=0) != 0

    # Queries (absolute positions) that can see some key of this block: [k_start, p_end); those in
    # [k_start + BLOCK_N - 1, p_full_end) see all of them.
    k_last = tl.minimum(k_start + BLOCK_N, kv_len) - 1
    p_end = kv_len
    p_full_end = kv_len
    if HAS_WINDOW:
        p_end = tl.minimum(p_end, k_last + window)
        p_full_end = tl.minimum(p_full_end, k_start + window)
    if PACKED:
        p_end = tl.minimum(p_end, tl.load(DOC_END + k_last))
        p_full_end = tl.minimum(p_full_end, tl.load(DOC_END + k_start))
    if HAS_PAD:
        first_real = tl.load(KV_LO + b)
        last_real = tl.load(KV_HI + b)
        p_end = tl.where((k_start >= last_real) | (k_last < first_real), k_start, p_end)
    q_lo = tl.maximum(k_start - offset, 0)
    q_hi = tl.maximum(p_end - offset, q_lo)
    n_blocks = tl.cdiv(q_hi - q_lo, BLOCK_M)
    f0 = tl.minimum(tl.cdiv(tl.maximum(k_start + BLOCK_N - 1 - offset - q_lo, 0), BLOCK_M), n_blocks)
    f1 = tl.maximum(tl.minimum(tl.maximum(p_full_end - offset - q_lo, 0) // BLOCK_M, n_blocks), f0)
    if HAS_PAD:
        f0 = n_blocks
        f1 = n_blocks
    if k_start + BLOCK_N > kv_len:
        f0 = n_blocks
        f1 = n_blocks

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE + (b64 * n_heads + h) * q_len
        delta_base = DELTA + (b64 * n_heads + h) * q_len
        for i in range(0, f0 + n_blocks - f1):
            blk = tl.where(i < f0, i, i - f0 + f1)
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 q_lo + blk * BLOCK_M, k_pos, k_doc, k_real, q_len, offset, DOC_START, kv_len,
                                 window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
                                 BLOCK_M, BLOCK_D == HEAD_DIM, True, HAS_WINDOW, PACKED, HAS_PAD,
                                 SOFTCAP, UPCAST, IEEE)
        for blk in range(f0, f1):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 q_lo + blk * BLOCK_M, k_pos, k_doc, k_real, q_len, offset, DOC_START, kv_len,
                                 window, scale_log2, cap_in, cap_out_log2, cols, d_ok,
                                 BLOCK_M, BLOCK_D == HEAD_DIM, False, HAS_WINDOW, PACKED, HAS_PAD,
                                 SOFTCAP, UPCAST, IEEE)
    _store_tile(DK + b64 * stride_dkb + hk * stride_dkh + k_pos[:, None] * stride_dks + cols[None, :],
                (dk * scale).to(DK.dtype.element_ty), key_ok, d_ok, BLOCK_D == HEAD_DIM)
    _store_tile(DV + b64 * stride_dvb + hk * stride_dvh + k_pos[:, None] * stride_dvs + cols[None, :],
                dv.to(DV.dtype.element_ty), key_ok, d_ok, BLOCK_D == HEAD_DIM)
# fmt: on


_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_SMEM_BUDGET = 220 * 1024  # bytes of shared memory a config may plan for (H100/H200 allow 227 KiB)

# Tile candidates per kernel and head-dim block: (BLOCK_M queries, BLOCK_N keys, warps, stages).
# Chosen from sm_90 builds so that the inner loops do not spill registers (checked with
# cuobjdump: no local loads/stores inside the loops); autotuning picks among them per GPU.
_TILES = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 32, 4, 2)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
        128: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
        256: [(32, 32, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2)],
    },
    "dkdv": {
        64: [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (32, 128, 8, 3)],
        128: [(32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (32, 128, 8, 3)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2), (32, 64, 8, 2)],
    },
}
# A query tile of 16 for very short query blocks (decode-style T of a few tokens), and the last resort
# when nothing else fits in shared memory (float32 inputs with head_dim 256).
_SHORT_TILES = [(16, 64, 4, 2), (16, 32, 4, 2)]
_FALLBACK_TILE = (16, 32, 4, 1)


def _smem(kind: str, m: int, n: int, d: int, stages: int, elem: int) -> int:
    # Shared memory the pipelined operands take: stages - 1 buffers of the streamed tiles, plus
    # the tiles that stay put (forward: q; dq: q and dO; dkdv: k and v).
    buffers = max(stages - 1, 1)
    if kind == "fwd":
        return (buffers * 2 * n * d + m * d) * elem
    if kind == "dq":
        return (buffers * 2 * n * d + 2 * m * d) * elem
    return (2 * n * d + buffers * 2 * m * d) * elem


def _tiles(kind: str, block_d: int, q_len: int, elem: int) -> list[tuple[int, int, int, int]]:
    table = _SHORT_TILES if q_len <= 16 else _TILES[kind][min(max(block_d, 64), 256)]
    fits = [t for t in table if _smem(kind, t[0], t[1], block_d, t[3], elem) <= _SMEM_BUDGET]
    return fits or [_FALLBACK_TILE]


def _tile_of(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _autotuned(kernel, kind: str):
    every = {t for by_d in _TILES[kind].values() for t in by_d} | set(_SHORT_TILES) | {_FALLBACK_TILE}
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in sorted(every)
    ]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        keep = _tiles(kind, args["BLOCK_D"], args["q_len"], args["Q"].element_size())
        return [c for c in configs if _tile_of(c) in keep]

    key = ["BLOCK_D", "HAS_WINDOW", "PACKED", "HAS_PAD", "SOFTCAP", "len_bucket"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd, "fwd")
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq, "dq")
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv, "dkdv")


@dataclasses.dataclass
class _Masking:
    """What the kernels need to know about visibility beyond causality, prepared once per call."""

    window: int  # 0: no sliding window (or one covering the whole sequence); below 0: hides every key
    doc_start: torch.Tensor | None  # int32 [S]: first position of each position's document
    doc_end: torch.Tensor | None  # int32 [S]: one past the last position of each position's document
    pad: torch.Tensor | None  # int8 [B, S]: 1 for real keys
    kv_lo: torch.Tensor | None  # int32 [B]: first real key (S when none)
    kv_hi: torch.Tensor | None  # int32 [B]: one past the last real key (0 when none)
    blocks: tuple[int, int] | None  # (BLOCK_M, BLOCK_N) forced for every kernel; None: tuned / default

    def flags(self) -> dict:
        return {
            "HAS_WINDOW": self.window != 0,
            "PACKED": self.doc_start is not None,
            "HAS_PAD": self.pad is not None,
        }


def _document_bounds(cu_seqlens: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Same documents as the reference: a boundary at every cu_seqlens[1:-1], computed without a host sync.
    # Boundaries at or past the end (empty trailing documents) land in a spare slot at index S.
    device = cu_seqlens.device
    starts = torch.zeros(kv_len + 1, dtype=torch.int32, device=device)
    inner = cu_seqlens[1:-1].long().clamp(0, kv_len)
    starts.index_add_(0, inner, torch.ones_like(inner, dtype=torch.int32))
    boundary = starts[:kv_len] > 0
    boundary[0] = True
    idx = torch.arange(kv_len, device=device)
    start = torch.where(boundary, idx, 0).cummax(0).values
    is_last = torch.ones(kv_len, dtype=torch.bool, device=device)
    is_last[:-1] = boundary[1:]
    end = torch.where(is_last, idx + 1, kv_len).flip(0).cummin(0).values.flip(0)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _check_inputs(q, k, v, cu_seqlens, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise KernelError(
            f"attention expects q [B, T, Hq, D] and k, v [B, S, Hk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}."
        )
    batch, q_len, n_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or n_heads % k.shape[2] != 0:
        raise KernelError(
            f"attention needs k/v with q's batch and head_dim and a kv head count dividing the {n_heads} "
            f"query heads; got q {tuple(q.shape)} and k {tuple(k.shape)}."
        )
    if k.shape[1] < q_len:
        raise KernelError(
            f"attention needs at least as many keys as queries (S >= T); got T={q_len}, S={k.shape[1]}."
        )
    if head_dim > _MAX_HEAD_DIM:
        raise KernelError(
            f"the Triton attention kernel supports head_dim <= {_MAX_HEAD_DIM}; got {head_dim}."
        )
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise KernelError(
            f"attention needs q, k, v of one dtype among float16, bfloat16, float32; got {q.dtype}, "
            f"{k.dtype}, {v.dtype}."
        )
    if cu_seqlens is not None and (batch != 1 or cu_seqlens.dim() != 1):
        raise KernelError(
            f"packed attention (cu_seqlens) needs batch 1 and a 1-D cu_seqlens; got batch {batch}, "
            f"cu_seqlens shape {tuple(cu_seqlens.shape)}. Reshape the packed batch to [1, total, H, D]."
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, k.shape[1]):
        raise KernelError(
            f"key_padding_mask must be [B, S] = {(batch, k.shape[1])}; got {tuple(key_padding_mask.shape)}."
        )


def _masking(q, k, sliding_window, cu_seqlens, key_padding_mask, blocks) -> _Masking:
    kv_len = k.shape[1]
    window = 0
    if sliding_window is not None:
        # A window of S keys or more hides nothing; one below 1 hides every key (the kernel masks all).
        if sliding_window < 1:
            window = -1
        elif sliding_window < kv_len:
            window = int(sliding_window)
    doc_start = doc_end = None
    if cu_seqlens is not None:
        doc_start, doc_end = _document_bounds(cu_seqlens.to(k.device), kv_len)
    pad = kv_lo = kv_hi = None
    if key_padding_mask is not None:
        real = key_padding_mask.to(k.device).bool()
        idx = torch.arange(kv_len, device=k.device)
        pad = real.to(torch.int8).contiguous()
        kv_lo = torch.where(real, idx, kv_len).amin(1).to(torch.int32)
        kv_hi = torch.where(real, idx + 1, 0).amax(1).to(torch.int32)
    return _Masking(window, doc_start, doc_end, pad, kv_lo, kv_hi, blocks)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    # Batch/seq/head strides go to the kernel as they are (k and v are often views of a fused qkv
    # projection); only the head dim must be dense.
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_args(q: torch.Tensor, scale: float, softcap: float | None, mask: _Masking) -> tuple[dict, dict]:
    head_dim = q.shape[-1]
    softcap_on = softcap is not None
    scalars = {
        "scale_log2": scale * _LOG2E,
        "cap_in": scale / softcap if softcap_on else 1.0,
        "cap_out_log2": softcap * _LOG2E if softcap_on else 1.0,
        "window": mask.window,
        "len_bucket": triton.next_power_of_2(max(q.shape[1], 1)),
    }
    consts = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "SOFTCAP": softcap_on,
        "UPCAST": interpreting() and q.dtype == torch.bfloat16,
        "IEEE": q.dtype == torch.float32,
        **mask.flags(),
    }
    return scalars, consts


_KERNELS = {
    "fwd": (_attn_fwd, _attn_fwd_tuned),
    "dq": (_attn_bwd_dq, _attn_bwd_dq_tuned),
    "dkdv": (_attn_bwd_dkdv, _attn_bwd_dkdv_tuned),
}


def _launch(kind: str, grid_of, args: list, consts: dict, mask: _Masking, elem: int) -> None:
    kernel, tuned = _KERNELS[kind]
    if mask.blocks is None and not interpreting():
        tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)
        return
    # Forced tiles (tests, the interpreter): two stages when they fit, 8 warps for big tiles.
    block_m, block_n = mask.blocks or (16, 16)
    stages = 2 if _smem(kind, block_m, block_n, consts["BLOCK_D"], 2, elem) <= _SMEM_BUDGET else 1
    warps = 8 if block_m * block_n * consts["BLOCK_D"] >= 64 * 64 * 128 else 4
    kernel[grid_of(block_m, block_n)](
        *args, **consts, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
    )


def _mask_pointers(q: torch.Tensor, mask: _Masking) -> tuple:
    # Absent masks get any valid pointer; the kernel never reads it (its flag is off).
    return (
        mask.doc_start if mask.doc_start is not None else q,
        mask.doc_end if mask.doc_end is not None else q,
        mask.kv_lo if mask.kv_lo is not None else q,
        mask.kv_hi if mask.kv_hi is not None else q,
        mask.pad if mask.pad is not None else q,
    )


def _forward(q, k, v, scale, softcap, mask: _Masking) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    doc_start, _, kv_lo, kv_hi, pad = _mask_pointers(q, mask)
    sc, consts = _common_args(q, scale, softcap, mask)
    # fmt: off
    args = [
        q, k, v, out, lse, doc_start, kv_lo, kv_hi, pad,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        q_len, kv_len, n_heads, n_heads // n_kv, sc["window"], sc["scale_log2"], sc["cap_in"],
        sc["cap_out_log2"], sc["len_bucket"],
    ]
    # fmt: on
    grid = lambda m, n: (batch * n_heads, triton.cdiv(q_len, m))  # noqa: E731
    _launch("fwd", grid, args, consts, mask, q.element_size())
    return out, lse


def _backward(q, k, v, out, lse, dout, scale, softcap, mask: _Masking):
    batch, q_len, n_heads, head_dim = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t = max(1, min(64, 4096 // block_d))
    _attn_bwd_delta[(batch * n_heads, triton.cdiv(q_len, block_t))](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], q_len, n_heads,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    doc_start, doc_end, kv_lo, kv_hi, pad = _mask_pointers(q, mask)
    sc, consts = _common_args(q, scale, softcap, mask)
    tail = [sc["window"], scale, sc["scale_log2"], sc["cap_in"], sc["cap_out_log2"], sc["len_bucket"]]
    # fmt: off
    dq_args = [
        q, k, v, dout, dq, lse, delta, doc_start, kv_lo, kv_hi, pad,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        q_len, kv_len, n_heads, n_heads // n_kv, *tail,
    ]
    dkdv_args = [
        q, k, v, dout, dk, dv, lse, delta, doc_start, doc_end, kv_lo, kv_hi, pad,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3],
        *dv.stride()[:3], q_len, kv_len, n_heads, n_kv, n_heads // n_kv, *tail,
    ]
    # fmt: on
    _launch(
        "dq", lambda m, n: (batch * n_heads, triton.cdiv(q_len, m)), dq_args, consts, mask, q.element_size()
    )
    _launch(
        "dkdv", lambda m, n: (batch * n_kv, triton.cdiv(kv_len, n)), dkdv_args, consts, mask, q.element_size()
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Triton attention; `blocks` = (BLOCK_M, BLOCK_N) forces tile sizes (tests), None tunes them."""

    @staticmethod
    def forward(ctx, q, k, v, scale, sliding_window, softcap, cu_seqlens, key_padding_mask, blocks=None):
        _check_inputs(q, k, v, cu_seqlens, key_padding_mask)
        q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
        mask = _masking(q, k, sliding_window, cu_seqlens, key_padding_mask, blocks)
        out, lse = _forward(q, k, v, scale, softcap, mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.softcap, ctx.mask = scale, softcap, mask
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, _last_dim_dense(dout), ctx.scale, ctx.softcap, ctx.mask)
        return dq, dk, dv, None, None, None, None, None, None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The Triton path of `attention` (same arguments); `blocks` forces (BLOCK_M, BLOCK_N)."""
    return AttentionFunction.apply(
        q, k, v, scale, sliding_window, softcap, cu_seqlens, key_padding_mask, blocks
    )


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Plain causal attention (S == T, no window, softcap, packing or padding) through PyTorch's SDPA."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


# Which path runs plain causal attention on CUDA in "auto" mode: "triton" or "sdpa". Set from
# `benchmarks/bench_attention.py` (benchmarks/results/attention-<device>.md): SDPA only if it measures
# faster there. On an H100 (benchmarks/results/h100-2026-11-24/attention-nvidia-h100-80gb-hbm3.md) SDPA's
# cuDNN kernel took 3.88 ms fwd+bwd at Llama-8B heads x 8192 tokens against our 5.25 ms.
PLAIN_CAUSAL_BACKEND = "sdpa"


def _is_plain_causal(q, k, sliding_window, softcap, cu_seqlens, key_padding_mask) -> bool:
    # SDPA's is_causal aligns top-left, ours bottom-right: they agree only when S == T.
    return (
        softcap is None
        and cu_seqlens is None
        and key_padding_mask is None
        and (sliding_window is None or sliding_window >= k.shape[1])
        and q.shape[1] == k.shape[1]
    )


# Which path runs packed causal attention (cu_seqlens, no softcap) on CUDA in "auto" mode: "triton" or
# "varlen" (PyTorch's FlashAttention-2 varlen kernel). Chosen by tests/kernels/gpu_check_varlen_attention.py,
# which times both on the same packed tokens: on an H100 (torch 2.11) varlen's forward + backward was faster
# in every packed case, 1.04x (8B heads, 4 x 2048) to 1.69x (1B heads, 16 x 512), with the same numbers
# (benchmarks/results/h100-2026-11-24-s4/varlen_attention.json). Our kernel still runs wherever varlen cannot
# compute what `attention` defines (`_varlen_supported`: softcap, fp32, head_dim > 256, ...).
PACKED_BACKEND = "varlen"

_VARLEN_DTYPES = (torch.float16, torch.bfloat16)
_VARLEN_MAX_HEAD_DIM = 256  # FlashAttention-2's largest head dim; it also wants a multiple of 8


def _varlen_features(fn: Callable) -> tuple[Callable, bool] | None:
    """(fn, takes enable_gqa) when `fn` has the varlen_attn keywords we call it with, else None.

    A feature test, not a version compare: torch 2.10 shipped varlen_attn with `is_causal` and neither
    `scale` nor `window_size` (unusable here); 2.11 has both and hands kv heads as they are to
    FlashAttention, which groups query heads natively; from 2.12 it insists on `enable_gqa=True` when the
    head counts differ.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "scale" not in params or "window_size" not in params:
        return None
    return fn, "enable_gqa" in params


@functools.lru_cache(maxsize=1)
def _varlen_api() -> tuple[Callable, bool] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return _varlen_features(varlen_attn)


@functools.lru_cache(maxsize=16)
def _flash_device_ok(device: torch.device) -> bool:
    # FlashAttention-2 needs sm80+; ROCm builds route varlen elsewhere, with another logsumexp layout.
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    return bool(available()) and torch.cuda.get_device_capability(device) >= (8, 0)


def _varlen_supported(q, k, v, sliding_window, softcap, cu_seqlens, key_padding_mask) -> bool:
    """True where varlen_attn computes exactly what `attention` defines, and can run here."""
    if cu_seqlens is None or key_padding_mask is not None or softcap is not None:
        return False
    # A window below 1 hides every key; FlashAttention has no such window (left = -1 means unbounded).
    if sliding_window is not None and sliding_window < 1:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or cu_seqlens.dim() != 1:
        return False
    batch, q_len, n_heads, head_dim = q.shape
    if batch != 1 or q_len == 0 or k.shape[1] != q_len or k.shape[3] != head_dim or n_heads % k.shape[2]:
        return False
    if q.dtype not in _VARLEN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if head_dim % 8 or head_dim > _VARLEN_MAX_HEAD_DIM:
        return False
    return _varlen_api() is not None and all(_flash_device_ok(t.device) for t in (q, k, v))


def varlen_documents(cu_seqlens: Sequence[int], total: int) -> tuple[list[int], int]:
    """The reference's documents as FlashAttention's offsets, and the longest document's length.

    The reference starts a document at each cu_seqlens[1:-1] entry (in any order, repeats counting
    once) and treats the first and last entries as 0 and `total`; entries outside (0, total) start
    nothing, as in the Triton path. FlashAttention wants strictly increasing offsets 0 ... total.
    """
    inner = sorted({int(c) for c in cu_seqlens[1:-1] if 0 < int(c) < total})
    bounds = [0, *inner, total]
    return bounds, max(b - a for a, b in zip(bounds, bounds[1:]))


def varlen_window(sliding_window: int | None, longest: int) -> tuple[int, int]:
    """FlashAttention's (left, right) window for our `sliding_window`.

    FlashAttention lets query i see keys i - left ... i + right (-1: unbounded). Ours counts the query
    itself (i - j < W), so left = W - 1; right = 0 is causality. A window that no document fills is
    plain causal, (-1, 0): varlen_attn recognises that exact tuple (a list would not compare equal) as
    is_causal and skips window masking.
    """
    if sliding_window is None or sliding_window >= longest:
        return (-1, 0)
    if sliding_window < 1:
        raise KernelError(
            f"sliding_window={sliding_window} hides every key, which FlashAttention cannot express; "
            "call attention(), which runs the Triton kernel for it."
        )
    return (int(sliding_window) - 1, 0)


# One entry: every layer of a step gets the same cu_seqlens tensor, so its host copy, the offsets on the
# device and the longest document are worked out once per batch. The strong reference keeps the tensor's
# id from being reused; `_version` catches in-place edits.
_last_documents: list = [None]


def _documents_on(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> tuple[torch.Tensor, int]:
    key = (cu_seqlens._version, total, device)
    hit = _last_documents[0]
    if hit is not None and hit[0] is cu_seqlens and hit[1] == key:
        return hit[2]
    # varlen_attn takes the longest document as a Python int: one host sync per batch.
    bounds, longest = varlen_documents(cu_seqlens.tolist(), total)
    value = (torch.tensor(bounds, dtype=torch.int32, device=device), longest)
    _last_documents[0] = (cu_seqlens, key, value)
    return value


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    cu_seqlens: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Packed causal attention (q [1, T, Hq, D], k and v [1, T, Hk, D]) through PyTorch's varlen_attn.

    Same result as `attention` with these arguments; CUDA bf16/fp16 only, no softcap or padding mask
    (`attention` checks all that before it calls this). Nothing is copied: [1, T, H, D] -> [T, H, D]
    is a view, and FlashAttention takes any token and head stride as long as the head dim is dense, so
    k and v can stay strided views of a fused qkv projection. The backward is varlen_attn's own
    (FlashAttention-2: dq accumulated with atomics, so not bitwise deterministic, unlike our kernel).
    """
    api = _varlen_api()
    if api is None:
        raise KernelError(
            "attention_varlen needs torch.nn.attention.varlen.varlen_attn with `scale` and `window_size` "
            "(PyTorch 2.11 or newer); upgrade torch or call attention(), which falls back to Triton."
        )
    varlen_attn, takes_gqa = api
    _check_inputs(q, k, v, cu_seqlens, None)
    total = q.shape[1]
    if k.shape[1] != total:
        raise KernelError(f"attention_varlen needs as many keys as queries; got T={total}, S={k.shape[1]}.")
    offsets, longest = _documents_on(cu_seqlens, total, q.device)
    extra = {"enable_gqa": q.shape[2] != k.shape[2]} if takes_gqa else {}
    out = varlen_attn(
        _last_dim_dense(q[0]),
        _last_dim_dense(k[0]),
        _last_dim_dense(v[0]),
        offsets,
        offsets,
        longest,
        longest,
        scale=scale,
        window_size=varlen_window(sliding_window, longest),
        **extra,
    )
    return out.unsqueeze(0)


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> str:
    """Which kernel `attention` runs once it has taken the Triton side: "sdpa", "varlen" or "triton".

    VELOTUNE_KERNELS=triton always runs our kernel; "auto" hands plain causal attention to SDPA and
    packed causal attention to varlen_attn where `PLAIN_CAUSAL_BACKEND` / `PACKED_BACKEND` choose them.
    """
    if kernel_mode() != "auto":
        return "triton"
    if PLAIN_CAUSAL_BACKEND == "sdpa" and q.is_cuda:
        if _is_plain_causal(q, k, sliding_window, softcap, cu_seqlens, key_padding_mask):
            return "sdpa"
    if PACKED_BACKEND == "varlen":
        if _varlen_supported(q, k, v, sliding_window, softcap, cu_seqlens, key_padding_mask):
            return "varlen"
    return "triton"


def attention_mask_reference(
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
    *,
    sliding_window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask, True where a query may attend a key."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if cu_seqlens is not None:
        doc = torch.zeros(kv_len, dtype=torch.long, device=device)
        doc[cu_seqlens[1:-1].long()] = 1
        doc = doc.cumsum(0)
        allowed = allowed & (doc[kv_len - q_len :, None] == doc[None, :])[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention in plain PyTorch: scores in the input dtype, softmax in float32."""
    batch, q_len, n_heads, _ = q.shape
    kv_len, n_kv = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = attention_mask_reference(
        batch,
        q_len,
        kv_len,
        q.device,
        sliding_window=sliding_window,
        cu_seqlens=cu_seqlens,
        key_padding_mask=key_padding_mask,
    )
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)  # rows that see no key
    return torch.matmul(probs, vh).transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(mask(softcap(q k^T * scale))) v, returned as [B, T, Hq, D]."""
    if use_triton(q, k, v):
        backend = select_backend(
            q,
            k,
            v,
            sliding_window=sliding_window,
            softcap=softcap,
            cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask,
        )
        if backend == "sdpa":
            return attention_sdpa(q, k, v, scale=scale)
        if backend == "varlen":
            return attention_varlen(
                q, k, v, scale=scale, cu_seqlens=cu_seqlens, sliding_window=sliding_window
            )
        return attention_triton(
            q,
            k,
            v,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            cu_seqlens=cu_seqlens,
            key_padding_mask=key_padding_mask,
        )
    return attention_reference(
        q,
        k,
        v,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        cu_seqlens=cu_seqlens,
        key_padding_mask=key_padding_mask,
    )

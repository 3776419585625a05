"""Fused causal attention in Triton: FlashAttention-2-style forward and deterministic backward.

Lineage: Tri Dao's FlashAttention-2 (arXiv 2307.08691) and Triton's tutorial
``06-fused-attention.py``; the loop split (unmasked tiles, then masked diagonal / ragged tiles)
follows the tutorial's STAGE trick, the masking of ragged sequence and head dims follows
flash-attention's ``flash_attn_triton.py`` (EVEN_M/N/HEADDIM).

What it computes, for q ``[B, H, TQ, D]``, k and v ``[B, H, TK, D]`` (any strides) and
``s = scale``::

    S = s * q @ k^T            (+ causal mask: key j > query i + TK - TQ  ->  -inf)
    P = softmax(S, dim=-1)
    O = P @ v                  LSE = logsumexp(S, dim=-1)  (saved, fp32, in log2 units)

and the gradients ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with
``delta = rowsum(dO * O)``, ``dQ = s * dS K``, ``dK = s * dS^T Q``.

Kernels (grid axis 0 runs over row tiles, axis 1 over the B*H heads):

* ``_attn_fwd_kernel``: one program per tile of BLOCK_M queries; K/V tiles stream past it
  with an online softmax in base 2 (log2(e) folded into the scale). Never stores T x T.
* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` in fp32.
* ``_attn_bwd_dkdv_kernel``: one program per tile of BLOCK_N keys, loops over query tiles.
* ``_attn_bwd_dq_kernel``: one program per tile of BLOCK_M queries, loops over key tiles.
  dK/dV and dQ are written by exactly one program each: no atomics, bitwise deterministic.

Causal: the mask is aligned bottom-right as in FlashAttention 2.1+ (the last query sees every
key; TQ == TK is ordinary causal self-attention, TQ = 1 is a KV-cache decode step); the
kernels take OFF = TK - TQ as the shift of the diagonal and require TQ <= TK (a row with no
visible key is rejected by the op layer rather than given a 0 output). Tiles wholly above the
shifted diagonal are never visited; tiles wholly below it run an unmasked loop; only the
diagonal tiles and the ragged tails (T % BLOCK != 0) pay for masks.
Head dims 16..128 that are not powers of two are padded to BLOCK_D and masked.

Limits: q, k, v share B, H, D (no GQA), no dropout, no sliding window, B*H <= 65535 (grid
axis 1). Tested under the Triton interpreter on CPU
(fp32, fp16); GPU configurations are compiled ahead of time for sm_90 and sm_80 by
``lorafast.compile_gate`` but were not timed on hardware (see ``compile_configs``).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import TL_DTYPE, KernelConfig

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _rows(ptr, b, h, row0, loc, offs_d, stride_b, stride_h, stride_t, stride_d):
    """Addresses of the [len(loc), BLOCK_D] tile of rows row0 + loc of head (b, h): the base
    (b, h, row0 are int64) carries the large offsets; in-tile offsets stay 32-bit."""
    return (ptr + b * stride_b + h * stride_h + row0 * stride_t
            + loc[:, None] * stride_t + offs_d[None, :] * stride_d)


@triton.jit
def _load(ptrs, mask, HAS_MASK: tl.constexpr):
    """Load a tile; masked lanes read 0 (the identity of the dot products they feed)."""
    if HAS_MASK:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_ptrs, v_ptrs,
    stride_kt, stride_vt,
    lo, hi, TK,
    qk_scale,
    last_key, offs_n, d_mask,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [lo, hi).

    k_ptrs ([BLOCK_D, BLOCK_N], K^T) and v_ptrs ([BLOCK_N, BLOCK_D]) point at key row ``lo``.
    MASKED: apply key < TK and (IS_CAUSAL) key <= last_key[row] (= row + TK - TQ, the
    bottom-right diagonal); otherwise every (row, key) is valid.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < TK
        kt = _load(k_ptrs, n_mask[None, :] & d_mask[:, None], MASKED or not EVEN_D)
        v = _load(v_ptrs, n_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
        if DOT_F32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        # scores in log2 units: s * q.k * log2(e); exp2 of them is exp of the natural scores
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            valid = n_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (last_key[:, None] >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        # key 0 is valid for every row (OFF >= 0 when causal) and the first visited tile holds
        # it, so m_new is finite from the first tile on
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales the old partial sums (exp2(-inf) = 0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["TQ", "TK"])
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    # sizes
    H, TQ, TK,
    # runtime scalars
    qk_scale,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Attention forward: O = softmax(s q k^T [+ causal mask]) v and LSE2 = log2-sum-exp2 per row.

    Shapes: q, o [B, H, TQ, HEAD_DIM], k, v [B, H, TK, HEAD_DIM], any strides; lse [B, H, TQ]
    contiguous fp32. Causal mask bottom-right aligned: query i sees key j iff j <= i + TK - TQ.
    Dtypes: q, k, v, o fp16 / bf16 / fp32 (one dtype); scores, softmax, acc in fp32; P cast to
    v's dtype for the PV dot; lse fp32 holding log2(sum exp2(qk_scale * q.k)) (log2 units).
    Mutates: writes o and lse for rows < TQ only. qk_scale = s * log2(e).
    Preconditions: BLOCK_M % BLOCK_N == 0; BLOCK_D = next pow2 >= HEAD_DIM; B*H <= 65535;
    TQ <= TK when IS_CAUSAL (every row sees key 0).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if IS_CAUSAL:
        # the longest rows (most key tiles) first: better tail balance across SMs
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    loc_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < TQ
    OFF = TK - TQ  # shift of the causal diagonal (bottom-right alignment)

    # int64 bases: b * stride_b and start_m * stride_t can pass 2**31; in-tile offsets stay int32
    q_ptrs = _rows(q_ptr, b, h, start_m.to(tl.int64), loc_m, offs_d, stride_qb, stride_qh, stride_qt, stride_qd)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    kt_off = offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd   # K^T tile [BLOCK_D, BLOCK_N]
    v_off = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd    # V tile [BLOCK_N, BLOCK_D]

    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if IS_CAUSAL:
        # keys [0, start_m + OFF) are visible to every row of the tile: the key tiles below
        # that bound (rounded down to BLOCK_N) run unmasked; keys past start_m + BLOCK_M + OFF
        # lie wholly above the shifted diagonal and are never visited
        hi_full = ((start_m + OFF) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + OFF, TK)
    else:
        hi_full = (TK // BLOCK_N) * BLOCK_N
        hi = TK
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base + kt_off, v_base + v_off, stride_kt, stride_vt,
        0, hi_full, TK, qk_scale, offs_m + OFF, offs_n, d_mask,
        BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=False, EVEN_D=EVEN_D,
        DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)
    lo64 = hi_full.to(tl.int64)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base + lo64 * stride_kt + kt_off, v_base + lo64 * stride_vt + v_off,
        stride_kt, stride_vt, hi_full, hi, TK, qk_scale, offs_m + OFF, offs_n, d_mask,
        BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D,
        DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)

    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)  # log2 units: P = exp2(qk_scale * q.k - lse)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)
    o_ptrs = _rows(o_ptr, b, h, start_m.to(tl.int64), loc_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od)
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _attn_bwd_preprocess_kernel(
    # pointers
    o_ptr, do_ptr, delta_ptr,
    # strides
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    # sizes
    H, T,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO[b, h, t, d] * O[b, h, t, d], the softmax-backward row term.

    Shapes: o, do [B, H, T, HEAD_DIM] any strides (T = query rows); delta [B, H, T] contiguous.
    Dtypes: o, do fp16 / bf16 / fp32; product and sum in fp32; delta fp32.
    Mutates: writes delta for rows < T.
    Preconditions: BLOCK_D = next pow2 >= HEAD_DIM.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    loc_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row0 = start_m.to(tl.int64)
    o = tl.load(_rows(o_ptr, b, h, row0, loc_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od),
                mask=mask, other=0.0)
    do = tl.load(_rows(do_ptr, b, h, row0, loc_m, offs_d, stride_dob, stride_doh, stride_dot, stride_dod),
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    qt_ptrs, do_ptrs, lse_bh, delta_bh,
    stride_qt, stride_dot,
    lo, hi, TQ,
    qk_scale,
    first_row, loc_m, d_mask,
    BLOCK_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in the transposed form.

    qt_ptrs ([BLOCK_D, BLOCK_M], Q^T) and do_ptrs ([BLOCK_M, BLOCK_D]) point at query row ``lo``.
    MASKED: apply query < TQ and (IS_CAUSAL) query >= first_row[key] (= key - (TK - TQ), the
    first query that sees it, bottom-right alignment); else every pair is valid.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + loc_m
        m_mask = rows < TQ
        qt = _load(qt_ptrs, m_mask[None, :] & d_mask[:, None], MASKED or not EVEN_D)
        do = _load(do_ptrs, m_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
        lse = _load(lse_bh + rows, m_mask, MASKED)
        delta = _load(delta_bh + rows, m_mask, MASKED)
        if DOT_F32:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        # P^T [BLOCK_N, BLOCK_M] recomputed from the saved log2-sum-exp2 of each query row
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])
        if MASKED:
            valid = m_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (rows[None, :] >= first_row[:, None])
            pt = tl.where(valid, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)          # dV += P^T dO
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                  # dP^T = V dO^T
        dst = pt * (dpt - delta[None, :])                                         # dS^T
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)  # dK += dS^T Q
        qt_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit(do_not_specialize=["TQ", "TK"])
def _attn_bwd_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    # sizes
    H, TQ, TK,
    # runtime scalars
    qk_scale, sm_scale,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dV = P^T dO and dK = s * dS^T Q, dS = P * (dO V^T - delta), for one tile of keys.

    Shapes: q, do [B, H, TQ, HEAD_DIM], k, v, dk, dv [B, H, TK, HEAD_DIM], any strides; lse,
    delta [B, H, TQ] fp32. Causal: bottom-right aligned (query i sees key j iff j <= i + TK - TQ).
    Dtypes: inputs fp16 / bf16 / fp32; P, dS, dK, dV accumulate in fp32; P and dS are cast to
    the input dtype for their dots; dk, dv stored in their own dtype.
    Mutates: writes dk, dv rows < TK (each by exactly one program: deterministic, no atomics).
    Preconditions: BLOCK_N % BLOCK_M == 0; lse from the forward; delta from the preprocess;
    TQ <= TK when IS_CAUSAL.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    loc_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + loc_n
    loc_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_mask = offs_d < HEAD_DIM
    n_mask = offs_n < TK
    OFF = TK - TQ  # shift of the causal diagonal (bottom-right alignment)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    row_n = start_n.to(tl.int64)

    k = tl.load(_rows(k_ptr, b, h, row_n, loc_n, offs_d, stride_kb, stride_kh, stride_kt, stride_kd),
                mask=kv_mask, other=0.0)
    v = tl.load(_rows(v_ptr, b, h, row_n, loc_n, offs_d, stride_vb, stride_vh, stride_vt, stride_vd),
                mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    qt_off = loc_m[None, :] * stride_qt + offs_d[:, None] * stride_qd     # Q^T tile [BLOCK_D, BLOCK_M]
    do_off = loc_m[:, None] * stride_dot + offs_d[None, :] * stride_dod   # dO tile [BLOCK_M, BLOCK_D]
    lse_bh = lse_ptr + pid_bh.to(tl.int64) * TQ
    delta_bh = delta_ptr + pid_bh.to(tl.int64) * TQ

    # query tiles: [diag_lo, diag_hi) straddle the shifted diagonal (masked), [diag_hi, t_full)
    # are wholly below it (unmasked), [max(diag_hi, t_full), TQ) is the ragged tail (masked);
    # query tiles before diag_lo lie wholly above the diagonal and are skipped.
    t_full = (TQ // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # key j is seen by queries i >= j - OFF: rows [start_n - OFF, start_n + BLOCK_N - OFF)
        # see part of this key tile, rows past it see all of it; both ends on BLOCK_M tiles.
        # (max(., 0) before // : OFF can exceed start_n, and the bounds stay non-negative)
        diag_lo = (tl.maximum(start_n - OFF, 0) // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(
            ((tl.maximum(start_n + BLOCK_N - OFF, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, TQ)
        lo64 = diag_lo.to(tl.int64)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base + lo64 * stride_qt + qt_off, do_base + lo64 * stride_dot + do_off,
            lse_bh, delta_bh, stride_qt, stride_dot, diag_lo, diag_hi, TQ, qk_scale,
            offs_n - OFF, loc_m, d_mask, BLOCK_M=BLOCK_M, IS_CAUSAL=IS_CAUSAL, MASKED=True,
            EVEN_D=EVEN_D, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)
    else:
        diag_hi = start_n * 0
    lo64 = diag_hi.to(tl.int64)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base + lo64 * stride_qt + qt_off, do_base + lo64 * stride_dot + do_off,
        lse_bh, delta_bh, stride_qt, stride_dot, diag_hi, t_full, TQ, qk_scale,
        offs_n - OFF, loc_m, d_mask, BLOCK_M=BLOCK_M, IS_CAUSAL=IS_CAUSAL, MASKED=False,
        EVEN_D=EVEN_D, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)
    tail_lo = tl.maximum(diag_hi, t_full)
    lo64 = tail_lo.to(tl.int64)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base + lo64 * stride_qt + qt_off, do_base + lo64 * stride_dot + do_off,
        lse_bh, delta_bh, stride_qt, stride_dot, tail_lo, TQ, TQ, qk_scale,
        offs_n - OFF, loc_m, d_mask, BLOCK_M=BLOCK_M, IS_CAUSAL=IS_CAUSAL, MASKED=True,
        EVEN_D=EVEN_D, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)

    dk = dk * sm_scale  # dK = s * dS^T Q (the scale of S = s q k^T)
    tl.store(_rows(dk_ptr, b, h, row_n, loc_n, offs_d, stride_dkb, stride_dkh, stride_dkt, stride_dkd),
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_rows(dv_ptr, b, h, row_n, loc_n, offs_d, stride_dvb, stride_dvh, stride_dvt, stride_dvd),
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    kt_ptrs, vt_ptrs,
    stride_kt, stride_vt,
    lo, hi, TK,
    qk_scale,
    last_key, offs_n, d_mask,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [lo, hi).

    kt_ptrs, vt_ptrs ([BLOCK_D, BLOCK_N], K^T and V^T) point at key row ``lo``.
    MASKED: apply key < TK and (IS_CAUSAL) key <= last_key[row] (= row + TK - TQ); else every
    pair is valid.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < TK
        kt = _load(kt_ptrs, n_mask[None, :] & d_mask[:, None], MASKED or not EVEN_D)
        vt = _load(vt_ptrs, n_mask[None, :] & d_mask[:, None], MASKED or not EVEN_D)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])
        if MASKED:
            valid = n_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (last_key[:, None] >= cols[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)                              # dP = dO V^T
        ds = p * (dp - delta[:, None])                                             # dS
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)  # dQ += dS K
        kt_ptrs += BLOCK_N * stride_kt
        vt_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=["TQ", "TK"])
def _attn_bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    # sizes
    H, TQ, TK,
    # runtime scalars
    qk_scale, sm_scale,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dQ = s * dS K with dS = P * (dO V^T - delta), for one tile of queries.

    Shapes: q, do, dq [B, H, TQ, HEAD_DIM], k, v [B, H, TK, HEAD_DIM], any strides; lse, delta
    [B, H, TQ] fp32. Causal: bottom-right aligned (query i sees key j iff j <= i + TK - TQ).
    Dtypes: inputs fp16 / bf16 / fp32; P, dS, dQ in fp32; dS cast to the input dtype for the
    dot; dq stored in its own dtype.
    Mutates: writes dq rows < TQ (each by exactly one program: deterministic, no atomics).
    Preconditions: BLOCK_M % BLOCK_N == 0; lse from the forward; delta from the preprocess;
    TQ <= TK when IS_CAUSAL.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest rows first
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    loc_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + loc_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < TQ
    OFF = TK - TQ  # shift of the causal diagonal (bottom-right alignment)
    qd_mask = m_mask[:, None] & d_mask[None, :]
    row_m = start_m.to(tl.int64)

    q = tl.load(_rows(q_ptr, b, h, row_m, loc_m, offs_d, stride_qb, stride_qh, stride_qt, stride_qd),
                mask=qd_mask, other=0.0)
    do = tl.load(_rows(do_ptr, b, h, row_m, loc_m, offs_d, stride_dob, stride_doh, stride_dot, stride_dod),
                 mask=qd_mask, other=0.0)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * TQ + offs_m, mask=m_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    kt_off = offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    vt_off = offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
    if IS_CAUSAL:
        # as in the forward: keys [0, start_m + OFF) are seen by every row of the tile
        # (start_m is a multiple of BLOCK_N, so only OFF needs rounding down)
        hi_full = start_m + (OFF // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + OFF, TK)
    else:
        hi_full = (TK // BLOCK_N) * BLOCK_N
        hi = TK
    last_key = offs_m + OFF  # the last key each query row sees (causal)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base + kt_off, v_base + vt_off, stride_kt, stride_vt,
        0, hi_full, TK, qk_scale, last_key, offs_n, d_mask,
        BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=False, EVEN_D=EVEN_D,
        DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)
    lo64 = hi_full.to(tl.int64)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base + lo64 * stride_kt + kt_off, v_base + lo64 * stride_vt + vt_off,
        stride_kt, stride_vt, hi_full, hi, TK, qk_scale, last_key, offs_n, d_mask,
        BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D,
        DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)

    dq = dq * sm_scale  # dQ = s * dS K
    tl.store(_rows(dq_ptr, b, h, row_m, loc_m, offs_d, stride_dqb, stride_dqh, stride_dqt, stride_dqd),
             dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tile:
    """One launch configuration: tile sizes (rows of the program's own tile, streamed rows)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    fwd: Tile
    preprocess: Tile   # block_n unused
    dkdv: Tile         # block_n = key tile owned by the program, block_m = streamed query tile
    dq: Tile           # block_m = query tile owned by the program, block_n = streamed key tile


# GPU tiles, keyed by (arch, BLOCK_D bucket). NO GPU was available when these were chosen:
# they start from published configurations (Triton tutorial 06 for Hopper: fwd BLOCK_M=128,
# BLOCK_N=64..128, 8 warps; bwd BLOCK_M1=32 / BLOCK_N1=128 and BLOCK_M2=128 / BLOCK_N2=32;
# FlashAttention-2's hdim-128 backward uses 64 x 128 tiles with 8 warps) and keep the largest
# candidate that the AOT compile gate (python -m lorafast.compile_gate --filter attn) shows
# without register spills and within shared memory on that arch. E.g. fwd D=64 128x128 spills
# nothing on sm_90 but 128x64 x 4 warps spills on sm_80; dkdv D=128 32x128 x 8 warps spills on
# sm_80, 64x64 x 8 warps does not. They are to be re-tuned by timing on an H200.
_GPU_TILES = {
    (90, 64): AttentionTiles(fwd=Tile(128, 128, 8, 3), preprocess=Tile(128, 0, 4, 1),
                             dkdv=Tile(32, 128, 8, 3), dq=Tile(128, 32, 8, 3)),
    (90, 128): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(128, 0, 4, 1),
                              dkdv=Tile(64, 64, 8, 2), dq=Tile(128, 32, 8, 2)),
    (80, 64): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(128, 0, 4, 1),
                             dkdv=Tile(32, 128, 8, 3), dq=Tile(128, 32, 8, 3)),
    (80, 128): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(128, 0, 4, 1),
                              dkdv=Tile(64, 64, 8, 2), dq=Tile(64, 32, 4, 2)),
}
# fp32 inputs: exact fp32 dots on CUDA cores ("ieee", as torch's default matmul precision);
# the FMA dots need many registers, so small tiles and 8 warps (gate: no spills at D=128).
# dq: 2 stages, since with 1 stage ptxas keeps sm_80 at 64 registers and spills one (8 B of
# stack) once the causal bounds carry the TK - TQ shift; 2 stages: 74 regs, no spill, 51 KB smem.
_GPU_TILES_FP32 = AttentionTiles(fwd=Tile(32, 16, 8, 1), preprocess=Tile(64, 0, 4, 1),
                                 dkdv=Tile(16, 32, 8, 1), dq=Tile(32, 16, 8, 2))
# Interpreter (CPU tests): small tiles so that T in the tens exercises the unmasked loop, the
# diagonal and the ragged tail; the interpreter ignores warps and stages.
_INTERPRET_TILES = AttentionTiles(fwd=Tile(32, 16, 1, 1), preprocess=Tile(32, 0, 1, 1),
                                  dkdv=Tile(16, 32, 1, 1), dq=Tile(32, 16, 1, 1))


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pick_tiles(head_dim: int, dtype: torch.dtype, device: torch.device,
               arch: int | None = None) -> AttentionTiles:
    """The tiles the launchers use for this head dim / dtype / device (arch: 90 or 80 bucket;
    read from the device when None)."""
    if device.type != "cuda":
        return _INTERPRET_TILES
    if dtype == torch.float32:
        return _GPU_TILES_FP32
    if arch is None:
        arch = 10 * torch.cuda.get_device_capability(device)[0]
    return _GPU_TILES[(90 if arch >= 90 else 80, 64 if block_d(head_dim) <= 64 else 128)]


def _dot_flags(dtype: torch.dtype, device: torch.device) -> tuple[str, bool]:
    """(input_precision, upcast-before-dot) for this dtype.

    fp32 runs exact fp32 dots ("ieee"; a correctness path, not a fast one). bf16 under the
    interpreter is upcast to fp32 before tl.dot (the interpreter's bf16 dot is broken in
    triton 3.9); on GPU bf16/fp16 feed the tensor cores directly.
    """
    if dtype == torch.float32:
        return "ieee", False
    return "tf32", (dtype == torch.bfloat16 and device.type != "cuda")


def _check_tiles(t: AttentionTiles) -> None:
    if t.fwd.block_m % t.fwd.block_n or t.dq.block_m % t.dq.block_n or t.dkdv.block_n % t.dkdv.block_m:
        raise ValueError(f"attention tiles must nest (fwd/dq BLOCK_M % BLOCK_N, dkdv BLOCK_N % BLOCK_M): {t}")


# --------------------------------------------------------------------------------------------
# Launchers (inputs validated by lorafast.ops._attention before they get here)
# --------------------------------------------------------------------------------------------
MAX_GRID_Y = 65535  # B * H rides on CUDA grid axis 1


def _check_grid(B: int, H: int) -> None:
    if B * H > MAX_GRID_Y:
        raise ValueError(f"attention: B * H = {B * H} exceeds {MAX_GRID_Y} (CUDA grid axis 1)")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, *, causal: bool, scale: float,
                      tiles: AttentionTiles | None = None) -> None:
    """Launch the forward into ``out`` ([B, H, TQ, D], any strides) and ``lse`` ([B, H, TQ] fp32,
    contiguous; log2 units); k, v are [B, H, TK, D] (causal needs TQ <= TK; the mask is
    bottom-right aligned). No host synchronisation."""
    B, H, T, D = q.shape
    TK = k.shape[2]
    _check_grid(B, H)
    tiles = tiles or pick_tiles(D, q.dtype, q.device)
    _check_tiles(tiles)
    prec, f32 = _dot_flags(q.dtype, q.device)
    t = tiles.fwd
    grid = (triton.cdiv(T, t.block_m), B * H)
    _attn_fwd_kernel[grid](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse,
        **_named("q", q), **_named("k", k), **_named("v", v), **_named("o", out),
        H=H, TQ=T, TK=TK, qk_scale=scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d(D),
        IS_CAUSAL=causal, DOT_PREC=prec, DOT_F32=f32,
        num_warps=t.num_warps, num_stages=t.num_stages)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor | None,
                       dk: torch.Tensor | None, dv: torch.Tensor | None, *, causal: bool,
                       scale: float, tiles: AttentionTiles | None = None) -> None:
    """Launch the backward: delta preprocess, then dK/dV (if dk is given; dv must be too) and
    dQ (if dq is given). Gradients are written into the given buffers (any strides); q, do,
    out, dq are [B, H, TQ, D], k, v, dk, dv [B, H, TK, D]."""
    B, H, T, D = q.shape
    TK = k.shape[2]
    _check_grid(B, H)
    tiles = tiles or pick_tiles(D, q.dtype, q.device)
    _check_tiles(tiles)
    prec, f32 = _dot_flags(q.dtype, q.device)
    BD = block_d(D)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    t = tiles.preprocess
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, t.block_m), B * H)](
        o_ptr=out, do_ptr=do, delta_ptr=delta, **_named("o", out), **_named("do", do),
        H=H, T=T, HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_D=BD,
        num_warps=t.num_warps, num_stages=t.num_stages)
    common = dict(H=H, TQ=T, TK=TK, qk_scale=scale * LOG2E, sm_scale=scale, HEAD_DIM=D, BLOCK_D=BD,
                  IS_CAUSAL=causal, DOT_PREC=prec, DOT_F32=f32)
    if dk is not None:
        assert dv is not None
        t = tiles.dkdv
        _attn_bwd_dkdv_kernel[(triton.cdiv(TK, t.block_n), B * H)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, dk_ptr=dk, dv_ptr=dv, lse_ptr=lse, delta_ptr=delta,
            **_named("q", q), **_named("k", k), **_named("v", v), **_named("do", do),
            **_named("dk", dk), **_named("dv", dv), **common,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages)
    if dq is not None:
        t = tiles.dq
        _attn_bwd_dq_kernel[(triton.cdiv(T, t.block_m), B * H)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, dq_ptr=dq, lse_ptr=lse, delta_ptr=delta,
            **_named("q", q), **_named("k", k), **_named("v", v), **_named("do", do),
            **_named("dq", dq), **common,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages)


def _named(prefix: str, x: torch.Tensor) -> dict[str, int]:
    sb, sh, st, sd = x.stride()
    return {f"stride_{prefix}b": sb, f"stride_{prefix}h": sh, f"stride_{prefix}t": st,
            f"stride_{prefix}d": sd}


# --------------------------------------------------------------------------------------------
# Compile gate
# --------------------------------------------------------------------------------------------
def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("lse_ptr", "delta_ptr") else f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_configs():
    """Every GPU tile configuration the launchers can pick, over representative dtype/flag cases.

    Each (kernel, tiles) is listed once per arch that picks it (sm_90 and sm_80 tiles differ in
    places). The layout assumed is the model's: q/k/v views of a fused qkv projection (unit
    stride over D, which Triton specialises to a constant; other strides divisible by 16),
    output and gradients in [B, T, H, D] memory.
    """
    out = []

    def add(name, fn, dtype, constexprs, tile, needs_mma, archs):
        sig = _signature(fn, dtype, constexprs)
        cx = dict(constexprs)
        for n in fn.arg_names:
            if n.startswith("stride_") and n.endswith("d"):  # unit stride: specialised at launch
                sig[n] = "constexpr"
                cx[n] = 1
        aligned = tuple(n for n in fn.arg_names if sig[n] != "constexpr"
                        and (n.endswith("_ptr") or n.startswith("stride_")))
        out.append(KernelConfig(name=name, fn=fn, signature=sig, constexprs=cx,
                                num_warps=tile.num_warps, num_stages=tile.num_stages,
                                aligned=aligned, needs_mma=needs_mma, archs=archs))

    kernels = (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel))
    # (D, dtype, causal): both head-dim buckets, a padded head dim, both 16-bit dtypes, both flags
    cases = [(128, torch.bfloat16, True), (64, torch.bfloat16, True), (80, torch.float16, False)]
    for D, dtype, causal in cases:
        dt = TL_DTYPE[dtype]
        tag = f"d{D}_{dt}_{'causal' if causal else 'full'}"
        base = dict(HEAD_DIM=D, BLOCK_D=block_d(D), IS_CAUSAL=causal, DOT_PREC="tf32", DOT_F32=False)
        for kind, fn in kernels:
            per_arch = {a: getattr(pick_tiles(D, dtype, torch.device("cuda"), arch=a), kind)
                        for a in (90, 80)}
            groups = {}
            for a, t in per_arch.items():
                groups.setdefault(t, []).append(a)
            for t, archs in groups.items():
                suffix = "" if len(groups) == 1 else f"_sm{archs[0]}"
                add(f"attn_{kind}_{tag}{suffix}", fn, dt,
                    dict(base, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t, True, tuple(archs))
    t = pick_tiles(128, torch.bfloat16, torch.device("cuda"), arch=90).preprocess
    add("attn_bwd_pre_d128_bf16", _attn_bwd_preprocess_kernel, "bf16",
        dict(HEAD_DIM=128, BLOCK_M=t.block_m, BLOCK_D=128), t, False, (90, 80))
    # fp32 inputs: exact FMA dots, no tensor cores by design (needs_mma=False)
    t32 = _GPU_TILES_FP32
    base = dict(HEAD_DIM=128, BLOCK_D=128, IS_CAUSAL=True, DOT_PREC="ieee", DOT_F32=False)
    for kind, fn in kernels:
        t = getattr(t32, kind)
        add(f"attn_{kind}_d128_fp32_causal", fn, "fp32",
            dict(base, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t, False, (90, 80))
    return out

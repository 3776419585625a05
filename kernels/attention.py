"""Fused causal attention in Triton: FlashAttention-2-style forward and backward.

Lineage: Tri Dao's FlashAttention-2 (arXiv 2307.08691: the online softmax, the one-pass backward
with dQ accumulated by atomic adds, 5 GEMMs per tile pair) and Triton's tutorial
``06-fused-attention.py`` (base-2 softmax with log2(e) folded into the scale, the row max taken on
raw scores with the scale folded into one fused multiply-add, the loop split into unmasked tiles
then masked diagonal / ragged tiles, TMA tensor descriptors on Hopper); the masking of ragged
sequence and head dims follows flash-attention's ``flash_attn_triton.py`` (EVEN_M/N/HEADDIM);
the Hopper producer/consumer split is FlashAttention-3's (arXiv 2407.08608), here produced by
Triton 3.9's automatic warp specialisation.

What it computes, for q ``[B, H, TQ, D]``, k and v ``[B, H, TK, D]`` (any strides) and
``s = scale``::

    S = s * q @ k^T            (+ causal mask: key j > query i + TK - TQ  ->  -inf)
    P = softmax(S, dim=-1)
    O = P @ v                  LSE = logsumexp(S, dim=-1)  (saved, fp32, in log2 units)

and the gradients ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with
``delta = rowsum(dO * O)``, ``dQ = s * dS K``, ``dK = s * dS^T Q``.

Kernels. Every grid is one-dimensional: program ``pid`` takes row tile ``pid % n_tiles`` of head
``pid // n_tiles`` (``n_tiles = cdiv(T, BLOCK)``), so B * H is bounded only by grid axis x
(2^31 - 1 programs), not by the 65535 of axes y and z; :func:`launch_grid` checks the bound.

* ``_attn_fwd_kernel``: one program per tile of BLOCK_M queries; K/V tiles stream past it with
  an online softmax in base 2. Per unmasked K/V tile: the row max of the raw scores times the
  scale, ``p = exp2(fma(qk, scale * log2(e), -m))`` (one FFMA per score, no separate scaling
  pass); the few diagonal / ragged tiles scale, mask, then take the max. Never stores T x T.
  ``USE_TMA`` (Hopper): q/k/v/o move through tensor descriptors made in the kernel (TMA,
  ``UTMALDG``; out-of-range rows and head-dim columns are zero-filled by the hardware).
  ``WARP_SPEC`` (with USE_TMA) lets Triton 3.9 split the program into a TMA producer warp group
  and two consumer warp groups of 64 query rows each (FlashAttention-3's structure: the softmax
  of one consumer overlaps the tensor-core work of the other, and no CTA-wide barrier remains in
  the K/V loop, only each consumer's own 128-thread barrier and mbarrier waits). Triton 3.9
  warp-specialises one loop per kernel, so that variant runs every key tile through one loop
  that masks raw scores (one compare and one select per score more; scale != 0).
* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` in fp32, and zeroes the fp32 dQ
  accumulator when the backward accumulates dQ with atomics.
* ``_attn_bwd_kernel``: one program per tile of BLOCK_N keys, streaming query tiles. Per tile
  pair: ``S^T = K Q^T``, ``dP^T = V dO^T``, ``dV += P^T dO``, ``dK += dS^T Q`` and, with
  ``ATOMIC_DQ`` (the default backward), ``dQ_part = dS K`` added into an fp32 accumulator with
  relaxed (fence-free) atomics: 5 GEMMs, FlashAttention-2's count, in one launch.
  ``_attn_bwd_dq_convert_kernel`` then writes ``dQ = s * acc`` in the gradient's dtype.
* ``deterministic=True``: the same ``_attn_bwd_kernel`` without atomics for dK/dV, and
  ``_attn_bwd_dq_kernel`` (one program per tile of BLOCK_M queries, streaming key tiles)
  recomputing S and dP for dQ: 7 GEMMs, every output written by exactly one program, bitwise
  reproducible run to run. The default path is not: fp32 atomic adds land in a varying order.

Causal: the mask is aligned bottom-right as in FlashAttention 2.1+ (the last query sees every
key; TQ == TK is ordinary causal self-attention, TQ = 1 is a KV-cache decode step); the
kernels take OFF = TK - TQ as the shift of the diagonal and require TQ <= TK (a row with no
visible key is rejected by the op layer rather than given a 0 output). Tiles wholly above the
shifted diagonal are never visited; tiles wholly below it run an unmasked loop; only the
diagonal tiles and the ragged tails (T % BLOCK != 0) pay for masks.
Head dims 16..128 that are not powers of two are padded to BLOCK_D and masked (TMA: zero-filled).

Work per main-loop iteration (the binary is checked against ``KernelConfig.exp2_per_iteration``,
i.e. no two warps compute the same scores): on sm_90 tiles have at least 16 rows per warp along
the row axis of every chained dot (Triton 3.9 places the warps of a chained wgmma along rows
only); on sm_80 the tiles are those whose SASS shows no duplicated MUFU.EX2. What the counts are
per kernel: ``python -m lorafast.bench.attention --sass``.

Limits: q, k, v share B, H, D (no GQA), no dropout, no sliding window, a negative ``scale``
takes a separately compiled variant (``NEG_SCALE``). The Hopper TMA variant needs fp16/bf16,
unit stride over D and 16-byte aligned bases and strides (the launcher falls back to the pointer
kernels otherwise). Tested under the Triton interpreter on CPU (fp32, fp16; bf16 upcast before
the dots; both the pointer and the TMA variants, the latter's single masked loop included, though
the interpreter runs it without warp specialisation; tests/test_attention.py); GPU configurations are
compiled ahead of time for sm_90 and sm_80 by ``lorafast.compile_gate`` (no spills, shared memory
within limits, tensor-core main loops) but were NOT timed on hardware (see ``compile_configs``);
the ``cuda``-marked tests (bf16 numerics, bitwise repeatability, grid limits) run on a GPU through
``tools/gpu_check.sh``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import triton
import triton.language as tl

from ._common import TL_DTYPE, KernelConfig, interpreting

LOG2E = 1.4426950408889634
MAX_GRID_X = 2**31 - 1  # CUDA grid axis x (axes y and z stop at 65535)
# fp contraction (a * b + c -> one FFMA) pinned at every launch and in the gate's configs:
# Triton 3.9 enables it by default, 3.10 will not. On: the softmax and gradient updates are
# FMA-shaped, and the explicit tl.fma of the scale fold is there either way.
FP_FUSION = True


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


@triton.jit
def _tile_ids(BLOCK: tl.constexpr, T, LONGEST_LAST: tl.constexpr):
    """(row-tile index, head index b*H + h) of this program in a 1-D grid of cdiv(T, BLOCK) tiles
    per head, tiles of one head consecutive (they share K/V in L2). LONGEST_LAST reverses the
    tile order within a head (causal forward / dQ: the last query tiles see the most keys and
    start first, for a better tail across SMs)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(T, BLOCK)
    tile = pid % n_tiles
    if LONGEST_LAST:
        tile = n_tiles - 1 - tile
    return tile, pid // n_tiles


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_src, v_src,
    stride_kt, stride_vt,
    lo, hi, TK,
    qk_scale,
    last_key, offs_n, d_mask,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, NEG_SCALE: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [lo, hi).

    k_src, v_src: tensor descriptors of this head's K and V (USE_TMA), or pointers to the
    [BLOCK_N, BLOCK_D] tiles at key row ``lo``. MASKED: apply (IS_CAUSAL) key <= last_key[row]
    (= row + TK - TQ, the bottom-right diagonal; it implies key < TK for rows < TQ), else
    key < TK; otherwise every (row, key) is valid. WARP_SPEC (then MASKED: Triton 3.9 warp-
    specialises one loop per kernel, so the warp-specialised forward runs all its key tiles
    through this one masked loop): the mask fills raw scores with -inf (+inf for a negative
    scale) and the max stays on raw scores, one compare and one select per score more than an
    unmasked tile and no extra multiply; needs scale != 0.
    """
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        cols = start_n + offs_n
        if USE_TMA:  # rows past TK (and columns past HEAD_DIM) arrive zero-filled
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            n_mask = cols < TK
            k = _load(k_src, n_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
            v = _load(v_src, n_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
            k_src += BLOCK_N * stride_kt
            v_src += BLOCK_N * stride_vt
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # raw scores q.k, fp32
        if MASKED:
            if IS_CAUSAL:
                valid = last_key[:, None] >= cols[None, :]
            else:
                valid = (cols < TK)[None, :]
        if MASKED and not WARP_SPEC:
            # diagonal / ragged tiles (few): scale, then -inf where masked, then the max
            s = tl.where(valid, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
        else:
            if MASKED:  # warp-specialised single loop: masked raw scores (see above)
                qk = tl.where(valid, qk, float("inf") if NEG_SCALE else float("-inf"))
            # max over raw scores, times the scale (qk_scale = s * log2(e); a negative scale
            # turns the max into a min); exp2 of one fused multiply-add per score
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
        # key 0 is valid for every row (OFF >= 0 when causal) and the first visited tile holds
        # it, so m_new is finite from the first tile on; exp2(-inf) = 0 drops the empty start
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
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
    IS_CAUSAL: tl.constexpr, NEG_SCALE: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    """Attention forward: O = softmax(s q k^T [+ causal mask]) v and LSE2 = log2-sum-exp2 per row.

    Shapes: q, o [B, H, TQ, HEAD_DIM], k, v [B, H, TK, HEAD_DIM], any strides (USE_TMA: unit
    stride over HEAD_DIM, 16-byte aligned bases and strides); lse [B, H, TQ] contiguous fp32.
    Causal mask bottom-right aligned: query i sees key j iff j <= i + TK - TQ.
    Dtypes: q, k, v, o fp16 / bf16 / fp32 (one dtype); scores, softmax, acc in fp32; P cast to
    v's dtype for the PV dot; lse fp32 holding log2(sum exp2(qk_scale * q.k)) (log2 units).
    Mutates: writes o and lse for rows < TQ only. qk_scale = s * log2(e); NEG_SCALE iff < 0.
    Preconditions: BLOCK_M % BLOCK_N == 0; BLOCK_D = next pow2 >= HEAD_DIM; 1-D grid of
    cdiv(TQ, BLOCK_M) * B * H programs; TQ <= TK when IS_CAUSAL (every row sees key 0);
    WARP_SPEC needs USE_TMA, num_warps=4, num_stages > 1 and BLOCK_M = 128 (two consumers).
    """
    pid_m, pid_bh = _tile_ids(BLOCK_M, TQ, IS_CAUSAL)
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

    # int64 bases: b * stride_b can pass 2**31; in-tile offsets stay int32
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    o_base = o_ptr + b * stride_ob + h * stride_oh
    if USE_TMA:
        # descriptors of this head's [T, HEAD_DIM] matrices (made here: the warp-specialised
        # split needs descriptors it can re-make with half the rows per consumer)
        q_desc = tl.make_tensor_descriptor(q_base, [TQ, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, [TK, HEAD_DIM], [stride_kt, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [TK, HEAD_DIM], [stride_vt, 1], [BLOCK_N, BLOCK_D])
        q = q_desc.load([start_m, 0])
        k_lo = k_desc
        v_lo = v_desc
    else:
        q_ptrs = _rows(q_ptr, b, h, start_m.to(tl.int64), loc_m, offs_d,
                       stride_qb, stride_qh, stride_qt, stride_qd)
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        k_off = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd   # K tile [BLOCK_N, BLOCK_D]
        v_off = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd   # V tile [BLOCK_N, BLOCK_D]
        k_lo = k_base + k_off
        v_lo = v_base + v_off
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
    if WARP_SPEC:
        # one loop over every visited key tile, masked throughout (one warp-specialised loop
        # per kernel in Triton 3.9; a second loop makes its partitioner fail)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_desc, v_desc, stride_kt, stride_vt,
            0, hi, TK, qk_scale, offs_m + OFF, offs_n, d_mask,
            BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D, NEG_SCALE=NEG_SCALE,
            DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=True, WARP_SPEC=True)
    else:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_lo, v_lo, stride_kt, stride_vt,
            0, hi_full, TK, qk_scale, offs_m + OFF, offs_n, d_mask,
            BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=False, EVEN_D=EVEN_D, NEG_SCALE=NEG_SCALE,
            DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=USE_TMA, WARP_SPEC=False)
        if USE_TMA:
            k_hi = k_desc
            v_hi = v_desc
        else:
            lo64 = hi_full.to(tl.int64)
            k_hi = k_base + lo64 * stride_kt + k_off
            v_hi = v_base + lo64 * stride_vt + v_off
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_hi, v_hi, stride_kt, stride_vt,
            hi_full, hi, TK, qk_scale, offs_m + OFF, offs_n, d_mask,
            BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D, NEG_SCALE=NEG_SCALE,
            DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=USE_TMA, WARP_SPEC=False)

    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)  # log2 units: P = exp2(qk_scale * q.k - lse)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=m_mask)
    if USE_TMA:  # rows past TQ and columns past HEAD_DIM are clipped by the hardware
        o_desc = tl.make_tensor_descriptor(o_base, [TQ, HEAD_DIM], [stride_ot, 1], [BLOCK_M, BLOCK_D])
        o_desc.store([start_m, 0], acc.to(o_ptr.dtype.element_ty))
    else:
        o_ptrs = _rows(o_ptr, b, h, start_m.to(tl.int64), loc_m, offs_d,
                       stride_ob, stride_oh, stride_ot, stride_od)
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T"])
def _attn_bwd_preprocess_kernel(
    # pointers
    o_ptr, do_ptr, delta_ptr, dq_acc_ptr,
    # strides
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    # sizes
    H, T,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    """delta[b, h, t] = sum_d dO[b, h, t, d] * O[b, h, t, d], the softmax-backward row term;
    with ZERO_DQ also dq_acc[b * H + h, t, :] = 0 (the atomic backward's accumulator).

    Shapes: o, do [B, H, T, HEAD_DIM] any strides (T = query rows); delta [B, H, T] contiguous;
    dq_acc [B * H, T, HEAD_DIM] contiguous fp32 (unused unless ZERO_DQ).
    Dtypes: o, do fp16 / bf16 / fp32; product and sum in fp32; delta fp32.
    Mutates: writes delta (and dq_acc) for rows < T.
    Preconditions: BLOCK_D = next pow2 >= HEAD_DIM; 1-D grid of cdiv(T, BLOCK_M) * B * H.
    """
    pid_m, pid_bh = _tile_ids(BLOCK_M, T, False)
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
    if ZERO_DQ:
        acc_ptrs = (dq_acc_ptr + pid_bh.to(tl.int64) * T * HEAD_DIM + row0 * HEAD_DIM
                    + loc_m[:, None] * HEAD_DIM + offs_d[None, :])
        tl.store(acc_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=mask)


@triton.jit
def _attn_bwd_inner(
    dk, dv, k, v,
    q_src, do_src, q_off, do_off, dqa_ptrs, lse_bh, delta_bh,
    stride_qt, stride_dot,
    lo, hi, TQ,
    qk_scale,
    first_row, loc_m, d_mask,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), in the transposed form; with
    ATOMIC_DQ also add this key tile's share of dQ (unscaled) into the fp32 accumulator.

    q_src, do_src: tensor descriptors of this head's Q and dO (USE_TMA), or pointers to row 0 of
    this head, with q_off, do_off the [BLOCK_M, BLOCK_D] tile offsets (unused with TMA);
    dqa_ptrs: the accumulator's [BLOCK_M, BLOCK_D] tile at row 0 of this head. MASKED: apply
    query < TQ and (IS_CAUSAL) query >= first_row[key] (= key - (TK - TQ)); otherwise every pair
    is valid.
    """
    if not USE_TMA:  # the tiles at query row lo
        lo64 = lo.to(tl.int64)
        q_src = q_src + lo64 * stride_qt + q_off
        do_src = do_src + lo64 * stride_dot + do_off
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + loc_m
        m_mask = rows < TQ
        if USE_TMA:  # rows past TQ (and columns past HEAD_DIM) arrive zero-filled
            q = q_src.load([start_m, 0])
            do = do_src.load([start_m, 0])
        else:
            q = _load(q_src, m_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
            do = _load(do_src, m_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
            q_src += BLOCK_M * stride_qt
            do_src += BLOCK_M * stride_dot
        if MASKED:
            lse = tl.load(lse_bh + rows, mask=m_mask, other=0.0)
            delta = tl.load(delta_bh + rows, mask=m_mask, other=0.0)
        else:
            lse = tl.load(lse_bh + rows)
            delta = tl.load(delta_bh + rows)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # P^T = exp2(qk_scale * K Q^T - lse): one fused multiply-add per score
        pt = tl.math.exp2(tl.fma(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), qk_scale, -lse[None, :]))
        if MASKED:
            valid = m_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (rows[None, :] >= first_row[:, None])
            pt = tl.where(valid, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)             # dV += P^T dO
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)                     # dP^T = V dO^T
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)                             # dS^T
        dk = tl.dot(dst, q, dk, input_precision=DOT_PREC)                           # dK += dS^T Q
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC)                 # dS K, fp32
            # relaxed: no fence around each add (order between programs is irrelevant; the
            # convert kernel runs after this launch completes)
            ptrs = dqa_ptrs + start_m * HEAD_DIM
            if MASKED or not EVEN_D:
                tl.atomic_add(ptrs, dq, mask=m_mask[:, None] & d_mask[None, :], sem="relaxed")
            else:
                tl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["TQ", "TK"])
def _attn_bwd_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, dq_acc_ptr, lse_ptr, delta_ptr,
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
    IS_CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dK = s * dS^T Q and dV = P^T dO for one tile of keys (and, ATOMIC_DQ, dS K added into dQ).

    P = exp2(qk_scale * Q K^T - lse) is recomputed from the forward's lse, dS = P * (dO V^T -
    delta). Shapes: q, do [B, H, TQ, HEAD_DIM], k, v, dk, dv [B, H, TK, HEAD_DIM], any strides
    (USE_TMA: q and do with unit stride over HEAD_DIM and 16-byte aligned bases and strides);
    lse, delta [B, H, TQ] fp32; dq_acc [B * H, TQ, HEAD_DIM] contiguous fp32.
    Causal: bottom-right aligned (query i sees key j iff j <= i + TK - TQ).
    Dtypes: inputs fp16 / bf16 / fp32; P, dS, dK, dV, dQ partials in fp32; P and dS cast to the
    input dtype for the dots; dk, dv stored in their own dtype.
    Mutates: writes dk, dv rows < TK (each by exactly one program); ATOMIC_DQ: adds into dq_acc
    rows < TQ with relaxed fp32 atomics (result order-dependent in its last bits).
    Preconditions: BLOCK_N % BLOCK_M == 0; lse from the forward; delta from the preprocess (which
    also zeroes dq_acc); 1-D grid of cdiv(TK, BLOCK_N) * B * H programs; TQ <= TK when IS_CAUSAL.
    """
    pid_n, pid_bh = _tile_ids(BLOCK_N, TK, False)  # key tile 0 sees the most queries: first
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
    if USE_TMA:
        q_src = tl.make_tensor_descriptor(q_base, [TQ, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
        do_src = tl.make_tensor_descriptor(do_base, [TQ, HEAD_DIM], [stride_dot, 1], [BLOCK_M, BLOCK_D])
        q_off = 0
        do_off = 0
    else:
        q_src = q_base
        do_src = do_base
        q_off = loc_m[:, None] * stride_qt + offs_d[None, :] * stride_qd     # Q tile [BLOCK_M, BLOCK_D]
        do_off = loc_m[:, None] * stride_dot + offs_d[None, :] * stride_dod  # dO tile [BLOCK_M, BLOCK_D]
    lse_bh = lse_ptr + pid_bh.to(tl.int64) * TQ
    delta_bh = delta_ptr + pid_bh.to(tl.int64) * TQ
    dqa_ptrs = (dq_acc_ptr + pid_bh.to(tl.int64) * TQ * HEAD_DIM
                + loc_m[:, None] * HEAD_DIM + offs_d[None, :])

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
        dk, dv = _attn_bwd_inner(
            dk, dv, k, v, q_src, do_src, q_off, do_off, dqa_ptrs, lse_bh, delta_bh, stride_qt, stride_dot,
            diag_lo, diag_hi, TQ, qk_scale, offs_n - OFF, loc_m, d_mask,
            BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D,
            ATOMIC_DQ=ATOMIC_DQ, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=USE_TMA)
    else:
        diag_hi = start_n * 0
    dk, dv = _attn_bwd_inner(
        dk, dv, k, v, q_src, do_src, q_off, do_off, dqa_ptrs, lse_bh, delta_bh, stride_qt, stride_dot,
        diag_hi, t_full, TQ, qk_scale, offs_n - OFF, loc_m, d_mask,
        BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, IS_CAUSAL=IS_CAUSAL, MASKED=False, EVEN_D=EVEN_D,
        ATOMIC_DQ=ATOMIC_DQ, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=USE_TMA)
    dk, dv = _attn_bwd_inner(
        dk, dv, k, v, q_src, do_src, q_off, do_off, dqa_ptrs, lse_bh, delta_bh, stride_qt, stride_dot,
        tl.maximum(diag_hi, t_full), TQ, TQ, qk_scale, offs_n - OFF, loc_m, d_mask,
        BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM, IS_CAUSAL=IS_CAUSAL, MASKED=True, EVEN_D=EVEN_D,
        ATOMIC_DQ=ATOMIC_DQ, DOT_PREC=DOT_PREC, DOT_F32=DOT_F32, USE_TMA=USE_TMA)

    dk = dk * sm_scale  # dK = s * dS^T Q (the scale of S = s q k^T)
    tl.store(_rows(dk_ptr, b, h, row_n, loc_n, offs_d, stride_dkb, stride_dkh, stride_dkt, stride_dkd),
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(_rows(dv_ptr, b, h, row_n, loc_n, offs_d, stride_dvb, stride_dvh, stride_dvt, stride_dvd),
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_dq_convert_kernel(
    # pointers
    dq_acc_ptr, dq_ptr,
    # strides
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    # sizes
    H, T,
    # runtime scalars
    sm_scale,
    # constexprs
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq[b, h, t, :] = sm_scale * dq_acc[b * H + h, t, :], cast to dq's dtype (dQ = s * dS K).

    Shapes: dq_acc [B * H, T, HEAD_DIM] contiguous fp32; dq [B, H, T, HEAD_DIM] any strides.
    Mutates: writes dq rows < T. Preconditions: 1-D grid of cdiv(T, BLOCK_M) * B * H programs.
    """
    pid_m, pid_bh = _tile_ids(BLOCK_M, T, False)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    loc_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (row0 + loc_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.load(dq_acc_ptr + pid_bh.to(tl.int64) * T * HEAD_DIM + row0 * HEAD_DIM
                  + loc_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    tl.store(_rows(dq_ptr, b, h, row0, loc_m, offs_d, stride_dqb, stride_dqh, stride_dqt, stride_dqd),
             (acc * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    k_ptrs, v_ptrs,
    stride_kt, stride_vt,
    lo, hi, TK,
    qk_scale,
    last_key, offs_n, d_mask,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [lo, hi) (deterministic path).

    k_ptrs, v_ptrs ([BLOCK_N, BLOCK_D] tiles of K and V) point at key row ``lo``.
    MASKED: apply key < TK and (IS_CAUSAL) key <= last_key[row] (= row + TK - TQ); else every
    pair is valid.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < TK
        k = _load(k_ptrs, n_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
        v = _load(v_ptrs, n_mask[:, None] & d_mask[None, :], MASKED or not EVEN_D)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.fma(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qk_scale, -lse[:, None]))
        if MASKED:
            valid = n_mask[None, :]
            if IS_CAUSAL:
                valid = valid & (last_key[:, None] >= cols[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)                 # dP = dO V^T
        ds = p * (dp - delta[:, None])                                         # dS
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)           # dQ += dS K
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
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
    """dQ = s * dS K with dS = P * (dO V^T - delta), for one tile of queries (deterministic path).

    Shapes: q, do, dq [B, H, TQ, HEAD_DIM], k, v [B, H, TK, HEAD_DIM], any strides; lse, delta
    [B, H, TQ] fp32. Causal: bottom-right aligned (query i sees key j iff j <= i + TK - TQ).
    Dtypes: inputs fp16 / bf16 / fp32; P, dS, dQ in fp32; dS cast to the input dtype for the
    dot; dq stored in its own dtype.
    Mutates: writes dq rows < TQ (each by exactly one program: deterministic, no atomics).
    Preconditions: BLOCK_M % BLOCK_N == 0; lse from the forward; delta from the preprocess;
    1-D grid of cdiv(TQ, BLOCK_M) * B * H programs; TQ <= TK when IS_CAUSAL.
    """
    pid_m, pid_bh = _tile_ids(BLOCK_M, TQ, IS_CAUSAL)
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
    k_off = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_off = offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
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
        dq, q, do, lse, delta, k_base + k_off, v_base + v_off, stride_kt, stride_vt,
        0, hi_full, TK, qk_scale, last_key, offs_n, d_mask,
        BLOCK_N=BLOCK_N, IS_CAUSAL=IS_CAUSAL, MASKED=False, EVEN_D=EVEN_D,
        DOT_PREC=DOT_PREC, DOT_F32=DOT_F32)
    lo64 = hi_full.to(tl.int64)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base + lo64 * stride_kt + k_off, v_base + lo64 * stride_vt + v_off,
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
    """One launch configuration: tile sizes (rows of the program's own tile, streamed rows),
    warps, pipeline stages; ``tma``: Hopper tensor-descriptor loads; ``warp_specialize``: Triton's
    producer/consumer split of the main loop (needs tma, 4 warps per consumer, 2+ stages)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    warp_specialize: bool = False


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    fwd: Tile          # _attn_fwd_kernel with pointer loads
    preprocess: Tile   # delta (+ dQ accumulator zeroing) and the dQ convert; block_n unused
    bwd: Tile          # _attn_bwd_kernel with atomic dQ (default): block_n = owned keys, block_m = streamed queries
    dkdv: Tile         # _attn_bwd_kernel without atomics (deterministic=True, or no dQ needed)
    dq: Tile           # _attn_bwd_dq_kernel: block_m = owned queries, block_n = streamed keys
    fwd_tma: Tile | None = None  # Hopper: the forward through tensor descriptors, when the tensors allow
    bwd_tma: Tile | None = None  # Hopper: the atomic backward with Q / dO through tensor descriptors


# GPU tiles, keyed by (arch, BLOCK_D bucket). NO GPU was available when these were chosen: they
# start from published configurations and keep the largest candidate that the AOT compile gate
# (python -m lorafast.compile_gate --filter attn) builds without register spills, within shared
# memory, and with no duplicated work (the exp2 count of the SASS main loop equals the tile's
# need, ``exp2_per_iteration``). They are to be re-timed on an H200
# (``python -m lorafast.bench.attention --tune``, or LORAFAST_AUTOTUNE=1).
# * fwd: Triton tutorial 06 (BLOCK_M=128, BLOCK_N=64..128, 8 warps: 16 query rows per warp).
# * fwd_tma (sm_90): FlashAttention-3's forward shape (128 queries = two consumer warp groups of
#   64 rows, 128 keys per step, 2 stages at D=128: 192 KB of shared memory; 3 at D=64), as Triton
#   3.9's warp specialisation builds it: one TMA producer warp group, 4 warps per consumer.
# * bwd / bwd_tma / dkdv: FlashAttention-2/3 own 128 keys per program with 8 warps (16 key rows
#   per warp: the transposed scores K Q^T are not duplicated across warp groups, unlike the
#   64-key 8-warp tile of b51ddfe). The streamed query tile is what fits 255 registers: dK and
#   dV take D fp32 registers per thread at this density and the per-query lse / delta are
#   broadcast along columns, so at D=128 it is 32 queries (the gate shows 64 spilling 168..384
#   B), and dQ = dS K then has 32 rows, under wgmma's 64: it runs on mma.sync (HMMA), 1 GEMM of
#   5. With TMA loads of Q / dO (fewer address registers) D=64 fits 64 queries on wgmma only.
#   sm_80 (mma.sync everywhere, operands in registers): at D=128 the atomic kernel fits only
#   16 queries x 128 keys (1 stage; 32 x 64 duplicates the scores across warps on sm_80, every
#   other candidate spills); the deterministic dK/dV kernel keeps b51ddfe's 64 x 64.
# * dq (deterministic): tutorial 06's BLOCK_M2=128 / BLOCK_N2=32, 8 warps.
_GPU_TILES = {
    (90, 64): AttentionTiles(fwd=Tile(128, 128, 8, 3), preprocess=Tile(64, 0, 4, 1),
                             bwd=Tile(32, 128, 8, 3), dkdv=Tile(64, 128, 8, 3), dq=Tile(128, 32, 8, 3),
                             fwd_tma=Tile(128, 128, 4, 3, tma=True, warp_specialize=True),
                             bwd_tma=Tile(64, 128, 8, 3, tma=True)),
    (90, 128): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(64, 0, 4, 1),
                              bwd=Tile(32, 128, 8, 3), dkdv=Tile(32, 128, 8, 3), dq=Tile(128, 32, 8, 2),
                              fwd_tma=Tile(128, 128, 4, 2, tma=True, warp_specialize=True),
                              bwd_tma=Tile(32, 128, 8, 3, tma=True)),
    (80, 64): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(64, 0, 4, 1),
                             bwd=Tile(32, 128, 8, 3), dkdv=Tile(32, 128, 8, 3), dq=Tile(128, 32, 8, 3)),
    (80, 128): AttentionTiles(fwd=Tile(128, 64, 8, 3), preprocess=Tile(64, 0, 4, 1),
                              bwd=Tile(16, 128, 8, 1), dkdv=Tile(64, 64, 8, 2), dq=Tile(64, 32, 4, 2)),
}
# fp32 inputs: exact fp32 dots on CUDA cores ("ieee", as torch's default matmul precision);
# the FMA dots need many registers, so small tiles and 8 warps (gate: no spills at D=128).
# dq: 2 stages, since with 1 stage ptxas keeps sm_80 at 64 registers and spills one (8 B of
# stack) once the causal bounds carry the TK - TQ shift; 2 stages: 74 regs, no spill, 51 KB smem.
_GPU_TILES_FP32 = AttentionTiles(fwd=Tile(32, 16, 8, 1), preprocess=Tile(64, 0, 4, 1),
                                 bwd=Tile(16, 32, 8, 1), dkdv=Tile(16, 32, 8, 1), dq=Tile(32, 16, 8, 2))
# rows of the 32 x 16 fp32 score tile one thread holds in the CUDA-core layout (8 warps): 2
_FP32_FWD_ROWS_PER_THREAD = 2
# Interpreter (CPU tests): small tiles so that T in the tens exercises the unmasked loop, the
# diagonal and the ragged tail; the interpreter ignores warps and stages.
_INTERPRET_TILES = AttentionTiles(fwd=Tile(32, 16, 1, 1), preprocess=Tile(32, 0, 1, 1),
                                  bwd=Tile(16, 32, 1, 1), dkdv=Tile(16, 32, 1, 1), dq=Tile(32, 16, 1, 1))


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def pick_tiles(head_dim: int, dtype: torch.dtype, device: torch.device,
               arch: int | None = None) -> AttentionTiles:
    """The shipped tiles for this head dim / dtype / device (arch: 90 or 80 bucket; read from the
    device when None). Under the interpreter (CPU tensors) small tiles, whatever ``arch`` says,
    unless ``arch`` is given: then the GPU tiles of that arch (the tests run them on CPU)."""
    if device.type != "cuda" and arch is None:
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


def _check_tile(t: Tile, what: str, owned: str) -> None:
    big, small = (t.block_m, t.block_n) if owned == "m" else (t.block_n, t.block_m)
    if big % small:
        raise ValueError(f"attention {what} tile must nest (the owned tile a multiple of the streamed one): {t}")
    if t.warp_specialize and not (t.tma and t.num_warps == 4 and t.num_stages > 1 and t.block_m == 128):
        raise ValueError(f"attention {what}: warp specialisation needs tma, 4 warps, 2+ stages and "
                         f"BLOCK_M = 128 (two consumer warp groups of 64 rows): {t}")


def _check_tiles(t: AttentionTiles) -> None:
    _check_tile(t.fwd, "fwd", "m")
    _check_tile(t.dq, "dq", "m")
    _check_tile(t.bwd, "bwd", "n")
    _check_tile(t.dkdv, "dkdv", "n")
    if t.fwd_tma is not None:
        _check_tile(t.fwd_tma, "fwd_tma", "m")
    if t.bwd_tma is not None:
        _check_tile(t.bwd_tma, "bwd_tma", "n")


# --------------------------------------------------------------------------------------------
# Launchers (inputs validated by lorafast.ops._attention before they get here)
# --------------------------------------------------------------------------------------------
def launch_grid(n_rows: int, block: int, heads: int) -> tuple[int]:
    """The 1-D grid of a kernel with cdiv(n_rows, block) row tiles for each of ``heads`` = B * H
    heads. Raises ValueError past CUDA's grid axis x (2^31 - 1 programs): unreachable for tensors
    that fit in memory with BLOCK >= 16 (it would take 2^35 rows), checked anyway."""
    n = triton.cdiv(n_rows, block) * heads
    if n > MAX_GRID_X:
        raise ValueError(f"attention: {n} programs (cdiv({n_rows}, {block}) row tiles x {heads} heads) "
                         f"exceed CUDA grid axis x ({MAX_GRID_X})")
    return (n,)


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether the Hopper kernels can read these [B, H, T, D] tensors through tensor descriptors:
    fp16/bf16, unit stride over D, 16-byte aligned base and row stride, and every head's base
    16-byte aligned (batch and head strides, where B or H > 1)."""
    for x in tensors:
        if x.dtype not in (torch.float16, torch.bfloat16) or x.stride(3) != 1:
            return False
        item = x.element_size()
        if x.data_ptr() % 16 or (x.stride(2) * item) % 16:
            return False
        if any(x.shape[i] > 1 and (x.stride(i) * item) % 16 for i in (0, 1)):
            return False
    return True


@contextlib.contextmanager
def _descriptor_scratch(device: torch.device, needed: bool):
    """Tensor descriptors made in a kernel (``tl.make_tensor_descriptor``) live in a per-launch
    global scratch buffer that Triton requests from the allocator of ``triton.set_allocator``
    (a ContextVar). Install one that takes torch memory on ``device`` for this launch only and
    restore the caller's afterwards; the interpreter needs none."""
    if not needed or device.type != "cuda":
        yield
        return
    from triton.runtime import _allocation

    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _named(prefix: str, x: torch.Tensor) -> dict[str, int]:
    sb, sh, st, sd = x.stride()
    return {f"stride_{prefix}b": sb, f"stride_{prefix}h": sh, f"stride_{prefix}t": st,
            f"stride_{prefix}d": sd}


def _launch_fwd(q, k, v, out, lse, t: Tile, *, causal: bool, scale: float) -> None:
    B, H, T, D = q.shape
    prec, f32 = _dot_flags(q.dtype, q.device)
    with _descriptor_scratch(q.device, t.tma):
        _attn_fwd_kernel[launch_grid(T, t.block_m, B * H)](
            q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse,
            **_named("q", q), **_named("k", k), **_named("v", v), **_named("o", out),
            H=H, TQ=T, TK=k.shape[2], qk_scale=scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d(D),
            IS_CAUSAL=causal, NEG_SCALE=scale < 0, DOT_PREC=prec, DOT_F32=f32,
            USE_TMA=t.tma, WARP_SPEC=t.warp_specialize,
            num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=FP_FUSION)


def _launch_preprocess(do, out, delta, dq_acc, t: Tile) -> None:
    B, H, T, D = out.shape
    _attn_bwd_preprocess_kernel[launch_grid(T, t.block_m, B * H)](
        o_ptr=out, do_ptr=do, delta_ptr=delta, dq_acc_ptr=delta if dq_acc is None else dq_acc,
        **_named("o", out), **_named("do", do), H=H, T=T,
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_D=block_d(D), ZERO_DQ=dq_acc is not None,
        num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=FP_FUSION)


def _launch_bwd(do, q, k, v, dk, dv, dq_acc, lse, delta, t: Tile, *, causal: bool, scale: float) -> None:
    B, H, T, D = q.shape
    TK = k.shape[2]
    prec, f32 = _dot_flags(q.dtype, q.device)
    with _descriptor_scratch(q.device, t.tma):
        _attn_bwd_kernel[launch_grid(TK, t.block_n, B * H)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, dk_ptr=dk, dv_ptr=dv,
            dq_acc_ptr=delta if dq_acc is None else dq_acc, lse_ptr=lse, delta_ptr=delta,
            **_named("q", q), **_named("k", k), **_named("v", v), **_named("do", do),
            **_named("dk", dk), **_named("dv", dv),
            H=H, TQ=T, TK=TK, qk_scale=scale * LOG2E, sm_scale=scale,
            HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d(D),
            IS_CAUSAL=causal, ATOMIC_DQ=dq_acc is not None, DOT_PREC=prec, DOT_F32=f32, USE_TMA=t.tma,
            num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=FP_FUSION)


def _launch_dq_convert(dq_acc, dq, t: Tile, *, scale: float) -> None:
    B, H, T, D = dq.shape
    _attn_bwd_dq_convert_kernel[launch_grid(T, t.block_m, B * H)](
        dq_acc_ptr=dq_acc, dq_ptr=dq, **_named("dq", dq), H=H, T=T, sm_scale=scale,
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_D=block_d(D),
        num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=FP_FUSION)


def _launch_dq(do, q, k, v, dq, lse, delta, t: Tile, *, causal: bool, scale: float) -> None:
    B, H, T, D = q.shape
    prec, f32 = _dot_flags(q.dtype, q.device)
    _attn_bwd_dq_kernel[launch_grid(T, t.block_m, B * H)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=do, dq_ptr=dq, lse_ptr=lse, delta_ptr=delta,
        **_named("q", q), **_named("k", k), **_named("v", v), **_named("do", do), **_named("dq", dq),
        H=H, TQ=T, TK=k.shape[2], qk_scale=scale * LOG2E, sm_scale=scale,
        HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d(D),
        IS_CAUSAL=causal, DOT_PREC=prec, DOT_F32=f32,
        num_warps=t.num_warps, num_stages=t.num_stages, enable_fp_fusion=FP_FUSION)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, *, causal: bool, scale: float,
                      tiles: AttentionTiles | None = None) -> None:
    """Launch the forward into ``out`` ([B, H, TQ, D], any strides) and ``lse`` ([B, H, TQ] fp32,
    contiguous; log2 units); k, v are [B, H, TK, D] (causal needs TQ <= TK; the mask is
    bottom-right aligned). The Hopper TMA tile (``tiles.fwd_tma``) runs when the tensors allow
    it (:func:`tma_compatible`) and, if warp-specialised, scale != 0; else the pointer tile.
    ``tiles=None``: the shipped tiles, or with ``LORAFAST_AUTOTUNE=1`` on CUDA the fastest
    candidate per sequence-length bucket. No host synchronisation (except while autotuning)."""
    default = tiles is None
    tiles = tiles or pick_tiles(q.shape[3], q.dtype, q.device)
    _check_tiles(tiles)
    t = tiles.fwd_tma if tiles.fwd_tma is not None and tma_compatible(q, k, v, out) else tiles.fwd
    if t.warp_specialize and scale == 0:  # the warp-specialised loop masks raw scores: -inf * 0
        t = tiles.fwd
    if default and autotune_enabled(q.device):
        t = _autotuned("fwd", t, q, k, lambda c: _launch_fwd(q, k, v, out, lse, c, causal=causal, scale=scale),
                       causal)
    _launch_fwd(q, k, v, out, lse, t, causal=causal, scale=scale)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor | None,
                       dk: torch.Tensor | None, dv: torch.Tensor | None, *, causal: bool,
                       scale: float, deterministic: bool = False,
                       tiles: AttentionTiles | None = None) -> None:
    """Launch the backward into the given gradient buffers (any strides; dk and dv come together);
    q, do, out, dq are [B, H, TQ, D], k, v, dk, dv [B, H, TK, D].

    dq, dk and dv together: by default one launch of the fused kernel (dQ in an fp32 buffer by
    relaxed atomic adds, then converted), between the delta preprocess (which zeroes that
    buffer) and the convert; the last bits of dq vary run to run. ``deterministic=True``: the
    dK/dV kernel and the dQ kernel, no atomics, bitwise reproducible. dq alone or dk/dv alone:
    the matching atomic-free kernel. Tiles as in :func:`attention_forward`.
    """
    B, H, T, D = q.shape
    if dk is not None and dv is None or dk is None and dv is not None:
        raise ValueError("attention_backward: dk and dv are computed together; give both or neither")
    default = tiles is None
    tiles = tiles or pick_tiles(D, q.dtype, q.device)
    _check_tiles(tiles)
    tune = default and autotune_enabled(q.device)
    atomic = dq is not None and dk is not None and not deterministic
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    dq_acc = torch.empty((B * H, T, D), dtype=torch.float32, device=q.device) if atomic else None
    _launch_preprocess(do, out, delta, dq_acc, tiles.preprocess)
    kw = dict(causal=causal, scale=scale)
    if atomic:
        t = tiles.bwd_tma if tiles.bwd_tma is not None and tma_compatible(q, do) else tiles.bwd

        def run(c):
            _launch_preprocess(do, out, delta, dq_acc, tiles.preprocess)  # re-zero the accumulator
            _launch_bwd(do, q, k, v, dk, dv, dq_acc, lse, delta, c, **kw)

        if tune:
            t = _autotuned("bwd", t, q, k, run, causal)
            run(t)
        else:
            _launch_bwd(do, q, k, v, dk, dv, dq_acc, lse, delta, t, **kw)
        _launch_dq_convert(dq_acc, dq, tiles.preprocess, scale=scale)
        return
    if dk is not None:
        t = tiles.dkdv
        if tune:
            t = _autotuned("dkdv", t, q, k, lambda c: _launch_bwd(do, q, k, v, dk, dv, None, lse, delta, c, **kw),
                           causal)
        _launch_bwd(do, q, k, v, dk, dv, None, lse, delta, t, **kw)
    if dq is not None:
        t = tiles.dq
        if tune:
            t = _autotuned("dq", t, q, k, lambda c: _launch_dq(do, q, k, v, dq, lse, delta, c, **kw), causal)
        _launch_dq(do, q, k, v, dq, lse, delta, t, **kw)


# --------------------------------------------------------------------------------------------
# Opt-in autotuning (LORAFAST_AUTOTUNE=1)
# --------------------------------------------------------------------------------------------
AUTOTUNE_ENV = "LORAFAST_AUTOTUNE"
_TUNED: dict[tuple, Tile] = {}


def autotune_enabled(device: torch.device) -> bool:
    """``LORAFAST_AUTOTUNE=1`` (read at each launch) on a CUDA device outside graph capture."""
    return (device.type == "cuda" and not interpreting()
            and os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")
            and not torch.cuda.is_current_stream_capturing())


def seq_bucket(t: int) -> int:
    """The autotune key of a sequence length: the next power of two, clamped to [64, 16384], so
    that a run with ever-changing T tunes at most 9 buckets per (kernel, head dim, dtype, flags)
    and never recompiles for a new T (T is not specialised)."""
    return min(max(triton.next_power_of_2(t), 64), 16384)


def tile_candidates(kind: str, shipped: Tile) -> list[Tile]:
    """Tiles to try for one kernel: the shipped one first, then variants that keep the
    no-duplication rule (at least 16 rows per warp along the row axis of the chained dots:
    BLOCK_M for fwd / dq, BLOCK_N for the dK/dV kernels) and the kernel's nesting rule."""
    out = [shipped]
    if shipped.tma and shipped.warp_specialize:
        grid = [(128, bn, 4, s, True, True) for bn in (64, 128) for s in (2, 3)]
    elif kind in ("fwd", "dq"):
        grid = [(bm, bn, w, s, shipped.tma, False) for bm in (64, 128) for bn in (32, 64, 128)
                for w in (4, 8) for s in (2, 3) if bm % bn == 0 and bm >= 16 * w]
    else:
        grid = [(bm, bn, w, s, shipped.tma, False) for bn in (64, 128) for bm in (16, 32, 64)
                for w in (4, 8) for s in (1, 2, 3) if bn % bm == 0 and bn >= 16 * w]
    for c in grid:
        t = Tile(*c)
        if t not in out:
            out.append(t)
    return out


def _autotuned(kind: str, shipped: Tile, q: torch.Tensor, k: torch.Tensor, run, causal: bool) -> Tile:
    """The fastest candidate tile for this launch's bucket, timing ``run(tile)`` once per bucket
    (``triton.testing.do_bench``); candidates that fail to compile or launch are skipped."""
    key = (kind, torch.cuda.get_device_capability(q.device), q.dtype, q.shape[3], causal, shipped.tma,
           seq_bucket(q.shape[2]), seq_bucket(k.shape[2]))
    best = _TUNED.get(key)
    if best is None:
        timings = []
        for c in tile_candidates(kind, shipped):
            try:
                timings.append((triton.testing.do_bench(lambda: run(c), warmup=5, rep=25), c))
            except Exception:  # noqa: BLE001 - out of registers / shared memory: not a candidate
                continue
        best = min(timings, key=lambda x: x[0])[1] if timings else shipped
        _TUNED[key] = best
    return best


# --------------------------------------------------------------------------------------------
# Compile gate
# --------------------------------------------------------------------------------------------
def _signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in ("lse_ptr", "delta_ptr", "dq_acc_ptr") else f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_config(name: str, fn, dtype: str, constexprs: dict, tile: Tile, *, needs_mma: bool,
                  archs: tuple[int, ...], exp2: int | None) -> KernelConfig:
    """The gate's view of one launch: unit stride over D (specialised to a constant at launch),
    other strides and pointers divisible by 16, the launch's warps / stages / fp-fusion option."""
    sig = _signature(fn, dtype, constexprs)
    cx = dict(constexprs)
    for n in fn.arg_names:
        if n.startswith("stride_") and n.endswith("d"):  # unit stride: specialised at launch
            sig[n] = "constexpr"
            cx[n] = 1
    aligned = tuple(n for n in fn.arg_names if sig[n] != "constexpr"
                    and (n.endswith("_ptr") or n.startswith("stride_")))
    return KernelConfig(name=name, fn=fn, signature=sig, constexprs=cx, num_warps=tile.num_warps,
                        num_stages=tile.num_stages, aligned=aligned, needs_mma=needs_mma, archs=archs,
                        options={"enable_fp_fusion": FP_FUSION}, exp2_per_iteration=exp2)


def exp2_per_iteration(kind: str, t: Tile, fma_rows: int | None = None) -> int:
    """The exp2 one thread needs per main-loop iteration of a ``kind`` kernel with tile ``t``:
    the scores of the iteration's tile over the threads that share it, plus (forward) one
    rescale ``exp2(m_old - m_new)`` per row the thread holds. On tensor cores a thread holds 2
    rows of each 16-row slab of its warp (BLOCK_M / (8 * warps) rows); the warp-specialised
    forward has two consumers of 4 warps, each with half the rows. ``fma_rows``: the rows a
    thread holds in the CUDA-core (fp32 "ieee") layout."""
    if kind in ("fwd", "fwd_tma"):
        rows, warps = (t.block_m // 2, 4) if t.warp_specialize else (t.block_m, t.num_warps)
        per_row = fma_rows if fma_rows is not None else rows // (8 * warps)
        return rows * t.block_n // (32 * warps) + per_row
    return t.block_m * t.block_n // (32 * t.num_warps)  # backward: lse is known, no rescale


def compile_configs():
    """Every GPU tile configuration the launchers can pick, over representative dtype/flag cases,
    each with the exp2 its main loop needs per thread and iteration (``exp2_per_iteration``).

    Each (kernel, tiles) is listed once per arch that picks it (sm_90 and sm_80 tiles differ in
    places); the Hopper TMA kernels for sm_90 only. The layout assumed is the model's: q/k/v
    views of a fused qkv projection (unit stride over D, which Triton specialises to a constant;
    other strides divisible by 16), output and gradients in [B, T, H, D] memory. The fp16 case
    takes a negative scale (the NEG_SCALE variant of the forward).
    """
    out = []
    kernels = {"fwd": _attn_fwd_kernel, "fwd_tma": _attn_fwd_kernel, "bwd": _attn_bwd_kernel,
               "bwd_tma": _attn_bwd_kernel, "dkdv": _attn_bwd_kernel, "dq": _attn_bwd_dq_kernel}
    # (D, dtype, causal): both head-dim buckets, a padded head dim, both 16-bit dtypes, both flags
    cases = [(128, torch.bfloat16, True), (64, torch.bfloat16, True), (80, torch.float16, False)]
    for D, dtype, causal in cases:
        dt = TL_DTYPE[dtype]
        tag = f"d{D}_{dt}_{'causal' if causal else 'full'}"
        base = dict(HEAD_DIM=D, BLOCK_D=block_d(D), IS_CAUSAL=causal, DOT_PREC="tf32", DOT_F32=False)
        for kind, fn in kernels.items():
            per_arch = {a: getattr(pick_tiles(D, dtype, torch.device("cuda"), arch=a), kind) for a in (90, 80)}
            groups: dict[Tile, list[int]] = {}
            for a, t in per_arch.items():
                if t is not None:
                    groups.setdefault(t, []).append(a)
            for t, archs in groups.items():
                cx = dict(base, BLOCK_M=t.block_m, BLOCK_N=t.block_n)
                if fn is _attn_fwd_kernel:
                    cx.update(NEG_SCALE=dtype == torch.float16, USE_TMA=t.tma, WARP_SPEC=t.warp_specialize)
                elif fn is _attn_bwd_kernel:
                    cx.update(ATOMIC_DQ=kind != "dkdv", USE_TMA=t.tma)
                suffix = "" if len(groups) == 1 else f"_sm{archs[0]}"
                out.append(kernel_config(f"attn_{kind}_{tag}{suffix}", fn, dt, cx, t, needs_mma=True,
                                         archs=tuple(archs), exp2=exp2_per_iteration(kind, t)))
    t = pick_tiles(128, torch.bfloat16, torch.device("cuda"), arch=90).preprocess
    out.append(kernel_config("attn_bwd_pre_d128_bf16", _attn_bwd_preprocess_kernel, "bf16",
                             dict(HEAD_DIM=128, BLOCK_M=t.block_m, BLOCK_D=128, ZERO_DQ=True), t,
                             needs_mma=False, archs=(90, 80), exp2=None))
    out.append(kernel_config("attn_dq_convert_d128_bf16", _attn_bwd_dq_convert_kernel, "bf16",
                             dict(HEAD_DIM=128, BLOCK_M=t.block_m, BLOCK_D=128), t,
                             needs_mma=False, archs=(90, 80), exp2=None))
    # fp32 inputs: exact FMA dots on CUDA cores, no tensor cores by design (needs_mma=False)
    t32 = _GPU_TILES_FP32
    base = dict(HEAD_DIM=128, BLOCK_D=128, IS_CAUSAL=True, DOT_PREC="ieee", DOT_F32=False)
    for kind in ("fwd", "bwd", "dkdv", "dq"):
        t = getattr(t32, kind)
        cx = dict(base, BLOCK_M=t.block_m, BLOCK_N=t.block_n)
        if kind == "fwd":
            cx.update(NEG_SCALE=False, USE_TMA=False, WARP_SPEC=False)
        elif kind != "dq":
            cx.update(ATOMIC_DQ=kind == "bwd", USE_TMA=False)
        out.append(kernel_config(f"attn_{kind}_d128_fp32_causal", kernels[kind], "fp32", cx, t,
                                 needs_mma=False, archs=(90, 80),
                                 exp2=exp2_per_iteration(kind, t, fma_rows=_FP32_FWD_ROWS_PER_THREAD)))
    return out

"""Fused output projection + cross-entropy (training) and + softmax (inference), in Triton.

The logits ``z = h @ W.T + b`` (``h [N, D]``, ``W [V, D]``, ``b [V]``) are the largest tensor of
LM training; these kernels hold one ``[BLOCK_N, BLOCK_V]`` tile of them in registers, and the
dense backward at most ``DZ_CHUNK_ELEMS`` elements of their gradient in memory. Each kernel's
docstring gives its contract (math, shapes, dtypes, what it mutates, preconditions).

* ``_lse_kernel`` (forward): per row, the log-sum-exp of ``z * scale`` over a range of
  vocabulary tiles (online max/sum with ``exp2``, fp32) and the target's logit. One flattened
  (vocabulary tile x D step) loop, so the software pipeline does not drain per tile; the
  vocabulary is split over grid axis 1 when N alone does not fill the GPU.
* ``_ce_dlogits_kernel`` (dense backward, the default): recomputes a logit tile and writes
  ``dz = softmax(z) - onehot(y)`` (unscaled, input dtype) into a chunk buffer; the launcher
  reduces each chunk with two tensor-core GEMMs: ``dh = g * (dz W)``, ``dW = dz^T (g * h)``.
* ``_ce_bwd_kernel`` (filtered backward, ``filter_eps``): recomputes a logit tile over the
  vocabulary sorted by mean logit, skips it when ``|dz| < filter_eps`` everywhere, else adds
  ``g * (dz W)`` into dh and ``dz^T (g * h)`` into dW with relaxed fp32 atomics (Cut
  Cross-Entropy's ``cce_backward``).
* ``_softmax_write_kernel``: second pass of the fused softmax: recomputes a logit tile and
  writes ``softmax(z * scale)`` (or its log) normalised with the LSE of the first pass.

Why two backward paths. Without stored logits, fwd+bwd costs four N·V·D GEMMs (logits in the
forward, recomputed logits, dh, dW); eager PyTorch and Liger pay three. The fused backward adds
``(BLOCK_N + BLOCK_V) * D`` fp32 per tile for ``6 * BLOCK_N * BLOCK_V * D`` FLOPs: one 4-byte
atomic per 384 FLOPs at 128 x 128, i.e. 6.3 TB/s of read-modify-write into L2 at 600 TFLOP/s,
more than the H100/H200 L2 serves for plain loads (about 5.5 TB/s): on random logits it is
atomic-bound. The dense path moves ``3 * N * V`` elements of ``dz`` instead (written once, read by
the two GEMMs; 12.9 GB at N=16k, V=128k in bf16, against about 30 GB of logit passes in eager),
with no atomics but one per column per tile for db, and its GEMMs run at cuBLAS speed. On a
trained model's confident logits most tiles fall below ``filter_eps`` and the fused kernel does
little more than the recompute GEMM. On the benchmark's synthetic peaked logits (eps = 2**-12,
D = 2048) 15% of the 128 x 128 tiles survive at V=50304 (99% with the vocabulary unsorted),
6% at V=131072 (79% unsorted); on random logits 74% and 38%
(``python -m lorafast.bench.linear_ce --survival 2048 50304 2048``, ``--survival 1024 131072
2048``, on CPU): use ``filter_eps`` for trained models only.

Precision. The row weights ``g`` (upstream gradient, 0 on ignored rows) commute with the sum
over the vocabulary, so dh takes unscaled ``dz`` and ``g_n`` multiplies each row's fp32 result:
a row's precision does not depend on the other rows (issue 13, item 3). dW sums over rows, so
``g`` enters the GEMM through the rows of ``h``, relative to ``max|g|`` in fp16/bf16 (about 1 / N
for a mean, ``g`` alone would leave fp16's normal range), and ``max|g|`` multiplies the fp32
result before its one rounding: a row's contribution is rounded relative to the largest one it
is summed with. db comes from fp32 ``dz * g``. Accumulation is fp32 throughout: dh across
vocabulary chunks (an N x D fp32 buffer, rounded at the end into the memory of the scaled copy
of h, dead by then), dW per chunk (dense: one GEMM per chunk, staged in fp32; filtered: fp32
atomics into a ``VOCAB_CHUNK x D`` accumulator), db with relaxed atomics. The dense dh and dW
are deterministic (cuBLAS); db, and everything in the filtered path, sum atomically in a
run-dependent order (differences at the level of fp32 rounding).

Error bound of ``filter_eps``. A skipped tile has ``|dz[n, v]| < eps`` everywhere (before the
row weight). Let ``S_n`` be the entries of row n below eps; the skipped ones are among them, and
``sum_v |dz[n, v]| = 2 (1 - p[n, y_n])``. Hence, against the unfiltered gradients:
``|d dh[n, d]| <= |g_n| * max_v |W[v, d]| * min(eps * |S_n|, 2 (1 - p[n, y_n]))`` and
``|d dW[v, d]| <= eps * sum_n |g_n| |h[n, d]|``; db is exact (never filtered). Cut
Cross-Entropy's "auto" is ``eps = finfo(dtype).eps / 32``: every dropped entry is below 1/32 of
the input dtype's unit roundoff. ``tests/test_linear_ce.py`` checks the bound per element.

Launch. The tile kernels run 1-D grids in grouped order (Triton tutorial 03): GROUP_N row tiles
per column of vocabulary tiles, GROUP_N sized so that their fp32 dh rows take about 16 MiB, a
third of the 50 MiB L2, so that the programs in flight share their dh rows and a few dW rows and
those stay resident while the group sweeps the vocabulary. Grids are checked against CUDA's
limits (x <= 2**31 - 1, y, z <= 65535); the launchers split rows where a 1-D grid would exceed
x. On Hopper the LSE, dense-backward and write kernels read h and W by TMA (no masks: the copy
engine zero-fills out-of-bounds boxes; no proxy fence in the loop); elsewhere, and for strided
inputs, by masked cp.async loads. Targets are never used as addresses: they are only compared
with column indices, so an out-of-range target cannot cause an out-of-bounds access (the op
layer flags such rows).

Lineage: apple/ml-cross-entropy (``cce_lse_forward.py``, ``cce_backward.py``: recomputed tiles,
gradient filter, vocabulary sorted by average logit); linkedin/Liger-Kernel
(``fused_linear_cross_entropy.py``: logit-gradient chunks reduced by GEMMs, fp32 ``addmm``
accumulation); Triton tutorials 03 (tiled matmul, grouped order), 06 (online softmax with exp2)
and 09 (persistent matmul: flattened loops, TMA descriptors). Tested: Triton interpreter on CPU
(fp32, fp16; the TMA path on request); compiled ahead of time for sm_90 and sm_80 by
:mod:`lorafast.compile_gate`; the bf16 and H200 checks are ``cuda``-marked tests.

Tile configs (no GPU was available when they were chosen): BLOCK_N = BLOCK_V = 128 and
BLOCK_D = 64 with 8 warps sit in the range of the configs listed by CCE's ``tl_autotune.py``
and Triton tutorial 03's fp16 matmul configs (128-256 × 128-256 × 32-64, 4-8 warps, 3-4 stages);
num_stages was lowered until every config fit shared memory without spills on sm_80 and sm_90
(``python -m lorafast.compile_gate --filter linear_ce``): 3 for the LSE, dense-backward and
write kernels, 2 for the filtered backward (its two extra dots). fp32 inputs use exact "ieee"
dots on CUDA cores with 64x64x32 tiles (filtered backward 32x32x32 with 3 stages, the largest
without spills): a correctness path, not a fast one (train in bf16). To re-tune on H200: sweep
BLOCK_V in {128, 256}, BLOCK_D in {32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4}
(4 fits with TMA: 128 KiB), and DZ_CHUNK_ELEMS, with ``python -m lorafast.bench.linear_ce``.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ._common import TL_DTYPE, KernelConfig, interpreting

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2): log(x) = log2(x) * LN2


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, h_desc, w_desc, offs_n, offs_v, mask_n, mask_v, n0, v0, stride_hn,
                stride_hd, stride_wv, stride_wd, D, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = h[offs_n] @ W[offs_v].T (+ b[offs_v]), fp32 accumulation; rows of h
    outside ``mask_n`` and of W outside ``mask_v`` read as 0. USE_TMA (Hopper): the tiles come by
    TMA from the descriptors at rows n0 and v0 (= offs_n[0], offs_v[0]; out-of-bounds rows and
    columns are zero-filled by the copy engine); otherwise by masked pointer loads (cp.async)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if USE_TMA:
        for d0 in range(0, D, BLOCK_D):
            h = h_desc.load([n0, d0])
            w = w_desc.load([v0, d0])
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        h_ptrs = h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd
        w_ptrs = w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd
        for d0 in range(0, D, BLOCK_D):
            mask_d = (d0 + offs_d) < D
            h = tl.load(h_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
            h_ptrs += BLOCK_D * stride_hd
            w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0)
        acc += b.to(tl.float32)[None, :]
    return acc


@triton.jit
def _grouped_tile(pid, n_row_tiles, n_col_tiles, group):
    """(row tile, column tile) of program ``pid`` in grouped order (Triton tutorial 03): programs
    walk ``group`` row tiles down one column of tiles before moving to the next column, so the
    programs in flight at once share a few row tiles and a few column tiles (L2 reuse)."""
    per_group = group * n_col_tiles
    first = (pid // per_group) * group
    size = tl.minimum(n_row_tiles - first, group)
    r = pid % per_group
    return first + r % size, r // size


@triton.jit
def _lse_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, zt_ptr,
    # TMA descriptors of h [N, D] and W [V, D] (USE_TMA; else None)
    h_desc, w_desc,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    # sizes
    N, V, D, TILES_PER_SPLIT,
    # runtime scalars
    scale,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial log-sum-exp of scaled logits over one vocabulary split, and the target logit.

    Math: z = h W^T + b; lse[s, n] = log sum_{v in split s} exp(scale * z[n, v]);
          zt[s, n] = z[n, y_n] if y_n lies in split s else 0 (unscaled). Not differentiated here.
    Shapes: h [N, D], W [V, D] (any strides; USE_TMA: unit feature stride, 16-byte row strides),
            b [V], y [N] int64; lse, zt [SPLIT, N] contiguous; grid (cdiv(N, BLOCK_N), SPLIT);
            split s covers tiles [s*TILES_PER_SPLIT, +TILES_PER_SPLIT).
    Dtypes: h, W, b fp32/fp16/bf16 (h and W the same); dot and online max/sum in fp32; out fp32.
    Mutates: writes lse and zt (every row < N of its split); reads everything else.
    Preconditions: every split has >= 1 tile with a column < V; y is only compared, never an address.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_TARGET:
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    # online log-sum-exp in base 2: m2 = running max of z*scale*log2(e), s = sum exp2(. - m2)
    m2 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    scale2 = scale * LOG2E
    v_start = pid_s.to(tl.int64) * TILES_PER_SPLIT * BLOCK_V
    v_end = tl.minimum(v_start + TILES_PER_SPLIT * BLOCK_V, V)
    # One flattened loop over (vocabulary tile, D step): the software pipeline runs across tile
    # boundaries (the loads of the next tile's first D steps are in flight during this tile's
    # epilogue) instead of draining and refilling for every vocabulary tile. fp32 inputs (CUDA-
    # core dots, no async wgmma to overlap) keep the nested loops: flattened, they spill.
    for v0 in tl.range(v_start, v_end, BLOCK_V, flatten=h_ptr.dtype.element_ty != tl.float32):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, h_desc, w_desc, offs_n, offs_v, mask_n, offs_v < V,
                        pid_n * BLOCK_N, tl.cast(v0, tl.int32), stride_hn, stride_hd, stride_wv, stride_wd, D,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, USE_TMA, DOT_PRECISION)
        if HAS_TARGET:
            zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        x2 = tl.where((offs_v < V)[None, :], z * scale2, float("-inf"))
        m_new = tl.maximum(m2, tl.max(x2, axis=1))
        s = s * tl.exp2(m2 - m_new) + tl.sum(tl.exp2(x2 - m_new[:, None]), axis=1)
        m2 = m_new
    lse = (m2 + tl.log2(s)) * LN2  # back to natural log
    tl.store(lse_ptr + pid_s * N + offs_n, lse, mask=mask_n)
    if HAS_TARGET:
        tl.store(zt_ptr + pid_s * N + offs_n, zt, mask=mask_n)


@triton.jit
def _ce_dlogits_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dz_ptr, db_ptr,
    # TMA descriptors of h [N, D] and W [V, D] (USE_TMA; else None)
    h_desc, w_desc,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn,
    # sizes
    N, D, V_START, V_STOP, GROUP_N,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, COMPUTE_DB: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Softmax gradient of one logit tile, written out for the launcher's GEMMs (dense backward).

    Math: z = h W^T + b (recomputed); dz[n, c] = exp(z[n, v] - lse_n) - [y_n == v] with
          v = V_START + c; db[v] += sum_n g_n dz[n, v]. dh = g * (dz W) and dW = dz^T (g * h)
          are the launcher's (tensor-core GEMMs with no atomics).
    Shapes: h [N, D], W [V, D] (any strides; USE_TMA: unit feature stride, 16-byte row strides),
            b [V], y, lse, g [N]; dz [N, V_STOP - V_START] (row stride stride_dzn, unit column
            stride); db [V] fp32; grid
            (cdiv(N, BLOCK_N) * cdiv(V_STOP - V_START, BLOCK_V),), GROUP_N row tiles per column.
    Dtypes: z and the softmax in fp32; dz rounded once to the input dtype, unscaled (entries in
            [-1, 1]: the row weights g are applied by the GEMMs, so a row's precision does not
            depend on the other rows); db from fp32 dz * g, relaxed atomic adds.
    Mutates: writes dz (rows < N, columns < V_STOP - V_START); adds into db; reads the rest.
    Preconditions: lse is the fp32 LSE of z per row; y is only compared, never an address.
    """
    n_cols = V_STOP - V_START
    pid_n, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), GROUP_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = V_START + offs_c.to(tl.int64)
    mask_n = offs_n < N
    mask_c = offs_c < n_cols
    z = _logit_tile(h_ptr, w_ptr, b_ptr, h_desc, w_desc, offs_n, offs_v, mask_n, mask_c, pid_n * BLOCK_N,
                    V_START + pid_c * BLOCK_V, stride_hn, stride_hd, stride_wv, stride_wd, D, BLOCK_N, BLOCK_V,
                    BLOCK_D, HAS_BIAS, USE_TMA, DOT_PRECISION)
    lse2 = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0) * LOG2E
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    # p = exp2(z log2 e - lse log2 e): one FMA and one MUFU.EX2 per element
    dz = tl.exp2(z * LOG2E - lse2[:, None]) - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    if COMPUTE_DB:
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
        tl.atomic_add(db_ptr + offs_v, tl.sum(tl.where(mask_n[:, None], dz * g[:, None], 0.0), axis=0),
                      mask=mask_c, sem="relaxed")
    dz_ptrs = dz_ptr + offs_n[:, None] * stride_dzn + offs_c[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _ce_bwd_tile_dots(h_ptr, w_ptr, dh_ptr, dw_ptr, dz, g, offs_n, offs_v, offs_c, mask_n, mask_v,
                      stride_hn, stride_hd, stride_wv, stride_wd, D, BLOCK_D: tl.constexpr,
                      COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dh[offs_n] += g * (dz W[offs_v]); dW accumulator[offs_c] += dz^T (g * h[offs_n]) (relaxed atomics)."""
    offs_d = tl.arange(0, BLOCK_D)
    # dh_n = g_n * sum_v dz[n, v] W[v]: the row weight commutes with the sum over the vocabulary,
    # so the dot takes dz unscaled (entries in [-1, 1]) and g_n multiplies its fp32 result. A
    # row's precision then does not depend on the other rows of the tile (folding g in before
    # the cast would push rows with a small g into fp16 subnormals: issue 13, item 3).
    dzc = dz.to(h_ptr.dtype.element_ty)
    if COMPUTE_DH:
        w_ptrs = w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd
        dh_ptrs = dh_ptr + offs_n[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BLOCK_D):
            mask_d = (d0 + offs_d) < D
            w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            dh = tl.dot(dzc, w, input_precision=DOT_PRECISION) * g[:, None]  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(dh_ptrs, dh, mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
            w_ptrs += BLOCK_D * stride_wd
            dh_ptrs += BLOCK_D
    if COMPUTE_DW:
        # dW_v = sum_n g_n dz[n, v] h_n sums over rows, so g cannot leave the sum. In fp16/bf16 it
        # scales the rows of h (not the [BLOCK_N, BLOCK_V] dz operand: a second one spills on
        # sm_80), relative to the tile's largest |g|: g itself, about 1 / N for a mean, would
        # underflow fp16; a row's contribution is rounded relative to the largest contribution
        # it is summed with. max|g| multiplies the fp32 result.
        if h_ptr.dtype.element_ty == tl.float32:
            dzc = dz * g[:, None]
            g_scale = 1.0
        else:
            g_scale = tl.max(tl.abs(g), axis=0)
            g_scale = tl.where(g_scale > 0, g_scale, 1.0)
        g_rel = (g / g_scale)[:, None]
        h_ptrs = h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd
        dw_ptrs = dw_ptr + offs_c[:, None] * D + offs_d[None, :]
        for d0 in range(0, D, BLOCK_D):
            mask_d = (d0 + offs_d) < D
            h = tl.load(h_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if h_ptr.dtype.element_ty != tl.float32:
                h = (h.to(tl.float32) * g_rel).to(h_ptr.dtype.element_ty)
            dw = tl.dot(tl.trans(dzc), h, input_precision=DOT_PRECISION) * g_scale  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(dw_ptrs, dw, mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")
            h_ptrs += BLOCK_D * stride_hd
            dw_ptrs += BLOCK_D


@triton.jit
def _ce_bwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, order_ptr, dh_ptr, dw_ptr, db_ptr,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd,
    # sizes
    N, D, V_START, V_STOP, GROUP_N,
    # runtime scalars
    filter_eps,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr, FILTER: tl.constexpr, COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Gradients of loss_n = g_n * (lse_n - z[n, y_n]) for one tile, fused (filtered backward).

    Math: dz = exp(z - lse) - onehot(y); dh += g * (dz W); dW += dz^T (g * h); db += dz^T g.
          FILTER: a tile whose |dz| < filter_eps everywhere adds nothing to dh and dW (Cut
          Cross-Entropy's gradient filter; db stays exact).
    Shapes: h [N, D], W [V, D] (any strides), b [V], y, lse, g [N]; this launch covers the
            vocabulary positions [V_START, V_STOP): row order[p] of W with HAS_ORDER (vocabulary
            sorted by mean logit), row p otherwise; dh [N, D] and the chunk's dW accumulator
            [V_STOP - V_START, D] (by position) contiguous fp32, db [V] fp32 (by row);
            grid (cdiv(N, BLOCK_N) * cdiv(V_STOP - V_START, BLOCK_V),), GROUP_N row tiles per column.
    Dtypes: recomputed z and dz in fp32; both dots take dz cast to the input dtype: g_n
            multiplies the rows of the dh dot's fp32 result; the dW dot takes h * g / max|g|
            (max over the tile; fp32 inputs: dz * g) and max|g| multiplies its result; fp32
            accumulation; db from fp32 dz * g. dh, dW, db accumulate in fp32 with relaxed atomic
            adds (no fence: nothing in the kernel reads what another program adds).
    Mutates: adds into dh, dW, db (zero-initialised by the launcher); reads everything else.
    Preconditions: lse is the fp32 LSE of z per row; g = 0 for ignored rows; y never an address;
            order a permutation of [0, V).
    """
    n_cols = V_STOP - V_START
    pid_n, pid_c = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), GROUP_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_c < n_cols
    if HAS_ORDER:
        offs_v = tl.load(order_ptr + V_START + offs_c, mask=mask_v, other=0).to(tl.int64)
    else:
        offs_v = V_START + offs_c
    # rows of W gathered through the order: masked pointer loads (TMA takes contiguous boxes)
    z = _logit_tile(h_ptr, w_ptr, b_ptr, None, None, offs_n, offs_v, mask_n, mask_v, 0, 0, stride_hn, stride_hd,
                    stride_wv, stride_wd, D, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, False, DOT_PRECISION)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    # softmax recomputed from the saved LSE: p = exp2((z - lse) * log2 e)
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    dz = p - tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    # rows with g = 0 (ignored targets) are zero, so that they never keep a tile from the filter
    dz = tl.where((mask_n & (g != 0))[:, None] & mask_v[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz * g[:, None], axis=0), mask=mask_v, sem="relaxed")
    if FILTER:
        if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps:
            _ce_bwd_tile_dots(h_ptr, w_ptr, dh_ptr, dw_ptr, dz, g, offs_n, offs_v, offs_c, mask_n, mask_v,
                              stride_hn, stride_hd, stride_wv, stride_wd, D, BLOCK_D, COMPUTE_DH, COMPUTE_DW,
                              DOT_PRECISION)
    else:
        _ce_bwd_tile_dots(h_ptr, w_ptr, dh_ptr, dw_ptr, dz, g, offs_n, offs_v, offs_c, mask_n, mask_v,
                          stride_hn, stride_hd, stride_wv, stride_wd, D, BLOCK_D, COMPUTE_DH, COMPUTE_DW,
                          DOT_PRECISION)


@triton.jit
def _softmax_write_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, lse_ptr, out_ptr,
    # TMA descriptors of h [N, D] and W [V, D] (USE_TMA; else None)
    h_desc, w_desc,
    # strides
    stride_hn, stride_hd, stride_wv, stride_wd, stride_on, stride_ov,
    # sizes
    N, V, D, GROUP_N,
    # runtime scalars
    scale,
    # constexprs
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_LOG: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Second pass of the fused softmax: recompute one logit tile and write it normalised.

    Math: out = exp(scale * z - lse) (IS_LOG: scale * z - lse), z = h W^T + b. No gradient.
    Shapes: h [N, D], W [V, D] (USE_TMA: unit feature stride, 16-byte row strides), b [V], lse [N]
            (LSE of scale * z), out [N, V] (any strides);
            grid (cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V),), GROUP_N row tiles per column of tiles
            (one axis: a vocabulary of more than 65535 tiles does not meet grid axis 1's limit).
    Dtypes: z, out computed in fp32, stored in out's dtype.
    Mutates: writes its tile of out; reads everything else.
    Preconditions: lse from _lse_kernel with the same scale (all splits combined).
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    z = _logit_tile(h_ptr, w_ptr, b_ptr, h_desc, w_desc, offs_n, offs_v, mask_n, mask_v, pid_n * BLOCK_N,
                    pid_v * BLOCK_V, stride_hn, stride_hd, stride_wv, stride_wd, D, BLOCK_N, BLOCK_V, BLOCK_D,
                    HAS_BIAS, USE_TMA, DOT_PRECISION)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    if IS_LOG:
        out = z * scale - lse[:, None]
    else:
        out = tl.exp2((z * scale - lse[:, None]) * LOG2E)
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_v[None, :] * stride_ov
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileConfig:
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


# One config per (kernel, dtype class). fp32 inputs use "ieee" dots (no TF32), so smaller tiles.
_CONFIGS = {
    ("lse", "half"): TileConfig(128, 128, 64, 8, 3),
    ("bwd", "half"): TileConfig(128, 128, 64, 8, 2),
    ("dlogits", "half"): TileConfig(128, 128, 64, 8, 3),
    ("write", "half"): TileConfig(128, 128, 64, 8, 3),
    ("lse", "fp32"): TileConfig(64, 64, 32, 4, 2),
    ("bwd", "fp32"): TileConfig(32, 32, 32, 4, 3),
    ("dlogits", "fp32"): TileConfig(64, 64, 32, 4, 2),
    ("write", "fp32"): TileConfig(64, 64, 32, 4, 2),
}


def _config(kind: str, dtype: torch.dtype, device: torch.device, N: int, D: int) -> TileConfig:
    if device.type != "cuda":
        # Triton interpreter (CPU): cost is per program and per loop step, not per element,
        # so take wide vocabulary tiles and rows/features sized to the problem.
        return TileConfig(min(64, max(16, triton.next_power_of_2(N))), 256,
                          min(64, max(16, triton.next_power_of_2(D))), 1, 1)
    return _CONFIGS[(kind, "fp32" if dtype == torch.float32 else "half")]


# CUDA launch limits: grid x up to 2**31 - 1, y and z up to 65535.
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def _check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    if grid[0] > MAX_GRID_X or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(f"linear_ce: launch grid {grid} exceeds CUDA's limits (x <= {MAX_GRID_X}, "
                         f"y, z <= {MAX_GRID_YZ})")
    return grid


# TMA loads on Hopper for the kernels that read h and W in contiguous boxes (LSE, dense
# backward, softmax write). The interpreter runs the TMA path only when a test asks for it.
TMA_IN_INTERPRETER = False


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Whether h and W can be read by TMA: Hopper or newer (or the interpreter with
    TMA_IN_INTERPRETER), fp16/bf16, unit feature stride, 16-byte aligned base and row stride."""
    if TensorDescriptor is None:
        return False
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t0.is_cuda:
        if interpreting() or torch.cuda.get_device_capability(t0.device)[0] < 9:
            return False
    elif not (interpreting() and TMA_IN_INTERPRETER):
        return False
    return all(t.dim() == 2 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
               and t.data_ptr() % 16 == 0 for t in tensors)


def _descs(use_tma: bool, h: torch.Tensor, weight: torch.Tensor, cfg: TileConfig):
    """(h_desc, w_desc): TMA descriptors of h [rows, D] and W [V, D] in [BLOCK_N | BLOCK_V, BLOCK_D]
    boxes, or (None, None) for the pointer path."""
    if not use_tma:
        return None, None
    return (TensorDescriptor(h, list(h.shape), list(h.stride()), [cfg.BLOCK_N, cfg.BLOCK_D]),
            TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [cfg.BLOCK_V, cfg.BLOCK_D]))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _lse_grid(N: int, V: int, cfg: TileConfig, n_sms: int) -> tuple[tuple[int, int], int]:
    """((row blocks, SPLIT), TILES_PER_SPLIT) of the LSE kernel: the vocabulary is split (axis 1)
    until the grid fills ~2 waves of ``n_sms`` SMs (0: the interpreter, one split); SPLIT <=
    2 * n_sms, far below axis 1's 65535, and row blocks on axis 0 (limit 2**31 - 1)."""
    n_blocks, n_tiles = triton.cdiv(N, cfg.BLOCK_N), triton.cdiv(V, cfg.BLOCK_V)
    if n_sms <= 0:
        return _check_grid((n_blocks, 1)), n_tiles  # interpreter: fewer programs run faster
    want = max(1, triton.cdiv(2 * n_sms, n_blocks))
    per = triton.cdiv(n_tiles, min(want, n_tiles))
    return _check_grid((n_blocks, triton.cdiv(n_tiles, per))), per


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------
# Launchers (inputs validated by lorafast.ops._linear_ce; nothing here checks them again)
# ----------------------------------------------------------------------------------------------
def lse_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor | None, scale: float = 1.0):
    """Per-row LSE of ``scale * (h @ W.T + b)`` (fp32 [N]) and the target logit (fp32 [N] or None)."""
    N, D = h.shape
    V = weight.shape[0]
    cfg = _config("lse", h.dtype, h.device, N, D)
    grid, per = _lse_grid(N, V, cfg, _device_sms(h.device))
    split = grid[1]
    lse = torch.empty((split, N), device=h.device, dtype=torch.float32)
    zt = torch.empty((split, N), device=h.device, dtype=torch.float32) if targets is not None else lse
    use_tma = _use_tma(h, weight)
    h_desc, w_desc = _descs(use_tma, h, weight, cfg)
    _lse_kernel[grid](
        h_ptr=h, w_ptr=weight, b_ptr=bias if bias is not None else h,
        tgt_ptr=targets if targets is not None else lse, lse_ptr=lse, zt_ptr=zt, h_desc=h_desc, w_desc=w_desc,
        stride_hn=h.stride(0), stride_hd=h.stride(1), stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        N=N, V=V, D=D, TILES_PER_SPLIT=per, scale=float(scale),
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D,
        HAS_BIAS=bias is not None, HAS_TARGET=targets is not None, USE_TMA=use_tma, DOT_PRECISION=_precision(h.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split == 1:
        return lse[0], (zt[0] if targets is not None else None)
    return torch.logsumexp(lse, dim=0), (zt.sum(0) if targets is not None else None)


# Grouped launch order of the backward kernels: the programs in flight work on GROUP_N row
# tiles and the few vocabulary tiles those sweep together. GROUP_N row tiles of fp32 dh
# (GROUP_N * BLOCK_N * D * 4 bytes) are kept to about 16 MiB, a third of the H100/H200 L2
# (50 MiB), so that they stay resident while the group sweeps the vocabulary: in the fused
# backward the dh buffer then crosses HBM about once and each dW row once per group of rows,
# instead of dh once per vocabulary tile; in the dense one the group's rows of h are read from
# HBM once per vocabulary chunk.
L2_GROUP_BYTES = 16 << 20


def _group_rows(block_n: int, D: int) -> int:
    return max(1, min(64, L2_GROUP_BYTES // (block_n * D * 4)))


def _tile_grid(n_rows: int, n_cols: int, cfg: TileConfig) -> tuple[int]:
    """1-D grid over the [n_rows, n_cols] tiles; raises if it exceeds CUDA's x limit."""
    return _check_grid((triton.cdiv(n_rows, cfg.BLOCK_N) * triton.cdiv(n_cols, cfg.BLOCK_V),))


def _row_slices(N: int, n_col_tiles: int, block_n: int) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) whose 1-D tile grids (row tiles x ``n_col_tiles``) fit MAX_GRID_X."""
    rows = max(1, MAX_GRID_X // max(n_col_tiles, 1)) * block_n
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]


# Dense backward: softmax-gradient tiles are written to a buffer of at most DZ_CHUNK_ELEMS
# elements (128 MiB in bf16) and reduced by tensor-core GEMMs, vocabulary chunk by chunk (and
# row slice by row slice when N alone exceeds it). Chunks are at most 1/8 of the vocabulary, so
# the buffer stays under 1/8 of the logits eager PyTorch materialises, and at least
# MIN_DZ_COLS wide (the K of the dh GEMM). The chunk's dW rows are staged in fp32 (DW_STAGE_ELEMS
# bounds that: 32 MiB) to apply the gradient scale before the one rounding to the output dtype.
DZ_CHUNK_ELEMS = 1 << 26
MIN_DZ_COLS = 1024
DW_STAGE_ELEMS = 1 << 23


def _dz_chunking(N: int, V: int, D: int, block_v: int) -> tuple[int, int]:
    """(rows per slice, vocabulary columns per chunk) of the dense backward's dz buffer."""
    cols = min(DZ_CHUNK_ELEMS // max(N, 1), triton.cdiv(V, 8), max(block_v, DW_STAGE_ELEMS // D))
    cols = min(triton.cdiv(max(cols, MIN_DZ_COLS, 1), block_v) * block_v, V)
    rows = max(1, min(N, DZ_CHUNK_ELEMS // cols))
    return rows, cols


def _addmm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float) -> None:
    """out = beta * out + a @ b, accumulated and stored in fp32 (out is fp32; a, b the input dtype)."""
    if a.dtype == torch.float32:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif out.is_cuda:
        # cuBLAS with fp16/bf16 operands and fp32 C/D (torch >= 2.8: addmm's out_dtype)
        torch.addmm(out, a, b, beta=beta, out_dtype=torch.float32, out=out)
    else:  # CPU (the interpreter's tests): fp16/bf16 products are exact in fp32
        out.addmm_(a.float(), b.float(), beta=beta)


def _ce_backward_dense(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db):
    N, D = h.shape
    V = weight.shape[0]
    dt, dev = h.dtype, h.device
    cfg = _config("dlogits", dt, dev, N, D)
    db = torch.zeros((V,), device=dev, dtype=torch.float32) if need_db else None
    dh32 = torch.zeros((N, D), device=dev, dtype=torch.float32) if need_dh else None
    dw = hg = None
    if need_dw:
        dw = torch.empty((V, D), device=dev, dtype=dt)
        # dW = dz^T (g * h): the rows of h carry their weight into the GEMM, relative to max|g|
        # in fp16/bf16 (g alone, about 1 / N for a mean, would leave fp16's normal range);
        # max|g| multiplies the fp32 result before its one rounding. A device scalar: no sync.
        gmax = g.abs().amax()
        gmax = torch.where(gmax > 0, gmax, torch.ones_like(gmax))
        hg = torch.empty_like(h, memory_format=torch.contiguous_format)
        torch.mul(h, (g if dt == torch.float32 else g / gmax)[:, None], out=hg)  # fp32 math, one rounding
    rows, cols = _dz_chunking(N, V, D, cfg.BLOCK_V)
    use_tma = _use_tma(h, weight)
    buf = torch.empty((rows * cols,), device=dev, dtype=dt)
    dw_acc = torch.empty((cols * D,), device=dev, dtype=torch.float32) if need_dw and dt != torch.float32 else None
    dummy = lse
    for v0 in range(0, V, cols):
        vc = min(cols, V - v0)
        w_chunk = weight[v0:v0 + vc]
        acc = None
        if need_dw:
            acc = dw_acc[:vc * D].view(vc, D) if dw_acc is not None else dw[v0:v0 + vc]
        for r0 in range(0, N, rows):
            nr = min(rows, N - r0)
            dz = buf[:nr * vc].view(nr, vc)
            h_desc, w_desc = _descs(use_tma, h[r0:r0 + nr], weight, cfg)
            _ce_dlogits_kernel[_tile_grid(nr, vc, cfg)](
                h_ptr=h[r0:r0 + nr], w_ptr=weight, b_ptr=bias if bias is not None else h,
                tgt_ptr=targets[r0:r0 + nr], lse_ptr=lse[r0:r0 + nr], g_ptr=g[r0:r0 + nr], dz_ptr=dz,
                db_ptr=db if db is not None else dummy, h_desc=h_desc, w_desc=w_desc,
                stride_hn=h.stride(0), stride_hd=h.stride(1), stride_wv=weight.stride(0),
                stride_wd=weight.stride(1), stride_dzn=dz.stride(0),
                N=nr, D=D, V_START=v0, V_STOP=v0 + vc, GROUP_N=_group_rows(cfg.BLOCK_N, D),
                BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D, HAS_BIAS=bias is not None,
                COMPUTE_DB=need_db, USE_TMA=use_tma, DOT_PRECISION=_precision(dt), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
            if need_dh:  # dh rows += dz W_chunk, fp32 accumulation across vocabulary chunks
                _addmm_f32(dh32[r0:r0 + nr], dz, w_chunk, beta=1.0)
            if need_dw:  # dW chunk (+)= dz^T (g * h) over the row slices
                _addmm_f32(acc, dz.t(), hg[r0:r0 + nr], beta=0.0 if r0 == 0 else 1.0)
        if need_dw and dw_acc is not None:
            torch.mul(acc, gmax, out=dw[v0:v0 + vc])  # the chunk's one rounding to the output dtype
    del buf, dw_acc
    dh = None
    if need_dh:
        # dh = g * (dz W): the row weights commute with the sum over the vocabulary. The result
        # is rounded into hg's memory (same shape and dtype, no longer needed), so the cast adds
        # no N x D buffer beside the fp32 accumulator.
        if dt == torch.float32:
            dh = dh32.mul_(g[:, None])
        elif hg is not None:
            dh = torch.mul(dh32, g[:, None], out=hg)
        else:
            dh = (dh32 * g[:, None]).to(dt)
    return dh, dw, db


# Filtered backward: rows of W per launch. dW accumulates in fp32 (bf16 accumulation across row
# blocks hurts convergence at large vocabularies), but only for one vocabulary chunk at a time,
# which is then rounded into the output: the fp32 accumulator is VOCAB_CHUNK x D (8192 x 4096 x
# 4 B = 128 MiB) instead of V x D.
VOCAB_CHUNK = 8192


def _vocab_order(h, weight, bias, g):
    """Vocabulary rows sorted by decreasing mean logit over the rows that carry a gradient
    (weights |g|): mean_n |g_n| z[n, v] / sum |g| = W_v . h_bar + b_v with h_bar the |g|-weighted
    mean of h. Rows of large softmax probability then share vocabulary tiles and the other tiles
    are skipped by the filter (Cut Cross-Entropy sorts by the average logit). One GEMV over W."""
    wts = g.abs()
    wts = (wts / wts.sum().clamp_min(torch.finfo(torch.float32).tiny)).to(h.dtype)
    if h.is_cuda:
        h_bar = torch.mv(h.t(), wts)
        mean_logit = torch.mv(weight, h_bar).float()
    else:
        mean_logit = torch.mv(weight.float(), torch.mv(h.t().float(), wts.float()))
    if bias is not None:
        mean_logit = mean_logit + bias.float()
    return torch.argsort(mean_logit, descending=True)


def _ce_backward_filtered(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db, filter_eps):
    N, D = h.shape
    V = weight.shape[0]
    dt, dev = h.dtype, h.device
    cfg = _config("bwd", dt, dev, N, D)
    order = _vocab_order(h, weight, bias, g)
    dh32 = torch.zeros((N, D), device=dev, dtype=torch.float32) if need_dh else None
    dw = torch.empty((V, D), device=dev, dtype=dt) if need_dw else None
    db = torch.zeros((V,), device=dev, dtype=torch.float32) if need_db else None
    chunk = min(V, VOCAB_CHUNK)
    dw_acc = torch.empty((chunk, D), device=dev, dtype=torch.float32) if need_dw else None
    dummy = lse
    for v0 in range(0, V, chunk):
        vc = min(chunk, V - v0)
        acc = dw_acc[:vc].zero_() if need_dw else None
        for r0, r1 in _row_slices(N, triton.cdiv(vc, cfg.BLOCK_V), cfg.BLOCK_N):
            _ce_bwd_kernel[_tile_grid(r1 - r0, vc, cfg)](
                h_ptr=h[r0:r1], w_ptr=weight, b_ptr=bias if bias is not None else h, tgt_ptr=targets[r0:r1],
                lse_ptr=lse[r0:r1], g_ptr=g[r0:r1], order_ptr=order,
                dh_ptr=dh32[r0:r1] if dh32 is not None else dummy, dw_ptr=acc if acc is not None else dummy,
                db_ptr=db if db is not None else dummy, stride_hn=h.stride(0), stride_hd=h.stride(1),
                stride_wv=weight.stride(0), stride_wd=weight.stride(1), N=r1 - r0, D=D, V_START=v0,
                V_STOP=v0 + vc, GROUP_N=_group_rows(cfg.BLOCK_N, D), filter_eps=float(filter_eps),
                BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D, HAS_BIAS=bias is not None,
                HAS_ORDER=True, FILTER=True, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                DOT_PRECISION=_precision(dt), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if need_dw:  # round this chunk once into the output dtype, at its vocabulary rows
            dw.index_copy_(0, order[v0:v0 + vc], acc.to(dt))
    # The fp32 dW accumulator is released before dh is rounded: the cast copy (N * D * 2 B in
    # fp16/bf16) takes no more than the accumulator it follows when N <= 2 * VOCAB_CHUNK.
    del dw_acc
    dh = dh32.to(dt) if need_dh else None
    return dh, dw, db


def ce_backward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                lse: torch.Tensor, grad_rows: torch.Tensor, need_dh: bool, need_dw: bool, need_db: bool,
                filter_eps: float | None = None):
    """(dh [N, D] | None, dW [V, D] | None in the input dtype, db fp32 [V] | None) for
    loss_n = g_n (lse_n - z[n, y_n]), g = ``grad_rows`` (0 on ignored rows); no host sync.

    ``filter_eps`` None: dense backward (softmax-gradient tiles written per vocabulary chunk and
    reduced by GEMMs without atomics, exact up to rounding). A float: the fused filtered
    backward, vocabulary sorted by mean logit, tiles whose |softmax - onehot| < filter_eps
    everywhere skipped for dh and dW (error bound in the module docstring); db stays exact.
    """
    need_db = need_db and bias is not None
    if not (need_dh or need_dw or need_db):
        return None, None, None
    if filter_eps is None:
        return _ce_backward_dense(h, weight, bias, targets, lse, grad_rows, need_dh, need_dw, need_db)
    return _ce_backward_filtered(h, weight, bias, targets, lse, grad_rows, need_dh, need_dw, need_db, filter_eps)


def softmax_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(scale * (h @ W.T + b)) (or log_softmax) as a new [N, V] tensor of ``out_dtype``."""
    N, D = h.shape
    V = weight.shape[0]
    lse, _ = lse_forward(h, weight, bias, None, scale)
    out = torch.empty((N, V), device=h.device, dtype=out_dtype)
    cfg = _config("write", h.dtype, h.device, N, D)
    use_tma = _use_tma(h, weight)
    for r0, r1 in _row_slices(N, triton.cdiv(V, cfg.BLOCK_V), cfg.BLOCK_N):
        h_desc, w_desc = _descs(use_tma, h[r0:r1], weight, cfg)
        _softmax_write_kernel[_tile_grid(r1 - r0, V, cfg)](
            h_ptr=h[r0:r1], w_ptr=weight, b_ptr=bias if bias is not None else h, lse_ptr=lse[r0:r1],
            out_ptr=out[r0:r1], h_desc=h_desc, w_desc=w_desc, stride_hn=h.stride(0), stride_hd=h.stride(1), stride_wv=weight.stride(0),
            stride_wd=weight.stride(1), stride_on=out.stride(0), stride_ov=out.stride(1), N=r1 - r0, V=V, D=D,
            GROUP_N=_group_rows(cfg.BLOCK_N, D), scale=float(scale), BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V,
            BLOCK_D=cfg.BLOCK_D, HAS_BIAS=bias is not None, IS_LOG=log, USE_TMA=use_tma,
            DOT_PRECISION=_precision(h.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# ----------------------------------------------------------------------------------------------
# Compile gate
# ----------------------------------------------------------------------------------------------
_PTR_TYPES = {"tgt_ptr": "*i64", "order_ptr": "*i64", "lse_ptr": "*fp32", "zt_ptr": "*fp32", "g_ptr": "*fp32",
              "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32"}
_UNIT_STRIDES = ("stride_hd", "stride_wd", "stride_ov")  # 1 for contiguous rows: Triton specialises it
_FLOAT_ARGS = ("scale", "filter_eps")


def _gate_config(name, fn, dt, cfg, constexprs, **kw) -> KernelConfig:
    """A KernelConfig for ``fn`` as the launchers call it with contiguous-row inputs of dtype ``dt``:
    pointers of the input dtype unless listed in _PTR_TYPES, unit feature strides, other ints i32
    and 16-divisible where the launcher's shapes make them so (row strides, D, V_START)."""
    t = TL_DTYPE[dt]
    ce = {**{k: 1 for k in _UNIT_STRIDES if k in fn.arg_names}, "BLOCK_N": cfg.BLOCK_N, "BLOCK_V": cfg.BLOCK_V,
          "BLOCK_D": cfg.BLOCK_D, "DOT_PRECISION": _precision(dt), **constexprs}
    tma = ce.get("USE_TMA", False)
    if "h_desc" in fn.arg_names and not tma:
        ce.update(h_desc=None, w_desc=None)
    sig = {}
    for a in fn.arg_names:
        if a in ce:
            sig[a] = "constexpr"
        elif a == "h_desc":
            sig[a] = f"tensordesc<{t}[{cfg.BLOCK_N}, {cfg.BLOCK_D}]>"
        elif a == "w_desc":
            sig[a] = f"tensordesc<{t}[{cfg.BLOCK_V}, {cfg.BLOCK_D}]>"
        elif a.endswith("_ptr"):
            sig[a] = _PTR_TYPES.get(a, f"*{t}")
        else:
            sig[a] = "fp32" if a in _FLOAT_ARGS else "i32"
    aligned = tuple(a for a in fn.arg_names if sig[a] != "constexpr" and (
        a.endswith("_ptr") or a in ("stride_hn", "stride_wv", "stride_on", "stride_dzn", "D", "V_START")))
    return KernelConfig(name=name, fn=fn, signature=sig, constexprs=ce, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, aligned=aligned, needs_mma=dt != torch.float32, **kw)


def _exp2_per_iteration(cfg: TileConfig, dt: torch.dtype, online: bool) -> int:
    """exp2 (SASS MUFU.EX2) one thread needs per tile: the tile's elements over the threads,
    plus, for the online LSE, one rescale exp2(m_old - m_new) per row the thread holds. Rows per
    thread: the wgmma / mma.sync accumulator gives a thread 2 rows of each 16-row block, warps
    stacked along the rows; the fp32 (FMA) blocked layout gives a thread 4 consecutive columns,
    BLOCK_V / 4 threads of a warp along a row."""
    threads = 32 * cfg.num_warps
    need = cfg.BLOCK_N * cfg.BLOCK_V // threads
    if online:
        if dt != torch.float32:
            need += 2 * cfg.BLOCK_N // (16 * min(cfg.num_warps, cfg.BLOCK_N // 16))
        else:
            need += cfg.BLOCK_N // ((32 // min(32, cfg.BLOCK_V // 4)) * cfg.num_warps)
    return need


def compile_configs():
    """The configurations the launchers ship on CUDA: every kernel × tile config × flag path.

    LSE (with / without target), dense backward (softmax-gradient tiles), filtered backward
    (fused, sorted vocabulary) and softmax write (prob / log): bf16 with and without bias, fp16
    with bias (same code, other element type), and the fp32 tiles. The LSE, dense backward and
    write kernels read h and W by TMA on sm_90 (``_tma`` entries, sm_90 only) and by cp.async
    pointer loads on sm_80 and, on sm_90, for inputs TMA cannot take (strided rows; the bf16
    with-bias build stands for those). fp32 inputs run "ieee" dots on CUDA cores by design
    (TF32 would lose the fp32 accuracy; "tf32x3" spilled on sm_80 at 64x64), listed with
    needs_mma=False so the gate still checks their registers and shared memory.
    """
    out = []

    def add(name, fn, dt, c, flags, exp2, tma_capable):
        if tma_capable and dt != torch.float32:
            out.append(_gate_config(f"{name}_tma", fn, dt, c, {**flags, "USE_TMA": True}, archs=(90,),
                                    exp2_per_iteration=exp2))
            archs = (90, 80) if name.endswith("bf16_bias") else (80,)
            out.append(_gate_config(name, fn, dt, c, {**flags, "USE_TMA": False}, archs=archs, exp2_per_iteration=exp2))
        else:
            flags = {**flags, "USE_TMA": False} if "USE_TMA" in fn.arg_names else flags
            out.append(_gate_config(name, fn, dt, c, flags, exp2_per_iteration=exp2))

    for dt in (torch.float16, torch.bfloat16, torch.float32):
        t = TL_DTYPE[dt]
        cls = "fp32" if dt == torch.float32 else "half"
        for has_bias in ((True, False) if dt == torch.bfloat16 else (True,)):
            sfx = f"{t}_{'bias' if has_bias else 'nobias'}"
            for has_tgt in ((True, False) if dt == torch.bfloat16 and has_bias else (True,)):
                c = _CONFIGS[("lse", cls)]
                add(f"linear_ce_lse_{sfx}{'' if has_tgt else '_notarget'}", _lse_kernel, dt, c,
                    {"HAS_BIAS": has_bias, "HAS_TARGET": has_tgt}, _exp2_per_iteration(c, dt, online=True),
                    tma_capable=True)
            c = _CONFIGS[("dlogits", cls)]
            add(f"linear_ce_dlogits_{sfx}", _ce_dlogits_kernel, dt, c, {"HAS_BIAS": has_bias, "COMPUTE_DB": has_bias},
                _exp2_per_iteration(c, dt, online=False), tma_capable=True)
            c = _CONFIGS[("bwd", cls)]
            add(f"linear_ce_bwd_filtered_{sfx}", _ce_bwd_kernel, dt, c,
                {"HAS_BIAS": has_bias, "HAS_ORDER": True, "FILTER": True, "COMPUTE_DH": True, "COMPUTE_DW": True,
                 "COMPUTE_DB": has_bias}, _exp2_per_iteration(c, dt, online=False), tma_capable=False)
        if dt == torch.float16:
            continue  # the write kernel's fp16 build differs from bf16 only in element type
        for is_log in ((False, True) if dt != torch.float32 else (False,)):
            c = _CONFIGS[("write", cls)]
            add(f"linear_ce_softmax_write_{t}{'_log' if is_log else ''}", _softmax_write_kernel, dt, c,
                {"HAS_BIAS": True, "IS_LOG": is_log}, 0 if is_log else _exp2_per_iteration(c, dt, online=False),
                tma_capable=True)
    return out

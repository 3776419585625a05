"""One-launch in-place re-randomisation of a list of tensors with counter-based Philox4x32.

The values are those of the PyTorch reference :mod:`lorafast.philox` (read its docstring: key from
(seed, step), counter ``(g mod 2^32, g >> 32, stream id, 0)`` for the group ``g = e // 4`` of the
global element index ``e``, element ``e`` takes word ``e % 4``, uniforms from the top 24 bits,
Box-Muller on word pairs) and of the laws of :mod:`lorafast.init_laws` (``value = scale * base +
shift`` in fp32, two roundings). Lineage: Random123 (Salmon et al., SC11) for Philox, Triton's
``triton/language/random.py`` and tutorial ``04-low-memory-dropout.py`` for the in-kernel form;
PyTorch PR #119153 for the multi-tensor launch through one device metadata table.

Design
    * Host: one int64 launch table per tensor list, one row per program — ``[address, first local
      index e0 = 4 g0 - offset, local end, first group g0, stream id, law code, dtype code,
      scale bits | shift bits << 32]`` for up to ROW_ITERS * BLOCK_G consecutive groups of one
      tensor, a tensor's groups cut first at multiples of 2^32 (so a row has one counter word c1
      and c0 never wraps) — copied to the device once and cached while the list (addresses,
      sizes, laws, ids, offsets) is unchanged: the key (seed, step) is a runtime scalar, so a new
      step costs one launch and no copy. A program reads its row directly (no search).
    * Device: a program dispatches once on (law, dtype) (program-uniform branches; aligned lists
      get one chunk loop per law and dtype, unaligned lists and the rare unfolded uniform one per
      law with the dtype branch at the store) and loops over its row in chunks of BLOCK_G groups:
      Philox on the chunk's groups, words to floats by the law, the cast, and a [BLOCK_G, 4] store:
      4 contiguous elements per group and per thread, so stores vectorise (st.global.v4 fp32, v2
      fp16/bf16, no shared memory) when every tensor is 16-byte aligned with offset % 4 == 0
      (ALIGNED; unmasked interior chunks).
    * Instructions: mulhilo as one ``IMAD.WIDE.U32`` (a 32 x 32 -> 64-bit product); a uniform law's
      2^-24 folded into its scale on the host (exact: ``(k 2^-24) s`` and ``k (s 2^-24)`` are one
      rounding of one real number when ``s 2^-24`` is an fp32 number, i.e. |s| >= 2^-102; smaller
      scales keep it apart, law code 3); zeros as a uniform with scale and shift +0 (the bits of
      ``zero_()``); bf16 by ``cvt.rn.bf16.f32`` (``F2FP.BF16.F32.PACK_AB``, round to nearest even:
      the bits of the integer rounding, used in the interpreter, whose cast is not RNE); FMAs
      only where the product is exact (below); the sin/cos quadrant and signs on the word itself.
      SASS per element on sm_90, Philox-10, an interior chunk of a large tensor, fast paths of
      div/sqrt (``python -m lorafast.compile_gate --filter rerandomize``): uniform fp32 17.3
      (before: 34.3), normal fp32 56.3 (74.9), uniform bf16 18.2 (37.8), normal bf16 57.6 (78.4);
      Philox-7: 14.2 and 52.8. 2 groups (8 elements) per thread per chunk, 4 chunks per program:
      55 registers, no spill (4 groups per thread without the loop: 72 registers, 19.5 / 59.1).
    * The launcher passes ``enable_fp_fusion=False`` (and ``compile_configs`` the same option):
      ``scale * base + shift`` and every step of Box-Muller must round once per operation, as in
      PyTorch, not once per FMA. Box-Muller uses no libdevice function: lorafast's own log and
      sin/cos (exact integer splits, fixed polynomials, ``tl.math.div_rn``, ``tl.sqrt_rn``), the
      same fp32 operations in the same order as :func:`lorafast.philox.box_muller`, so normals
      are bit-identical to the PyTorch path, like uniforms. The three explicit ``tl.math.fma``
      (``1 - k 2^-24``, ``2 s + ...``, ``e ln2_hi + ...``) have exact products, so they round
      once where the spec rounds once (PTX checked: ``mul.rn``/``add.rn``, ``div.rn``,
      ``sqrt.rn``, ``fma.rn`` only those; no ``.ftz``).

Limits: contiguous fp32/fp16/bf16 tensors on one CUDA device (or CPU under TRITON_INTERPRET=1);
offsets + numel < 2^62. Tested under the Triton interpreter on CPU (bit-exact against the PyTorch
path for every law: words, uniforms and normals, multi-chunk rows, rows cut at 2^32 groups);
compiled ahead of time for sm_90 and sm_80 by ``lorafast.compile_gate``; the hardware bf16
rounding and the speed are checked only on a GPU (``tests/test_rerandomize.py`` cuda test,
``lorafast bench rerandomize``): NOT run on a GPU in this session (none was available).
"""
from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import KernelConfig, interpreting

META_W = 8                     # int64 words per block in the launch table
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Kernel law codes: lorafast.init_laws' LAW_ZEROS = 0, LAW_UNIFORM = 1, LAW_NORMAL = 2, and 3 for a
# uniform law whose scale cannot absorb the 2^-24 of the uniform map exactly (|scale| < 2^-102).
UNIFORM_UNFOLDED = 3
BLOCK_G = 512                  # groups of 4 elements per chunk: 2 groups (8 elements) per thread
ROW_ITERS = 4                  # chunks per program (table row): 2048 groups, 8192 elements. SASS per
# element (uniform fp32) 24.4 with 1 chunk, 17.3 with 4, ~16.2 with 8; more chunks also coarsen the
# last wave: 256 MB of fp32 is 8192 programs, ~15 waves of 4 resident programs on 132 SMs
BLOCK_G_INTERPRETER = 1 << 14  # CPU interpreter: few large numpy programs (values do not depend on it)
NUM_WARPS = 8                  # 256 threads
GROUP_SPAN = 1 << 32           # no block straddles a multiple of 2^32 groups: one counter word c1 per block
_CACHE_SIZE = 16
_meta_cache: OrderedDict = OrderedDict()


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    """Philox4x32-ROUNDS on uint32 tensors (Random123's round; key bumped between rounds).

    mulhilo as one 32 x 32 -> 64-bit product (``mul.wide.u32``, SASS ``IMAD.WIDE.U32``: one
    instruction instead of ``IMAD.HI`` + ``IMAD``); exact in uint64 in the interpreter too."""
    for r in tl.static_range(ROUNDS):
        if r > 0:
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        p1 = c2.to(tl.uint64) * 0xCD9E8D57                   # M1 * c2 = hi1 2^32 + lo1
        p0 = c0.to(tl.uint64) * 0xD2511F53                   # M0 * c0 = hi0 2^32 + lo0
        c0 = (p1 >> 32).to(tl.uint32) ^ c1 ^ k0              # hi1 ^ c1 ^ k0
        c2 = (p0 >> 32).to(tl.uint32) ^ c3 ^ k1              # hi0 ^ c3 ^ k1
        c1 = p1.to(tl.uint32)                                # lo1
        c3 = p0.to(tl.uint32)                                # lo0
    return c0, c1, c2, c3


@triton.jit
def _top24(w):
    # the top 24 bits of a word as an fp32 integer k in [0, 2^24) (exact): uniform = k * 2^-24
    return (w >> 8).to(tl.float32)


@triton.jit
def _log_f32(u1):
    # log of fp32 u1 in [2^-24, 1]: lorafast.philox.log_f32, the same fp32 operations in the same
    # order (exact split u1 = m 2^e on the bits, s = (m-1)/(m+1) correctly rounded, atanh series).
    # Two explicit FMAs round once where the spec rounds once: their products are exact
    # (2 s; e * LN2_HI, 16-bit constant times |e| <= 25), so fma(a, b, c) = RN(RN(a b) + c).
    bits = u1.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    mb = (bits & 0x7FFFFF) | 0x3F800000
    big = mb > 0x3FB504F3                                       # m > fp32(sqrt 2): m / 2, e + 1
    mb = tl.where(big, mb - 0x800000, mb)
    ef = tl.where(big, e + 1, e).to(tl.float32)
    m = mb.to(tl.float32, bitcast=True)
    s = tl.math.div_rn(m - 1.0, m + 1.0)
    z = s * s
    p = z * 0.1818181872367859 + 0.2222222238779068
    p = p * z + 0.2857142984867096
    p = p * z + 0.4000000059604645
    p = p * z + 0.6666666865348816
    log_m = tl.math.fma(s, 2.0, (s * z) * p)                    # s * 2.0 + (s * z) * p
    return tl.math.fma(ef, 0.693145751953125, ef * 1.428606765330187e-06 + log_m)


@triton.jit
def _sincos_2pi(w):
    # (cos t, sin t), t = 2 pi (w >> 8) / 2^24: lorafast.philox.sincos_2pi_f32 (exact quadrant
    # reduction on the integer, Taylor polynomials on [-pi/4, pi/4), same operation order).
    # On the word itself: with kk = (w >> 8) + 2^21, q = (kk >> 22) & 3 = (w + 2^29) >> 30, and
    # (kk & 0x3FFFFF) - 2^21 = the signed low 22 bits of w >> 8 = ((w << 2) & ~0x3FF) / 2^10 as an
    # int32 (exact in fp32, 22 significant bits); cos changes sign for q in {1, 2} (bit 31 of
    # w + 3 * 2^29), sin for q in {2, 3} (bit 31 of w + 2^29), by an XOR of the sign bit (= -x).
    wq = tl.add(w, 0x20000000, sanitize_overflow=False)
    f = ((w << 2) & 0xFFFFFC00).to(tl.int32, bitcast=True).to(tl.float32) * 2.3283064365386963e-10  # * 2^-32
    f2 = f * f
    ps = f2 * 0.00016044118092395365 + -0.004681753925979137
    ps = ps * f2 + 0.07969262450933456
    ps = ps * f2 + -0.6459640860557556
    ps = ps * f2 + 1.5707963705062866
    sn = ps * f
    pc = f2 * 0.0009192602592520416 + -0.020863480865955353
    pc = pc * f2 + 0.25366950035095215
    pc = pc * f2 + -1.2337005138397217
    cs = pc * f2 + 1.0
    swap = (wq & 0x40000000) != 0                              # q odd
    cx = tl.where(swap, sn, cs).to(tl.uint32, bitcast=True)
    sx = tl.where(swap, cs, sn).to(tl.uint32, bitcast=True)
    c = cx ^ (tl.add(w, 0x60000000, sanitize_overflow=False) & 0x80000000)
    s = sx ^ (wq & 0x80000000)
    return c.to(tl.float32, bitcast=True), s.to(tl.float32, bitcast=True)


@triton.jit
def _box_muller(wa, wb):
    # lorafast.philox.box_muller: u1 = 1 - u in [2^-24, 1] (exact: fma(-k, 2^-24, 1) rounds the
    # exact 1 - k 2^-24 once, as 1 - RN(k 2^-24) does), r = sqrt(-2 log u1) correctly rounded;
    # only integer ops, fp32 add/sub/mul, FMAs with exact products, div_rn, sqrt_rn (no implicit
    # FMA: the launch passes enable_fp_fusion=False): bit-identical to the PyTorch path
    u1 = tl.math.fma(-_top24(wa), 5.9604644775390625e-08, 1.0)
    r = tl.sqrt_rn(_log_f32(u1) * -2.0)
    c, s = _sincos_2pi(wb)
    return r * c, r * s


@triton.jit
def _bf16_bits_rne(v):
    # fp32 -> bf16 bits rounded to nearest even by integer arithmetic (finite inputs): the
    # interpreter's fp32 -> bf16 cast truncates, its "rtne" cast rounds half up
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def _store_tile(p, loc, v, mask, DT: tl.constexpr, HAS_MASK: tl.constexpr, HW_BF16: tl.constexpr):
    # v [BLOCK_G, 4] fp32 -> elements p + loc of dtype code DT (p: pointer of that element type)
    if DT == 1:
        v = v.to(tl.float16)
    elif DT == 2:
        if HW_BF16:
            # cvt.rn.bf16.f32 (F2FP.BF16.F32.PACK_AB, two elements per instruction): IEEE round to
            # nearest even, the bits of _bf16_bits_rne for every non-NaN input
            v = v.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.uint16, bitcast=True)
        else:
            v = _bf16_bits_rne(v)
    if HAS_MASK:
        tl.store(p + loc, v, mask=mask)
    else:
        tl.store(p + loc, v)


@triton.jit
def _element_ptr(addr, e, DT: tl.constexpr, ALIGNED: tl.constexpr):
    # pointer to local element e (int64) of the tensor at int64 address addr, of dtype code DT;
    # ALIGNED (addr % 16 == 0, e % 4 == 0): a multiple of 16 (fp32) or 8 (16-bit) bytes, so a
    # thread's 4 contiguous elements store as one vector
    if DT == 0:
        p = (addr + 4 * e).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p = tl.multiple_of(p, 16)
    elif DT == 1:
        p = (addr + 2 * e).to(tl.pointer_type(tl.float16))
        if ALIGNED:
            p = tl.multiple_of(p, 8)
    else:
        p = (addr + 2 * e).to(tl.pointer_type(tl.uint16))
        if ALIGNED:
            p = tl.multiple_of(p, 8)
    return p


@triton.jit
def _fill_row(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW: tl.constexpr, DT: tl.constexpr,
              BLOCK_G: tl.constexpr, ROUNDS: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    # one table row of one tensor (law LAW; dtype code DT, or DT = -1: the runtime code dt, with
    # masked stores), in chunks of BLOCK_G groups: group r of the row (elements 4 (g0 + r) + j at
    # local index e0 + 4 r + j) has the counter (c0 + r, c1, stream, 0); c0 + r does not wrap
    # (see the kernel's preconditions)
    rows = tl.arange(0, BLOCK_G)[:, None]
    col = tl.arange(0, 4)[None, :]
    loc = 4 * rows + col                                     # int32 offsets inside a chunk
    zero = tl.zeros([BLOCK_G, 1], dtype=tl.uint32)
    lo = (-tl.minimum(e0, 0)).to(tl.int32)                   # chunk-relative bounds [lo, hi) of the tensor:
    hi = (end - e0).to(tl.int32)                             # lo in [0, 3], hi <= 4 ROW_ITERS BLOCK_G
    e = e0                                                   # local index of the chunk's first element
    if DT >= 0:
        p = _element_ptr(addr, e0, DT, ALIGNED)              # its pointer (specialised dtype)
    for _ in range(tl.cdiv(hi, 4 * BLOCK_G)):
        w0, w1, w2, w3 = _philox4x32(c0 + rows.to(tl.uint32), zero + c1, zero + stream, zero, k0, k1, ROUNDS)
        if LAW == 2:
            x0, x1 = _box_muller(w0, w1)                     # elements 4g, 4g+1
            x2, x3 = _box_muller(w2, w3)                     # elements 4g+2, 4g+3
        elif LAW == 1:
            # uniform (and zeros: scale = shift = +0 gives +0): scale * (k 2^-24) = (scale 2^-24) k,
            # one rounding either way (k 2^-24 is exact, and the host folded 2^-24 into the scale
            # only where that product is an fp32 number)
            x0, x1, x2, x3 = _top24(w0), _top24(w1), _top24(w2), _top24(w3)
        else:
            x0 = _top24(w0) * 5.9604644775390625e-08
            x1 = _top24(w1) * 5.9604644775390625e-08
            x2 = _top24(w2) * 5.9604644775390625e-08
            x3 = _top24(w3) * 5.9604644775390625e-08
        # [BLOCK_G, 4] tile: element 4g + j (row g, column j) takes x_j; built in registers (each
        # thread holds whole rows)
        base = tl.where(col == 0, x0, tl.where(col == 1, x1, tl.where(col == 2, x2, x3)))
        v = base * scale + shift                             # two roundings (no FP fusion at launch)
        if DT >= 0 and ALIGNED:                              # (aligned: lo = 0)
            if 4 * BLOCK_G <= hi:                            # interior chunk: no mask
                _store_tile(p, loc, v, loc < hi, DT, False, HW_BF16)
            else:
                _store_tile(p, loc, v, loc < hi, DT, True, HW_BF16)
        elif DT >= 0:
            _store_tile(p, loc, v, (loc >= lo) & (loc < hi), DT, True, HW_BF16)
        elif dt == 0:
            _store_tile(_element_ptr(addr, e, 0, ALIGNED), loc, v, (loc >= lo) & (loc < hi), 0, True, HW_BF16)
        elif dt == 1:
            _store_tile(_element_ptr(addr, e, 1, ALIGNED), loc, v, (loc >= lo) & (loc < hi), 1, True, HW_BF16)
        else:
            _store_tile(_element_ptr(addr, e, 2, ALIGNED), loc, v, (loc >= lo) & (loc < hi), 2, True, HW_BF16)
        if DT >= 0:
            p += 4 * BLOCK_G
        else:
            e += 4 * BLOCK_G
        lo -= 4 * BLOCK_G
        hi -= 4 * BLOCK_G
        c0 += BLOCK_G


@triton.jit
def _fill_law(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW: tl.constexpr,
              BLOCK_G: tl.constexpr, ROUNDS: tl.constexpr, ALIGNED: tl.constexpr, HW_BF16: tl.constexpr):
    # aligned lists: one chunk loop per dtype, with no branch but the interior test; the rare cases
    # (unaligned lists, the unfolded uniform law 3): one loop with the dtype branch at the store
    if ALIGNED and LAW != 3:
        if dt == 0:
            _fill_row(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW, 0,
                      BLOCK_G, ROUNDS, ALIGNED, HW_BF16)
        elif dt == 1:
            _fill_row(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW, 1,
                      BLOCK_G, ROUNDS, ALIGNED, HW_BF16)
        else:
            _fill_row(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW, 2,
                      BLOCK_G, ROUNDS, ALIGNED, HW_BF16)
    else:
        _fill_row(addr, e0, end, c0, c1, stream, dt, scale, shift, k0, k1, LAW, -1,
                  BLOCK_G, ROUNDS, ALIGNED, HW_BF16)


@triton.jit(do_not_specialize=["k0", "k1"])  # the key changes every step: no value specialisation
def _rerandomize_kernel(
    # pointers: the int64 launch table [rows, META_W]
    meta_ptr,
    # runtime scalars: Philox key words (uint32 bit patterns passed as int32)
    k0, k1,
    # constexprs
    BLOCK_G: tl.constexpr, ROUNDS: tl.constexpr, ALIGNED: tl.constexpr, META_W: tl.constexpr,
    HW_BF16: tl.constexpr,
):
    """Refill every tensor of the launch table in place with its Philox draw.

    Math: element e (global index = offset + local index) of tensor t gets word e % 4 of
      Philox4x32-ROUNDS(counter=(e//4 mod 2^32, e//4 >> 32, stream_t, 0), key=(k0, k1)); value =
      scale_t * base + shift_t, base = uniform [0,1) (law 1, 3), Box-Muller normal (law 2).
    Shapes/layout: each tensor contiguous; one program per table row: groups [g0, g0 + n) of one
      tensor, n <= ROW_ITERS * BLOCK_G, in chunks of BLOCK_G groups (4 * BLOCK_G elements). Row:
      [address of the tensor, local index e0 = 4 g0 - offset (>= -3) of element 4 g0, local end
      (exclusive, <= numel), g0, stream id, law code, dtype code, scale bits | shift bits << 32].
    Dtypes: integer Philox in uint32; floats computed in fp32; stored as fp32/fp16/bf16 (RNE).
    Mutates: every tensor of the table (elements outside [0, numel_t) are never touched).
    Preconditions: table built by ``_metadata`` (validated laws, dtypes, offsets + numel < 2^62;
      the groups of a row do not cross a multiple of 2^32, so c1 is the row's and c0 never
      wraps); ALIGNED only if every address is 16-byte aligned and every offset % 4 == 0.
    """
    row = meta_ptr + tl.program_id(0).to(tl.int64) * META_W
    addr = tl.load(row + 0)
    e0 = tl.load(row + 1)
    end = tl.load(row + 2)
    g0 = tl.load(row + 3)
    stream = tl.load(row + 4).to(tl.uint32)
    code = tl.load(row + 5)
    dt = tl.load(row + 6)
    affine = tl.load(row + 7)
    scale = affine.to(tl.int32).to(tl.float32, bitcast=True)          # low 32 bits
    shift = (affine >> 32).to(tl.int32).to(tl.float32, bitcast=True)  # high 32 bits
    c0 = (g0 & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g0 >> 32).to(tl.uint32)
    key0 = k0.to(tl.uint32, bitcast=True)
    key1 = k1.to(tl.uint32, bitcast=True)
    # program-uniform dispatch on the law, then (_fill_law) on the dtype
    if code == 2:
        _fill_law(addr, e0, end, c0, c1, stream, dt, scale, shift, key0, key1, 2, BLOCK_G, ROUNDS, ALIGNED, HW_BF16)
    elif code == 1:
        _fill_law(addr, e0, end, c0, c1, stream, dt, scale, shift, key0, key1, 1, BLOCK_G, ROUNDS, ALIGNED, HW_BF16)
    else:
        _fill_law(addr, e0, end, c0, c1, stream, dt, scale, shift, key0, key1, 3, BLOCK_G, ROUNDS, ALIGNED, HW_BF16)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _as_i32(x: int) -> int:
    """uint32 -> the int32 with the same bits (a fixed ``i32`` kernel signature)."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _kernel_law(code: int, scale: float) -> tuple[int, float]:
    """(kernel law code, scale as the kernel applies it): a uniform law's scale absorbs the 2^-24
    of the uniform map where ``scale * 2^-24`` is an fp32 number (every |scale| >= 2^-102)."""
    if code == 0:
        return 1, 0.0                                      # +0 * u + (+0) = +0: zero_()'s bits
    if code == 1:
        folded = scale * 2.0 ** -24                        # exact in float64
        if struct.unpack("<f", struct.pack("<f", folded))[0] == folded:
            return 1, folded
        return UNIFORM_UNFOLDED, scale
    return code, scale


def _metadata(tensors, codes, shifts, scales, ids, offsets, row_groups):
    """(device table [rows, META_W], rows, aligned), cached while the list and its laws are
    unchanged. One row (program) per ``row_groups`` groups of one tensor (fewer at its end); a
    tensor's groups [offset // 4, (offset + numel + 3) // 4) are cut at multiples of 2^32 first
    (GROUP_SPAN), so that a row's counters share c1 and c0 + r never wraps."""
    key = (row_groups, tensors[0].device) + tuple(
        (t.data_ptr(), t.numel(), t.dtype, o, i, c, s, k)
        for t, o, i, c, s, k in zip(tensors, offsets, ids, codes, shifts, scales))
    hit = _meta_cache.get(key)
    if hit is not None:
        _meta_cache.move_to_end(key)
        return hit
    parts, aligned = [], True
    for t, o, i, c, s, k in zip(tensors, offsets, ids, codes, shifts, scales):
        n = t.numel()
        law, k = _kernel_law(c, k)
        s = 0.0 if c == 0 else s
        const = [t.data_ptr(), 0, 0, 0, i, law, DTYPE_CODE[t.dtype], _f32_bits(k) | _f32_bits(s) << 32]
        const[7] -= (1 << 64) if const[7] >= 1 << 63 else 0      # as int64
        g, g_end = o // 4, (o + n + 3) // 4
        while g < g_end:                                     # segments inside one 2^32-group span
            seg_end = min(g_end, (g // GROUP_SPAN + 1) * GROUP_SPAN)
            g0 = torch.arange(g, seg_end, row_groups, dtype=torch.int64)
            rows = torch.tensor(const, dtype=torch.int64).repeat(len(g0), 1)
            rows[:, 1] = 4 * g0 - o
            rows[:, 2] = torch.clamp(4 * torch.clamp(g0 + row_groups, max=seg_end) - o, max=n)
            rows[:, 3] = g0
            parts.append(rows)
            g = seg_end
        aligned = aligned and t.data_ptr() % 16 == 0 and o % 4 == 0
    meta = torch.cat(parts).to(tensors[0].device)
    entry = (meta, meta.shape[0], aligned)
    _meta_cache[key] = entry
    if len(_meta_cache) > _CACHE_SIZE:
        _meta_cache.popitem(last=False)
    return entry


def rerandomize_launch(tensors, *, k0: int, k1: int, codes, shifts, scales, ids, offsets,
                       rounds: int = 10, block_g: int | None = None, num_warps: int = NUM_WARPS,
                       row_iters: int | None = None) -> None:
    """Launch ``_rerandomize_kernel`` once for the whole list (inputs validated by the op).

    ``k0, k1``: key words in [0, 2^32); ``codes, shifts, scales``: lowered laws
    (:mod:`lorafast.init_laws`); ``ids``: stream ids in [0, 2^32); ``offsets``: global index of each
    tensor's first element. Empty tensors are skipped. ``block_g``: groups of 4 elements per
    chunk (default BLOCK_G on GPU; for CPU tensors under the interpreter, the largest tensor's
    group count rounded up to a power of two, at most BLOCK_G_INTERPRETER); ``row_iters``: chunks
    per program (default ROW_ITERS on GPU, 1 under the interpreter). The values depend on none of
    them.
    """
    cpu = tensors[0].device.type == "cpu"
    if block_g is None:
        block_g = BLOCK_G
        if cpu:   # interpreter: one numpy program per tensor, up to a cap
            groups = max((o + t.numel() + 3) // 4 - o // 4 for t, o in zip(tensors, offsets))
            block_g = min(BLOCK_G_INTERPRETER, max(16, triton.next_power_of_2(groups)))
    if row_iters is None:
        row_iters = 1 if cpu else ROW_ITERS
    keep = [j for j, t in enumerate(tensors) if t.numel() > 0]
    if not keep:
        return
    sel = lambda xs: [xs[j] for j in keep]  # noqa: E731
    meta, blocks, aligned = _metadata(sel(tensors), sel(codes), sel(shifts), sel(scales), sel(ids),
                                      sel(offsets), block_g * row_iters)
    _rerandomize_kernel[(blocks,)](
        meta_ptr=meta, k0=_as_i32(k0), k1=_as_i32(k1),
        BLOCK_G=block_g, ROUNDS=rounds, ALIGNED=aligned, META_W=META_W, HW_BF16=not interpreting(),
        num_warps=num_warps, enable_fp_fusion=False)


def compile_configs():
    """The shipped configurations: Philox rounds 10 (default) and 7, aligned and unaligned lists,
    BLOCK_G = 512 groups per chunk on 8 warps (2 groups = 8 elements per thread), hardware bf16
    rounding. Chosen from the compile gate's SASS, not timed (no GPU here): see the module
    docstring for the instructions per element and registers."""
    sig = {"meta_ptr": "*i64", "k0": "i32", "k1": "i32", "BLOCK_G": "constexpr", "ROUNDS": "constexpr",
           "ALIGNED": "constexpr", "META_W": "constexpr", "HW_BF16": "constexpr"}
    out = []
    for rounds in (10, 7):
        for aligned in (True, False):
            out.append(KernelConfig(
                name=f"rerandomize_r{rounds}_{'aligned' if aligned else 'unaligned'}",
                fn=_rerandomize_kernel, signature=dict(sig),
                constexprs={"BLOCK_G": BLOCK_G, "ROUNDS": rounds, "ALIGNED": aligned, "META_W": META_W,
                            "HW_BF16": True},
                num_warps=NUM_WARPS, num_stages=1, aligned=("meta_ptr",), needs_mma=False,
                options={"enable_fp_fusion": False}))  # as launched
    return out


def sass_paths(config_name: str, arch: int) -> dict[str, tuple]:
    """The hot paths of a shipped configuration for the compile gate's static report
    (``lorafast.compile_gate.hot_path``): name -> (opcode prefixes the path must hold, prefixes it
    must not hold, elements per thread per chunk, chunks per program). The aligned sm_90 binaries
    only: an interior chunk of each law and dtype, on the fast paths of division and square root
    (no ``CALL``), with ROW_ITERS chunks per program (a large tensor)."""
    if arch != 90 or "unaligned" in config_name:
        return {}
    per_thread = BLOCK_G * 4 // (NUM_WARPS * 32)
    # dtype: (the store and its conversion, the other dtype's conversion)
    stores = {"fp32": (("STG.E.128",), ("F2FP",)), "fp16": (("F2FP.F16", "STG.E.64"), ("F2FP.BF16",)),
              "bf16": (("F2FP.BF16", "STG.E.64"), ("F2FP.F16",))}
    out = {}
    for dtype, (must, others) in stores.items():
        out[f"uniform_{dtype}"] = (("I2F", *must), ("MUFU", "CALL", *others), per_thread, ROW_ITERS)
        out[f"normal_{dtype}"] = (("MUFU.RSQ", *must), ("CALL", *others), per_thread, ROW_ITERS)
    return out

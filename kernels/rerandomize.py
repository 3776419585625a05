"""One-launch in-place re-randomisation of a list of tensors with counter-based Philox4x32.

The values are those of the PyTorch reference :mod:`lorafast.philox` (read its docstring: key from
(seed, step), counter ``(g mod 2^32, g >> 32, stream id, 0)`` for the group ``g = e // 4`` of the
global element index ``e``, element ``e`` takes word ``e % 4``, uniforms from the top 24 bits,
Box-Muller on word pairs) and of the laws of :mod:`lorafast.init_laws` (``value = scale * base +
shift`` in fp32, two roundings). Lineage: Random123 (Salmon et al., SC11) for Philox, Triton's
``triton/language/random.py`` and tutorial ``04-low-memory-dropout.py`` for the in-kernel form;
PyTorch PR #119153 for the multi-tensor launch through one device metadata table.

Design
    * Host: one int64 table per tensor list — per tensor ``[address, numel, offset, stream id,
      law code, dtype code, shift bits, scale bits]`` followed by the prefix sum of the number of
      blocks of each tensor — copied to the device once and cached while the list (addresses,
      sizes, laws, ids, offsets) is unchanged: the key (seed, step) is a runtime scalar, so a new
      step costs one launch and no copy.
    * Device: a flat 1-D grid over the blocks of all tensors; a program finds its tensor by binary
      search in the prefix sums, runs Philox on BLOCK_G consecutive groups of 4 elements, maps
      words to floats by the tensor's law (program-uniform branch), casts to the tensor's dtype
      (program-uniform branch) and stores a [BLOCK_G, 4] tile: 4 contiguous elements per group and
      per thread, so stores vectorise (st.global.v4 fp32, v2 fp16/bf16, no shared memory) when every
      tensor is 16-byte aligned with offset % 4 == 0 (ALIGNED, unmasked interior blocks).
    * The launcher passes ``enable_fp_fusion=False`` (and ``compile_configs`` the same option):
      ``scale * base + shift`` and every step of Box-Muller must round once per operation, as in
      PyTorch, not once per FMA. Box-Muller uses no libdevice function: lorafast's own log and
      sin/cos (exact integer splits, fixed polynomials, ``tl.math.div_rn``, ``tl.sqrt_rn``), the
      same fp32 operations in the same order as :func:`lorafast.philox.box_muller`, so normals
      are bit-identical to the PyTorch path, like uniforms (PTX checked: ``mul.rn``/``add.rn``,
      ``div.rn``, ``sqrt.rn``; no ``fma`` and no ``.ftz``).

Limits: contiguous fp32/fp16/bf16 tensors on one CUDA device (or CPU under TRITON_INTERPRET=1);
offsets + numel < 2^62. Tested under the Triton interpreter on CPU (bit-exact against the PyTorch
path for every law: words, uniforms and normals); compiled ahead of time for sm_90 and sm_80
by ``lorafast.compile_gate``; NOT timed on a GPU in this session (no GPU was available).
"""
from __future__ import annotations

import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import KernelConfig

META_W = 8                     # int64 columns per tensor in the metadata table
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK_G = 512                  # groups of 4 elements per program (2048 elements)
BLOCK_G_INTERPRETER = 1 << 14  # CPU interpreter: few large numpy programs (values do not depend on it)
NUM_WARPS = 8                  # 256 threads: 2 groups (8 elements) per thread
_CACHE_SIZE = 16
_meta_cache: OrderedDict = OrderedDict()


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
    """Philox4x32-ROUNDS on uint32 tensors (Random123's round; key bumped between rounds)."""
    for r in tl.static_range(ROUNDS):
        if r > 0:
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        _c0, _c2 = c0, c2
        c0 = tl.math.umulhi(0xCD9E8D57, _c2) ^ c1 ^ k0       # hi1 ^ c1 ^ k0
        c2 = tl.math.umulhi(0xD2511F53, _c0) ^ c3 ^ k1       # hi0 ^ c3 ^ k1
        c1 = tl.mul(0xCD9E8D57, _c2, sanitize_overflow=False)  # lo1
        c3 = tl.mul(0xD2511F53, _c0, sanitize_overflow=False)  # lo0
    return c0, c1, c2, c3


@triton.jit
def _to_uniform(w):
    # top 24 bits / 2^24: exact in fp32, in [0, 1)
    return (w >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _log_f32(u1):
    # log of fp32 u1 in [2^-24, 1]: lorafast.philox.log_f32, the same fp32 operations in the same
    # order (exact split u1 = m 2^e on the bits, s = (m-1)/(m+1) correctly rounded, atanh series)
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
    log_m = s * 2.0 + (s * z) * p
    return ef * 0.693145751953125 + (ef * 1.428606765330187e-06 + log_m)


@triton.jit
def _sincos_2pi(w):
    # (cos t, sin t), t = 2 pi (w >> 8) / 2^24: lorafast.philox.sincos_2pi_f32 (exact quadrant
    # reduction on the integer, Taylor polynomials on [-pi/4, pi/4), same operation order)
    kk = (w >> 8).to(tl.int32) + 0x200000
    q = (kk >> 22) & 3
    f = ((kk & 0x3FFFFF) - 0x200000).to(tl.float32) * 2.384185791015625e-07
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
    swap = (q & 1) == 1
    cx = tl.where(swap, sn, cs)
    sx = tl.where(swap, cs, sn)
    return tl.where((q == 1) | (q == 2), -cx, cx), tl.where(q >= 2, -sx, sx)


@triton.jit
def _box_muller(wa, wb):
    # lorafast.philox.box_muller: u1 = 1 - u in [2^-24, 1] (exact), r = sqrt(-2 log u1) correctly
    # rounded; only integer ops, fp32 add/sub/mul, div_rn, sqrt_rn and no FMA (the launch passes
    # enable_fp_fusion=False): bit-identical to the PyTorch path
    u1 = 1.0 - _to_uniform(wa)
    r = tl.sqrt_rn(_log_f32(u1) * -2.0)
    c, s = _sincos_2pi(wb)
    return r * c, r * s


@triton.jit
def _store_tile(addr, dt, local, v, mask, HAS_MASK: tl.constexpr, ALIGNED: tl.constexpr):
    # dtype code -> pointer type of the int64 address (program-uniform branch)
    if dt == 0:
        p32 = addr.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            p32 = tl.multiple_of(p32, 16)
        if HAS_MASK:
            tl.store(p32 + local, v, mask=mask)
        else:
            tl.store(p32 + local, v)
    elif dt == 1:
        p16 = addr.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            p16 = tl.multiple_of(p16, 16)
        if HAS_MASK:
            tl.store(p16 + local, v.to(tl.float16), mask=mask)
        else:
            tl.store(p16 + local, v.to(tl.float16))
    else:
        # fp32 -> bf16 rounded to nearest even by integer arithmetic: the same bits on every GPU
        # and in the interpreter (whose own cast truncates); inputs are finite
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        h = (bits >> 16).to(tl.uint16)
        pb16 = addr.to(tl.pointer_type(tl.uint16))
        if ALIGNED:
            pb16 = tl.multiple_of(pb16, 16)
        if HAS_MASK:
            tl.store(pb16 + local, h, mask=mask)
        else:
            tl.store(pb16 + local, h)


@triton.jit(do_not_specialize=["k0", "k1"])  # the key changes every step: no value specialisation
def _rerandomize_kernel(
    # pointers: int64 table [T, META_W] then block prefix sums [T + 1]
    meta_ptr,
    # sizes
    T,
    # runtime scalars: Philox key words (uint32 bit patterns passed as int32)
    k0, k1,
    # constexprs
    BLOCK_G: tl.constexpr, ROUNDS: tl.constexpr, ALIGNED: tl.constexpr, META_W: tl.constexpr,
):
    """Refill every tensor of the metadata table in place with its Philox draw.

    Math: element e (global index = offset + local index) of tensor t gets word e % 4 of
      Philox4x32-ROUNDS(counter=(e//4 mod 2^32, e//4 >> 32, stream_t, 0), key=(k0, k1)); value =
      scale_t * base + shift_t, base = uniform [0,1) (law 1), Box-Muller normal (law 2), 0 (law 0).
    Shapes/layout: each tensor contiguous, numel_t elements at address_t; grid = total blocks, each
      block BLOCK_G groups (4 * BLOCK_G elements) of one tensor.
    Dtypes: integer Philox in uint32; floats computed in fp32; stored as fp32/fp16/bf16 (RNE).
    Mutates: every tensor of the table (elements outside [0, numel_t) are never touched).
    Preconditions: table built by ``rerandomize_launch`` (validated laws, dtypes, offsets + numel
      < 2^62); ALIGNED only if every address is 16-byte aligned and every offset % 4 == 0.
    """
    pid = tl.program_id(0).to(tl.int64)
    bs_ptr = meta_ptr + T * META_W
    # binary search: the largest tensor index i with block_start[i] <= pid
    lo = T * 0
    hi = T - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(bs_ptr + mid) <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    row = meta_ptr + lo.to(tl.int64) * META_W
    addr = tl.load(row + 0)
    numel = tl.load(row + 1)
    off = tl.load(row + 2)
    stream = tl.load(row + 3).to(tl.uint32)
    code = tl.load(row + 4)
    dt = tl.load(row + 5)
    shift = tl.load(row + 6).to(tl.int32).to(tl.float32, bitcast=True)
    scale = tl.load(row + 7).to(tl.int32).to(tl.float32, bitcast=True)
    b = pid - tl.load(bs_ptr + lo)                       # block index inside the tensor (int64)

    # local element index of row r, column j: 4 * (off//4 + b*BLOCK_G + r) + j - off
    #                                        = 4*b*BLOCK_G + 4*r + j - off % 4
    col = tl.arange(0, 4)[None, :]
    if ALIGNED:
        local = b * (4 * BLOCK_G) + 4 * tl.arange(0, BLOCK_G)[:, None] + col
    else:
        local = b * (4 * BLOCK_G) - (off % 4) + 4 * tl.arange(0, BLOCK_G)[:, None] + col

    if code == 0:
        v = tl.zeros([BLOCK_G, 4], dtype=tl.float32)
    else:
        g = off // 4 + b * BLOCK_G + tl.arange(0, BLOCK_G)[:, None]   # global group indices, < 2^60
        c0 = g.to(tl.uint32)                                 # low 32 bits (truncation)
        c1 = (g >> 32).to(tl.uint32)
        c2 = tl.zeros([BLOCK_G, 1], dtype=tl.uint32) + stream
        c3 = tl.zeros([BLOCK_G, 1], dtype=tl.uint32)
        w0, w1, w2, w3 = _philox4x32(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True),
                                     k1.to(tl.uint32, bitcast=True), ROUNDS)
        if code == 2:
            x0, x1 = _box_muller(w0, w1)                     # elements 4g, 4g+1
            x2, x3 = _box_muller(w2, w3)                     # elements 4g+2, 4g+3
        else:
            x0 = _to_uniform(w0)
            x1 = _to_uniform(w1)
            x2 = _to_uniform(w2)
            x3 = _to_uniform(w3)
        # [BLOCK_G, 4] tile: element 4g + j (row g, column j) takes x_j; built in registers (each
        # thread holds whole rows), so aligned blocks store 4 contiguous elements per thread
        base = tl.where(col == 0, x0, tl.where(col == 1, x1, tl.where(col == 2, x2, x3)))
        v = base * scale + shift                             # two roundings (no FP fusion at launch)

    if ALIGNED:
        if (b + 1) * (4 * BLOCK_G) <= numel:                 # interior block: no mask
            _store_tile(addr, dt, local, v, local < numel, False, True)
        else:
            _store_tile(addr, dt, local, v, local < numel, True, True)
    else:
        _store_tile(addr, dt, local, v, (local >= 0) & (local < numel), True, False)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _as_i32(x: int) -> int:
    """uint32 -> the int32 with the same bits (a fixed ``i32`` kernel signature)."""
    return x - (1 << 32) if x >= 1 << 31 else x


def _metadata(tensors, codes, shifts, scales, ids, offsets, block_g):
    """(device table, total blocks, aligned, T), cached while the list and its laws are unchanged."""
    key = (block_g, tensors[0].device) + tuple(
        (t.data_ptr(), t.numel(), t.dtype, o, i, c, s, k)
        for t, o, i, c, s, k in zip(tensors, offsets, ids, codes, shifts, scales))
    hit = _meta_cache.get(key)
    if hit is not None:
        _meta_cache.move_to_end(key)
        return hit
    rows, starts, total, aligned = [], [], 0, True
    for t, o, i, c, s, k in zip(tensors, offsets, ids, codes, shifts, scales):
        n = t.numel()
        nblocks = triton.cdiv((o + n + 3) // 4 - o // 4, block_g)
        rows += [t.data_ptr(), n, o, i, c, DTYPE_CODE[t.dtype], _f32_bits(s), _f32_bits(k)]
        starts.append(total)
        total += nblocks
        aligned = aligned and t.data_ptr() % 16 == 0 and o % 4 == 0
    starts.append(total)
    meta = torch.tensor(rows + starts, dtype=torch.int64).to(tensors[0].device)
    entry = (meta, total, aligned, len(tensors))
    _meta_cache[key] = entry
    if len(_meta_cache) > _CACHE_SIZE:
        _meta_cache.popitem(last=False)
    return entry


def rerandomize_launch(tensors, *, k0: int, k1: int, codes, shifts, scales, ids, offsets,
                       rounds: int = 10, block_g: int | None = None, num_warps: int = NUM_WARPS) -> None:
    """Launch ``_rerandomize_kernel`` once for the whole list (inputs validated by the op).

    ``k0, k1``: key words in [0, 2^32); ``codes, shifts, scales``: lowered laws
    (:mod:`lorafast.init_laws`); ``ids``: stream ids in [0, 2^32); ``offsets``: global index of each
    tensor's first element. Empty tensors are skipped. ``block_g``: groups of 4 elements per
    program (default BLOCK_G on GPU; for CPU tensors under the interpreter, the largest tensor's
    group count rounded up to a power of two, at most BLOCK_G_INTERPRETER).
    """
    if block_g is None:
        block_g = BLOCK_G
        if tensors[0].device.type == "cpu":   # interpreter: one numpy program per tensor, up to a cap
            groups = max((o + t.numel() + 3) // 4 - o // 4 for t, o in zip(tensors, offsets))
            block_g = min(BLOCK_G_INTERPRETER, max(16, triton.next_power_of_2(groups)))
    keep = [j for j, t in enumerate(tensors) if t.numel() > 0]
    if not keep:
        return
    sel = lambda xs: [xs[j] for j in keep]  # noqa: E731
    meta, total, aligned, T = _metadata(sel(tensors), sel(codes), sel(shifts), sel(scales), sel(ids),
                                        sel(offsets), block_g)
    _rerandomize_kernel[(total,)](
        meta_ptr=meta, T=T, k0=_as_i32(k0), k1=_as_i32(k1),
        BLOCK_G=block_g, ROUNDS=rounds, ALIGNED=aligned, META_W=META_W,
        num_warps=num_warps, enable_fp_fusion=False)


def compile_configs():
    """The shipped configurations: Philox rounds 10 (default) and 7, aligned and unaligned lists,
    BLOCK_G=512 groups with 8 warps. Chosen from the compile gate, not timed (no GPU here): 2 groups
    per thread needs 30-33 registers (aligned) / 61 (unaligned) and no stack on sm_90 and sm_80
    (with the bit-exact Box-Muller; 39-44 / 61-62 with libdevice log/cos/sin), while 4 groups per
    thread (4 warps) took 64 registers plus an 8-byte stack frame on sm_90."""
    sig = {"meta_ptr": "*i64", "T": "i32", "k0": "i32", "k1": "i32", "BLOCK_G": "constexpr",
           "ROUNDS": "constexpr", "ALIGNED": "constexpr", "META_W": "constexpr"}
    out = []
    for rounds in (10, 7):
        for aligned in (True, False):
            out.append(KernelConfig(
                name=f"rerandomize_r{rounds}_{'aligned' if aligned else 'unaligned'}",
                fn=_rerandomize_kernel, signature=dict(sig),
                constexprs={"BLOCK_G": BLOCK_G, "ROUNDS": rounds, "ALIGNED": aligned, "META_W": META_W},
                num_warps=NUM_WARPS, num_stages=1, aligned=("meta_ptr",), needs_mma=False,
                options={"enable_fp_fusion": False}))  # as launched
    return out

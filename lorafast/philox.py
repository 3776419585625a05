"""Counter-based Philox4x32 random numbers in PyTorch (and numpy): THE spec of lorafast's redraws.

Local Random Initialization redraws the local parameters at every step. Their values must depend
only on (seed, step, tensor, element) — not on the device, the launch grid, the block size or how
a tensor is sharded — so that the reference model (this file, run on any device) and the Triton
kernel ``lorafast.kernels.rerandomize`` produce the same numbers. This module defines them; it
imports no triton (integer Philox: numpy uint64 for CPU tensors, ATen int64 ops elsewhere —
two exact implementations of one function, tested equal). CPU redraws and :func:`uniform` /
:func:`normal` on CPU run in a C++ extension (:func:`fill_cpu_`, ``lorafast/csrc/philox_cpu.cpp``,
built on first use), with the numpy route as its fallback: the same bits (tested).

Generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC11; Random123)
    Philox4x32-R: 4 x 32-bit counter, 2 x 32-bit key, R rounds (default 10, 7 allowed). One round::

        hi0, lo0 = mulhilo(M0, c0);  hi1, lo1 = mulhilo(M1, c2)
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

    with the key bumped ``k0 += W0, k1 += W1`` (mod 2^32) between rounds. M0 = 0xD2511F53,
    M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85. Checked against Random123's published
    known-answer vectors (``tests/test_philox.py``).

Key from (seed, step)
    ``key64 = splitmix64(splitmix64(seed mod 2^64) XOR (step mod 2^64))``; k0 = low 32 bits,
    k1 = high 32 bits. splitmix64 (Steele, Lea, Flood 2014) is a bijection of 64-bit words, so for
    one seed every step gets its own key, and nearby seeds/steps give unrelated keys.

Counter of an element
    A tensor (or the full tensor a shard belongs to) is a flat stream of elements with a global
    index ``e`` (a shard holding elements [o, o + n) has e = o + local index). Elements are
    grouped by four: group ``g = e // 4`` uses the counter

        (c0, c1, c2, c3) = (g mod 2^32, g >> 32, stream_id, 0)

    and element e takes output word ``e % 4`` — all four words are used. ``stream_id`` is a
    32-bit id of the tensor (the op defaults to the list position; the model passes the crc32
    of the parameter name). Hence a value depends only on (seed, step, stream_id, e), never on
    block size, launch grid, or sharding: refilling a slice with its offset gives exactly that
    slice of the full refill.

Words to floats (all in fp32; every step is one IEEE round-to-nearest operation, so every path
agrees bit for bit)
    uniform ``u = (w >> 8) * 2^-24`` in [0, 1): the top 24 bits, exact in fp32, never 1.0.
    normal (Box-Muller on word pairs (w0, w1) -> elements 4g, 4g+1 and (w2, w3) -> 4g+2, 4g+3,
    :func:`box_muller`): ``u1 = 1 - u(w_even)`` in [2^-24, 1] (exact, never 0),
    ``r = sqrt(-2 log u1)``, ``t = 2 pi (w_odd >> 8) / 2^24``, elements ``r cos t``, ``r sin t``,
    where log, cos and sin are lorafast's own fp32 functions (:func:`log_f32`,
    :func:`sincos_2pi_f32`): exact splits on the integer bits (u1 = m 2^e; t = quadrant + a
    remainder in [-pi/4, pi/4)), then fixed polynomials in Horner form. log is within 2e-7
    relative, cos/sin within 1e-7 absolute of the true values (tested on all 2^24 inputs); the
    normals are tested for moments and Kolmogorov-Smirnov against the normal CDF. The smallest u1
    is 2^-24, so |z| <= sqrt(48 ln 2) = 5.77 (the tails beyond 5.77 sigma, probability 8e-9, are
    cut, as in Triton's ``tl.randn``).

Cross-device agreement: bit-exact
    Values are bit-identical on every device and in the Triton kernel: the words come from exact
    integer arithmetic, and the floats use only integer ops, fp32 add/sub/mul, correctly rounded
    fp32 division and square root, no fused multiply-add (the kernel launches with
    ``enable_fp_fusion=False`` and uses ``tl.math.div_rn``/``tl.sqrt_rn``) and no subnormal
    intermediate (flush-to-zero cannot change them). No math library's log/cos/sin is used.
    ``torch.sqrt`` of fp32 is not correctly rounded on every CPU build (torch 2.13 CPU: 0.7% of
    results one ulp off), hence :func:`sqrt_f32`; CPU tensors go through the C++ extension (the
    same fp32 operations, compiled with ``-ffp-contract=off`` and no fast-math; ``std::sqrt`` of a
    float is correctly rounded) or numpy float32 (:func:`box_muller_numpy`), other devices
    through ATen ops (:func:`box_muller`); all routes, and the kernel under the Triton
    interpreter, are tested bit-equal. The values of normals changed once, when this replaced
    torch.log/cos/sin (which agreed only within 4 ulps).

Speed on CPU (``python -m lorafast.bench.rerandomize --device cpu [--threads 1]``, case
``large``: 2^20 fp32 elements; provider ``lorafast`` = the C++ extension, ``numpy`` = the numpy
route, ``torch_init`` = ``torch.nn.init.uniform_`` / ``normal_``; median ms, one run each,
2026-11-30 on the idle 2-core development machine, commit 909fb1a):
    2 threads (default): uniform 0.45 vs torch.nn.init 2.96 vs numpy 13.6;
                         normal  0.68 vs 3.54 vs 32.2 (p80/p20 <= 1.09 everywhere).
    1 thread:            uniform 0.77 vs 3.02 vs 13.5; normal 1.28 vs 3.66 vs 32.4.
So the extension takes 0.15-0.35x the time of torch.nn.init and is 17-47x faster than the numpy
route. Earlier runs on the same machine shared with other work (load 4-12) gave 0.08-0.50x and
18-86x: a helper thread woken on a busy machine can cost the caller its core. The
numpy route (integer Philox in numpy uint64, float maps in ATen ops kept below its parallel grain
size, see ``chunk_groups``; Box-Muller in numpy float32) is the fallback; the Triton kernel is
the GPU path.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

__all__ = [
    "M0", "M1", "W0", "W1", "DEFAULT_ROUNDS", "MASK32", "TWO_PI_F32", "chunk_groups",
    "splitmix64", "derive_key", "philox4x32", "philox4x32_int", "philox4x32_numpy", "philox4x32_torch", "group_words",
    "element_words", "words_to_uniform", "words_to_normal", "log_f32", "sincos_2pi_f32", "sqrt_f32",
    "box_muller", "box_muller_numpy", "fill_cpu_",
    "uniform", "normal",
]

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
DEFAULT_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
TWO_PI_F32 = 6.2831854820251465  # float32(2 * pi), exactly representable in fp32
_INV_2_24 = 2.0 ** -24

# Groups of 4 elements processed per chunk (8 live int64 [chunk] temporaries). On CPU, the chunk
# and its [chunk, 4] float tensors stay under ATen's parallel grain size (32768 elements), so each
# of the ~250 ops per chunk runs on the calling thread with no OpenMP barrier: on a shared, busy
# 2-core machine a barrier per op cost up to a scheduler time slice and made the draw 10-100x
# slower. On GPUs, large chunks (few launches).
CHUNK_GROUPS_CPU = 7 * 1024
CHUNK_GROUPS_GPU = 1 << 20
BOX_MULLER_GROUPS_CPU = 8 * 1024

# Box-Muller in basic fp32 operations (see box_muller): constants, all exact fp32 values
LN2_HI = 0.693145751953125            # 0x3F317200: 16 significant bits, e * LN2_HI exact for |e| <= 128
LN2_LO = 1.428606765330187e-06        # fp32(ln 2 - LN2_HI)
_SQRT2_BITS = 0x3FB504F3              # fp32(sqrt 2)
_ATANH = (0.6666666865348816, 0.4000000059604645, 0.2857142984867096, 0.2222222238779068,
          0.1818181872367859)         # fp32(2 / (2n + 1)), n = 1..5: log m = 2s + s z (A3 + z (A5 + ...))
_SIN = (1.5707963705062866, -0.6459640860557556, 0.07969262450933456, -0.004681753925979137,
        0.00016044118092395365)       # fp32((-1)^n (pi/2)^(2n+1) / (2n+1)!), n = 0..4
_COS = (-1.2337005138397217, 0.25366950035095215, -0.020863480865955353,
        0.0009192602592520416)        # fp32((-1)^n (pi/2)^(2n) / (2n)!), n = 1..4


def chunk_groups(device: torch.device | str) -> int:
    """Groups per chunk of the PyTorch path on ``device``."""
    return CHUNK_GROUPS_CPU if torch.device(device).type == "cpu" else CHUNK_GROUPS_GPU


def splitmix64(x: int) -> int:
    """splitmix64 finaliser of ``x`` (mod 2^64): a bijection of 64-bit words."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def derive_key(seed: int, step: int) -> tuple[int, int]:
    """Philox key (k0, k1), two ints in [0, 2^32), of the draw ``step`` of the stream ``seed``.
    This primitive reduces ``seed`` and ``step`` mod 2^64 (TypeError for a non-int); the public
    entry points (``rerandomize_``, the models, ``TrainConfig``, the CLI) refuse values outside
    their ranges with a ValueError before they get here (:mod:`lorafast.checks`)."""
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
    k = splitmix64(splitmix64(seed & MASK64) ^ (step & MASK64))
    return k & MASK32, k >> 32


def _check_key(key: tuple[int, int]) -> None:
    """A Philox key is two words in [0, 2^32): ValueError otherwise (no silent masking)."""
    try:
        ok = len(key) == 2 and all(0 <= operator.index(k) <= MASK32 for k in key)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"key must be two ints in [0, 2^32) (derive_key's output), got {key!r}")


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")


def philox4x32_int(counter: tuple[int, int, int, int], key: tuple[int, int],
                   rounds: int = DEFAULT_ROUNDS) -> tuple[int, int, int, int]:
    """Philox4x32-``rounds`` of one counter, in Python integers (the textbook statement)."""
    _check_rounds(rounds)
    c0, c1, c2, c3 = (int(c) & MASK32 for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
    return c0, c1, c2, c3


def philox4x32(c0: torch.Tensor, c1: torch.Tensor | int, c2: torch.Tensor | int,
               c3: torch.Tensor | int, key: tuple[int, int], rounds: int = DEFAULT_ROUNDS,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (scalars broadcast).

    Returns the four output words as int64 tensors in [0, 2^32) on ``c0``'s device; the inputs are
    not modified. CPU tensors go through :func:`philox4x32_numpy` (unsigned 64-bit products, about
    8x faster than ATen int64 ops), other devices through :func:`philox4x32_torch`; both are exact
    integer arithmetic and give identical words (tested).
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    if c0.device.type != "cpu":
        return philox4x32_torch(c0, c1, c2, c3, key, rounds)
    shape = c0.shape
    arrs = [torch.as_tensor(c, dtype=torch.int64).expand(shape).contiguous().numpy().view(np.uint64)
            for c in (c0, c1, c2, c3)]
    out = philox4x32_numpy(*arrs, key=key, rounds=rounds)
    return tuple(torch.from_numpy(w.view(np.int64)).view(shape) for w in out)


_NP_M0, _NP_M1 = np.uint64(M0), np.uint64(M1)
_NP_32, _NP_MASK32 = np.uint64(32), np.uint64(MASK32)


def philox4x32_numpy(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
                     key: tuple[int, int], rounds: int = DEFAULT_ROUNDS) -> tuple[np.ndarray, ...]:
    """Philox4x32-``rounds`` on uint64 arrays holding uint32 values (the CPU path; inputs kept).

    With unsigned 64-bit arithmetic the product of two 32-bit words is exact, so
    mulhilo(m, c) = (m * c >> 32, m * c & (2^32 - 1)) directly.
    """
    _check_rounds(rounds)
    c0, c1, c2, c3 = (np.array(c, dtype=np.uint64) for c in (c0, c1, c2, c3))   # copies
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    k0, k1 = (int(k) & MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        np.multiply(c0, _NP_M0, out=p0)                   # c0 * M0 = hi0 * 2^32 + lo0
        np.multiply(c2, _NP_M1, out=p1)                   # c2 * M1 = hi1 * 2^32 + lo1
        np.right_shift(p1, _NP_32, out=c0)
        c0 ^= c1
        c0 ^= np.uint64(k0)                               # c0 <- hi1 ^ c1 ^ k0
        np.right_shift(p0, _NP_32, out=c2)
        c2 ^= c3
        c2 ^= np.uint64(k1)                               # c2 <- hi0 ^ c3 ^ k1
        np.bitwise_and(p1, _NP_MASK32, out=c1)            # c1 <- lo1
        np.bitwise_and(p0, _NP_MASK32, out=c3)            # c3 <- lo0
    return c0, c1, c2, c3


def philox4x32_torch(c0: torch.Tensor, c1: torch.Tensor | int, c2: torch.Tensor | int,
                     c3: torch.Tensor | int, key: tuple[int, int], rounds: int = DEFAULT_ROUNDS,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-``rounds`` in ATen int64 ops that never overflow (any device; the GPU path)."""
    _check_rounds(rounds)
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    dev, shape = c0.device, c0.shape
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=dev).expand(shape) for c in (c1, c2, c3))
    # Both multiplications of a round run as one op on stacked rows: X = [c0; c2], Y = [c3; c1].
    x = torch.stack([c0, c2]).reshape(2, -1)
    y = torch.stack([c3, c1]).reshape(2, -1)
    a, b, t = (torch.empty_like(x) for _ in range(3))
    # mulhilo(m, c) for m, c < 2^32 without int64 overflow: split m = mh * 2^16 + ml, so that
    # a = c * ml and b = c * mh are < 2^48 and m * c = b * 2^16 + a; then
    # hi = (b + (a >> 16)) >> 16 and lo = (a + ((b mod 2^16) << 16)) mod 2^32.
    ml = torch.tensor([[M0 & 0xFFFF], [M1 & 0xFFFF]], dtype=torch.int64, device=dev)
    mh = torch.tensor([[M0 >> 16], [M1 >> 16]], dtype=torch.int64, device=dev)
    k0, k1 = (int(k) & MASK32 for k in key)
    keys = []
    for r in range(rounds):
        keys.append([[k0], [k1]])
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    keys = torch.tensor(keys, dtype=torch.int64, device=dev)         # [rounds, 2, 1]
    for r in range(rounds):
        torch.mul(x, ml, out=a)
        torch.mul(x, mh, out=b)
        torch.bitwise_right_shift(a, 16, out=t)
        t.add_(b).bitwise_right_shift_(16)                           # t = [hi0; hi1]
        b.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(a).bitwise_and_(MASK32)  # b = [lo0; lo1]
        torch.bitwise_xor(t[1], y[1], out=x[0])                      # c0 <- hi1 ^ c1 (^ k0 below)
        torch.bitwise_xor(t[0], y[0], out=x[1])                      # c2 <- hi0 ^ c3 (^ k1 below)
        x.bitwise_xor_(keys[r])
        y, b = b, y                                                  # [c3; c1] <- [lo0; lo1]
    return x[0].view(shape), y[1].view(shape), x[1].view(shape), y[0].view(shape)


def group_words(group_start: int, num_groups: int, *, key: tuple[int, int], stream: int,
                rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 4 words of groups [group_start, group_start + num_groups): int64 ``[num_groups, 4]``."""
    if group_start < 0 or num_groups < 0 or group_start + num_groups > 1 << 62:
        raise ValueError(f"group range [{group_start}, {group_start + num_groups}) is out of [0, 2^62)")
    if not 0 <= stream <= MASK32:
        raise ValueError(f"stream id must be in [0, 2^32), got {stream}")
    _check_key(key)
    out = torch.empty(num_groups, 4, dtype=torch.int64, device=device)
    chunk = chunk_groups(device)
    for s in range(0, num_groups, chunk):
        n = min(chunk, num_groups - s)
        g = torch.arange(group_start + s, group_start + s + n, dtype=torch.int64, device=device)
        words = philox4x32(g & MASK32, g >> 32, stream, 0, key, rounds)
        out[s:s + n] = torch.stack(words, dim=1)
    return out


def element_words(offset: int, numel: int, *, key: tuple[int, int], stream: int,
                  rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """The word of each element in [offset, offset + numel) of stream ``stream``: int64 ``[numel]``."""
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be >= 0, got {offset}, {numel}")
    g0, g1 = offset // 4, (offset + numel + 3) // 4
    words = group_words(g0, g1 - g0, key=key, stream=stream, rounds=rounds, device=device)
    return words.view(-1)[offset - 4 * g0: offset - 4 * g0 + numel]


def words_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """fp32 uniform in [0, 1) from the top 24 bits of each word (exact, never 1.0)."""
    return (words >> 8).to(torch.float32).mul_(_INV_2_24)


def log_f32(u1: torch.Tensor) -> torch.Tensor:
    """Natural log of fp32 ``u1`` in [2^-24, 1] in basic fp32 operations only (bit-reproducible).

    ``u1 = m * 2^e`` split exactly on the bits, m in [sqrt(2)/2, sqrt(2)]; ``s = (m - 1) / (m + 1)``
    (correctly rounded), ``log m = 2 atanh s`` by the series to s^11 in Horner form;
    ``log u1 = e * LN2_HI + (e * LN2_LO + log m)`` (e * LN2_HI exact). Within 2e-7 relative of the
    true log (tested on every input). Each operator below rounds once in fp32, in the kernel too.
    """
    bits = u1.view(torch.int32)
    e = (bits >> 23) - 127
    mb = (bits & 0x7FFFFF) | 0x3F800000
    big = mb > _SQRT2_BITS                                     # m > sqrt(2): use m / 2, e + 1
    mb = torch.where(big, mb - 0x800000, mb)
    e = torch.where(big, e + 1, e).to(torch.float32)           # exact, |e| <= 24
    m = mb.view(torch.float32)
    s = (m - 1.0) / (m + 1.0)                                  # m - 1 exact
    z = s * s
    p = z * _ATANH[4] + _ATANH[3]
    p = p * z + _ATANH[2]
    p = p * z + _ATANH[1]
    p = p * z + _ATANH[0]
    log_m = s * 2.0 + (s * z) * p
    return e * LN2_HI + (e * LN2_LO + log_m)


def sincos_2pi_f32(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos t, sin t) of t = 2 pi k / 2^24 for integer ``k`` in [0, 2^24), in basic fp32 ops only.

    Exact quadrant reduction on the integer: k = q * 2^22 + j, j in [-2^21, 2^21), t = q pi/2 +
    (pi/2) f with f = j / 2^22 in [-1/2, 1/2) (exact); sin and cos of (pi/2) f by their Taylor
    polynomials (to f^9 and f^8, Horner form), then the quadrant's swap and signs. Within 1e-7
    absolute of the true values (tested on every input).
    """
    kk = k.to(torch.int32) + 0x200000
    q = (kk >> 22) & 3
    f = ((kk & 0x3FFFFF) - 0x200000).to(torch.float32) * 2.384185791015625e-07   # * 2^-22, exact
    f2 = f * f
    ps = f2 * _SIN[4] + _SIN[3]
    ps = ps * f2 + _SIN[2]
    ps = ps * f2 + _SIN[1]
    ps = ps * f2 + _SIN[0]
    sn = ps * f
    pc = f2 * _COS[3] + _COS[2]
    pc = pc * f2 + _COS[1]
    pc = pc * f2 + _COS[0]
    cs = pc * f2 + 1.0
    swap = (q & 1) == 1                                        # q = 1: (-s, c); 2: (-c, -s); 3: (s, -c)
    cx, sx = torch.where(swap, sn, cs), torch.where(swap, cs, sn)
    return torch.where((q == 1) | (q == 2), -cx, cx), torch.where(q >= 2, -sx, sx)


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root of fp32 ``x >= 0`` on every device.

    ``torch.sqrt`` of fp32 is not correctly rounded on every CPU build (measured: torch 2.13 CPU,
    AVX-512, 0.7% of results one ulp off, while CUDA's and numpy's are exact). So: a candidate y
    from the fp64 root (within one fp32 ulp), then the exact rounding test — the midpoints
    between y and its fp32 neighbours have 25 significant bits, their squares are exact in fp64,
    and a midpoint's square is never an fp32 number (no ties).
    """
    xd = x.double()
    y = xd.sqrt().float()
    yd = y.double()
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    dn = torch.nextafter(y, torch.zeros_like(y))
    mid_up = (yd + up.double()) * 0.5
    mid_dn = (yd + dn.double()) * 0.5
    y = torch.where(mid_up * mid_up < xd, up, y)
    return torch.where((mid_dn * mid_dn > xd) & (y > 0), dn, y)


def box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp32 normals ``(r cos t, r sin t)`` of the word pairs ``(wa, wb)`` (int64 tensors).

    ``u1 = 1 - u(wa)`` in [2^-24, 1] (exact), ``r = sqrt_f32(-2 log_f32(u1))`` (correctly rounded), ``(cos t, sin t) = sincos_2pi_f32(wb >> 8)``. Only integer ops, fp32 add/sub/mul,
    correctly rounded division and sqrt, no fused multiply-add: the same bits on every device and
    in the Triton kernel, which evaluates the same sequence of operations.
    """
    u1 = torch.sub(1.0, words_to_uniform(wa))
    r = sqrt_f32(log_f32(u1) * -2.0)
    c, s = sincos_2pi_f32(wb >> 8)
    return r * c, r * s


_F32 = np.float32


def box_muller_numpy(wa: np.ndarray, wb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`box_muller` in numpy float32 (the CPU fallback route; int64 word arrays in, fp32 out).

    The same operations in the same order as :func:`log_f32`, :func:`sincos_2pi_f32` and
    :func:`box_muller`; numpy's float32 add/sub/mul/divide/sqrt are IEEE correctly rounded and
    unfused, so the bits equal the ATen route's (tested) at about half its CPU time.
    """
    u1 = _F32(1.0) - (wa >> 8).astype(np.float32) * _F32(_INV_2_24)
    bits = u1.view(np.int32)                                    # log_f32
    e = (bits >> 23) - 127
    mb = (bits & 0x7FFFFF) | 0x3F800000
    big = mb > _SQRT2_BITS
    mb = np.where(big, mb - 0x800000, mb)
    e = np.where(big, e + 1, e).astype(np.float32)
    m = mb.view(np.float32)
    s = (m - _F32(1.0)) / (m + _F32(1.0))
    z = s * s
    p = z * _F32(_ATANH[4]) + _F32(_ATANH[3])
    p = p * z + _F32(_ATANH[2])
    p = p * z + _F32(_ATANH[1])
    p = p * z + _F32(_ATANH[0])
    log_m = s * _F32(2.0) + (s * z) * p
    log_u1 = e * _F32(LN2_HI) + (e * _F32(LN2_LO) + log_m)
    r = np.sqrt(log_u1 * _F32(-2.0))
    kk = (wb >> 8).astype(np.int32) + 0x200000                 # sincos_2pi_f32
    q = (kk >> 22) & 3
    f = ((kk & 0x3FFFFF) - 0x200000).astype(np.float32) * _F32(2.384185791015625e-07)
    f2 = f * f
    ps = f2 * _F32(_SIN[4]) + _F32(_SIN[3])
    ps = ps * f2 + _F32(_SIN[2])
    ps = ps * f2 + _F32(_SIN[1])
    ps = ps * f2 + _F32(_SIN[0])
    sn = ps * f
    pc = f2 * _F32(_COS[3]) + _F32(_COS[2])
    pc = pc * f2 + _F32(_COS[1])
    pc = pc * f2 + _F32(_COS[0])
    cs = pc * f2 + _F32(1.0)
    swap = (q & 1) == 1
    cx, sx = np.where(swap, sn, cs), np.where(swap, cs, sn)
    c, sn = np.where((q == 1) | (q == 2), -cx, cx), np.where(q >= 2, -sx, sx)
    return r * c, r * sn


def words_to_normal(words: torch.Tensor) -> torch.Tensor:
    """fp32 standard normals from int64 words ``[G, 4]`` (whole groups): Box-Muller per pair.

    Pair p of group g (words 2p, 2p+1) gives elements 4g+2p (r cos t) and 4g+2p+1 (r sin t).
    CPU tensors go through :func:`box_muller_numpy`, others through :func:`box_muller` (ATen);
    both give the same bits (tested), and so does the Triton kernel.
    """
    if words.dim() != 2 or words.shape[1] != 4:
        raise ValueError(f"words must have shape [G, 4], got {tuple(words.shape)}")
    if words.device.type != "cpu":
        w = words.view(-1, 2, 2)                                  # [G, pair, (u1 word, u2 word)]
        out = torch.empty(words.shape, dtype=torch.float32, device=words.device)
        o = out.view(-1, 2, 2)
        o[..., 0], o[..., 1] = box_muller(w[..., 0], w[..., 1])
        return out
    wn = words.contiguous().numpy().reshape(-1, 2, 2)
    out = np.empty(wn.shape, dtype=np.float32)
    # slices of BOX_MULLER_GROUPS_CPU groups: temporaries stay in cache
    for s in range(0, wn.shape[0], BOX_MULLER_GROUPS_CPU):
        w = wn[s:s + BOX_MULLER_GROUPS_CPU]
        o = out[s:s + BOX_MULLER_GROUPS_CPU]
        o[..., 0], o[..., 1] = box_muller_numpy(w[..., 0], w[..., 1])
    return torch.from_numpy(out.reshape(-1, 4))


def fill_cpu_(tensors: list[torch.Tensor], key: tuple[int, int], rounds: int, codes: list[int],
              shifts: list[float], scales: list[float], ids: list[int], offsets: list[int]) -> bool:
    """The CPU route of a redraw: fill ``tensors`` in place with the C++ extension (one call for
    the list, up to ``torch.get_num_threads()`` threads over blocks of groups; ``lorafast._cpu_ext``)
    and return True, or return False without touching them when it is switched off
    (``LORAFAST_CPU_EXT=0``) or cannot be built (one warning per process); the caller then takes
    the numpy path. Same bits either way (tested).

    Arguments as validated and lowered by ``lorafast.ops._rerandomize._validate``: contiguous,
    non-overlapping fp32/fp16/bf16 CPU tensors; law codes with fp32 shifts and scales
    (:mod:`lorafast.init_laws`); stream ids in [0, 2^32); offsets with offset + numel <= 2^62.
    Raises RuntimeError if ``LORAFAST_CPU_EXT=1`` and the extension cannot be built.
    """
    from lorafast import _cpu_ext

    return _cpu_ext.fill_(tensors, key, rounds, codes, shifts, scales, ids, offsets)


def _fill_law(code: int, offset: int, numel: int, key, stream: int, rounds: int) -> torch.Tensor | None:
    """fp32 base draws (law ``code`` with scale 1 and shift -0.0, the identity map bit for bit) of
    elements [offset, offset + numel) from the C++ extension, or None when it is not active or
    the arguments are outside its range (the numpy route then draws them or raises)."""
    _check_key(key)
    if not (0 <= offset and 0 <= numel and offset + numel <= 1 << 62 and 0 <= stream <= MASK32
            and not isinstance(rounds, bool) and isinstance(rounds, int) and rounds >= 1):
        return None
    out = torch.empty(numel, dtype=torch.float32)
    return out if fill_cpu_([out], key, rounds, [code], [-0.0], [1.0], [stream], [offset]) else None


def uniform(offset: int, numel: int, *, key: tuple[int, int], stream: int,
            rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) of elements [offset, offset + numel) of stream ``stream``."""
    if torch.device(device).type == "cpu":
        out = _fill_law(1, offset, numel, key, stream, rounds)          # init_laws.LAW_UNIFORM
        if out is not None:
            return out
    return words_to_uniform(element_words(offset, numel, key=key, stream=stream, rounds=rounds, device=device))


def normal(offset: int, numel: int, *, key: tuple[int, int], stream: int,
           rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 standard normals of elements [offset, offset + numel) of stream ``stream``."""
    if torch.device(device).type == "cpu":
        out = _fill_law(2, offset, numel, key, stream, rounds)          # init_laws.LAW_NORMAL
        if out is not None:
            return out
    g0, g1 = offset // 4, (offset + numel + 3) // 4
    z = words_to_normal(group_words(g0, g1 - g0, key=key, stream=stream, rounds=rounds, device=device))
    return z.view(-1)[offset - 4 * g0: offset - 4 * g0 + numel]


assert math.isclose(TWO_PI_F32, 2 * math.pi, rel_tol=1e-7)

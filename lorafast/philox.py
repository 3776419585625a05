"""Counter-based Philox4x32 random numbers in PyTorch (and numpy): THE spec of lorafast's redraws.

Local Random Initialization redraws the local parameters at every step. Their values must depend
only on (seed, step, tensor, element) — not on the device, the launch grid, the block size or how
a tensor is sharded — so that the reference model (this file, run on any device) and the Triton
kernel ``lorafast.kernels.rerandomize`` produce the same numbers. This module defines them; it
imports no triton (integer Philox: numpy uint64 for CPU tensors, ATen int64 ops elsewhere —
two exact implementations of one function, tested equal).

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

Words to floats (all in fp32; every step is exactly rounded, so the two paths agree bit for bit)
    uniform ``u = (w >> 8) * 2^-24`` in [0, 1): the top 24 bits, exact in fp32, never 1.0.
    normal (Box-Muller on word pairs (w0, w1) -> elements 4g, 4g+1 and (w2, w3) -> 4g+2, 4g+3):
    ``u1 = 1 - u(w_even)`` in (0, 1] (exact, never 0), ``u2 = u(w_odd)``,
    ``r = sqrt(-2 * log(u1))``, ``t = 2pi_f32 * u2``, elements ``r * cos(t)``, ``r * sin(t)``.
    The smallest u1 is 2^-24, so |z| <= sqrt(48 ln 2) = 5.77 (the tails beyond 5.77 sigma,
    probability 8e-9, are cut, as in Triton's ``tl.randn``).

Cross-device agreement
    The 32-bit words and the uniforms are bit-exact on every device (integer arithmetic in int64
    that never overflows, then exact fp32 operations). Normals go through log, sqrt, cos and sin:
    sqrt is correctly rounded everywhere, but log/cos/sin come from each device's math library
    (SLEEF or libm on CPU, libdevice on CUDA, numpy under the Triton interpreter), so normals agree
    across devices within a few fp32 ulps, not bit for bit (measured: PyTorch CPU against the
    Triton interpreter's numpy, 65536 normals: at most 4 ulps, |diff| <= 4.8e-7, 77% identical).
    The float draws of uniform and kaiming-uniform laws and zeros are bit-exact.

Speed of this path (CPU: integer Philox in numpy uint64, float maps in ATen ops kept below its
parallel grain size, see ``chunk_groups``): about 40-65 ms per million elements (uniform to
normal), 240 ms for the 3.5M elements of two 768x2304 kaiming matrices and six biases, measured
on a shared, busy 2-core machine. The Triton kernel is the fast path.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "M0", "M1", "W0", "W1", "DEFAULT_ROUNDS", "MASK32", "TWO_PI_F32", "chunk_groups",
    "splitmix64", "derive_key", "philox4x32", "philox4x32_int", "philox4x32_numpy", "philox4x32_torch", "group_words",
    "element_words", "words_to_uniform", "words_to_normal", "uniform", "normal",
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
BOX_MULLER_GROUPS_CPU = 1 << 10


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
    """Philox key (k0, k1), two ints in [0, 2^32), of the draw ``step`` of the stream ``seed``."""
    for name, v in (("seed", seed), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
    k = splitmix64(splitmix64(seed & MASK64) ^ (step & MASK64))
    return k & MASK32, k >> 32


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


def words_to_normal(words: torch.Tensor) -> torch.Tensor:
    """fp32 standard normals from int64 words ``[G, 4]`` (whole groups): Box-Muller per pair.

    Pair p of group g (words 2p, 2p+1) gives elements 4g+2p (r cos t) and 4g+2p+1 (r sin t).
    """
    if words.dim() != 2 or words.shape[1] != 4:
        raise ValueError(f"words must have shape [G, 4], got {tuple(words.shape)}")
    out = torch.empty(words.shape, dtype=torch.float32, device=words.device)
    # On CPU, ATen runs log/sqrt/cos/sin of >= 4096 elements on its thread pool: slices of
    # BOX_MULLER_GROUPS_CPU groups (2048 pairs) keep them on the calling thread (see chunk_groups).
    step = BOX_MULLER_GROUPS_CPU if words.device.type == "cpu" else max(1, words.shape[0])
    for s in range(0, words.shape[0], step):
        u = words_to_uniform(words[s:s + step]).view(-1, 2, 2)      # [G, pair, (u1 word, u2 word)]
        u1 = torch.sub(1.0, u[..., 0])                              # (0, 1], exact
        r = torch.log(u1).mul_(-2.0).sqrt_()
        t = u[..., 1].mul(TWO_PI_F32)
        o = out[s:s + step].view(-1, 2, 2)
        torch.mul(r, torch.cos(t), out=o[..., 0])
        torch.mul(r, torch.sin(t), out=o[..., 1])
    return out


def uniform(offset: int, numel: int, *, key: tuple[int, int], stream: int,
            rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) of elements [offset, offset + numel) of stream ``stream``."""
    return words_to_uniform(element_words(offset, numel, key=key, stream=stream, rounds=rounds, device=device))


def normal(offset: int, numel: int, *, key: tuple[int, int], stream: int,
           rounds: int = DEFAULT_ROUNDS, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 standard normals of elements [offset, offset + numel) of stream ``stream``."""
    g0, g1 = offset // 4, (offset + numel + 3) // 4
    z = words_to_normal(group_words(g0, g1 - g0, key=key, stream=stream, rounds=rounds, device=device))
    return z.view(-1)[offset - 4 * g0: offset - 4 * g0 + numel]


assert math.isclose(TWO_PI_F32, 2 * math.pi, rel_tol=1e-7)

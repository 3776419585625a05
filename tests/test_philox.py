"""The PyTorch Philox reference generator (lorafast.philox) and the init laws (lorafast.init_laws)."""
import math

import numpy as np
import pytest
import torch

from lorafast import init_laws, philox
from lorafast.init_laws import KaimingUniform, Normal, Uniform, Zeros

# Random123 kat_vectors (github.com/DEShawResearch/random123, tests/kat_vectors):
# name rounds counter[4] key[2] -> output[4]
KAT = [
    (10, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    (7, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]


@pytest.mark.parametrize("rounds,ctr,key,want", KAT)
def test_known_answer_vectors(rounds, ctr, key, want):
    assert philox.philox4x32_int(ctr, key, rounds) == want
    # tensor path: the KAT counter in every lane of a batch, and as broadcast scalars
    c = [torch.full((5,), v, dtype=torch.int64) for v in ctr]
    for words in (philox.philox4x32(*c, key, rounds), philox.philox4x32(c[0], *ctr[1:], key, rounds),
                  philox.philox4x32_torch(*c, key, rounds)):
        got = tuple(int(w[i]) for w in words for i in (0,))
        assert got == want, [hex(x) for x in got]
        assert all(bool((w == w[0]).all()) for w in words)


def test_numpy_and_torch_paths_match_integer_path():
    gen = torch.Generator().manual_seed(1)
    ctr = torch.randint(0, 1 << 32, (4, 64), generator=gen, dtype=torch.int64)
    key = (0x1234ABCD, 0xFEDCBA98)
    words = philox.philox4x32(*ctr, key)                 # CPU: the numpy path
    assert all(torch.equal(a, b) for a, b in zip(words, philox.philox4x32_torch(*ctr, key)))
    for j in range(64):
        want = philox.philox4x32_int(tuple(int(c[j]) for c in ctr), key)
        assert tuple(int(w[j]) for w in words) == want
    assert all(int(w.min()) >= 0 and int(w.max()) <= philox.MASK32 for w in words)


def test_derive_key():
    assert philox.derive_key(0, 0) == philox.derive_key(0, 0)
    keys = {philox.derive_key(s, t) for s in range(8) for t in range(64)}
    assert len(keys) == 8 * 64
    k0, k1 = philox.derive_key(-1, 2 ** 70)   # reduced mod 2^64
    assert 0 <= k0 <= philox.MASK32 and 0 <= k1 <= philox.MASK32
    with pytest.raises(TypeError):
        philox.derive_key(1.0, 0)
    with pytest.raises(TypeError):
        philox.derive_key(0, torch.tensor(1))


def test_counter_layout_and_slices():
    key = philox.derive_key(3, 7)
    w = philox.group_words(5, 3, key=key, stream=9)
    for j, g in enumerate(range(5, 8)):
        assert tuple(int(x) for x in w[j]) == philox.philox4x32_int((g, 0, 9, 0), key)
    full = philox.element_words(0, 101, key=key, stream=9)
    for o, n in [(0, 101), (1, 7), (3, 50), (4, 97), (99, 2)]:
        assert torch.equal(philox.element_words(o, n, key=key, stream=9), full[o:o + n])
    assert torch.equal(philox.normal(13, 40, key=key, stream=9), philox.normal(0, 60, key=key, stream=9)[13:53])
    # group indices past 2^32 use the high counter word
    g = (1 << 33) + 5
    w = philox.element_words(4 * g + 2, 3, key=key, stream=1)
    ref = philox.philox4x32_int((g & philox.MASK32, g >> 32, 1, 0), key)
    ref2 = philox.philox4x32_int(((g + 1) & philox.MASK32, (g + 1) >> 32, 1, 0), key)
    assert [int(x) for x in w] == [ref[2], ref[3], ref2[0]]


def test_uniform_limits():
    w = torch.tensor([0, 1, 255, 256, philox.MASK32, philox.MASK32 - 255], dtype=torch.int64)
    u = philox.words_to_uniform(w)
    assert u.dtype == torch.float32
    assert u.tolist() == [0.0, 0.0, 0.0, 2.0 ** -24, 1 - 2.0 ** -24, 1 - 2.0 ** -24]
    # u1 = 1 (r = 0); u1 = 2^-24 with t = 0 and t = 2 pi (1 - 2^-24): |z| at the truncation bound
    z = philox.words_to_normal(torch.tensor([[0, 0, philox.MASK32, 0], [0, philox.MASK32, philox.MASK32, philox.MASK32]],
                                            dtype=torch.int64))
    assert torch.isfinite(z).all()
    assert z[0, :2].tolist() == [0.0, 0.0] and z[1, :2].tolist() == [0.0, 0.0]   # u1 = 1 -> r = 0
    bound = math.sqrt(48 * math.log(2))
    assert abs(float(z[0, 2]) - bound) <= 4e-7 * bound and float(z[0, 3]) == 0.0   # exact cos 0, sin 0
    assert abs(float(z[1, 2]) - bound) <= 4e-7 * bound and abs(float(z[1, 3])) < 1e-5


def test_uniform_ks_statistic():
    scipy_stats = pytest.importorskip("scipy.stats")
    u = philox.uniform(0, 10 ** 6, key=philox.derive_key(0, 0), stream=0)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    stat = scipy_stats.kstest(u.double().numpy(), "uniform").statistic
    assert stat < 0.01, stat


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import ndtr
        return ndtr(x)
    except ImportError:
        return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])


def test_normal_moments_and_ks():
    z = philox.normal(0, 10 ** 6, key=philox.derive_key(1, 2), stream=3).double()
    assert abs(float(z.mean())) < 1e-2 and abs(float(z.std()) - 1) < 1e-2
    bound = math.sqrt(48 * math.log(2))
    assert 4.4 < float(z.abs().max()) <= bound + 1e-5          # 1e6 draws: E max|z| ~ 4.9
    assert 0.30 < float((z.abs() > 1).double().mean()) < 0.335       # P(|z| > 1) = 0.3173
    x = np.sort(z.numpy())
    cdf = _normal_cdf(x)
    n = x.size
    ks = max(float((np.arange(1, n + 1) / n - cdf).max()), float((cdf - np.arange(n) / n).max()))
    assert ks < 0.01, ks


# --------------------------------------------------------------------------- bit-exact Box-Muller
# A few normals, bit patterns pinned: the values lorafast promises on every device and machine.
GOLDEN_NORMALS = [
    ((0, 0), 0, 0, [0x401765FB, 0xBED67615, 0xBFA2F501, 0x3F8B9440, 0x3F80E76E, 0x3FBE1095, 0xBEB3D13C, 0x3E3E3896]),
    ((7, 123), 0xDEADBEEF, (1 << 34) + 1, [0xBF43806A, 0xBEEC74E8, 0x3F8E0ABD, 0xBF660B94]),
]


@pytest.mark.parametrize("seed_step,stream,offset,bits", GOLDEN_NORMALS)
def test_golden_normals(seed_step, stream, offset, bits):
    z = philox.normal(offset, len(bits), key=philox.derive_key(*seed_step), stream=stream)
    assert [b & philox.MASK32 for b in z.view(torch.int32).tolist()] == bits


def test_normal_routes_bit_identical():
    """numpy float route (CPU) == ATen route (other devices) == a from-scratch numpy statement,
    on words from the numpy and the int64 ATen Philox routes: the same bits everywhere."""
    key, n = philox.derive_key(4, 5), 1 << 15                            # 131072 normals
    g = torch.arange(n, dtype=torch.int64)
    w_np = torch.stack(philox.philox4x32(g, 0, 17, 0, key), dim=1)       # numpy Philox
    w_t = torch.stack(philox.philox4x32_torch(g, 0, 17, 0, key), dim=1)  # ATen int64 Philox
    assert torch.equal(w_np, w_t)
    z_np = philox.words_to_normal(w_np)                                  # numpy Box-Muller
    z_t = philox.words_to_normal(w_t)
    w = w_t.view(-1, 2, 2)
    z_aten = torch.stack(philox.box_muller(w[..., 0], w[..., 1]), dim=-1).view(-1, 4)   # ATen route
    bits = lambda t: t.view(torch.int32)  # noqa: E731
    assert torch.equal(bits(z_np), bits(z_t)) and torch.equal(bits(z_np), bits(z_aten))
    assert torch.equal(z_np.view(-1)[: 8 * 4096], philox.normal(0, 8 * 4096, key=key, stream=17))


def test_log_sincos_sqrt_on_every_input():
    # log_f32 on all 2^24 values of u1 = k 2^-24
    u1 = torch.arange(1, (1 << 24) + 1, dtype=torch.int64).float().mul_(2.0 ** -24)
    got = philox.log_f32(u1).double()
    want = torch.log(u1.double())
    assert float(got[-1]) == 0.0 and bool((got[:-1] < 0).all())
    assert float(((got - want).abs() / want.abs().clamp_min(1e-30))[:-1].max()) < 2e-7
    # sin and cos of t = 2 pi k / 2^24 on all 2^24 k; exact at multiples of pi/2
    k = torch.arange(0, 1 << 24, dtype=torch.int64)
    c, s = philox.sincos_2pi_f32(k)
    t = k.double() * (2 * math.pi / 2 ** 24)
    assert float((c.double() - torch.cos(t)).abs().max()) < 1.2e-7
    assert float((s.double() - torch.sin(t)).abs().max()) < 1.2e-7
    q = torch.tensor([0, 1 << 22, 2 << 22, 3 << 22])
    cq, sq = philox.sincos_2pi_f32(q)
    assert cq.tolist() == [1.0, 0.0, -1.0, 0.0] and sq.tolist() == [0.0, 1.0, 0.0, -1.0]
    # correctly rounded sqrt (numpy's float32 sqrt is IEEE) on every -2 log u1 and random inputs
    x = torch.cat([got.float().mul(-2.0), torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) * 40])
    assert np.array_equal(philox.sqrt_f32(x).numpy().view(np.int32), np.sqrt(x.numpy()).view(np.int32))


def test_streams_uncorrelated():
    n = 1 << 16
    k = philox.derive_key(0, 0)
    a = philox.uniform(0, n, key=k, stream=0).double()
    others = [philox.uniform(0, n, key=philox.derive_key(0, 1), stream=0),   # next step
              philox.uniform(0, n, key=philox.derive_key(1, 0), stream=0),   # other seed
              philox.uniform(0, n, key=k, stream=1),                         # other tensor
              philox.uniform(1, n, key=k, stream=0)]                         # shifted by one
    for b in others:
        corr = torch.corrcoef(torch.stack([a, b.double()]))[0, 1]
        assert abs(float(corr)) < 0.02


# --------------------------------------------------------------------------- init laws
def test_laws_validate_at_construction():
    with pytest.raises(ValueError):
        Normal(0.0, -1.0)
    with pytest.raises(ValueError):
        Normal(float("nan"), 1.0)
    with pytest.raises(ValueError):
        Uniform(1.0, 0.0)
    with pytest.raises(TypeError):
        Uniform("0", 1.0)
    with pytest.raises(ValueError):
        KaimingUniform(mode="fan_avg")
    with pytest.raises(ValueError):
        KaimingUniform(nonlinearity="swish")
    with pytest.raises(ValueError):
        KaimingUniform(fan=0)
    with pytest.raises(ValueError):
        KaimingUniform().lower((5,))              # 1-D: no fan, as in torch
    with pytest.raises(Exception):
        Normal().std = 2.0                        # frozen
    assert Normal() == Normal(0.0, 1.0) and Zeros().lower((3,)) == (init_laws.LAW_ZEROS, 0.0, 0.0)


@pytest.mark.parametrize("shape", [(64, 32), (8, 4, 3, 3), (5, 7)])
@pytest.mark.parametrize("mode,nonlin,a", [("fan_in", "leaky_relu", math.sqrt(5)), ("fan_out", "relu", 0.0),
                                           ("fan_in", "tanh", 0.0)])
def test_kaiming_bound_matches_torch(shape, mode, nonlin, a):
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    fan = fan_in if mode == "fan_in" else fan_out
    want = math.sqrt(3.0) * (torch.nn.init.calculate_gain(nonlin, a) / math.sqrt(fan))
    law = KaimingUniform(a=a, mode=mode, nonlinearity=nonlin)
    assert law.bound(shape) == want
    assert KaimingUniform(a=a, mode=mode, nonlinearity=nonlin, fan=fan).bound((3,)) == want  # shard
    code, shift, scale = law.lower(shape)
    assert code == init_laws.LAW_UNIFORM and shift == -scale / 2
    assert shift == init_laws.to_fp32(-want)


def test_lowering_is_fp32():
    code, shift, scale = Uniform(-0.1, 0.3).lower()
    assert code == init_laws.LAW_UNIFORM
    assert shift == float(torch.tensor(-0.1, dtype=torch.float32)) and scale == float(torch.tensor(0.4, dtype=torch.float32))
    assert Normal(0.5, 0.02).lower() == (init_laws.LAW_NORMAL, init_laws.to_fp32(0.5), init_laws.to_fp32(0.02))


# --------------------------------------------------------------------------- C++ CPU extension
# lorafast/csrc/philox_cpu.cpp (loaded by lorafast._cpu_ext): bit for bit the numpy path, for
# every law, dtype, offset, list shape, thread count and block size; the numpy path when it is off
# (LORAFAST_CPU_EXT=0) or cannot be built (one warning).
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

from lorafast import _cpu_ext  # noqa: E402
from lorafast.ops._rerandomize import _validate, rerandomize_  # noqa: E402

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_ALL_LAWS = [Normal(0.1, 0.5), Normal(), Uniform(-2.0, 3.0), Uniform(), KaimingUniform(fan=37), Zeros()]
# element offsets: unaligned starts, across 2^31 and 2^32 elements, group indices past 2^32, near 2^62
_OFFSETS = [0, 1, 2, 3, 4099, (1 << 31) - 3, (1 << 32) + 1, (1 << 34) + 2, (1 << 40) + 3, (1 << 62) - 5000]
_SIZES = [1, 2, 3, 5, 4097, 1001, 7, 2000, 64, 3]


def _can_build() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


@pytest.fixture
def ext():
    """The built extension; skipped only where no compiler or ninja exists (then it must not build)."""
    if not _can_build():
        pytest.skip("no C++ compiler or ninja here: the numpy path is the CPU route")
    return _cpu_ext.library(required=True)


def _assert_bits_equal(ref, got, where=""):
    for i, (a, b) in enumerate(zip(ref, got)):
        bad = a.view(_INT[a.dtype]) != b.view(_INT[b.dtype])
        if bad.any():
            k = int(bad.flatten().nonzero()[0])
            raise AssertionError(f"{where} tensor {i} ({a.dtype}, {a.numel()} elements): {int(bad.sum())} differ, "
                                 f"first at {k}: {a.flatten()[k]} vs {b.flatten()[k]}")


def _lowered(tensors, laws, ids, offsets, rounds=10):
    return _validate(tensors, laws, ids, offsets, rounds)[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("law", _ALL_LAWS, ids=lambda law: repr(law))
def test_extension_equals_numpy_path(ext, dtype, law):
    # one list: ragged sizes at unaligned offsets and offsets past 2^31, 2^32, 2^34 (group > 2^32)
    ids = [7, 0, 1 << 31, 0xFFFFFFFF, 12345, 99, 3, 4, 5, 6]
    ref = [torch.empty(n, dtype=dtype) for n in _SIZES]
    got = [torch.full((n,), 7.0, dtype=dtype) for n in _SIZES]
    with _cpu_ext.disabled():
        rerandomize_(ref, seed=21, step=8, init=law, ids=ids, offsets=_OFFSETS, impl="torch")
    codes, shifts, scales, ids_, offs = _lowered(got, law, ids, _OFFSETS)
    key = philox.derive_key(21, 8)
    for threads, block_g in [(None, _cpu_ext.BLOCK_G), (1, 1), (2, 7), (3, 1024)]:
        for t in got:
            t.fill_(7.0)
        assert _cpu_ext.fill_(got, key, 10, codes, shifts, scales, ids_, offs, num_threads=threads, block_g=block_g)
        _assert_bits_equal(ref, got, f"threads={threads} block_g={block_g}")
    for t in got:
        t.fill_(7.0)
    rerandomize_(got, seed=21, step=8, init=law, ids=ids, offsets=_OFFSETS, impl="torch")   # the op's route
    _assert_bits_equal(ref, got, "rerandomize_")


def test_extension_many_small_tensors_and_rounds(ext):
    gen = torch.Generator().manual_seed(5)
    n = 400
    sizes = torch.randint(0, 13, (n,), generator=gen).tolist()
    dtypes = [(torch.float32, torch.float16, torch.bfloat16)[i % 3] for i in range(n)]
    laws = [_ALL_LAWS[i % len(_ALL_LAWS)] for i in range(n)]
    laws = [KaimingUniform(fan=5) if isinstance(law, KaimingUniform) else law for law in laws]
    ids = torch.randint(0, 1 << 32, (n,), generator=gen, dtype=torch.int64).tolist()
    offsets = [int(o) for o in torch.randint(0, 1 << 40, (n,), generator=gen, dtype=torch.int64)]
    for rounds in (10, 7, 3):
        ref = [torch.empty(s, dtype=d) for s, d in zip(sizes, dtypes)]
        got = [torch.empty(s, dtype=d) for s, d in zip(sizes, dtypes)]
        with _cpu_ext.disabled():
            rerandomize_(ref, seed=1, step=2, init=laws, ids=ids, offsets=offsets, rounds=rounds, impl="torch")
        rerandomize_(got, seed=1, step=2, init=laws, ids=ids, offsets=offsets, rounds=rounds, impl="torch")
        _assert_bits_equal(ref, got, f"rounds={rounds}")


def test_extension_large_tensor_threads_and_blocks(ext):
    # 2^18 elements (1024 blocks): every thread count and block size gives the numpy path's bits
    ref = [torch.empty(1 << 18, dtype=torch.float16), torch.empty(3 * 4096 + 1)]
    laws, ids, offsets = [Normal(0.0, 0.02), Uniform(-0.1, 0.1)], [3, 4], [6, (1 << 33) + 1]
    with _cpu_ext.disabled():
        rerandomize_(ref, seed=2, step=3, init=laws, ids=ids, offsets=offsets, impl="torch")
    got = [torch.empty_like(t) for t in ref]
    lowered = _lowered(got, laws, ids, offsets)
    for threads in (1, 2, 4):
        for block_g in (1, 100, 1024):
            assert _cpu_ext.fill_(got, philox.derive_key(2, 3), 10, *lowered, num_threads=threads, block_g=block_g)
            _assert_bits_equal(ref, got, f"threads={threads} block_g={block_g}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)                       # the default thread count follows torch's
        rerandomize_(got, seed=2, step=3, init=laws, ids=ids, offsets=offsets, impl="torch")
    finally:
        torch.set_num_threads(before)
    _assert_bits_equal(ref, got, "torch.set_num_threads(1)")
    v = got[0]._version
    rerandomize_(got, seed=2, step=4, init=laws, ids=ids, offsets=offsets, impl="torch")
    assert got[0]._version > v                         # in-place writes are visible to autograd


def test_extension_threads_stress(ext):
    # many short jobs of 1-group blocks on 4 threads (helpers claim, the caller takes over blocks
    # they have not written): every call equals the 1-thread draw, and nothing is written into a
    # tensor after the call has returned (each is zeroed right after its check and must stay so)
    ref = torch.empty(4093, dtype=torch.bfloat16)
    lowered = _lowered([ref], Normal(1.0, 2.0), [11], [1])
    filled = []
    for step in range(60):
        key = philox.derive_key(8, step)
        t = torch.empty_like(ref)
        assert _cpu_ext.fill_([ref], key, 10, *lowered, num_threads=1, block_g=1)
        assert _cpu_ext.fill_([t], key, 10, *lowered, num_threads=4, block_g=1)
        _assert_bits_equal([ref], [t], f"step {step}")
        filled.append(t.zero_())
    time.sleep(0.05)
    assert not any(t.any() for t in filled)


def test_extension_bad_arguments(ext):
    t = torch.empty(8)
    lowered = _lowered([t], Normal(), [0], [0])
    for kw in (dict(block_g=0), dict(block_g=1025), dict(num_threads=0)):
        with pytest.raises(ValueError):
            _cpu_ext.fill_([t], (1, 2), 10, *lowered, **kw)
    with pytest.raises(ValueError):
        _cpu_ext.fill_([t], (1, 2), 0, *lowered)
    with pytest.raises(ValueError):
        philox.uniform(-1, 4, key=(1, 2), stream=0)
    with pytest.raises(ValueError):
        philox.normal(0, 4, key=(1, 2), stream=1 << 32)


# elements of the stream (seed 0, step 0, id 0) whose normal is a signed zero: u1 = 1 (r = -0.0) at
# 1331152-3 and 29108772-3; sin or cos exactly 0 at 13411196 and 7100157
SIGNED_ZEROS = [(1331150, [0xBF47EE87, 0x3FAC947A, 0x80000000, 0x80000000, 0x3F21C4BC, 0xBF0FEA5B]),
                (29108770, [0xBF1B8616, 0xBF9EA982, 0x80000000, 0x00000000, 0x3ED1602C, 0x3F212E56]),
                (13411194, [0x3EE57683, 0x3F87C398, 0x00000000, 0xBF9B43BC, 0xBE85E314, 0xBF78B9B5]),
                (7100156, [0xBF8F1FF4, 0x80000000, 0x3FAB6762, 0xBDE2C1C1, 0xBF21619B, 0x3CB76857])]


@pytest.mark.parametrize("offset,bits", SIGNED_ZEROS)
def test_signed_zeros_both_routes(offset, bits):
    key = philox.derive_key(0, 0)
    for route in ("auto", "numpy"):
        if route == "numpy":
            with _cpu_ext.disabled():
                z = philox.normal(offset, len(bits), key=key, stream=0)
        else:
            z = philox.normal(offset, len(bits), key=key, stream=0)
        assert [b & philox.MASK32 for b in z.view(torch.int32).tolist()] == bits, route


def test_uniform_and_normal_routes_equal(ext):
    key = philox.derive_key(9, 1 << 40)
    for fn in (philox.uniform, philox.normal):
        for offset, n in [(0, 1 << 16), (3, 4097), ((1 << 34) + 1, 999)]:
            got = fn(offset, n, key=key, stream=0xFFFFFFFF, rounds=7)
            with _cpu_ext.disabled():
                ref = fn(offset, n, key=key, stream=0xFFFFFFFF, rounds=7)
            _assert_bits_equal([ref], [got], f"{fn.__name__} offset {offset}")


def _fp32_patterns() -> torch.Tensor:
    """Every sign/exponent/top-7-mantissa-bits prefix (65536) with low 16 bits that sit on, next to
    and between the rounding points of fp16 (bit 13, or higher for subnormals) and bf16 (bit 16)."""
    hi = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = [0, 1, 2, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000,
            0x3FFF, 0x4000, 0x5000, 0x6000, 0x7000, 0x9000, 0xC000, 0xE000, 0x1234, 0xABCD]
    bits = (hi[:, None] + torch.tensor(lows, dtype=torch.int64)[None, :]).flatten()
    rand = torch.randint(0, 1 << 32, (1 << 20,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    bits = torch.cat([bits, rand])
    x = bits.to(torch.int32).view(torch.float32)      # int64 -> int32 keeps the low 32 bits
    return x[~torch.isnan(x)]                          # NaN payloads differ between torch's own paths


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_bf16_rounding_matches_torch(ext, dtype):
    x = _fp32_patterns()
    want = x.to(dtype).view(torch.int16)
    got = _cpu_ext.round_to(x, dtype).view(torch.int16)
    bad = (want != got).nonzero().flatten()
    assert bad.numel() == 0, [(hex(int(x[i].view(torch.int32)) & philox.MASK32), hex(int(want[i]) & 0xFFFF),
                               hex(int(got[i]) & 0xFFFF)) for i in bad[:5]]


@pytest.mark.skipif(os.environ.get("LORAFAST_TEST_EXHAUSTIVE", "0") in ("", "0"),
                    reason="all 2^32 fp32 inputs: set LORAFAST_TEST_EXHAUSTIVE=1 (3-6 min)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_bf16_rounding_every_fp32(ext, dtype):
    step = 1 << 24
    for start in range(0, 1 << 32, step):
        x = torch.arange(start, start + step, dtype=torch.int64).to(torch.int32).view(torch.float32)
        x = x[~torch.isnan(x)]
        if x.numel():
            assert torch.equal(x.to(dtype).view(torch.int16), _cpu_ext.round_to(x, dtype).view(torch.int16)), hex(start)


@pytest.fixture
def fresh_ext_state(monkeypatch, tmp_path):
    """A process state in which the extension has not been tried yet, building under tmp_path."""
    monkeypatch.setattr(_cpu_ext, "_state", {"lib": None, "tried": False, "error": None, "warned": False,
                                             "build_s": None})
    monkeypatch.setenv("LORAFAST_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv(_cpu_ext.ENV, raising=False)
    return tmp_path


def _mixed_draw():
    ts = [torch.empty(301, dtype=torch.float16), torch.empty(33, 7), torch.empty(45, dtype=torch.bfloat16)]
    return ts, dict(seed=4, step=5, init=[Normal(0.1, 0.5), KaimingUniform(), Uniform(-1.0, 2.0)],
                    offsets=[3, 0, (1 << 33) + 1], impl="torch")


@pytest.mark.parametrize("how", ["no compiler", "unwritable build directory"])
def test_fallback_warns_once_and_draws_the_same(fresh_ext_state, monkeypatch, how):
    if how == "no compiler":
        monkeypatch.setenv("CXX", str(fresh_ext_state / "no-such-c++"))
    else:
        (fresh_ext_state / "file").write_text("")
        monkeypatch.setenv("LORAFAST_EXT_DIR", str(fresh_ext_state / "file" / "ext"))
    ref, kw = _mixed_draw()
    with _cpu_ext.disabled():
        rerandomize_(ref, **kw)
    got, _ = _mixed_draw()
    with pytest.warns(RuntimeWarning, match="numpy path") as record:
        rerandomize_(got, **kw)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    _assert_bits_equal(ref, got, how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once per process
        rerandomize_(got, **kw)
        philox.uniform(0, 10, key=(1, 2), stream=0)
    monkeypatch.setenv(_cpu_ext.ENV, "1")               # required: an error, not a fallback
    with pytest.raises(RuntimeError, match="unavailable"):
        rerandomize_(got, **kw)


def test_switched_off_builds_nothing(fresh_ext_state, monkeypatch):
    monkeypatch.setenv(_cpu_ext.ENV, "0")
    ts, kw = _mixed_draw()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rerandomize_(ts, **kw)
    assert not _cpu_ext._state["tried"] and not (fresh_ext_state / "ext").exists()
    monkeypatch.setenv(_cpu_ext.ENV, "yes")
    with pytest.raises(ValueError, match="LORAFAST_CPU_EXT"):
        rerandomize_(ts, **kw)


def test_prebuilt_library_loads_without_writing(ext, monkeypatch, tmp_path):
    # a finished build (library + marker) is loaded directly, writing nothing: read-only works
    name, built = _cpu_ext.build_name(), _cpu_ext.build_dir()
    d = tmp_path / name
    d.mkdir()
    for f in (f"{name}.so", f"{name}.done"):
        shutil.copy(built / f, d / f)
    monkeypatch.setenv("LORAFAST_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(_cpu_ext, "_state", {"lib": None, "tried": False, "error": None, "warned": False,
                                             "build_s": None})
    assert _cpu_ext.library(required=True) is not None and _cpu_ext._state["build_s"] is None
    assert sorted(p.name for p in d.iterdir()) == sorted([f"{name}.so", f"{name}.done"])


_CHILD = """
import torch
from lorafast import _cpu_ext, philox
_cpu_ext.library(required=True)
z = philox.normal(5, 1 << 16, key=philox.derive_key(1, 2), stream=3)
print(int(z.view(torch.int32).double().sum()), _cpu_ext._state["build_s"] is not None)
"""


def test_concurrent_first_builds_with_a_stale_lock(ext, tmp_path):
    # two processes build into one fresh directory at once, in which a killed build left torch's
    # FileBaton lock file (torch alone would wait for it forever): one builds, the other waits
    # on the directory lock and loads; both draw the same values as this process
    root = tmp_path / "ext"
    stale = root / _cpu_ext.build_name() / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    env = dict(os.environ, LORAFAST_EXT_DIR=str(root), **{_cpu_ext.ENV: "1"})
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [out.split() for out, _ in outs]
    z = philox.normal(5, 1 << 16, key=philox.derive_key(1, 2), stream=3)
    assert [r[0] for r in results] == [str(int(z.view(torch.int32).double().sum()))] * 2
    assert sorted(r[1] for r in results) == ["False", "True"]          # exactly one built
    assert not stale.exists() and (stale.parent / f"{_cpu_ext.build_name()}.done").exists()

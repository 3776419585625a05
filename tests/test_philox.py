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

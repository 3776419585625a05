"""rerandomize_: the PyTorch path (the spec, lorafast.philox) and the one-launch Triton kernel
(run here by the interpreter; GPU checks are marked ``cuda``)."""
import math
import zlib

import pytest
import torch

from lorafast import philox
from lorafast.init_laws import KaimingUniform, Normal, Uniform, Zeros
from lorafast.ops._rerandomize import rerandomize_

EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _mixed():
    """A mixed list: dtypes, laws, ragged sizes (not multiples of 4), an empty tensor."""
    tensors = [torch.empty(33, 7), torch.empty(301, dtype=torch.float16), torch.empty(3, 45, dtype=torch.bfloat16),
               torch.empty(0), torch.empty(2, 257), torch.empty(9, dtype=torch.bfloat16),
               torch.empty(11, 10, dtype=torch.float16), torch.empty(6)]
    laws = [KaimingUniform(), Normal(0.1, 0.5), Uniform(-2.0, 3.0), Normal(), Normal(0.0, 0.02),
            Normal(1.0, 3.0), KaimingUniform(nonlinearity="relu", a=0.0), Zeros()]
    return tensors, laws


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def _assert_same_draw(ref, got, law, where=""):
    """Every law, normals included: the same bits."""
    assert ref.dtype == got.dtype and ref.shape == got.shape, where
    bad = _bits(ref) != _bits(got.cpu())
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{where}: {type(law).__name__} draw differs at {i} ({int(bad.sum())} elements): "
                             f"{ref.flatten()[i]} vs {got.flatten()[i]}")


def test_kernel_matches_torch_mixed_list():
    ref, laws = _mixed()
    got, _ = _mixed()
    ids = [zlib.crc32(f"p{i}".encode()) for i in range(len(ref))]
    rerandomize_(ref, seed=11, step=3, init=laws, ids=ids, impl="torch")
    rerandomize_(got, seed=11, step=3, init=laws, ids=ids, impl="triton")
    for i, (a, b, law) in enumerate(zip(ref, got, laws)):
        assert a.dtype == b.dtype and torch.isfinite(a.float()).all()
        _assert_same_draw(a, b, law, f"tensor {i}")
    assert not ref[-1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_normals_bit_exact(dtype):
    # 65536 normals of one tensor, then shards at offsets off group boundaries and past 2^32
    # groups, several laws in one list: kernel (interpreter) == PyTorch path, bit for bit
    n = 1 << 16
    ref, got = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    rerandomize_([ref], seed=123, step=45, init=Normal(), ids=[6], impl="torch")
    rerandomize_([got], seed=123, step=45, init=Normal(), ids=[6], impl="triton")
    _assert_same_draw(ref, got, Normal(), f"{dtype}")
    offsets = [1, 4099, (1 << 34) + 3, (1 << 40) + 2]
    laws = [Normal(0.1, 0.5), Normal(), Normal(-2.0, 3.0), Normal(0.0, 0.02)]
    ref = [torch.empty(1001 + 3 * i, dtype=dtype) for i in range(4)]
    got = [torch.empty_like(t) for t in ref]
    for ts, impl in ((ref, "torch"), (got, "triton")):
        rerandomize_(ts, seed=9, step=2, init=laws, ids=[7] * 4, offsets=offsets, impl=impl)
    for i, (a, b, law) in enumerate(zip(ref, got, laws)):
        _assert_same_draw(a, b, law, f"{dtype} shard {i}")
    # a shard is the slice of the full draw (both paths)
    full = torch.empty(6000, dtype=dtype)
    rerandomize_([full], seed=9, step=2, init=laws[1], ids=[7], impl="torch")
    assert torch.equal(_bits(got[1]), _bits(full[4099:4099 + 1004]))


def test_uniform_bits_are_the_philox_words():
    key = philox.derive_key(5, 9)
    want = philox.uniform(0, 1001, key=key, stream=77)
    for impl in ("torch", "triton"):
        t = torch.empty(1001)
        rerandomize_([t], seed=5, step=9, init=Uniform(0.0, 1.0), ids=[77], impl=impl)
        assert torch.equal(t, want), impl       # fp32 1 * u + 0 = u exactly
        assert float(t.max()) < 1.0 and float(t.min()) >= 0.0


def test_independent_of_block_size_and_list():
    from lorafast.kernels.rerandomize import rerandomize_launch

    ref, laws = _mixed()
    rerandomize_(ref, seed=1, step=2, init=laws, impl="triton")
    got, _ = _mixed()
    codes, shifts, scales = zip(*(law.lower(tuple(t.shape)) for law, t in zip(laws, got)))
    key = philox.derive_key(1, 2)
    rerandomize_launch(got, k0=key[0], k1=key[1], codes=list(codes), shifts=list(shifts), scales=list(scales),
                       ids=list(range(len(got))), offsets=[0] * len(got), block_g=16, num_warps=1)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    # a tensor's values depend on its id, not on its neighbours in the list
    alone = torch.empty(2, 257)
    rerandomize_([alone], seed=1, step=2, init=laws[4], ids=[4], impl="triton")
    assert torch.equal(alone, ref[4])


@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_rows_of_several_chunks(aligned):
    # the GPU launch: programs of ROW_ITERS chunks of BLOCK_G groups, rows cut at multiples of 2^32
    # groups, every law (the uniform of a tiny scale keeps its 2^-24 apart), interior and ragged
    # chunks; here with 16-group chunks, 3 per row: bit-equal to the PyTorch path
    from lorafast.kernels.rerandomize import GROUP_SPAN, _metadata, rerandomize_launch

    span = 4 * GROUP_SPAN                                 # elements per 2^32 groups
    shapes = [(3, 100), (501,), (64,), (250,), (90,), (777,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float16]
    laws = [Normal(0.5, 2.0), Uniform(-1.0, 3.0), Zeros(), Uniform(0.0, 1e-35), Normal(), KaimingUniform(fan=7)]
    offsets = [0, span - 200, 4 * 97, span * 3 - 8, 2 * span + 40, span - 400]   # 1, 3, 5 cross 2^32 groups
    if not aligned:
        offsets = [o + 1 + i % 3 for i, o in enumerate(offsets)]
    ids = [zlib.crc32(f"t{i}".encode()) for i in range(len(shapes))]
    ref = [torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)]
    got = [torch.empty_like(t) for t in ref]
    rerandomize_(ref, seed=4, step=7, init=laws, ids=ids, offsets=offsets, impl="torch")
    codes, shifts, scales = zip(*(law.lower(tuple(t.shape)) for law, t in zip(laws, got)))
    key = philox.derive_key(4, 7)
    args = dict(k0=key[0], k1=key[1], codes=list(codes), shifts=list(shifts), scales=list(scales), ids=ids,
                offsets=offsets)
    rerandomize_launch(got, **args, block_g=16, row_iters=3, num_warps=1)
    for i, (a, b, law) in enumerate(zip(ref, got, laws)):
        _assert_same_draw(a, b, law, f"tensor {i}")
    assert not ref[2].any() and float(ref[3].abs().max()) < 1.0
    meta, rows, _ = _metadata(got, list(codes), list(shifts), list(scales), ids, offsets, 48)
    g0, n_el = meta[:, 3], meta[:, 2] - meta[:, 1]              # first group, elements of each row
    last = g0 + (n_el + 3) // 4 - 1
    assert rows == meta.shape[0] and bool((n_el <= 4 * 48).all())
    assert bool((g0 // GROUP_SPAN == last // GROUP_SPAN).all())   # no row crosses 2^32 groups
    assert int((g0 % GROUP_SPAN == 0).sum()) == 4                 # tensor 0 at group 0; 1, 3, 5 cut
    law_of = {int(r[0]): int(r[5]) for r in meta}                # address -> kernel law code
    assert [law_of[t.data_ptr()] for t in got] == [2, 1, 1, 3, 2, 1]   # zeros as uniform; 1e-35 unfolded


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shard_invariance(impl):
    full = torch.empty(10, 13)
    law = KaimingUniform()
    rerandomize_([full], seed=3, step=4, init=law, ids=[9], impl=impl)
    flat = full.flatten()
    bounds = [0, 3, 4, 10, 41, 64, 97, 130]           # shards that start off group boundaries
    shards = [torch.empty(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    rerandomize_(shards, seed=3, step=4, init=KaimingUniform(fan=13), ids=[9] * len(shards),
                 offsets=bounds[:-1], impl=impl)
    for s, lo, hi in zip(shards, bounds, bounds[1:]):
        assert torch.equal(s, flat[lo:hi]), (lo, hi)
    z_full = torch.empty(50, dtype=torch.float16)
    rerandomize_([z_full], seed=3, step=4, init=Normal(), impl=impl)
    z = torch.empty(21, dtype=torch.float16)
    rerandomize_([z], seed=3, step=4, init=Normal(), offsets=[27], impl=impl)
    assert torch.equal(z, z_full[27:48])


def test_offsets_beyond_2_31():
    # shards far into a (virtual) tensor: element indices past 2^31 and group indices past 2^32
    offsets = [(1 << 31) + 5, (1 << 34) + 2, (1 << 40)]
    key = philox.derive_key(8, 1)
    want = [philox.uniform(o, 70, key=key, stream=i) for i, o in enumerate(offsets)]
    e = offsets[1] + 3                                    # element index 2^34 + 5: one word by hand
    words = philox.philox4x32_int(((e // 4) & philox.MASK32, (e // 4) >> 32, 1, 0), key)
    assert float(want[1][3]) == (words[e % 4] >> 8) * 2.0 ** -24
    for impl in ("torch", "triton"):
        ts = [torch.empty(70) for _ in offsets]
        rerandomize_(ts, seed=8, step=1, init=Uniform(), offsets=offsets, impl=impl)
        for t, w in zip(ts, want):
            assert torch.equal(t, w), impl
    ref = [torch.empty(70, dtype=torch.bfloat16) for _ in offsets]
    got = [torch.empty(70, dtype=torch.bfloat16) for _ in offsets]
    rerandomize_(ref, seed=8, step=1, init=Normal(0, 2), offsets=offsets, impl="torch")
    rerandomize_(got, seed=8, step=1, init=Normal(0, 2), offsets=offsets, impl="triton")
    for a, b in zip(ref, got):
        _assert_same_draw(a, b, Normal(0, 2), "bf16 normal at large offset")


def test_rounds_7():
    a, b = torch.empty(77), torch.empty(77)
    rerandomize_([a], seed=0, step=0, init=Uniform(), rounds=7, impl="torch")
    rerandomize_([b], seed=0, step=0, init=Uniform(), rounds=7, impl="triton")
    assert torch.equal(a, b)
    c = torch.empty(77)
    rerandomize_([c], seed=0, step=0, init=Uniform(), impl="torch")
    assert not torch.equal(a, c)
    w = philox.philox4x32_int((0, 0, 0, 0), philox.derive_key(0, 0), 7)
    assert float(a[2]) == (w[2] >> 8) * 2.0 ** -24


def test_determinism_and_independence():
    def draw(step, ids=(0, 1)):
        ts = [torch.empty(1 << 15), torch.empty(1 << 15)]
        rerandomize_(ts, seed=42, step=step, init=Normal(), ids=list(ids), impl="torch")
        return ts

    a, b = draw(5), draw(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = draw(6)
    for x, y in [(a[0], c[0]), (a[0], a[1]), (a[1], c[1])]:    # next step; another tensor
        corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        assert abs(corr) < 0.03, corr
    assert torch.equal(draw(5, ids=(1, 0))[0], a[1])           # values follow the id


def test_laws_statistics():
    n = 1 << 18
    t = torch.empty(n)
    rerandomize_([t], seed=0, step=1, init=Normal(0.5, 2.0), impl="torch")
    assert abs(float(t.mean()) - 0.5) < 2e-2 and abs(float(t.std()) / 2.0 - 1) < 1e-2
    rerandomize_([t], seed=0, step=1, init=Uniform(-2.0, 3.0), impl="torch")
    assert float(t.min()) >= -2.0 and float(t.max()) <= 3.0 and abs(float(t.mean()) - 0.5) < 1e-2
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.empty(256, 512, dtype=dtype)
        law = KaimingUniform()
        rerandomize_([w], seed=0, step=2, init=law, impl="torch")
        bound = law.bound(tuple(w.shape))
        limit = float(torch.tensor(bound, dtype=torch.float32).to(dtype).float()) * (1 + EPS[dtype])
        amax = float(w.float().abs().max())
        assert amax <= limit and amax > 0.99 * bound, (dtype, amax, bound)
        # the law torch.nn.init.kaiming_uniform_ draws from: same bound, uniform
        ref = torch.empty(256, 512)
        torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
        assert abs(float(ref.abs().max()) - amax) < 1e-3 * bound + EPS[dtype] * bound
        assert abs(float(w.float().std()) - bound / math.sqrt(3)) < 1e-2 * bound


def test_kernel_statistics():
    t = torch.empty(1 << 14, dtype=torch.float16)
    rerandomize_([t], seed=2, step=0, init=Normal(), impl="triton")
    assert abs(float(t.float().mean())) < 0.03 and abs(float(t.float().std()) - 1) < 0.03


def test_bad_input_raises_before_writing():
    good = torch.zeros(8)

    def check(exc, tensors, **kw):
        args = dict(seed=0, step=0, init=Normal())
        args.update(kw)
        with pytest.raises(exc):
            rerandomize_(tensors, **args)
        assert not good.any(), "a tensor was written before the error"

    check(TypeError, [good, torch.zeros(4, dtype=torch.int64)])
    check(TypeError, [good, torch.zeros(4, dtype=torch.float64)])
    check(ValueError, [good, torch.zeros(4, 6).t()])                       # non-contiguous
    check(ValueError, [good, torch.zeros(4, device="meta")])               # another device
    check(ValueError, [good, torch.zeros(4)], init=[Normal()])             # one law, two tensors
    check(ValueError, [good, torch.zeros(4)], ids=[1])
    check(ValueError, [good, torch.zeros(4)], offsets=[0, 0, 0])
    check(ValueError, [good], ids=[1 << 32])
    check(ValueError, [good], offsets=[-1])
    check(ValueError, [good], offsets=[(1 << 62) - 4])
    check(TypeError, [good], ids=[1.5])
    check(TypeError, good)                                                 # not a list
    check(TypeError, [good, "x"])
    check(TypeError, [good], init=torch.nn.init.normal_)
    check(ValueError, [good, torch.zeros(4)], init=[Normal(), KaimingUniform()])   # 1-D kaiming: no fan
    check(ValueError, [good], impl="cuda")
    check(ValueError, [good], rounds=0)
    check(TypeError, [good], seed=1.5)
    with pytest.raises(ValueError):
        Normal(0.0, -1.0)
    rerandomize_([], seed=0, step=0, init=[])                               # empty list: nothing to do


def test_custom_op_opcheck():
    # schema (mutates its tensors), fake-tensor and AOT-dispatch registration: torch.compile can trace it
    ts = [torch.empty(10), torch.empty(7, dtype=torch.float16)]
    args = (ts, 5, 7, [1, 2], [0.0, 0.0], [1.0, 1.0], [0, 1], [0, 0], 10)
    result = torch.library.opcheck(torch.ops.lorafast.rerandomize_triton_.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.cuda
def test_cuda_matches_cpu():
    ref, laws = _mixed()
    ids = [zlib.crc32(f"p{i}".encode()) for i in range(len(ref))]
    rerandomize_(ref, seed=11, step=3, init=laws, ids=ids, impl="torch")
    for impl in ("torch", "triton"):
        got = [torch.empty_like(t, device="cuda") for t in ref]
        rerandomize_(got, seed=11, step=3, init=laws, ids=ids, impl=impl)
        for i, (a, b, law) in enumerate(zip(ref, got, laws)):
            _assert_same_draw(a, b.cpu(), law, f"{impl} tensor {i}")
    big = torch.empty(1 << 24, device="cuda", dtype=torch.bfloat16)
    rerandomize_([big], seed=1, step=1, init=Uniform(-1, 1), offsets=[(1 << 33) + 1])
    cpu = torch.empty(1 << 24, dtype=torch.bfloat16)
    rerandomize_([cpu], seed=1, step=1, init=Uniform(-1, 1), offsets=[(1 << 33) + 1], impl="torch")
    assert torch.equal(big.cpu(), cpu)
    # the kernel's hardware bf16/fp16 rounding, its multi-chunk rows (cut at 2^32 groups) and the
    # unfolded uniform law, on 2^22 elements per tensor, against the PyTorch path on the CPU
    laws = [Normal(0.1, 3.0), Normal(), Uniform(0.0, 1e-35), Uniform(-2.0, 2.0)]
    offsets = [0, (1 << 34) - (1 << 20), 3, (1 << 34) + 4]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        gpu = [torch.empty(1 << 22, device="cuda", dtype=dtype) for _ in laws]
        cpu = [torch.empty(1 << 22, dtype=dtype) for _ in laws]
        rerandomize_(gpu, seed=5, step=2, init=laws, offsets=offsets, impl="triton")
        rerandomize_(cpu, seed=5, step=2, init=laws, offsets=offsets, impl="torch")
        for i, (a, b, law) in enumerate(zip(cpu, gpu, laws)):
            _assert_same_draw(a, b.cpu(), law, f"{dtype} tensor {i}")


def test_overlapping_tensors_are_rejected():
    t = torch.empty(100)
    with pytest.raises(ValueError, match="overlap"):
        rerandomize_([t, t[10:50]], seed=0, step=0, init=Normal(), impl="torch")
    with pytest.raises(ValueError, match="overlap"):
        rerandomize_([t, t], seed=0, step=0, init=Normal(), impl="torch")
    a, b = t[:50], t[50:]  # disjoint views of one storage are fine
    rerandomize_([a, b], seed=0, step=0, init=Normal(), impl="torch")
    assert torch.isfinite(t).all()


# Issue 13 item 2: values outside what the draw can represent used to wrap (seed 1 + 2^64 drew
# exactly seed 1's values; step 2^64 and -1 likewise); every public entry point now refuses them.
@pytest.mark.parametrize("kw,says", [
    (dict(seed=1 + 2 ** 64), r"seed = 18446744073709551617 is out of range \[0, 2\^64\)"),
    (dict(seed=-1), r"seed = -1 is out of range"),
    (dict(step=2 ** 64), r"step = 18446744073709551616 is out of range \[0, 2\^64\)"),
    (dict(step=-1), r"step = -1 is out of range"),
    (dict(ids=[2 ** 32]), r"ids\[0\] = 4294967296 is out of range \[0, 2\^32\)"),
    (dict(offsets=[-1]), r"offsets\[0\] = -1 is out of range"),
    (dict(offsets=[2 ** 62]), r"offsets\[0\] = 4611686018427387904 is out of range \[0, 2\^62\)"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_out_of_range_arguments_raise_instead_of_wrapping(kw, says, impl):
    t = torch.full((8,), 7.0)
    with pytest.raises(ValueError, match=says):
        rerandomize_([t], **{"seed": 1, "step": 0, **kw}, init=Normal(), impl=impl)
    assert torch.equal(t, torch.full((8,), 7.0))  # raised before anything was written


def test_philox_keys_and_streams_refuse_values_that_would_wrap():
    for key in ((2 ** 32, 0), (0, -1), (1,)):
        with pytest.raises(ValueError, match="key must be two ints"):
            philox.uniform(0, 4, key=key, stream=0)
    with pytest.raises(ValueError, match="stream id"):
        philox.normal(0, 4, key=(1, 2), stream=2 ** 32)

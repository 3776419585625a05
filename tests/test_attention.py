"""Fused attention (lorafast.ops.attention): Triton kernels under the interpreter vs fp64 math.

Rule (FlashAttention's tests): max|ours - truth| <= 2 * max|torch_same_dtype - truth| + atol,
for the output and for dq, dk, dv; truth is explicit fp64 math on the same rounded inputs.
Query length TQ may differ from key length TK; the causal mask is then bottom-right aligned
(query i sees key j iff j <= i + TK - TQ).

Paths covered here on CPU (interpreter): the pointer kernels with the interpreter's small tiles
and with the shipped sm_90 / sm_80 tiles; the Hopper TMA kernels (tensor descriptors, the
warp-specialised forward, the TMA backward) with the shipped sm_90 tiles on fp16 data; the
default backward (fp32 dQ accumulated by atomic adds) and ``deterministic=True`` (separate dK/dV
and dQ kernels); 1-D grids for any B * H. The ``cuda``-marked tests (bf16, bitwise repeatability,
the 65536-head case at full size, torch.compile, no recompiles across T) run on a GPU through
tools/gpu_check.sh.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafast.ops import _dispatch
from lorafast.ops._attention import attention

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _math(q, k, v, causal, scale=None):
    """softmax(scale * q k^T + causal mask) v, in the dtype of the inputs; the causal mask is
    aligned bottom-right (query i sees key j iff j <= i + TK - TQ)."""
    D, TQ, TK = q.shape[-1], q.shape[-2], k.shape[-2]
    s = D ** -0.5 if scale is None else scale
    S = (q @ k.transpose(-1, -2)) * s                                  # [B, H, TQ, TK]
    if causal:
        S = S.masked_fill(torch.ones(TQ, TK, dtype=torch.bool, device=q.device).triu(TK - TQ + 1), float("-inf"))
    return S.softmax(-1) @ v                                           # [B, H, TQ, D]


def _assert_flash_rule(q, k, v, do, out, grads, causal, dtype):
    """FlashAttention rule: max error of ours against fp64 <= 2 x that of the same math in
    ``dtype`` + ATOL, for out, dq, dk, dv."""
    def ref(prec):
        xs = [x.detach().to(prec).requires_grad_() for x in (q, k, v)]
        o = _math(*xs, causal)
        return (o, *torch.autograd.grad(o, xs, do.to(prec)))

    truth, same = ref(torch.float64), ref(dtype)
    for name, ours, pt, gt in zip(("out", "dq", "dk", "dv"), (out, *grads), same, truth):
        e_ours, where = _err(ours, gt)
        e_pt, _ = _err(pt, gt)
        assert e_ours <= 2 * e_pt + ATOL[dtype], f"{name}: {e_ours:.3g} at {where} vs pt {e_pt:.3g}"


def _make(B, H, T, D, dtype, layout, seed=0, TK=None):
    """q [B, H, T, D] and k, v [B, H, TK, D] (TK defaults to T) leaf tensors in the requested
    memory layout."""
    g = torch.Generator().manual_seed(seed)
    TK = T if TK is None else TK
    if layout == "qkv" and TK == T:  # views of a fused projection output [B, T, 3*H*D]
        qkv = torch.randn(B, T, 3 * H * D, generator=g).to(dtype).requires_grad_()
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)       # 3 x [B, H, T, D]
        return (q, k, v), [qkv]
    if layout == "qkv":  # q of the new tokens [B, T, H*D], k/v of a cache [B, TK, 2*H*D]
        qx = torch.randn(B, T, H * D, generator=g).to(dtype).requires_grad_()
        kv = torch.randn(B, TK, 2 * H * D, generator=g).to(dtype).requires_grad_()
        k, v = kv.view(B, TK, 2, H, D).permute(2, 0, 3, 1, 4)          # 2 x [B, H, TK, D]
        return (qx.view(B, T, H, D).transpose(1, 2), k, v), [qx, kv]
    lens = (T, TK, TK)
    if layout == "contig":
        ts = [torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in lens]
        return tuple(ts), ts
    if layout == "bthd":
        ts = [torch.randn(B, n, H, D, generator=g).to(dtype).requires_grad_() for n in lens]
        return tuple(t.transpose(1, 2) for t in ts), ts
    if layout == "strided_d":  # every other element over D, padded rows: stride_d = 2
        ts = [torch.randn(B, H, n + 3, 2 * D, generator=g).to(dtype).requires_grad_() for n in lens]
        return tuple(t[:, :, 1:n + 1, ::2] for t, n in zip(ts, lens)), ts
    raise ValueError(layout)


def _err(a, b):
    d = (a.double() - b.double()).abs()
    i = int(d.argmax())
    return d.max().item(), tuple(int(x) for x in torch.unravel_index(torch.tensor(i), d.shape))


def _check_case(B, H, T, D, causal, dtype, layout, scale=None, seed=0, tiles=None, TK=None,
                deterministic=False):
    (q, k, v), leaves = _make(B, H, T, D, dtype, layout, seed, TK)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, H, T, D, generator=g).to(dtype)

    if tiles is None:
        out = attention(q, k, v, causal=causal, scale=scale, impl="triton", deterministic=deterministic)
        grads = torch.autograd.grad(out, (q, k, v), do)
    else:  # drive the launchers directly with given tiles
        from lorafast.kernels.attention import attention_backward, attention_forward

        s = D ** -0.5 if scale is None else scale
        out = torch.empty(B, T, H, D, dtype=dtype).transpose(1, 2)  # as the op allocates it
        lse = torch.empty(B, H, T)
        q, k, v = (x.detach() for x in (q, k, v))
        attention_forward(q, k, v, out, lse, causal=causal, scale=s, tiles=tiles)
        grads = tuple(torch.empty_like(x) for x in (q, k, v))
        attention_backward(do, q, k, v, out, lse, *grads, causal=causal, scale=s, tiles=tiles,
                           deterministic=deterministic)
    assert out.dtype == dtype and out.shape == (B, H, T, D)

    def ref(prec):
        xs = [x.detach().to(prec).requires_grad_() for x in (q, k, v)]
        o = _math(*xs, causal, scale)
        return (o, *torch.autograd.grad(o, xs, do.to(prec)))

    truth = ref(torch.float64)
    same = ref(dtype if dtype != torch.bfloat16 else torch.bfloat16)
    for name, ours, pt, gt in zip(("out", "dq", "dk", "dv"), (out, *grads), same, truth):
        assert ours.dtype == dtype, name
        e_ours, where = _err(ours, gt)
        e_pt, _ = _err(pt, gt)
        bound = 2 * e_pt + ATOL[dtype]
        assert e_ours <= bound, (f"{name}: max err {e_ours:.3g} at {where} > 2 * {e_pt:.3g} + "
                                 f"{ATOL[dtype]:g} (B={B} H={H} T={T} TK={TK} D={D} causal={causal} "
                                 f"{dtype} {layout} deterministic={deterministic})")
    for leaf in leaves:
        assert leaf.grad is None  # autograd.grad does not accumulate


# The full matrix of issue 3: T x D x causal x dtype (100 cases), the layout rotating through
# qkv views, contiguous, [B, T, H, D] memory and a strided head dim; B and H vary a little.
_LAYOUTS = ("qkv", "contig", "bthd", "strided_d")
CASES = [
    # B, H, T, D, causal, dtype, layout
    (1 + i % 2, 1 + (i // 2) % 2, T, D, causal, dtype, _LAYOUTS[i % 4])
    for i, (T, D, causal, dtype) in enumerate(itertools.product(
        (1, 17, 64, 129, 200), (16, 48, 64, 80, 128), (True, False), (torch.float32, torch.float16)))
]


@pytest.mark.parametrize("B,H,T,D,causal,dtype,layout", CASES,
                         ids=[f"T{c[2]}-D{c[3]}-{'causal' if c[4] else 'full'}-{str(c[5])[6:]}-{c[6]}"
                              for c in CASES])
def test_matches_fp64(B, H, T, D, causal, dtype, layout):
    _check_case(B, H, T, D, causal, dtype, layout)


# Query length != key length (KV-cache steps, chunked prefill, cross-attention lengths):
# (TQ, TK) x causal x dtype, the head dim and layout rotating; plus TQ > TK without a mask.
XCASES = [
    (1 + i % 2, 1 + (i // 2) % 2, tq, tk, (16, 64, 80)[i % 3], causal, dtype, _LAYOUTS[i % 4], i % 2 == 1)
    for i, ((tq, tk), causal, dtype) in enumerate(itertools.product(
        ((1, 17), (1, 200), (5, 64), (17, 129)), (True, False), (torch.float32, torch.float16)))
] + [(1, 2, 40, 17, 48, False, torch.float32, "qkv", False), (2, 1, 3, 1, 16, False, torch.float16, "bthd", True)]


@pytest.mark.parametrize("B,H,TQ,TK,D,causal,dtype,layout,deterministic", XCASES,
                         ids=[f"TQ{c[2]}-TK{c[3]}-D{c[4]}-{'causal' if c[5] else 'full'}-"
                              f"{str(c[6])[6:]}-{c[7]}{'-det' if c[8] else ''}" for c in XCASES])
def test_query_length_differs(B, H, TQ, TK, D, causal, dtype, layout, deterministic):
    _check_case(B, H, TQ, D, causal, dtype, layout, TK=TK, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("TQ,TK,D,arch", [(37, 300, 64, 90), (130, 161, 128, 80)])
def test_query_length_differs_gpu_tiles(TQ, TK, D, arch, deterministic):
    """The shipped GPU tiles (BLOCK 16..128) with a diagonal shifted by more than a tile and by
    less than one: the causal tile skips of every kernel use the shifted diagonal."""
    from lorafast.kernels.attention import pick_tiles

    tiles = pick_tiles(D, torch.float16, torch.device("cuda"), arch=arch)
    _check_case(1, 1, TQ, D, True, torch.float32, "contig", tiles=tiles, TK=TK, deterministic=deterministic)


# The Hopper kernels (tensor descriptors; the warp-specialised forward: one masked loop, two
# consumers of 64 rows; the TMA backward) on fp16 data with the shipped sm_90 tiles. The
# interpreter emulates the descriptors (zero fill past T and D, clipped stores, 16-byte checks).
TMA_CASES = [
    # B, H, TQ, TK, D, causal, layout, scale
    (1, 2, 200, 200, 64, True, "qkv", None),
    (2, 1, 129, 129, 128, True, "bthd", None),
    (1, 1, 75, 333, 80, True, "qkv", None),      # KV-cache shape, padded head dim
    (1, 1, 160, 97, 48, False, "contig", -0.3),  # TQ > TK without mask, negative scale
    (1, 2, 33, 33, 112, False, "qkv", 0.0),      # scale 0: uniform weights (pointer forward)
]


@pytest.mark.parametrize("B,H,TQ,TK,D,causal,layout,scale", TMA_CASES,
                         ids=[f"TQ{c[2]}-TK{c[3]}-D{c[4]}-{'causal' if c[5] else 'full'}-{c[6]}-s{c[7]}"
                              for c in TMA_CASES])
def test_tma_kernels_under_interpreter(B, H, TQ, TK, D, causal, layout, scale):
    from lorafast.kernels.attention import pick_tiles, tma_compatible

    (q, k, v), _ = _make(B, H, TQ, D, torch.float16, layout, TK=TK)
    assert tma_compatible(q, k, v)
    tiles = pick_tiles(D, torch.float16, torch.device("cuda"), arch=90)
    assert tiles.fwd_tma.tma and tiles.fwd_tma.warp_specialize and tiles.bwd_tma.tma
    _check_case(B, H, TQ, D, causal, torch.float16, layout, scale=scale, tiles=tiles, TK=TK)


def test_tma_compatible():
    """Descriptor rules: fp16/bf16, unit stride over D, 16-byte aligned base, rows and heads."""
    from lorafast.kernels.attention import tma_compatible

    (q, k, v), _ = _make(2, 3, 20, 64, torch.float16, "qkv")
    assert tma_compatible(q, k, v)
    (q, k, v), _ = _make(2, 3, 20, 64, torch.float32, "qkv")
    assert not tma_compatible(q)                                   # fp32: the CUDA-core path
    (q, k, v), _ = _make(1, 2, 20, 64, torch.float16, "strided_d")
    assert not tma_compatible(q)                                   # stride over D = 2
    (q, k, v), _ = _make(1, 2, 20, 20, torch.float16, "qkv")
    assert not tma_compatible(q)                                   # heads 40 bytes apart
    x = torch.zeros(4 * 64 + 4, dtype=torch.float16)[4:].view(1, 1, 4, 64)
    assert not tma_compatible(x)                                   # base 8 bytes past 16-byte alignment


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("TQ,TK,D", [(1, 17, 16), (1, 200, 64), (5, 64, 80), (17, 129, 64),
                                     (30, 30, 32)])
def test_torch_impl_query_length_differs(TQ, TK, D, causal, dtype):
    """impl="torch" has the same bottom-right semantics (SDPA's is_causal alone would align
    top-left when TQ != TK)."""
    (q, k, v), _ = _make(1, 2, TQ, D, dtype, "contig", TK=TK)
    out = attention(q, k, v, causal=causal, impl="torch")
    assert out.shape == (1, 2, TQ, D) and out.dtype == dtype
    truth = _math(*(x.detach().double() for x in (q, k, v)), causal)
    same = _math(*(x.detach() for x in (q, k, v)), causal)
    assert _err(out, truth)[0] <= 2 * _err(same, truth)[0] + ATOL[dtype]
    if causal and TQ == 1:  # one query after TK - 1 cached keys sees all of them
        full = _math(*(x.detach().double() for x in (q, k, v)), False)
        assert _err(out, full)[0] <= 2 * _err(same, truth)[0] + ATOL[dtype]


@pytest.mark.parametrize("hd", [16, 8])  # 8: outside the kernel's range, the PyTorch path
def test_model_attend_kv_longer_than_q(hd):
    """FusedCausalSelfAttention.attend on the last t of T positions (a KV-cache step) equals the
    reference's full causal attention restricted to those rows."""
    from lorafast import reference
    from lorafast.model import FusedCausalSelfAttention

    B, nh, T = 2, 2, 23
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, nh, T, hd, generator=g) for _ in range(3))
    ref = reference.CausalSelfAttention.attend(None, q, k, v)                  # [B, nh, T, hd]
    attn = FusedCausalSelfAttention.__new__(FusedCausalSelfAttention)
    for t in (1, 4, T):
        y = attn.attend(q[:, :, T - t:], k, v)                                  # [B, nh, t, hd]
        torch.testing.assert_close(y, ref[:, :, T - t:], rtol=1e-5, atol=1e-5)


def test_generate_decode_runs_the_kernel(monkeypatch):
    """The KV-cache decode steps of generate go through lorafast.ops.attention (one query over
    the cached keys), not through SDPA."""
    import lorafast.model as lm

    seen = []

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2], kw["causal"]))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(lm, "attention", spy)
    m = lm.LoRA(30, 32, 32, 1, num_heads=2, max_seq_len=16)
    m.generate(torch.randint(0, 30, (1, 5)), 3, temperature=0)
    assert seen == [(5, 5, True), (1, 6, True), (1, 7, True)]


def test_custom_scale():
    _check_case(1, 2, 33, 32, True, torch.float32, "qkv", scale=0.37)


def test_bf16_upcast_path():
    """bf16 under the interpreter goes through the upcast-before-dot path (same numerics rule)."""
    _check_case(1, 1, 40, 48, True, torch.bfloat16, "qkv")


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("D,dtype,deterministic", [(64, torch.float16, False), (80, torch.float16, True),
                                                   (128, torch.float16, False), (128, torch.float32, False)])
def test_gpu_tiles_under_interpreter(D, dtype, arch, deterministic):
    """The tiles shipped for the GPU (BLOCK 16..128, nested causal split) on the same math
    (fp32 data: the pointer kernels)."""
    from lorafast.kernels.attention import pick_tiles

    tiles = pick_tiles(D, dtype, torch.device("cuda"), arch=arch)
    _check_case(1, 1, 200, D, True, torch.float32, "qkv", tiles=tiles, deterministic=deterministic)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 70),
       D=st.sampled_from([16, 24, 40, 64, 96]), causal=st.booleans(),
       layout=st.sampled_from(["qkv", "contig", "bthd"]), seed=st.integers(0, 2**16))
def test_property_random_shapes(B, H, T, D, causal, layout, seed):
    _check_case(B, H, T, D, causal, torch.float32, layout, seed=seed)


def test_layouts_and_partial_grads():
    (q, k, v), _ = _make(2, 3, 20, 32, torch.float32, "qkv")
    out = attention(q, k, v, impl="triton")
    # [B, H, T, D] in [B, T, H, D] memory: the head merge is a view
    assert out.transpose(1, 2).is_contiguous()
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    dqr, dkr, dvr = torch.autograd.grad(_math(qr, kr, vr, True).sum(), (qr, kr, vr))
    # only q needs a gradient: the dQ kernel alone (no atomics), dq still right
    qd = q.detach().requires_grad_()
    o = attention(qd, k.detach(), v.detach(), impl="triton")
    (dq,) = torch.autograd.grad(o.sum(), qd)
    assert (dq.double() - dqr).abs().max() < 1e-5
    # only k, v: the dK/dV kernel alone
    kd, vd = k.detach().requires_grad_(), v.detach().requires_grad_()
    o = attention(q.detach(), kd, vd, impl="triton")
    dk, dv = torch.autograd.grad(o.sum(), (kd, vd))
    assert (dk.double() - dkr).abs().max() < 1e-5 and (dv.double() - dvr).abs().max() < 1e-5


def _repeat_runs(q, k, v, do, deterministic, n=2):
    """out and (dq, dk, dv) of n identical runs."""
    runs = []
    for _ in range(n):
        out = attention(q, k, v, impl="triton", deterministic=deterministic)
        runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    return runs


def _assert_repeatable(runs, deterministic, dtype):
    """Bitwise equal run to run: out, dk, dv always (no atomics there), dq with
    deterministic=True. The default backward adds dQ partials with fp32 atomics in whatever
    order the programs reach them, so its dq is held to a tolerance instead: the last bits of
    its fp32 sum, then one rounding to the gradient's dtype (2 ulp of that dtype, relative to
    the largest dq)."""
    first = runs[0]
    for other in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, other):
            if name != "dq" or deterministic:
                assert torch.equal(a, b), f"{name} differs between identical runs"
            else:
                tol = 2 * torch.finfo(dtype).eps * a.abs().max().item()
                assert (a.double() - b.double()).abs().max().item() <= tol, name


# FlashAttention's Triton kernel documents compiler races at some head dims (a barrier it needs
# for headdim 40 / 48 ...); these are the padded head dims, with ragged T.
REPEAT_D = (40, 48, 80, 96, 112)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("D", REPEAT_D)
def test_repeatable_padded_head_dims(D, deterministic):
    """Identical runs give identical results (bitwise: the forward and dK/dV always, dQ with
    ``deterministic=True``; the default dQ, accumulated with fp32 atomics, to a tolerance: see
    _assert_repeatable). Under the interpreter programs run one after another, so this guards
    the kernels' own determinism (no reads of uninitialised or racing memory), the order
    effects of real hardware are checked by test_cuda_repeatable_padded_head_dims."""
    (q, k, v), _ = _make(1, 2, 37, D, torch.float16, "qkv", seed=D)
    do = torch.randn(1, 2, 37, D, generator=torch.Generator().manual_seed(D)).half()
    _assert_repeatable(_repeat_runs(q, k, v, do, deterministic), deterministic, torch.float16)


def test_default_and_deterministic_backward_agree():
    """The one-launch backward (atomic dQ) and the deterministic one compute the same gradients
    (dk, dv bitwise: the same kernel code without the dQ part; dq to fp32 summation order)."""
    (q, k, v), _ = _make(2, 2, 70, 48, torch.float16, "qkv")
    do = torch.randn(2, 2, 70, 48, generator=torch.Generator().manual_seed(1)).half()
    (a,), (b,) = _repeat_runs(q, k, v, do, False, 1), _repeat_runs(q, k, v, do, True, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert (a[1].double() - b[1].double()).abs().max() <= 2 * torch.finfo(torch.float16).eps * b[1].abs().max()


def test_grid_is_one_dimensional_for_any_heads():
    """Issue 13: B * H rode on grid axis 1 (65535 at most). Every launch now takes the 1-D grid
    of launch_grid, bounded by axis x (2^31 - 1): the 65536-head case of the issue and far beyond
    fit, and the bound is checked before a launch."""
    from lorafast.kernels import attention as ka

    assert ka.launch_grid(1, 16, 65536) == (65536,)
    assert ka.launch_grid(16384, 128, 65535 * 64) == (128 * 65535 * 64,)
    assert ka.launch_grid(1, 16, ka.MAX_GRID_X) == (ka.MAX_GRID_X,)
    with pytest.raises(ValueError, match="grid axis x"):
        ka.launch_grid(33, 16, ka.MAX_GRID_X // 2)
    with pytest.raises(ValueError, match="grid axis x"):
        ka.launch_grid(2**40, 16, 1)


def test_many_heads_real_run(monkeypatch):
    """A real run over B * H = 24 heads with T = 1 (the shape of the issue's case, small enough
    for the interpreter, which runs ~20 programs a second) through every launcher, each grid
    taken from launch_grid: with one key, out == v exactly (the issue's expectation), and the
    gradients of the one-key softmax (dq = dk = 0, dv = dout). The full 65536-head case runs in
    test_cuda_grid_beyond_65535_heads."""
    from lorafast.kernels import attention as ka

    grids = []
    real = ka.launch_grid

    def spy(n_rows, block, heads):
        grids.append(real(n_rows, block, heads))
        return grids[-1]

    monkeypatch.setattr(ka, "launch_grid", spy)
    q = torch.randn(8, 3, 1, 16, requires_grad=True)
    out = attention(q, q, q, impl="triton")
    assert torch.equal(out, q)
    (g,) = torch.autograd.grad(out, q, torch.ones_like(out))
    torch.testing.assert_close(g, torch.ones_like(q), rtol=0, atol=1e-5)  # dq + dk = 0, dv = 1
    # forward, preprocess, fused backward, dQ convert: all 1-D, one program per head
    assert len(grids) == 4 and all(gr == (24,) for gr in grids), grids


def test_torch_impl_matches_fp64():
    (q, k, v), _ = _make(1, 2, 33, 48, torch.float32, "qkv")
    for causal in (True, False):
        out = attention(q, k, v, causal=causal, impl="torch")
        ref = _math(*(x.double() for x in (q, k, v)), causal)
        assert (out.double() - ref).abs().max() < 1e-5


def test_auto_uses_triton_under_interpreter():
    assert _dispatch.select_backend("attention", "auto", torch.zeros(1, 1, 4, 16)) == "triton"


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck(deterministic):
    (q, k, v), _ = _make(1, 1, 17, 16, torch.float32, "qkv")
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.lorafast.attention_fwd.default, (q, k, v, True, 0.25, deterministic),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_autotune_keys():
    """LORAFAST_AUTOTUNE: off on CPU; sequence lengths share power-of-two buckets (64..16384), so
    varying T tunes a bounded number of times; candidates keep the nesting and
    no-duplication rules and start with the shipped tile."""
    from lorafast.kernels import attention as ka

    assert not ka.autotune_enabled(torch.device("cpu"))
    assert [ka.seq_bucket(t) for t in (1, 64, 65, 1000, 1024, 5000, 10**6)] == [64, 64, 128, 1024, 1024, 8192, 16384]
    shipped = ka.pick_tiles(128, torch.bfloat16, torch.device("cuda"), arch=90)
    for kind, t in (("fwd", shipped.fwd), ("fwd", shipped.fwd_tma), ("bwd", shipped.bwd), ("dq", shipped.dq)):
        cands = ka.tile_candidates(kind, t)
        assert cands[0] == t and len(set(cands)) == len(cands) > 1
        for c in cands:
            ka._check_tile(c, kind, "m" if kind in ("fwd", "dq") else "n")
            rows = c.block_m if kind in ("fwd", "dq") else c.block_n
            assert rows >= 16 * (4 if c.warp_specialize else c.num_warps) // (2 if c.warp_specialize else 1)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "4 dims"),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), ValueError, "TQ <= TK"),  # causal TQ > TK
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "share B, H and D"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), ValueError, "share B, H and D"),
    (lambda q, k, v: (q[..., :16], k[..., :24], v[..., :24]), ValueError, "share B, H and D"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, ">= 1"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "dtype must be"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), ValueError, "head dim"),
    (lambda q, k, v: (torch.zeros(1, 1, 4, 256), torch.zeros(1, 1, 4, 256), torch.zeros(1, 1, 4, 256)),
     ValueError, "head dim"),
    (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, ">= 1"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "torch.Tensor"),
])
def test_validation(bad, exc, match):
    q, k, v = (torch.randn(1, 2, 6, 32) for _ in range(3))
    with pytest.raises(exc, match=match):
        attention(*bad(q, k, v), impl="triton")


def test_validation_of_options():
    q = torch.randn(1, 2, 6, 32)
    with pytest.raises(TypeError, match="causal"):
        attention(q, q, q, causal=1)
    with pytest.raises(TypeError, match="scale"):
        attention(q, q, q, scale="0.5")
    with pytest.raises(ValueError, match="finite"):
        attention(q, q, q, scale=float("nan"))
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, impl="cuda")
    with pytest.raises(TypeError, match="deterministic"):
        attention(q, q, q, deterministic=1)


def test_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    q = torch.randn(1, 2, 6, 32)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run"):
        attention(q, q, q, impl="triton")
    # auto falls back to the torch path on plain CPU
    assert attention(q, q, q).shape == q.shape


def test_plain_cpu_subprocess_uses_torch():
    """A fresh process without TRITON_INTERPRET: auto -> torch path, triton -> clear error."""
    code = ("import torch; from lorafast.ops._attention import attention\n"
            "q = torch.randn(1, 2, 6, 32)\n"
            "assert attention(q, q, q).shape == q.shape\n"
            "try:\n    attention(q, q, q, impl='triton')\nexcept RuntimeError as e:\n    print('raised', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "raised" in res.stdout


# ---- GPU (run with LORAFAST_TEST_CUDA=1) ----------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,D,causal", [(1, 64, True), (257, 64, True), (1000, 128, True),
                                        (513, 80, False), (2048, 96, True), (384, 128, False)])
def test_cuda_matches_fp64(T, D, causal, dtype):
    B, H = 2, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", generator=g).to(dtype).requires_grad_()
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    do = torch.randn(B, H, T, D, device="cuda", generator=g).to(dtype)
    out = attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    _assert_flash_rule(q, k, v, do, out, grads, causal, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,deterministic", [(torch.float16, False), (torch.bfloat16, False),
                                                 (torch.bfloat16, True)])
@pytest.mark.parametrize("TQ,TK,D,causal", [(1, 1000, 64, True), (1, 513, 128, True),
                                             (100, 777, 64, True), (300, 333, 128, True),
                                             (257, 1000, 80, False), (700, 200, 96, False)])
def test_cuda_query_length_differs(TQ, TK, D, causal, dtype, deterministic):
    """TQ != TK on the GPU tiles (bottom-right causal), forward and backward vs fp64."""
    B, H = 2, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, TQ, H, D, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, TK, 2 * H * D, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = kv.view(B, TK, 2, H, D).permute(2, 0, 3, 1, 4)
    do = torch.randn(B, H, TQ, D, device="cuda", generator=g).to(dtype)
    out = attention(q, k, v, causal=causal, deterministic=deterministic)
    grads = torch.autograd.grad(out, (q, k, v), do)
    _assert_flash_rule(q, k, v, do, out, grads, causal, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("T,D,causal", [(1000, 128, True), (517, 64, False), (300, 40, True)])
def test_cuda_pointer_kernels_when_tma_cannot_run(T, D, causal):
    """Tensors a tensor descriptor cannot address (a base 2 bytes past 16-byte alignment) take
    the pointer kernels on Hopper too: same FlashAttention rule."""
    from lorafast.kernels.attention import tma_compatible

    B, H = 2, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(B * T * 3 * H * D + 1, device="cuda", generator=g).bfloat16()
    qkv = buf[1:].view(B, T, 3 * H * D).requires_grad_()
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not tma_compatible(q, k, v)
    do = torch.randn(B, H, T, D, device="cuda", generator=g).bfloat16()
    out = attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    _assert_flash_rule(q, k, v, do, out, grads, causal, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
def test_cuda_backward_deterministic_and_layouts(deterministic):
    B, H, T, D = 2, 4, 777, 96
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    runs = _repeat_runs(q, k, v, do, deterministic, n=3)
    assert runs[0][0].transpose(1, 2).is_contiguous()
    _assert_repeatable(runs, deterministic, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("D", REPEAT_D)
def test_cuda_repeatable_padded_head_dims(D, deterministic):
    """Bitwise repeatability on the GPU at the head dims where FlashAttention's Triton kernel
    documents compiler races, ragged T (not a multiple of any tile), causal with TQ < TK and full
    with TQ == TK (two compiled variants per head dim, to keep the GPU check's compile time
    down), five runs each: out, dk, dv bitwise; dq bitwise with deterministic=True and to
    2 ulp of bf16 (relative to max |dq|) on the default path, whose fp32 atomic adds land in a
    varying order (see _assert_repeatable)."""
    g = torch.Generator(device="cuda").manual_seed(D)
    for B, H, TQ, TK, causal in ((2, 4, 333, 1111, True), (2, 2, 517, 517, False)):
        q = torch.randn(B, TQ, H, D, device="cuda", generator=g).bfloat16().transpose(1, 2).requires_grad_()
        kv = torch.randn(B, TK, 2 * H * D, device="cuda", generator=g).bfloat16().requires_grad_()
        k, v = kv.view(B, TK, 2, H, D).permute(2, 0, 3, 1, 4)
        do = torch.randn(B, H, TQ, D, device="cuda", generator=g).bfloat16()
        runs = []
        for _ in range(5):
            out = attention(q, k, v, causal=causal, deterministic=deterministic)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
        _assert_repeatable(runs, deterministic, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_grid_beyond_65535_heads():
    """Issue 13's case at full size: B * H = 65536 (over the 65535 of grid axes y/z): out == v
    exactly (one key per row), as on the PyTorch path, and the backward runs on every head."""
    q = torch.randn(65536, 1, 1, 16, device="cuda", requires_grad=True)
    out = attention(q, q, q, impl="triton")
    assert torch.equal(out, q)
    assert torch.equal(out, attention(q, q, q, impl="torch"))
    (g,) = torch.autograd.grad(out, q, torch.ones_like(out))
    torch.testing.assert_close(g, torch.ones_like(q), rtol=0, atol=1e-5)
    qb = torch.randn(70000, 2, 1, 64, device="cuda", dtype=torch.bfloat16)  # B * H = 140000, TMA path
    assert torch.equal(attention(qb, qb, qb), qb)


@pytest.mark.cuda
def test_cuda_torch_compile():
    B, H, T, D = 2, 4, 300, 64
    qkv = torch.randn(B, T, 3 * H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x):
        q, k, v = x.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        return attention(q, k, v).transpose(1, 2).reshape(B, T, H * D)

    y_eager = f(qkv)
    (g_eager,) = torch.autograd.grad(y_eager.float().square().sum(), qkv)
    y = torch.compile(f, fullgraph=True)(qkv)
    (g,) = torch.autograd.grad(y.float().square().sum(), qkv)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.cuda
def test_cuda_no_recompile_across_T():
    """T is not specialised: new sequence lengths reuse the compiled forward and backward."""
    from lorafast.kernels import attention as ka

    kernels = (ka._attn_fwd_kernel, ka._attn_bwd_preprocess_kernel, ka._attn_bwd_kernel,
               ka._attn_bwd_dq_convert_kernel)

    def n_compiled():
        dev = torch.cuda.current_device()
        return [len(k.device_caches[dev][0]) for k in kernels]

    counts = []
    for T in (200, 333, 512, 1024, 1999):
        qkv = torch.randn(1, T, 3 * 2 * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = qkv.view(1, T, 3, 2, 64).permute(2, 0, 3, 1, 4)
        attention(q, k, v).sum().backward()
        counts.append(n_compiled())
    assert all(c == counts[0] for c in counts), counts


def test_torch_compile_traces_the_op():
    """fullgraph tracing through the torch.library op (fake + autograd registration), on CPU."""
    B, T, H, D = 1, 20, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)

    def f(x):
        q, k, v = x.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)       # 3 x [B, H, T, D]
        return attention(q, k, v).transpose(1, 2).reshape(B, T, H * D)

    y = torch.compile(f, backend="aot_eager", fullgraph=True)(qkv)
    (g,) = torch.autograd.grad(y.square().sum(), qkv)
    y_eager = f(qkv)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), qkv)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(g, g_eager)

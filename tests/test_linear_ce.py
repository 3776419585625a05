"""Fused linear + cross-entropy / softmax against an fp64 ground truth (Cut Cross-Entropy's rule).

Rule: |ours - truth| <= |torch in the same dtype - truth| + tol, elementwise, with truth the
fp64 computation; tol 5e-4 (fp32) / 1e-3 (fp16) as in CCE's tests (relative above |truth| = 1,
see assert_rule). The Triton kernels run in
the interpreter (conftest), so shapes are small and the cross-product of shape x dtype x bias x
reduction x confidence is sampled: every shape, flag and dtype appears, for both backends.
bf16 is checked only on a GPU (the interpreter's bf16 tl.dot is broken in triton 3.9).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafast.ops._linear_ce import linear_cross_entropy, linear_softmax

TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}
IGNORE = -100


def assert_rule(name, ours, ref, truth, tol):
    """|ours - truth| <= |ref - truth| + tol elementwise; report the worst index on failure."""
    ours, ref, truth = ours.double(), ref.double(), truth.double()
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    # tol is absolute up to |truth| = 1 and relative beyond: with "sum"/"none" and O(1) upstream
    # gradients, values exceed 1, where CCE's absolute 1e-3 is below one fp16 ulp.
    excess = (ours - truth).abs() - ((ref - truth).abs() + tol * truth.abs().clamp(min=1.0))
    excess = torch.nan_to_num(excess, nan=float("inf"))
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), excess.shape))
        raise AssertionError(f"{name}: worst at {idx}: ours {ours.flatten()[i]:.6g}, torch "
                             f"{ref.flatten()[i]:.6g}, truth {truth.flatten()[i]:.6g}, excess {excess.max():.3g}")


def make_case(N, V, D, dtype, bias, confident, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if confident:
        # adversarially confident: push every row towards its target class (softmax ~ one-hot)
        h = h + 6.0 * w[y] * D ** 0.5
    y[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h), cast(w), cast(b), y


def run_ce(fn, h, w, b, y, reduction, upstream):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    loss = fn(h, w, b, y, reduction)
    out = (loss * upstream).sum() if reduction == "none" else loss
    out.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def eager(h, w, b, y, reduction):
    return F.cross_entropy(F.linear(h, w, b), y, ignore_index=IGNORE, reduction=reduction)


# (N, V, D), dtype, bias, reduction, confident: every shape meets every dtype, every reduction,
# bias on and off and confident logits (a rotation through the flags, not the full product).
_FLAGS = [(True, "mean", False), (False, "none", False), (True, "sum", True),
          (False, "mean", True), (True, "none", False), (False, "sum", True)]
CASES = [(shape, dtype, *_FLAGS[(3 * i + j + k) % 6])
         for i, shape in enumerate([(37, 123, 31), (64, 1000, 64), (5, 4099, 48)])
         for j, dtype in enumerate([torch.float32, torch.float16])
         for k in (0, 1, 2)]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape,dtype,bias,reduction,confident", CASES)
def test_loss_and_grads(impl, shape, dtype, bias, reduction, confident):
    N, V, D = shape
    h, w, b, y = make_case(N, V, D, dtype, bias, confident)
    upstream = torch.randn(N, dtype=torch.float64)
    h0, w0, y0 = h.clone(), w.clone(), y.clone()

    ours = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction=a[4], impl=impl), h, w, b, y, reduction,
                  upstream.float())
    truth = run_ce(eager, h.double(), w.double(), b.double() if bias else None, y, reduction, upstream)
    ref = run_ce(eager, h, w, b, y, reduction, upstream.to(dtype))

    assert ours[0].dtype == torch.float32
    for name, o, r, t in zip(("loss", "dh", "dW", "db"), ours, ref, truth):
        if t is None:
            assert o is None
            continue
        if name != "loss":
            assert o.dtype == dtype, f"{name} dtype {o.dtype}"
        assert_rule(f"{impl} {name}", o, r, t, TOL[dtype])
    # the caller's tensors are untouched
    assert torch.equal(h, h0) and torch.equal(w, w0) and torch.equal(y, y0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_leading_dims_partial_grads_and_sum_of_none(impl):
    h, w, b, y = make_case(24, 300, 40, torch.float32, True, False)
    h3 = h.reshape(2, 12, 40).detach().requires_grad_()
    y2 = y.reshape(2, 12)
    # weight frozen: only dh and db requested
    bb = b.clone().requires_grad_()
    loss = linear_cross_entropy(h3, w, bb, y2, reduction="none", impl=impl)
    assert loss.shape == (2, 12)
    ref = F.cross_entropy(F.linear(h3.double(), w.double(), b.double()).reshape(24, 300), y, reduction="none",
                          ignore_index=IGNORE).reshape(2, 12)
    assert_rule("none", loss, ref.float(), ref, 5e-4)
    assert (loss[y2 == IGNORE] == 0).all()
    loss.sum().backward()
    assert h3.grad.shape == h3.shape and bb.grad.shape == b.shape
    total = linear_cross_entropy(h, w, b, y, reduction="sum", impl=impl)
    torch.testing.assert_close(total, loss.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_inputs(impl):
    """h with a feature stride of 2 and W stored transposed ([D, V] contiguous) give the same result."""
    h, w, b, y = make_case(19, 150, 24, torch.float32, True, False)
    h_s = torch.zeros(19, 48).index_copy_(1, torch.arange(0, 48, 2), h)[:, ::2]
    w_s = w.t().contiguous().t()
    assert h_s.stride() == (48, 2) and w_s.stride() == (1, 150)
    hs = h_s.requires_grad_()
    loss = linear_cross_entropy(hs, w_s, b, y, impl=impl)
    loss.backward()
    hh = h.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(hh, w, b), y, ignore_index=IGNORE)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs.grad, hh.grad, rtol=1e-4, atol=1e-6)
    p = linear_softmax(h_s.detach(), w_s, b, impl=impl)
    torch.testing.assert_close(p, torch.softmax(F.linear(h, w, b), -1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored(impl):
    h, w, b, y = make_case(6, 50, 16, torch.float32, True, False)
    y[:] = IGNORE
    hh = h.clone().requires_grad_()
    loss = linear_cross_entropy(hh, w, b, y, impl=impl)
    assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy
    assert linear_cross_entropy(h, w, b, y, reduction="sum", impl=impl) == 0
    linear_cross_entropy(hh, w, b, y, reduction="sum", impl=impl).backward()
    assert (hh.grad == 0).all()


@pytest.mark.parametrize("impl,dtype,bias,log,temperature", [
    ("triton", torch.float32, True, False, 1.0),
    ("triton", torch.float16, False, True, 0.7),
    ("triton", torch.float32, False, True, 2.0),
    ("torch", torch.float32, True, True, 0.5),
    ("torch", torch.float16, True, False, 1.0),
])
@pytest.mark.parametrize("shape", [(37, 123, 31), (5, 4099, 48)])
def test_softmax(impl, dtype, bias, log, temperature, shape):
    N, V, D = shape
    h, w, b, _ = make_case(N, V, D, dtype, bias, confident=False)
    ours = linear_softmax(h, w, b, temperature=temperature, log=log, impl=impl)
    assert ours.dtype == dtype and ours.shape == (N, V)

    def ref(hh, ww, bb):
        z = F.linear(hh, ww, bb) / temperature
        return torch.log_softmax(z, -1) if log else torch.softmax(z, -1)

    truth = ref(h.double(), w.double(), b.double() if bias else None)
    same = ref(h, w, b)
    assert_rule(f"{impl} {'log_' if log else ''}softmax", ours, same, truth, 1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_target_raises_on_cpu(impl):
    h, w, b, y = make_case(8, 40, 16, torch.float32, True, False)
    for bad in (40, -1, 10**12):
        yy = y.clone()
        yy[3] = bad
        with pytest.raises(ValueError, match="outside"):
            linear_cross_entropy(h, w, b, yy, impl=impl)
    # -1 is fine when it is the ignore_index
    yy = torch.where(y == IGNORE, -1, y)
    yy[3] = -1
    linear_cross_entropy(h, w, b, yy, ignore_index=-1, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_target_unchecked_is_nan_not_a_crash(impl):
    h, w, b, y = make_case(8, 40, 16, torch.float32, True, False, ignore_frac=0.0)
    y[2] = 10**9
    loss = linear_cross_entropy(h, w, b, y, reduction="none", impl=impl, check=False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(8) != 2]).all()
    # masking the NaN row out leaves the gradients of the good rows only: the bad row adds nothing
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, b, y, reduction="none", impl=impl, check=False)
    keep = torch.arange(8) != 2
    loss[keep].sum().backward()
    assert torch.count_nonzero(h.grad[2]) == 0
    want_w = torch.autograd.grad(F.cross_entropy(F.linear(h[keep], w, b), y[keep], reduction="sum"), w)[0]
    torch.testing.assert_close(w.grad, want_w, rtol=1e-4, atol=1e-5)


def test_validation_errors():
    h, w, b, y = make_case(8, 40, 16, torch.float32, True, False)
    ce = linear_cross_entropy
    with pytest.raises(TypeError, match="int64"):
        ce(h, w, b, y.int())
    with pytest.raises(ValueError, match="targets shape"):
        ce(h, w, b, y[:5])
    with pytest.raises(ValueError, match="weight"):
        ce(h, w[:, :8], b, y)
    with pytest.raises(ValueError, match="bias"):
        ce(h, w, b[:5], y)
    with pytest.raises(TypeError, match="dtype"):
        ce(h, w.half(), b, y)
    with pytest.raises(TypeError, match="bias dtype"):
        ce(h, w, b.double(), y)
    with pytest.raises(TypeError, match="float32"):
        ce(h.long(), w.long(), None, y)
    with pytest.raises(ValueError, match="on meta"):
        ce(h, w.to("meta"), b, y)
    with pytest.raises(ValueError, match="on meta"):
        ce(h, w, b, y.to("meta"))
    with pytest.raises(ValueError, match="reduction"):
        ce(h, w, b, y, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        ce(h, w, b, y, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        linear_softmax(h, w, b, temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        linear_softmax(h, w.t(), b)


def test_opcheck():
    h, w, b, y = make_case(6, 20, 8, torch.float32, True, False)
    for backend in ("torch", "triton"):
        op = getattr(torch.ops.lorafast, f"linear_ce_fwd_{backend}")
        torch.library.opcheck(op.default, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, IGNORE))
    torch.library.opcheck(torch.ops.lorafast.linear_softmax_triton.default, (h.detach(), w.detach(), None, 1.0, False))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_rule_and_large_offsets(dtype):
    """On a GPU: the CCE rule in bf16/fp16 at a real size, and N*V past 2**31 (int64 offsets)."""
    dev = "cuda"
    h, w, b, y = make_case(2048, 32003, 256, torch.float32, True, False)
    h, w, b, y = (t.to(dev) for t in (h, w, b, y))
    ours = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction=a[4]), h.to(dtype), w.to(dtype), b.to(dtype), y,
                  "mean", None)
    truth = run_ce(eager, h.double(), w.double(), b.double(), y, "mean", None)
    ref = run_ce(eager, h.to(dtype), w.to(dtype), b.to(dtype), y, "mean", None)
    for name, o, r, t in zip(("loss", "dh", "dW", "db"), ours, ref, truth):
        assert_rule(name, o, r, t, TOL[dtype])
    # N * V = 66000 * 32768 > 2**31: compare the last rows with the chunked torch path
    N, V, D = 66000, 32768, 64
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, D, device=dev, generator=g).to(dtype)
    w = (torch.randn(V, D, device=dev, generator=g) / 8).to(dtype)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    a = linear_cross_entropy(h, w, None, y, reduction="none")
    c = linear_cross_entropy(h, w, None, y, reduction="none", impl="torch")
    torch.testing.assert_close(a[-100:], c[-100:], rtol=2e-2, atol=2e-2)
    p = linear_softmax(h[-40000:], w, None)
    q = linear_softmax(h[-40000:], w, None, impl="torch")
    torch.testing.assert_close(p[-10:].float(), q[-10:].float(), rtol=2e-2, atol=1e-4)


def test_fp16_gradients_do_not_underflow():
    # With a mean over N rows, dz * g is about 1 / (N * V): below fp16's range at real sizes. The
    # kernel folds g in relative to the tile's max |g| and rescales after the dots. At
    # N = V = 2048 the relative error of dh and dW is 2.5e-4 (1.8e-3 when dz * g is cast directly).
    torch.manual_seed(0)
    N, V, D = 2048, 2048, 16
    h = (torch.randn(N, D) * 0.5).half().requires_grad_()
    w = (torch.randn(V, D) * 0.5).half().requires_grad_()
    y = torch.randint(0, V, (N,))
    linear_cross_entropy(h, w, None, y, impl="triton").backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.T, y).backward()
    for name, ours, truth in (("dh", h.grad, h64.grad), ("dW", w.grad, w64.grad)):
        rel = ((ours.double() - truth).norm() / truth.norm()).item()
        assert rel < 6e-4, (name, rel)


@pytest.mark.parametrize("path", ["dense", "filtered"])
def test_backward_in_vocabulary_chunks(monkeypatch, path):
    # Dense backward: the softmax-gradient buffer covers a slice of rows x a chunk of the
    # vocabulary at a time (dW staged in fp32 per chunk, dh accumulated in fp32 across chunks).
    # Filtered backward: dW accumulates in fp32 one VOCAB_CHUNK of (sorted) rows at a time.
    # Several chunks and slices (the last ones ragged) must give the gradients of a single pass.
    import lorafast.kernels.linear_ce as k

    h, w, b, y = make_case(37, 123, 31, torch.float32, True, False)
    eps = None if path == "dense" else 1e-30  # a filter that skips nothing but all-zero tiles
    fn = lambda h, w, b, y, r: linear_cross_entropy(h, w, b, y, reduction=r, impl="triton", filter_eps=eps)  # noqa: E731
    up = torch.randn(37, dtype=torch.float32)
    whole = run_ce(fn, h, w, b, y, "none", up)
    if path == "dense":
        monkeypatch.setattr(k, "_dz_chunking", lambda N, V, D, bv: (16, 48))  # rows 16, 16, 5; columns 48, 48, 27
    else:
        monkeypatch.setattr(k, "VOCAB_CHUNK", 48)
    chunked = run_ce(fn, h, w, b, y, "none", up)
    for name, a, c in zip(("loss", "dh", "dW", "db"), whole, chunked):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=name)
    truth = run_ce(lambda h, w, b, y, r: F.cross_entropy(F.linear(h, w, b), y, ignore_index=IGNORE, reduction=r),
                   h.double(), w.double(), b.double(), y, "none", up.double())
    for name, c, t in zip(("loss", "dh", "dW", "db"), chunked, truth):
        torch.testing.assert_close(c.double(), t, rtol=1e-4, atol=1e-5, msg=name)


def test_dense_chunking_bounds_the_buffer():
    # the softmax-gradient buffer: <= DZ_CHUNK_ELEMS elements, <= 1/8 of the logits (plus one tile
    # of rounding), columns a multiple of the tile unless the vocabulary is narrower
    import lorafast.kernels.linear_ce as k

    for N, V, D in [(16384, 50304, 2048), (16384, 131072, 2048), (1024, 131072, 4096), (1 << 20, 32000, 512),
                    (7, 300, 48), (3, 100000, 16)]:
        rows, cols = k._dz_chunking(N, V, D, 128)
        assert 1 <= rows <= N and 1 <= cols <= V, (N, V, rows, cols)
        assert rows * cols <= max(k.DZ_CHUNK_ELEMS, 128 * rows), (N, V, rows, cols)
        assert cols <= max(triton_cdiv(V, 8) + 128, k.MIN_DZ_COLS + 128), (N, V, cols)
        assert cols == V or cols % 128 == 0, (V, cols)
        assert cols * D <= max(k.DW_STAGE_ELEMS, k.MIN_DZ_COLS * D + 128 * D), (D, cols)


def triton_cdiv(a, b):
    return -(-a // b)


def _sub_eps_bound(h, w, b, y, g, eps):
    """fp64 bound of what the filter may drop: |g_n| * sum over entries with |dz| < eps of
    |dz[n, v]| |W[v]| for dh, and sum_n |g_n| |dz[n, v]| |h_n| for dW (a superset of the skipped
    tiles' entries)."""
    z = F.linear(h.double(), w.double(), None if b is None else b.double())
    dz = torch.softmax(z, -1)
    valid = y != IGNORE
    dz[valid, y[valid]] -= 1.0
    small = torch.where(dz.abs() < eps, dz.abs(), torch.zeros_like(dz)) * (g.double().abs() * valid)[:, None]
    return small @ w.double().abs(), small.t() @ h.double().abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_filter_eps_error_within_its_bound(dtype, eps):
    """Confident logits (a trained model's regime): the filtered backward skips tiles, and its dh
    and dW differ from the fp64 truth by at most the dropped sub-eps entries (the documented
    bound) on top of the CCE rule; loss and db are exact. The PyTorch path ignores filter_eps."""
    N, V, D = 5, 4099, 48
    h, w, b, y = make_case(N, V, D, dtype, True, True, ignore_frac=0.0)
    up = torch.rand(N, dtype=torch.float64) + 0.5
    ce = lambda impl: lambda *a: linear_cross_entropy(*a[:4], reduction="none", impl=impl, filter_eps=eps)  # noqa: E731
    ours = run_ce(ce("triton"), h, w, b, y, "none", up.float())
    # the same kernel and vocabulary order with a filter that skips nothing but all-zero tiles
    unfiltered = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction="none", impl="triton", filter_eps=1e-30),
                        h, w, b, y, "none", up.float())
    truth = run_ce(eager, h.double(), w.double(), b.double(), y, "none", up)
    ref = run_ce(eager, h, w, b, y, "none", up.to(dtype))
    bound_dh, bound_dw = _sub_eps_bound(h, w, b, y, up, eps)
    assert_rule("filtered loss", ours[0], ref[0], truth[0], TOL[dtype])
    assert_rule("filtered db", ours[3], ref[3], truth[3], TOL[dtype])
    for name, o, r, t, bound in (("dh", ours[1], ref[1], truth[1], bound_dh), ("dW", ours[2], ref[2], truth[2], bound_dw)):
        assert_rule(f"filtered {name}", o, r, t + torch.sign(o.double() - t) * torch.minimum(bound, (o.double() - t).abs()),
                    TOL[dtype])
    # something was skipped (the tiles that hold no target have all their entries below eps here)
    assert not torch.equal(ours[2], unfiltered[2]) and not torch.equal(ours[1], unfiltered[1])
    torch_path = run_ce(ce("torch"), h, w, b, y, "none", up.float())
    torch_exact = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction="none", impl="torch"), h, w, b, y, "none",
                         up.float())
    for a, c in zip(torch_path, torch_exact):
        assert torch.equal(a, c)


def test_filter_eps_validation():
    h, w, b, y = make_case(8, 40, 16, torch.float32, True, False)
    for bad, err in ((0.0, ValueError), (1.0, ValueError), (-1e-3, ValueError), (True, TypeError), ("auto", TypeError)):
        with pytest.raises(err, match="filter_eps"):
            linear_cross_entropy(h, w, b, y, filter_eps=bad)


# Upstream row weights spanning orders of magnitude (reduction="none" with a weighted sum): a
# row's dh must be as precise as the row allows, whatever the other rows of its tile weigh.
_ROW_WEIGHTS = {
    "alternate": lambda n: torch.tensor([1.0, 1e-5]).repeat((n + 1) // 2)[:n],
    "halves": lambda n: torch.where(torch.arange(n) < n // 2, 1.0, 1e-5),
    "one_big": lambda n: torch.where(torch.arange(n) == 3, 1.0, 1e-5),
    "geometric": lambda n: 10.0 ** (-8.0 * torch.arange(n) / n),
}


ROW_REL = {torch.float16: 8 * 2.0**-11, torch.float32: 32 * 2.0**-24}


def _row_errors(ours, truth):
    return (ours.double() - truth).norm(dim=1) / truth.norm(dim=1)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("weights", list(_ROW_WEIGHTS))
@pytest.mark.parametrize("dtype,bias", [(torch.float16, False), (torch.float16, True), (torch.float32, False)])
def test_row_precision_does_not_depend_on_other_rows(impl, weights, dtype, bias):
    """Issue 13 item 3 (fp16, N=70, D=48, V=300, rows weighted 1 and 1e-5 in turn): each row of
    dh within 2x the error of the correctly rounded fp64 truth plus ROW_REL (8 unit roundoffs in
    fp16; 32 in fp32, where the fp32 arithmetic, not the output rounding, dominates), the same
    rule for both backends; dW and db under the CCE rule against eager in the same dtype."""
    N, V, D = 70, 300, 48
    h, w, b, y = make_case(N, V, D, dtype, bias, False, ignore_frac=0.0)
    up = _ROW_WEIGHTS[weights](N).double()
    ours = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction="none", impl=impl), h, w, b, y, "none",
                  up.float())
    truth = run_ce(eager, h.double(), w.double(), b.double() if bias else None, y, "none", up)
    ref = run_ce(eager, h, w, b, y, "none", up.to(dtype))
    floor = _row_errors(truth[1].to(dtype), truth[1])  # the error of rounding the truth once
    err = _row_errors(ours[1], truth[1])
    bound = 2 * floor + ROW_REL[dtype]
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (f"{impl} dh row {worst} (weight {up[worst]:.1e}): relative error "
                                  f"{err[worst]:.3g} > bound {bound[worst]:.3g} (rounding the truth: {floor[worst]:.3g})")
    for name, o, r, t in zip(("dW", "db"), ours[2:], ref[2:], truth[2:]):
        if t is not None:
            assert_rule(f"{impl} {name}", o, r, t, TOL[dtype])


def test_launch_grids_within_cuda_limits():
    """Issue 13, item 1: every launch grid of the CE kernels stays within CUDA's limits (x <=
    2**31 - 1, y and z <= 65535) for huge valid shapes. The softmax write used a 2-D grid with
    cdiv(V, 128) on axis 1, over the limit from V = 8,388,737 on; the tile kernels now launch
    1-D grouped grids (row slices where even those would exceed x), the LSE kernel row blocks on
    x and at most 2 waves of vocabulary splits on y."""
    import lorafast.kernels.linear_ce as k

    lse_cfg, tile_cfg = k._CONFIGS[("lse", "half")], k._CONFIGS[("write", "half")]
    for N, V in [(1, 2**31 - 1), (2**31 - 1, 2**31 - 1), (16384, 10**7), (7, 50304)]:
        for sms in (132, 0):
            (gx, gy), per = k._lse_grid(N, V, lse_cfg, sms)
            assert gx <= k.MAX_GRID_X and gy <= k.MAX_GRID_YZ, (N, V, gx, gy)
            tiles = triton_cdiv(V, lse_cfg.BLOCK_V)
            assert gy * per >= tiles and (gy - 1) * per < tiles  # every tile covered, no empty split
    for N, V in [(4096, 10**7), (2**26, 2**20), (2**33, 8192), (3, 2**31 - 1)]:
        col_tiles = triton_cdiv(V, tile_cfg.BLOCK_V)
        slices = k._row_slices(N, col_tiles, tile_cfg.BLOCK_N)
        assert slices[0][0] == 0 and slices[-1][1] == N and all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        for r0, r1 in slices[:3] + slices[-2:]:
            assert k._tile_grid(r1 - r0, V, tile_cfg)[0] <= k.MAX_GRID_X
    assert triton_cdiv(10**7, tile_cfg.BLOCK_V) > k.MAX_GRID_YZ  # what the old axis 1 would have been
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        k._check_grid((1, k.MAX_GRID_YZ + 1))
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        k._tile_grid(2**40, 2**40, tile_cfg)


@pytest.mark.parametrize("what", ["softmax", "filtered"])
def test_row_sliced_launches_match(monkeypatch, what):
    # a real launch split into row slices (grid limit lowered to 3 programs) gives the same result
    import lorafast.kernels.linear_ce as k

    h, w, b, y = make_case(100, 300, 24, torch.float32, True, False)
    up = torch.randn(100)
    if what == "softmax":
        run = lambda: linear_softmax(h, w, b, impl="triton")  # noqa: E731
    else:
        run = lambda: run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction="none", impl="triton",  # noqa: E731
                                                             filter_eps=1e-30), h, w, b, y, "none", up)
    whole = run()
    monkeypatch.setattr(k, "MAX_GRID_X", 3)
    assert len(k._row_slices(100, 2, 64)) == 2
    sliced = run()
    for a, c in zip(whole if isinstance(whole, tuple) else (whole,), sliced if isinstance(sliced, tuple) else (sliced,)):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
def test_tma_path_matches_pointer_path(monkeypatch, bias):
    # On Hopper the LSE, dense-backward and softmax-write kernels read h and W by TMA (zero-filled
    # out-of-bounds boxes instead of masks). The interpreter runs that path on request: it must
    # give the pointer path's results on a ragged shape (N, V not multiples of the tiles).
    import lorafast.kernels.linear_ce as k

    h, w, b, y = make_case(37, 300, 48, torch.float16, bias, False)
    up = torch.randn(37)
    fn = lambda h, w, b, y, r: linear_cross_entropy(h, w, b, y, reduction=r, impl="triton")  # noqa: E731
    assert not k._use_tma(h, w)
    ptr = run_ce(fn, h, w, b, y, "none", up), linear_softmax(h, w, b, impl="triton", log=True)
    monkeypatch.setattr(k, "TMA_IN_INTERPRETER", True)
    assert k._use_tma(h, w) and not k._use_tma(h[:, ::2], w) and not k._use_tma(h.float(), w.float())
    tma = run_ce(fn, h, w, b, y, "none", up), linear_softmax(h, w, b, impl="triton", log=True)
    for name, a, c in zip(("loss", "dh", "dW", "db", "log_softmax"), (*ptr[0], ptr[1]), (*tma[0], tma[1])):
        if a is None:
            assert c is None
            continue
        torch.testing.assert_close(c, a, rtol=0, atol=0, msg=name)


@pytest.mark.cuda
def test_cuda_dense_and_filtered_backward_bf16():
    """On a GPU, bf16: the dense backward (several vocabulary chunks) under the CCE rule, and the
    filtered one (eps = CCE's "auto" for bf16) within the filter's bound on top of it, on the
    benchmark's synthetic peaked logits."""
    import lorafast.kernels.linear_ce as k
    from lorafast.bench.linear_ce import _inputs

    N, V, D = 4096, 50304, 512
    h, w, b, y = (t.to(torch.bfloat16) if t.is_floating_point() else t
                  for t in _inputs(N, V, D, torch.float32, "cuda", True, grad=False, logits="peaked"))
    assert k._dz_chunking(N, V, D, 128)[1] < V  # several chunks
    truth = run_ce(eager, h.double(), w.double(), b.double(), y, "mean", None)
    ref = run_ce(eager, h, w, b, y, "mean", None)
    g = (y != IGNORE).double() / (y != IGNORE).sum()
    eps = torch.finfo(torch.bfloat16).eps / 32
    bound_dh, bound_dw = _sub_eps_bound(h, w, b, y, g, eps)
    for filt in (None, eps):
        ours = run_ce(lambda *a: linear_cross_entropy(*a[:4], reduction=a[4], filter_eps=filt), h, w, b, y, "mean",
                      None)
        for name, o, r, t in zip(("loss", "dh", "dW", "db"), ours, ref, truth):
            if filt is not None and name in ("dh", "dW"):
                slack = (bound_dh if name == "dh" else bound_dw).to(t.device)
                t = t + torch.sign(o.double() - t) * torch.minimum(slack, (o.double() - t).abs())
            assert_rule(f"{'filtered' if filt else 'dense'} {name}", o, r, t, TOL[torch.bfloat16])

"""Fused output projection + cross-entropy / softmax that never holds the N x V logits.

``linear_cross_entropy(h, W, b, y)`` equals ``F.cross_entropy(F.linear(h, W, b), y)`` and
``linear_softmax(h, W, b)`` equals ``softmax(F.linear(h, W, b) / temperature)``, but neither
materialises the logits: the Triton path (:mod:`lorafast.kernels.linear_ce`) works on tiles, the
PyTorch path on row chunks of at most ``_CHUNK_ELEMS`` logits, recomputed in the backward.

Dtype policy: h, W, b in fp32/fp16/bf16 (all the same dtype); logits, LSE and gradients
accumulate in fp32; the loss is fp32; dh, dW, db come back in the input dtype;
``linear_softmax`` returns the input dtype (what ``torch.softmax`` of the input-dtype logits
returns; internally fp32, rounded once at the store).

Out-of-range targets (not ``ignore_index`` and outside [0, V)) never become addresses: the
kernels only compare targets with column indices. ``check`` chooses when they are reported:
``None`` (default) raises ValueError eagerly for CPU tensors (free there; not under
``torch.compile``, where it would break the graph) and, for CUDA tensors, adds no host sync:
such rows get a NaN loss (and NaN reaches the mean/sum), computed on device;
``True`` always validates eagerly (one host sync on CUDA); ``False`` never raises (NaN rows only).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from lorafast.ops._dispatch import select_backend

REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# PyTorch path: logits held per chunk (fp32 elements). CPU: 2**20 = 4 MiB, so that the
# elementwise passes over a chunk stay in cache (measured on a 2-core Xeon at N=4096, V=32768,
# D=128: 2**20 took 0.64x the time of 2**22 and beat eager F.linear + F.cross_entropy).
# CUDA (the fallback path there): 2**24 = 64 MiB, fewer launches.
_CHUNK_ELEMS = 1 << 20
_CHUNK_ELEMS_CUDA = 1 << 24


@dataclasses.dataclass(frozen=True)
class LinearCEOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    check: Optional[bool] = None
    filter_eps: Optional[float] = None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_linear(op: str, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("h", h), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dtype not in _FLOATS:
        raise TypeError(f"{op}: h must be float32, float16 or bfloat16, got {h.dtype}")
    if h.dim() < 2:
        raise ValueError(f"{op}: h must have shape [..., D], got {tuple(h.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must have shape [V, D], got {tuple(weight.shape)}")
    if weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{op}: weight is {tuple(weight.shape)} but h has D = {h.shape[-1]}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{op}: weight must have V > 0 and D > 0, got {tuple(weight.shape)}")
    if weight.dtype != h.dtype:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from h dtype {h.dtype}")
    if weight.device != h.device:
        raise ValueError(f"{op}: weight is on {weight.device} but h is on {h.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != h.dtype:
            raise TypeError(f"{op}: bias dtype {bias.dtype} differs from h dtype {h.dtype}")
        if bias.device != h.device:
            raise ValueError(f"{op}: bias is on {bias.device} but h is on {h.device}")


def _bad_targets(targets: torch.Tensor, V: int, ignore_index: int) -> torch.Tensor:
    """Bool [N] on device: targets that are neither ignore_index nor in [0, V)."""
    return (targets != ignore_index) & ((targets < 0) | (targets >= V))


def _validate_ce(h, weight, bias, targets, opts: LinearCEOptions) -> None:
    op = "linear_cross_entropy"
    _check_linear(op, h, weight, bias)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{op}: targets must be int64, got {targets.dtype}")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} must equal h.shape[:-1] = {tuple(h.shape[:-1])}")
    if targets.device != h.device:
        raise ValueError(f"{op}: targets are on {targets.device} but h is on {h.device}")
    if opts.reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {opts.reduction!r}")
    if isinstance(opts.ignore_index, bool) or not isinstance(opts.ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(opts.ignore_index).__name__}")
    eps = opts.filter_eps
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"{op}: filter_eps must be None or a float, got {type(eps).__name__}")
        if not 0 < eps < 1:
            raise ValueError(f"{op}: filter_eps must lie in (0, 1), got {eps}")
    # default: eager on CPU (free there), except under torch.compile, where it would be a graph break
    eager = opts.check if opts.check is not None else (h.device.type == "cpu" and not torch.compiler.is_compiling())
    if eager and targets.numel():
        bad = _bad_targets(targets, weight.shape[0], opts.ignore_index)
        if bool(bad.any()):  # one sync on CUDA, only with check=True
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: target {int(targets.reshape(-1)[i])} at flat index {i} is outside "
                             f"[0, {weight.shape[0]}) and is not ignore_index={opts.ignore_index}")


# ----------------------------------------------------------------------------------------------
# PyTorch path: row chunks, logits recomputed in the backward
# ----------------------------------------------------------------------------------------------
def _chunk_rows(V: int, device: torch.device) -> int:
    return max(1, (_CHUNK_ELEMS_CUDA if device.type == "cuda" else _CHUNK_ELEMS) // V)


def _logits_into(buf: torch.Tensor, hc: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """buf[:r] = hc @ w.T (+ b) in fp32, reusing one chunk buffer (no allocation per chunk)."""
    z = buf[:hc.shape[0]]
    if b is None:
        return torch.mm(hc, w.t(), out=z)
    return torch.addmm(b, hc, w.t(), out=z)


class _Augmented:
    """Fold per-column and per-row offsets into one GEMM: [h, 1, c] @ [W, b, 1].T = h W^T + b + c.

    Saves the elementwise passes over the [r, V] chunk that adding the bias (and, in the
    backward, subtracting the LSE) would cost; those passes dominate the chunked CPU path.
    """

    def __init__(self, weight, bias, row_offset: bool, rows: int):
        V, D = weight.shape
        cols = [weight.float()] + ([bias.float()[:, None]] if bias is not None else [])
        if row_offset:
            cols.append(torch.ones((V, 1), dtype=torch.float32, device=weight.device))
        self.D = D
        self.w = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]  # [V, D + extra]
        self.h = torch.ones((rows, self.w.shape[1]), dtype=torch.float32, device=weight.device)
        self.row_offset = row_offset

    def logits(self, out: torch.Tensor, hc: torch.Tensor, offset: Optional[torch.Tensor] = None):
        """out[:r] = hc W^T + b (+ offset[:, None]) in fp32."""
        ha = self.h[:hc.shape[0]]
        ha[:, :self.D] = hc
        if self.row_offset:
            ha[:, -1] = offset
        return torch.mm(ha, self.w.t(), out=out[:hc.shape[0]])


def _torch_lse(h, weight, bias, targets, scale: float = 1.0):
    """fp32 (lse [N], target logit [N] | None), chunk by chunk; targets already made safe."""
    N = h.shape[0]
    V = weight.shape[0]
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    zt = torch.empty(N, dtype=torch.float32, device=h.device) if targets is not None else None
    r = min(_chunk_rows(V, h.device), N)
    aug = _Augmented(weight, bias, False, r)
    buf = torch.empty((r, V), dtype=torch.float32, device=h.device)
    for i in range(0, N, r):
        z = aug.logits(buf, h[i:i + r])  # [r, V] fp32
        if targets is not None:
            torch.gather(z, 1, targets[i:i + r, None], out=zt[i:i + r, None])
        if scale != 1.0:
            z.mul_(scale)
        # log-sum-exp in place on the chunk (no [r, V] temporaries)
        m = z.amax(dim=1, keepdim=True)
        torch.add(m[:, 0], z.sub_(m).exp_().sum(dim=1).log_(), out=lse[i:i + r])
    return lse, zt


def _torch_ce_backward(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db):
    N, D = h.shape
    V = weight.shape[0]
    w = weight.float()
    dh = torch.empty((N, D), dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_dw else None
    db = torch.zeros((V,), dtype=torch.float32, device=h.device) if need_db else None
    r = min(_chunk_rows(V, h.device), N)
    aug = _Augmented(weight, bias, True, r)
    buf = torch.empty((r, V), dtype=torch.float32, device=h.device)
    minus_one = torch.full((r, 1), -1.0, dtype=torch.float32, device=h.device)
    for i in range(0, N, r):
        hc = h[i:i + r].float()
        gc = g[i:i + r]
        # P - Y with P = exp(z - lse) recomputed in one GEMM (the -lse folded in) and one exp
        dz = aug.logits(buf, hc, -lse[i:i + r]).exp_()
        dz.scatter_add_(1, targets[i:i + r, None], minus_one[:dz.shape[0]])
        # the row weights g go on the small side of each product: diag(g) (P - Y) never formed
        if need_dh:
            torch.mm(dz, w, out=dh[i:i + r]).mul_(gc[:, None])
        if need_dw:
            dw.addmm_(dz.t(), hc * gc[:, None])
        if need_db:
            db.addmv_(dz.t(), gc)
    return dh, dw, db


@torch.no_grad()  # inference only, as the Triton path
def _torch_softmax(h, weight, bias, scale: float, log: bool) -> torch.Tensor:
    N = h.shape[0]
    V = weight.shape[0]
    w = weight.float()
    b = bias.float() if bias is not None else None
    out = torch.empty((N, V), dtype=h.dtype, device=h.device)
    r = _chunk_rows(V, h.device)
    # fp32 output: compute in place in the output; otherwise in one reused fp32 chunk buffer
    buf = None if h.dtype == torch.float32 else torch.empty((min(r, N), V), dtype=torch.float32, device=h.device)
    for i in range(0, N, r):
        z = _logits_into(out[i:i + r] if buf is None else buf, h[i:i + r].float(), w, b)
        if scale != 1.0:
            z.mul_(scale)
        z.sub_(z.amax(dim=1, keepdim=True))
        if log:
            z.sub_(z.exp().sum(dim=1, keepdim=True).log_())
        else:
            z.exp_()
            z.div_(z.sum(dim=1, keepdim=True))
        if buf is not None:
            out[i:i + r] = z
    return out


# ----------------------------------------------------------------------------------------------
# Backends. Each one is a pair (per-row LSE and target logit; backward), registered below as its
# own torch.library custom ops, so that torch.compile sees each fused op as one node and the
# chunked PyTorch path keeps its memory-saving backward. Inputs: 2-D h, validated.
# ----------------------------------------------------------------------------------------------
def _safe_targets(targets: torch.Tensor, V: int) -> torch.Tensor:
    """Targets with ignored / out-of-range entries replaced by 0, so the torch path may gather."""
    ok = (targets >= 0) & (targets < V)
    return torch.where(ok, targets, torch.zeros_like(targets))


def _lse_triton(h, weight, bias, targets):
    from lorafast.kernels.linear_ce import lse_forward

    return lse_forward(h, weight, bias.contiguous() if bias is not None else None, targets.contiguous())


def _lse_torch(h, weight, bias, targets):
    return _torch_lse(h, weight, bias, _safe_targets(targets, weight.shape[0]))


def _bwd_triton(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db, filter_eps):
    from lorafast.kernels.linear_ce import ce_backward

    return ce_backward(h, weight, bias.contiguous() if bias is not None else None, targets.contiguous(),
                       lse.contiguous(), g.contiguous(), need_dh, need_dw, need_db, filter_eps)


def _bwd_torch(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db, filter_eps):
    # exact gradients: the gradient filter is a Triton-path speed option
    return _torch_ce_backward(h, weight, bias, _safe_targets(targets, weight.shape[0]), lse, g,
                              need_dh, need_dw, need_db)


def _register_ce(backend: str, lse_fn, bwd_fn):
    """Custom ops ``lorafast::linear_ce_fwd_<backend>`` / ``..._bwd_<backend>`` with autograd."""

    @torch.library.custom_op(f"lorafast::linear_ce_fwd_{backend}", mutates_args=())
    def fwd(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
            ignore_index: int, filter_eps: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per row fp32 [N]: 0 where ignored, NaN where the target is out of range; lse fp32 [N])."""
        if h.shape[0] == 0:
            e = h.new_empty((0,), dtype=torch.float32)
            return e, e.clone()
        lse, zt = lse_fn(h, weight, bias, targets)
        valid = targets != ignore_index
        bad = _bad_targets(targets, weight.shape[0], ignore_index)
        loss = torch.where(valid, lse - zt, torch.zeros_like(lse))
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
        return loss, lse

    @fwd.register_fake
    def _(h, weight, bias, targets, ignore_index, filter_eps=None):
        return h.new_empty((h.shape[0],), dtype=torch.float32), h.new_empty((h.shape[0],), dtype=torch.float32)

    @torch.library.custom_op(f"lorafast::linear_ce_bwd_{backend}", mutates_args=())
    def bwd(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
            lse: torch.Tensor, grad_rows: torch.Tensor, need_dh: bool, need_dw: bool,
            need_db: bool, filter_eps: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dh, dW, db) in the input dtype; an empty tensor stands for a gradient not asked for."""
        need_db = need_db and bias is not None
        if h.shape[0] == 0:
            dh, dw = torch.zeros_like(h), torch.zeros_like(weight)
            db = torch.zeros_like(bias) if need_db else h.new_empty((0,))
        else:
            dh, dw, db = bwd_fn(h, weight, bias, targets, lse, grad_rows, need_dh, need_dw, need_db, filter_eps)
        empty = lambda: h.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
        return (dh.to(h.dtype) if need_dh else empty(), dw.to(h.dtype) if need_dw else empty(),
                db.to(h.dtype) if need_db else empty())

    @bwd.register_fake
    def _(h, weight, bias, targets, lse, grad_rows, need_dh, need_dw, need_db, filter_eps=None):
        empty = lambda: h.new_empty((0,))  # noqa: E731
        need_db = need_db and bias is not None
        return (torch.empty_like(h) if need_dh else empty(), torch.empty_like(weight) if need_dw else empty(),
                torch.empty_like(bias) if need_db else empty())

    def setup_context(ctx, inputs, output):
        h, weight, bias, targets, ignore_index, filter_eps = inputs
        ctx.save_for_backward(h, weight, bias, targets, output[1])
        ctx.ignore_index = ignore_index
        ctx.filter_eps = filter_eps

    def backward(ctx, grad_loss, grad_lse):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = bool(need_db and bias is not None)
        if grad_loss is None:
            return None, None, None, None, None, None
        # d loss_n / d z = (softmax - onehot) on counted rows; ignored rows are constant 0, and so
        # are rows with an out-of-range target (NaN loss under check=None on CUDA): no wrong gradient.
        valid = (targets != ctx.ignore_index) & ~_bad_targets(targets, weight.shape[0], ctx.ignore_index)
        g = torch.where(valid, grad_loss.float(), torch.zeros_like(lse))
        dh, dw, db = bwd(h, weight, bias, targets, lse, g, need_dh, need_dw, need_db, ctx.filter_eps)
        return dh if need_dh else None, dw if need_dw else None, db if need_db else None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd


_CE_BACKENDS = {"triton": _register_ce("triton", _lse_triton, _bwd_triton),
                "torch": _register_ce("torch", _lse_torch, _bwd_torch)}


@torch.library.custom_op("lorafast::linear_softmax_triton", mutates_args=())
def _softmax_triton(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
                    log: bool) -> torch.Tensor:
    if h.shape[0] == 0:
        return h.new_empty((0, weight.shape[0]))
    from lorafast.kernels.linear_ce import softmax_forward

    return softmax_forward(h, weight, bias.contiguous() if bias is not None else None, scale, log, h.dtype)


@_softmax_triton.register_fake
def _(h, weight, bias, scale, log):
    return h.new_empty((h.shape[0], weight.shape[0]))


# The PyTorch softmax needs no backward of its own (inference only): a plain function.
_SOFTMAX_BACKENDS = {"triton": _softmax_triton, "torch": _torch_softmax}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                         impl: str = "auto", check: Optional[bool] = None,
                         filter_eps: Optional[float] = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias), targets)`` without the N x V logits.

    h [..., D], weight [V, D], bias [V] or None, targets int64 [...] (h.shape[:-1]).
    Differentiable in h, weight, bias. Rows whose target is ``ignore_index`` contribute 0 and
    are not counted by "mean" (all rows ignored gives NaN, as in PyTorch). Returns fp32: a
    scalar for "mean"/"sum", the per-position losses (targets' shape) for "none".
    ``check``: see the module docstring (None: eager ValueError on CPU, NaN rows on CUDA; such
    rows take no gradient).
    Triton backward: softmax-gradient chunks reduced by GEMMs with fp32 accumulation (dh, dW
    deterministic; db sums with atomic adds, so it varies run to run in the last fp32 bits);
    extra memory about 4 * N * D bytes (fp32 dh) plus a 2**26-element chunk buffer (at most 1/8
    of the logits) and a 32 MiB fp32 staging of dW rows.
    ``impl``: "auto" | "triton" | "torch" (see :func:`lorafast.ops._dispatch.select_backend`).
    ``filter_eps``: None (default, exact) or a float in (0, 1): the Triton backward skips, for dh
    and dW, the tiles whose softmax gradient |softmax - onehot| is below it everywhere (Cut
    Cross-Entropy's gradient filter; error bound in :mod:`lorafast.kernels.linear_ce`); worth it
    on a trained model's confident logits. The PyTorch path ignores it (exact gradients).
    """
    opts = LinearCEOptions(ignore_index=ignore_index, reduction=reduction, check=check, filter_eps=filter_eps)
    _validate_ce(h, weight, bias, targets, opts)
    fwd = _CE_BACKENDS[select_backend("linear_cross_entropy", impl, h, weight, targets)]
    lead = targets.shape
    loss, _ = fwd(h.reshape(-1, h.shape[-1]), weight, bias, targets.reshape(-1), opts.ignore_index,
                  None if opts.filter_eps is None else float(opts.filter_eps))
    if opts.reduction == "none":
        return loss.reshape(lead)
    if opts.reduction == "sum":
        return loss.sum()
    count = (targets != opts.ignore_index).sum()  # on device: no host sync
    return loss.sum() / count


def linear_softmax(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                   temperature: float = 1.0, log: bool = False, impl: str = "auto") -> torch.Tensor:
    """``softmax(F.linear(h, weight, bias) / temperature, -1)`` (``log``: log_softmax), fused.

    h [..., D], weight [V, D], bias [V] or None; returns [..., V] in h's dtype (computed in
    fp32, rounded once). Inference only: not differentiable.
    """
    op = "linear_softmax"
    _check_linear(op, h, weight, bias)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    softmax = _SOFTMAX_BACKENDS[select_backend(op, impl, h, weight)]
    out = softmax(h.reshape(-1, h.shape[-1]), weight, bias, 1.0 / float(temperature), bool(log))
    return out.reshape(*h.shape[:-1], weight.shape[0])

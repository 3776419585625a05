"""Scaled dot-product attention over ``[B, H, T, D]`` heads, causal by default.

``attention(q, k, v, causal=True, scale=None, impl="auto")`` computes
``softmax(scale * q @ k^T + mask) @ v`` for q ``[B, H, TQ, D]`` and k, v ``[B, H, TK, D]``.
The causal mask is aligned bottom-right, as in FlashAttention: query i sees key j iff
``j <= i + TK - TQ``, so TQ == TK is ordinary causal self-attention and TQ < TK puts the
queries at the end of the key sequence (a KV-cache step: TQ new tokens after TK - TQ cached
ones). Causal with TQ > TK would leave rows with no visible key: it raises ValueError.

* ``impl="triton"`` runs the fused FlashAttention-2-style kernels of
  :mod:`lorafast.kernels.attention` (imported lazily, so this module loads without triton),
  registered as the torch.library ops ``lorafast::attention_fwd`` / ``lorafast::attention_bwd``
  so that ``torch.compile`` traces them. q, k, v may have any strides (e.g. views of a fused qkv
  projection: ``qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)``); nothing is copied.
  The output is ``[B, H, T, D]`` laid out in ``[B, T, H, D]`` memory, so
  ``out.transpose(1, 2).reshape(B, T, H * D)`` is free. Gradients of dense inputs keep their
  strides; gradients of non-dense inputs (such as qkv views) come back in ``[B, T, H, D]`` memory.
  The backward is one fused kernel with dQ accumulated by fp32 atomic adds (dq's last bits vary
  run to run); ``deterministic=True`` selects separate dK/dV and dQ kernels, bitwise
  reproducible. Any B * H (1-D launch grids).
* ``impl="torch"`` calls ``torch.nn.functional.scaled_dot_product_attention``
  (``is_causal=True`` when TQ == TK, else an explicit bottom-right boolean mask, since SDPA's
  ``is_causal`` aligns top-left when TQ != TK).
* ``impl="auto"``: Triton where :func:`lorafast.ops._dispatch.select_backend` allows it (CUDA
  tensors or ``TRITON_INTERPRET=1``, 16 <= D <= 128), torch otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F

from lorafast.ops._dispatch import select_backend

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    causal: bool
    scale: float
    deterministic: bool = False


def _validate(q, k, v, causal, scale, deterministic) -> AttentionOptions:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape [B, H, T, D] (4 dims), "
                             f"got {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError("attention: k and v must have the same shape [B, H, TK, D], got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError("attention: q [B, H, TQ, D] and k, v [B, H, TK, D] must share B, H and D "
                         f"(same shape but for the sequence length), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attention: dtype must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    B, H, T, D = q.shape
    TK = k.shape[2]
    if B < 1 or H < 1 or T < 1 or TK < 1 or D < 1:
        raise ValueError(f"attention: B, H, TQ, TK and D must be >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if causal and T > TK:
        raise ValueError(f"attention: causal attention needs TQ <= TK (bottom-right aligned mask: "
                         f"query i sees keys j <= i + TK - TQ, so the first TQ - TK queries would "
                         f"see no key), got TQ={T}, TK={TK}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"attention: scale must be finite, got {scale}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"attention: deterministic must be a bool, got {type(deterministic).__name__}")
    return AttentionOptions(causal=causal, scale=float(scale), deterministic=deterministic)


def _attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions) -> torch.Tensor:
    """The PyTorch path: SDPA with this module's mask semantics (bottom-right causal when TQ != TK)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if not opts.causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=opts.causal, scale=opts.scale)
    # query i sees key j iff j <= i + tk - tq  (SDPA's is_causal would use j <= i)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)  # [TQ, TK]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=opts.scale)


def _out_like(q: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] in [B, T, H, D] memory, so the usual head merge after attention is a view."""
    B, H, T, D = q.shape
    return torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)


def _grad_like(x: torch.Tensor) -> torch.Tensor:
    """Dense inputs: same strides. Non-dense views (e.g. slices of a fused qkv): [B, T, H, D]."""
    if x.is_contiguous() or x.transpose(1, 2).is_contiguous():
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return _out_like(x)


def _empty_grad(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


# ---- torch.library ops (the Triton path) ---------------------------------------------------
@torch.library.custom_op("lorafast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic: unused here, carried to the backward through setup_context
    from lorafast.kernels.attention import attention_forward

    B, H, T, _ = q.shape
    out = _out_like(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    attention_forward(q, k, v, out, lse, causal=causal, scale=scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, deterministic):
    B, H, T, _ = q.shape
    return _out_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("lorafast::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                   need_dq: bool, need_dkdv: bool,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lorafast.kernels.attention import attention_backward

    dq = _grad_like(q) if need_dq else None
    dk = _grad_like(k) if need_dkdv else None
    dv = _grad_like(v) if need_dkdv else None
    attention_backward(do, q, k, v, out, lse, dq, dk, dv, causal=causal, scale=scale,
                       deterministic=deterministic)
    return (dq if dq is not None else _empty_grad(q), dk if dk is not None else _empty_grad(k),
            dv if dv is not None else _empty_grad(v))


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, causal, scale, need_dq, need_dkdv, deterministic):
    return (_grad_like(q) if need_dq else _empty_grad(q), _grad_like(k) if need_dkdv else _empty_grad(k),
            _grad_like(v) if need_dkdv else _empty_grad(v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.opts = AttentionOptions(causal=causal, scale=scale, deterministic=deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    need_dkdv = need_k or need_v
    dq, dk, dv = torch.ops.lorafast.attention_bwd(
        dout, q, k, v, out, lse, ctx.opts.causal, ctx.opts.scale, need_q, need_dkdv, ctx.opts.deterministic)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, None, None, None)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts: AttentionOptions) -> torch.Tensor:
    out, _ = torch.ops.lorafast.attention_fwd(q, k, v, opts.causal, opts.scale, opts.deterministic)
    return out


_BACKENDS = {"triton": _attention_triton, "torch": _attention_torch}


# ---- public op ------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, impl: str = "auto", deterministic: bool = False) -> torch.Tensor:
    """``softmax(scale * q @ k^T [+ causal mask]) @ v`` for q ``[B, H, TQ, D]``, k, v ``[B, H, TK, D]``.

    Args: q, k, v one dtype (fp16 / bf16 / fp32), one device, any strides, same B, H and D,
    k and v one shape; ``causal`` masks key j > query i + TK - TQ (bottom-right aligned; needs
    TQ <= TK); ``scale`` defaults to ``D ** -0.5``; ``impl`` "auto" | "triton" | "torch" (see
    :mod:`lorafast.ops._dispatch`: the Triton kernels take 16 <= D <= 128, "auto" runs other
    head dims on the PyTorch path). ``deterministic`` (Triton path): a bitwise reproducible
    backward (separate dK/dV and dQ kernels, 7 GEMMs per tile pair) instead of the default
    one-launch backward, whose fp32 atomic adds into dQ make dq's last bits vary run to run
    (out, dk and dv are reproducible either way); the PyTorch path ignores it. Returns
    ``[B, H, TQ, D]`` in the input dtype. Any B * H: the kernels' grids are 1-D.
    Differentiable in q, k, v. Raises ValueError / TypeError on bad input before any launch,
    and RuntimeError (environment) or ValueError (head dim) when impl="triton" cannot run.
    """
    opts = _validate(q, k, v, causal, scale, deterministic)
    return _BACKENDS[select_backend("attention", impl, q, k, v)](q, k, v, opts)

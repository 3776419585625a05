"""The one place that decides which backend runs an op: ``impl="auto" | "triton" | "torch"``.

Every public op calls :func:`select_backend` once, after validating its input, and then runs
the implementation of that name from its own table (``{"triton": ..., "torch": ...}``). The
decision covers everything that can keep a Triton kernel from running:

* availability: triton installed, and the tensors on CUDA (or on CPU with
  ``TRITON_INTERPRET=1``, the interpreter the test suite uses);
* dtype rules: the interpreter's ``tl.dot`` on bf16 operands is wrong in triton 3.9, so
  kernels that multiply bf16 tiles in ``tl.dot`` do not run bf16 under the interpreter;
* shape rules: the head dims the attention kernels are built for (16..128).

"auto" picks Triton when all hold and the PyTorch path otherwise; "torch" always runs the
PyTorch path; "triton" raises naming the rule that fails: RuntimeError when the environment is
the reason (no triton, the device, the interpreter), ValueError when the input is (a head dim
the kernels are not built for). Nothing falls back silently from an explicit request.
Importing this module does not import triton.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import torch

from lorafast.kernels import interpreting

IMPLS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once, at import (no trace-time cache)


@dataclasses.dataclass(frozen=True)
class KernelRules:
    """What one op's Triton kernels accept beyond availability."""

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    # bf16 operands reach tl.dot: excluded under the interpreter (triton 3.9's bf16 dot is wrong)
    bf16_dot: bool = False
    head_dims: tuple[int, int] | None = None  # inclusive range of the last dim, attention only


RULES = {
    # attention upcasts bf16 tiles to fp32 before tl.dot under the interpreter (kernels/attention.py)
    "attention": KernelRules(head_dims=(16, 128)),
    "linear_cross_entropy": KernelRules(bf16_dot=True),
    "linear_softmax": KernelRules(bf16_dot=True),
    "rerandomize_": KernelRules(),
}


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_blocker(op: str, *tensors: torch.Tensor) -> tuple[type[Exception], str] | None:
    """Why the Triton kernels of ``op`` cannot run on ``tensors``: (exception type, reason), or
    None when they can. ``tensors[0]`` carries the dtype and, for attention, the head dim (its
    last dimension)."""
    rules = RULES[op]
    if not _TRITON_INSTALLED:
        return RuntimeError, "triton is not installed"
    devices = sorted({str(t.device) for t in tensors})
    if interpreting():
        if any(t.device.type != "cpu" for t in tensors):
            return RuntimeError, f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, these are on {devices}"
    elif any(t.device.type != "cuda" for t in tensors):
        return RuntimeError, (f"tensors are on {devices}; Triton needs CUDA tensors, or CPU tensors "
                              "with TRITON_INTERPRET=1 set before triton is imported")
    dtype = tensors[0].dtype
    if dtype not in rules.dtypes:
        return TypeError, f"the kernels take {[str(d) for d in rules.dtypes]}, not {dtype}"
    if rules.bf16_dot and dtype == torch.bfloat16 and interpreting():
        return RuntimeError, ("bf16 cannot run under TRITON_INTERPRET=1 (the interpreter's bf16 tl.dot "
                              "is wrong in triton 3.9); use fp32/fp16 or impl='torch'")
    if rules.head_dims is not None:
        lo, hi = rules.head_dims
        d = tensors[0].shape[-1]
        if not lo <= d <= hi:
            return ValueError, f"head dim D={d} is outside the kernels' {lo} <= D <= {hi}"
    return None


def check_impl(impl: object, op: str) -> str:
    """``impl`` itself, after checking that it is one of :data:`IMPLS` (ValueError otherwise)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    return impl  # type: ignore[return-value]


def select_backend(op: str, impl: str, *tensors: torch.Tensor) -> str:
    """"triton" or "torch" for ``impl`` of ``op`` on ``tensors``.

    Raises ValueError for an unknown ``impl``; with ``impl="triton"`` that cannot run,
    RuntimeError (environment) or ValueError/TypeError (input), naming the rule
    (:func:`triton_blocker`).
    """
    check_impl(impl, op)
    if impl == "torch":
        return "torch"
    blocked = triton_blocker(op, *tensors)
    if blocked is None:
        return "triton"
    if impl == "triton":
        exc, why = blocked
        raise exc(f"{op}: impl='triton' cannot run here: {why}")
    return "torch"

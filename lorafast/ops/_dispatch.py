"""Backend choice shared by every op: ``impl="auto" | "triton" | "torch"``.

"auto" runs Triton on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``, the
interpreter used by the test suite) and the PyTorch path otherwise. An explicitly requested
backend that cannot run raises; nothing falls back silently.
"""
from __future__ import annotations

import importlib.util

import torch

from lorafast.kernels import interpreting

IMPLS = ("auto", "triton", "torch")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once, at import (no trace-time cache)


def triton_installed() -> bool:
    return _TRITON_INSTALLED


interpreter_enabled = interpreting  # True when Triton kernels run in the CPU interpreter


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether Triton kernels can run on these tensors (all CUDA, or the interpreter is on)."""
    if not triton_installed():
        return False
    if interpreter_enabled():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str = "op") -> str:
    """Return "triton" or "torch" for ``impl`` on ``tensors``; raise if the choice cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    ok = triton_can_run(*tensors)
    if impl == "triton" and not ok:
        devices = sorted({str(t.device) for t in tensors})
        why = "triton is not installed" if not triton_installed() else (
            f"tensors are on {devices}; Triton needs CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported")
        raise RuntimeError(f"{op}: impl='triton' cannot run here: {why}")
    return "triton" if ok else "torch"

"""Differentiable fused ops, each with ``impl="auto" | "triton" | "torch"``.

"auto" runs the Triton kernels of :mod:`lorafast.kernels` where :func:`select_backend` allows it
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, and the kernels' dtype and shape
rules) and the PyTorch path otherwise; an explicitly requested backend that cannot run raises.
Importing this package does not import triton.
"""
from lorafast.ops._attention import attention
from lorafast.ops._dispatch import IMPLS, RULES, check_impl, select_backend, triton_blocker
from lorafast.ops._linear_ce import linear_cross_entropy, linear_softmax
from lorafast.ops._rerandomize import rerandomize_

__all__ = ["attention", "linear_cross_entropy", "linear_softmax", "rerandomize_", "IMPLS", "RULES", "check_impl",
           "select_backend", "triton_blocker"]

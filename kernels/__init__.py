"""Triton kernels of lorafast, installed as ``lorafast.kernels``.

Only torch and triton are imported by this package (this file imports neither triton nor any
kernel module). Each public module holds kernels, their launchers and a ``compile_configs()``
that lists the configurations it ships, which the AOT compile gate
(:mod:`lorafast.compile_gate`) finds by walking this package. The autograd wrappers and the
backend choice live in :mod:`lorafast.ops`.
"""
from ._common import TL_DTYPE, KernelConfig, interpreting

__all__ = ["KernelConfig", "TL_DTYPE", "interpreting"]

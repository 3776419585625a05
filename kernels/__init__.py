"""Triton kernels of lorafast, installed as ``lorafast.kernels``.

Only torch and triton are imported here. Each module holds kernels and their launchers; the
autograd wrappers and the backend choice live in :mod:`lorafast.ops`.
"""

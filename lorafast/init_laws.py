"""Init laws of re-randomised tensors: frozen dataclasses, validated at construction.

Every law lowers to one affine map of a base draw, computed in fp32 by both the PyTorch
reference (:mod:`lorafast.philox`) and the Triton kernel::

    value = fp32(fp32(scale * base) + shift)        (two roundings, no fused multiply-add)

with ``base`` a standard normal (``LAW_NORMAL``), a uniform in [0, 1) (``LAW_UNIFORM``), or no draw
at all (``LAW_ZEROS``: value 0). ``shift`` and ``scale`` are rounded to fp32 once, on the host.
The result is then rounded to the tensor's dtype (round to nearest even).

Laws: ``Normal(mean, std)``, ``Uniform(low, high)``, ``KaimingUniform(a, mode, nonlinearity, fan)``
(the bound of ``torch.nn.init.kaiming_uniform_``), ``Zeros()``.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from typing import Union

LAW_ZEROS = 0
LAW_UNIFORM = 1
LAW_NORMAL = 2

_NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                   "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")
_FP32_MAX = 3.4028234663852886e38


def to_fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (as a Python float); raises on overflow."""
    if not math.isfinite(x) or abs(x) > _FP32_MAX:
        raise ValueError(f"{x!r} is not a finite fp32 value")
    return struct.unpack("f", struct.pack("f", x))[0]


def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """Fans as ``torch.nn.init._calculate_fan_in_and_fan_out`` computes them from a full shape."""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a tensor of at least 2 dimensions, got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """``torch.nn.init.calculate_gain`` (restated so that this module needs no torch)."""
    if nonlinearity in _NONLINEARITIES[:8]:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


@dataclasses.dataclass(frozen=True)
class Normal:
    """Normal(mean, std): ``mean + std * z``, z a Box-Muller standard normal (|z| <= 5.77)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        _real("Normal.mean", self.mean)
        if _real("Normal.std", self.std) < 0:
            raise ValueError(f"Normal.std must be >= 0, got {self.std}")

    def lower(self, shape: tuple[int, ...] = ()) -> tuple[int, float, float]:
        """(law code, shift, scale) in fp32 for a tensor of ``shape``."""
        return LAW_NORMAL, to_fp32(self.mean), to_fp32(self.std)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Uniform(low, high): ``low + (high - low) * u``, u in [0, 1) with 24 random bits."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        lo, hi = _real("Uniform.low", self.low), _real("Uniform.high", self.high)
        if lo > hi:
            raise ValueError(f"Uniform needs low <= high, got low={lo}, high={hi}")

    def lower(self, shape: tuple[int, ...] = ()) -> tuple[int, float, float]:
        return LAW_UNIFORM, to_fp32(self.low), to_fp32(float(self.high) - float(self.low))


@dataclasses.dataclass(frozen=True)
class KaimingUniform:
    """Uniform(-bound, bound) with ``bound = gain * sqrt(3 / fan)``, as ``torch.nn.init.kaiming_uniform_``.

    ``fan`` is computed from the FULL tensor shape (``mode`` "fan_in" = shape[1] * receptive field,
    "fan_out" = shape[0] * receptive field) unless given explicitly — give it for a shard, whose
    local shape is not the shape of the tensor it belongs to.
    """

    a: float = math.sqrt(5)
    mode: str = "fan_in"
    nonlinearity: str = "leaky_relu"
    fan: int | None = None

    def __post_init__(self):
        _real("KaimingUniform.a", self.a)
        if self.mode not in ("fan_in", "fan_out"):
            raise ValueError(f"KaimingUniform.mode must be 'fan_in' or 'fan_out', got {self.mode!r}")
        calculate_gain(self.nonlinearity, self.a)
        if self.fan is not None and (isinstance(self.fan, bool) or not isinstance(self.fan, int) or self.fan <= 0):
            raise ValueError(f"KaimingUniform.fan must be a positive int or None, got {self.fan!r}")

    def bound(self, shape: tuple[int, ...] = ()) -> float:
        if self.fan is not None:
            fan = self.fan
        else:
            fan_in, fan_out = fan_in_and_fan_out(tuple(shape))
            fan = fan_in if self.mode == "fan_in" else fan_out
        if fan == 0:
            raise ValueError(f"KaimingUniform: zero fan for shape {tuple(shape)}")
        std = calculate_gain(self.nonlinearity, self.a) / math.sqrt(fan)   # torch's exact formula
        return math.sqrt(3.0) * std

    def lower(self, shape: tuple[int, ...] = ()) -> tuple[int, float, float]:
        b = self.bound(shape)
        return LAW_UNIFORM, to_fp32(-b), to_fp32(2.0 * b)


@dataclasses.dataclass(frozen=True)
class Zeros:
    """All zeros (no random draw)."""

    def lower(self, shape: tuple[int, ...] = ()) -> tuple[int, float, float]:
        return LAW_ZEROS, 0.0, 0.0


LAWS = (Normal, Uniform, KaimingUniform, Zeros)
InitLaw = Union[LAWS]  # the annotation of "one of LAWS"
LAW_NAMES = {"normal": Normal, "uniform": Uniform, "kaiming_uniform": KaimingUniform, "zeros": Zeros}  # in config files

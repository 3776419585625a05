"""Range checks shared by every public entry point (ops, models, ``TrainConfig``, the CLI), so that
a seed, step, id or offset outside what the code can represent raises a ``ValueError`` naming
the range instead of wrapping silently onto other values."""
from __future__ import annotations

SEED_RANGE = (0, 1 << 64)   # Philox keys and torch.Generator seeds are 64-bit words
STEP_RANGE = (0, 1 << 63)   # training steps and draw indices live in int64 buffers


def _bound(x: int) -> str:
    """2^k for powers of two above 2^16 (readable ranges in messages), else the number."""
    return f"2^{x.bit_length() - 1}" if x > 1 << 16 and x & (x - 1) == 0 else str(x)


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """``value`` if it is an int (not a bool) in ``[lo, hi)``; else TypeError (not an int) or
    ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value < hi:
        raise ValueError(f"{name} = {value} is out of range [{lo}, {_bound(hi)})")
    return value

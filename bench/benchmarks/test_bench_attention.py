"""pytest-benchmark: fused causal attention against every SDPA backend and the reference math,
per mode.
Cases and setup factory: :mod:`lorafast.bench.attention` (see conftest.py)."""
from lorafast.bench import attention

SUITE = attention


def test_attention(case, measure):
    measure(SUITE, case)

"""pytest-benchmark: one-launch Philox re-randomisation against the per-tensor torch.nn.init
loop and a copy.
Cases and setup factory: :mod:`lorafast.bench.rerandomize` (see conftest.py)."""
from lorafast.bench import rerandomize

SUITE = rerandomize


def test_rerandomize(case, measure):
    measure(SUITE, case)

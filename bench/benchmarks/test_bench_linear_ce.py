"""pytest-benchmark: fused output projection + cross-entropy / softmax against materialised logits
(and torch.compile, Liger where the suite runs them).
Cases and setup factory: :mod:`lorafast.bench.linear_ce` (see conftest.py)."""
from lorafast.bench import linear_ce

SUITE = linear_ce


def test_linear_ce(case, measure):
    measure(SUITE, case)

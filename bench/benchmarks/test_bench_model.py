"""pytest-benchmark: one training step (lorafast.train.train_step) per provider: the reference
eager, with SDPA, under torch.compile, a transformers GPT-2 of the same size, and lorafast.
Cases and setup factory: :mod:`lorafast.bench.model` (see conftest.py)."""
from lorafast.bench import model

SUITE = model


def test_model(case, measure):
    measure(SUITE, case)

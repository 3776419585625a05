"""pytest-benchmark: every case of every suite of ``lorafast bench`` (``lorafast.bench.cli.SUITES``:
attention, linear cross-entropy, re-randomisation, the training step), one benchmark per suite,
provider and case, named ``test_bench[<suite>-<provider>-<key>=<value>-...]``. Cases and setup
factories are the suites' own (see conftest.py); select with ``-k``, e.g. ``-k model`` or
``-k "attention and fwd_bwd"``."""


def test_bench(suite, case, measure):
    measure(suite, case)

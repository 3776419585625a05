"""Test setup: Triton kernels run in the CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before triton is imported anywhere, so it is set here, at the
top of the first module pytest loads. On a machine with CUDA, set ``LORAFAST_TEST_CUDA=1`` to
leave the interpreter off and run the ``cuda``-marked tests on the GPU.
"""
import os

if os.environ.get("LORAFAST_TEST_CUDA", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (-n N) each worker is one process: one intra-op thread each, so that N
# workers do not oversubscribe the cores (PyTorch's thread pool stalls when its threads are
# descheduled, which made single tests 5x slower on a busy 2-core machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with the interpreter off (LORAFAST_TEST_CUDA=1)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

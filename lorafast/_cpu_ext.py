"""The C++ CPU redraw (``lorafast/csrc/philox_cpu.cpp``): built on first use, called via ctypes.

The source is compiled by ``torch.utils.cpp_extension.load`` (ninja) with ``is_python_module=False``
into a plain shared library with a C ABI; it includes no torch header, so the first build takes
2-5 s (-O3, three x86-64 variants) where a ``TORCH_LIBRARY`` op with ``<torch/library.h>`` took
8 s and a pybind11 module with ``<torch/extension.h>`` 44 s to build (trivial bodies, -O2, on the
shared 2-core development machine). One call fills the whole tensor list with up to
``torch.get_num_threads()`` threads, one per ``GRAIN`` elements (the caller and helper threads,
dynamic schedule over blocks of ``BLOCK_G`` groups; see ``Pool`` in the source for why not OpenMP).

Where: ``<root>/lorafast_philox_cpu_<hash>/``, root = ``$LORAFAST_EXT_DIR``, else
``$TORCH_EXTENSIONS_DIR``, else torch's default (``~/.cache/torch_extensions``); the hash covers
the source, the flags, the compiler name and the torch version, so a change rebuilds into a new
directory. A finished build leaves a marker file; later processes load the library directly
(milliseconds, read-only directories fine). Concurrent first builds: an ``fcntl`` lock on the
directory lets one process build while the others wait, and a stale ``lock`` file of torch's
``FileBaton`` (left by a build that was killed, which would make torch wait forever) is removed
under it.

``LORAFAST_CPU_EXT`` (read at every call): ``0`` = the numpy path, no build; ``1`` = the extension
or a ``RuntimeError``; unset or ``auto`` = the extension if it builds, else the numpy path with one
``RuntimeWarning`` per process (no compiler, no ninja, an unwritable build directory...).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ENV = "LORAFAST_CPU_EXT"
ABI = 1
SOURCE = Path(__file__).resolve().parent / "csrc" / "philox_cpu.cpp"
# -ffp-contract=off: no fused multiply-add (bit-exactness); -fno-math-errno/-fno-trapping-math only
# drop errno and FP-exception bookkeeping so that sqrt and selects vectorise (values unchanged);
# never -ffast-math. -std=c++17 (after torch's -std=c++20): smaller standard headers, faster build.
CFLAGS = ["-O3", "-std=c++17", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
LDFLAGS = ["-pthread"] + (["-Wl,--as-needed"] if sys.platform.startswith("linux") else [])  # no libtorch deps
BLOCK_G = 256              # groups of 4 elements per block, the unit of work of a thread (1..1024)
# Elements per thread below which no helper is woken (as ATen's GRAIN_SIZE): about 50-100 us of
# work, more than a helper's wake-up costs on an idle machine.
GRAIN = 1 << 16
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "error": None, "warned": False, "build_s": None}
_local = threading.local()          # .off: depth of disabled() blocks in this thread


def mode() -> str:
    """"0", "1" or "auto": "0" inside :func:`disabled` (this thread), else ``$LORAFAST_CPU_EXT``."""
    m = "0" if getattr(_local, "off", 0) else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in ("0", "1", "auto"):
        raise ValueError(f"{ENV} must be 0, 1 or auto, got {m!r}")
    return m


@contextlib.contextmanager
def disabled():
    """Within the block, this thread's CPU redraws take the numpy path (as ``LORAFAST_CPU_EXT=0``)."""
    _local.off = getattr(_local, "off", 0) + 1
    try:
        yield
    finally:
        _local.off -= 1


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def build_name() -> str:
    """``lorafast_philox_cpu_<hash>``: the library's name and build directory."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr((CFLAGS, LDFLAGS, ABI, _compiler(), torch.__version__,
                                            platform.machine(), platform.system())).encode()):
        h.update(part)
    return f"lorafast_philox_cpu_{h.hexdigest()[:12]}"


def build_dir() -> Path:
    root = os.environ.get("LORAFAST_EXT_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root
        root = get_default_build_root()
    return Path(root) / build_name()


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lorafast_philox_abi.restype = ctypes.c_int64
    if lib.lorafast_philox_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.lorafast_philox_abi()}, expected {ABI}")
    lib.lorafast_philox_fill.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.lorafast_philox_fill.restype = ctypes.c_int
    for fn in (lib.lorafast_round_f16, lib.lorafast_round_bf16):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return lib


def _build() -> ctypes.CDLL:
    """Load the built library, building it first if needed (under the directory's lock)."""
    name, d = build_name(), build_dir()
    so, done = d / f"{name}.so", d / f"{name}.done"
    if done.exists() and so.exists():
        return _open(so)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lorafast.lock", "a") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes or the process dies
        except ImportError:                          # no fcntl (Windows): torch's FileBaton only
            pass
        if done.exists() and so.exists():           # another process built it while we waited
            return _open(so)
        baton = d / "lock"
        if baton.exists():                          # torch's FileBaton of a killed build: stale
            baton.unlink()
        from torch.utils.cpp_extension import load
        t0 = time.perf_counter()
        load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(d),
             is_python_module=False, verbose=False)
        _state["build_s"] = time.perf_counter() - t0
        tmp = d / f"{name}.done.{os.getpid()}"
        tmp.write_text(f"{_state['build_s']:.2f} s\n")
        os.replace(tmp, done)
    return _open(so)


def library(required: bool = False) -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None if it cannot be built (warns once per
    process; with ``required=True`` raises ``RuntimeError`` instead)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _build()
                except Exception as exc:  # noqa: BLE001 - any build failure means: numpy path
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    _state["error"] = f"{type(exc).__name__}: {first}"
                _state["tried"] = True
    if _state["lib"] is None:
        if required:
            raise RuntimeError(f"lorafast: the C++ CPU Philox extension is unavailable ({_state['error']}); "
                               f"unset {ENV} or set it to 0 for the numpy path")
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"lorafast: C++ CPU Philox extension unavailable ({_state['error']}); using the "
                          f"numpy path, 5-20x slower (set {ENV}=0 to choose it without this warning)",
                          RuntimeWarning, stacklevel=3)
    return _state["lib"]


def active() -> ctypes.CDLL | None:
    """The library if CPU redraws should use it now (per :func:`mode`), else None."""
    m = mode()
    if m == "0":
        return None
    return library(required=m == "1")


def _f32_bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32).view(np.uint32).astype(np.int64)


def fill_(tensors, key, rounds, codes, shifts, scales, ids, offsets, *, num_threads: int | None = None,
          block_g: int = BLOCK_G) -> bool:
    """Refill CPU ``tensors`` in place with the C++ extension; False (nothing done) if it is not active.

    Arguments as validated and lowered by ``lorafast.ops._rerandomize._validate``: contiguous
    fp32/fp16/bf16 CPU tensors that do not overlap, key words (k0, k1) in [0, 2^32), law codes,
    fp32 shifts and scales, stream ids in [0, 2^32), offsets with offset + numel <= 2^62.
    ``num_threads``: threads including the caller (default: ``torch.get_num_threads()``, but at
    most one per ``GRAIN`` elements); ``block_g``: groups per block (1..1024). Neither changes the
    values. Bumps each tensor's autograd version.
    """
    lib = active()
    if lib is None:
        return False
    if not torch.is_inference_mode_enabled():       # as an ATen in-place op would refuse
        for i, t in enumerate(tensors):
            if t.is_inference():
                raise RuntimeError(f"rerandomize_: tensors[{i}] is an inference tensor; an in-place update "
                                   "outside InferenceMode is not allowed")
    n = len(tensors)
    meta = np.empty((n, 8), dtype=np.int64)
    meta[:, 0] = [t.data_ptr() for t in tensors]
    meta[:, 1] = [t.numel() for t in tensors]
    meta[:, 2] = offsets
    meta[:, 3] = ids
    meta[:, 4] = codes
    meta[:, 5] = [DTYPE_CODE[t.dtype] for t in tensors]
    meta[:, 6] = _f32_bits(shifts)
    meta[:, 7] = _f32_bits(scales)
    if num_threads is None:
        threads = max(1, min(torch.get_num_threads(), int(meta[:, 1].sum()) // GRAIN))
    else:
        threads = num_threads
    rc = lib.lorafast_philox_fill(meta.ctypes.data, n, key[0], key[1], rounds, threads, block_g)
    if rc == -2:
        raise MemoryError("lorafast_philox_fill: out of memory for the block table")
    if rc != 0:
        raise ValueError(f"lorafast_philox_fill: bad arguments (rounds={rounds}, block_g={block_g}, "
                         f"num_threads={threads})")
    torch.autograd.graph.increment_version(list(tensors))
    return True


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to fp16/bf16 by the extension's conversion (for the tests)."""
    lib = library(required=True)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    fn = lib.lorafast_round_f16 if dtype == torch.float16 else lib.lorafast_round_bf16
    fn(x.data_ptr(), out.data_ptr(), x.numel())
    return out

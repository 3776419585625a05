"""Shared measuring tools of the benchmark suite: timing, peak memory, records, tables.

Every op's benchmark module exposes ``setup(**kwargs) -> fn`` (one factory shared by the speed
and the memory run; ``kwargs`` are JSON-serialisable so that the memory run can rebuild the case
in a fresh process) and ``run(device="cpu", quick=True) -> list[dict]``.

Timing: ``triton.testing.do_bench`` quantiles (20/50/80 %) on CUDA; a ``perf_counter`` loop on
CPU. Every timed case reports its spread ``p80/p20`` and is flagged ``noisy`` when that exceeds
:data:`NOISY_SPREAD` (1.5): on a machine shared with other work, PyTorch's intra-op threads stall
when one of them is descheduled (``--threads 1`` avoids the barrier). Peak memory: on CUDA
``max_memory_allocated`` above what the case holds after setup; on CPU
the growth of the peak resident set (``VmHWM``, reset after setup) of a fresh subprocess
while the case runs.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

from lorafast.provenance import git_commit, loadavg, status_kb


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def env_record(device: str = "cpu") -> dict[str, Any]:
    """Where and when a measurement was made: device, versions, git commit, UTC time, the
    intra-op thread count (``torch.get_num_threads()``) and the 1-minute load average (how
    busy the machine was: above the core count, timings are not to be trusted)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load_1m": None if (load := loadavg()) is None else round(load, 2),
    }


def busy_note(env: dict[str, Any]) -> str:
    """One line when the 1-minute load average exceeds the core count, or "". The spread flag
    misses a machine so busy that nearly every call stalls (a uniformly slow case has a small
    p80/p20); the load catches it."""
    load, cores = env.get("load_1m"), os.cpu_count() or 1
    if load is None or load <= cores:
        return ""
    return (f"BUSY: load average {load} on {cores} cores: other work competes for the CPU, so every "
            f"timing here may be several times too slow; compare figures only from an idle machine")


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` (n >= 1); returns n. Raises ValueError for n < 1."""
    import torch

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    torch.set_num_threads(n)
    return n


class Unavailable(RuntimeError):
    """A provider that cannot run here (a missing package, compiler or device); the message is the
    one-line reason the suite prints in place of its figures."""


def _cxx_found() -> bool:
    """Whether Inductor finds its C++ compiler (``torch._inductor.cpp_builder.get_cpp_compiler``;
    where that private helper is gone, whether ``$CXX`` or ``g++`` is on the PATH)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        import shutil

        return shutil.which(os.environ.get("CXX", "g++")) is not None
    try:
        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 - torch._inductor.exc.InvalidCxxCompiler
        return False


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can.

    On CPU, Inductor compiles C++ with ``$CXX``, else ``g++``: without a C++ compiler every
    compiled function fails at its first call."""
    if device.startswith("cuda") or _cxx_found():
        return None
    cxx = os.environ.get("CXX", "g++")
    return f"torch.compile on CPU needs a C++ compiler: {cxx!r} not found (install g++ or set CXX)"


def timed_cases(module: Any, device: str = "cpu", quick: bool = True) -> list[dict[str, Any]]:
    """The ``setup`` keyword arguments of every case that ``module.run(device, quick)`` times, in
    its order: ``module.cases(device, quick)`` where the suite defines it, else a dry run of
    ``module.run`` in which ``setup`` only records its arguments and ``time_fn`` /
    ``peak_memory`` return placeholders. Either way the case list is the suite's own, the one
    ``lorafast bench`` runs (the pytest-benchmark suite keeps no second copy)."""
    if hasattr(module, "cases"):
        return [dict(c) for c in module.cases(device, quick)]
    from unittest import mock

    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> Callable[[], None]:
        seen.append(kwargs)
        return lambda: None

    placeholder = {"ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, **spread(1.0, 1.0)}
    fakes = {"time_fn": lambda *a, **k: dict(placeholder), "peak_memory": lambda *a, **k: 1 << 20}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(module, "setup", record))
        # this module's functions, and the suite's own names for them if it imported them by name
        for owner in (sys.modules[__name__], module):
            for name, fake in fakes.items():
                if hasattr(owner, name):
                    stack.enter_context(mock.patch.object(owner, name, fake))
        module.run(device=device, quick=quick)
    return seen


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# A case whose 80th-percentile time exceeds its 20th by more than this factor is flagged noisy.
NOISY_SPREAD = 1.5


def spread(ms_p20: float, ms_p80: float) -> dict[str, Any]:
    """``{"p80/p20": ratio, "noisy": ratio > NOISY_SPREAD}`` of one timed case."""
    ratio = ms_p80 / ms_p20 if ms_p20 > 0 else float("inf")
    return {"p80/p20": ratio, "noisy": bool(ratio > NOISY_SPREAD)}


def quantile(sorted_values: list[float], p: float) -> float:
    """The ``p`` quantile (0..1) of an ascending list: the nearest rank, no interpolation."""
    return sorted_values[min(len(sorted_values) - 1, int(p * (len(sorted_values) - 1) + 0.5))]


def time_fn(fn: Callable[[], Any], device: str = "cpu", *, grad_to_none: Iterable | None = None,
            warmup: int = 1, rep: int | None = None, min_time_s: float = 0.5) -> dict[str, Any]:
    """Median and 20/80 % quantiles of the run time of ``fn`` in milliseconds (``ms``,
    ``ms_p20``, ``ms_p80``), the spread ``p80/p20`` and the ``noisy`` flag (:func:`spread`).

    CUDA: ``triton.testing.do_bench`` (``rep``: milliseconds of repetitions, default 100, at
    least one call; CUDA events around each call, the L2 cache cleared before each, one
    synchronize at the end). CPU: at least ``rep`` (default 3) calls, and more until
    ``min_time_s`` has passed (at most 50)."""
    if device.startswith("cuda"):
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=rep or 100, grad_to_none=list(grad_to_none or []),
                                    quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], **spread(q[1], q[2])}
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < (rep or 3) or (rep is None and time.perf_counter() - start < min_time_s and len(times) < 50):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    p20, p80 = quantile(times, 0.2), quantile(times, 0.8)
    return {"ms": quantile(times, 0.5), "ms_p20": p20, "ms_p80": p80, **spread(p20, p80)}


# Roofline peaks of the H200 SXM (the GPU this project is tuned for): dense bf16/fp16 tensor-core
# throughput as measured on this project's H200 (about 790 TFLOP/s; the datasheet says 989), and
# HBM3e bandwidth from the datasheet (4.8 TB/s).
PEAK_TFLOPS = 790.0
PEAK_GBPS = 4800.0


def roofline(flops: float, bytes_moved: float, ms: float | None, device: str = "cpu") -> dict[str, Any]:
    """Roofline fields of one timed call: its FLOPs and bytes moved, the achieved TFLOP/s and
    GB/s, and on CUDA the fractions of the H200's peaks (``PEAK_TFLOPS``, ``PEAK_GBPS``).

    ``flops``: floating-point operations per call (a multiply-add counts 2); ``bytes_moved``:
    bytes read plus written in device memory per call, at least once each; ``ms``: median time.
    """
    rec: dict[str, Any] = {"flops": float(flops), "bytes": float(bytes_moved)}
    if ms:
        rec["TFLOP/s"] = flops / ms / 1e9
        rec["GB/s"] = bytes_moved / ms / 1e6
        if device.startswith("cuda"):
            rec["frac_peak_flops"] = rec["TFLOP/s"] / PEAK_TFLOPS
            rec["frac_peak_bw"] = rec["GB/s"] / PEAK_GBPS
    return rec


def _resolve(factory: str) -> Callable[..., Callable[[], Any]]:
    mod, _, name = factory.partition(":")
    return getattr(importlib.import_module(mod), name or "setup")


def _cpu_peak_in_this_process(factory: str, kwargs: dict[str, Any]) -> int:
    fn = _resolve(factory)(**kwargs)
    # Reset the high-water mark to the current RSS (Linux: "5" > clear_refs), so that neither
    # setup's transients nor the parent's peak (inherited by ru_maxrss across fork) count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    fn()
    return max(0, status_kb("VmHWM") - base) * 1024


def peak_memory(factory: str, kwargs: dict[str, Any], device: str = "cpu") -> int:
    """Peak extra memory (bytes) of one run of the case built by ``factory(**kwargs)``.

    The case's own inputs (what setup allocates) are not counted; everything the run allocates
    on top of them, outputs and temporaries, is. On CPU the run happens in a fresh subprocess so
    that earlier cases do not raise the high-water mark.
    """
    if device.startswith("cuda"):
        import torch

        fn = _resolve(factory)(**kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, "-m", "lorafast.bench.common", "--peak-rss", factory, json.dumps(kwargs)],
                         capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {factory}({kwargs}) failed:\n{out.stderr[-4000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def report(records: list[dict[str, Any]], title: str = "") -> str:
    """Format records as a table (columns: union of keys, in first-seen order) and print it."""
    if not records:
        return ""
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]

    def fmt(c: str, v: Any) -> str:
        if c == "noisy":  # mark the noisy cases only
            return "NOISY" if v else ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    try:
        from tabulate import tabulate

        text = tabulate([[fmt(c, r.get(c)) for c in cols] for r in records], headers=cols, tablefmt="github")
    except ImportError:
        rows = [cols] + [[fmt(c, r.get(c)) for c in cols] for r in records]
        w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        text = "\n".join("  ".join(c.ljust(x) for c, x in zip(row, w)) for row in rows)
    if title:
        text = f"## {title}\n{text}"
    note = noisy_note(records)
    if note:
        text += "\n" + note
    print(text, flush=True)
    return text


def noisy_note(records: list[dict[str, Any]]) -> str:
    """One line naming how many timed cases are noisy (p80/p20 > NOISY_SPREAD), or ""."""
    timed = [r for r in records if "p80/p20" in r]
    noisy = [r for r in timed if r.get("noisy")]
    if not noisy:
        return ""
    import torch

    hint = "rerun with --threads 1 or on an idle machine" if torch.get_num_threads() > 1 else "rerun on an idle machine"
    return (f"NOISY: {len(noisy)} of {len(timed)} timed cases have p80/p20 > {NOISY_SPREAD} (worst "
            f"{max(r['p80/p20'] for r in noisy):.2f}); the machine is busy or its threads are descheduled: "
            f"{hint} before trusting them")


def save(records: list[dict[str, Any]], path: str, env: dict[str, Any] | None = None) -> None:
    """Append records to a jsonl file, each carrying the environment record."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    env = env or {}
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({**env, **r}) + "\n")


THREADS_HELP = ("intra-op threads: torch.set_num_threads(N), applied as soon as the flag is parsed "
                "(default: PyTorch's, one per core). On a machine shared with other work, 1 avoids "
                "stalls of the thread pool when one of its threads is descheduled")


def threads_action():
    """An argparse action for ``--threads N`` that applies it at once (:func:`set_threads`), so
    that every suite's own ``main`` runs with it without further code."""
    import argparse

    class _Threads(argparse.Action):
        def __call__(self, parser, namespace, value, option_string=None):
            try:
                set_threads(value)
            except ValueError as e:
                parser.error(str(e))
            setattr(namespace, self.dest, value)

    return _Threads


def suite_parser(module: str, doc: str, full_help: str):
    """The command-line parser every suite shares: --device, --full, --save, --threads.

    A suite may re-declare one of these flags (``conflict_handler="resolve"``: its own wins)."""
    import argparse

    import torch

    p = argparse.ArgumentParser(prog=f"python -m lorafast.bench.{module}", description=doc.split("\n")[0],
                                conflict_handler="resolve")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help=full_help)
    p.add_argument("--save", default="", help="append the records to this jsonl file")
    p.add_argument("--threads", type=int, default=None, action=threads_action(), metavar="N", help=THREADS_HELP)
    return p


def env_line(env: dict[str, Any]) -> str:
    """The environment record on one line, as ``lorafast bench`` prints it first."""
    return "  ".join(f"{k}={v}" for k, v in env.items())


def finish(records: list[dict[str, Any]], device: str, title: str, save_to: str = "") -> None:
    """Print the records under a title naming device, commit and thread count; append them to
    ``save_to``."""
    env = env_record(device)
    report(records, f"{title} on {env['device']} (commit {env['commit']}, threads={env['threads']}, "
                    f"load {env['load_1m']})")
    if busy_note(env):
        print(busy_note(env), flush=True)
    if save_to:
        save(records, save_to, env)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
        print(_cpu_peak_in_this_process(sys.argv[2], json.loads(sys.argv[3])))
    else:
        print(json.dumps(env_record(), indent=2))

"""Shared measuring tools of the benchmark suite: timing, peak memory, records, tables.

Every op's benchmark module exposes ``setup(**kwargs) -> fn`` (one factory shared by the speed
and the memory run; ``kwargs`` are JSON-serialisable so that the memory run can rebuild the case
in a fresh process) and ``run(device="cpu", quick=True) -> list[dict]``.

Timing: ``triton.testing.do_bench`` quantiles (20/50/80 %) on CUDA; a ``perf_counter`` loop on
CPU. Peak memory: on CUDA ``max_memory_allocated`` above what the case holds after setup; on CPU
the growth of the peak resident set (``VmHWM``, reset after setup) of a fresh subprocess
while the case runs.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterable


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def env_record(device: str = "cpu") -> dict[str, Any]:
    """Where and when a measurement was made: device, versions, git commit, UTC time."""
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
        "commit": _git_commit(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str = "cpu", *, grad_to_none: Iterable | None = None,
            warmup: int = 1, rep: int | None = None, min_time_s: float = 0.5) -> dict[str, float]:
    """Median and 20/80 % quantiles of the run time of ``fn`` in milliseconds."""
    if device.startswith("cuda"):
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=rep or 100, grad_to_none=list(grad_to_none or []),
                                    quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
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

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]

    return {"ms": q(0.5), "ms_p20": q(0.2), "ms_p80": q(0.8)}


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


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_in_this_process(factory: str, kwargs: dict[str, Any]) -> int:
    fn = _resolve(factory)(**kwargs)
    # Reset the high-water mark to the current RSS (Linux: "5" > clear_refs), so that neither
    # setup's transients nor the parent's peak (inherited by ru_maxrss across fork) count.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


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

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    try:
        from tabulate import tabulate

        text = tabulate([[fmt(r.get(c)) for c in cols] for r in records], headers=cols, tablefmt="github")
    except ImportError:
        rows = [cols] + [[fmt(r.get(c)) for c in cols] for r in records]
        w = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        text = "\n".join("  ".join(c.ljust(x) for c, x in zip(row, w)) for row in rows)
    if title:
        text = f"## {title}\n{text}"
    print(text, flush=True)
    return text


def save(records: list[dict[str, Any]], path: str, env: dict[str, Any] | None = None) -> None:
    """Append records to a jsonl file, each carrying the environment record."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    env = env or {}
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps({**env, **r}) + "\n")


def suite_parser(module: str, doc: str, full_help: str):
    """The command-line parser every suite shares: --device, --full, --save."""
    import argparse

    import torch

    p = argparse.ArgumentParser(prog=f"python -m lorafast.bench.{module}", description=doc.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help=full_help)
    p.add_argument("--save", default="", help="append the records to this jsonl file")
    return p


def finish(records: list[dict[str, Any]], device: str, title: str, save_to: str = "") -> None:
    """Print the records under a title naming device and commit; append them to ``save_to``."""
    env = env_record(device)
    report(records, f"{title} on {env['device']} (commit {env['commit']})")
    if save_to:
        save(records, save_to, env)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
        print(_cpu_peak_in_this_process(sys.argv[2], json.loads(sys.argv[3])))
    else:
        print(json.dumps(env_record(), indent=2))

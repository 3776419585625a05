"""Where and under what load a measurement was made: the git commit of this checkout, the load
average, and the process's memory figures from ``/proc/self/status``. Shared by the benchmarks
(:mod:`lorafast.bench.common`) and the preset study (:mod:`lorafast.study`); standard library
only."""
from __future__ import annotations

import os
import subprocess

__all__ = ["git_commit", "loadavg", "status_kb"]


def git_commit() -> str:
    """Short hash of the checkout this package runs from, with ``+dirty`` when tracked files
    differ from it; ``"unknown"`` outside a git checkout or without git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "") if rev.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> float | None:
    """The 1-minute load average (runnable processes; above the core count, timings stall), or
    None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def status_kb(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (Linux), e.g. ``VmRSS``, ``VmHWM``. Raises
    OSError where the file or the field is missing."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")

"""Ahead-of-time compile gate: build every shipped kernel configuration for real GPUs, on CPU.

The Triton interpreter accepts code that the GPU compiler rejects (mixed-dtype ``tl.dot``,
blocks under 16) and says nothing about registers or shared memory. This module compiles each
configuration with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` — no GPU
needed — and reads the cubin with the ``cuobjdump`` bundled in triton's NVIDIA backend:

* registers per thread, STACK and LOCAL bytes (register spills),
* shared memory: dynamic (from the compile metadata) plus static, against the target's limit,
* tensor-core instructions in the SASS: HGMMA (Hopper wgmma) and HMMA (Ampere mma.sync).

Every public module of :mod:`lorafast.kernels` (found by walking the package, so a new module
cannot be missed) declares what it ships with ``compile_configs() -> list[KernelConfig]``
(:class:`lorafast.kernels.KernelConfig`); a module that declares none fails the gate. ``python -m lorafast.compile_gate`` (and the
static part of ``lorafast bench``) prints the report as a table; ``tests/test_compile_gate.py``
asserts on it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile

from lorafast.kernels import KernelConfig, interpreting

# Largest opt-in dynamic shared memory per block, in bytes (CUDA programming guide, table of
# compute capabilities): 227 KB on sm_90, 163 KB on sm_80.
MAX_SHARED = {90: 232448, 80: 166912}


@dataclasses.dataclass(frozen=True)
class CompileReport:
    name: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    shared: int
    max_shared: int
    hgmma: int
    hmma: int
    needs_mma: bool
    allow_spills: bool

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def problems(self) -> list[str]:
        out = []
        if self.shared > self.max_shared:
            out.append(f"shared memory {self.shared} B > limit {self.max_shared} B")
        if self.spills and not self.allow_spills:
            out.append(f"register spills (STACK {self.stack}, LOCAL {self.local})")
        if self.registers > 255:
            out.append(f"{self.registers} registers > 255")
        if self.needs_mma:
            if self.arch >= 90 and self.hgmma == 0:
                out.append("no HGMMA (wgmma) instruction on sm_90")
            if self.arch < 90 and self.hmma == 0:
                out.append("no HMMA instruction")
        return out


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in triton's bundled NVIDIA tools ({path})")
    return path


def _run(tool: str, *args: str) -> str:
    res = subprocess.run([_tool(tool), *args], capture_output=True, text=True, check=True)
    return res.stdout


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_config(cfg: KernelConfig, arch: int) -> CompileReport:
    """Compile ``cfg`` for ``sm_<arch>`` and read its resource usage and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(cfg.fn.arg_names)
    missing = set(names) - set(cfg.signature)
    if missing:
        raise ValueError(f"{cfg.name}: signature lacks {sorted(missing)}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned}
    src = ASTSource(cfg.fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs), attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **cfg.options})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _run("cuobjdump", "-res-usage", cubin)
        sass = _run("cuobjdump", "-sass", cubin)
    m = _RES.search(usage)
    if m is None:
        raise RuntimeError(f"{cfg.name}: cannot parse cuobjdump -res-usage output:\n{usage}")
    reg, stack, static_shared, local = (int(g) for g in m.groups())
    return CompileReport(
        name=cfg.name, kernel=cfg.fn.__name__, arch=arch, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, registers=reg, stack=stack, local=local,
        shared=int(kernel.metadata.shared) + static_shared, max_shared=MAX_SHARED[arch],
        hgmma=len(re.findall(r"\bHGMMA\b", sass)), hmma=len(re.findall(r"\bHMMA\b", sass)),
        needs_mma=cfg.needs_mma, allow_spills=cfg.allow_spills)


def kernel_modules() -> list[str]:
    """Names of the public modules of :mod:`lorafast.kernels`, found by walking the package."""
    import lorafast.kernels as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def shipped_configs(modules: list[str] | None = None) -> list[KernelConfig]:
    """Every configuration that the kernel modules declare through ``compile_configs()``.

    Raises RuntimeError for a kernel module that declares no configuration (no
    ``compile_configs`` or an empty list): such a module would never be gated.
    """
    out: list[KernelConfig] = []
    for mod in kernel_modules() if modules is None else modules:
        m = importlib.import_module(f"lorafast.kernels.{mod}")
        fn = getattr(m, "compile_configs", None)
        configs = list(fn()) if fn is not None else []
        if not configs:
            raise RuntimeError(f"lorafast.kernels.{mod} declares no compile configuration: give it a "
                               "compile_configs() that lists every configuration its launchers use")
        out.extend(configs)
    return out


_POOL_CONFIGS: list[KernelConfig] = []


def _compile_task(task: tuple[int, int]) -> CompileReport:
    i, arch = task
    return compile_config(_POOL_CONFIGS[i], arch)


def run_gate(configs: list[KernelConfig] | None = None, jobs: int = 1) -> list[CompileReport]:
    """Compile every (configuration, arch); ``jobs > 1`` compiles in that many forked processes."""
    global _POOL_CONFIGS
    configs = shipped_configs() if configs is None else configs
    tasks = [(i, a) for i, c in enumerate(configs) for a in c.archs]
    if jobs <= 1 or len(tasks) <= 1:
        return [compile_config(configs[i], a) for i, a in tasks]
    import multiprocessing

    _POOL_CONFIGS = configs
    with multiprocessing.get_context("fork").Pool(min(jobs, len(tasks))) as pool:
        return pool.map(_compile_task, tasks, chunksize=1)


def format_reports(reports: list[CompileReport]) -> str:
    """A fixed-width table of the reports, one row per (configuration, arch)."""
    header = ("config", "sm", "warps", "stages", "regs", "spill B", "smem KB", "HGMMA", "HMMA", "status")
    rows = [header]
    for r in reports:
        probs = r.problems()
        rows.append((r.name, str(r.arch), str(r.num_warps), str(r.num_stages), str(r.registers),
                     str(r.stack + r.local), f"{r.shared / 1024:.1f}", str(r.hgmma), str(r.hmma),
                     "ok" if not probs else "; ".join(probs)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lorafast.compile_gate", description=__doc__.split("\n")[0])
    p.add_argument("--filter", default="", help="only configurations whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", action="store_true", help="print the reports as a JSON list")
    args = p.parse_args(argv)
    if interpreting():
        p.error("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    configs = [c for c in shipped_configs() if args.filter in c.name]
    reports = run_gate(configs, jobs=args.jobs)
    if args.json:
        import json

        print(json.dumps([dataclasses.asdict(r) for r in reports]))
    else:
        print(format_reports(reports))
    return 1 if any(r.problems() for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())

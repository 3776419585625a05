"""Ahead-of-time compile gate: build every shipped kernel configuration for real GPUs, on CPU.

The Triton interpreter accepts code that the GPU compiler rejects (mixed-dtype ``tl.dot``,
blocks under 16) and says nothing about registers or shared memory. This module compiles each
configuration with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` — no GPU
needed — and reads the cubin with the ``cuobjdump`` bundled in triton's NVIDIA backend:

* registers per thread, STACK and LOCAL bytes (register spills),
* shared memory: dynamic (from the compile metadata) plus static, against the target's limit,
* tensor-core instructions in the SASS: HGMMA (Hopper wgmma) and HMMA (Ampere mma.sync),
* the static performance report: SASS counts of HGMMA, HMMA, ``MUFU.EX2``, ``MEMBAR``, atomics,
  ``BAR.SYNC``, cp.async (``LDGSTS``) and TMA loads (``UTMALDG``, ``UBLKCP``), in the whole
  kernel and per loop iteration (see :func:`find_loops`), against the exp2 that the tile needs
  (``KernelConfig.exp2_per_iteration``).

Two rules on the loops (:meth:`CompileReport.waste`), beside the resource limits of
:meth:`CompileReport.problems`:

* **no fenced atomic in a loop**: a loop body that holds an atomic (``ATOM``, ``ATOMG``,
  ``ATOMS``, ``RED``, ``REDG``) must hold no ``MEMBAR`` of GPU or system scope. Triton's default
  ``tl.atomic_add(..., sem="acq_rel")`` compiles to ``MEMBAR.ALL.GPU; ERRBAR; ATOMG ...; CCTL.IVALL``
  per atomic, a device-wide fence per accumulation; an accumulation needs ``sem="relaxed"``.
  CTA-scope ``MEMBAR.ALL.CTA`` is allowed anywhere: ptxas emits it with ``FENCE.VIEW.ASYNC.S``
  for the generic-to-async proxy fence that orders shared-memory stores before ``wgmma``.
* **no exp2 beyond the tile's need** (sm_90 binaries): the ``MUFU.EX2`` of any loop body (its
  own instructions, nested loops excluded) must not exceed ``exp2_per_iteration``; a loop that
  holds ``MUFU.EX2`` in a configuration that declares no need fails too (the rule cannot pass by
  omission). No slack: in the SASS of the shipped kernels a loop holds exactly its tile's exp2
  where the work is not duplicated (attention forward 128 x 64 tile, 8 warps: 32 + 2 row
  rescales = 34; linear-CE LSE 128 x 128: 64 + 2 = 66), and twice that where two warpgroups
  compute one tile (attention dK/dV 64 x 64 on 8 warps: 32 for a need of 16). A conditional
  rescale counts: it is issued in the worst case. sm_80 binaries are reported, not judged: the
  need is declared for the sm_90 (wgmma) accumulator layout, and the mma.sync layout holds other
  rows per thread (linear-CE LSE: 72 on sm_80). Caveat: ptxas unrolls small loop bodies (a
  probe loop of 2 exp2 per thread was unrolled 4 times, 8 ``MUFU.EX2`` in its body); the
  softmax loops of the shipped kernels are far larger and are not unrolled.

A kernel module may also declare hot paths (``sass_paths(config_name, arch)``, see
:func:`hot_path`): the report then gives the SASS instructions per element issued on each (the
re-randomisation kernel: per law and dtype).

The gate fails (exit status 1) on ``problems()``; ``--strict`` makes it fail on ``waste()`` too.

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

# SASS instruction classes of the static report: name -> predicate on the full opcode
# ("MUFU.EX2", "ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU", ...).
ATOMIC_OPS = ("ATOM", "ATOMG", "ATOMS", "RED", "REDG")
COUNTED = {
    "hgmma": lambda op: op.split(".")[0] == "HGMMA",
    "hmma": lambda op: op.split(".")[0] == "HMMA",
    "ex2": lambda op: op.startswith("MUFU.EX2"),
    "membar": lambda op: op.split(".")[0] == "MEMBAR",
    "membar_gpu": lambda op: op.split(".")[0] == "MEMBAR" and not op.endswith(".CTA"),
    "atomics": lambda op: op.split(".")[0] in ATOMIC_OPS,
    "bar_sync": lambda op: op.startswith("BAR.SYNC"),
    "cp_async": lambda op: op.split(".")[0] == "LDGSTS",
    "tma": lambda op: op.split(".")[0] in ("UTMALDG", "UBLKCP"),
}

# Largest opt-in dynamic shared memory per block, in bytes (CUDA programming guide, table of
# compute capabilities): 227 KB on sm_90, 163 KB on sm_80.
MAX_SHARED = {90: 232448, 80: 166912}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One SASS instruction: address (bytes), guard predicate ("" or "@P0", "@!P1", ...), full
    opcode with its modifiers ("MUFU.EX2", "BAR.SYNC.DEFER_BLOCKING") and the operand text."""

    addr: int
    pred: str
    op: str
    args: str

    def branch_target(self) -> int | None:
        """Target address of a ``BRA`` (its last operand), else None."""
        if self.op.split(".")[0] != "BRA":
            return None
        m = re.search(r"0x([0-9a-f]+)\s*$", self.args)
        return int(m.group(1), 16) if m else None


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output of a one-kernel cubin, in address order."""
    return [Instruction(int(m.group(1), 16), m.group(2) or "", m.group(3), m.group(4).strip())
            for m in _SASS_LINE.finditer(text)]


def count_ops(instrs) -> dict[str, int]:
    """How many instructions of each class of ``COUNTED`` are in ``instrs``."""
    return {k: sum(1 for i in instrs if pred(i.op)) for k, pred in COUNTED.items()}


def _basic_blocks(instrs: list[Instruction]) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Basic blocks (instruction index ranges ``[first, last + 1)``) and their successors.

    A block ends at a branch, an ``EXIT``/``RET`` or before a branch target. Edges: a ``BRA``'s
    target, and the next block unless the block ends in an unconditional ``BRA``/``EXIT``/``RET``.
    A ``CALL`` returns to the next instruction (its subroutine is not part of the caller's flow).
    """
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        t = ins.branch_target()
        if t is not None and t in index:
            leaders.add(index[t])
        if (t is not None or ins.op.split(".")[0] in ("EXIT", "RET")) and k + 1 < len(instrs):
            leaders.add(k + 1)
    starts = sorted(leaders)
    blocks = list(zip(starts, starts[1:] + [len(instrs)]))
    block_at = {first: n for n, (first, _) in enumerate(blocks)}
    succ: list[list[int]] = []
    for n, (_, end) in enumerate(blocks):
        last = instrs[end - 1]
        base = last.op.split(".")[0]
        t = last.branch_target()
        conditional = (bool(last.pred) and last.pred != "@PT") or (t is not None and "," in last.args)
        out = [block_at[index[t]]] if t is not None and t in index else []
        if (t is None and base not in ("EXIT", "RET")) or conditional:
            out += [n + 1] if n + 1 < len(blocks) else []
        succ.append(out)
    return blocks, succ


def find_loops(instrs: list[Instruction]) -> list[dict]:
    """The natural loops of a SASS listing, outermost first, each a dict.

    Built on the control-flow graph (:func:`_basic_blocks`): an edge u -> h whose target h
    dominates u is a back edge, and its loop is h plus every block that reaches u without
    passing h; loops with one header are one loop. So an out-of-line block that a loop jumps to
    and that jumps back into the middle of it (the spin-wait of a TMA barrier) belongs to that
    loop and makes no loop of its own, and code after the kernel's last ``EXIT`` (the trap loop)
    is unreachable. Several copies of one source loop (e.g. a masked diagonal iteration and an
    unmasked main loop) are separate loops. Each dict: ``start``, ``end`` (lowest and highest
    address of its blocks), ``depth`` (0 = outermost), ``blocks`` (address ranges of all its
    blocks), ``instructions`` and one count per class of ``COUNTED`` over the loop's OWN
    instructions (those outside any nested loop): what one iteration issues at most.
    """
    if not instrs:
        return []
    blocks, succ = _basic_blocks(instrs)
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]       # reverse post-order from the entry
    while stack:
        node, it = stack[-1]
        nxt = next((s for s in it if s not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    order.reverse()
    pred: dict[int, list[int]] = {v: [] for v in order}
    for v in order:
        for w in succ[v]:
            pred[w].append(v)
    rpo = {v: i for i, v in enumerate(order)}
    idom = {order[0]: order[0]}                                # Cooper, Harvey and Kennedy (2001)
    changed = True
    while changed:
        changed = False
        for v in order[1:]:
            ps = [p for p in pred[v] if p in idom]
            new = ps[0]
            for p in ps[1:]:
                a, b = p, new
                while a != b:
                    while rpo[a] > rpo[b]:
                        a = idom[a]
                    while rpo[b] > rpo[a]:
                        b = idom[b]
                new = a
            if idom.get(v) != new:
                idom[v], changed = new, True

    def dominates(h: int, u: int) -> bool:
        while u != h and idom[u] != u:
            u = idom[u]
        return u == h

    bodies: dict[int, set[int]] = {}
    for u in order:
        for h in succ[u]:
            if dominates(h, u):
                body = bodies.setdefault(h, {h})
                work = [u]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(pred[x])
    loops = sorted(bodies.values(), key=lambda b: (blocks[min(b)][0], -len(b)))
    out = []
    for body in loops:
        inner = set().union(*(b for b in loops if b is not body and b < body))
        own = [instrs[k] for x in sorted(body - inner) for k in range(*blocks[x])]
        addrs = [(instrs[blocks[x][0]].addr, instrs[blocks[x][1] - 1].addr) for x in sorted(body)]
        depth = sum(1 for b in loops if b is not body and body < b)
        out.append({"start": min(a for a, _ in addrs), "end": max(e for _, e in addrs), "depth": depth,
                    "blocks": addrs, "instructions": len(own), **count_ops(own)})
    return out


def hot_path(instrs: list[Instruction], must: tuple[str, ...] = (),
             must_not: tuple[str, ...] = ()) -> list[Instruction] | None:
    """The instructions one thread issues on the shortest path from the entry to an ``EXIT`` that
    contains an instruction starting with each prefix of ``must`` and none starting with a
    prefix of ``must_not`` (opcode prefixes: "STG.E.128", "MUFU.RSQ", "F2FP.BF16"); None if no
    such path exists.

    The static cost of one specialisation of a kernel whose runtime branches pick the work (the
    law and dtype of a redraw): a loop's backward branch is not taken (its body counts once; see
    :func:`path_cost` for n iterations), a ``CALL`` counts as one instruction (put "CALL" in
    ``must_not`` to keep to the fast paths of correctly rounded division and square root, whose
    slow paths are called subroutines), a predicated instruction counts as issued.
    """
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    full = (1 << len(must)) - 1
    # best[k][features seen] = (length of the path up to and including k, predecessor state)
    best: list[dict[int, tuple[int, tuple[int, int] | None]]] = [dict() for _ in instrs]
    best[0][0] = (1, None)
    done: tuple[int, tuple[int, int]] | None = None
    for k, ins in enumerate(instrs):
        if not best[k] or any(ins.op.startswith(p) for p in must_not):
            continue
        bits = sum(1 << j for j, p in enumerate(must) if ins.op.startswith(p))
        conditional = bool(ins.pred) and ins.pred != "@PT"
        succ: list[int] = []
        target = ins.branch_target()
        base = ins.op.split(".")[0]
        if target is not None:
            conditional = conditional or "," in ins.args          # BRA !P1, target: predicated too
            if target > ins.addr and target in index:
                succ.append(index[target])
            if conditional:
                succ.append(k + 1)
        elif base in ("EXIT", "RET"):
            for mask, (n, _) in best[k].items():
                if base == "EXIT" and mask | bits == full and (done is None or n < done[0]):
                    done = (n, (k, mask))
            if conditional:
                succ.append(k + 1)
        else:
            succ.append(k + 1)
        for mask, (n, _) in best[k].items():
            for j in succ:
                m = mask | bits
                if j < len(instrs) and (m not in best[j] or best[j][m][0] > n + 1):
                    best[j][m] = (n + 1, (k, mask))
    if done is None:
        return None
    path, state = [], done[1]
    while state is not None:
        path.append(instrs[state[0]])
        state = best[state[0]][state[1]][1]
    return path[::-1]


def path_cost(instrs: list[Instruction], path: list[Instruction], iterations: int = 1) -> int:
    """Instructions issued along ``path`` (:func:`hot_path`) when each loop it enters runs
    ``iterations`` times: its instructions inside a loop body count ``iterations`` times."""
    spans = [span for lp in find_loops(instrs) for span in lp["blocks"]]
    inside = sum(1 for i in path if any(s <= i.addr <= e for s, e in spans))
    return len(path) + (iterations - 1) * inside


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
    # static performance report: SASS counts in the whole kernel (see COUNTED) ...
    ex2: int = 0
    membar: int = 0
    membar_gpu: int = 0
    atomics: int = 0
    bar_sync: int = 0
    cp_async: int = 0
    tma: int = 0
    instructions: int = 0
    # ... and per loop (find_loops), and the exp2 one thread needs per iteration of the tile
    loops: tuple = ()
    exp2_per_iteration: int | None = None
    # SASS instructions per element on the hot paths the kernel module declares (sass_paths)
    paths: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: dict) -> "CompileReport":
        """The report of a :func:`report_record` dict (the JSON of ``--json``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "loops" else v) for k, v in rec.items() if k in names})

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    def per_loop(self, kind: str) -> int:
        """The largest count of ``kind`` (a key of ``COUNTED``) in one iteration of any loop."""
        return max((lp[kind] for lp in self.loops), default=0)

    @property
    def fenced_atomics(self) -> int:
        """Atomics in loop bodies that also hold a GPU- or system-scope ``MEMBAR``."""
        return sum(lp["atomics"] for lp in self.loops if lp["atomics"] and lp["membar_gpu"])

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

    def waste(self) -> list[str]:
        """Violations of the two loop rules (module docstring): fenced atomics in a loop, and
        more ``MUFU.EX2`` in a loop iteration than the tile needs (or an undeclared need)."""
        out = []
        if self.fenced_atomics:
            out.append(f"{self.fenced_atomics} atomics fenced by a GPU-scope MEMBAR in a loop "
                       "(use sem='relaxed')")
        ex2 = self.per_loop("ex2")
        if self.arch < 90:
            pass        # the declared need is the sm_90 layout's (see the module docstring)
        elif ex2 and self.exp2_per_iteration is None:
            out.append(f"{ex2} MUFU.EX2 per loop iteration, but no exp2_per_iteration declared")
        elif self.exp2_per_iteration is not None and ex2 > self.exp2_per_iteration:
            out.append(f"{ex2} MUFU.EX2 per loop iteration > {self.exp2_per_iteration} the tile needs")
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
    instrs = parse_sass(sass)
    if not instrs:
        raise RuntimeError(f"{cfg.name}: cannot parse cuobjdump -sass output")
    paths = {}
    declared = getattr(importlib.import_module(cfg.fn.__module__), "sass_paths", None)
    for pname, (must, must_not, per_thread, iterations) in (declared(cfg.name, arch) if declared else {}).items():
        path = hot_path(instrs, must, must_not)
        if path is None:
            raise RuntimeError(f"{cfg.name} sm_{arch}: no path holds {must} without {must_not}")
        paths[pname] = round(path_cost(instrs, path, iterations) / (per_thread * iterations), 2)
    return CompileReport(
        name=cfg.name, kernel=cfg.fn.__name__, arch=arch, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, registers=reg, stack=stack, local=local,
        shared=int(kernel.metadata.shared) + static_shared, max_shared=MAX_SHARED[arch],
        needs_mma=cfg.needs_mma, allow_spills=cfg.allow_spills, **count_ops(instrs),
        instructions=len(instrs), loops=tuple(find_loops(instrs)),
        exp2_per_iteration=getattr(cfg, "exp2_per_iteration", None), paths=paths)


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
    """A fixed-width table of the reports, one row per (configuration, arch).

    Count columns read ``total/loop``: in the whole kernel / in one iteration of the loop that
    holds the most (:func:`find_loops`); ``atom`` counts atomics, ``fenced`` those in a loop with
    a GPU-scope ``MEMBAR``; ``exp2 need`` is the configuration's ``exp2_per_iteration``.
    """
    header = ("config", "sm", "warps", "stages", "regs", "spill B", "smem KB", "loops", "HGMMA", "HMMA",
              "EX2", "exp2 need", "MEMBAR", "atom", "fenced", "BAR.SYNC", "cp.async", "TMA", "status")
    rows = [header]
    for r in reports:
        bad = r.problems() + r.waste()

        def tl(kind: str) -> str:
            return f"{getattr(r, kind)}/{r.per_loop(kind)}"

        rows.append((r.name, str(r.arch), str(r.num_warps), str(r.num_stages), str(r.registers),
                     str(r.stack + r.local), f"{r.shared / 1024:.1f}", str(len(r.loops)), tl("hgmma"),
                     tl("hmma"), tl("ex2"), "-" if r.exp2_per_iteration is None else str(r.exp2_per_iteration),
                     tl("membar"), tl("atomics"), str(r.fenced_atomics), tl("bar_sync"), tl("cp_async"),
                     tl("tma"), "ok" if not bad else "; ".join(bad)))
    lines = _table(rows)
    with_paths = [r for r in reports if r.paths]
    if with_paths:
        names = sorted({k for r in with_paths for k in r.paths})
        lines += ["", "SASS instructions per element on the declared hot paths (hot_path, path_cost):"]
        lines += _table([("config", "sm", *names)] + [(r.name, str(r.arch), *(
            str(r.paths.get(k, "-")) for k in names)) for r in with_paths])
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def report_record(r: CompileReport) -> dict:
    """Every field of a report as a JSON-ready dict, with the derived loop figures added."""
    return {**dataclasses.asdict(r), "loops": list(r.loops),
            **{f"{k}_per_loop": r.per_loop(k) for k in COUNTED}, "fenced_atomics": r.fenced_atomics,
            "problems": r.problems(), "waste": r.waste()}


def exit_status(reports: list[CompileReport], strict: bool = False) -> int:
    """1 if a report has problems (or, with ``strict``, waste), else 0."""
    return 1 if any(r.problems() or (strict and r.waste()) for r in reports) else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lorafast.compile_gate", description=__doc__.split("\n")[0])
    p.add_argument("--filter", default="", help="only configurations whose name contains this")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--json", action="store_true", help="print the reports as a JSON list (every field)")
    p.add_argument("--strict", action="store_true",
                   help="fail on waste too (fenced atomics or extra exp2 in a loop), not only on problems")
    args = p.parse_args(argv)
    if interpreting():
        p.error("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    configs = [c for c in shipped_configs() if args.filter in c.name]
    reports = run_gate(configs, jobs=args.jobs)
    if args.json:
        import json

        print(json.dumps([report_record(r) for r in reports]))
    else:
        print(format_reports(reports))
    return exit_status(reports, args.strict)


if __name__ == "__main__":
    raise SystemExit(main())

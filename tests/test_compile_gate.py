"""Every shipped kernel configuration compiles for sm_90 and sm_80 with no spills, fitting shared
memory, and tensor-core main loops (HGMMA on sm_90) where declared; and its loops hold no fenced
atomic and no more exp2 than the tile needs (the static report's two rules) — checked on CPU,
no GPU.

The test session runs kernels in the interpreter (TRITON_INTERPRET=1), whose functions cannot be
compiled, so the gate runs in a subprocess with the interpreter off.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from lorafast.compile_gate import (CompileReport, find_loops, hot_path, parse_sass, path_cost,  # noqa: E402
                                   shipped_configs)

CONFIGS = shipped_configs()
ENV = {**os.environ, "TRITON_INTERPRET": "0"}

# Shipped kernels that break a loop rule on main, by config-name prefix, with the change that
# removes the entry. xfail(strict=True): once a fix lands the test passes, the xfail turns into
# a failure, and the entry must go (the integrator empties these sets as the kernel branches
# land). Counts quoted are sm_90 SASS, per loop iteration (python -m lorafast.compile_gate).
KNOWN_FENCED_ATOMICS: dict[str, str] = {}  # linear_ce_bwd_: fixed by relaxed atomics (branch ce)
KNOWN_EXTRA_EXP2: dict[str, str] = {}  # attention: declared needs and split dK/dV tiles (branch attn)


def _known(table: dict, name: str) -> str | None:
    return next((why for prefix, why in table.items() if name.startswith(prefix)), None)


def _rule_params(table: dict, configs=CONFIGS) -> list:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, raises=AssertionError,
                                                                reason=_known(table, c.name))]
                         if _known(table, c.name) else [])
            for c in configs]


@pytest.fixture(scope="module")
def reports():
    out = subprocess.run([sys.executable, "-m", "lorafast.compile_gate", "--json", "--jobs", "2"], env=ENV,
                         capture_output=True, text=True, timeout=3000)
    assert out.stdout.strip(), out.stderr[-3000:]
    return {(r["name"], r["arch"]): CompileReport.from_record(r) for r in json.loads(out.stdout)}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_passes_gate(cfg, reports):
    for arch in cfg.archs:
        r = reports[(cfg.name, arch)]
        assert not r.problems(), f"{r.name} sm_{r.arch}: {r.problems()}"
        assert r.registers > 0
        if r.needs_mma:
            assert (r.hgmma if arch >= 90 else r.hmma) > 0


@pytest.mark.parametrize("cfg", _rule_params(KNOWN_FENCED_ATOMICS))
def test_shipped_config_no_fenced_atomic_in_loops(cfg, reports):
    for arch in cfg.archs:
        r = reports[(cfg.name, arch)]
        assert r.loops is not None and r.instructions > 0
        assert r.fenced_atomics == 0, (f"{r.name} sm_{r.arch}: {r.fenced_atomics} atomics with a GPU-scope "
                                       f"MEMBAR in a loop: {[lp for lp in r.loops if lp['atomics']]}")


@pytest.mark.parametrize("cfg", _rule_params(KNOWN_EXTRA_EXP2, [c for c in CONFIGS if 90 in c.archs]))
def test_shipped_config_loop_exp2_within_tile_need(cfg, reports):
    # sm_90 binaries only: the declared need is that of the wgmma accumulator layout
    r = reports[(cfg.name, 90)]
    ex2 = r.per_loop("ex2")
    if ex2:
        assert r.exp2_per_iteration is not None, f"{r.name}: {ex2} MUFU.EX2 per loop iteration, no declared need"
        assert ex2 <= r.exp2_per_iteration, f"{r.name}: {ex2} MUFU.EX2 per loop iteration > {r.exp2_per_iteration}"
    assert not [w for w in r.waste() if "EX2" in w]


# Two runtime paths: a loop (0x20-0x40) of I2F work, or MUFU.RSQ work with a called slow path.
_PATHS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 BRA 0x60 ;
        /*0020*/                   I2FP.F32.U32 R1, R0 ;
        /*0030*/                   FMUL R1, R1, R1 ;
        /*0040*/              @!P1 BRA 0x20 ;
        /*0050*/                   BRA 0x90 ;
        /*0060*/                   MUFU.RSQ R1, R0 ;
        /*0070*/               @P2 BRA 0x90 ;
        /*0080*/                   CALL.REL.NOINC 0xb0 ;
        /*0090*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   RET.REL.NODEC R2 0x0 ;
"""


def test_hot_path_on_a_listing():
    instrs = parse_sass(_PATHS)
    uniform = hot_path(instrs, ("I2F", "STG.E.128"), ("MUFU",))
    assert [i.addr for i in uniform] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x90, 0xa0]
    assert path_cost(instrs, uniform, 3) == 8 + 2 * 3              # the loop body counts 3 times
    normal = hot_path(instrs, ("MUFU.RSQ", "STG.E.128"), ("CALL",))
    assert [i.addr for i in normal] == [0x0, 0x10, 0x60, 0x70, 0x90, 0xa0] and path_cost(instrs, normal, 3) == 6
    assert len(hot_path(instrs, ("MUFU.RSQ", "CALL"))) == 7        # the slow path: the CALL counts once
    assert hot_path(instrs, ("STG",), ("I2F", "MUFU")) is None


# SASS instructions per element on the re-randomisation hot paths (sm_90, Philox-10, interior chunk
# of a large tensor): ceilings a little above today's figures (17.3 / 56.3 fp32, 18.2 / 57.6
# bf16), far under the kernel of the issue (34.3 / 74.9, bf16 37.8 / 78.4)
REDRAW_CEILINGS = {"uniform_fp32": 18.5, "uniform_fp16": 19.5, "uniform_bf16": 19.5,
                   "normal_fp32": 58.0, "normal_fp16": 58.5, "normal_bf16": 59.0}


def test_rerandomize_instructions_per_element(reports):
    r = reports[("rerandomize_r10_aligned", 90)]
    assert set(r.paths) == set(REDRAW_CEILINGS), r.paths
    for name, ceiling in REDRAW_CEILINGS.items():
        assert 10 < r.paths[name] <= ceiling, (name, r.paths[name], ceiling)
    assert r.paths["uniform_fp32"] > reports[("rerandomize_r7_aligned", 90)].paths["uniform_fp32"]   # 3 rounds fewer
    assert not reports[("rerandomize_r10_unaligned", 90)].paths and not reports[("rerandomize_r10_aligned", 80)].paths


def test_every_kernel_module_ships_configs():
    modules = {c.fn.__module__ if hasattr(c.fn, "__module__") else "" for c in CONFIGS}
    names = {c.name.split("_")[0] for c in CONFIGS}
    assert {"attn", "rerandomize"} <= names and any("ce" in n or "softmax" in n or "lse" in n for n in
                                                      {c.name for c in CONFIGS}), names
    assert len(CONFIGS) >= 10, modules


def test_gate_discovers_kernel_modules_and_rejects_one_without_configs(tmp_path, monkeypatch):
    import lorafast.kernels as pkg
    from lorafast import compile_gate

    here = os.path.dirname(pkg.__file__)
    on_disk = {f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_")}
    assert set(compile_gate.kernel_modules()) == on_disk
    (tmp_path / "newkernel.py").write_text("X = 1\n")  # a kernel module that forgot compile_configs
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "lorafast.kernels.newkernel", raising=False)
    assert "newkernel" in compile_gate.kernel_modules()
    with pytest.raises(RuntimeError, match="newkernel declares no compile configuration"):
        compile_gate.shipped_configs()
    sys.modules.pop("lorafast.kernels.newkernel", None)


def test_gate_catches_problems(tmp_path):
    # The gate must be able to fail: a kernel declared tensor-core without a dot fails, one with a
    # dot passes (real compiles); spills and shared memory over the limit fail (report logic).
    script = tmp_path / "gate_probe.py"
    script.write_text(textwrap.dedent('''
        import triton, triton.language as tl
        from lorafast.compile_gate import KernelConfig, compile_config

        @triton.jit
        def no_dot(x_ptr, y_ptr, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            tl.store(y_ptr + r, tl.load(x_ptr + r) * 2)

        @triton.jit
        def dot(a_ptr, c_ptr, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
            tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))

        bad = compile_config(KernelConfig("no-dot", no_dot, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                                          {"BLOCK": 128}, needs_mma=True), 90)
        assert bad.hgmma == 0 and any("HGMMA" in p for p in bad.problems()), bad
        good = compile_config(KernelConfig("dot", dot, {"a_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                                           {"BLOCK": 64}, needs_mma=True, aligned=("a_ptr", "c_ptr")), 90)
        assert good.hgmma > 0 and not good.problems() and good.registers > 0, good

        # loop rules: an acq_rel atomic in a loop is fenced, a relaxed one is not
        @triton.jit
        def accumulate(x_ptr, y_ptr, n, BLOCK: tl.constexpr, RELAXED: tl.constexpr):
            r = tl.arange(0, BLOCK)
            for i in range(n):
                x = tl.load(x_ptr + i * BLOCK + r)
                if RELAXED:
                    tl.atomic_add(y_ptr + r, x, sem="relaxed")
                else:
                    tl.atomic_add(y_ptr + r, x)    # default sem="acq_rel"

        # a loop over 4096-element tiles (32 exp2 per thread on 4 warps), optionally twice over
        @triton.jit
        def exp2_loop(x_ptr, y_ptr, n, BLOCK: tl.constexpr, TWICE: tl.constexpr):
            r = tl.arange(0, BLOCK)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(n):
                x = tl.load(x_ptr + i * BLOCK + r)
                acc += tl.exp2(x)
                if TWICE:
                    acc += tl.exp2(x * 0.5)
            tl.store(y_ptr + r, acc)

        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
        def probe(fn, flag, value, **kw):
            return compile_config(KernelConfig(f"{fn.__name__}-{flag}-{value}", fn, {**sig, flag: "constexpr"},
                                               {"BLOCK": 4096 if fn is exp2_loop else 256, flag: value},
                                               aligned=("x_ptr", "y_ptr"), **kw), 90)

        fenced = probe(accumulate, "RELAXED", False)
        assert fenced.fenced_atomics == 1 and fenced.membar_gpu == 1, fenced
        assert any("fenced" in w for w in fenced.waste()) and not fenced.problems(), fenced
        relaxed = probe(accumulate, "RELAXED", True)
        assert relaxed.atomics == 1 and relaxed.fenced_atomics == 0 and not relaxed.waste(), relaxed
        twice = probe(exp2_loop, "TWICE", True, exp2_per_iteration=32)
        assert twice.per_loop("ex2") == 64 and any("> 32" in w for w in twice.waste()), twice
        once = probe(exp2_loop, "TWICE", False, exp2_per_iteration=32)
        assert once.per_loop("ex2") == 32 and not once.waste(), once
        undeclared = probe(exp2_loop, "TWICE", False)
        assert any("no exp2_per_iteration" in w for w in undeclared.waste()), undeclared
        print("gate-probe-ok")
    '''))
    out = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "gate-probe-ok" in out.stdout, out.stderr[-3000:]


# A hand-written SASS listing: a loop (0x30-0x90) holding a nested loop (0x50-0x70) and a second
# copy of a loop (0xb0-0xd0) closed by two backward branches; the trap at the end is no loop.
_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MUFU.EX2 R1, R0 ;
        /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x1, PT ;
        /*0030*/                   MUFU.EX2 R2, R1 ;
        /*0040*/                   MEMBAR.ALL.GPU ;
        /*0050*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, RZ, desc[UR4][R2.64], R5 ;
        /*0060*/                   MUFU.EX2 R3, R2 ;
        /*0070*/               @P0 BRA 0x50 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/              @!P0 BRA 0x30 ;
        /*00a0*/                   MEMBAR.ALL.CTA ;
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*00c0*/               @P1 BRA 0xb0 ;
        /*00d0*/            @!P2 BRA !P3, 0xb0 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   BRA 0xf0;
"""


def test_find_loops_on_a_listing():
    instrs = parse_sass(_SASS)
    assert len(instrs) == 16 and instrs[7].branch_target() == 0x50 and instrs[13].branch_target() == 0xb0
    loops = find_loops(instrs)
    assert [(lp["start"], lp["end"], lp["depth"]) for lp in loops] == [(0x30, 0x90, 0), (0x50, 0x70, 1), (0xb0, 0xd0, 0)]
    outer, inner, second = loops
    assert (outer["instructions"], outer["ex2"], outer["membar_gpu"], outer["bar_sync"]) == (4, 1, 1, 1)
    assert (inner["instructions"], inner["ex2"], inner["atomics"], inner["membar_gpu"]) == (3, 1, 1, 0)
    assert (second["hgmma"], second["instructions"]) == (1, 3)
    base = dict(name="x", kernel="k", arch=90, num_warps=4, num_stages=3, registers=128, stack=0, local=0,
                shared=1024, max_shared=232448, hgmma=1, hmma=0, needs_mma=True, allow_spills=False)
    r = CompileReport(**base, loops=tuple(loops), exp2_per_iteration=1)
    assert r.per_loop("ex2") == 1 and r.fenced_atomics == 0 and not r.waste()   # fence and atomic: other loops
    fenced = dict(inner, membar_gpu=1)
    r = CompileReport(**base, loops=(outer, fenced, second), exp2_per_iteration=1)
    assert r.fenced_atomics == 1 and "fenced" in r.waste()[0]
    assert "no exp2_per_iteration" in CompileReport(**base, loops=tuple(loops)).waste()[0]
    assert "> 0" in CompileReport(**base, loops=tuple(loops), exp2_per_iteration=0).waste()[0]
    assert not CompileReport(**{**base, "arch": 80}, loops=tuple(loops)).waste()     # sm_80: reported only


def test_report_limits():
    base = dict(name="x", kernel="k", arch=90, num_warps=4, num_stages=3, registers=128, stack=0, local=0,
                shared=1024, max_shared=232448, hgmma=4, hmma=0, needs_mma=True, allow_spills=False)
    assert not CompileReport(**base).problems()
    assert "shared memory" in CompileReport(**{**base, "shared": 232449}).problems()[0]
    assert "spills" in CompileReport(**{**base, "stack": 8}).problems()[0]
    assert not CompileReport(**{**base, "stack": 8, "allow_spills": True}).problems()
    assert "HGMMA" in CompileReport(**{**base, "hgmma": 0}).problems()[0]
    assert "HMMA" in CompileReport(**{**base, "arch": 80, "max_shared": 166912}).problems()[0]

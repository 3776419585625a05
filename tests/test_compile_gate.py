"""Every shipped kernel configuration compiles for sm_90 and sm_80 with no spills, fitting shared
memory, and tensor-core main loops (HGMMA on sm_90) where declared — checked on CPU, no GPU.

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

from lorafast.compile_gate import CompileReport, shipped_configs  # noqa: E402

CONFIGS = shipped_configs()
ENV = {**os.environ, "TRITON_INTERPRET": "0"}


@pytest.fixture(scope="module")
def reports():
    out = subprocess.run([sys.executable, "-m", "lorafast.compile_gate", "--json", "--jobs", "2"], env=ENV,
                         capture_output=True, text=True, timeout=3000)
    assert out.stdout.strip(), out.stderr[-3000:]
    return {(r["name"], r["arch"]): CompileReport(**r) for r in json.loads(out.stdout)}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_passes_gate(cfg, reports):
    for arch in cfg.archs:
        r = reports[(cfg.name, arch)]
        assert not r.problems(), f"{r.name} sm_{r.arch}: {r.problems()}"
        assert r.registers > 0
        if r.needs_mma:
            assert (r.hgmma if arch >= 90 else r.hmma) > 0


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
        print("gate-probe-ok")
    '''))
    out = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "gate-probe-ok" in out.stdout, out.stderr[-3000:]


def test_report_limits():
    base = dict(name="x", kernel="k", arch=90, num_warps=4, num_stages=3, registers=128, stack=0, local=0,
                shared=1024, max_shared=232448, hgmma=4, hmma=0, needs_mma=True, allow_spills=False)
    assert not CompileReport(**base).problems()
    assert "shared memory" in CompileReport(**{**base, "shared": 232449}).problems()[0]
    assert "spills" in CompileReport(**{**base, "stack": 8}).problems()[0]
    assert not CompileReport(**{**base, "stack": 8, "allow_spills": True}).problems()
    assert "HGMMA" in CompileReport(**{**base, "hgmma": 0}).problems()[0]
    assert "HMMA" in CompileReport(**{**base, "arch": 80, "max_shared": 166912}).problems()[0]

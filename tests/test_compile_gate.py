"""Every shipped kernel configuration compiles for sm_90 and sm_80 with no spills, fitting shared
memory, and tensor-core main loops (HGMMA on sm_90) where declared — checked on CPU, no GPU."""
import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lorafast.compile_gate import KernelConfig, compile_config, format_reports, shipped_configs  # noqa: E402

CONFIGS = shipped_configs()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_config_passes_gate(cfg):
    reports = [compile_config(cfg, arch) for arch in cfg.archs]
    print("\n" + format_reports(reports))
    for r in reports:
        assert not r.problems(), f"{r.name} sm_{r.arch}: {r.problems()}"
        if r.needs_mma and r.arch == 90:
            assert r.hgmma > 0


def test_every_kernel_module_ships_configs():
    kernels = {c.fn.__name__ for c in CONFIGS}
    modules = {c.fn.__module__ for c in CONFIGS}
    assert len(modules) >= 3, modules  # attention, linear cross-entropy, re-randomisation
    assert len(kernels) >= 5, kernels


@triton.jit
def _no_dot(x_ptr, y_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    tl.store(y_ptr + r, tl.load(x_ptr + r) * 2)


@triton.jit
def _dot(a_ptr, c_ptr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + r[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))


def test_gate_catches_problems():
    # The gate must be able to fail: a kernel declared tensor-core but without a dot, and a tile
    # whose shared memory cannot fit.
    bad = KernelConfig("no-dot", _no_dot, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                       {"BLOCK": 128}, needs_mma=True, archs=(90,))
    r = compile_config(bad, 90)
    assert r.hgmma == 0 and any("HGMMA" in p for p in r.problems())
    good = KernelConfig("dot", _dot, {"a_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                        {"BLOCK": 64}, needs_mma=True, aligned=("a_ptr", "c_ptr"), archs=(90,))
    r = compile_config(good, 90)
    assert r.hgmma > 0 and not r.problems() and r.registers > 0
    big = compile_config(KernelConfig("dot-512", _dot, {"a_ptr": "*fp32", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                                      {"BLOCK": 512}, needs_mma=True, archs=(80,)), 80)
    assert big.shared > big.max_shared or big.spills, big
    assert big.problems()

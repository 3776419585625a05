"""Benchmark: fused causal attention against SDPA backends and the reference model's math.

Providers (q, k, v are views of one fused qkv tensor [B, T, 3*H*D], as in the model):
  lorafast        ``lorafast.ops._attention.attention`` (impl="auto": Triton on CUDA; on CPU the
                  torch path, or the Triton interpreter when TRITON_INTERPRET=1); the backward
                  is the one-launch kernel with atomic dQ
  lorafast_det    the same with ``deterministic=True`` (separate dK/dV and dQ kernels; CUDA)
  sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                  ``F.scaled_dot_product_attention`` pinned to one backend (CUDA, each if it runs)
  sdpa            ``F.scaled_dot_product_attention`` with its default choice (CPU)
  reference       ``lorafast.reference.CausalSelfAttention.attend``: explicit T x T math (causal)

Modes: fwd, bwd (backward of a stored forward graph), fwd_bwd. FLOPs: 4*B*H*T^2*D for the
forward, halved when causal; backward 2.5x the forward; fwd_bwd 3.5x (the convention of
flash-attention's and Triton's benchmarks). Bytes: the compulsory HBM traffic, every input read
once and every output written once (forward: q, k, v in, o out, the fp32 lse; backward: q, k,
v, o, dO and lse in, dq, dk, dv out), so ``frac_peak_bw`` is a lower bound on the real traffic.
Every timed record carries ``common.roofline`` fields: flops, bytes, TFLOP/s, GB/s and, on CUDA,
``frac_peak_flops`` / ``frac_peak_bw`` of the H200 (790 TFLOP/s bf16 dense, 4.8 TB/s).
Peak memory: ``common.peak_memory`` (CUDA allocator above the inputs; CPU: RSS growth of a fresh
subprocess). ``python -m lorafast.bench.attention [--full] [--device cuda] [--save FILE]``.

``--tune`` (CUDA) times each kernel of ``lorafast.kernels.attention`` over
``tile_candidates`` (launchers driven directly, other kernels at their shipped tiles) and marks
the fastest per kernel, to re-tune ``_GPU_TILES``; candidates must then still pass the compile
gate. ``--sass`` (no GPU) compiles every shipped attention configuration for sm_90 / sm_80 and
counts, per main loop of the SASS, the instructions the issues track (HGMMA/HMMA, MUFU.EX2
against ``exp2_per_iteration``, MEMBAR by scope, atomics, CTA barriers, LDGSTS, UTMALDG, mbarrier
waits): the figures quoted in the kernel commits.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafast.bench import common
from lorafast.config import DTYPES

FACTORY = "lorafast.bench.attention:setup"
_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                  "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return f * _FLOP_FACTOR[mode]


def bytes_moved(B: int, H: int, T: int, D: int, dtype: str, mode: str) -> float:
    """Compulsory HBM bytes of one call: each input read once, each output written once."""
    rows = B * H * T
    tile = rows * D * DTYPES[dtype].itemsize   # one [B, H, T, D] tensor
    fwd = 4 * tile + 4 * rows                   # q, k, v -> o; lse fp32
    bwd = 8 * tile + 4 * rows                   # q, k, v, o, dO, lse -> dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def _attn_fn(provider: str, causal: bool) -> tuple[Callable, Callable[[], Any]]:
    """(attention function of q, k, v; context manager factory to run it under)."""
    if provider in ("lorafast", "lorafast_det"):
        from lorafast.ops._attention import attention

        det = provider == "lorafast_det"
        return (lambda q, k, v: attention(q, k, v, causal=causal, deterministic=det)), contextlib.nullcontext
    if provider == "sdpa":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), contextlib.nullcontext
    if provider in _SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, _SDPA_BACKENDS[provider])
        return ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
                lambda: sdpa_kernel(backend))
    if provider == "reference":
        if not causal:
            raise ValueError("the reference model's attention is causal only")
        from lorafast.reference import CausalSelfAttention

        # attend() uses no module state: the plain math of the spec
        return (lambda q, k, v: CausalSelfAttention.attend(None, q, k, v)), contextlib.nullcontext
    raise ValueError(f"unknown provider {provider!r}")


def setup(B: int, H: int, T: int, D: int, causal: bool = True, dtype: str = "bfloat16",
          device: str = "cpu", provider: str = "lorafast", mode: str = "fwd_bwd") -> Callable[[], Any]:
    """Build one case; the returned zero-argument callable runs it once (``.params``: leaves)."""
    fn, ctx = _attn_fn(provider, causal)
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device=device, generator=g).to(DTYPES[dtype])
    qkv.requires_grad_(mode != "fwd")
    do = torch.randn(B, H, T, D, device=device, generator=g).to(DTYPES[dtype])

    def forward():
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)   # 3 x [B, H, T, D] views
        with ctx():
            return fn(q, k, v)

    if mode == "fwd":
        def step():
            with torch.no_grad():
                return forward()
    elif mode == "bwd":
        out = forward()

        def step():
            with ctx():
                out.backward(do, retain_graph=True)
    elif mode == "fwd_bwd":
        def step():
            out = forward()
            with ctx():
                out.backward(do)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    step()  # compile / warm up, and fail here if the backend cannot run this case
    qkv.grad = None
    step.params = [qkv] if mode != "fwd" else []  # type: ignore[attr-defined]
    return step


def _providers(device: str, causal: bool) -> list[str]:
    if device.startswith("cuda"):
        out = ["lorafast", "lorafast_det", *_SDPA_BACKENDS]
    else:
        out = ["lorafast", "sdpa"]
    return out + (["reference"] if causal else [])


def _shapes(device: str, quick: bool) -> list[tuple[int, int, int, int, bool, str]]:
    """(B, H, T, D, causal, dtype). CUDA: the issue's goal, B*T = 16k, H*D = 2048, bf16."""
    if device.startswith("cuda"):
        Ts = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        out = [(16384 // T, 16, T, 128, True, "bfloat16") for T in Ts]
        if not quick:
            out += [(16384 // T, 32, T, 64, True, "bfloat16") for T in (1024, 4096)]
            out += [(16384 // T, 16, T, 128, False, "bfloat16") for T in (1024, 4096)]
        return out
    return [(2, 4, 256, 64, True, "float32")] + ([] if quick else [(1, 4, 1024, 64, True, "float32"),
                                                                   (2, 4, 256, 64, False, "float32")])


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    """Time (fwd, bwd, fwd_bwd) and fwd_bwd peak memory of each provider; one record per case."""
    records: list[dict] = []
    for B, H, T, D, causal, dtype in _shapes(device, quick):
        for p in _providers(device, causal):
            for mode in ("fwd", "bwd", "fwd_bwd"):
                kw = dict(B=B, H=H, T=T, D=D, causal=causal, dtype=dtype, device=device, provider=p,
                          mode=mode)
                rec: dict[str, Any] = {"op": "attention", "provider": p, "mode": mode, "B": B, "H": H,
                                       "T": T, "D": D, "causal": causal, "dtype": dtype}
                try:
                    fn = setup(**kw)
                except (RuntimeError, ImportError) as e:  # backend unavailable for this case
                    rec["error"] = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
                    records.append(rec)
                    continue
                t = common.time_fn(fn, device, grad_to_none=getattr(fn, "params", None))
                rec.update(t)
                rec.update(common.roofline(flops(B, H, T, D, causal, mode),
                                           bytes_moved(B, H, T, D, dtype, mode), t["ms"], device))
                del fn
                if mode == "fwd_bwd":
                    try:
                        rec["peak_mb"] = common.peak_memory(FACTORY, kw, device) / 2**20
                    except RuntimeError as e:  # e.g. the T x T reference out of memory
                        rec["error"] = str(e).splitlines()[0][:80]
                records.append(rec)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    # the goal: lorafast fwd_bwd >= 1.0x sdpa_cudnn and >= 1.3x sdpa_flash
    for r in records:
        if r["provider"] not in ("lorafast", "lorafast_det") or "ms" not in r:
            continue
        for other in ("sdpa_cudnn", "sdpa_flash", "sdpa"):
            o = [x for x in records if x["provider"] == other and "ms" in x and all(
                x[k] == r[k] for k in ("mode", "B", "H", "T", "D", "causal", "dtype"))]
            if o:
                r[f"speedup_vs_{other}"] = o[0]["ms"] / r["ms"]
    return records


def tune(device: str = "cuda", B: int = 4, H: int = 16, T: int = 4096, D: int = 128,
         causal: bool = True, dtype: str = "bfloat16") -> list[dict]:
    """Time every candidate tile of each kernel on one shape; one record per (kernel, tile),
    with roofline fields (FLOPs of the kernel's share: fwd 1x, dkdv 4/5 and dq 3/5 of the
    backward's 2.5x) and ``best`` on the fastest per kernel. The Hopper TMA tiles are timed
    when the inputs allow them (they do here: views of one qkv tensor)."""
    from lorafast.kernels import attention as ka

    dt = DTYPES[dtype]
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dt)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    do = torch.randn(B, T, H, D, device=device, dtype=dt).transpose(1, 2)
    out = torch.empty_like(do)
    lse = torch.empty(B, H, T, device=device, dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(do) for _ in range(3))
    scale = D ** -0.5
    shipped = ka.pick_tiles(D, dt, torch.device(device))
    tma = ka.tma_compatible(q, k, v, out, do)
    ka.attention_forward(q, k, v, out, lse, causal=causal, scale=scale, tiles=shipped)
    f_fwd = flops(B, H, T, D, causal, "fwd")
    kinds = {"fwd": (shipped.fwd_tma if tma and shipped.fwd_tma else shipped.fwd, f_fwd),
             "bwd": (shipped.bwd_tma if tma and shipped.bwd_tma else shipped.bwd, 2.5 * f_fwd),
             "dkdv": (shipped.dkdv, 2.0 * f_fwd), "dq": (shipped.dq, 1.5 * f_fwd)}
    records = []
    for kind, (base, kflops) in kinds.items():
        for tile in ka.tile_candidates(kind, base):
            field = {"fwd": "fwd_tma" if tile.tma else "fwd", "bwd": "bwd_tma" if tile.tma else "bwd"}.get(kind, kind)
            tiles = dataclasses.replace(shipped, **{field: tile})
            if kind == "fwd":
                fn = lambda: ka.attention_forward(q, k, v, out, lse, causal=causal, scale=scale,  # noqa: E731
                                                  tiles=tiles)
            else:
                grads = {"bwd": (dq, dk, dv), "dkdv": (None, dk, dv), "dq": (dq, None, None)}[kind]
                fn = lambda: ka.attention_backward(do, q, k, v, out, lse, *grads,  # noqa: E731
                                                   causal=causal, scale=scale, tiles=tiles)
            rec = {"kernel": kind, "tile": f"{tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}"
                                          f"{' tma' if tile.tma else ''}{' ws' if tile.warp_specialize else ''}",
                   "shipped": tile == base}
            try:
                t = common.time_fn(fn, device)
                rec.update(t)
                rec.update(common.roofline(kflops, bytes_moved(B, H, T, D, dtype, "fwd" if kind == "fwd" else "bwd"),
                                           t["ms"], device))
            except Exception as e:  # noqa: BLE001 - out of shared memory / registers: skip
                rec["error"] = type(e).__name__
            records.append(rec)
        ok = [r for r in records if r["kernel"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            best["best"] = True
    return records


# Per-loop SASS counts (static: compiled on CPU with triton's bundled tools, no GPU)
SASS_PATTERNS = {
    "HGMMA": r"\bHGMMA\.", "HMMA": r"\bHMMA\.", "MUFU.EX2": r"\bMUFU\.EX2\b",
    "MEMBAR.CTA": r"\bMEMBAR\.\w+\.CTA\b", "MEMBAR.GPU": r"\bMEMBAR\.(?:\w+\.)?(?:GPU|SYS)\b",
    "ATOM/RED": r"\b(?:ATOMG?|REDG?|ATOMS)\.", "BAR.SYNC": r"\bBAR\.SYNC", "LDGSTS": r"\bLDGSTS\b",
    "UTMALDG": r"\bUTMALDG\b", "SYNCS": r"\bSYNCS\.", "USETMAXREG": r"\bUSETMAXREG\b",
}


def sass_loops(sass: str) -> list[dict]:
    """Counts of ``SASS_PATTERNS`` in each innermost loop of a ``cuobjdump -sass`` listing (a
    loop: the span from a backward branch's target to the branch), skipping loops without an
    MMA, an exp2 or a TMA load (the mbarrier spin loops of warp-specialised kernels)."""
    import re

    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)`|0x([0-9a-f]+))", text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out = []
    for lo, hi in inner:
        seg = [t for a, t in ins if lo <= a <= hi]
        c = {k: sum(bool(re.search(p, t)) for t in seg) for k, p in SASS_PATTERNS.items()}
        if c["HGMMA"] or c["HMMA"] or c["MUFU.EX2"] or c["UTMALDG"]:
            out.append(c)
    return out


def sass_report(archs: tuple[int, ...] = (90, 80), name_filter: str = "") -> list[dict]:
    """One record per (shipped attention config, arch, main loop): the loop's SASS counts, the
    exp2 the tile needs per thread and iteration, registers and spills."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lorafast.compile_gate import _tool
    from lorafast.kernels import attention as ka

    records = []
    for cfg in ka.compile_configs():
        if name_filter not in cfg.name:
            continue
        for arch in cfg.archs:
            if arch not in archs:
                continue
            names = list(cfg.fn.arg_names)
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned}
            src = ASTSource(cfg.fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs), attrs=attrs)
            kern = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={
                "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **cfg.options})
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(kern.asm["cubin"])
                sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                                      check=True).stdout
                usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                                       text=True, check=True).stdout
            regs, stack = (int(x) for x in re.search(r"REG:(\d+)\s+STACK:(\d+)", usage).groups())
            for i, c in enumerate(sass_loops(sass)):
                records.append({"config": cfg.name, "sm": arch, "loop": i, "regs": regs, "stack": stack,
                                "exp2_needed": cfg.exp2_per_iteration, **c})
    return records


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("attention", __doc__, "all sequence lengths and head dims")
    p.add_argument("--tune", action="store_true", help="time candidate tiles per kernel (CUDA)")
    p.add_argument("--D", type=int, default=128, help="head dim for --tune")
    p.add_argument("--sass", action="store_true", help="per-loop SASS counts of the shipped configs (no GPU)")
    p.add_argument("--filter", default="", help="--sass: only configs whose name contains this")
    args = p.parse_args(argv)
    if args.sass:
        common.finish(sass_report(name_filter=args.filter), "cpu", "attention SASS per main loop", args.save)
    elif args.tune:
        common.finish(tune(args.device, D=args.D), args.device, "attention tiles", args.save)
    else:
        common.finish(run(args.device, quick=not args.full), args.device, "attention", args.save)


if __name__ == "__main__":
    main()

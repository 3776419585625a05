"""Benchmark: fused output projection + cross-entropy / softmax against materialised logits.

Providers (fwd+bwd of the mean loss, gradients for h, W, b):
  fused    ``lorafast.ops._linear_ce.linear_cross_entropy`` (Triton on CUDA, chunked torch on CPU)
  eager    ``F.cross_entropy(F.linear(h, W, b), y)``
  compile  ``torch.compile`` of the eager function (compiled during setup)
  liger    Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA, only when installed)
Softmax (mode "softmax"): ``linear_softmax`` against ``torch.softmax(F.linear(h, W, b), -1)``.

Time: median of ``lorafast.bench.common.time_fn``; TFLOP/s counts the useful work of the
materialised computation (fwd+bwd: 3 GEMMs of 2·N·V·D; softmax: 1 GEMM), GB/s the softmax
output written. Peak memory: ``common.peak_memory`` (CUDA allocator above the inputs; CPU: RSS
growth of a fresh subprocess, one thread). ``python -m lorafast.bench.linear_ce [--full] [--device cuda]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafast.bench import common

FACTORY = "lorafast.bench.linear_ce:setup"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="mean")


def _inputs(N: int, V: int, D: int, dtype: torch.dtype, device: str, bias: bool, grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, generator=g).to(dtype)
    w = (torch.randn(V, D, device=device, generator=g) / D ** 0.5).to(dtype)
    b = torch.randn(V, device=device, generator=g).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), device=device, generator=g)
    y[::7] = -100  # some ignored positions, as with padding
    if grad:
        for t in (h, w, b):
            if t is not None:
                t.requires_grad_()
    return h, w, b, y


def setup(N: int, V: int, D: int, dtype: str = "float32", device: str = "cpu", provider: str = "fused",
          mode: str = "fwd_bwd", bias: bool = True, warm: bool = True) -> Callable[[], Any]:
    """Build one case; the returned zero-argument callable runs it once.

    ``warm``: first run the same provider once on a tiny case (N=8, V<=256), so that one-time
    process costs (loading BLAS/oneDNN kernels, autograd engine threads: ~200 MB of RSS on CPU,
    the same for every provider) are not charged to the measured run.
    """
    from lorafast.ops._linear_ce import linear_cross_entropy, linear_softmax

    if warm and provider != "compile":
        setup(8, min(V, 256), D, dtype, device, provider, mode, bias, warm=False)()

    dt = _DTYPES[dtype]
    if mode == "softmax":
        h, w, b, _ = _inputs(N, V, D, dt, device, bias, grad=False)
        if provider == "fused":
            return lambda: linear_softmax(h, w, b)
        if provider == "eager":
            return lambda: torch.softmax(F.linear(h, w, b), -1)
        raise ValueError(f"unknown softmax provider {provider!r}")

    h, w, b, y = _inputs(N, V, D, dt, device, bias, grad=True)
    params = [t for t in (h, w, b) if t is not None]

    def eager(h, w, b, y):
        return F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)

    if provider == "fused":
        loss_fn = lambda: linear_cross_entropy(h, w, b, y)  # noqa: E731
    elif provider == "eager":
        loss_fn = lambda: eager(h, w, b, y)  # noqa: E731
    elif provider == "compile":
        compiled = torch.compile(eager)
        loss_fn = lambda: compiled(h, w, b, y)  # noqa: E731
    elif provider == "liger":
        liger = _liger_loss()
        if liger is None:
            raise RuntimeError("liger_kernel is not installed")
        loss_fn = lambda: liger(w, h, y, b)  # noqa: E731
    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step():
        for t in params:
            t.grad = None
        loss_fn().backward()

    if provider == "compile":
        step()  # compile outside the measured run
        for t in params:
            t.grad = None
    step.params = params  # type: ignore[attr-defined]
    return step


def _providers(device: str, quick: bool) -> list[str]:
    out = ["fused", "eager"]
    if not (quick and device == "cpu"):
        out.append("compile")  # CPU inductor compile takes a minute: only in the full run there
    if device.startswith("cuda") and _liger_loss() is not None:
        out.append("liger")
    return out


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    """Time and peak memory of each provider, side by side; one record per case."""
    cuda = device.startswith("cuda")
    if cuda:
        dtype = "bfloat16"
        time_shapes = [(16384, 50304, 2048)] if quick else [(16384, V, 2048) for V in (50304, 65536, 131072)]
        mem_shapes = time_shapes
    else:
        dtype = "float32"
        time_shapes = [(1024, 8192, 128)] if quick else [(1024, 8192, 128), (4096, 32768, 128)]
        mem_shapes = [(8192, 32768, 128)]  # the CPU memory goal
    records: list[dict] = []
    # Memory first, while this process is small: on Linux a child's ru_maxrss starts at the
    # parent's high-water mark (kept across fork/exec), which the CPU measurement would inherit.
    for mode in ("fwd_bwd", "softmax"):
        provs = _providers(device, quick) if mode == "fwd_bwd" else ["fused", "eager"]
        for N, V, D in mem_shapes:
            for p in provs:
                kw = dict(N=N, V=V, D=D, dtype=dtype, device=device, provider=p, mode=mode)
                records.append({"op": "linear_cross_entropy" if mode == "fwd_bwd" else "linear_softmax",
                                "provider": p, "mode": mode, "N": N, "V": V, "D": D, "dtype": dtype,
                                "peak_mb": common.peak_memory(FACTORY, kw, device) / 2**20})
    for mode in ("fwd_bwd", "softmax"):
        provs = _providers(device, quick) if mode == "fwd_bwd" else ["fused", "eager"]
        for N, V, D in time_shapes:
            for p in provs:
                kw = dict(N=N, V=V, D=D, dtype=dtype, device=device, provider=p, mode=mode)
                fn = setup(**kw)
                t = common.time_fn(fn, device, grad_to_none=getattr(fn, "params", None))
                del fn
                flops = (6 if mode == "fwd_bwd" else 2) * N * V * D
                rec = next((r for r in records if r["provider"] == p and r["mode"] == mode
                            and (r["N"], r["V"], r["D"]) == (N, V, D)), None)
                if rec is None:
                    rec = {"op": "linear_cross_entropy" if mode == "fwd_bwd" else "linear_softmax",
                           "provider": p, "mode": mode, "N": N, "V": V, "D": D, "dtype": dtype}
                    records.append(rec)
                rec.update(t)
                rec["TFLOP/s"] = flops / t["ms"] / 1e9
                if mode == "softmax":
                    rec["GB/s"] = N * V * torch.finfo(_DTYPES[dtype]).bits / 8 / t["ms"] / 1e6
    # memory ratio fused / eager per (mode, shape): the goal is <= 0.1 for fwd_bwd
    for r in records:
        if r["provider"] != "eager" and r.get("peak_mb") is not None:
            e = [x for x in records if x["provider"] == "eager" and x["mode"] == r["mode"]
                 and (x["N"], x["V"], x["D"]) == (r["N"], r["V"], r["D"]) and x.get("peak_mb")]
            if e:
                r["mem_vs_eager"] = r["peak_mb"] / e[0]["peak_mb"]
    return records


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("linear_ce", __doc__, "all shapes and providers (CPU: adds torch.compile)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch.set_num_threads for the timing runs (0: leave the default); on a "
                        "shared machine, 1 avoids OpenMP barrier stalls that hit the many small ops of the "
                        "chunked path far harder than eager's few large ones")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.finish(run(args.device, quick=not args.full), args.device, "linear_ce", args.save)


if __name__ == "__main__":
    main()

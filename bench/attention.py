"""Benchmark: fused causal attention against SDPA backends and the reference model's math.

Providers (q, k, v are views of one fused qkv tensor [B, T, 3*H*D], as in the model):
  lorafast        ``lorafast.ops._attention.attention`` (impl="auto": Triton on CUDA; on CPU the
                  torch path, or the Triton interpreter when TRITON_INTERPRET=1)
  sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math
                  ``F.scaled_dot_product_attention`` pinned to one backend (CUDA, each if it runs)
  sdpa            ``F.scaled_dot_product_attention`` with its default choice (CPU)
  reference       ``lorafast.reference.CausalSelfAttention.attend``: explicit T x T math (causal)

Modes: fwd, bwd (backward of a stored forward graph), fwd_bwd. FLOPs: 4*B*H*T^2*D for the
forward, halved when causal; backward 2.5x the forward; fwd_bwd 3.5x (the convention of
flash-attention's and Triton's benchmarks). Peak memory: ``common.peak_memory`` (CUDA allocator
above the inputs; CPU: RSS growth of a fresh subprocess).
``python -m lorafast.bench.attention [--full] [--device cuda] [--save FILE]``.

``--tune`` (CUDA) times each kernel of ``lorafast.kernels.attention`` over candidate tiles
(launchers driven directly, other kernels at their shipped tiles) and prints the fastest per
kernel, to re-tune ``_GPU_TILES``; candidates must then still pass the compile gate.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafast.bench import common

FACTORY = "lorafast.bench.attention:setup"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                  "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}
_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    f = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return f * _FLOP_FACTOR[mode]


def _attn_fn(provider: str, causal: bool) -> tuple[Callable, Callable[[], Any]]:
    """(attention function of q, k, v; context manager factory to run it under)."""
    if provider == "lorafast":
        from lorafast.ops._attention import attention

        return (lambda q, k, v: attention(q, k, v, causal=causal)), contextlib.nullcontext
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
    qkv = torch.randn(B, T, 3 * H * D, device=device, generator=g).to(_DTYPES[dtype])
    qkv.requires_grad_(mode != "fwd")
    do = torch.randn(B, H, T, D, device=device, generator=g).to(_DTYPES[dtype])

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
        out = ["lorafast", *_SDPA_BACKENDS]
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
                rec["TFLOP/s"] = flops(B, H, T, D, causal, mode) / t["ms"] / 1e9
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
        if r["provider"] != "lorafast" or "ms" not in r:
            continue
        for other in ("sdpa_cudnn", "sdpa_flash", "sdpa"):
            o = [x for x in records if x["provider"] == other and "ms" in x and all(
                x[k] == r[k] for k in ("mode", "B", "H", "T", "D", "causal", "dtype"))]
            if o:
                r[f"speedup_vs_{other}"] = o[0]["ms"] / r["ms"]
    return records


def _tile_candidates(kind: str) -> list:
    from lorafast.kernels.attention import Tile

    out = []
    for bm in (32, 64, 128):
        for bn in (32, 64, 128):
            if kind in ("fwd", "dq") and bm % bn:
                continue
            if kind == "dkdv" and bn % bm:
                continue
            for w in (4, 8):
                for st in (2, 3):
                    out.append(Tile(bm, bn, w, st))
    return out


def tune(device: str = "cuda", B: int = 4, H: int = 16, T: int = 4096, D: int = 128,
         causal: bool = True, dtype: str = "bfloat16") -> list[dict]:
    """Time every candidate tile of each kernel on one shape; one record per (kernel, tile)."""
    import dataclasses

    from lorafast.kernels import attention as ka

    dt = _DTYPES[dtype]
    qkv = torch.randn(B, T, 3 * H * D, device=device, dtype=dt)
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    do = torch.randn(B, T, H, D, device=device, dtype=dt).transpose(1, 2)
    out = torch.empty_like(do)
    lse = torch.empty(B, H, T, device=device, dtype=torch.float32)
    grads = [torch.empty_like(do) for _ in range(3)]
    scale = D ** -0.5
    shipped = ka.pick_tiles(D, dt, torch.device(device))
    ka.attention_forward(q, k, v, out, lse, causal=causal, scale=scale, tiles=shipped)
    records = []
    for kind in ("fwd", "dkdv", "dq"):
        for tile in _tile_candidates(kind):
            tiles = dataclasses.replace(shipped, **{kind: tile})
            if kind == "fwd":
                fn = lambda: ka.attention_forward(q, k, v, out, lse, causal=causal, scale=scale,  # noqa: E731
                                                  tiles=tiles)
            else:
                dq, dk, dv = (grads[0], None, None) if kind == "dq" else (None, grads[1], grads[2])
                fn = lambda: ka.attention_backward(do, q, k, v, out, lse, dq, dk, dv,  # noqa: E731
                                                   causal=causal, scale=scale, tiles=tiles)
            rec = {"kernel": kind, "tile": f"{tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages}",
                   "shipped": tile == getattr(shipped, kind)}
            try:
                rec.update(common.time_fn(fn, device))
            except Exception as e:  # noqa: BLE001 - out of shared memory / registers: skip
                rec["error"] = type(e).__name__
            records.append(rec)
        ok = [r for r in records if r["kernel"] == kind and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            best["best"] = True
    return records


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("attention", __doc__, "all sequence lengths and head dims")
    p.add_argument("--tune", action="store_true", help="time candidate tiles per kernel (CUDA)")
    p.add_argument("--D", type=int, default=128, help="head dim for --tune")
    args = p.parse_args(argv)
    if args.tune:
        common.finish(tune(args.device, D=args.D), args.device, "attention tiles", args.save)
    else:
        common.finish(run(args.device, quick=not args.full), args.device, "attention", args.save)


if __name__ == "__main__":
    main()

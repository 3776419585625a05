"""Benchmark: fused output projection + cross-entropy / softmax against materialised logits.

Providers (fwd+bwd of the mean loss, gradients for h, W, b):
  fused         ``lorafast.ops._linear_ce.linear_cross_entropy`` (Triton on CUDA, chunked torch on CPU)
  fused_filter  the same with ``filter_eps = finfo(dtype).eps / 32`` (Cut Cross-Entropy's "auto")
  eager         ``F.cross_entropy(F.linear(h, W, b), y)``
  compile       ``torch.compile`` of the eager function (compiled during setup)
  liger         Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA, only when installed)
Softmax (mode "softmax"): ``linear_softmax`` against ``torch.softmax(F.linear(h, W, b), -1)``.

Logits: "random" (h, W Gaussian: a flat softmax, nothing to filter) or "peaked", a synthetic
stand-in for a trained LM head, not a trained model: targets drawn from a Zipf(1.1) unigram law
over a random permutation of the vocabulary, bias = log-frequency, each row of h pulled towards
its target's row of W (+8 nats on the target logit).

Time: median of ``lorafast.bench.common.time_fn``. Roofline fields (``common.roofline``): the
FLOPs each provider executes (eager, compile, liger: 3 GEMMs of 2·N·V·D; fused: 4, the logits
being recomputed in the backward; softmax: eager 1, fused 2) and a lower bound of the bytes it
moves through HBM (``_hbm_bytes``); ``useful_TFLOP/s`` counts the 3 GEMMs of the materialised
computation for every provider, so it compares them on the same work. Peak memory:
``common.peak_memory`` (CUDA allocator above the inputs; CPU: RSS growth of a fresh subprocess,
one thread). ``python -m lorafast.bench.linear_ce [--full] [--device cuda]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from lorafast.bench import common
from lorafast.config import DTYPES

FACTORY = "lorafast.bench.linear_ce:setup"


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="mean")


def _inputs(N: int, V: int, D: int, dtype: torch.dtype, device: str, bias: bool, grad: bool,
            logits: str = "random"):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, D, device=device, generator=g)
    w = torch.randn(V, D, device=device, generator=g) / D ** 0.5
    b = torch.randn(V, device=device, generator=g) if bias else None
    if logits == "peaked":
        # Zipf(1.1) unigram frequencies over a random permutation of the vocabulary; the bias is
        # the log-frequency; each h row gains 8 * W[y] (|W_v|^2 ~ 1: about +8 on the target logit)
        perm = torch.randperm(V, device=device, generator=g)
        freq = torch.arange(1, V + 1, device=device, dtype=torch.float32) ** -1.1
        freq /= freq.sum()
        y = perm[torch.multinomial(freq, N, replacement=True, generator=g)]
        b = torch.empty(V, device=device).index_copy_(0, perm, freq.log())
        h = h + 8.0 * w[y]
    elif logits == "random":
        y = torch.randint(0, V, (N,), device=device, generator=g)
    else:
        raise ValueError(f"unknown logits {logits!r}")
    y[::7] = -100  # some ignored positions, as with padding
    h, w, b = h.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
    if grad:
        for t in (h, w, b):
            if t is not None:
                t.requires_grad_()
    return h, w, b, y


def setup(N: int, V: int, D: int, dtype: str = "float32", device: str = "cpu", provider: str = "fused",
          mode: str = "fwd_bwd", bias: bool = True, warm: bool = True, logits: str = "random") -> Callable[[], Any]:
    """Build one case; the returned zero-argument callable runs it once.

    ``warm``: first run the same provider once on a tiny case (N=8, V<=256), so that one-time
    process costs (loading BLAS/oneDNN kernels, autograd engine threads: ~200 MB of RSS on CPU,
    the same for every provider) are not charged to the measured run.
    """
    from lorafast.ops._linear_ce import linear_cross_entropy, linear_softmax

    if warm and provider != "compile":
        setup(8, min(V, 256), D, dtype, device, provider, mode, bias, warm=False)()

    dt = DTYPES[dtype]
    if mode == "softmax":
        h, w, b, _ = _inputs(N, V, D, dt, device, bias, grad=False)
        if provider == "fused":
            return lambda: linear_softmax(h, w, b)
        if provider == "eager":
            return lambda: torch.softmax(F.linear(h, w, b), -1)
        raise ValueError(f"unknown softmax provider {provider!r}")

    h, w, b, y = _inputs(N, V, D, dt, device, bias, grad=True, logits=logits)
    params = [t for t in (h, w, b) if t is not None]

    def eager(h, w, b, y):
        return F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)

    if provider == "fused":
        loss_fn = lambda: linear_cross_entropy(h, w, b, y)  # noqa: E731
    elif provider == "fused_filter":
        eps = torch.finfo(dt).eps / 32
        loss_fn = lambda: linear_cross_entropy(h, w, b, y, filter_eps=eps)  # noqa: E731
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


def _providers(device: str, quick: bool, logits: str = "random") -> list[str]:
    if logits == "peaked":
        return ["fused", "fused_filter", "eager"]
    return ["fused", "eager", "compile", "liger"]  # the last two may be skipped: unavailable()


def unavailable(provider: str, device: str, quick: bool) -> str | None:
    """Why ``provider`` is not run on ``device`` (one line), or None when it runs."""
    if provider == "compile":
        why = common.compile_unavailable(device)
        if why:
            return why
        if quick and not device.startswith("cuda"):
            return "CPU: inductor compiles for about a minute here; only in full runs (--full)"
    if provider == "liger":
        if not device.startswith("cuda"):
            return "Liger-Kernel's fused linear cross-entropy runs on CUDA only"
        if _liger_loss() is None:
            return "liger_kernel is not installed (pip install liger-kernel)"
    return None


def _hbm_bytes(provider: str, mode: str, N: int, V: int, D: int, elem: int) -> float:
    """A lower bound of the bytes a provider moves through device memory in one call.

    Every provider reads h and W and writes dh and dW (fwd_bwd: 2 (N + V) D elements; softmax:
    reads h, W, writes the N x V output). Materialised logits and their gradient (eager,
    compile) are counted written once and read once each (4 N V elements; eager moves more).
    Liger: its logit chunks, each written once and read once (2 N V). fused (dense backward):
    h and W read by the forward too, the dz chunks written once and read by two GEMMs (3 N V),
    and per vocabulary chunk the rows of h read twice and the fp32 dh read and written.
    """
    io = (2 * N * D + 2 * V * D) * elem
    if mode == "softmax":
        out = N * V * elem + (N * D + V * D) * elem
        return out + (N * D + V * D) * elem if provider == "fused" else out + 2 * N * V * elem
    if provider in ("eager", "compile"):
        return io + 4 * N * V * elem
    if provider == "liger":
        return io + 2 * N * V * elem
    from lorafast.kernels.linear_ce import _dz_chunking

    _, cols = _dz_chunking(N, V, D, 128)
    chunks = -(-V // cols)
    return io + (N * D + V * D) * elem + 3 * N * V * elem + chunks * (2 * N * D * elem + 8 * N * D)


def _flops(provider: str, mode: str, N: int, V: int, D: int) -> float:
    """FLOPs executed: GEMMs of 2 N V D each (fused recomputes the logits once more)."""
    if mode == "softmax":
        return (4 if provider == "fused" else 2) * N * V * D
    return (8 if provider.startswith("fused") else 6) * N * V * D


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    """Time and peak memory of each provider, side by side; one record per case."""
    cuda = device.startswith("cuda")
    if cuda:
        dtype = "bfloat16"
        time_shapes = [(16384, 50304, 2048)] if quick else [(16384, V, 2048) for V in (50304, 65536, 131072)]
        mem_shapes = time_shapes
        peaked_shapes = [(16384, 50304, 2048)] if quick else [(16384, V, 2048) for V in (50304, 131072)]
    else:
        dtype = "float32"
        time_shapes = [(1024, 8192, 128)] if quick else [(1024, 8192, 128), (4096, 32768, 128)]
        mem_shapes = [(8192, 32768, 128)]  # the CPU memory goal
        peaked_shapes = []  # the CPU path ignores filter_eps
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    cases = [(m, "random", s) for m in ("fwd_bwd", "softmax") for s in mem_shapes]
    cases += [("fwd_bwd", "peaked", s) for s in peaked_shapes]
    tcases = [(m, "random", s) for m in ("fwd_bwd", "softmax") for s in time_shapes]
    tcases += [("fwd_bwd", "peaked", s) for s in peaked_shapes]

    def provs(mode, logits):
        return _providers(device, quick, logits) if mode == "fwd_bwd" else ["fused", "eager"]

    def record(p, mode, logits, N, V, D):
        for r in records:
            if (r["provider"], r["mode"], r["logits"], r["N"], r["V"], r["D"]) == (p, mode, logits, N, V, D):
                return r
        r = {"op": "linear_cross_entropy" if mode == "fwd_bwd" else "linear_softmax", "provider": p, "mode": mode,
             "logits": logits, "N": N, "V": V, "D": D, "dtype": dtype}
        records.append(r)
        return r

    records: list[dict] = []
    # Memory first, while this process is small: on Linux a child's ru_maxrss starts at the
    # parent's high-water mark (kept across fork/exec), which the CPU measurement would inherit.
    for mode, logits, (N, V, D) in cases:
        for p in provs(mode, logits):
            why = unavailable(p, device, quick)
            if why:
                record(p, mode, logits, N, V, D)["skipped"] = why
                continue
            kw = dict(N=N, V=V, D=D, dtype=dtype, device=device, provider=p, mode=mode, logits=logits)
            record(p, mode, logits, N, V, D)["peak_mb"] = common.peak_memory(FACTORY, kw, device) / 2**20
    for mode, logits, (N, V, D) in tcases:
        for p in provs(mode, logits):
            if unavailable(p, device, quick):
                record(p, mode, logits, N, V, D)["skipped"] = unavailable(p, device, quick)
                continue
            kw = dict(N=N, V=V, D=D, dtype=dtype, device=device, provider=p, mode=mode, logits=logits)
            fn = setup(**kw)
            t = common.time_fn(fn, device, grad_to_none=getattr(fn, "params", None))
            del fn
            rec = record(p, mode, logits, N, V, D)
            rec.update(t)
            rec.update(common.roofline(_flops(p, mode, N, V, D), _hbm_bytes(p, mode, N, V, D, elem), t["ms"], device))
            rec["useful_TFLOP/s"] = (6 if mode == "fwd_bwd" else 2) * N * V * D / t["ms"] / 1e9
    # ratios to eager per (mode, logits, shape): the goals are memory <= 0.1x and, on
    # random logits, time <= 1.1x eager and <= Liger's; with the filter on peaked ones <= 0.8x
    for r in records:
        e = [x for x in records if x["provider"] == "eager" and (x["mode"], x["logits"], x["N"], x["V"], x["D"])
             == (r["mode"], r["logits"], r["N"], r["V"], r["D"])]
        if r["provider"] == "eager" or not e:
            continue
        if r.get("peak_mb") is not None and e[0].get("peak_mb"):
            r["mem_vs_eager"] = r["peak_mb"] / e[0]["peak_mb"]
        if r.get("ms") and e[0].get("ms"):
            r["time_vs_eager"] = r["ms"] / e[0]["ms"]
    return records


def filter_survival(N: int, V: int, D: int, logits: str = "peaked", dtype: str = "bfloat16", device: str = "cpu",
                    block: int = 128) -> dict:
    """Share of the filtered backward's ``block x block`` tiles that survive ``filter_eps =
    finfo(dtype).eps / 32`` on this benchmark's inputs (fp32 math), with the vocabulary sorted as
    the kernel sorts it (``_vocab_order``) and unsorted. No GPU needed; it counts work, not time."""
    from lorafast.kernels.linear_ce import _vocab_order

    eps = torch.finfo(DTYPES[dtype]).eps / 32
    h, w, b, y = _inputs(N, V, D, torch.float32, device, True, grad=False, logits=logits)
    valid = y != -100
    dz = torch.softmax(torch.addmm(b, h, w.t()), -1)
    p_target = dz[valid, y[valid]]
    dz[valid, y[valid]] -= 1
    dz[~valid] = 0
    dz.abs_()
    order = _vocab_order(h, w, b, valid.float())
    nt, vt = -(-N // block), -(-V // block)

    def kept(a: torch.Tensor) -> float:
        pad = torch.zeros(nt * block, vt * block, device=device)
        pad[:N, :V] = a
        return float((pad.view(nt, block, vt, block).amax(dim=(1, 3)) >= eps).float().mean())

    return {"logits": logits, "N": N, "V": V, "D": D, "eps": eps, "tiles_kept_sorted": kept(dz[:, order]),
            "tiles_kept_unsorted": kept(dz), "median_p_target": float(p_target.median())}


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("linear_ce", __doc__, "all shapes and providers (CPU: adds torch.compile)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch.set_num_threads for the timing runs (0: leave the default); on a "
                        "shared machine, 1 avoids OpenMP barrier stalls that hit the many small ops of the "
                        "chunked path far harder than eager's few large ones")
    p.add_argument("--survival", nargs=3, type=int, metavar=("N", "V", "D"),
                   help="instead of timing: the share of backward tiles filter_eps keeps on peaked and "
                        "random logits of this shape (fp32 math, any device)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.survival:
        common.finish([filter_survival(*args.survival, logits=k, device=args.device) for k in ("peaked", "random")],
                      args.device, "linear_ce filter survival", args.save)
        return
    common.finish(run(args.device, quick=not args.full), args.device, "linear_ce", args.save)


if __name__ == "__main__":
    main()

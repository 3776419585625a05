"""Benchmark: one-launch Philox re-randomisation against a per-tensor torch.nn.init loop and a copy.

Cases
  gpt2_local  the block parameters of a GPT-2-small-shaped model (12 blocks, width 768, FFN 3072:
              qkv, attention output, FFN in/out weights (kaiming-uniform) and their biases
              (normal(0, 0.02)), LayerNorm weights/biases (normal)) = 96 tensors, 85M elements —
              the largest local set a preset can ask for; on CPU a 2-block width-256 model.
  large       one large tensor (GPU: 2^26 elements = 256 MiB fp32, --full adds 2^22 and 2^28;
              CPU: 2^20, --full 2^22), normal or uniform law.
Providers
  lorafast    ``lorafast.ops._rerandomize.rerandomize_`` with impl="auto" (the one-launch Triton
              kernel on CUDA; the C++ extension on CPU); ``lorafast_r7``: 7 Philox rounds.
  numpy       (CPU) the same draw on the numpy path (``LORAFAST_CPU_EXT=0``), the extension's fallback.
  torch_init  a Python loop of ``torch.nn.init.kaiming_uniform_`` / ``normal_`` / ``uniform_`` per
              tensor (the launch-per-tensor baseline; draws are not reproducible across GPUs).
  copy        a device-to-device ``copy_`` of one flat buffer holding the same number of bytes.
Every record carries the roofline fields of ``lorafast.bench.common.roofline``: ``bytes`` moved
(written bytes for a fill, read + written bytes for the copy), ``flops`` (the fp32 operations of
the spec per element, ``FLOPS_PER_ELEMENT``: the affine map, plus Box-Muller for normals; the
integer Philox is not counted), GB/s, TFLOP/s and, on CUDA, the fractions of the H200 peaks.
``vs_copy`` is GB/s over the copy's GB/s, ``speedup_vs_init`` the per-tensor loop's time over
lorafast's (goal: >= 5 on gpt2_local). Goals of issue 9, on H200, for 256 MiB of fp32 (``large``,
2^26 elements; the records of that case carry ``goal_vs_copy``): uniform >= 0.9 and normal >= 0.6
of the copy's bandwidth. The static side of the same kernel (SASS instructions per element on
each law's hot path) is in ``python -m lorafast.compile_gate --filter rerandomize``.
``python -m lorafast.bench.rerandomize [--device cuda] [--full] [--save FILE]``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch

from lorafast.bench import common

FACTORY = "lorafast.bench.rerandomize:setup"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# fp32 operations per element of the draw (lorafast.philox, counted from its operation sequence; a
# division or square root counts 1): the affine map scale * base + shift (2), and for a normal
# half of one Box-Muller pair: u1 1, log 19, -2 log 1, sqrt 1, sin/cos 19, r cos / r sin 2 = 43 / 2
FLOPS_PER_ELEMENT = {"uniform": 2.0, "kaiming": 2.0, "normal": 2.0 + 43 / 2}
GOAL_NUMEL = 1 << 26                                   # 256 MiB of fp32
GOAL_VS_COPY = {"uniform": 0.9, "normal": 0.6}         # issue 9, H200, fp32


def gpt2_local_shapes(n_layer: int = 12, d: int = 768, ffn: int = 3072) -> list[tuple[tuple[int, ...], str]]:
    """(shape, law name) of every block parameter of a GPT-2-shaped model."""
    out = []
    for _ in range(n_layer):
        out += [((d,), "normal"), ((d,), "normal"),                       # ln_1 weight, bias
                ((3 * d, d), "kaiming"), ((3 * d,), "normal"),            # qkv
                ((d, d), "kaiming"), ((d,), "normal"),                    # attention output
                ((d,), "normal"), ((d,), "normal"),                       # ln_2
                ((ffn, d), "kaiming"), ((ffn,), "normal"),                # FFN in
                ((d, ffn), "kaiming"), ((d,), "normal")]                  # FFN out
    return out


def _case(case: str, device: str, n_layer: int, d: int, numel: int, law: str):
    if case == "gpt2_local":
        return gpt2_local_shapes(n_layer, d, 4 * d)
    if case == "large":
        return [((numel,), law)]
    raise ValueError(f"unknown case {case!r}")


def setup(case: str = "gpt2_local", provider: str = "lorafast", dtype: str = "float32", device: str = "cpu",
          n_layer: int = 12, d: int = 768, numel: int = 1 << 22, law: str = "normal",
          warm: bool = True) -> Callable[[], Any]:
    """Build one case; the returned zero-argument callable runs it once (the tensors are reused)."""
    from lorafast.init_laws import KaimingUniform, Normal, Uniform
    from lorafast.ops._rerandomize import rerandomize_

    dt = _DTYPES[dtype]
    spec = _case(case, device, n_layer, d, numel, law)
    tensors = [torch.empty(shape, dtype=dt, device=device) for shape, _ in spec]
    if provider == "copy":
        total = sum(t.numel() for t in tensors)
        del tensors
        src = torch.zeros(total, dtype=dt, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    laws = {"normal": Normal(0.0, 0.02), "kaiming": KaimingUniform(), "uniform": Uniform(-0.1, 0.1)}
    if provider in ("lorafast", "lorafast_r7", "numpy"):
        from lorafast import _cpu_ext

        inits = [laws[name] for _, name in spec]
        rounds = 7 if provider == "lorafast_r7" else 10
        state = {"step": 0}

        def fill():
            state["step"] += 1
            with _cpu_ext.disabled() if provider == "numpy" else contextlib.nullcontext():
                rerandomize_(tensors, seed=0, step=state["step"], init=inits, rounds=rounds)

        if warm:
            fill()  # compile the kernel / build the cached metadata table outside the measured runs
        return fill
    if provider == "torch_init":
        def loop():
            with torch.no_grad():
                for t, (_, name) in zip(tensors, spec):
                    if name == "kaiming":
                        torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
                    elif name == "normal":
                        torch.nn.init.normal_(t, 0.0, 0.02)
                    else:
                        torch.nn.init.uniform_(t, -0.1, 0.1)
        return loop
    raise ValueError(f"unknown provider {provider!r}")


def _cases(device: str, quick: bool) -> list[dict]:
    if device.startswith("cuda"):
        out = [dict(case="gpt2_local", dtype=dt) for dt in ("float32", "bfloat16")]
        sizes = [GOAL_NUMEL] if quick else [1 << 22, GOAL_NUMEL, 1 << 28]   # 16 MiB (L2) .. 1 GiB fp32
        out += [dict(case="large", numel=n, law=lw, dtype=dt) for n in sizes
                for lw in ("uniform", "normal") for dt in ("float32", "bfloat16")]
        return out
    out = [dict(case="gpt2_local", n_layer=2, d=256, dtype="float32")]
    out += [dict(case="large", numel=1 << 20 if quick else 1 << 22, law=lw, dtype="float32")
            for lw in ("uniform", "normal")]
    if not quick:
        out.insert(1, dict(case="gpt2_local", n_layer=12, d=768, dtype="float32"))
    return out


def run(device: str = "cpu", quick: bool = True) -> list[dict]:
    """Time of each provider per case, GB/s, ratio to the copy and speed-up over the init loop."""
    cuda = device.startswith("cuda")
    providers = ["lorafast", "lorafast_r7", "torch_init", "copy"] if cuda else ["lorafast", "numpy", "torch_init", "copy"]
    records: list[dict] = []
    for case in _cases(device, quick):
        spec = _case(case["case"], device, case.get("n_layer", 12), case.get("d", 768), case.get("numel", 0),
                     case.get("law", "normal"))
        numel = sum(math.prod(s) for s, _ in spec)
        nbytes = numel * _DTYPES[case["dtype"]].itemsize
        group: list[dict] = []
        for p in providers:
            kw = dict(case, provider=p, device=device)
            fn = setup(**kw)
            t = common.time_fn(fn, device)
            moved = 2 * nbytes if p == "copy" else nbytes
            flops = 0.0 if p == "copy" else sum(math.prod(shape) * FLOPS_PER_ELEMENT[law] for shape, law in spec)
            rec = {"op": "rerandomize_", "provider": p, "mode": "fill", **case, "tensors": len(spec),
                   "numel": numel, **t, **common.roofline(flops, moved, t["ms"], device)}
            if p == "lorafast" and (cuda or case["case"] == "gpt2_local"):
                rec["peak_mb"] = common.peak_memory(FACTORY, kw, device) / 2**20
            group.append(rec)
            del fn
        copy = next(r for r in group if r["provider"] == "copy")
        init = next(r for r in group if r["provider"] == "torch_init")
        numpy_ = next((r for r in group if r["provider"] == "numpy"), None)
        for r in group:
            if r["provider"].startswith("lorafast"):
                r["vs_copy"] = r["GB/s"] / copy["GB/s"]
                r["speedup_vs_init"] = init["ms"] / r["ms"]
                if (case["case"] == "large" and case["numel"] == GOAL_NUMEL and case["dtype"] == "float32"
                        and r["provider"] == "lorafast"):
                    r["goal_vs_copy"] = GOAL_VS_COPY[case["law"]]
                if numpy_:
                    r["speedup_vs_numpy"] = numpy_["ms"] / r["ms"]
        records += group
    return records


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("rerandomize", __doc__, "more sizes (CPU: adds the full GPT-2-small local set)")
    args = p.parse_args(argv)
    common.finish(run(args.device, quick=not args.full), args.device, "rerandomize_", args.save)


if __name__ == "__main__":
    main()

"""End-to-end training step: the accelerated model against the baselines a PyTorch user would pick.

One step = :func:`lorafast.train.train_step`, the function the loop of ``lorafast train`` runs:
redraw the local tensors, loss, backward, AdamW update, no host sync. Providers:

* ``eager``: ``lorafast.reference.LoRA`` as written (explicit attention math);
* ``eager-sdpa``: the reference with ``scaled_dot_product_attention`` in place of the explicit math;
* ``compile``: ``torch.compile`` of the reference (the model as written, compiled; each step runs
  its compiled forward ``model(ids, targets)``, which returns the loss);
* ``compile-sdpa``: ``torch.compile`` of ``eager-sdpa`` (the baseline of issue 6);
* ``hf-gpt2``: a ``transformers`` GPT-2 of the same vocabulary, width, depth, heads, MLP width and
  context, built from a ``GPT2Config`` (:func:`lorafast.gpt2.gpt2_like`; nothing is downloaded;
  the optional ``[compare]`` extra). It has no local tensors: every parameter trains, so its
  AdamW step updates more parameters than the LoRA models' do under a preset with local ones;
* ``lorafast``: ``lorafast.LoRA`` (fused kernels on CUDA; their PyTorch paths on CPU);
* ``compile-lorafast``: ``torch.compile(lorafast.LoRA(...))``: the lorafast ops are single nodes
  of one graph and Inductor fuses everything around them (layer norms, MLP, residuals); the
  issue 9 goal sets it against ``compile`` (``speedup_vs_compile``).

A provider that cannot run here is listed with a one-line reason (``skipped``): transformers not
installed; on CPU, ``torch.compile`` without a C++ compiler, and the compiled providers outside
``--full`` (compiling takes about a minute per model on a 2-core CPU).

Reported: ms per step with its spread, tokens/s, peak memory above the model and optimizer state
(not measured for compiled providers on CPU: the first step, which the CPU memory run measures,
includes the compilation). GPU shape (``--full``): GPT-2 small, 12 layers, width 768, 12 heads,
vocabulary 50257, T = 1024, bf16.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorafast import reference
from lorafast.bench import common
from lorafast.config import DEFAULT_PRESET, DTYPES, ModelConfig

FACTORY = "lorafast.bench.model:setup"
PROVIDERS = ("eager", "eager-sdpa", "compile", "compile-sdpa", "hf-gpt2", "lorafast", "compile-lorafast")


class SDPAAttention(reference.CausalSelfAttention):
    """The reference's attention with ``scaled_dot_product_attention`` for the explicit math."""

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SDPAReference(reference.LoRA):
    """The reference model on SDPA attention: the baseline a PyTorch user would write."""

    attention_class = SDPAAttention


def unavailable(provider: str, device: str = "cpu", quick: bool = True) -> str | None:
    """Why ``provider`` is not run on ``device`` (one line), or None when it runs."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; known: {list(PROVIDERS)}")
    if provider.startswith("compile"):
        why = common.compile_unavailable(device)
        if why:
            return why
        if quick and not device.startswith("cuda"):
            return ("CPU: compiling takes about a minute per model here; only in full runs "
                    "(lorafast bench --full; LORAFAST_BENCH_FULL=1)")
    if provider == "hf-gpt2":
        from lorafast.gpt2 import INSTALL_HINT, transformers_available

        if not transformers_available():
            return INSTALL_HINT
    return None


def _model(provider: str, cfg: ModelConfig) -> torch.nn.Module:
    if provider in ("eager", "compile"):
        return reference.LoRA.from_config(cfg)
    if provider in ("eager-sdpa", "compile-sdpa"):
        return SDPAReference.from_config(cfg)
    if provider == "hf-gpt2":
        from lorafast.gpt2 import gpt2_like

        return gpt2_like(cfg)
    if provider in ("lorafast", "compile-lorafast"):
        import lorafast

        return lorafast.LoRA.from_config(cfg)
    raise ValueError(f"unknown provider {provider!r}; known: {list(PROVIDERS)}")


def setup(provider: str, V: int, E: int, H: int, L: int, B: int, T: int, dtype: str = "float32",
          device: str = "cpu", preset: str = DEFAULT_PRESET, warm: bool = True):
    """One training step of ``provider`` on a [B, T] batch, as a zero-argument callable.

    Raises :class:`lorafast.bench.common.Unavailable` when the provider cannot run here (the
    reason of :func:`unavailable`, outside the ``quick`` policy), ValueError for an unknown one.
    ``warm``: run one step first (compiles, optimizer state). The memory run passes False, so that
    the measured step's activations, gradients and optimizer state are new allocations."""
    from lorafast.train import train_step

    why = unavailable(provider, device, quick=False)
    if why:
        raise common.Unavailable(why)
    cfg = ModelConfig(vocab_size=V, embedding_dim=E, hidden_dim=H, num_layers=L, max_seq_len=T, local=preset)
    model = _model(provider, cfg).to(device=device, dtype=DTYPES[dtype])
    if provider.startswith("compile"):
        model = torch.compile(model)  # train_step runs the compiled forward model(ids, targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.startswith("cuda"))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, V, (B, T + 1), generator=gen).to(device)  # in range by construction: no validation needed
    state = {"step": 0}

    def step() -> None:
        train_step(model, opt, x[:, :-1], x[:, 1:], state["step"], 1e-4)
        state["step"] += 1

    if warm:
        step()
    return step


def shape(device: str = "cpu", quick: bool = True) -> dict[str, Any]:
    """The model and batch of the suite: GPT-2 small on CUDA, the default ``lorafast train``
    model (4 blocks, width 128, bytes, 16 x 128 tokens) on CPU."""
    if device.startswith("cuda"):
        return dict(V=50257, E=768, H=768, L=12, B=4 if quick else 8, T=512 if quick else 1024, dtype="bfloat16")
    return dict(V=256, E=128, H=128, L=4, B=16, T=128, dtype="float32")


def cases(device: str = "cpu", quick: bool = True) -> list[dict[str, Any]]:
    """``setup`` keyword arguments of every case, one per provider (including the ones that
    :func:`unavailable` skips: callers list them with the reason)."""
    return [dict(provider=p, device=device, **shape(device, quick)) for p in PROVIDERS]


def run(device: str = "cpu", quick: bool = True) -> list[dict[str, Any]]:
    """Time, tokens/s and peak memory of one training step per provider; one record each."""
    cuda = device.startswith("cuda")
    records = []
    for kwargs in cases(device, quick):
        provider = kwargs["provider"]
        rec: dict[str, Any] = {"op": "train-step", "provider": provider,
                               **{k: kwargs[k] for k in ("V", "H", "L", "B", "T", "dtype")}}
        why = unavailable(provider, device, quick)
        if why:
            records.append({**rec, "skipped": why})
            continue
        try:
            fn = setup(**kwargs)
            # CUDA: do_bench's rep is milliseconds of repetitions: 1 s is 5-10 GPT-2-small steps
            t = common.time_fn(fn, device, rep=None if not cuda else 1000)
            del fn
            mem = None
            if cuda or not provider.startswith("compile"):
                mem = common.peak_memory(FACTORY, {**kwargs, "warm": cuda}, device) / 2**20
        except common.Unavailable as e:
            records.append({**rec, "skipped": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - a baseline that fails here is reported, not fatal
            records.append({**rec, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        tokens = kwargs["B"] * kwargs["T"]
        records.append({**rec, **t, "tokens_per_s": tokens / t["ms"] * 1e3, "peak_mb": mem})
    base = next((r for r in records if r.get("provider") == "eager" and "ms" in r), None)
    compiled = next((r for r in records if r.get("provider") == "compile" and "ms" in r), None)
    for r in records:
        if base and "ms" in r:
            r["speedup_vs_eager"] = base["ms"] / r["ms"]
            r["mem_vs_eager"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] and r["peak_mb"] else None
        if compiled and "ms" in r:
            r["speedup_vs_compile"] = compiled["ms"] / r["ms"]
    return records


def main(argv: list[str] | None = None) -> None:
    p = common.suite_parser("model", __doc__, "GPT-2 small at T=1024 (CUDA); on CPU adds the torch.compile baselines")
    args = p.parse_args(argv)
    common.finish(run(args.device, quick=not args.full), args.device, "training step", args.save)


if __name__ == "__main__":
    main()

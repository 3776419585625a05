"""End-to-end training step: the accelerated model against the reference.

One step = :func:`lorafast.train.train_step`, the function the loop of ``lorafast train`` runs:
redraw the local tensors, loss, backward, AdamW update, no host sync. Providers:

* ``eager``: ``lorafast.reference.LoRA`` as written (explicit attention math);
* ``eager-sdpa``: the reference with ``scaled_dot_product_attention`` in place of the explicit math;
* ``compile-sdpa``: ``torch.compile`` of ``eager-sdpa``'s loss (CUDA only: the baseline of issue 6);
* ``lorafast``: ``lorafast.LoRA`` (fused kernels on CUDA; their PyTorch paths on CPU).

Reported: ms per step, tokens/s, peak memory above the model and optimizer state. GPU shape
(``--full``): GPT-2 small, 12 layers, width 768, 12 heads, vocabulary 50257, T = 1024, bf16.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorafast import reference
from lorafast.bench.common import peak_memory, time_fn
from lorafast.config import DEFAULT_PRESET, DTYPES


class SDPAAttention(reference.CausalSelfAttention):
    """The reference's attention with ``scaled_dot_product_attention`` for the explicit math."""

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SDPAReference(reference.LoRA):
    """The reference model on SDPA attention: the baseline a PyTorch user would write."""

    attention_class = SDPAAttention


def setup(provider: str, V: int, E: int, H: int, L: int, B: int, T: int, dtype: str = "float32",
          device: str = "cpu", preset: str = DEFAULT_PRESET, warm: bool = True):
    """One training step of ``provider`` on a [B, T] batch, as a zero-argument callable.

    ``warm``: run one step first (compiles, optimizer state). The memory run passes False, so that
    the measured step's activations, gradients and optimizer state are new allocations."""
    import lorafast
    from lorafast.train import train_step

    kw = dict(vocab_size=V, embedding_dim=E, hidden_dim=H, num_layers=L, max_seq_len=T, local=preset)
    classes = {"eager": reference.LoRA, "eager-sdpa": SDPAReference, "compile-sdpa": SDPAReference,
               "lorafast": lorafast.LoRA}
    if provider not in classes:
        raise ValueError(f"unknown provider {provider!r}; known: {sorted(classes)}")
    model = classes[provider](**kw).to(device=device, dtype=DTYPES[dtype])
    if provider == "compile-sdpa":
        model.loss_unchecked = torch.compile(model.loss_unchecked)
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


def run(device: str = "cpu", quick: bool = True) -> list[dict[str, Any]]:
    if device.startswith("cuda"):
        shape = dict(V=50257, E=768, H=768, L=12, B=8 if not quick else 4, T=1024 if not quick else 512, dtype="bfloat16")
        providers = ["eager", "compile-sdpa", "lorafast"]
    else:
        shape = dict(V=256, E=128, H=128, L=4, B=16, T=128, dtype="float32")
        providers = ["eager", "eager-sdpa", "lorafast"]
    records = []
    for provider in providers:
        kwargs = dict(provider=provider, device=device, **shape)
        try:
            fn = setup(**kwargs)
            t = time_fn(fn, device, rep=None if device == "cpu" else 20)
            mem = peak_memory("lorafast.bench.model:setup", {**kwargs, "warm": device.startswith("cuda")}, device)
        except Exception as e:  # a baseline that cannot run here is reported, not fatal
            records.append({"op": "train-step", "provider": provider, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        tokens = shape["B"] * shape["T"]
        records.append({"op": "train-step", "provider": provider, **{k: shape[k] for k in ("V", "H", "L", "B", "T", "dtype")},
                        "ms": t["ms"], "tokens_per_s": tokens / t["ms"] * 1e3, "peak_mb": mem / 2**20})
    base = next((r for r in records if r.get("provider") == "eager" and "ms" in r), None)
    for r in records:
        if base and "ms" in r:
            r["speedup_vs_eager"] = base["ms"] / r["ms"]
            r["mem_vs_eager"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
    return records


if __name__ == "__main__":
    from lorafast.bench.common import report

    report(run("cuda" if torch.cuda.is_available() else "cpu"), "training step")

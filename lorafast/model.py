"""The accelerated model: :class:`lorafast.reference.LoRA` with fused ops underneath.

Same constructor (plus ``impl``), config, parameter names, ``state_dict`` keys and return values
as the reference (it subclasses it and overrides only the computations), so checkpoints load in
both directions and ``from lorafast import LoRA`` is a drop-in switch. What changes:

============================  ==========================================================
attention                     ``lorafast.ops.attention`` (FlashAttention-2-style Triton
                              kernels; q, k, v stay strided views of the fused qkv output;
                              ``generate``'s KV-cache steps too, bottom-right causal)
``loss``                      ``lorafast.ops.linear_cross_entropy``: no N x V logits
``probs`` and ``generate``    ``lorafast.ops.linear_softmax`` (``generate``: last position
                              only, with a KV cache)
``redraw_local_``             ``lorafast.ops.rerandomize_``: every local tensor in one launch
============================  ==========================================================

Every op runs with the model's ``impl`` ("auto" | "triton" | "torch"): "auto" takes the Triton
kernels where :func:`lorafast.ops.select_backend` allows (CUDA tensors or
``TRITON_INTERPRET=1``; head dims 16..128 for attention) and the ops' PyTorch paths otherwise
(``scaled_dot_product_attention``, a chunked cross-entropy that still never holds the logits,
the PyTorch Philox generator).
"""
from __future__ import annotations

import warnings

import torch

from lorafast import reference
from lorafast.ops import RULES, attention, check_impl, linear_cross_entropy, linear_softmax

__all__ = ["LoRA", "FusedCausalSelfAttention", "accelerate"]


class FusedCausalSelfAttention(reference.CausalSelfAttention):
    """Causal self-attention on ``lorafast.ops.attention``; parameters as in the reference."""

    impl = "auto"  # set per module by the model (LoRA._use_impl)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, nh, t, hd] over k, v [B, nh, T, hd], t <= T: the queries are
        the last t positions of the key sequence (t == T in training, t < T in a KV-cache step;
        bottom-right aligned mask). Returns [B, nh, t, hd]."""
        return attention(q, k, v, causal=True, impl=self.impl)  # [B, nh, t, hd]


class LoRA(reference.LoRA):
    """Drop-in accelerated :class:`lorafast.reference.LoRA`: the same parameters, in the same
    order, with the same defaults, plus ``impl`` ("auto" | "triton" | "torch"), the backend of
    every op the model calls. Raises ValueError for an unknown ``impl``, or for
    ``impl="triton"`` with a head dim the attention kernels do not take."""

    attention_class = FusedCausalSelfAttention

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, *,
                 num_heads: int | None = None, ffn_dim: int | None = None, max_seq_len: int = 1024,
                 dropout: float = 0.0, local=None, seed: int = 0, impl: str = "auto") -> None:
        # set before the base constructor: it draws the local tensors with this backend
        self.impl = check_impl(impl, "lorafast.LoRA")
        super().__init__(vocab_size, embedding_dim, hidden_dim, num_layers, num_heads=num_heads,
                         ffn_dim=ffn_dim, max_seq_len=max_seq_len, dropout=dropout, local=local, seed=seed)
        self._use_impl(impl)

    def _use_impl(self, impl: str) -> None:
        """Run every op with ``impl``; warn (auto) or raise (triton) when the attention kernels
        cannot take this model's head dim."""
        self.impl = check_impl(impl, "lorafast.LoRA")
        lo, hi = RULES["attention"].head_dims
        hd = self.config.head_dim
        if impl != "torch" and not lo <= hd <= hi:
            msg = f"head dim {hd} is outside the fused attention kernels' {lo}..{hi}"
            if impl == "triton":
                raise ValueError(f"lorafast.LoRA(impl='triton'): {msg}")
            warnings.warn(f"lorafast.LoRA: {msg}; attention runs on the PyTorch path", stacklevel=3)
        for m in self.modules():
            if isinstance(m, FusedCausalSelfAttention):
                m.impl = impl

    # fused output projection -------------------------------------------------------------
    def _head_operands(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h, W_o, b_o in one dtype: the autocast dtype when autocast is on (as ``nn.Linear`` would
        run under autocast; custom ops are not autocast by themselves), else h's dtype."""
        w, b = self.head.effective_weight(), self.head.bias
        dt = h.dtype
        if torch.is_autocast_enabled(h.device.type):
            dt = torch.get_autocast_dtype(h.device.type)
        cast = (lambda t: t if t is None or t.dtype == dt else t.to(dt))
        return cast(h), cast(w), cast(b)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of ``W_o h + b_o`` without materialising the [N, V] logits."""
        h, w, b = self._head_operands(h)
        # targets were validated by loss() (or by the caller of loss_unchecked): check=False
        return linear_cross_entropy(h, w, b, targets, ignore_index=ignore_index, impl=self.impl, check=False)

    def head_probs(self, h: torch.Tensor, temperature: float = 1.0, log: bool = False) -> torch.Tensor:
        h, w, b = self._head_operands(h)
        return linear_softmax(h, w, b, temperature=temperature, log=log, impl=self.impl).float()

    # generation with a KV cache ----------------------------------------------------------
    def _next_hidden(self, ids: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """Last position's hidden state [B, H]. ``cache`` holds per-block keys and values
        [B, nh, t, hd] of the tokens already seen; only the new tokens are computed (the cache
        grows by concatenation). Learned positions stop at ``max_seq_len``: past it the window
        slides by one token per step and is recomputed in full, as in the reference."""
        T = ids.shape[1]
        if cache is None or T > self.config.max_seq_len:
            ids = ids[:, -self.config.max_seq_len:]
            cache = {"len": 0, "kv": [None] * len(self.blocks)}
        start = cache["len"]
        new = ids[:, start:]  # [B, t_new]
        h = self.embed(new, start)  # [B, t_new, H]
        for i, block in enumerate(self.blocks):
            attn = block.attn
            B, t, C = h.shape
            q, k, v = attn.split_heads(block.ln1(h))  # each [B, nh, t_new, hd]
            if cache["kv"][i] is not None:
                k = torch.cat([cache["kv"][i][0], k], dim=2)  # [B, nh, start + t_new, hd]
                v = torch.cat([cache["kv"][i][1], v], dim=2)
            cache["kv"][i] = (k, v)
            # prefill (start == 0): causal over the prompt; decode: the t_new queries sit at the end
            # of the start + t_new keys (bottom-right causal: a single query sees every key)
            y = attn.attend(q, k, v)  # [B, nh, t_new, hd]
            y = y.transpose(1, 2).reshape(B, t, C)  # [B, t_new, H]
            h = h + attn.drop(attn.proj(y))
            h = h + block.mlp(block.ln2(h))
        cache["len"] = ids.shape[1]
        return self.ln_f(h[:, -1]), cache


def accelerate(model: reference.LoRA, impl: str = "auto") -> LoRA:
    """Turn a reference model into the accelerated one in place (same parameters, no copy) and
    return it: the model's class and its attention modules' class change, nothing else (nothing
    outside the model is patched). Raises TypeError for anything but a lorafast.reference.LoRA."""
    if not isinstance(model, reference.LoRA):
        raise TypeError(f"accelerate expects a lorafast.reference.LoRA, got {type(model).__name__}")
    check_impl(impl, "accelerate")
    if not isinstance(model, LoRA):
        model.__class__ = LoRA
    for m in model.modules():
        if type(m) is reference.CausalSelfAttention:
            m.__class__ = FusedCausalSelfAttention
    model._use_impl(impl)
    return model

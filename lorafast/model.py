"""The accelerated model: :class:`lorafast.reference.LoRA` with fused ops underneath.

Same constructor, config, parameter names, ``state_dict`` keys and return values as the
reference (it subclasses it and overrides only the computations), so checkpoints load in both
directions and ``from lorafast import LoRA`` is a drop-in switch. What changes:

============================  ==========================================================
attention                     ``lorafast.ops.attention`` (FlashAttention-2-style Triton
                              kernels; q, k, v stay strided views of the fused qkv output;
                              ``generate``'s KV-cache steps too, bottom-right causal)
``loss``                      ``lorafast.ops.linear_cross_entropy``: no N x V logits
``probs`` and ``generate``    ``lorafast.ops.linear_softmax`` (``generate``: last position
                              only, with a KV cache)
``reset_local_``              ``lorafast.ops.rerandomize_``: every local tensor in one launch
============================  ==========================================================

Each op takes ``impl="auto"``: Triton on CUDA tensors (or under ``TRITON_INTERPRET=1``) and its
PyTorch path otherwise (``scaled_dot_product_attention``, a chunked cross-entropy that still
never holds the logits, the PyTorch Philox generator). Head dims outside the attention kernel's
16..128 run the PyTorch attention path; the constructor says so with a warning.
"""
from __future__ import annotations

import warnings

import torch

from lorafast import reference
from lorafast.ops import attention, linear_cross_entropy, linear_softmax
from lorafast.ops._attention import MAX_HEAD_DIM, MIN_HEAD_DIM, torch_attention

__all__ = ["LoRA", "FusedCausalSelfAttention", "accelerate"]


class FusedCausalSelfAttention(reference.CausalSelfAttention):
    """Causal self-attention on ``lorafast.ops.attention``; parameters as in the reference."""

    impl = "auto"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, nh, t, hd] over k, v [B, nh, T, hd], t <= T: the queries are
        the last t positions of the key sequence (t == T in training, t < T in a KV-cache step;
        bottom-right aligned mask). Returns [B, nh, t, hd]."""
        if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM and self.impl != "triton":  # warned at construction
            return torch_attention(q, k, v, causal=True)
        return attention(q, k, v, causal=True, impl=self.impl)  # [B, nh, t, hd]


class LoRA(reference.LoRA):
    """Drop-in accelerated :class:`lorafast.reference.LoRA` (same signature and state_dict)."""

    rerandomize_impl = "auto"

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, **kwargs) -> None:
        super().__init__(vocab_size, embedding_dim, hidden_dim, num_layers, **kwargs)
        _swap_attention(self)

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
        return linear_cross_entropy(h, w, b, targets, ignore_index=ignore_index)

    def head_probs(self, h: torch.Tensor, temperature: float = 1.0, log: bool = False) -> torch.Tensor:
        h, w, b = self._head_operands(h)
        return linear_softmax(h, w, b, temperature=temperature, log=log).float()

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


def _swap_attention(model: reference.LoRA) -> None:
    hd = model.config.head_dim
    if not MIN_HEAD_DIM <= hd <= MAX_HEAD_DIM:
        warnings.warn(f"lorafast.LoRA: head dim {hd} is outside the fused attention kernel's "
                      f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM}; attention runs on the PyTorch path", stacklevel=3)
    for m in model.modules():
        if type(m) is reference.CausalSelfAttention:
            m.__class__ = FusedCausalSelfAttention


def accelerate(model: reference.LoRA) -> LoRA:
    """Turn a reference model into the accelerated one in place (same parameters, no copy);
    returns it. Patches nothing outside the model: only its own classes change."""
    if not isinstance(model, reference.LoRA):
        raise TypeError(f"accelerate expects a lorafast.reference.LoRA, got {type(model).__name__}")
    if not isinstance(model, LoRA):
        model.__class__ = LoRA
    _swap_attention(model)
    return model

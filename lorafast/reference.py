"""The reference model: a causal Transformer LM with Local Random Initialization, in plain PyTorch.

This file is the spec. Every kernel and the accelerated model (:mod:`lorafast.model`) are checked
against it; it imports no triton and writes each computation as the plainest math.

Architecture (the corrected intent of the source document's snippet, which passed ``num_layers``
as the head count and called ``nn.Transformer`` without a target)::

    ids [B, T] -> token embedding [B, T, E] -> (linear E -> H when E != H) + learned positions
      -> num_layers x pre-LayerNorm block:  x + attn(ln1(x)),  x + mlp(ln2(x))
      -> final LayerNorm -> output projection W_o h + b_o [B, T, V] -> softmax over the vocabulary

Local Random Initialization (:mod:`lorafast.local`): ``local_parameters()`` are redrawn by
``redraw_local_(step)`` from a counter-based Philox stream keyed by (seed, step), so their values
depend only on (model seed, step, tensor name) and are identical on every machine.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafast.config import ModelConfig
from lorafast.hub import HubMixin, local_state, read_local_state
from lorafast.local import LocalTensors

__all__ = ["LoRA", "LocalLinear", "CausalSelfAttention", "MLP", "Block", "check_ids", "check_targets"]


class LocalLinear(nn.Module):
    """``nn.Linear`` (same parameter names) with an optional low-rank term ``scale * up @ down``.

    ``kind == "branch"``: ``down [r, in]`` and ``up [out, r]`` are random local buffers (redraw or
    frozen), an additive random branch. ``kind == "adapter"``: they are trained parameters that
    are merged into ``weight`` and redrawn (merge mode); ``weight`` is then held fixed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kind: str | None = None
        self.rank = 0
        self.scale = 1.0

    def add_lowrank(self, rank: int, kind: str, scale: float) -> None:
        if self.kind is not None:
            raise ValueError("two low-rank local rules match the same layer")
        self.kind, self.rank, self.scale = kind, rank, float(scale)
        down = torch.zeros(rank, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        up = torch.zeros(self.out_features, rank, dtype=self.weight.dtype, device=self.weight.device)
        if kind == "branch":
            self.register_buffer("down", down, persistent=False)
            self.register_buffer("up", up, persistent=False)
        else:
            self.down = nn.Parameter(down)
            self.up = nn.Parameter(up)
            # Index of the adapter's current draw, so that a resumed run merges at the right step.
            self.register_buffer("draw", torch.zeros((), dtype=torch.int64))
            self.weight.requires_grad_(False)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the adapter into the base weight: ``W += scale * up @ down`` (merge mode)."""
        self.weight.add_((self.up @ self.down).to(self.weight.dtype), alpha=self.scale)

    def effective_weight(self) -> torch.Tensor:
        """``weight + scale * up @ down``, the matrix this layer applies."""
        if self.kind is None:
            return self.weight
        return self.weight + self.scale * (self.up @ self.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # [..., out]
        if self.kind is not None:
            y = y + self.scale * F.linear(F.linear(x, self.down), self.up)  # [..., r] -> [..., out]
        return y

    def extra_repr(self) -> str:
        low = f", {self.kind} rank={self.rank} scale={self.scale}" if self.kind else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{low}"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = LocalLinear(cfg.hidden_dim, 3 * cfg.hidden_dim)  # fused q, k, v projection
        self.proj = LocalLinear(cfg.hidden_dim, cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        qkv = self.qkv(x)  # [B, T, 3C]
        # [B, T, 3, nh, hd] -> [3, B, nh, T, hd]: q, k, v are strided views, no copy
        q, k, v = qkv.view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + causal mask) v, as explicit math: the kernel's spec.

        q, k, v: [B, nh, T, hd] -> [B, nh, T, hd]. Position t attends to positions <= t.
        """
        T, hd = q.shape[-2], q.shape[-1]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # [B, nh, T, T]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # [T, T], True above the diagonal
        scores = scores.masked_fill(future, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [B, nh, T, T]
        return weights @ v  # [B, nh, T, hd]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        y = self.attend(*self.split_heads(x))  # [B, nh, T, hd]
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = LocalLinear(cfg.hidden_dim, cfg.ffn_dim)
        self.fc_out = LocalLinear(cfg.ffn_dim, cfg.hidden_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x))))  # [B, T, H] -> [B, T, F] -> [B, T, H]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: type[CausalSelfAttention] = CausalSelfAttention) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden_dim)
        self.attn = attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden_dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def check_ids(x: object, vocab_size: int, max_seq_len: int, what: str = "ids") -> torch.Tensor:
    """Validate token ids ``[B, T]`` before any computation; return them as int64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{what} must have an integer dtype (token ids), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what} must have shape [batch, seq_len], got {tuple(x.shape)}")
    B, T = x.shape
    if B == 0 or T == 0:
        raise ValueError(f"{what} is empty: shape {tuple(x.shape)}")
    if T > max_seq_len:
        raise ValueError(f"{what} has seq_len {T} > max_seq_len {max_seq_len}")
    if torch.compiler.is_compiling():  # a value check is a host sync: a graph break. Shapes only.
        return x.long()
    lo, hi = (int(v) for v in torch.aminmax(x))  # one host sync
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds token id {bad} outside [0, vocab_size={vocab_size})")
    return x.long()


def check_targets(targets: object, shape: torch.Size, vocab_size: int, ignore_index: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype == torch.bool or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != shape:
        raise ValueError(f"targets must have the shape of the ids {tuple(shape)}, got {tuple(targets.shape)}")
    if torch.compiler.is_compiling():  # as in check_ids: no value check (host sync) under torch.compile
        return targets.long()
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        v = int(targets[bad][0])
        raise ValueError(f"targets hold {v}, outside [0, vocab_size={vocab_size}) and not ignore_index={ignore_index}")
    return targets.long()


class LoRA(nn.Module, HubMixin, pipeline_tag="text-generation"):
    """Causal Transformer LM trained with Local Random Initialization (not low-rank adaptation).

    ``LoRA(vocab_size, embedding_dim, hidden_dim, num_layers)`` keeps the source document's four
    positional arguments; the rest are keyword-only. ``local`` is a preset name (see
    :data:`lorafast.local.PRESETS`), a :class:`~lorafast.local.LocalConfig`, or None for the
    default preset. ``seed`` (an int in [0, 2^64)) fixes both the one-time global initialisation
    and every local draw. Raises ValueError / TypeError for a bad configuration.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from
    :class:`lorafast.hub.HubMixin`. The ``state_dict`` carries the *local state* (seed, local
    rules, ``local_step``; key ``_extra_state``): loading it checks the seed and rules (ValueError
    on a mismatch) and redraws the local tensors for the saved step.
    """

    attention_class: type[CausalSelfAttention] = CausalSelfAttention
    impl = "torch"  # backend of the ops this model calls (lorafast.ops): the reference is PyTorch only

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, *,
                 num_heads: int | None = None, ffn_dim: int | None = None, max_seq_len: int = 1024,
                 dropout: float = 0.0, local=None, seed: int = 0) -> None:
        super().__init__()
        cfg = ModelConfig(vocab_size, embedding_dim, hidden_dim, num_layers, num_heads=num_heads,
                          ffn_dim=ffn_dim, max_seq_len=max_seq_len, dropout=dropout, local=local, seed=seed)
        self.config = cfg
        self.tok_emb = nn.Embedding(vocab_size, embedding_dim)
        self.emb_proj = LocalLinear(embedding_dim, hidden_dim) if embedding_dim != hidden_dim else None
        self.pos_emb = nn.Embedding(max_seq_len, hidden_dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.attention_class) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden_dim)
        self.head = LocalLinear(hidden_dim, vocab_size)  # W_o h + b_o
        self._init_global()
        self.local_tensors = LocalTensors.discover(self, cfg.local, cfg.seed, LocalLinear)
        self.local_step = 0  # the training step whose draws the local tensors hold
        self._loaded_local_step: int | None = None
        self.register_load_state_dict_post_hook(_after_load)  # also when loaded as a submodule
        self.redraw_local_(0)

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kwargs) -> "LoRA":
        """The model of ``cfg``; ``kwargs`` go to the constructor (e.g. ``impl`` of lorafast.LoRA)."""
        return cls(cfg.vocab_size, cfg.embedding_dim, cfg.hidden_dim, cfg.num_layers,
                   num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.max_seq_len,
                   dropout=cfg.dropout, local=cfg.local, seed=cfg.seed, **kwargs)

    @torch.no_grad()
    def _init_global(self) -> None:
        """GPT-2 initialisation, drawn once from ``seed`` on the CPU (same values everywhere)."""
        gen = torch.Generator().manual_seed(self.config.seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, p in sorted(self.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    # ------------------------------------------------------------------ local / global
    def named_local_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Local tensors: redrawn (redraw), drawn once (frozen) or trained and merged (merge)."""
        return self.local_tensors.named()

    def local_parameters(self) -> Iterator[torch.Tensor]:
        for _, t in self.named_local_parameters():
            yield t

    def named_global_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters initialised once; includes base weights held fixed under merge adapters."""
        local = {name for name, _ in self.named_local_parameters()}
        for name, p in self.named_parameters():
            if name not in local:
                yield name, p

    def global_parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_global_parameters():
            yield p

    def redraw_local_(self, step: int) -> list[torch.Tensor]:
        """Mutates the local tensors into the draws in force at training step ``step``
        (:meth:`lorafast.local.LocalTensors.redraw_`); returns the trained tensors it
        re-initialised (merge adapters), whose optimizer state the training loop must clear."""
        reinitialised = self.local_tensors.redraw_(step, impl=self.impl)
        self.local_step = step
        return reinitialised

    def get_extra_state(self) -> torch.Tensor:
        """The local state (:func:`lorafast.hub.local_state`): seed, local rules, ``local_step``."""
        return local_state(self.config, self.local_step)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Check a loaded local state (ValueError on another seed or other local rules); its step
        is applied once the whole state dict is in (``_after_load``)."""
        self._loaded_local_step = read_local_state(self.config, state)

    # ------------------------------------------------------------------ forward
    def embed(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids [B, T] -> residual stream [B, T, H] (positions start at ``start``)."""
        h = self.tok_emb(x)  # [B, T, E]
        if self.emb_proj is not None:
            h = self.emb_proj(h)  # [B, T, H]
        pos = torch.arange(start, start + x.shape[1], device=x.device)  # [T]
        return self.drop(h + self.pos_emb(pos))  # [B, T, H]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Validated ids [B, T] -> final hidden states [B, T, H] (after the final LayerNorm)."""
        return self.hidden_unchecked(check_ids(x, self.config.vocab_size, self.config.max_seq_len))

    def hidden_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`hidden` without validating ``x`` (int64 ids already checked): no host sync."""
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, vocab_size] (fp32 for fp32 weights); with ``targets``
        [B, T], the mean next-token cross-entropy instead, as :meth:`loss` (the accelerated model
        then never forms the logits), so that ``torch.compile(model)(ids, targets)`` compiles a
        whole training forward. Under ``torch.compile`` the ids and targets are checked for
        dtype and shape only (a value check would be a host sync); validate data beforehand."""
        if targets is not None:
            return self.loss(x, targets, ignore_index)
        return self.head(self.hidden(x))

    def head_probs(self, h: torch.Tensor, temperature: float = 1.0, log: bool = False) -> torch.Tensor:
        """softmax((W_o h + b_o) / temperature) over the vocabulary, for h [..., H]."""
        logits = self.head(h).float() / temperature  # [..., V]
        return torch.log_softmax(logits, dim=-1) if log else torch.softmax(logits, dim=-1)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of ``W_o h + b_o`` against targets; h [N, H], targets [N]."""
        return F.cross_entropy(self.head(h).float(), targets, ignore_index=ignore_index)

    def probs(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Token ids [B, T] -> next-token distribution [B, T, vocab_size] (fp32)."""
        _check_temperature(temperature)
        return self.head_probs(self.hidden(x), temperature)

    def loss(self, x: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy.

        ``targets[b, t]`` is the token that follows ``x[b, t]`` (positions equal to ``ignore_index``
        are skipped). Without ``targets`` the ids predict themselves shifted by one: ``x[:, :-1]``
        is the input and ``x[:, 1:]`` the targets.
        """
        if targets is None:
            x = check_ids(x, self.config.vocab_size, self.config.max_seq_len + 1)
            if x.shape[1] < 2:
                raise ValueError("loss without targets needs seq_len >= 2 (the ids are shifted by one)")
            x, targets = x[:, :-1], x[:, 1:]
        else:
            x = check_ids(x, self.config.vocab_size, self.config.max_seq_len)
            targets = check_targets(targets, x.shape, self.config.vocab_size, ignore_index)
        return self.loss_unchecked(x, targets, ignore_index)

    def loss_unchecked(self, x: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """:meth:`loss` on ids and targets [B, T] that the caller has validated: no host sync, so
        ``torch.compile`` sees one graph. Out-of-range values here are undefined behaviour."""
        h = self.hidden_unchecked(x)  # [B, T, H]
        return self.head_loss(h.reshape(-1, h.shape[-1]), targets.reshape(-1), ignore_index)

    # ------------------------------------------------------------------ generation
    def _next_hidden(self, ids: torch.Tensor, cache: object) -> tuple[torch.Tensor, object]:
        """Last position's hidden state [B, H] for ids [B, T]; the reference recomputes everything."""
        ids = ids[:, -self.config.max_seq_len:]
        return self.hidden(ids)[:, -1], None

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ids [B, T]; returns [B, T + max_new_tokens].

        Only the last position goes through the output projection + softmax. ``temperature=0``
        picks the most likely token.
        """
        ids = check_ids(ids, self.config.vocab_size, 1 << 62)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature != 0:
            _check_temperature(temperature)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        was_training = self.training
        self.eval()
        cache: object = None
        try:
            for _ in range(max_new_tokens):
                h, cache = self._next_hidden(ids, cache)  # [B, H]
                if temperature == 0:
                    nxt = self.head_probs(h, 1.0, log=True).argmax(-1, keepdim=True)  # [B, 1]
                else:
                    p = self.head_probs(h, float(temperature))  # [B, V]
                    if top_k is not None and top_k < p.shape[-1]:
                        kth = torch.topk(p, top_k, dim=-1).values[:, -1:]  # [B, 1]
                        p = torch.where(p < kth, torch.zeros_like(p), p)
                    nxt = torch.multinomial(p, 1, generator=generator)  # [B, 1]
                ids = torch.cat([ids, nxt], dim=1)
        finally:
            self.train(was_training)
        return ids


def _after_load(model: LoRA, incompatible_keys) -> None:
    """Load-state-dict post hook: loaded merge adapters hold the draws of their ``draw`` buffers;
    then every local tensor is redrawn for the loaded local state's step (if there was one)."""
    model.local_tensors.after_load()
    step, model._loaded_local_step = model._loaded_local_step, None
    if step is not None:
        model.redraw_local_(step)


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")

"""A Hugging Face ``transformers`` GPT-2 of the same size as a lorafast model, the comparison the
source document names. Built from a ``GPT2Config`` (nothing is downloaded) and wrapped so that
the training step of :mod:`lorafast.train` runs it unchanged.

``transformers`` is an optional dependency (``pip install -e ".[compare]"``): :func:`gpt2_like`
raises ImportError with that command when it is missing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafast.config import ModelConfig

INSTALL_HINT = 'transformers is not installed: pip install -e ".[compare]"'


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


class GPT2Baseline(nn.Module):
    """``transformers.GPT2LMHeadModel`` with the training interface of ``lorafast.LoRA``:
    ``loss_unchecked(ids, targets)`` (mean next-token cross-entropy, ids and targets int64
    [B, T]) and ``redraw_local_(step)`` (GPT-2 has no local tensors: does nothing, returns []).

    Same vocabulary, width, depth, heads, MLP width and context as ``config``; GPT-2's own
    initialisation (std 0.02, scaled residual projections), tied input/output embeddings and
    no embedding projection (embedding_dim must equal hidden_dim).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not transformers_available():
            raise ImportError(INSTALL_HINT)
        from transformers import GPT2Config, GPT2LMHeadModel

        if config.embedding_dim != config.hidden_dim:
            raise ValueError(f"GPT-2 has no embedding projection: embedding_dim {config.embedding_dim} "
                             f"must equal hidden_dim {config.hidden_dim}")
        self.config = config
        hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.hidden_dim,
                        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.ffn_dim,
                        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                        activation_function="gelu", bos_token_id=None, eos_token_id=None)
        torch.manual_seed(config.seed)  # transformers initialises from the global generator
        self.model = GPT2LMHeadModel(hf)

    def redraw_local_(self, step: int) -> list[torch.Tensor]:
        return []

    def loss_unchecked(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids).logits  # [B, T, V]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def global_parameters(self):
        return self.parameters()

    def local_parameters(self):
        return iter(())


def gpt2_like(config: ModelConfig) -> GPT2Baseline:
    """The GPT-2 of ``config``'s size (see :class:`GPT2Baseline`). Raises ImportError without
    transformers, ValueError when embedding_dim != hidden_dim."""
    return GPT2Baseline(config)

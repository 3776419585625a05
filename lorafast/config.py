"""Configuration of the model: :class:`ModelConfig`, shared by the reference and the accelerated
model, and the dtype names the command line uses.

The rules of Local Random Initialization (:class:`LocalRule`, :class:`LocalConfig`,
:data:`PRESETS`) live in :mod:`lorafast.local`; they are importable from here too.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from lorafast.checks import SEED_RANGE, check_int
from lorafast.local import DEFAULT_PRESET, PRESETS, LocalConfig, LocalRule, resolve_local

__all__ = ["ModelConfig", "DTYPES", "default_num_heads", "LocalConfig", "LocalRule", "PRESETS",
           "DEFAULT_PRESET"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the model; shared by the reference and the accelerated model."""

    vocab_size: int
    embedding_dim: int
    hidden_dim: int
    num_layers: int
    num_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int = 1024
    dropout: float = 0.0
    local: LocalConfig | str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embedding_dim", "hidden_dim", "num_layers", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        heads = self.num_heads if self.num_heads is not None else default_num_heads(self.hidden_dim)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {heads!r}")
        if self.hidden_dim % heads:
            raise ValueError(f"num_heads={heads} does not divide hidden_dim={self.hidden_dim}")
        ffn = self.ffn_dim if self.ffn_dim is not None else 4 * self.hidden_dim
        if isinstance(ffn, bool) or not isinstance(ffn, int) or ffn < 1:
            raise ValueError(f"ffn_dim must be a positive int, got {ffn!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        check_int("seed", self.seed, *SEED_RANGE)
        object.__setattr__(self, "num_heads", heads)
        object.__setattr__(self, "ffn_dim", ffn)
        object.__setattr__(self, "local", resolve_local(self.local, self.num_layers))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["local"] = self.local.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if isinstance(d.get("local"), dict):
            d["local"] = LocalConfig.from_dict(d["local"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def default_num_heads(hidden_dim: int) -> int:
    """Heads of 64 dimensions where they fit, else 32 or 16, else a single head."""
    for head_dim in (64, 32, 16):
        if hidden_dim % head_dim == 0:
            return hidden_dim // head_dim
    return 1

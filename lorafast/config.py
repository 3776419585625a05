"""Configuration of the model and of Local Random Initialization.

Local Random Initialization splits the parameters into *global* ones, randomly initialised once,
and *local* ones, randomly re-initialised during training. One :class:`LocalRule` says which
tensors are local, how they are drawn and in which mode:

``redraw``
    The document's method: the local tensors are drawn afresh every ``period`` batches (default
    1) and never trained (a gradient step would be overwritten before it is used), so they take
    no weight gradient, no optimizer state and no checkpoint bytes: they are regenerated from
    (seed, step).
``frozen``
    Drawn once from the seed and never trained: random "reservoir" layers. Also regenerated from
    the seed rather than stored.
``merge``
    The ReLoRA/Flora reading: a rank-``rank`` adapter ``scale * B @ A`` is added to each matched
    linear layer, whose base weight is then held fixed. ``A`` is drawn from the law, ``B`` starts
    at zero, both are trained; every ``period`` batches the adapter is merged into the base weight
    (``W += scale * B @ A``), ``A`` is redrawn, ``B`` zeroed and their optimizer state reset. With a
    period of one step this is a randomly projected gradient step on ``W``.

With ``rank == 0`` a rule's pattern names parameters (``blocks.1.mlp.fc_in.weight``), which become
local themselves. With ``rank > 0`` it names linear layers (``blocks.*.attn.qkv``): ``redraw`` and
``frozen`` then add a random additive low-rank branch ``scale * up @ down`` whose two factors are
local; ``merge`` adds the trained adapter above.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from typing import Any, Iterable

from lorafast.init_laws import KaimingUniform, Normal, Uniform, Zeros

Law = Normal | Uniform | KaimingUniform | Zeros
MODES = ("redraw", "frozen", "merge")
_LAWS = {"normal": Normal, "uniform": Uniform, "kaiming_uniform": KaimingUniform, "zeros": Zeros}


@dataclasses.dataclass(frozen=True)
class LocalRule:
    pattern: str
    mode: str = "redraw"
    law: Law | None = None  # None: kaiming-uniform, as nn.Linear initialises its weight
    rank: int = 0
    period: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LocalRule.pattern must be a non-empty string, got {self.pattern!r}")
        if self.mode not in MODES:
            raise ValueError(f"LocalRule.mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LocalRule.rank must be an int >= 0, got {self.rank!r}")
        if self.mode == "merge" and self.rank == 0:
            raise ValueError("LocalRule: mode 'merge' needs rank > 0 (a low-rank adapter to train and merge)")
        if not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"LocalRule.period must be an int >= 1, got {self.period!r}")
        if self.law is not None and not isinstance(self.law, (Normal, Uniform, KaimingUniform, Zeros)):
            raise TypeError(f"LocalRule.law must be one of Normal, Uniform, KaimingUniform, Zeros, got {self.law!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"LocalRule.scale must be a finite number, got {self.scale!r}")
        if self.mode == "merge" and isinstance(self.law, Zeros):
            raise ValueError("LocalRule: mode 'merge' with a zeros law would make every adapter zero")

    @property
    def resolved_law(self) -> Law:
        return self.law if self.law is not None else KaimingUniform()

    def draw_index(self, step: int) -> int:
        """The Philox ``step`` key of the draw in force at training step ``step``."""
        return 0 if self.mode == "frozen" else step // self.period

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Which tensors are local and how they are drawn; ``name`` records the preset it came from."""

    rules: tuple[LocalRule, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        for r in self.rules:
            if not isinstance(r, LocalRule):
                raise TypeError(f"LocalConfig.rules must hold LocalRule objects, got {r!r}")

    def to_dict(self) -> dict[str, Any]:
        def law(x: Law | None) -> dict[str, Any] | None:
            if x is None:
                return None
            kind = {v: k for k, v in _LAWS.items()}[type(x)]
            return {"kind": kind, **dataclasses.asdict(x)}

        return {"name": self.name,
                "rules": [{**dataclasses.asdict(r), "law": law(r.law)} for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LocalConfig":
        rules = []
        for r in d.get("rules", []):
            r = dict(r)
            if r.get("law") is not None:
                spec = dict(r["law"])
                r["law"] = _LAWS[spec.pop("kind")](**spec)
            rules.append(LocalRule(**r))
        return cls(rules=tuple(rules), name=d.get("name", "custom"))


# Block layers that a preset may target, by their module names inside one block.
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")


def _ffn_alt(num_layers: int) -> tuple[LocalRule, ...]:
    # FFN input projections of alternate blocks (1, 3, 5, ...), redrawn every batch.
    return tuple(LocalRule(f"blocks.{i}.mlp.fc_in.weight") for i in range(1, num_layers, 2))


PRESETS: dict[str, Any] = {
    # Every parameter global: a plain Transformer LM.
    "none": lambda L: (),
    # The document's method: some weights are local and redrawn every batch. Provisional default.
    "ffn-alt": _ffn_alt,
    # Random "reservoir" FFN input projections in alternate blocks: drawn once, never trained.
    "reservoir": lambda L: tuple(dataclasses.replace(r, mode="frozen") for r in _ffn_alt(L)),
    # Additive random rank-4 branches on every block projection, redrawn every batch.
    "branch": lambda L: tuple(LocalRule(f"blocks.*.{m}", rank=4, law=Normal(0.0, 0.02)) for m in BLOCK_LINEARS),
    # Rank-8 trained adapters on every block projection, merged then redrawn every 20 batches.
    "merge": lambda L: tuple(LocalRule(f"blocks.*.{m}", mode="merge", rank=8, period=20) for m in BLOCK_LINEARS),
}
DEFAULT_PRESET = "ffn-alt"


def resolve_local(local: "LocalConfig | str | None", num_layers: int) -> LocalConfig:
    """Turn the ``local=`` argument (None, a preset name or a LocalConfig) into a LocalConfig."""
    if local is None:
        local = DEFAULT_PRESET
    if isinstance(local, str):
        if local not in PRESETS:
            raise ValueError(f"unknown local preset {local!r}; known presets: {sorted(PRESETS)}")
        return LocalConfig(rules=PRESETS[local](num_layers), name=local)
    if isinstance(local, LocalConfig):
        return local
    if isinstance(local, (list, tuple)) and all(isinstance(r, LocalRule) for r in local):
        return LocalConfig(rules=tuple(local))
    raise TypeError(f"local must be None, a preset name, a LocalConfig or a list of LocalRule, got {type(local).__name__}")


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
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


def unmatched_rules(rules: Iterable[LocalRule], names: Iterable[str]) -> list[LocalRule]:
    names = list(names)
    return [r for r in rules if not any(r.matches(n) for n in names)]

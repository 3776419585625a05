"""Local Random Initialization, in one place: which tensors are local, and redrawing them.

Local Random Initialization splits the parameters into *global* ones, randomly initialised once,
and *local* ones, randomly re-initialised during training. The vocabulary, one name per concept:

local tensor
    A tensor matched by a :class:`LocalRule`: a parameter made local (``rank == 0``), or one
    factor of a low-rank branch or adapter added to a linear layer (``rank > 0``).
draw
    The values a local tensor holds. Draw ``d`` of tensor ``t`` is the Philox4x32-10 stream
    keyed by (model seed, ``d``) with stream id crc32(name of ``t``) (:mod:`lorafast.philox`),
    so it is the same on every machine, backend and rank, and never stored.
redraw
    Refilling a local tensor with the draw in force at a training step,
    :meth:`LocalRule.draw_at` (``step // period``; draw 0 for ``frozen`` rules). The op that
    fills tensors is :func:`lorafast.ops.rerandomize_`; the model-level call is
    ``model.redraw_local_(step)`` (:meth:`LocalTensors.redraw_`).
merge
    In ``merge`` mode, at each new period the trained adapter is first folded into its base
    weight (``W += scale * up @ down``), then redrawn (``down`` from the law, ``up`` zero). The
    adapter's optimizer state is then stale: :meth:`LocalTensors.redraw_` returns those tensors
    and the training loop clears their state (:func:`lorafast.train.clear_optimizer_state`);
    the model never reaches into an optimizer.

Modes of a rule:

``redraw``
    The document's method: the local tensors are drawn afresh every ``period`` batches (default
    1) and never trained (a gradient step would be overwritten before it is used), so they take
    no weight gradient, no optimizer state and no checkpoint bytes: they are regenerated from
    (seed, step).
``frozen``
    Drawn once from the seed and never trained: random "reservoir" layers. Also regenerated from
    the seed rather than stored.
``merge``
    The ReLoRA/Flora reading: a rank-``rank`` adapter ``scale * up @ down`` is added to each
    matched linear layer, whose base weight is then held fixed. ``down`` is drawn from the law,
    ``up`` starts at zero, both are trained and merged every ``period`` batches (above). With a
    period of one step this is a randomly projected gradient step on ``W``.

With ``rank == 0`` a rule's pattern names parameters (``blocks.1.mlp.fc_in.weight``), which become
local themselves. With ``rank > 0`` it names linear layers (``blocks.*.attn.qkv``): ``redraw`` and
``frozen`` then add a random additive low-rank branch ``scale * up @ down`` whose two factors are
local; ``merge`` adds the trained adapter above.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import zlib
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from lorafast.checks import STEP_RANGE, check_int
from lorafast.init_laws import LAW_NAMES, LAWS, InitLaw, KaimingUniform, Normal, Zeros

MODES = ("redraw", "frozen", "merge")


# --------------------------------------------------------------------------------------------
# Rules and presets
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LocalRule:
    """Which tensors are local (``pattern``, fnmatch on names) and how they are drawn.

    ``law``: None means kaiming-uniform, as ``nn.Linear`` initialises its weight. ``rank`` 0 makes
    the matched parameters local; ``rank > 0`` adds a low-rank branch (redraw/frozen) or adapter
    (merge) of that rank to the matched linear layers, scaled by ``scale``. ``period``: batches
    between redraws. Raises ValueError/TypeError on bad values.
    """

    pattern: str
    mode: str = "redraw"
    law: InitLaw | None = None
    rank: int = 0
    period: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"LocalRule.pattern must be a non-empty string, got {self.pattern!r}")
        if self.mode not in MODES:
            raise ValueError(f"LocalRule.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"LocalRule.rank must be an int >= 0, got {self.rank!r}")
        if self.mode == "merge" and self.rank == 0:
            raise ValueError("LocalRule: mode 'merge' needs rank > 0 (a low-rank adapter to train and merge)")
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"LocalRule.period must be an int >= 1, got {self.period!r}")
        if self.law is not None and not isinstance(self.law, LAWS):
            raise TypeError(f"LocalRule.law must be one of {[c.__name__ for c in LAWS]}, got {self.law!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"LocalRule.scale must be a finite number, got {self.scale!r}")
        if self.mode == "merge" and isinstance(self.law, Zeros):
            raise ValueError("LocalRule: mode 'merge' with a zeros law would make every adapter zero")

    @property
    def resolved_law(self) -> InitLaw:
        return self.law if self.law is not None else KaimingUniform()

    def draw_at(self, step: int) -> int:
        """The draw in force at training step ``step`` (the Philox ``step`` key of the redraw)."""
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
        def law(x: InitLaw | None) -> dict[str, Any] | None:
            if x is None:
                return None
            kind = {v: k for k, v in LAW_NAMES.items()}[type(x)]
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
                r["law"] = LAW_NAMES[spec.pop("kind")](**spec)
            rules.append(LocalRule(**r))
        return cls(rules=tuple(rules), name=d.get("name", "custom"))


# Block layers that a preset may target, by their module names inside one block.
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")


def _ffn_alt(num_layers: int) -> tuple[LocalRule, ...]:
    # FFN input projections of alternate blocks (1, 3, 5, ...), redrawn every batch.
    return tuple(LocalRule(f"blocks.{i}.mlp.fc_in.weight") for i in range(1, num_layers, 2))


PRESETS: dict[str, Callable[[int], tuple[LocalRule, ...]]] = {
    # Every parameter global: a plain Transformer LM.
    "none": lambda L: (),
    # The document's method: some weights are local and redrawn every batch.
    "ffn-alt": _ffn_alt,
    # Random "reservoir" FFN input projections in alternate blocks: drawn once, never trained.
    # The default: the preset study (README, "Does Local Random Initialization hold up?")
    # measured it as the local preset of best quality for its compute.
    "reservoir": lambda L: tuple(dataclasses.replace(r, mode="frozen") for r in _ffn_alt(L)),
    # Additive random rank-4 branches on every block projection, redrawn every batch.
    "branch": lambda L: tuple(LocalRule(f"blocks.*.{m}", rank=4, law=Normal(0.0, 0.02)) for m in BLOCK_LINEARS),
    # Rank-8 trained adapters on every block projection, merged then redrawn every 20 batches.
    "merge": lambda L: tuple(LocalRule(f"blocks.*.{m}", mode="merge", rank=8, period=20) for m in BLOCK_LINEARS),
}
# Chosen by ``lorafast study`` (lorafast.study.propose_default over the records in study/;
# tests/test_study.py checks that the two agree).
DEFAULT_PRESET = "reservoir"


def resolve_local(local: "LocalConfig | str | None", num_layers: int) -> LocalConfig:
    """Turn the ``local=`` argument (None, a preset name, a LocalConfig or a list of LocalRule)
    into a LocalConfig (None: :data:`DEFAULT_PRESET`)."""
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


# --------------------------------------------------------------------------------------------
# Discovery and redraw
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """One local tensor: ``getattr(module, attr)``, drawn from ``law`` under ``rule``."""

    name: str
    module: nn.Module
    attr: str
    rule: LocalRule
    law: InitLaw
    stream: int  # Philox stream id: crc32 of the name, so values do not depend on the other tensors

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def shard_of(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of ``t`` this process holds and the flat index of its first element in the full
    tensor: ``(t, 0)`` for a plain tensor; for a DTensor (e.g. a parameter sharded by FSDP2's
    ``fully_shard``) its local shard and that shard's offset, so that the redraw writes exactly
    the values the unsharded tensor would hold there. Raises ValueError for a sharding whose local
    part is not one contiguous range of the flattened tensor (anything but whole rows)."""
    if not hasattr(t, "device_mesh"):  # not a DTensor: no need to import torch.distributed
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape[1:]) != tuple(t.shape[1:]) or any(offset[1:]) or tuple(local.shape) != tuple(shape):
        raise ValueError(f"local tensor of shape {tuple(t.shape)} sharded as {t.placements}: only "
                         "dim-0 (row) shards can be redrawn in place")
    return local, offset[0] * math.prod(t.shape[1:]) if local.numel() else 0


class LocalTensors:
    """The local tensors of one model and the draw each one holds.

    Built once from the model and its rules (:meth:`discover`), which turns matched parameters
    into non-persistent buffers (no gradient, no optimizer state, no checkpoint bytes) and adds
    the low-rank branches and adapters to matched ``LocalLinear`` layers.
    """

    def __init__(self, tensors: list[LocalTensor], seed: int) -> None:
        self.tensors = tensors
        self.seed = seed
        self.current_draw: dict[str, int] = {}  # name -> draw it holds

    @classmethod
    def discover(cls, model: nn.Module, config: LocalConfig, seed: int, linear_type: type) -> "LocalTensors":
        """Find the tensors ``config``'s rules name in ``model`` and make them local.

        ``linear_type``: the layer class that can take a low-rank term (``add_lowrank``).
        Raises ValueError for a rule that matches nothing, a tensor matched twice, or a merge
        adapter on a layer whose base weight is itself local.
        """
        rules = config.rules
        params = dict(model.named_parameters())
        linears = {n: m for n, m in model.named_modules() if isinstance(m, linear_type)}
        dense = [r for r in rules if r.rank == 0]
        lowrank = [r for r in rules if r.rank > 0]
        missing = [r for r in dense if not any(r.matches(n) for n in params)] + \
                  [r for r in lowrank if not any(r.matches(n) for n in linears)]
        if missing:
            raise ValueError(f"local rule pattern {missing[0].pattern!r} matches no "
                             f"{'layer' if missing[0].rank else 'parameter'} of this model")
        out: list[LocalTensor] = []

        def add(name: str, module: nn.Module, attr: str, rule: LocalRule, law: InitLaw) -> None:
            out.append(LocalTensor(name, module, attr, rule, law, zlib.crc32(name.encode())))

        for name, p in params.items():
            hits = [r for r in dense if r.matches(name)]
            if len(hits) > 1:
                raise ValueError(f"{name} is matched by more than one local rule")
            for rule in hits:
                mod_name, _, attr = name.rpartition(".")
                module = model.get_submodule(mod_name)
                # A local tensor is not trained: it becomes a buffer, out of the optimizer and the checkpoint.
                del module._parameters[attr]
                module.register_buffer(attr, p.detach(), persistent=False)
                law = rule.law if rule.law is not None else (KaimingUniform() if p.dim() >= 2 else Normal(0.0, 0.02))
                add(name, module, attr, rule, law)
        for name, module in linears.items():
            hits = [r for r in lowrank if r.matches(name)]
            if len(hits) > 1:
                raise ValueError(f"{name} is matched by more than one low-rank local rule")
            for rule in hits:
                if rule.mode == "merge" and "weight" not in module._parameters:
                    raise ValueError(f"{name}: a merge adapter needs a global base weight, but "
                                     f"{name}.weight is local (its merges would be redrawn away)")
                module.add_lowrank(rule.rank, "adapter" if rule.mode == "merge" else "branch", rule.scale)
                add(f"{name}.down", module, "down", rule, rule.resolved_law)
                add(f"{name}.up", module, "up", rule, Zeros() if rule.mode == "merge" else rule.resolved_law)
        return cls(out, seed)

    def named(self) -> Iterator[tuple[str, torch.Tensor]]:
        for t in self.tensors:
            yield t.name, t.tensor

    @torch.no_grad()
    def redraw_(self, step: int, impl: str = "torch") -> list[torch.Tensor]:
        """Mutates the local tensors in place into the draws in force at training step ``step``.

        ``redraw`` tensors take draw ``step // period``, ``frozen`` ones draw 0; ``merge`` adapters
        entering a new period are first merged into their base weight, then redrawn. Tensors
        already holding their draw are left alone, so a second call is free and harmless.
        Every redrawn group of one draw is filled in one :func:`lorafast.ops.rerandomize_` call
        with ``impl``. Returns the *trained* tensors that were re-initialised (merge adapters):
        their optimizer state no longer applies. Raises ValueError for a step outside [0, 2^63)
        (the draw index is kept in int64 buffers).
        """
        from lorafast.ops import rerandomize_

        check_int("step", step, *STEP_RANGE)
        by_draw: dict[int, list[LocalTensor]] = {}
        merged: set[int] = set()
        reinitialised: list[torch.Tensor] = []
        for t in self.tensors:
            d = t.rule.draw_at(step)
            if self.current_draw.get(t.name) == d:
                continue
            if t.rule.mode == "merge":
                m = t.module
                if id(m) not in merged:
                    merged.add(id(m))
                    if t.name in self.current_draw:  # the adapter trained during the last period
                        m.merge_()
                    m.draw.fill_(d)
                reinitialised.append(t.tensor)
            by_draw.setdefault(d, []).append(t)
        for d, group in sorted(by_draw.items()):
            shards = [shard_of(t.tensor) for t in group]  # a sharded tensor refills its own shard only
            rerandomize_([s for s, _ in shards], seed=self.seed, step=d, init=[t.law for t in group],
                         ids=[t.stream for t in group], offsets=[o for _, o in shards], impl=impl)
            for t in group:
                self.current_draw[t.name] = d
        return reinitialised

    def after_load(self) -> None:
        """After ``load_state_dict``: loaded merge adapters hold the draw recorded in each
        layer's ``draw`` buffer (redraw/frozen tensors are not in a state dict: unchanged)."""
        for t in self.tensors:
            if t.rule.mode == "merge":
                self.current_draw[t.name] = int(t.module.draw)

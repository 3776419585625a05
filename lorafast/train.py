"""Training with Local Random Initialization: an importable loop, driven by one dataclass.

One step (:func:`train_step`, shared with ``lorafast bench model``): redraw the local tensors
for the step (``model.redraw_local_(step)``), compute the loss, backpropagate, clip, update; no
host synchronisation (the corpus is validated once, when it is loaded). AdamW or SGD; linear
warmup then cosine decay; periodic evaluation on the held-out split; metrics appended to
``OUT/metrics.jsonl``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop trains data-parallel: DDP, or FSDP2 with
``fsdp=True`` (:mod:`lorafast.distributed`). ``batch_size`` is the global batch: every rank draws
the same global batch from the same generator and takes its own slice, so the batches, the
learning rate and the schedule do not depend on the number of processes. Only rank 0 prints,
logs and commits checkpoints; the validation loss is averaged over the ranks.

Checkpoints (:mod:`lorafast.checkpoint`): every ``checkpoint_every`` steps, at the end, and (one
process) when the run is interrupted or crashes; committed atomically, the newest
``keep_checkpoints`` kept. ``resume=True`` continues the run in ``out`` exactly: model, optimizer
state, schedule (a function of the step and the saved settings), data position (the batch
generator), dropout (PyTorch's generator is seeded from (seed, step, rank) before every step, so
it needs no saved state) and the fp16 gradient scaler. Flags that define the run
(``defines_run`` in the field metadata) must keep their saved values; ``steps`` may grow.

A NaN/Inf loss stops the run with its step number (checked at every log step and before every
checkpoint, without a per-step host sync; nothing after the bad step is saved), or, with
``skip_nonfinite``, skips that batch and counts it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import torch

from lorafast import checkpoint
from lorafast.checks import SEED_RANGE, STEP_RANGE, check_int
from lorafast.config import DEFAULT_PRESET, DTYPES, PRESETS, ModelConfig, default_num_heads
from lorafast.corpus import VOCAB_SIZE, Corpus, load_corpus
from lorafast.distributed import World, bare_model, init_world, parallelize, reshard, sharded_local_names
from lorafast.hub import atomic_write, read_config
from lorafast.tokenizer import bits_per_byte_factor, run_tokenizer

_INT = (1, 1 << 31)  # sizes that become tensor dimensions
_COUNT = (0, STEP_RANGE[1])  # step counts and intervals (0: off)
_INF = math.inf


def option(default: Any, help: str, *, range: tuple[int, int] | None = None,
           real: tuple[float, float, str] | None = None, defines_run: bool = False, **kw: Any) -> Any:
    """A configuration field with its help text (the command-line flag's) and its checks:
    ``range`` [lo, hi) for ints, ``real`` (lo, hi, brackets such as "[)") for floats, ``choices``;
    ``defines_run``: a resumed run must keep the saved value. :func:`check_options` applies them."""
    md = {"help": help, "defines_run": defines_run, **kw}
    if range is not None:
        md["range"] = range
    if real is not None:
        md["real"] = real
    return dataclasses.field(default=default, metadata=md)


def check_options(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` declared with :func:`option`: bools
    are bools, ints within their range, floats finite and within their interval, choices among
    theirs. Raises TypeError/ValueError naming the field and the allowed range."""
    for f in dataclasses.fields(obj):
        v, md = getattr(obj, f.name), f.metadata
        if isinstance(f.default, bool):
            if not isinstance(v, bool):
                raise TypeError(f"{f.name} must be True or False, got {v!r}")
        elif "range" in md and v is not None:
            check_int(f.name, v, *md["range"])
        elif "real" in md and v is not None:
            _check_real(f.name, v, *md["real"])
        elif "choices" in md and v not in md["choices"]:
            raise ValueError(f"{f.name} must be one of {md['choices']}, got {v!r}")


@dataclasses.dataclass
class TrainConfig:
    # run
    steps: int = option(1000, "optimizer steps (with --resume, a larger value extends the run)", range=(1, STEP_RANGE[1]))
    batch_size: int = option(16, "sequences per optimizer step, over all processes: under torchrun each of N "
                         "processes takes batch_size / N, so the global batch and the learning rate stay the "
                         "same when N changes", range=_INT, defines_run=True)
    seq_len: int = option(128, "tokens per sequence", range=_INT, defines_run=True)
    # model
    embedding_dim: int = option(128, "token embedding width", range=_INT, defines_run=True)
    hidden_dim: int = option(128, "Transformer width", range=_INT, defines_run=True)
    num_layers: int = option(4, "Transformer blocks", range=_INT, defines_run=True)
    num_heads: int | None = option(None, "attention heads (default: heads of 64, 32 or 16 dims)", range=_INT,
                               defines_run=True)
    ffn_dim: int | None = option(None, "MLP width (default: 4 x hidden_dim)", range=_INT, defines_run=True)
    dropout: float = option(0.0, "dropout on embeddings and residual branches", real=(0.0, 1.0, "[)"), defines_run=True)
    preset: str = option(DEFAULT_PRESET, "which parameters are local", choices=sorted(PRESETS), defines_run=True)
    reference: bool = option(False, "train the pure-PyTorch reference model instead of the accelerated one")
    # optimisation
    optimizer: str = option("adamw", "optimizer", choices=["adamw", "sgd"], defines_run=True)
    lr: float = option(3e-3, "peak learning rate", real=(0.0, _INF, "()"), defines_run=True)
    min_lr: float | None = option(None, "final learning rate of the cosine decay (default: lr / 10)",
                              real=(0.0, _INF, "[)"), defines_run=True)
    warmup: int = option(50, "linear warmup steps", range=_COUNT, defines_run=True)
    weight_decay: float = option(0.1, "decoupled weight decay on matrices (AdamW) or L2 (SGD)", real=(0.0, _INF, "[)"),
                             defines_run=True)
    momentum: float = option(0.9, "SGD momentum", real=(0.0, 1.0, "[)"), defines_run=True)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: off)", real=(0.0, _INF, "[)"),
                          defines_run=True)
    skip_nonfinite: bool = option(False, "skip a batch whose loss is NaN or Inf, counting it as skipped_steps in "
                              "metrics.jsonl, instead of stopping the run (costs one host sync per step)")
    # evaluation, logging, checkpoints
    eval_every: int = option(100, "evaluate on the validation split every N steps and at the end (0: off)", range=_COUNT)
    eval_batches: int = option(8, "validation batches per evaluation", range=_INT)
    log_every: int = option(10, "append metrics every N steps", range=(1, STEP_RANGE[1]))
    checkpoint_every: int = option(250, "write a checkpoint every N steps (0: only at the end)", range=_COUNT)
    keep_checkpoints: int = option(1, "checkpoints kept on disk, the newest ones (each holds the model and its "
                               "optimizer state: about 3x the model's bytes with AdamW)", range=_INT)
    # processes
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state over the processes "
                    "(FSDP2) instead of replicating them (DDP)")
    dist_timeout: float = option(600.0, "under torchrun: seconds a process waits for the others in a collective "
                             "(a rank that died or hangs) before it stops with an error", real=(0.0, _INF, "()"))
    # environment
    device: str = option("auto", "cpu, cuda, cuda:N or auto (under torchrun: cuda means cuda:LOCAL_RANK)")
    dtype: str = option("float32", "compute dtype (autocast when not float32)", choices=list(DTYPES))
    threads: int | None = option(None, "CPU threads of PyTorch's ops (default: PyTorch's choice, one per core; "
                             "torchrun sets 1 per process unless OMP_NUM_THREADS is set)", range=(1, 1 << 16))
    seed: int = option(0, "seed of the model (global init, local draws), the batches and dropout", range=SEED_RANGE,
                   defines_run=True)
    out: str = option("runs/lorafast", "run folder: metrics.jsonl, checkpoints")
    data: str | None = option(None, "train on this UTF-8 text file (default: the built-in corpus)", defines_run=True)
    tokenizer: str = option("bytes", "bytes, bpe (train a byte-level BPE on the training split) or a tokenizer.json "
                            "file; a resumed run keeps its own", defines_run=True, kept_on_resume=True)
    vocab_size: int = option(8192, "vocabulary of --tokenizer bpe", range=(2, 1 << 31), defines_run=True,
                             kept_on_resume=True)
    resume: bool = option(False, "continue the run in --out with its saved settings (flags that define the run "
                      "must keep their values; --steps may grow)")
    overwrite: bool = option(False, "start a new run in --out even if it holds one (deletes that run's checkpoints "
                         "and metrics)")
    sample_tokens: int = option(200, "tokens generated at the end", range=(0, 1 << 31))
    prompt: str = option("def ", "prompt of the final sample")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_options(self)
        for name in ("out", "device", "prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.out:
            raise ValueError("out must name a folder")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            raise ValueError(f"data must be a file name or None, got {self.data!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")

    def model_config(self, vocab_size: int = VOCAB_SIZE) -> ModelConfig:
        return ModelConfig(vocab_size, self.embedding_dim, self.hidden_dim, self.num_layers,
                           num_heads=self.num_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
                           dropout=self.dropout, local=self.preset, seed=self.seed)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RUN_FIELDS = tuple(n for n, f in _FIELDS.items() if f.metadata["defines_run"])
MODEL_FIELDS = ("seq_len", "embedding_dim", "hidden_dim", "num_layers", "num_heads", "ffn_dim", "dropout",
                "preset", "seed")  # the fields ModelConfig is built from


def _check_real(name: str, value: object, lo: float, hi: float, brackets: str) -> float:
    """``value`` if it is a finite real number within the interval; else TypeError/ValueError
    naming the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (lo < value if brackets[0] == "(" else lo <= value) and (value < hi if brackets[1] == ")" else value <= hi)
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{name} = {value} is out of range {brackets[0]}{lo:g}, {hi:g}{brackets[1]}")
    return float(value)


def flag(name: str) -> str:
    """The command-line flag of TrainConfig field ``name``."""
    return "--" + name.replace("_", "-")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf (and ``skip_nonfinite`` is off)."""

    def __init__(self, step: int, out: str, last_checkpoint: int | None) -> None:
        self.step = step
        kept = (f"the last checkpoint, step {last_checkpoint}, is kept" if last_checkpoint is not None
                else "no checkpoint was written")
        super().__init__(f"non-finite loss (NaN or Inf) at step {step}; the run stopped and {kept} in {out} "
                         "(lower --lr, raise --warmup, or pass --skip-nonfinite to skip such batches)")


class RankFailure(RuntimeError):
    """A collective failed: another process of the run died or stopped answering."""


def model_class(reference: bool) -> type:
    """The accelerated model (``lorafast.LoRA``) unless ``reference``."""
    if reference:
        from lorafast.reference import LoRA
    else:
        from lorafast import LoRA
    return LoRA


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device (cpu, cuda, cuda:N or auto)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return d


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Trainable parameters only: local tensors of redraw/frozen rules are buffers, not here."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def clear_optimizer_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """Forget ``optimizer``'s state (moments, step counts) of ``tensors``: what
    ``model.redraw_local_`` returns, trained tensors it re-initialised (merge adapters)."""
    for t in tensors:
        optimizer.state.pop(t, None)


_NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)  # a pass-through: scale, unscale and update do nothing


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Host sync (and, under torch.distributed, one all-reduce): is ``loss`` finite on every rank?"""
    bad = (~torch.isfinite(loss)).to(torch.float32).reshape(1)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    return not bool(bad)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               step: int, lr: float, *, scaler: torch.amp.GradScaler | None = None,
               autocast: contextlib.AbstractContextManager | None = None, grad_clip: float = 0.0,
               skip_nonfinite: bool = False) -> torch.Tensor:
    """One optimizer step of training with Local Random Initialization, without host sync.

    Redraws the local tensors for ``step`` (clearing the optimizer state of re-initialised
    adapters), sets the learning rate ``lr`` on every parameter group, computes the loss of ids
    ``x`` against targets ``y`` (int64 [B, T] on the model's device, already validated:
    ``model.loss_unchecked``, or the compiled forward ``model(x, y)`` of a
    ``torch.compile``-d model), backpropagates through ``scaler`` (fp16 loss scaling; None: off),
    clips the global gradient norm to ``grad_clip`` (0: off) and updates. ``model`` may be what
    :func:`lorafast.distributed.parallelize` returns (DDP or FSDP2: gradients are averaged over
    the ranks in backward). Returns the loss, a detached 0-dim fp32 tensor on the device
    (reading it is the caller's host sync).

    ``skip_nonfinite``: after backward, check (one host sync; under torch.distributed one
    all-reduce, so that every rank decides alike) that the loss is finite on every rank; if not,
    drop the gradients, leave the parameters and optimizer state alone and return NaN.
    """
    clear_optimizer_state(optimizer, model.redraw_local_(step))
    for g in optimizer.param_groups:
        g["lr"] = lr
    scaler = scaler if scaler is not None else _NO_SCALING
    with autocast if autocast is not None else contextlib.nullcontext():
        # torch.compile(model) compiles forward only; it checks no values under compile (no sync)
        loss = model(x, y) if hasattr(model, "_orig_mod") else model.loss_unchecked(x, y)
    scaler.scale(loss).backward()
    if skip_nonfinite and not _finite_on_every_rank(loss.detach()):
        optimizer.zero_grad(set_to_none=True)
        return torch.full_like(loss.detach(), float("nan"))
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def load_checkpoint(path: str, device: str | torch.device = "cpu", reference: bool = False):
    """Rebuild the model saved in ``path`` (a run folder, one of its checkpoints, saved by one
    process or several, or a model folder); returns ``(model, meta)``. Local tensors are redrawn
    for the saved step. Works across the reference and the accelerated model. Raises
    FileNotFoundError / ValueError naming the file."""
    return checkpoint.load_for_inference(path, model_class(reference), device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: contextlib.AbstractContextManager, world: World | None = None) -> float:
    """Mean loss over validated ``batches``: summed on the device, read once (one host sync).
    Under ``world`` (several processes, each holding its slice of every batch) the sum is
    all-reduced, so every rank returns the mean over the whole batches."""
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    for x, y in batches:
        with autocast:
            total += model.loss_unchecked(x.to(device), y.to(device)).float()
    model.train(was)
    size = world.size if world is not None else 1
    if size > 1:
        world.all_reduce_sum(total)
    return float(total) / (len(batches) * size)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of PyTorch's global generator (dropout) for ``step`` on ``rank``: SplitMix64
    (Steele et al., 2014) finalisers over (seed, step, rank), in [0, 2^63). A function of the
    counters, so a resumed run draws the same masks as an uninterrupted one."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix(mix(mix(seed) ^ step) ^ rank) >> 1


# ------------------------------------------------------------------------------- resuming
def _saved_train_config(meta: dict[str, Any], folder: str) -> dict[str, Any]:
    """The TrainConfig fields saved in checkpoint ``meta`` (fields added since then: defaults)."""
    saved = meta.get("train")
    if not isinstance(saved, dict):
        raise checkpoint.CheckpointError(f"{os.path.join(folder, 'config.json')}: a model folder, not a training "
                                         "checkpoint (no saved training configuration)")
    known = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {**known, **{k: v for k, v in saved.items() if k in known}}


def _resolved(name: str, cfg: dict[str, Any]) -> Any:
    """A run-defining value as the run uses it (defaults resolved, paths made absolute)."""
    v = cfg.get(name)
    if name == "num_heads" and v is None:
        return default_num_heads(cfg["hidden_dim"])
    if name == "ffn_dim" and v is None:
        return 4 * cfg["hidden_dim"]
    if name == "min_lr" and v is None:
        return cfg["lr"] / 10
    if name == "data" and v is not None:
        return os.path.abspath(v)
    if name == "tokenizer" and v not in ("bytes", "bpe"):
        return os.path.abspath(v)  # a tokenizer.json file
    if name == "vocab_size" and cfg.get("tokenizer") != "bpe":
        return None  # read only by --tokenizer bpe
    return v


def _show(name: str, value: Any) -> str:
    return "the built-in corpus" if name == "data" and value is None else repr(value) if isinstance(value, str) else str(value)


def run_conflicts(saved: dict[str, Any], given: dict[str, Any]) -> str | None:
    """None when every run-defining value of ``given`` equals the ``saved`` one, else one line
    naming each flag with both values."""
    full = {**saved, **given}
    diff = [n for n in RUN_FIELDS if n in given and _resolved(n, full) != _resolved(n, saved)]
    if not diff:
        return None
    parts = "; ".join(f"{flag(n)} {_show(n, _resolved(n, saved))}, not {_show(n, _resolved(n, full))}" for n in diff)
    kind = "model" if any(n in MODEL_FIELDS for n in diff) else "training"
    return (f"has another {kind} configuration: it was trained with {parts}. Drop those flags to continue it, "
            "or start a new run (another --out, or --overwrite)")


def _find_resumable(out: str) -> str:
    found = checkpoint.latest(out)
    if found is None:
        why = ("does not exist" if not os.path.exists(out) else "is not a folder" if not os.path.isdir(out)
               else "is empty" if not os.listdir(out) else "holds no checkpoint")
        raise ValueError(f"--resume: nothing to resume: {out} {why} (drop --resume to start a new run)")
    return found


def resume_config(given: dict[str, Any]) -> TrainConfig:
    """The configuration of ``lorafast train --resume``: the run's saved settings, with the
    flags in ``given`` (those typed on the command line) applied. Raises ValueError when there
    is nothing to resume, or when a flag that defines the run has another value than the saved
    one (the message names both)."""
    out = given.get("out", TrainConfig.out)
    folder = _find_resumable(out)
    saved = _saved_train_config(read_config(folder), folder)
    conflict = run_conflicts(saved, {k: v for k, v in given.items() if k in RUN_FIELDS})
    if conflict:
        raise ValueError(f"--resume: the run in {out} {conflict}")
    return TrainConfig(**{**saved, "overwrite": False, **given, "out": out, "resume": True})


def _check_out(cfg: TrainConfig) -> tuple[TrainConfig, str | None, dict[str, Any] | None]:
    """Read-only checks of the run folder (every rank makes them, before anyone writes): returns
    the configuration to run (the saved values of the fields a resumed run keeps), the checkpoint
    folder to resume and its config.json, or (cfg, None, None) for a new run."""
    if cfg.resume:
        folder = _find_resumable(cfg.out)
        meta = read_config(folder)
        saved = _saved_train_config(meta, folder)
        # Fields a resumed run keeps (its tokenizer) count as given only with a non-default value.
        given = {n: getattr(cfg, n) for n in RUN_FIELDS
                 if not (_FIELDS[n].metadata.get("kept_on_resume") and getattr(cfg, n) == _FIELDS[n].default)}
        conflict = run_conflicts(saved, given)
        if conflict:
            raise ValueError(f"--resume: the run in {cfg.out} {conflict}")
        step = int(meta["step"])
        if cfg.steps < step:
            raise ValueError(f"--steps {cfg.steps}: the run in {cfg.out} is already at step {step}; "
                             "--steps can only extend it")
        kept = {n: saved[n] for n, f in _FIELDS.items() if f.metadata.get("kept_on_resume")}
        return dataclasses.replace(cfg, **kept), folder, meta
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out}: a file, not a folder")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        found = checkpoint.latest(cfg.out)
        held = (f"a run (checkpoint of step {read_config(found).get('step')})" if found is not None
                else f"{len(os.listdir(cfg.out))} files")
        raise ValueError(f"--out {cfg.out} already holds {held}; pass --resume to continue it, or --overwrite "
                         "to replace it")
    return cfg, None, None


def _saved_form(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if d["data"] is not None:
        d["data"] = os.path.abspath(d["data"])
    return d


def thread_count() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _comm_failure(e: BaseException) -> bool:
    """An error of a collective (a rank died, a connection broke, a timeout) rather than a bug."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in (
        "gloo", "nccl", "connection", "timed out", "timeout", "peer", "broken pipe", "socket"))


# ------------------------------------------------------------------------------- the loop
_NONE = (1 << 63) - 1  # "no non-finite loss seen"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training loop of ``cfg`` (in one process, or in each process under torchrun);
    returns a summary (losses, time, run folder). Raises ValueError / FileNotFoundError for bad
    settings, data or checkpoints (before any step), :class:`NonFiniteLossError` when the loss
    stops being finite, :class:`RankFailure` when another process of the run dies."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        world = init_world(cfg.device, cfg.dist_timeout)
        try:
            return _train(cfg, world)
        finally:
            world.close()
    finally:
        if cfg.threads is not None:  # the caller's setting again (train is also a library function)
            torch.set_num_threads(threads)


def _train(cfg: TrainConfig, world: World) -> dict[str, Any]:
    say = (lambda msg: print(msg, file=sys.stderr)) if world.is_main else (lambda msg: None)
    cfg, folder, saved_meta = _check_out(cfg)
    if cfg.batch_size % world.size:
        raise ValueError(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over the "
                         f"{world.size} processes")
    dtype = DTYPES[cfg.dtype]
    if cfg.fsdp and world.distributed and dtype == torch.float16:
        raise ValueError("--fsdp with --dtype float16: fp16 loss scaling of sharded gradients is not supported; "
                         "use --dtype bfloat16")
    if cfg.fsdp and not world.distributed:
        say("lorafast: --fsdp has nothing to shard in a single process: training unsharded "
            "(start the run with torchrun --nproc_per_node=N to shard it)")
    # a resumed run keeps its own tokenizer (never retrains its BPE)
    corpus: Corpus = load_corpus(cfg.data, min_len=cfg.seq_len, vocab_size=cfg.vocab_size,
                                 tokenizer=run_tokenizer(cfg.tokenizer, folder or cfg.out, folder is not None))
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    start = int(saved_meta["step"]) if saved_meta else 0
    kept_metrics = checkpoint.read_json_lines(metrics_path, start) if folder else []
    device = world.device
    model = model_class(cfg.reference).from_config(cfg.model_config(corpus.tokenizer.vocab_size))
    model.tokenizer = corpus.tokenizer  # saved with every checkpoint
    corpus.check_vocab(model.config.vocab_size)  # once, so that the steps need no host sync
    net = parallelize(model, world, cfg.fsdp)
    bare = bare_model(net)
    regenerated = sharded_local_names(bare)  # local tensors FSDP2 shards: not in checkpoints
    opt = make_optimizer(cfg, net)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(cfg.seed)
    skipped = 0
    if world.is_main:
        if cfg.overwrite:
            checkpoint.remove_run(cfg.out)
        os.makedirs(cfg.out, exist_ok=True)
    world.barrier()
    if folder is not None:
        rng = gen.get_state()
        meta = checkpoint.load(folder, bare, opt, world, {"rng/batch": rng}, skip=regenerated)
        gen.set_state(rng)
        trainer = meta.get("trainer") or {}
        if trainer.get("data_sha256") and trainer["data_sha256"] != corpus.digest:
            raise ValueError(f"--resume: the data changed since the run in {cfg.out} started ({corpus.source}: "
                             f"sha256 {corpus.digest[:12]}..., saved {trainer['data_sha256'][:12]}...)")
        if scaler.is_enabled() and trainer.get("grad_scaler"):
            scaler.load_state_dict(trainer["grad_scaler"])
        skipped = int(trainer.get("skipped_steps") or 0)
        was = _saved_train_config(meta, folder)["steps"]
        say(f"lorafast: resuming {cfg.out} at step {start} ({folder})")
        if cfg.steps != was:
            say(f"lorafast: the run now ends at step {cfg.steps} instead of {was}: the learning-rate schedule "
                f"is stretched to the new length (lr at step {start}: {lr_at(dataclasses.replace(cfg, steps=was), start):.3g} "
                f"-> {lr_at(cfg, start):.3g}, then "
                + (f"warmup to step {cfg.warmup} and " if start < cfg.warmup else "")
                + f"cosine decay to step {cfg.steps})")
    part = (world.rank, world.size)
    val_gen = torch.Generator().manual_seed((cfg.seed + 1) % (1 << 64))
    val_batches = [corpus.batch("val", cfg.batch_size, cfg.seq_len, val_gen, part) for _ in range(cfg.eval_batches)]
    # nats/token -> bits/byte, over the whole validation batches (every rank's slice)
    full_gen = torch.Generator().manual_seed((cfg.seed + 1) % (1 << 64))
    bpb = bits_per_byte_factor(corpus.tokenizer, [corpus.batch("val", cfg.batch_size, cfg.seq_len, full_gen)[1]
                                                  for _ in range(cfg.eval_batches)])
    n_params = sum(p.numel() for p in bare.global_parameters())
    n_local = sum(t.numel() for t in bare.local_parameters())
    procs = (f", {world.size} processes ({'FSDP2' if cfg.fsdp else 'DDP'}, global batch {cfg.batch_size} = "
             f"{world.size} x {cfg.batch_size // world.size})" if world.distributed else "")
    say(f"lorafast: {type(model).__module__}.LoRA, {n_params:,} global + {n_local:,} local parameters "
        f"(preset {cfg.preset}), data: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} "
        f"val tokens), device {device}, {cfg.dtype}, {thread_count()}{procs}")
    if cfg.preset != "none" and n_local == 0:
        say(f"lorafast: warning: preset {cfg.preset} makes no tensor local in a {cfg.num_layers}-block model "
            "(its rules name none of this model's tensors): this trains a plain Transformer")
    if cfg.warmup >= cfg.steps:
        say(f"lorafast: warning: --warmup {cfg.warmup} >= --steps {cfg.steps}: the learning rate never reaches "
            f"--lr {cfg.lr:g}")
    if start >= cfg.steps:
        say(f"lorafast: the run in {cfg.out} already finished its {start} steps; pass --steps N (N > {start}) "
            "to extend it")
        return {"steps": cfg.steps, "seconds": 0.0, "first_loss": None, "last_loss": None, "losses": [],
                "val_losses": [], "out": cfg.out, "sample": ""}

    metrics = None
    if world.is_main:
        # A fresh run starts a fresh metrics file; a resumed one keeps the records up to its
        # checkpoint (a run killed after it logged further) and appends.
        atomic_write(metrics_path, lambda p: _write_text(p, "".join(line + "\n" for line in kept_metrics)))
        metrics = open(metrics_path, "a")
    losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []

    def log(rec: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    def validate() -> float:
        v = evaluate(net, val_batches, device, autocast, world)
        reshard(net)  # FSDP2's root keeps its parameters gathered after a forward without backward
        return v

    if start == 0:
        v0 = validate()
        val_losses.append((0, v0))
        # Before any update: no training loss, learning rate or throughput yet.
        log({"step": 0, "loss": None, "lr": None, "tokens_per_s": None, "val_loss": v0, "val_bpb": v0 * bpb})
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    show = cfg.progress and world.is_main and tqdm is not None
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True) if show else None
    t_start = time.perf_counter()
    t_log, tok_log = time.perf_counter(), 0
    done = start  # optimizer steps completed
    rng_at_done = gen.get_state()  # batch generator state when `done` steps are complete
    last_checkpoint = start if folder is not None else None
    first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)  # first step with a non-finite loss

    def check_finite() -> None:
        """Stop on a NaN/Inf loss seen on any rank since the last check (one host sync)."""
        if not cfg.skip_nonfinite:
            bad = int(world.all_reduce_min(first_bad.clone()))
            if bad != _NONE:
                raise NonFiniteLossError(bad, cfg.out, last_checkpoint)

    def save(final: bool = False) -> None:
        nonlocal last_checkpoint
        check_finite()  # never save parameters a non-finite step went through
        trainer = {"grad_scaler": scaler.state_dict() if scaler.is_enabled() else None, "skipped_steps": skipped,
                   "data_sha256": corpus.digest, "torch": torch.__version__}
        checkpoint.save(cfg.out, done, bare, opt, world, {"train": _saved_form(cfg), "trainer": trainer},
                        {"rng/batch": rng_at_done}, keep=cfg.keep_checkpoints, skip=regenerated,
                        full_model=final)  # several processes: the whole weights too, at the end
        last_checkpoint = done

    try:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            x, y = corpus.batch("train", cfg.batch_size, cfg.seq_len, gen, part)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            torch.manual_seed(dropout_seed(cfg.seed, step, world.rank))
            loss = train_step(net, opt, x, y, step, lr, scaler=scaler, autocast=autocast, grad_clip=cfg.grad_clip,
                              skip_nonfinite=cfg.skip_nonfinite)
            done, rng_at_done = step + 1, gen.get_state()
            tok_log += x.numel() * world.size
            step_skipped = False
            if cfg.skip_nonfinite:
                if not math.isfinite(float(loss)):  # train_step synchronised already
                    skipped += 1
                    step_skipped = True
                    msg = f"lorafast: step {done}: non-finite loss, batch skipped ({skipped} so far)"
                    (bar.write(msg, file=sys.stderr) if bar is not None else say(msg))
            else:
                first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss), _NONE, done))
            if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1 or (
                    cfg.eval_every and done % cfg.eval_every == 0):
                check_finite()
                if world.distributed:
                    lv = float(world.all_reduce_sum(loss.float().reshape(1).clone())) / world.size
                else:
                    lv = float(loss)
                rec: dict[str, Any] = {"step": done, "loss": None if step_skipped else lv, "lr": lr,
                                       "tokens_per_s": tok_log / (time.perf_counter() - t_log)}
                if not step_skipped:
                    losses.append((done, lv))
                if cfg.skip_nonfinite:
                    rec["skipped_steps"] = skipped
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    rec["val_loss"] = validate()
                    rec["val_bpb"] = rec["val_loss"] * bpb
                    val_losses.append((done, rec["val_loss"]))
                log(rec)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items()
                                     if k in ("loss", "val_loss", "tokens_per_s") and v is not None})
                t_log, tok_log = time.perf_counter(), 0  # evaluation time does not count as training
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                t0 = time.perf_counter()
                save()
                t_log += time.perf_counter() - t0  # nor does writing a checkpoint
    except NonFiniteLossError:
        raise
    except BaseException as e:
        if world.distributed:
            # No checkpoint here: writing one is collective, and a peer may be gone. The run
            # resumes from its last checkpoint.
            if _comm_failure(e):
                raise RankFailure(f"rank {world.rank}: a collective failed after step {done} (another process "
                                  f"of the run died or stopped answering: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); resume "
                                  f"from the last checkpoint with --resume") from e
            raise
        # Nothing is lost on a crash or Ctrl-C: keep the last completed step, with the batch
        # generator where that step left it, so that --resume continues the same run.
        if done > (last_checkpoint or start) and (cfg.skip_nonfinite or int(first_bad) == _NONE):
            save()
            print(f"\nlorafast: interrupted; checkpoint of step {done} written to {cfg.out}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    elapsed = time.perf_counter() - t_start
    save(final=True)
    sample = _sample(cfg, net, bare, world, regenerated)
    if sample is not None:
        print(f"--- sample ---\n{sample}\n--------------")
    summary = {"steps": cfg.steps, "seconds": elapsed, "first_loss": losses[0][1] if losses else None,
               "last_loss": losses[-1][1] if losses else None, "losses": losses, "val_losses": val_losses,
               "out": cfg.out, "sample": sample or "", "skipped_steps": skipped,
               "val_bpb": [(s, v * bpb) for s, v in val_losses]}
    if val_losses and losses:
        say(f"lorafast: {cfg.steps - start} steps in {elapsed:.1f} s; train loss "
            f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; val loss "
            f"{val_losses[0][1]:.3f} (step {val_losses[0][0]}) -> {val_losses[-1][1]:.3f} (step {val_losses[-1][0]}), "
            f"{val_losses[-1][1] * bpb:.3f} bits per byte; checkpoint in {cfg.out}")
    return summary


def _sample(cfg: TrainConfig, net: torch.nn.Module, bare: torch.nn.Module, world: World,
            regenerated: set[str]) -> str | None:
    """The final sample (rank 0; None elsewhere or when ``sample_tokens`` is 0). Under FSDP2 the
    full weights are gathered into a whole model on rank 0 first (every rank takes part)."""
    if not cfg.sample_tokens:
        return None
    model = bare
    if regenerated or any(hasattr(p, "device_mesh") for p in bare.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not world.is_main:
            return None
        model = model_class(cfg.reference).from_config(bare.config)
        model.load_state_dict({k: v for k, v in full.items() if k not in regenerated})
        model.to(world.device)
    elif not world.is_main:
        return None
    model.redraw_local_(cfg.steps)
    tok = bare.tokenizer
    prompt = tok.encode(cfg.prompt or "\n")[None].to(world.device)  # [1, P]
    out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                         generator=torch.Generator(device=world.device).manual_seed(cfg.seed))
    return tok.decode(out[0])

"""Training with Local Random Initialization: an importable loop, driven by one dataclass.

One step (:func:`train_step`, shared with ``lorafast bench model``): redraw the local tensors
for the step (``model.redraw_local_(step)``), compute the loss, backpropagate, clip, update; no
host synchronisation (the corpus is validated once, when it is loaded). AdamW or SGD; linear warmup then cosine decay; periodic evaluation
on the held-out split; metrics appended to ``OUT/metrics.jsonl``; checkpoints (safetensors +
JSON) written atomically every ``checkpoint_every`` steps, at the end, and when the run is
interrupted or crashes, so nothing is lost; ``resume=True`` continues from ``OUT``.
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

from lorafast.config import DEFAULT_PRESET, DTYPES, PRESETS, ModelConfig
from lorafast.corpus import VOCAB_SIZE, Corpus, load_corpus
from lorafast.hub import atomic_write, load_model, read_config, save_model
from lorafast.tokenizer import bits_per_byte_factor, run_tokenizer


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    # run
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(16, "sequences per batch")
    seq_len: int = _f(128, "tokens per sequence")
    # model
    embedding_dim: int = _f(128, "token embedding width")
    hidden_dim: int = _f(128, "Transformer width")
    num_layers: int = _f(4, "Transformer blocks")
    num_heads: int | None = _f(None, "attention heads (default: heads of 64, 32 or 16 dims)")
    ffn_dim: int | None = _f(None, "MLP width (default 4 x hidden_dim)")
    dropout: float = _f(0.0, "dropout on embeddings and residual branches")
    preset: str = _f(DEFAULT_PRESET, "which parameters are local", choices=sorted(PRESETS))
    reference: bool = _f(False, "train the pure-PyTorch reference model instead of the accelerated one")
    # optimisation
    optimizer: str = _f("adamw", "optimizer", choices=["adamw", "sgd"])
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float | None = _f(None, "final learning rate of the cosine decay (default lr / 10)")
    warmup: int = _f(50, "linear warmup steps")
    weight_decay: float = _f(0.1, "decoupled weight decay on matrices (AdamW) or L2 (SGD)")
    momentum: float = _f(0.9, "SGD momentum")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    # evaluation, logging, checkpoints
    eval_every: int = _f(100, "evaluate on the validation split every N steps")
    eval_batches: int = _f(8, "validation batches per evaluation")
    log_every: int = _f(10, "append metrics every N steps")
    checkpoint_every: int = _f(250, "write a checkpoint every N steps (0: only at the end)")
    # environment
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = _f("float32", "compute dtype (autocast when not float32)", choices=list(DTYPES))
    seed: int = _f(0, "seed of the model (global init, local draws) and of the batches")
    out: str = _f("runs/lorafast", "output folder: metrics.jsonl, checkpoint")
    data: str | None = _f(None, "train on this UTF-8 text file instead of the built-in corpus")
    tokenizer: str = _f("bytes", "bytes, bpe (train a byte-level BPE on the training split) or a tokenizer.json file")
    vocab_size: int = _f(8192, "vocabulary of --tokenizer bpe")
    resume: bool = _f(False, "continue the run found in --out")
    sample_tokens: int = _f(200, "tokens generated at the end")
    prompt: str = _f("def ", "prompt of the final sample")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or (self.min_lr is not None and self.min_lr < 0):
            raise ValueError("lr must be > 0 and min_lr >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {sorted(PRESETS)}")

    def model_config(self, vocab_size: int = VOCAB_SIZE) -> ModelConfig:
        return ModelConfig(vocab_size, self.embedding_dim, self.hidden_dim, self.num_layers,
                           num_heads=self.num_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
                           dropout=self.dropout, local=self.preset, seed=self.seed)


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
    d = torch.device(device)
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               step: int, lr: float, *, scaler: torch.amp.GradScaler | None = None,
               autocast: contextlib.AbstractContextManager | None = None, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimizer step of training with Local Random Initialization, without host sync.

    Redraws the local tensors for ``step`` (clearing the optimizer state of re-initialised
    adapters), sets the learning rate ``lr`` on every parameter group, computes the loss of ids
    ``x`` against targets ``y`` (int64 [B, T] on the model's device, already validated:
    ``model.loss_unchecked``, or the compiled forward ``model(x, y)`` of a
    ``torch.compile``-d model), backpropagates through ``scaler`` (fp16 loss scaling; None: off),
    clips the global gradient norm to ``grad_clip`` (0: off) and updates. Returns the loss, a
    detached 0-dim fp32 tensor on the device (reading it is the caller's host sync).
    """
    clear_optimizer_state(optimizer, model.redraw_local_(step))
    for g in optimizer.param_groups:
        g["lr"] = lr
    scaler = scaler if scaler is not None else _NO_SCALING
    with autocast if autocast is not None else contextlib.nullcontext():
        # torch.compile(model) compiles forward only; it checks no values under compile (no sync)
        loss = model(x, y) if hasattr(model, "_orig_mod") else model.loss_unchecked(x, y)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def save_checkpoint(out: str, model: torch.nn.Module, step: int, train_cfg: TrainConfig | None = None,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> None:
    """The model folder (:func:`lorafast.hub.save_model`, with the training configuration under
    ``"train"``) plus ``optimizer.pt``: the optimizer state and ``extra`` (e.g. the batch
    generator state), loaded back with ``weights_only=True``."""
    if optimizer is not None:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "optimizer.pt"), lambda p: torch.save(
            {"optimizer": optimizer.state_dict(), **(extra or {})}, p))
    save_model(out, model, step, {"train": dataclasses.asdict(train_cfg) if train_cfg is not None else None})


def load_checkpoint(path: str, device: str | torch.device = "cpu", reference: bool = False):
    """Rebuild the model saved in folder ``path``; returns ``(model, meta)``. Local tensors are
    redrawn for the saved step. Works across the reference and the accelerated model."""
    return load_model(path, model_class(reference), device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean loss over validated ``batches``: summed on the device, read once (one host sync)."""
    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    for x, y in batches:
        with autocast:
            total += model.loss_unchecked(x.to(device), y.to(device)).float()
    model.train(was)
    return float(total) / len(batches)


def _resume_state(cfg: TrainConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
                  gen: torch.Generator, device: torch.device) -> int:
    """Load the run in ``cfg.out`` into model, optimizer and batch generator; return its step."""
    from safetensors.torch import load_file

    meta = read_config(cfg.out)
    saved = ModelConfig.from_dict(meta["model"])
    if saved != model.config:
        diff = [f"{k}: saved {a!r}, asked {b!r}" for k, a, b in
                ((k, saved.to_dict()[k], model.config.to_dict()[k]) for k in saved.to_dict()) if a != b]
        raise ValueError(f"--resume: the run in {cfg.out} has another model configuration ({'; '.join(diff)}); "
                         "pass the same model flags, or another --out")
    model.load_state_dict(load_file(os.path.join(cfg.out, "model.safetensors")))
    opt_path = os.path.join(cfg.out, "optimizer.pt")
    if os.path.isfile(opt_path):
        state = torch.load(opt_path, map_location=device, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        if "batch_rng" in state:
            gen.set_state(state["batch_rng"].cpu())
    return int(meta["step"])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training loop of ``cfg``; returns a summary (losses, time, output folder)."""
    device = resolve_device(cfg.device)
    corpus: Corpus = load_corpus(cfg.data, min_len=cfg.seq_len, tokenizer=run_tokenizer(cfg.tokenizer, cfg.out, cfg.resume),
                                 vocab_size=cfg.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = model_class(cfg.reference).from_config(cfg.model_config(corpus.tokenizer.vocab_size)).to(device)
    model.tokenizer = corpus.tokenizer  # saved with every checkpoint
    corpus.check_vocab(model.config.vocab_size)  # once, so that the steps need no host sync
    opt = make_optimizer(cfg, model)
    start = 0
    if cfg.resume and os.path.isfile(os.path.join(cfg.out, "config.json")):
        start = _resume_state(cfg, model, opt, gen, device)
    os.makedirs(cfg.out, exist_ok=True)
    val_gen = torch.Generator().manual_seed(cfg.seed + 1)
    val_batches = [corpus.batch("val", cfg.batch_size, cfg.seq_len, val_gen) for _ in range(cfg.eval_batches)]
    bpb = bits_per_byte_factor(corpus.tokenizer, [y for _, y in val_batches])  # nats/token -> bits/byte
    dtype = DTYPES[cfg.dtype]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n_params = sum(p.numel() for p in model.global_parameters())
    n_local = sum(t.numel() for t in model.local_parameters())
    print(f"lorafast: {type(model).__module__}.LoRA, {n_params:,} global + {n_local:,} local parameters "
          f"(preset {cfg.preset}), data: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} "
          f"val tokens), device {device}, {cfg.dtype}", file=sys.stderr)

    # A fresh run starts a fresh metrics file; a resumed one appends to it.
    metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a" if start else "w")
    losses: list[tuple[int, float]] = []
    val_losses: list[tuple[int, float]] = []
    if start == 0:
        v0 = evaluate(model, val_batches, device, autocast)
        val_losses.append((0, v0))
        # Before any update: no training loss, learning rate or throughput yet.
        metrics.write(json.dumps({"step": 0, "loss": None, "lr": None, "tokens_per_s": None, "val_loss": v0,
                                  "val_bpb": v0 * bpb}) + "\n")
        metrics.flush()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True) if tqdm else None
    t_start = time.perf_counter()
    t_log, tok_log = time.perf_counter(), 0
    done = start  # optimizer steps completed
    rng_at_done = gen.get_state()  # batch generator state when `done` steps are complete

    def checkpoint() -> None:
        save_checkpoint(cfg.out, model, done, cfg, opt, {"batch_rng": rng_at_done})

    try:
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            x, y = corpus.batch("train", cfg.batch_size, cfg.seq_len, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = train_step(model, opt, x, y, step, lr, scaler=scaler, autocast=autocast, grad_clip=cfg.grad_clip)
            done, rng_at_done = step + 1, gen.get_state()
            tok_log += x.numel()
            if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1 or (
                    cfg.eval_every and done % cfg.eval_every == 0):
                lv = float(loss.detach())
                losses.append((done, lv))
                rec: dict[str, Any] = {"step": done, "loss": lv, "lr": lr,
                                       "tokens_per_s": tok_log / (time.perf_counter() - t_log)}
                if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                    rec["val_loss"] = evaluate(model, val_batches, device, autocast)
                    rec["val_bpb"] = rec["val_loss"] * bpb
                    val_losses.append((done, rec["val_loss"]))
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k in ("loss", "val_loss", "tokens_per_s")})
                t_log, tok_log = time.perf_counter(), 0  # evaluation time does not count as training
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                t0 = time.perf_counter()
                checkpoint()
                t_log += time.perf_counter() - t0  # nor does writing a checkpoint
    except BaseException:
        # Nothing is lost on a crash or Ctrl-C: keep the last completed step, with the batch
        # generator where that step left it, so that --resume continues the same run.
        if done > start:
            checkpoint()
            print(f"\nlorafast: interrupted; checkpoint of step {done} written to {cfg.out}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    elapsed = time.perf_counter() - t_start
    checkpoint()
    sample = ""
    if cfg.sample_tokens:
        model.redraw_local_(cfg.steps)
        prompt = corpus.tokenizer.encode(cfg.prompt or "\n")[None].to(device)  # [1, P]
        out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                             generator=torch.Generator(device=device).manual_seed(cfg.seed))
        sample = corpus.tokenizer.decode(out[0])
        print(f"--- sample ---\n{sample}\n--------------")
    summary = {"steps": cfg.steps, "seconds": elapsed, "first_loss": losses[0][1] if losses else None,
               "last_loss": losses[-1][1] if losses else None, "losses": losses, "val_losses": val_losses,
               "out": cfg.out, "sample": sample, "val_bpb": [(s, v * bpb) for s, v in val_losses]}
    if val_losses and losses:
        print(f"lorafast: {cfg.steps - start} steps in {elapsed:.1f} s; train loss "
              f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; val loss "
              f"{val_losses[0][1]:.3f} (step {val_losses[0][0]}) -> {val_losses[-1][1]:.3f} (step {val_losses[-1][0]}), "
              f"{val_losses[-1][1] * bpb:.3f} bits per byte; "
              f"checkpoint in {cfg.out}", file=sys.stderr)
    return summary

"""Fine-tuning a trained language model for text classification: ``lorafast finetune``.

:func:`finetune` loads a language-model folder (``lorafast train --out``) into a
:class:`~lorafast.classification.LoRAForSequenceClassification`, trains it on labelled texts with
the training step of :mod:`lorafast.train` (so Local Random Initialization applies as in
training: the local tensors are redrawn at every step, continuing the run's step count, under
the checkpoint's local rules or those of ``--preset``), reports accuracy and macro-F1 on a
held-out split beside the majority-class baseline, and writes a classifier folder that
``LoRAForSequenceClassification.from_pretrained`` loads.

Data: a CSV (header row) or JSONL file with a text column and a label column (``--data``), the
held-out split from ``--test-data`` or a seeded random ``--test-fraction`` of it. Without
``--data``, the built-in demonstration task (:func:`builtin_demo`).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import json
import os
import sys
import time
from typing import Any, Sequence

import torch

from lorafast.checkpoint import resolve as resolve_checkpoint
from lorafast.classification import LoRAForSequenceClassification, pad_batch
from lorafast.config import DTYPES, PRESETS
from lorafast.corpus import BUILTIN, DOC_SEP
from lorafast.hub import save_model
from lorafast.model import LoRA as AcceleratedLoRA
from lorafast.train import lr_at, make_optimizer, resolve_device, train_step


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class FinetuneConfig:
    # model and data
    checkpoint: str = _f("runs/lorafast", "language-model folder written by lorafast train --out")
    data: str | None = _f(None, "CSV or JSONL file of labelled texts (default: the built-in demo task)")
    text_column: str = _f("text", "column (CSV) or key (JSONL) of the texts")
    label_column: str = _f("label", "column (CSV) or key (JSONL) of the labels")
    test_data: str | None = _f(None, "held-out CSV/JSONL file (default: --test-fraction of --data)")
    test_fraction: float = _f(0.1, "share of --data held out for testing, drawn with --seed")
    max_len: int | None = _f(None, "tokens per example, longer ones keep their first (default: the model's max_seq_len)")
    preset: str | None = _f(None, "local rules while fine-tuning (default: the checkpoint's own)", choices=sorted(PRESETS))
    reference: bool = _f(False, "fine-tune the pure-PyTorch reference model instead of the accelerated one")
    # optimisation
    steps: int = _f(600, "optimizer steps")
    batch_size: int = _f(32, "examples per batch")
    optimizer: str = _f("adamw", "optimizer", choices=["adamw", "sgd"])
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float | None = _f(None, "final learning rate of the cosine decay (default lr / 10)")
    warmup: int = _f(30, "linear warmup steps")
    weight_decay: float = _f(0.01, "decoupled weight decay on matrices (AdamW) or L2 (SGD)")
    momentum: float = _f(0.9, "SGD momentum")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    # evaluation, output
    eval_every: int = _f(100, "evaluate on the held-out split every N steps (0: only at the end)")
    eval_batch_size: int = _f(64, "examples per evaluation batch")
    log_every: int = _f(10, "append the training loss to metrics.jsonl every N steps")
    checkpoint_every: int = _f(0, "write the classifier folder every N steps (0: only at the end)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = _f("float32", "compute dtype (autocast when not float32)", choices=list(DTYPES))
    seed: int = _f(0, "seed of the split, the batches and the score layer's placement in the run")
    out: str = _f("runs/finetune", "output folder: metrics.jsonl and the classifier")
    overwrite: bool = _f(False, "replace what --out holds (refused otherwise)")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.lr <= 0 or (self.min_lr is not None and self.min_lr < 0):
            raise ValueError("lr must be > 0 and min_lr >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {sorted(PRESETS)}")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
Rows = list[tuple[str, str]]  # (text, label name)


def read_rows(path: str, text_column: str, label_column: str) -> Rows:
    """(text, label) pairs of a CSV file (``.csv``, header row; ``.tsv`` tab-separated) or a JSONL
    file (``.jsonl``/``.json``, one object per line). Labels become strings. Raises
    FileNotFoundError, or ValueError naming the file and line of a missing column or bad row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    rows: Rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            for col in (text_column, label_column):
                if col not in (reader.fieldnames or []):
                    raise ValueError(f"{path}: no column {col!r} (columns: {reader.fieldnames})")
            records = ((reader.line_num, r) for r in reader)
        elif ext in (".jsonl", ".json"):
            def parse():
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            records = parse()
        else:
            raise ValueError(f"{path}: expected a .csv, .tsv or .jsonl file")
        for n, r in records:
            if not isinstance(r, dict) or text_column not in r or label_column not in r:
                raise ValueError(f"{path}:{n}: needs the keys {text_column!r} and {label_column!r}")
            text, label = r[text_column], r[label_column]
            if not isinstance(text, str) or not text or label is None or label == "":
                raise ValueError(f"{path}:{n}: empty or non-text {text_column!r}, or empty {label_column!r}")
            rows.append((text, str(label)))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def builtin_demo(num_modules: int = 10, snippet_bytes: int = 256, test_fraction: float = 0.05) -> tuple[Rows, Rows]:
    """The built-in task: which standard-library module a ``snippet_bytes``-byte snippet of the
    built-in corpus comes from, over its ``num_modules`` largest modules.

    Each module's source (less the corpus's header line, which names the module) is split into
    two disjoint regions by the rule of the corpus for a user's file: the first 95 % trains, the
    last 5 % (``test_fraction``) is held out. Snippets are the consecutive, non-overlapping
    ``snippet_bytes`` windows of each region (a trailing partial window is dropped; bytes of a
    character cut at a window's edge are dropped), so no held-out snippet shares a byte with a
    training snippet. Returns (train rows, test rows) of (text, module name)."""
    with gzip.open(BUILTIN, "rb") as f:
        docs = f.read().decode("utf-8").split(DOC_SEP)
    bodies = []
    for d in docs:
        header, _, body = d.partition("\n")
        name = header.rsplit(" ", 1)[-1].removesuffix(".py")
        bodies.append((len(body.encode("utf-8")), name, body.encode("utf-8")))
    largest = sorted(bodies, key=lambda x: (-x[0], x[1]))[:num_modules]
    train: Rows = []
    test: Rows = []
    for _, name, data in largest:
        cut = int(len(data) * (1 - test_fraction))
        for rows, region in ((train, data[:cut]), (test, data[cut:])):
            for i in range(0, len(region) - snippet_bytes + 1, snippet_bytes):
                rows.append((region[i:i + snippet_bytes].decode("utf-8", errors="ignore"), name))
    return train, test


def _split(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(len(rows) * fraction))
    if n_test >= len(rows):
        raise ValueError(f"--data has {len(rows)} examples: too few to hold {fraction:.0%} out")
    return [rows[i] for i in perm[n_test:]], [rows[i] for i in perm[:n_test]]


def _label_order(names: set[str]) -> list[str]:
    """Label names in id order: numerically when every name is an integer, else alphabetically."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def encode_rows(rows: Rows, tokenizer, label2id: dict[str, int], max_len: int, pad_token_id: int | None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token ids (first ``max_len``) and label ids of ``rows``. Raises ValueError for a text that
    has no token, an unknown label, or a text whose last kept token is the padding id (it would
    be taken for padding)."""
    seqs, labels = [], []
    for n, (text, label) in enumerate(rows):
        ids = tokenizer.encode(text)[:max_len]
        if len(ids) == 0:
            raise ValueError(f"example {n}: the text has no token")
        if pad_token_id is not None and int(ids[-1]) == pad_token_id:
            raise ValueError(f"example {n}: the text ends with the padding token (id {pad_token_id})")
        if label not in label2id:
            raise ValueError(f"example {n}: label {label!r} is not among the training labels {sorted(label2id)}")
        seqs.append(ids)
        labels.append(label2id[label])
    return seqs, torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over the classes present in
    ``y_true`` or ``y_pred`` (scikit-learn's ``f1_score(average="macro")``; a class never
    predicted scores 0)."""
    classes = sorted(set(y_true) | set(y_pred))
    scores = []
    for c in classes:
        tp = sum(1 for a, b in zip(y_true, y_pred) if a == c and b == c)
        fp = sum(1 for a, b in zip(y_true, y_pred) if a != c and b == c)
        fn = sum(1 for a, b in zip(y_true, y_pred) if a == c and b != c)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@torch.no_grad()
def predict_ids(model: LoRAForSequenceClassification, seqs: list[torch.Tensor], batch_size: int,
                device: torch.device, autocast: contextlib.AbstractContextManager) -> list[int]:
    """Predicted label ids of ``seqs`` with the model's current local draws."""
    was = model.training
    model.eval()
    preds: list[int] = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[i:i + batch_size], model.pad_token_id or 0)
        with autocast:
            preds += model(ids.to(device), mask.to(device)).argmax(-1).tolist()
    model.train(was)
    return preds


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def with_local_rules(model: LoRAForSequenceClassification, preset: str) -> LoRAForSequenceClassification:
    """The classifier rebuilt with the local rules of ``preset``: every tensor of the old model
    (trained weights and the current values of its local tensors) is copied where the new model
    has a tensor of that name and shape; the new model's local tensors are then drawn for the
    current step. Returns ``model`` itself when the rules are already those."""
    lm = model.transformer
    cfg = dataclasses.replace(lm.config, local=preset)
    if cfg.local.rules == lm.config.local.rules:
        return model
    kwargs = {"impl": lm.impl} if isinstance(lm, AcceleratedLoRA) else {}
    new = type(lm).from_config(cfg, **kwargs).to(lm.tok_emb.weight.device)
    old = {**dict(lm.named_parameters()), **dict(lm.named_buffers())}
    with torch.no_grad():
        for name, t in [*new.named_parameters(), *new.named_buffers()]:
            if name in old and old[name].shape == t.shape:
                t.copy_(old[name])
    new.local_tensors.current_draw.clear()  # copied values are not draws: draw every local tensor
    new.redraw_local_(lm.local_step)
    new.tokenizer = lm.tokenizer
    out = LoRAForSequenceClassification(new, model.num_labels, id2label=model.id2label, pad_token_id=model.pad_token_id)
    out.score.load_state_dict(model.score.state_dict())
    return out


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the fine-tuning of ``cfg``; returns a summary (metrics, baseline, time, folder)."""
    t0 = time.perf_counter()
    # A local folder only (no Hub lookup for a mistyped path), and nothing silently replaced.
    lm_folder = resolve_checkpoint(cfg.checkpoint)
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise ValueError(f"--out {cfg.out} is not empty (a fine-tuning run is there?): pass --overwrite to "
                         "replace it, or another --out")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a file, not a folder")
    device = resolve_device(cfg.device)
    if cfg.data is None:
        train_rows, test_rows = builtin_demo()
        source = "built-in demo (10 largest standard-library modules, 256-byte snippets, last 5 % of each held out)"
    else:
        rows = read_rows(cfg.data, cfg.text_column, cfg.label_column)
        if cfg.test_data is not None:
            train_rows, test_rows = rows, read_rows(cfg.test_data, cfg.text_column, cfg.label_column)
        else:
            train_rows, test_rows = _split(rows, cfg.test_fraction, cfg.seed)
        source = cfg.data
    names = _label_order({label for _, label in train_rows})
    label2id = {n: i for i, n in enumerate(names)}
    model = LoRAForSequenceClassification.from_pretrained(
        lm_folder, num_labels=len(names), id2label=dict(enumerate(names)), reference=cfg.reference,
        map_location=str(device))
    if cfg.preset is not None:
        model = with_local_rules(model, cfg.preset)
    model.train()
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{cfg.checkpoint}: the checkpoint names no tokenizer, so texts cannot be encoded")
    max_len = min(cfg.max_len or model.config.max_seq_len, model.config.max_seq_len)
    train_x, train_y = encode_rows(train_rows, tok, label2id, max_len, model.pad_token_id)
    test_x, test_y = encode_rows(test_rows, tok, label2id, max_len, model.pad_token_id)

    majority = int(torch.bincount(train_y, minlength=len(names)).argmax())
    truth = test_y.tolist()
    baseline = {"label": names[majority], "accuracy": accuracy(truth, [majority] * len(truth)),
                "macro_f1": macro_f1(truth, [majority] * len(truth))}
    opt = make_optimizer(cfg, model)
    dtype = DTYPES[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    base = model.local_step  # the draws continue the language model's run
    print(f"lorafast finetune: {type(model.transformer).__module__}.LoRA from {cfg.checkpoint} (step {base}, "
          f"preset {model.config.local.name}), {len(names)} labels, data: {source} ({len(train_rows):,} train / "
          f"{len(test_rows):,} test examples, <= {max_len} tokens each), device {device}, {cfg.dtype}", file=sys.stderr)

    os.makedirs(cfg.out, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)

    def evaluate(step: int) -> dict[str, Any]:
        pred = predict_ids(model, test_x, cfg.eval_batch_size, device, autocast)
        return {"step": step, "accuracy": accuracy(truth, pred), "macro_f1": macro_f1(truth, pred)}

    def checkpoint(metrics: dict[str, Any] | None) -> None:
        save_model(cfg.out, model, extra={"finetune": {**dataclasses.asdict(cfg), "base_step": base},
                                           "metrics": metrics, "baseline": baseline})

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, unit="step", dynamic_ncols=True) if tqdm else None
    evals: list[dict[str, Any]] = []
    losses: list[tuple[int, float]] = []
    t_train = time.perf_counter()
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as log:
        try:
            for i in range(cfg.steps):
                idx = torch.randint(0, len(train_x), (cfg.batch_size,), generator=gen).tolist()
                x, _ = pad_batch([train_x[j] for j in idx], model.pad_token_id or 0)
                y = train_y[idx]
                lr = lr_at(cfg, i)
                loss = train_step(model, opt, x.to(device), y.to(device), base + i, lr, scaler=scaler,
                                  autocast=autocast, grad_clip=cfg.grad_clip)
                done = i + 1
                rec: dict[str, Any] = {"step": done, "lr": lr}
                if done % cfg.log_every == 0 or done == cfg.steps:
                    rec["loss"] = float(loss)  # the host sync of this step
                    losses.append((done, rec["loss"]))
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    evals.append(evaluate(done))
                    rec.update(evals[-1])
                if len(rec) > 2:
                    log.write(json.dumps(rec) + "\n")
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k in ("loss", "accuracy", "macro_f1")})
                if bar is not None:
                    bar.update(1)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    checkpoint(evals[-1] if evals else None)
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - t_train
        # The saved classifier holds the draws of the step after the last one (as lorafast train's
        # checkpoints); evaluate with exactly those, so that from_pretrained reproduces the figures.
        model.redraw_local_(base + cfg.steps)
        final = evaluate(cfg.steps)
        evals.append(final)
        log.write(json.dumps({**final, "baseline": baseline}) + "\n")
    checkpoint(final)
    seconds = time.perf_counter() - t0
    print(f"lorafast finetune: {cfg.steps} steps in {train_seconds:.1f} s ({seconds:.1f} s in all); held-out accuracy "
          f"{final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f} on {len(truth)} examples (majority class "
          f"{baseline['label']!r}: accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}); "
          f"classifier in {cfg.out}", file=sys.stderr)
    return {"accuracy": final["accuracy"], "macro_f1": final["macro_f1"], "baseline": baseline, "evals": evals,
            "losses": losses, "labels": names, "n_train": len(train_rows), "n_test": len(test_rows),
            "train_seconds": train_seconds, "seconds": seconds, "out": cfg.out}

"""The preset study (issue 12): does Local Random Initialization hold up?

``lorafast study`` (or ``python -m lorafast.study``) trains, from one seed list, one data set
(the built-in corpus) and one model size, every configuration of :func:`study_configs`:

* ``none`` (every parameter global) and every other preset of :data:`lorafast.local.PRESETS`
  (a preset added there joins the study by itself);
* two custom configurations that make a larger share of the parameters local
  (:data:`CUSTOM_CONFIGS`: the FFN input projection of *every* block, and both FFN projections
  of every block), so that the study traces the quality/compute trade-off of the document's
  method and not one point;
* ``gpt2``: a ``transformers`` GPT-2 of equal size (:func:`lorafast.gpt2.gpt2_like`; skipped
  with a one-line reason when ``transformers`` is absent: ``pip install -e ".[compare]"``);

in two regimes, with every seed:

``steps``
    Equal optimizer steps (``--steps``), the same schedule (linear warmup, cosine decay to
    lr/10) and optimizer (AdamW) as ``lorafast train``, through its own functions
    (:func:`lorafast.train.train_step`, :func:`~lorafast.train.make_optimizer`,
    :func:`~lorafast.train.lr_at`, :func:`~lorafast.train.evaluate`). Losses are deterministic
    given the seeds (on one machine and thread count).
``time``
    Equal training-time budget: the time ``none`` takes for ``--steps`` steps. Each
    configuration gets ``round(budget / its step time)`` steps, with the schedule fitted to that
    length (a cosine schedule cut short by a timer would handicap the faster configurations).
    Step times are medians from one interleaved timing of every configuration in one process
    (:func:`calibrate`, kept in ``OUT/calibration.json``; on ``--clock wall``, or ``cpu``:
    process CPU time, steadier on a shared machine), so that neither a stall of the machine
    cuts one run short nor a change of load between runs made hours apart tilts the plan; each
    record carries the time its run actually took. Every configuration runs again in this
    regime, ``none`` too (same losses as in the steps regime), so that the times on its plot
    are measured under one condition.

Each run is a fresh process (``--jobs`` at a time, ``--threads`` intra-op threads each) that
writes one JSON record ``OUT/records/<regime>/<config>/seed<k>.json``; a study that is interrupted
continues where it stopped (finished records are kept), and ``--report-only`` regenerates the
report from the records alone: ``OUT/REPORT.md`` (tables, verdicts, the proposed default
preset), ``OUT/summary.json``, the plots ``OUT/val_bpb_vs_step.png`` and
``OUT/val_bpb_vs_time.png`` (matplotlib: ``pip install -e ".[plot]"``), and with
``--readme README.md`` the README section between ``<!-- study:begin -->`` and
``<!-- study:end -->``.

Per run: validation bits per byte over steps and over time, step time, tokens/s, trainable
parameters, optimizer-state bytes, checkpoint bytes, analytic FLOPs per step
(:func:`train_flops`) and peak memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Iterable

import torch
import torch.nn as nn

from lorafast.config import DTYPES
from lorafast.hub import write_json
from lorafast.local import DEFAULT_PRESET, PRESETS, LocalConfig, LocalRule, resolve_local
from lorafast.provenance import git_commit, loadavg, status_kb
from lorafast.reference import LocalLinear

LN2 = math.log(2.0)
REFERENCE = "none"  # all-global training: the baseline every configuration is compared with
GPT2 = "gpt2"
VAL_SEED = 20261129  # one fixed validation set for every configuration and seed (paired comparisons)
REGIMES = ("steps", "time")
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
RECORDS = "records"  # OUT/records/<regime>/<config>/seed<k>.json
CALIBRATION = "calibration.json"  # OUT/calibration.json: interleaved step times of the equal-time plan
PLOTS = {"steps": "val_bpb_vs_step.png", "time": "val_bpb_vs_time.png"}

# Custom configurations: a larger share of the parameters local than any preset, in the
# document's mode (redrawn every batch), so that the study shows the trade-off.
CUSTOM_CONFIGS: dict[str, tuple[str, tuple[LocalRule, ...]]] = {
    "ffn-in-all": ("FFN input projections of every block, redrawn every batch",
                   (LocalRule("blocks.*.mlp.fc_in.weight"),)),
    "ffn-all": ("FFN input and output projections of every block, redrawn every batch",
                (LocalRule("blocks.*.mlp.fc_in.weight"), LocalRule("blocks.*.mlp.fc_out.weight"))),
}

# Model sizes. "cpu": the default model of `lorafast train`, sized so that the whole study
# (8 configurations x 3 seeds x 2 regimes) takes about 40 minutes on 2 idle CPU cores.
# "gpu": larger, for a GPU (not yet measured).
SCALES: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=400, batch_size=16, seq_len=128, hidden_dim=128, num_layers=4, eval_every=50,
                eval_batches=8, dtype="float32"),
    "gpu": dict(steps=3000, batch_size=32, seq_len=256, hidden_dim=384, num_layers=6, eval_every=250,
                eval_batches=32, dtype="bfloat16"),
}


def study_configs(num_layers: int, with_gpt2: bool = True) -> dict[str, LocalConfig | None]:
    """Every configuration of the study, in report order: each preset (``none`` first), the
    custom configurations, then ``gpt2`` (value None: not a lorafast model)."""
    out: dict[str, LocalConfig | None] = {REFERENCE: resolve_local(REFERENCE, num_layers)}
    for name in PRESETS:
        out.setdefault(name, resolve_local(name, num_layers))
    for name, (_, rules) in CUSTOM_CONFIGS.items():
        out[name] = LocalConfig(rules=rules, name=name)
    if with_gpt2:
        out[GPT2] = None
    return out


def describe(name: str) -> str:
    """One line saying what ``name`` makes local."""
    if name == GPT2:
        return "transformers GPT-2 of equal size, every parameter trained"
    if name in CUSTOM_CONFIGS:
        return CUSTOM_CONFIGS[name][0]
    return {"none": "nothing: every parameter global", "ffn-alt": "FFN input projections of blocks 1, 3, ..., redrawn every batch",
            "reservoir": "FFN input projections of blocks 1, 3, ..., drawn once, never trained",
            "branch": "random rank-4 branch on every block projection, redrawn every batch",
            "merge": "trained rank-8 adapters on every block projection, merged and redrawn every 20 batches",
            }.get(name, f"preset {name}")


# --------------------------------------------------------------------------------------------
# Cost accounting
# --------------------------------------------------------------------------------------------
def weight_matrices(model: nn.Module) -> list[tuple[str, int, int, bool]]:
    """``(name, fan_in, fan_out, trained)`` of every weight matrix that multiplies each token's
    activations: ``LocalLinear`` weights and their low-rank factors, ``nn.Linear`` and the
    ``Conv1D`` layers of transformers' GPT-2 (weight [in, out]). ``trained``: the matrix is a
    parameter that takes a gradient (False for local tensors of redraw/frozen rules, which are
    buffers, and for base weights held fixed under merge adapters). Embedding lookups are no
    GEMM and are not listed."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LocalLinear):
            w = m._parameters.get("weight")
            out.append((f"{name}.weight", m.in_features, m.out_features, w is not None and w.requires_grad))
            if m.kind is not None:
                for attr, fan_in, fan_out in (("down", m.in_features, m.rank), ("up", m.rank, m.out_features)):
                    t = getattr(m, attr)
                    out.append((f"{name}.{attr}", fan_in, fan_out, isinstance(t, nn.Parameter) and t.requires_grad))
        elif isinstance(m, nn.Linear):
            out.append((f"{name}.weight", m.in_features, m.out_features, m.weight.requires_grad))
        elif type(m).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]
            fan_in, fan_out = m.weight.shape
            out.append((f"{name}.weight", fan_in, fan_out, m.weight.requires_grad))
    return out


def train_flops(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, int]:
    """Analytic FLOPs of one training step (forward + backward) on a [batch_size, seq_len] batch.

    With N = batch_size * seq_len tokens and a weight matrix of fan_in x fan_out
    (:func:`weight_matrices`), a multiply-add counting 2 FLOPs (Kaplan et al. 2020, "Scaling
    laws for neural language models", sec. 2.1: C ~ 6N per token; Hoffmann et al. 2022,
    appendix F):

    * forward: ``2 N fan_in fan_out``;
    * backward, input gradient: ``2 N fan_in fan_out`` (every matrix: the embeddings below are
      trained, so the gradient must reach them);
    * backward, weight gradient: ``2 N fan_in fan_out`` only for *trained* matrices; the
      weight-gradient GEMM of a local (redraw/frozen) tensor or of a base weight under a merge
      adapter is skipped (``weight_grad_skipped``);
    * attention scores and values: forward ``4 N L T C`` (QK^T and AV, ``2 T C`` FLOPs per token
      and layer each, the full T x T square as PaLM counts it: Chowdhery et al. 2022, appendix B,
      ``6N + 12 L H Q T`` per token for training), backward twice the forward.

    Not counted: layer norms, GELU, softmax, the loss, the optimizer update, the redraw, and any
    recomputation (these are model FLOPs, as in MFU). ``tests/test_study.py`` checks the total
    against ``torch.utils.flop_counter.FlopCounterMode`` on the reference model. Returns ints:
    ``forward``, ``backward_input``, ``backward_weight``, ``weight_grad_skipped``, ``total``.
    """
    n = batch_size * seq_len
    mats = weight_matrices(model)
    gemm = sum(2 * n * i * o for _, i, o, _ in mats)
    dw = sum(2 * n * i * o for _, i, o, trained in mats if trained)
    cfg = model.config
    attn = 4 * n * cfg.num_layers * seq_len * cfg.hidden_dim
    return {"forward": gemm + attn, "backward_input": gemm + 2 * attn, "backward_weight": dw,
            "weight_grad_skipped": gemm - dw, "total": 2 * gemm + dw + 3 * attn}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (AdamW: two moments per trained element)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, train_cfg) -> dict[str, int]:
    """Bytes on disk of a resumable checkpoint, per file. lorafast models: what ``lorafast
    train`` writes (:func:`lorafast.checkpoint.save`, one process: local tensors of redraw/frozen
    rules are regenerated, not stored). GPT-2: its weights with ``safetensors.torch.save_model``
    (tied embeddings stored once, as ``save_pretrained`` does) and the optimizer state, as
    ``torch.save``."""
    from lorafast.gpt2 import GPT2Baseline

    tmp = tempfile.mkdtemp(prefix="lorafast-study-")
    try:
        if isinstance(model, GPT2Baseline):
            from safetensors.torch import save_model

            folder = tmp
            save_model(model, os.path.join(folder, "model.safetensors"))
            torch.save({"optimizer": optimizer.state_dict()}, os.path.join(folder, "optimizer.pt"))
        else:
            from lorafast import checkpoint
            from lorafast.distributed import World, sharded_local_names

            folder = checkpoint.save(tmp, 0, model, optimizer, World(), {"train": dataclasses.asdict(train_cfg)},
                                     {"rng/batch": torch.Generator().get_state()}, skip=sharded_local_names(model))
        return {os.path.relpath(os.path.join(d, f), folder): os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(folder) for f in sorted(files)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PeakMemory:
    """Peak memory of a training run above what the process held before the model was built:
    parameters, gradients, optimizer state, activations. CUDA: ``max_memory_allocated``. CPU
    (Linux): the growth of the resident set's high-water mark ``VmHWM``, reset at the start
    (``/proc/self/clear_refs``), so it includes the allocator's slack; None elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.base = status_kb("VmRSS") * 1024
        except OSError:
            self.base = None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        return max(0, status_kb("VmHWM") * 1024 - self.base)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
def build_model(config: str, local: dict | None, train_cfg) -> nn.Module:
    """The model of study configuration ``config`` (``local``: its LocalConfig as a dict; None
    for gpt2), of the size in ``train_cfg`` (a :class:`lorafast.train.TrainConfig`)."""
    mc = train_cfg.model_config()
    if config == GPT2:
        from lorafast.gpt2 import gpt2_like

        return gpt2_like(mc)
    import lorafast

    return lorafast.LoRA.from_config(dataclasses.replace(mc, local=LocalConfig.from_dict(local)))


def run_one(spec: dict[str, Any], stop_after: int | None = None) -> dict[str, Any]:
    """Train one configuration for one seed as ``spec`` says (:meth:`Study.spec`) and return
    its record (written to ``spec["path"]`` unless ``stop_after``: run only the first
    ``stop_after`` steps of the same schedule, for tests; nothing is written)."""
    from lorafast.corpus import load_corpus
    from lorafast.train import TrainConfig, evaluate, lr_at, make_optimizer, resolve_device, train_step

    torch.set_num_threads(spec["threads"])
    load0 = loadavg()
    cfg = TrainConfig(**spec["train"])
    device = resolve_device(cfg.device)
    corpus = load_corpus(None, min_len=cfg.seq_len)
    val_gen = torch.Generator().manual_seed(VAL_SEED)
    val = [tuple(t.to(device) for t in corpus.batch("val", cfg.batch_size, cfg.seq_len, val_gen))
           for _ in range(cfg.eval_batches)]
    dtype = DTYPES[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else _null()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    _warm_up(spec, cfg, device)  # imports and the libraries' lazy set-up are not the model's memory
    memory = PeakMemory(device)
    model = build_model(spec["config"], spec["local"], cfg).to(device)
    opt = make_optimizer(cfg, model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_steps = set(spec["eval_steps"])
    wall = cpu = 0.0
    step_wall: list[float] = []
    step_cpu: list[float] = []
    curve = [{"step": 0, "seconds": 0.0, "cpu_seconds": 0.0, "train_bpb": None,
              "val_bpb": evaluate(model, val, device, autocast) / LN2}]
    last = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    for step in range(last):
        x, y = corpus.batch("train", cfg.batch_size, cfg.seq_len, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(model, opt, x, y, step, lr_at(cfg, step), scaler=scaler, autocast=autocast,
                          grad_clip=cfg.grad_clip)
        sync()
        step_wall.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
        wall += step_wall[-1]
        cpu += step_cpu[-1]
        if step + 1 in eval_steps:
            curve.append({"step": step + 1, "seconds": wall, "cpu_seconds": cpu, "train_bpb": float(loss) / LN2,
                          "val_bpb": evaluate(model, val, device, autocast) / LN2})
    # In a process that ran other runs before (jobs 0) the allocator reuses their memory: no figure.
    peak = memory.peak() if spec.get("jobs") != 0 else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    n_local = sum(t.numel() for t in (model.local_parameters() if hasattr(model, "local_parameters") else ()))
    ckpt = checkpoint_bytes(model, opt, cfg)
    tokens = cfg.batch_size * cfg.seq_len
    record = {
        "config": spec["config"], "regime": spec["regime"], "seed": cfg.seed, "steps": cfg.steps,
        "description": describe(spec["config"]), "spec": spec,
        "curve": curve, "final_val_bpb": curve[-1]["val_bpb"],
        "train_seconds": wall, "train_cpu_seconds": cpu,
        "step_ms": _quantiles(step_wall), "step_cpu_ms": _quantiles(step_cpu),
        "tokens_per_s": tokens / (_quantiles(step_wall)["median"] / 1e3),
        "trainable_params": n_train, "parameters": n_all, "local_elements": n_local,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        # parameters, buffers (local tensors included), one gradient per trained element, optimizer state
        "state_bytes": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) + optimizer_state_bytes(opt),
        "checkpoint_bytes": sum(ckpt.values()), "checkpoint_files": ckpt,
        "flops_per_step": train_flops(model, cfg.batch_size, cfg.seq_len),
        "peak_memory_bytes": peak,
        "env": {"machine": machine(device), "device": str(device), "torch": torch.__version__,
                "transformers": _version("transformers"), "python": platform.python_version(),
                "threads": torch.get_num_threads(), "commit": git_commit(),
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "loadavg_start": load0, "loadavg_end": loadavg()},
    }
    if stop_after is None:
        os.makedirs(os.path.dirname(spec["path"]), exist_ok=True)
        write_json(spec["path"], record)
    return record


def _warm_up(spec: dict[str, Any], cfg, device: torch.device) -> None:
    """One training step of a tiny model of the same kind, so that imports and the lazy set-up
    of torch's kernels happen before the peak-memory baseline (and keep little memory)."""
    from lorafast.train import make_optimizer, train_step

    tiny = dataclasses.replace(cfg, batch_size=2, seq_len=16, embedding_dim=32, hidden_dim=32, num_heads=2,
                               ffn_dim=None)
    model = build_model(spec["config"], spec["local"], tiny).to(device)
    ids = torch.zeros(2, 16, dtype=torch.long, device=device)
    train_step(model, make_optimizer(tiny, model), ids, ids, 0, 1e-4)
    del model
    import gc

    gc.collect()


def _null():
    import contextlib

    return contextlib.nullcontext()


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _quantiles(seconds: list[float]) -> dict[str, float]:
    """Median and 20/80 % quantiles, in milliseconds (the first step, which warms caches and
    allocates the optimizer state, is left out when there are others)."""
    xs = sorted(seconds[1:] if len(seconds) > 1 else seconds)
    if not xs:
        return {"median": float("nan"), "p20": float("nan"), "p80": float("nan")}

    def q(p: float) -> float:
        return 1e3 * xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]

    return {"median": 1e3 * statistics.median(xs), "p20": q(0.2), "p80": q(0.8)}


def calibrate(specs: list[dict[str, Any]], rounds: int = 5, steps_per_round: int = 6,
              warmup: int = 3) -> dict[str, Any]:
    """Median step time (ms, wall and process CPU) of each run of ``specs`` (one per
    configuration), measured in this process *interleaved*: ``rounds`` times, each configuration
    in turn takes ``steps_per_round`` training steps (after ``warmup`` untimed ones), so that a
    change of load on a shared machine touches every configuration alike. The equal-time plan
    uses these times: the steps regime's runs, hours apart on a busy machine, are not comparable."""
    from lorafast.corpus import load_corpus
    from lorafast.train import TrainConfig, lr_at, make_optimizer, resolve_device, train_step

    torch.set_num_threads(specs[0]["threads"])
    load0 = loadavg()
    runs = []
    for spec in specs:
        cfg = TrainConfig(**spec["train"])
        device = resolve_device(cfg.device)
        model = build_model(spec["config"], spec["local"], cfg).to(device)
        runs.append((spec["config"], cfg, device, model, make_optimizer(cfg, model)))
    corpus = load_corpus(None, min_len=runs[0][1].seq_len)
    gen = torch.Generator().manual_seed(VAL_SEED + 1)
    batches = [corpus.batch("train", runs[0][1].batch_size, runs[0][1].seq_len, gen) for _ in range(4)]
    wall: dict[str, list[float]] = {c: [] for c, *_ in runs}
    cpu: dict[str, list[float]] = {c: [] for c, *_ in runs}
    step = 0
    for r in range(rounds + 1):  # round 0: warm-up, not timed
        for name, cfg, device, model, opt in runs:
            dtype = DTYPES[cfg.dtype]
            autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else _null()
            for k in range(warmup if r == 0 else steps_per_round):
                x, y = (t.to(device) for t in batches[(step + k) % len(batches)])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                train_step(model, opt, x, y, step + k, lr_at(cfg, step + k), autocast=autocast, grad_clip=cfg.grad_clip)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        step += steps_per_round
    return {"wall_ms": {c: 1e3 * statistics.median(v) for c, v in wall.items()},
            "cpu_ms": {c: 1e3 * statistics.median(v) for c, v in cpu.items()},
            "rounds": rounds, "steps_per_round": steps_per_round,
            "env": {"machine": machine(runs[0][2]), "threads": torch.get_num_threads(), "commit": git_commit(),
                    "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "loadavg_start": load0, "loadavg_end": loadavg()}}


def _run_in_child(spec: dict[str, Any]) -> str:
    run_one(spec)
    return spec["path"]


# --------------------------------------------------------------------------------------------
# The study: plan, run, resume
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Study:
    """One study: configurations x seeds x regimes of one model size, recorded under ``out``."""

    out: str = "study"
    configs: tuple[str, ...] | None = None  # None: every configuration of study_configs
    seeds: tuple[int, ...] = (0, 1, 2)
    regimes: tuple[str, ...] = REGIMES
    scale: str = "cpu"
    steps: int | None = None  # None: the scale's value (same for the fields below)
    batch_size: int | None = None
    seq_len: int | None = None
    hidden_dim: int | None = None
    num_layers: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    dtype: str | None = None
    device: str = "auto"
    clock: str = "wall"  # the clock of the equal-time budget: "wall" or "cpu" (process CPU time)
    budget_s: float | None = None  # None: the time `none` takes for `steps` steps
    threads: int = 1
    jobs: int | None = None  # None: min(2, cores // threads) on CPU, 1 on CUDA; 0: in this process

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; known: {sorted(SCALES)}")
        for k, v in SCALES[self.scale].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for k in ("steps", "batch_size", "seq_len", "hidden_dim", "num_layers", "eval_every", "eval_batches", "threads"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad or not self.regimes:
            raise ValueError(f"regimes must be a non-empty subset of {REGIMES}, got {self.regimes}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        known = study_configs(self.num_layers)
        names = list(known) if self.configs is None else list(self.configs)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown study configuration {unknown[0]!r}; known: {list(known)}")
        self.configs = tuple(n for n in known if n in names)  # report order
        self.skipped: dict[str, str] = {}
        if GPT2 in self.configs:
            from lorafast.gpt2 import INSTALL_HINT, transformers_available

            if not transformers_available():
                self.skipped[GPT2] = INSTALL_HINT
                self.configs = tuple(n for n in self.configs if n != GPT2)
        if self.jobs is None:
            cuda = self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())
            self.jobs = 1 if cuda else max(1, min(2, (os.cpu_count() or 1) // self.threads))

    def train_fields(self, seed: int, steps: int) -> dict[str, Any]:
        """The :class:`lorafast.train.TrainConfig` fields of one run: the loop's own defaults for
        the optimizer and schedule, this study's size."""
        return dict(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, embedding_dim=self.hidden_dim,
                    hidden_dim=self.hidden_dim, num_layers=self.num_layers, eval_batches=self.eval_batches,
                    device=self.device, dtype=self.dtype, seed=seed, preset=REFERENCE, progress=False,
                    sample_tokens=0)

    def spec(self, config: str, seed: int, regime: str, steps: int, plan: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything one run needs (a finished record is reused when its spec has the same
        :func:`identity`); ``plan``: the equal-time plan, for the time regime."""
        intervals = max(1, self.steps // self.eval_every)
        if regime == "steps":
            evals = list(range(self.eval_every, steps + 1, self.eval_every))
        else:  # the same number of evaluations, evenly spread over the run
            evals = [round(k * steps / intervals) for k in range(1, intervals + 1)]
        evals = sorted({s for s in evals if s >= 1} | {steps})
        local = study_configs(self.num_layers)[config]
        spec = {"config": config, "regime": regime, "local": None if local is None else local.to_dict(),
                "train": self.train_fields(seed, steps), "eval_steps": evals, "threads": self.threads,
                "jobs": self.jobs, "path": os.path.join(self.out, RECORDS, regime, config, f"seed{seed}.json")}
        if plan is not None:
            spec.update(clock=plan["clock"], budget_s=plan["budget_s"])
        return spec

    # ------------------------------------------------------------------ running
    def run(self, log=print) -> int:
        """Run every missing run of the study (both regimes); returns how many ran."""
        for name, why in self.skipped.items():
            log(f"study: skipping {name}: {why}")
        # the time regime needs the step times of the steps regime: that one runs first in any case
        ran = self._execute([self.spec(c, s, "steps", self.steps) for c in self.configs for s in self.seeds], log)
        if "time" in self.regimes:
            plan = self.time_plan(self.calibration(log))
            log(f"study: equal-time budget {plan['budget_s']:.1f} s ({plan['clock']} clock): "
                + ", ".join(f"{c} {n}" for c, n in plan["steps"].items()) + " steps")
            ran += self._execute([self.spec(c, s, "time", plan["steps"][c], plan)
                                  for c in self.configs for s in self.seeds], log)
        return ran

    def time_plan(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """Steps per configuration for the equal-time regime: ``round(budget / step time)``, with
        the step times of ``calibration`` (:meth:`calibration`) on ``clock`` and the budget
        ``--budget-s`` or the time ``none`` takes for ``steps`` steps."""
        step_s = {c: calibration["cpu_ms" if self.clock == "cpu" else "wall_ms"][c] / 1e3 for c in self.configs}
        ref = REFERENCE if REFERENCE in step_s else self.configs[0]
        budget = self.budget_s if self.budget_s is not None else self.steps * step_s[ref]
        steps = {c: max(1, round(budget / t)) for c, t in step_s.items()}
        return {"clock": self.clock, "budget_s": budget, "reference": ref, "step_seconds": step_s, "steps": steps}

    def calibration(self, log=print) -> dict[str, Any]:
        """Step times of every configuration for the equal-time plan, measured once
        (:func:`calibrate`) and kept in ``OUT/calibration.json`` for a resumed study."""
        path = os.path.join(self.out, CALIBRATION)
        specs = [self.spec(c, self.seeds[0], "steps", self.steps) for c in self.configs]
        key = [identity(s) for s in specs]
        old = _read(path, missing_ok=True)
        if old is not None and old["specs"] == key:
            return old
        log(f"study: timing {len(specs)} configurations, interleaved, for the equal-time plan")
        cal = {**calibrate(specs), "specs": key}
        os.makedirs(self.out, exist_ok=True)
        write_json(path, cal)
        return cal

    def _execute(self, specs: list[dict[str, Any]], log) -> int:
        todo = []
        for spec in specs:
            rec = _read(spec["path"], missing_ok=True)
            if rec is not None and identity(rec["spec"]) == identity(spec):
                continue  # finished earlier with the same settings: resume past it
            if rec is not None:
                log(f"study: {spec['path']} was made with other settings; running it again")
            todo.append(spec)
        if not todo:
            return 0
        t0 = time.perf_counter()

        def done(i: int, spec: dict[str, Any]) -> None:
            r = _read(spec["path"])
            log(f"study: [{i}/{len(todo)}] {spec['regime']:5s} {spec['config']:11s} seed {r['seed']}: "
                f"{r['steps']} steps, val {r['final_val_bpb']:.4f} bits/byte, {r['step_ms']['median']:.0f} ms/step "
                f"({r['step_cpu_ms']['median']:.0f} ms CPU), {time.perf_counter() - t0:.0f} s elapsed")

        if self.jobs == 0:
            for i, spec in enumerate(todo, 1):
                run_one(spec)
                done(i, spec)
            return len(todo)
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=mp.get_context("spawn"),
                                    max_tasks_per_child=1) as pool:  # a fresh process per run: its own peak memory
            from lorafast.study import _run_in_child as child  # by module name, also under python -m

            futures = {pool.submit(child, s): s for s in todo}
            try:
                for i, f in enumerate(cf.as_completed(futures), 1):
                    f.result()
                    done(i, futures[f])
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return len(todo)


def identity(spec: dict[str, Any]) -> dict[str, Any]:
    """What a finished run's spec must match for its record to be reused: everything but where
    it is stored and how many runs shared the machine."""
    return {k: v for k, v in spec.items() if k not in ("path", "jobs")}


def _read(path: str, missing_ok: bool = False) -> dict[str, Any] | None:
    if missing_ok and not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Statistics, report, plots
# --------------------------------------------------------------------------------------------
def load_records(out: str) -> list[dict[str, Any]]:
    """Every record under ``out/records`` (sorted by regime, config, seed)."""
    recs = []
    root = os.path.join(out, RECORDS)
    for dirpath, _, files in os.walk(root):
        recs += [_read(os.path.join(dirpath, f)) for f in files if f.endswith(".json")]
    return sorted(recs, key=lambda r: (r["regime"], r["config"], r["seed"]))


def mean_spread(xs: list[float]) -> tuple[float, float]:
    """Mean and spread (sample standard deviation, n - 1; 0 for one value) over seeds."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """``a`` against ``b`` (final bits/byte by seed): mean difference over the seeds both have
    (paired: same batches, same validation set), its spread, and the verdict. A difference
    smaller than the larger of the two configurations' spreads over seeds is a ``tie``;
    otherwise ``better`` (lower) or ``worse``. With one seed there is no spread: the verdict is
    ``better``/``worse`` with ``n == 1``. ``lower``: the seeds where ``a`` is below ``b``."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    delta, d_spread = mean_spread(d)
    spread = max(mean_spread([a[s] for s in seeds])[1], mean_spread([b[s] for s in seeds])[1])
    verdict = "tie" if abs(delta) < spread else ("better" if delta < 0 else "worse")
    return {"delta": delta, "delta_spread": d_spread, "spread": spread, "verdict": verdict, "n": len(seeds),
            "lower": sum(x < 0 for x in d)}


def summary_of(out: str) -> dict[str, Any]:
    """:func:`summarize` of the records and the calibration in ``out``."""
    records = load_records(out)
    if not records:
        raise ValueError(f"no study records under {os.path.join(out, RECORDS)}: run `lorafast study --out {out}` first")
    return summarize(records, _read(os.path.join(out, CALIBRATION), missing_ok=True))


def summarize(records: list[dict[str, Any]], calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Aggregates of the records: per regime and configuration, the final bits/byte by seed, its
    mean and spread, comparisons with ``none`` and ``gpt2``, costs (deterministic ones from
    any seed, timings as medians over seeds), mean curves; plus the proposed default preset.
    ``calibration`` (:func:`calibrate`): its interleaved step times become the step-time costs
    (``time_ms``, ``time_cpu_ms``, ``time_tokens_per_s``; else the runs' medians), since runs made
    at different times of a shared machine's load are not comparable."""
    by: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by.setdefault(r["regime"], {}).setdefault(r["config"], []).append(r)
    order = [c for c in study_configs(records[0]["spec"]["train"]["num_layers"]) if any(c in v for v in by.values())] \
        if records else []
    out: dict[str, Any] = {"regimes": {}, "configs": order}
    for regime, configs in by.items():
        rows = {}
        for c in order:
            if c not in configs:
                continue
            rs = sorted(configs[c], key=lambda r: r["seed"])
            final = {r["seed"]: r["final_val_bpb"] for r in rs}
            m, s = mean_spread(list(final.values()))
            r0 = rs[0]
            rows[c] = {
                "final": final, "mean": m, "spread": s, "steps": r0["steps"], "description": r0["description"],
                "step_ms": statistics.median(r["step_ms"]["median"] for r in rs),
                "step_cpu_ms": statistics.median(r["step_cpu_ms"]["median"] for r in rs),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "train_seconds": statistics.median(r["train_seconds"] for r in rs),
                "train_cpu_seconds": statistics.median(r["train_cpu_seconds"] for r in rs),
                "peak_memory_bytes": _median_or_none(r["peak_memory_bytes"] for r in rs),
                **{k: r0[k] for k in ("trainable_params", "parameters", "local_elements", "optimizer_state_bytes",
                                      "checkpoint_bytes")},
                "flops_per_step": r0["flops_per_step"]["total"], "clock": r0["spec"].get("clock", "wall"),
                "budget_s": r0["spec"].get("budget_s"),
                "weight_grad_skipped": r0["flops_per_step"]["weight_grad_skipped"],
                "curve": _mean_curve(rs),
            }
            cal = calibration is not None and c in calibration["wall_ms"]
            tokens = r0["spec"]["train"]["batch_size"] * r0["spec"]["train"]["seq_len"]
            rows[c]["time_ms"] = calibration["wall_ms"][c] if cal else rows[c]["step_ms"]
            rows[c]["time_cpu_ms"] = calibration["cpu_ms"][c] if cal else rows[c]["step_cpu_ms"]
            rows[c]["time_tokens_per_s"] = tokens / rows[c]["time_ms"] * 1e3
            rows[c]["time_source"] = "calibration" if cal else "runs"
        for c, row in rows.items():
            for ref in (REFERENCE, GPT2):
                if ref in rows and ref != c:
                    row[f"vs_{ref}"] = compare(row["final"], rows[ref]["final"])
        out["regimes"][regime] = rows
    out["env"] = _env_summary(records)
    out["setup"] = {k: records[0]["spec"]["train"][k] for k in ("batch_size", "seq_len", "hidden_dim", "num_layers",
                                                                "eval_batches", "dtype")} if records else {}
    if "steps" in by and by["steps"]:
        out["setup"]["steps"] = next(iter(by["steps"].values()))[0]["steps"]
    out["calibration_env"] = calibration.get("env") if calibration else None
    out["default"] = propose_default(out)
    return out


def _median_or_none(xs: Iterable) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mean_curve(rs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Mean over seeds at each evaluation (runs of one configuration evaluate at the same steps),
    with the lowest and highest seed."""
    pts = []
    for i, p in enumerate(rs[0]["curve"]):
        vals = [r["curve"][i]["val_bpb"] for r in rs]
        pts.append({"step": p["step"], "seconds": statistics.fmean(r["curve"][i]["seconds"] for r in rs),
                    "cpu_seconds": statistics.fmean(r["curve"][i]["cpu_seconds"] for r in rs),
                    "val_bpb": statistics.fmean(vals), "lo": min(vals), "hi": max(vals)})
    return pts


def _env_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {}
    envs = [r["env"] for r in records]
    loads = [x for e in envs for x in (e["loadavg_start"], e["loadavg_end"]) if x is not None]
    times = sorted(e["time"] for e in envs)
    return {"machine": sorted({e["machine"] for e in envs}), "device": sorted({e["device"] for e in envs}),
            "torch": sorted({e["torch"] for e in envs}), "transformers": sorted({str(e["transformers"]) for e in envs}),
            "commit": sorted({e["commit"] for e in envs}), "threads": sorted({e["threads"] for e in envs}),
            "first": times[0], "last": times[-1], "loadavg": [min(loads), max(loads)] if loads else None,
            "jobs": records[0]["spec"].get("jobs")}


def propose_default(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The default preset the results support: among the presets that make some parameters
    local (every preset but ``none``; the method is the product), the one with the lowest mean
    validation bits/byte at equal training time (quality for its compute; equal steps when the
    time regime is absent); among presets that tie with it, the one with the fewest FLOPs per
    step. Returns its name, the basis and its comparisons with ``none``, or None."""
    regime = "time" if "time" in summary["regimes"] else "steps"
    rows = summary["regimes"].get(regime, {})
    cands = [c for c in rows if c in PRESETS and c != REFERENCE]
    if not cands:
        return None
    best = min(cands, key=lambda c: rows[c]["mean"])
    tied = [c for c in cands if c == best or compare(rows[c]["final"], rows[best]["final"])["verdict"] == "tie"]
    pick = min(tied, key=lambda c: (rows[c]["flops_per_step"], rows[c]["mean"]))
    return {"preset": pick, "regime": regime, "best_mean": best, "tied_with_best": sorted(tied),
            "current": DEFAULT_PRESET,
            **{f"vs_{ref}": {rg: summary["regimes"][rg][pick].get(f"vs_{ref}") for rg in summary["regimes"]
                             if pick in summary["regimes"][rg]} for ref in (REFERENCE, GPT2)}}


def _mb(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.2f} MB"


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.0f}%" if ref else "–"


def _cmp_cell(cmp: dict[str, Any] | None) -> str:
    if cmp is None:
        return "–"
    side = f"lower in {cmp['lower']}/{cmp['n']}" if cmp["delta"] < 0 else f"higher in {cmp['n'] - cmp['lower']}/{cmp['n']}"
    return f"{cmp['delta']:+.3f} ± {cmp['delta_spread']:.3f} ({cmp['verdict']}; {side} seeds)"


def render_report(summary: dict[str, Any], image_dir: str = ".") -> str:
    """The report as Markdown (the README section and REPORT.md): where and when it was
    measured, the quality and cost tables, the plots (paths under ``image_dir``), the verdicts
    and the proposed default. A pure function of the records."""
    env, regs = summary["env"], summary["regimes"]
    steps_rows, time_rows = regs.get("steps", {}), regs.get("time", {})
    rows0 = steps_rows or time_rows
    if not rows0:
        return "No study records yet: run `lorafast study`.\n"
    seeds = sorted({s for rows in regs.values() for r in rows.values() for s in r["final"]})
    load = env.get("loadavg")
    cores = os.cpu_count()
    busy = ""
    if load:
        busy = (f" Load average during the runs: {load[0]:.1f}–{load[1]:.1f}"
                + (" — **a busy, shared machine: wall times and the equal-time budget are unreliable; "
                   "re-run on a quiet machine**." if load[1] > 1.5 * (cores or 1) else "."))
    lines = [
        f"Measured {env['first'][:10]}{'' if env['first'][:10] == env['last'][:10] else ' to ' + env['last'][:10]} (UTC) on {', '.join(env['machine'])} "
        f"({', '.join(env['device'])}, {', '.join(map(str, env['threads']))} thread(s) per run, "
        f"{env.get('jobs') or 1} run(s) at a time), torch "
        f"{', '.join(env['torch'])}, transformers {', '.join(env['transformers'])}, commit {', '.join(env['commit'])}.{busy}",
        "",
    ]
    su = summary["setup"]
    lines += [f"Model: the default of `lorafast train` scaled as run: {su['num_layers']} blocks, width {su['hidden_dim']}, "
              f"{su['batch_size']} x {su['seq_len']} bytes per step, {su.get('steps', '?')} steps, {su['dtype']}, "
              f"AdamW with the loop's schedule (warmup, cosine to lr/10); validation on {su['eval_batches']} fixed batches "
              f"of held-out bytes, the same for every run.", ""]
    lines += [f"Seeds {', '.join(map(str, seeds))}; spread = standard deviation over seeds; Δ = mean paired "
              f"difference (same seed) ± its spread; **tie** = |Δ| smaller than the larger spread of the two.", ""]
    ref_t = time_rows.get(REFERENCE)
    plan_note = ""
    if time_rows and ref_t:
        plan_note = (f" Equal time: each configuration trains for {ref_t['budget_s']:.1f} s ({ref_t['clock']} clock), the time "
                     f"`none` takes for {ref_t['steps']} steps, converted into its own step count with the step times "
                     f"of the interleaved timing (cost table).")
    lines += ["**Quality** (validation bits per byte, lower is better)." + plan_note, ""]
    head = "| config | what is local | equal steps | Δ vs none | Δ vs GPT-2 |"
    sep = "|---|---|---|---|---|"
    if time_rows:
        head += " equal time: steps | bits/byte | Δ vs none | Δ vs GPT-2 |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for c in summary["configs"]:
        r = steps_rows.get(c)
        t = time_rows.get(c)
        desc = (r or t)["description"]
        cell = (f"{r['mean']:.3f} ± {r['spread']:.3f}" if r else "–")
        row = f"| `{c}` | {desc} | {cell} | {_cmp_cell(r and r.get('vs_none'))} | {_cmp_cell(r and r.get('vs_gpt2'))} |"
        if time_rows:
            row += (f" {t['steps']} | {t['mean']:.3f} ± {t['spread']:.3f} | {_cmp_cell(t.get('vs_none'))} | "
                    f"{_cmp_cell(t.get('vs_gpt2'))} |" if t else " – | – | – | – |")
        lines.append(row)
    ref = rows0.get(REFERENCE)
    timing = ("the interleaved timing of every configuration in one process (`calibration.json`), the one the "
              "equal-time plan uses" if ref and ref["time_source"] == "calibration" else
              "median over seeds of each run's median step")
    lines += ["", f"**Cost** per training step (FLOPs: analytic, `lorafast.study.train_flops`; times: {timing}; "
              "memory: peak above the process before the model was built).", "",
              "| config | trainable params | GFLOP/step | dW GEMMs skipped | ms/step (wall) | ms/step (CPU) | "
              "tokens/s | optimizer state | checkpoint | peak memory |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["configs"]:
        r = rows0.get(c)
        if r is None:
            continue
        rel = (lambda k: f" ({_pct(r[k], ref[k])})" if ref and c != REFERENCE and r.get(k) and ref.get(k) else "")
        lines.append(
            f"| `{c}` | {r['trainable_params']:,}{rel('trainable_params')} | {r['flops_per_step'] / 1e9:.2f}{rel('flops_per_step')} | "
            f"{r['weight_grad_skipped'] / 1e9:.2f} | {r['time_ms']:.0f}{rel('time_ms')} | {r['time_cpu_ms']:.0f}{rel('time_cpu_ms')} | "
            f"{r['time_tokens_per_s']:,.0f} | {_mb(r['optimizer_state_bytes'])}{rel('optimizer_state_bytes')} | "
            f"{_mb(r['checkpoint_bytes'])}{rel('checkpoint_bytes')} | {_mb(r['peak_memory_bytes'])}{rel('peak_memory_bytes')} |")
    lines.append("")
    for regime in ("steps", "time"):
        if regime in regs:
            lines.append(f"![validation bits/byte vs {'step' if regime == 'steps' else 'training time'}]"
                         f"({_join(image_dir, PLOTS[regime])})")
    lines += ["", "**Verdicts** (generated from the tables above).", ""]
    lines += [f"- {v}" for v in verdicts(summary)]
    d = summary.get("default")
    if d:
        lines += ["", "**Default preset.** " + default_paragraph(summary)]
    return "\n".join(lines) + "\n"


def _join(a: str, b: str) -> str:
    return b if a in ("", ".") else f"{a.rstrip('/')}/{b}"


def verdicts(summary: dict[str, Any]) -> list[str]:
    """One sentence per configuration: what it saves against all-global training and what it
    costs in quality, at equal steps and equal time, and where it stands against GPT-2."""
    regs = summary["regimes"]
    rows0 = regs.get("steps") or regs.get("time")
    ref = rows0.get(REFERENCE)
    out = []
    for c in summary["configs"]:
        if c == REFERENCE or c not in rows0:
            continue
        r = rows0[c]
        saves = []
        if ref:
            for key, what in (("flops_per_step", "FLOPs/step"), ("peak_memory_bytes", "peak memory"),
                              ("optimizer_state_bytes", "optimizer state"), ("checkpoint_bytes", "checkpoint bytes"),
                              ("time_ms", "wall time/step"), ("time_cpu_ms", "CPU time/step")):
                if r.get(key) is not None and ref.get(key):
                    saves.append(f"{what} {_pct(r[key], ref[key])}")
        quality = []
        for regime, label in (("steps", "equal steps"), ("time", "equal time")):
            row = regs.get(regime, {}).get(c)
            if row is None:
                continue
            parts = []
            for key, name in (("vs_none", "all-global"), ("vs_gpt2", "GPT-2")):
                cmp = row.get(key)
                if cmp:
                    word = {"tie": "ties", "better": "beats", "worse": "is worse than"}[cmp["verdict"]]
                    parts.append(f"{word} {name} ({cmp['delta']:+.3f} bits/byte)")
            if parts:
                quality.append(f"at {label} it {' and '.join(parts)}")
        name = "GPT-2" if c == GPT2 else f"`{c}`"
        out.append(f"{name}: against all-global training, " + (", ".join(saves) if saves else "no cost figures")
                   + ("; " + "; ".join(quality) if quality else "") + ".")
    # The document's question in one controlled pair: the same tensors, redrawn every batch or drawn once.
    parts = []
    for regime, label in (("steps", "equal steps"), ("time", "equal time")):
        rows = regs.get(regime, {})
        if "ffn-alt" in rows and "reservoir" in rows:
            cmp = compare(rows["ffn-alt"]["final"], rows["reservoir"]["final"])
            side = cmp["lower"] if cmp["delta"] < 0 else cmp["n"] - cmp["lower"]
            parts.append(f"{cmp['delta']:+.3f} ± {cmp['delta_spread']:.3f} bits/byte at {label} ({cmp['verdict']}; "
                         f"{'lower' if cmp['delta'] < 0 else 'higher'} in {side}/{cmp['n']} seeds)")
    if parts:
        out.append("Re-initialising every batch against drawing once, on the same tensors (`ffn-alt` against "
                   "`reservoir`: equal savings): " + ", ".join(parts) + ".")
    return out


def default_paragraph(summary: dict[str, Any]) -> str:
    """The paragraph that chooses the default preset (:func:`propose_default`) from the results."""
    d = summary["default"]
    regs = summary["regimes"]
    rows = regs[d["regime"]]
    p = d["preset"]
    label = "equal training time" if d["regime"] == "time" else "equal steps"
    others = [c for c in d["tied_with_best"] if c != p]
    text = (f"Among the presets that make some parameters local, `{p}` reaches the lowest validation loss "
            f"at {label}" if p == d["best_mean"] else
            f"Among the presets that make some parameters local, `{d['best_mean']}` has the lowest mean validation loss at "
            f"{label}, and `{p}` ties with it at fewer FLOPs per step")
    text += (f" ({rows[p]['mean']:.3f} ± {rows[p]['spread']:.3f} bits/byte"
             + (f"; it ties {', '.join(f'`{o}`' for o in others)}" if others else "") + "). ")
    costs = regs.get("steps") or rows  # the cost table's rows
    ref = costs.get(REFERENCE)
    if ref and p in costs:
        saved = [f"{what} {_pct(costs[p][k], ref[k])}" for k, what in (
            ("flops_per_step", "FLOPs per step"), ("optimizer_state_bytes", "optimizer state"),
            ("checkpoint_bytes", "checkpoint bytes"), ("peak_memory_bytes", "peak memory"), ("time_ms", "time per step"))
            if costs[p].get(k) is not None and ref.get(k)]
        text += f"Against all-global training it changes {', '.join(saved)}. "
    vs = {rg: cmp for rg, cmp in d["vs_none"].items() if cmp}
    local = [c for c in PRESETS if c != REFERENCE]
    tying = {rg: [c for c in local if c in regs[rg] and regs[rg][c].get("vs_none", {}).get("verdict") in ("tie", "better")]
             for rg in regs}
    delta = ", ".join(f"{cmp['delta']:+.3f} ± {cmp['delta_spread']:.3f} bits/byte at equal {rg}" for rg, cmp in vs.items())
    if vs and all(cmp["verdict"] in ("tie", "better") for cmp in vs.values()):
        text += f"Its quality ties or beats all-global training in every regime measured ({delta}). "
    elif not any(tying.values()):
        text += f"No local preset ties all-global training in quality: `{p}` costs {delta}. "
    else:
        text += f"Its quality against all-global training: {delta}. "
    g = {rg: cmp for rg, cmp in d["vs_gpt2"].items() if cmp}
    if g:
        text += "Against GPT-2 of equal size: " + ", ".join(
            f"{cmp['delta']:+.3f} ± {cmp['delta_spread']:.3f} bits/byte at equal {rg} ({cmp['verdict']})" for rg, cmp in g.items()) + ". "
    text += (f"The default today is `{d['current']}`; " + ("the results confirm it." if p == d["current"]
             else f"the results support changing it to `{p}`."))
    return text


def plot(summary: dict[str, Any], out: str, log=print) -> list[str]:
    """Write ``val_bpb_vs_step.png`` (equal steps) and ``val_bpb_vs_time.png`` (equal time):
    mean over seeds, one line per configuration, band from the lowest to the highest seed;
    footnote: date, machine, commit. Returns the paths; none without matplotlib (one line why)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log('study: plots skipped: matplotlib is not installed: pip install -e ".[plot]"')
        return []
    env = summary["env"]
    note = f"{env['first'][:10]} · {', '.join(env['machine'])} · commit {', '.join(env['commit'])}"
    if env.get("loadavg") and env["loadavg"][1] > 1.5 * (os.cpu_count() or 1):
        note += " · busy machine"
    paths = []
    for regime, rows in summary["regimes"].items():
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
        tails = []
        for i, c in enumerate(summary["configs"]):
            if c not in rows:
                continue
            pts = rows[c]["curve"][1:]  # from the first evaluation after step 0 (8 bits/byte, off the scale)
            xkey = "step" if regime == "steps" else ("cpu_seconds" if rows[c]["clock"] == "cpu" else "seconds")
            xs = [p[xkey] for p in pts]
            style = dict(color="black", linestyle="--", zorder=4) if c == GPT2 else (
                dict(color="0.35", linewidth=2.4, zorder=3) if c == REFERENCE else dict(color=f"C{i % 10}", zorder=2))
            ax.plot(xs, [p["val_bpb"] for p in pts], label="GPT-2" if c == GPT2 else c, **style)
            ax.fill_between(xs, [p["lo"] for p in pts], [p["hi"] for p in pts], alpha=0.12, color=style["color"], zorder=1)
            tails += [p["val_bpb"] for p in pts[len(pts) // 8:]]
        if tails:
            ax.set_ylim(min(tails) - 0.05, max(tails) + 0.05)
        clock = next(iter(rows.values()))["clock"]
        ax.set_xlabel("optimizer step" if regime == "steps" else
                      f"training time (s, {'process CPU time' if clock == 'cpu' else 'wall clock'}, evaluation excluded)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title("Equal steps" if regime == "steps" else "Equal training-time budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.text(0.99, 0.01, note, ha="right", va="bottom", fontsize=7, color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out, PLOTS[regime])
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths


def report(out: str, readme: str | None = None, log=print) -> dict[str, Any]:
    """Regenerate everything from the records in ``out``: ``summary.json``, ``REPORT.md``, the
    plots, and (``readme``) the README section between the study markers. Returns the summary."""
    summary = summary_of(out)
    write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write("# Preset study\n\n" + render_report(summary, "."))
    for p in plot(summary, out, log):
        log(f"study: wrote {p}")
    if readme is not None:
        update_readme(readme, render_report(summary, os.path.relpath(out, os.path.dirname(os.path.abspath(readme)))))
        log(f"study: updated the study section of {readme}")
    log(f"study: wrote {os.path.join(out, 'REPORT.md')}")
    return summary


def update_readme(path: str, body: str) -> None:
    """Replace the text between ``<!-- study:begin -->`` and ``<!-- study:end -->`` in ``path``
    with ``body``. Raises ValueError when the markers are missing."""
    text = open(path).read()
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to fill")
    with open(path, "w") as f:
        f.write(text[:i + len(BEGIN)] + "\n" + body + text[j:])


def readme_section(path: str) -> str:
    """The text between the study markers of ``path`` (what :func:`update_readme` wrote)."""
    text = open(path).read()
    return text[text.index(BEGIN) + len(BEGIN) + 1:text.index(END)]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorafast study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="study", help="folder of the records, report and plots")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of: {', '.join(study_configs(4))}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--regimes", default=",".join(REGIMES), help="steps, time or both")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES),
                   help="model size and steps: " + "; ".join(f"{k}: {v}" for k, v in SCALES.items()))
    for k in ("steps", "batch_size", "seq_len", "hidden_dim", "num_layers", "eval_every", "eval_batches"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="override the scale's value")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="override the scale's value")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="clock of the equal-time budget (cpu: process CPU time, for a shared machine)")
    p.add_argument("--budget-s", type=float, default=None, help="equal-time budget (default: the time `none` takes for --steps)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, each in a fresh process (default: min(2, cores // threads) on CPU, 1 on CUDA; "
                        "0: one after another in this process)")
    p.add_argument("--report-only", action="store_true", help="train nothing: regenerate the report and plots from the records")
    p.add_argument("--fresh", action="store_true", help="delete the records in --out first (a new study from scratch)")
    p.add_argument("--readme", default=None, help="also fill the study section of this README (between the study markers)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.report_only:
            study = Study(out=args.out, configs=None if args.configs is None else tuple(args.configs.split(",")),
                          seeds=tuple(int(s) for s in args.seeds.split(",")), regimes=tuple(args.regimes.split(",")),
                          scale=args.scale, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          hidden_dim=args.hidden_dim, num_layers=args.num_layers, eval_every=args.eval_every,
                          eval_batches=args.eval_batches, dtype=args.dtype, device=args.device, clock=args.clock,
                          budget_s=args.budget_s, threads=args.threads, jobs=args.jobs)
            if args.fresh:
                shutil.rmtree(os.path.join(args.out, RECORDS), ignore_errors=True)
                if os.path.isfile(os.path.join(args.out, CALIBRATION)):
                    os.remove(os.path.join(args.out, CALIBRATION))
            t0 = time.perf_counter()
            n = study.run()
            print(f"study: {n} runs in {time.perf_counter() - t0:.0f} s")
        report(args.out, args.readme)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"lorafast study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlorafast study: interrupted; finished runs are kept, run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

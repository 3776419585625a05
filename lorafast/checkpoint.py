"""Checkpoints of a training run: one folder per step, committed atomically, the newest K kept.

A run folder ``OUT`` holds::

    metrics.jsonl
    checkpoints/step-00000250/     one checkpoint, complete by construction (see below)
        config.json                the model folder's configuration (:mod:`lorafast.hub` format:
                                   format, architecture, model, step) plus "train" (the
                                   TrainConfig), "trainer" (scalar training state) and "files"
                                   (bytes and sha256 of every other file of the folder)
        model.safetensors          one process: the model's state_dict, as lorafast.hub writes it
        tokenizer.json, ...        the tokenizer's files, if it has any (lorafast.tokenizer)
        optimizer.safetensors      one process: "optimizer/<parameter name>/<state key>" tensors
                                   and the extra tensors of the run (e.g. "rng/batch")
        shards/shard-0000R-model-00001-of-00001.safetensors
                                   several processes (torch.distributed.checkpoint): the same
                                   tensors, each rank writing its own shard; at the end of the
                                   run also model.safetensors, the whole weights
    latest -> checkpoints/step-00000250
    config.json -> latest/config.json, model.safetensors -> latest/model.safetensors, ...

so that ``OUT`` itself reads as a model folder (``lorafast generate --checkpoint OUT``,
``LoRA.from_pretrained(OUT)``, ``lorafast finetune --checkpoint OUT``).

Writing: every rank writes into ``checkpoints/.tmp-step-N`` (one process: safetensors files; several:
``torch.distributed.checkpoint`` with its safetensors storage, which reshards on load), each file
is fsynced, rank 0 records the files' sizes and sha256 in ``config.json``, fsyncs the folder and
renames it to ``step-N``; then it points ``latest`` at it (a new symlink renamed over the old one)
and deletes the checkpoints beyond the newest ``keep``. A process killed at any moment (even
``kill -9``) leaves the previous checkpoint whole and ``latest`` on a complete folder; leftover
temporary folders are ignored and removed by the next save.

Reading never unpickles: tensors come from safetensors files (``torch.distributed.checkpoint``'s
``HuggingFaceStorageReader`` reads both layouts and reshards a run saved on N ranks onto M), the
rest from JSON. Sizes and checksums are verified first, so a truncated or corrupted file is
reported by name (:class:`CheckpointError`, one line) before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Any

import torch
import torch.nn as nn

from lorafast.distributed import World
from lorafast.hub import CONFIG, FORMAT, WEIGHTS, atomic_write, load_model, read_config, write_json

__all__ = ["CheckpointError", "CHECKPOINTS", "LATEST", "OPTIMIZER", "RUN_ENTRIES", "list_checkpoints",
           "latest", "resolve", "save", "load", "load_for_inference", "verify", "remove_run"]

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER = "optimizer.safetensors"
SHARDS = "shards"  # several processes: torch.distributed.checkpoint's safetensors files, one per writing rank
LEGACY_OPTIMIZER = "optimizer.pt"  # first layout: torch.save'd, read back with weights_only=True
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# What a run folder holds that a run writes (the only entries --overwrite removes).
RUN_ENTRIES = ("metrics.jsonl", CHECKPOINTS, LATEST, CONFIG, WEIGHTS, LEGACY_OPTIMIZER)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit: the message names the file."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------- layout
def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, folder) of the committed checkpoints of run folder ``out``, oldest first."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest(out: str) -> str | None:
    """The folder of the newest checkpoint of run folder ``out``: the highest committed step (a
    committed folder is complete even when the process died before it switched ``latest``), else
    ``out`` itself when it is a checkpoint of the first layout (a plain ``config.json`` beside
    ``model.safetensors``); None when there is none."""
    done = [d for _, d in list_checkpoints(out) if os.path.isfile(os.path.join(d, CONFIG))]
    if done:
        return done[-1]
    cfg = os.path.join(out, CONFIG)
    if os.path.isfile(cfg) and not os.path.islink(cfg):
        return out
    return None


def resolve(path: str) -> str:
    """The checkpoint folder that ``path`` names: a run folder's newest checkpoint, or ``path``
    itself (a checkpoint or model folder). Raises FileNotFoundError when there is none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint or model folder at {path!r}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder with {CONFIG})")
    found = latest(path)
    if found is None:
        if os.path.isfile(os.path.join(path, CONFIG)):
            return path
        raise FileNotFoundError(f"no checkpoint or model folder at {path!r} ({CONFIG} missing)")
    return found


def remove_run(out: str) -> None:
    """Delete what a run wrote in ``out`` (:data:`RUN_ENTRIES`); other files stay."""
    for name in RUN_ENTRIES:
        p = os.path.join(out, name)
        if os.path.islink(p) or os.path.isfile(p):
            os.remove(p)
        elif os.path.isdir(p):
            shutil.rmtree(p)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _symlink_over(target: str, path: str) -> None:
    """Point ``path`` at ``target`` (relative), atomically: a new link renamed over the old entry."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _commit(out: str, tmp: str, final: str, keep: int) -> None:
    """Rank 0: rename the written folder into place, switch ``latest``, link the top-level
    files, prune. Each step is atomic; the order keeps a complete checkpoint reachable."""
    root = os.path.dirname(final)
    _fsync_dir(tmp)
    old = None
    if os.path.exists(final):  # the same step saved again (a resumed run passing it once more)
        old = os.path.join(root, f".old-{os.path.basename(final)}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _symlink_over(os.path.relpath(final, out), os.path.join(out, LATEST))
    model_files = {n for n in os.listdir(final) if n not in (OPTIMIZER, SHARDS)}
    for name in model_files:  # config.json, model.safetensors, the tokenizer's files
        _symlink_over(os.path.join(LATEST, name), os.path.join(out, name))
    for name in os.listdir(out):  # links to files the newest checkpoint does not have
        top = os.path.join(out, name)
        if os.path.islink(top) and name != LATEST and os.readlink(top).startswith(LATEST + os.sep) \
                and name not in model_files:
            os.remove(top)
    legacy = os.path.join(out, LEGACY_OPTIMIZER)
    if os.path.isfile(legacy):  # a run of the first layout, now continued in this one
        os.remove(legacy)
    _fsync_dir(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    everything = list_checkpoints(out)
    kept = {d for _, d in everything[-keep:]} | {final}
    for _, d in everything:
        if d not in kept:
            shutil.rmtree(d, ignore_errors=True)
    for name in os.listdir(root):  # leftovers of killed saves
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ---------------------------------------------------------------------------------- checksums
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_folder(folder: str) -> str:
    """Where the tensors to resume from are: the shards of several processes, else the folder."""
    shards = os.path.join(folder, SHARDS)
    return shards if os.path.isdir(shards) else folder


def _tensor_files(folder: str) -> list[str]:
    """The safetensors files a reader of checkpoint ``folder`` would read, relative to it."""
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    if os.path.isdir(os.path.join(folder, SHARDS)):
        names += [f"{SHARDS}/{n}" for n in os.listdir(os.path.join(folder, SHARDS)) if n.endswith(".safetensors")]
    return sorted(names)


def _file_records(folder: str, world: World) -> dict[str, dict[str, Any]]:
    """Bytes and sha256 of every file in ``folder`` (and its shards) but config.json (tensors,
    tokenizer), hashed by the ranks in turn."""
    names = sorted({n for n in os.listdir(folder) if n not in (CONFIG, SHARDS)} |
                   {n for n in _tensor_files(folder) if n.startswith(SHARDS + "/")})
    mine = {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "sha256": _sha256(os.path.join(folder, n))}
            for n in names[world.rank::world.size]}
    out: dict[str, dict[str, Any]] = {}
    for part in world.all_gather_object(mine):
        out.update(part)
    return dict(sorted(out.items()))


def verify(folder: str, meta: dict[str, Any], world: World = World()) -> None:
    """Check the tensor files of checkpoint ``folder`` against the sizes and sha256 recorded in
    its ``config.json`` (``meta``); folders without a record (model folders, the first layout)
    pass. Raises CheckpointError naming the first bad file (every rank raises the same)."""
    files = meta.get("files")
    if not isinstance(files, dict):
        return
    problems = []
    extra = sorted(set(_tensor_files(folder)) - set(files))
    if extra:
        problems.append(f"{os.path.join(folder, extra[0])}: not part of this checkpoint "
                        f"({CONFIG} lists {sorted(files)})")
    names = sorted(files)
    for n in names[world.rank::world.size]:
        p, want = os.path.join(folder, n), files[n]
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
            continue
        size = os.path.getsize(p)
        if size != want.get("bytes"):
            problems.append(f"{p}: truncated or altered ({size} bytes; the checkpoint recorded {want.get('bytes')})")
        elif _sha256(p) != want.get("sha256"):
            problems.append(f"{p}: corrupted (its sha256 differs from the one recorded in {CONFIG})")
    found = sorted(p for part in world.all_gather_object(problems) for p in part)
    if found:
        more = f" (and {len(found) - 1} more damaged files)" if len(found) > 1 else ""
        raise CheckpointError(found[0] + more)


# ---------------------------------------------------------------------------------- state
def _model_tensors(model: nn.Module, skip: set[str], world: World) -> dict[str, torch.Tensor]:
    """The model's state (DTensors under FSDP2) without ``skip`` (regenerated local tensors)."""
    if not world.distributed:
        return {k: v for k, v in model.state_dict().items() if k not in skip}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v for k, v in get_model_state_dict(model).items() if k not in skip}


def _flatten(state: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    flat = {}
    for name, entries in state.items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a tensor")
            flat[f"optimizer/{name}/{key}"] = value
    return flat


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> tuple[list, dict[str, torch.Tensor]]:
    """(param_groups without their parameters, the state tensors as ``optimizer/<parameter
    name>/<key>``) of the optimizer as it is."""
    if not world.distributed:  # no torch.distributed needed: map the optimizer's own state to names
        names = {id(p): n for n, p in model.named_parameters()}
        state = {names[id(p)]: optimizer.state[p] for g in optimizer.param_groups for p in g["params"]
                 if optimizer.state.get(p)}
        groups = optimizer.param_groups
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer)
        state, groups = osd["state"], osd["param_groups"]
    return [{k: _json_safe(v) for k, v in g.items() if k != "params"} for g in groups], _flatten(state)


def _json_safe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def save(out: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
         meta: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None, keep: int = 1,
         skip: set[str] | frozenset = frozenset(), full_model: bool = False) -> str:
    """Write the checkpoint of ``step`` into run folder ``out`` (every rank calls it): the model
    (``model``: the bare or FSDP2-sharded model, without the names in ``skip``), the optimizer
    state, the extra ``tensors`` (same on every rank) and ``meta`` (JSON: "train", "trainer").
    Several processes write shards; ``full_model`` then also gathers the whole weights into a
    ``model.safetensors`` on rank 0 (every rank takes part), so that the checkpoint is a model
    folder for ``from_pretrained`` too (the end of a run). Keeps the newest ``keep`` checkpoints.
    Returns the folder. Raises OSError when the folder cannot be written (the previous
    checkpoint is then untouched)."""
    root = os.path.join(out, CHECKPOINTS)
    name = step_dir_name(step)
    tmp = os.path.join(root, f".tmp-{name}")
    if world.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    world.barrier()
    model_state = _model_tensors(model, set(skip), world)
    groups, opt_state = _optimizer_state(model, optimizer, world)
    extra = dict(tensors or {})
    if not world.distributed:
        from safetensors.torch import save_file

        def cpu(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().contiguous().cpu() for k, v in d.items()}

        atomic_write(os.path.join(tmp, WEIGHTS), lambda p: save_file(cpu(model_state), p))
        atomic_write(os.path.join(tmp, OPTIMIZER), lambda p: save_file(cpu({**opt_state, **extra}), p))
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        dcp.save({**model_state, **opt_state, **extra},
                 storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, SHARDS), save_distributed=True))
        if full_model:
            from safetensors.torch import save_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if world.is_main:
                whole = {k: v.contiguous() for k, v in full.items() if k not in skip}
                atomic_write(os.path.join(tmp, WEIGHTS), lambda p: save_file(whole, p))
            del full
    tok = getattr(model, "tokenizer", None)
    if world.is_main and tok is not None:
        tok.save_pretrained(tmp)
    world.barrier()
    files = _file_records(tmp, world)
    final = os.path.join(root, name)
    if world.is_main:
        # The keys of a model folder, as lorafast.hub.save_model writes them, then the run's.
        record = {"format": FORMAT, "architecture": type(model).__name__.removeprefix("FSDP"),
                  "model": model.config.to_dict(), "step": int(step),
                  "tokenizer": tok.to_config() if tok is not None else None,
                  **(model.config_extra() if hasattr(model, "config_extra") else {}), **meta,
                  "optimizer": {"class": type(optimizer).__name__, "param_groups": groups},
                  "sharded": world.distributed, "world_size": world.size, "files": files}
        write_json(os.path.join(tmp, CONFIG), record)
        _commit(out, tmp, final, keep)
    world.barrier()
    return final


def _read_tensors(folder: str, targets: dict[str, torch.Tensor]) -> None:
    """Fill ``targets`` in place from the safetensors files of ``folder`` (either layout, any
    number of saving ranks onto this run's sharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, storage_reader=HuggingFaceStorageReader(_tensor_folder(folder)), no_dist=single)
    except Exception as e:  # noqa: BLE001 - any failure of the reader: one line naming the folder
        msg = _first_line(e)
        if hasattr(e, "failures"):  # CheckpointException: per-rank failures
            msg = "; ".join(_first_line(f) if isinstance(f, BaseException) else str(f) for f in e.failures.values()) or msg
        raise CheckpointError(f"{folder}: the checkpoint's tensors cannot be read into this run ({msg})") from None


def load(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
         tensors: dict[str, torch.Tensor] | None = None, skip: set[str] | frozenset = frozenset()) -> dict[str, Any]:
    """Load checkpoint ``folder`` into ``model`` (bare or FSDP2-sharded; every name but ``skip``),
    ``optimizer`` and, in place, the extra ``tensors``; every rank calls it. Returns the parsed
    ``config.json``. Raises CheckpointError (one line naming the file) for a damaged or
    mismatching checkpoint, FileNotFoundError for a missing one."""
    meta = read_config(folder)
    tensors = dict(tensors or {})
    if "files" not in meta:
        _load_first_layout(folder, meta, model, optimizer, world, tensors)
        return meta
    verify(folder, meta, world)
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    try:
        saved = set(HuggingFaceStorageReader(_tensor_folder(folder)).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001 - a header verify() could not vouch for
        raise CheckpointError(f"{folder}: unreadable tensor files ({_first_line(e)})") from None
    model_state = _model_tensors(model, set(skip), world)
    # The optimizer's state, created for every parameter (get_optimizer_state_dict does one
    # zero-learning-rate step on a fresh optimizer), to be overwritten by the saved one.
    osd = get_optimizer_state_dict(model, optimizer)
    opt_state = _flatten(osd["state"])
    unsaved = {k.split("/")[1] for k in opt_state if k not in saved}  # e.g. adapters re-initialised just before
    opt_state = {k: v for k, v in opt_state.items() if k.split("/")[1] not in unsaved}
    _read_tensors(folder, {**model_state, **opt_state, **tensors})
    result = set_model_state_dict(model, model_state, options=StateDictOptions(strict=not skip))
    missing = set(getattr(result, "missing_keys", ())) - set(skip)
    if missing:  # pragma: no cover - the reader already refuses missing tensors
        raise CheckpointError(f"{folder}: the checkpoint lacks {sorted(missing)[0]}")
    set_optimizer_state_dict(model, optimizer, osd)
    params = dict(model.named_parameters())
    for name in unsaved:  # as in the saved run: no state yet for these
        optimizer.state.pop(params[name], None)
    return meta


def _load_first_layout(folder: str, meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                       world: World, tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint of the first layout (model.safetensors + optimizer.pt in the run folder)."""
    if world.distributed:
        raise CheckpointError(f"{os.path.join(folder, CONFIG)}: a checkpoint of the first layout; resume it once "
                              "in a single process (it is then saved in the current layout)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = os.path.join(folder, WEIGHTS)
    try:
        model.load_state_dict(load_file(weights))
    except FileNotFoundError:
        raise CheckpointError(f"{weights}: missing") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: damaged or not a safetensors file ({_first_line(e)})") from None
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not fit the model ({_first_line(e)})") from None
    opt_path = os.path.join(folder, LEGACY_OPTIMIZER)
    if not os.path.isfile(opt_path):
        return
    try:
        state = torch.load(opt_path, map_location="cpu", weights_only=True)  # restricted unpickler
        optimizer.load_state_dict(state["optimizer"])
    except Exception as e:  # noqa: BLE001 - truncated zip, refused global, wrong shape: one line
        raise CheckpointError(f"{opt_path}: damaged or not an optimizer state ({_first_line(e)})") from None
    if "rng/batch" in tensors and "batch_rng" in state:
        tensors["rng/batch"].copy_(state["batch_rng"])


def load_for_inference(path: str, cls: type, device: str | torch.device = "cpu", **kwargs):
    """Rebuild the model of ``path`` (a run folder, a checkpoint folder of either layout, or a model
    folder of :mod:`lorafast.hub`); returns ``(model, meta)``, local tensors redrawn for the saved
    step. Raises FileNotFoundError / CheckpointError (ValueError) naming the file."""
    folder = resolve(path)
    meta = read_config(folder)
    verify(folder, meta)
    if os.path.isfile(os.path.join(folder, WEIGHTS)) or "files" not in meta:
        return load_model(folder, cls, device, **kwargs)
    from lorafast.config import ModelConfig

    try:
        config = ModelConfig.from_dict(meta["model"])
        step = int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(folder, CONFIG)}: bad model configuration ({e})") from None
    from lorafast.tokenizer import tokenizer_from_config

    model = cls.from_config(config, **kwargs)
    state = model.state_dict()
    _read_tensors(folder, state)
    model.load_state_dict(state)
    model.to(device)
    model.redraw_local_(step)
    model.tokenizer = tokenizer_from_config(meta.get("tokenizer"), folder, config.vocab_size)
    return model, meta


def read_json_lines(path: str, upto_step: int) -> list[str]:
    """The lines of metrics file ``path`` with ``step <= upto_step`` (a resumed run drops what came
    after its checkpoint). A torn last line (a process killed mid-write) is dropped; any other
    line that is not JSON raises CheckpointError naming the file and line."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)})") from None
    lines = text.split("\n")
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                continue
            raise CheckpointError(f"{path}: line {i + 1} is not a metrics record") from None
        if step <= upto_step:
            kept.append(line)
    return kept

"""Model folders on disk: the weights and the configuration of a model, without pickle.

A model folder holds

* ``model.safetensors``: ``model.state_dict()`` — the global and trained tensors. Local tensors of
  ``redraw``/``frozen`` rules are not stored: they are regenerated from (seed, step).
* ``config.json``: ``{"format": "lorafast-2", "architecture": <class name>, "model":
  ModelConfig.to_dict() (seed and local rules included), "step": <training step whose draws
  the local tensors hold>, ...}``; writers may add keys (the training command adds ``"train"``).

:func:`save_model` writes one, :func:`load_model` rebuilds the model from one. Folders written
by the first version (``"format": "lorafast-checkpoint-1"``, same keys) load too. Every file is
written to a temporary name, flushed to disk (fsync) and renamed, with the permissions the
umask gives a new file, so a crash mid-write leaves the previous file whole.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

FORMAT = "lorafast-2"
READABLE_FORMATS = (FORMAT, "lorafast-checkpoint-1")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then fsync and rename ``tmp`` onto ``path`` (same folder, so the rename is
    atomic); the file gets the umask's permissions whatever ``write`` created it with."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass


def write_json(path: str, obj: Any) -> None:
    def write(p: str) -> None:
        with open(p, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def save_model(out: str, model: torch.nn.Module, step: int, extra: dict[str, Any] | None = None) -> None:
    """Write the model folder ``out`` (created if missing): ``model.safetensors`` and
    ``config.json`` with ``step``, the training step whose draws the local tensors hold, and
    the ``extra`` keys. Raises OSError when the folder cannot be written."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(out, WEIGHTS), lambda p: save_file(state, p))
    meta = {"format": FORMAT, "architecture": type(model).__name__, "model": model.config.to_dict(),
            "step": int(step), **(extra or {})}
    write_json(os.path.join(out, CONFIG), meta)


def read_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of the model folder ``path``. Raises FileNotFoundError when there is
    none, ValueError when it is not a lorafast model configuration."""
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no checkpoint or model folder at {path!r} ({CONFIG} missing)")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a readable JSON file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{cfg_path}: not a lorafast model configuration (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected one of {READABLE_FORMATS})")
    return meta


def load_model(path: str, cls: type | None = None, device: str | torch.device = "cpu", **kwargs):
    """Rebuild the model saved in folder ``path``; returns ``(model, meta)`` (meta: the parsed
    config.json). ``cls``: the model class (default: the accelerated ``lorafast.LoRA``; the
    reference model loads the same folders); ``kwargs`` go to its constructor (e.g. ``impl``).
    Local tensors are redrawn for the saved step. Raises FileNotFoundError / ValueError naming
    the file when the folder is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lorafast.config import ModelConfig

    meta = read_config(path)
    if cls is None:
        from lorafast import LoRA as cls
    try:
        config = ModelConfig.from_dict(meta["model"])
        step = int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, CONFIG)}: bad model configuration ({e})") from None
    model = cls.from_config(config, **kwargs)
    weights = os.path.join(path, WEIGHTS)
    try:
        state = load_file(weights)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights}: missing") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: damaged or not a safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the model of {CONFIG} ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.redraw_local_(step)
    return model, meta

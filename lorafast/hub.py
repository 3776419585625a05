"""Model folders on disk: the weights and the configuration of a model, without pickle.

A model folder holds

* ``model.safetensors``: ``model.state_dict()`` — the global and trained tensors. Local tensors of
  ``redraw``/``frozen`` rules are not stored: they are regenerated from (seed, step).
* ``config.json``: ``{"format": "lorafast-2", "architecture": <class name>, "model":
  ModelConfig.to_dict() (seed and local rules included), "step": <training step whose draws
  the local tensors hold>, "tokenizer": <its description, or null>, ...}``; writers may add keys
  (the training command adds ``"train"``, the classification model ``"classification"``).
* the tokenizer's files when it has any (``tokenizer.json``, ``tokenizer_config.json``:
  :mod:`lorafast.tokenizer`).

:func:`save_model` writes one, :func:`load_model` rebuilds the model from one. Folders written
by the first version (``"format": "lorafast-checkpoint-1"``, same keys) load too. Every file is
written to a temporary name, flushed to disk (fsync) and renamed, with the permissions the
umask gives a new file, so a crash mid-write leaves the previous file whole.

The second half of this module is the Hugging Face layer: :class:`HubMixin`, the
``huggingface_hub.PyTorchModelHubMixin`` that gives every lorafast model ``save_pretrained`` /
``from_pretrained`` / ``push_to_hub`` over these same folders, and the *local state*, the entry
``_extra_state`` of a model's ``state_dict`` that names what defines its local draws (seed, local
rules, step), so that no way of loading weights can pair them with other draws.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import PyTorchModelHubMixin

from lorafast.tokenizer import tokenizer_from_config

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


def save_model(out: str, model: torch.nn.Module, step: int | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write the model folder ``out`` (created if missing): ``model.safetensors``, the files of
    ``model.tokenizer`` (if any) and ``config.json`` with ``step``, the training step whose draws
    the local tensors hold (default ``model.local_step``), the tokenizer's entry, the model's
    own keys (:meth:`HubMixin.config_extra`) and the ``extra`` keys. Raises OSError when the
    folder cannot be written."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(out, WEIGHTS), lambda p: save_file(state, p))
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(out)
    step = model.local_step if step is None else step
    meta = {"format": FORMAT, "architecture": type(model).__name__, "model": model.config.to_dict(),
            "step": int(step), "tokenizer": tok.to_config() if tok is not None else None,
            **(model.config_extra() if hasattr(model, "config_extra") else {}), **(extra or {})}
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
    reference model loads the same folders), which must be config.json's architecture;
    ``kwargs`` go to its constructor (e.g. ``impl``). Local tensors are redrawn for the saved
    step; ``model.tokenizer`` is the folder's tokenizer (bytes for folders of vocabulary 256
    that name none). Raises FileNotFoundError / ValueError naming the file when the folder is
    missing or damaged."""
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
    kwargs = {**_check_architecture(path, meta, cls), **kwargs}
    model = cls.from_config(config, **kwargs)
    weights = os.path.join(path, WEIGHTS)
    try:
        state = load_file(weights)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights}: missing") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: damaged or not a safetensors file ({e})") from None
    _add_local_state(state, model, step)  # folders written before the local state existed
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not fit the model of {CONFIG} ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.redraw_local_(step)
    model.tokenizer = tokenizer_from_config(meta.get("tokenizer"), path, config.vocab_size)
    return model, meta


# ============================================================================================
# The Hugging Face layer: save_pretrained / from_pretrained / push_to_hub, and the local state
# ============================================================================================
LOCAL_STATE_KEY = "_extra_state"  # torch.nn.Module's key for get_extra_state()
LOCAL_STATE_VERSION = 1
# Keyword arguments of ModelHubMixin.from_pretrained that older huggingface_hub releases pass on
# to _from_pretrained and that lorafast has no use for.
_HUB_ONLY_KWARGS = ("proxies", "resume_download")

MODEL_CARD = """---
{{ card_data }}
---

# {{ model_name | default("A lorafast model", true) }}

A causal Transformer ({{ class_name | default("LoRA", true) }}) of the lorafast package, trained with
**Local Random Initialization**: some weights are *local*, random draws that are not trained
(re-drawn every training step, or drawn once and kept, as the local rules in `config.json` say).
This is *not* LoRA low-rank adaptation and not a PEFT adapter: the repository holds a whole
model. The local tensors are not stored: they are regenerated from the seed and the step
recorded in `config.json`.

```python
import lorafast
model = lorafast.{{ class_name | default("LoRA", true) }}.from_pretrained("{{ repo_id | default("<repo id or folder>", true) }}")
```
"""


def rules_digest(local) -> int:
    """56-bit digest (SHA-256 prefix) of a LocalConfig's rules (patterns, modes, laws, ranks,
    periods, scales; not the preset's name, which draws nothing)."""
    text = json.dumps(local.to_dict()["rules"], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def local_state(config, step: int) -> torch.Tensor:
    """The local state of a model with ModelConfig ``config`` whose local tensors hold the draws
    of training step ``step``: int64 ``[5]`` = (version 1, seed >> 32, seed & 0xFFFFFFFF, step,
    :func:`rules_digest`). It is the model's ``get_extra_state()``, saved in every state dict
    (key ``_extra_state``), so weights travel with what defines their local draws."""
    seed = config.seed
    return torch.tensor([LOCAL_STATE_VERSION, seed >> 32, seed & 0xFFFFFFFF, int(step), rules_digest(config.local)],
                        dtype=torch.int64)


def read_local_state(config, state: object) -> int:
    """Check the local state ``state`` of a state dict against the model of ``config`` and return
    its step. Raises ValueError when it is malformed, or was saved by a model with another seed
    or other local rules: loading would pair the weights with other local draws."""
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.int64 and tuple(state.shape) == (5,)):
        raise ValueError(f"state dict entry {LOCAL_STATE_KEY!r}: expected lorafast's local state, an int64 tensor "
                         f"of 5 values, got {type(state).__name__} {getattr(state, 'dtype', '')} "
                         f"{tuple(getattr(state, 'shape', ()))}")
    version, hi, lo, step, digest = (int(v) for v in state.tolist())
    if version != LOCAL_STATE_VERSION:
        raise ValueError(f"state dict entry {LOCAL_STATE_KEY!r}: local state version {version}; this lorafast "
                         f"reads version {LOCAL_STATE_VERSION}")
    seed = (hi << 32) | lo
    if seed != config.seed:
        raise ValueError(f"the state dict was saved by a model with seed {seed}, this model has seed {config.seed}: "
                         f"its local tensors, drawn from the seed, would differ. Build the model with seed={seed} "
                         "(e.g. LoRA.from_config(config) with that seed), or load the model folder with "
                         "from_pretrained / lorafast.hub.load_model, which take the seed from config.json")
    if digest != rules_digest(config.local):
        raise ValueError(f"the state dict was saved by a model with other local rules than this one's (preset "
                         f"{config.local.name!r}): its local tensors would be drawn otherwise. Build the model "
                         "with the saved local rules, or load the model folder with from_pretrained")
    if step < 0:
        raise ValueError(f"state dict entry {LOCAL_STATE_KEY!r}: negative step {step}")
    return step


def _add_local_state(state: dict[str, torch.Tensor], model: torch.nn.Module, step: int) -> None:
    """Give a state dict read from a folder written before the local state existed the entry of
    every lorafast language model in ``model`` (seed and rules from config.json, which built
    ``model``, and the folder's ``step``); entries already there are left to be checked."""
    from lorafast.reference import LoRA

    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            key = f"{name}.{LOCAL_STATE_KEY}" if name else LOCAL_STATE_KEY
            state.setdefault(key, local_state(m.config, step))


def _check_architecture(path: str, meta: dict[str, Any], cls: type) -> dict[str, Any]:
    """Raise ValueError unless config.json's architecture is ``cls``'s; return the constructor
    keywords the architecture keeps in config.json (``cls.kwargs_from_config``)."""
    arch = meta.get("architecture", "LoRA")
    if arch != cls.__name__:
        hint = (" (a language model folder becomes a classifier with "
                "LoRAForSequenceClassification.from_pretrained(path, num_labels=N))") if arch == "LoRA" else ""
        raise ValueError(f"{os.path.join(path, CONFIG)} holds a {arch}, not a {cls.__name__}: load it with "
                         f"lorafast.{arch}.from_pretrained{hint}")
    return cls.kwargs_from_config(meta) if hasattr(cls, "kwargs_from_config") else {}


def resolve_folder(model_id: str, **download: Any) -> str:
    """A local model folder: ``model_id`` itself when it is a folder, else the Hub snapshot folder
    of repository ``model_id`` after downloading config.json, the weights and the tokenizer's
    file (``download``: hf_hub_download's revision, cache_dir, force_download, token,
    local_files_only). Raises FileNotFoundError / ValueError, or huggingface_hub's errors."""
    if os.path.isdir(model_id):
        return model_id
    from huggingface_hub import hf_hub_download

    folder = os.path.dirname(hf_hub_download(repo_id=model_id, filename=CONFIG, **download))
    meta = read_config(folder)
    hf_hub_download(repo_id=model_id, filename=WEIGHTS, **download)
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("file"):
        hf_hub_download(repo_id=model_id, filename=tok["file"], **download)
    return folder


class HubMixin(PyTorchModelHubMixin, library_name="lorafast", model_card_template=MODEL_CARD,
               tags=["lorafast", "local-random-initialization"]):
    """``huggingface_hub.PyTorchModelHubMixin`` over lorafast model folders.

    ``model.save_pretrained(folder)`` writes ``model.safetensors`` (no pickle; local tensors of
    ``redraw``/``frozen`` rules are not stored), the tokenizer's files, ``config.json`` (model
    configuration with seed and local rules, ``step`` = ``model.local_step``, tokenizer) and a
    model card ``README.md``; ``push_to_hub(repo_id)`` uploads the same files.
    ``Class.from_pretrained(folder_or_repo_id, map_location="cpu", **kwargs)`` rebuilds the model
    (``kwargs`` go to the constructor, e.g. ``impl``), redraws its local tensors for the saved
    step, attaches ``model.tokenizer`` and returns it in eval mode, as transformers does. Every
    folder written by ``lorafast train`` or :func:`save_model` loads this way, offline.
    """

    tokenizer = None  # a lorafast.tokenizer tokenizer, saved and loaded with the model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """``ModelHubMixin.from_pretrained`` (a local folder or a Hub repository id; keywords
        ``map_location``, ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ... and
        the constructor's), with a clear FileNotFoundError for a local path that is no folder
        (rather than huggingface_hub's complaint about a malformed repository id)."""
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path) and (isinstance(pretrained_model_name_or_path, Path) or os.path.isabs(path)
                                        or path.startswith(".") or path.count("/") > 1 or os.path.exists(path)):
            raise FileNotFoundError(f"no model folder at {path!r} ({CONFIG} missing), and not a Hub repository id")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_model(str(save_directory), self)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu", strict: bool = True, **model_kwargs: Any):
        from lorafast.config import ModelConfig

        for k in _HUB_ONLY_KWARGS:
            model_kwargs.pop(k, None)
        if not strict:
            raise ValueError("lorafast model folders load strictly: a partial load would leave weights of another "
                             "initialisation beside the saved ones (strict=False is not supported)")
        fixed = sorted(set(model_kwargs) & {f.name for f in dataclasses.fields(ModelConfig)})
        if fixed:
            raise ValueError(f"from_pretrained: {fixed} come from the folder's config.json and cannot be changed "
                             "at load (the weights and local draws depend on them)")
        folder = resolve_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                token=token, local_files_only=local_files_only)
        model = cls._load_folder(folder, map_location, **model_kwargs)
        model.eval()
        return model

    @classmethod
    def _load_folder(cls, folder: str, device: str | torch.device, **kwargs: Any):
        """The model of the local folder ``folder`` (:func:`load_model` with this class)."""
        return load_model(folder, cls, device, **kwargs)[0]

    def generate_model_card(self, *args, **kwargs):
        kwargs.setdefault("class_name", type(self).__name__)
        return super().generate_model_card(*args, **kwargs)

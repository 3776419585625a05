"""Sequence classification on a lorafast language model: :class:`LoRAForSequenceClassification`.

The head of transformers' ``GPT2ForSequenceClassification``: the final hidden state (after the
final LayerNorm) of each sequence's last non-padding position goes through a linear ``score``
layer without bias, ``logits = W_s h_last`` ``[B, num_labels]``; the loss is the mean
cross-entropy against integer labels. The language model is either model (the reference
``lorafast.reference.LoRA`` or the accelerated ``lorafast.LoRA``) and keeps its Local Random
Initialization: ``redraw_local_(step)`` redraws its local tensors as in training.

Padding: batches are padded on the right. The model is causal, so a position never attends to
the padding after it, and the hidden state of a sequence's last real position is the one it
has alone: padding changes no logit. The last real position comes from ``attention_mask``
(1 = token, 0 = padding; each row ones then zeros) when given, else, as in GPT-2, from the
rightmost id that is not ``pad_token_id``, else it is the last position.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafast import reference
from lorafast.config import ModelConfig
from lorafast.hub import HubMixin, load_model, read_config
from lorafast.model import LoRA as AcceleratedLoRA

__all__ = ["LoRAForSequenceClassification", "pad_batch"]

# The score layer's init stream: the model seed plus this odd constant (the 64-bit golden ratio),
# so that it does not repeat the first values of the language model's own initialisation.
_SCORE_SEED_OFFSET = 0x9E3779B97F4A7C15


def pad_batch(seqs: Sequence[torch.Tensor], pad_token_id: int, max_len: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors into ids ``[B, T]`` (int64, filled with ``pad_token_id``) and an
    attention mask ``[B, T]`` (int64, 1 = token); sequences longer than ``max_len`` keep their
    first ``max_len`` ids, as transformers' right truncation. Raises ValueError for an empty
    batch or an empty sequence."""
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    seqs = [s[:max_len] if max_len is not None else s for s in seqs]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("pad_batch: a sequence has no token")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), T), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def _check_labels(labels: object, batch: int, num_labels: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must have shape [batch] = ({batch},), got {tuple(labels.shape)}")
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"labels hold {lo if lo < 0 else hi}, outside [0, num_labels={num_labels})")
    return labels.long()


class LoRAForSequenceClassification(nn.Module, HubMixin, pipeline_tag="text-classification"):
    """A lorafast language model (``transformer``) with a linear classification head (``score``,
    ``[num_labels, hidden_dim]``, no bias, init N(0, 0.02) from the model seed) on the last
    non-padding position, as transformers' GPT2ForSequenceClassification.

    ``lm``: a ``lorafast.reference.LoRA`` or ``lorafast.LoRA`` (taken as is, not copied; its
    output head stays, unused). ``num_labels`` >= 1; ``id2label`` maps label ids to names
    (default ``"LABEL_i"``, as transformers); ``pad_token_id`` (default: ``lm.tokenizer``'s,
    else None) finds the last real position when no attention mask is given. Raises TypeError /
    ValueError for bad arguments.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` as the language models; the
    folder's config.json keeps ``num_labels``, ``id2label``, ``label2id`` and ``pad_token_id``
    under ``"classification"``. ``from_pretrained`` also takes a *language model* folder plus
    ``num_labels=`` (and ``id2label=``): the score layer is then new.
    """

    def __init__(self, lm: reference.LoRA, num_labels: int, *, id2label: dict[int, str] | None = None,
                 pad_token_id: int | None = None) -> None:
        super().__init__()
        if not isinstance(lm, reference.LoRA):
            raise TypeError(f"lm must be a lorafast.LoRA or lorafast.reference.LoRA, got {type(lm).__name__}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)} if id2label is None else \
            {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(num_labels)):
            raise ValueError(f"id2label must name the label ids 0..{num_labels - 1}, got keys {sorted(id2label)}")
        if len(set(id2label.values())) != num_labels:
            raise ValueError("id2label names two labels alike")
        if pad_token_id is None and lm.tokenizer is not None:
            pad_token_id = lm.tokenizer.pad_token_id
        if pad_token_id is not None and not 0 <= pad_token_id < lm.config.vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is outside [0, vocab_size={lm.config.vocab_size})")
        self.transformer = lm
        self.score = nn.Linear(lm.config.hidden_dim, num_labels, bias=False)
        self.num_labels = num_labels
        self.id2label = id2label
        self.pad_token_id = pad_token_id
        self.tokenizer = lm.tokenizer
        gen = torch.Generator().manual_seed((lm.config.seed + _SCORE_SEED_OFFSET) % (1 << 64))
        with torch.no_grad():
            w = torch.randn(self.score.weight.shape, generator=gen) * 0.02
            self.score.weight.copy_(w.to(self.score.weight.dtype))
        self.score.to(lm.tok_emb.weight.device)

    # ------------------------------------------------------------------ construction, folders
    @classmethod
    def from_config(cls, cfg: ModelConfig, *, num_labels: int, id2label: dict[int, str] | None = None,
                    pad_token_id: int | None = None, reference: bool = False, **kwargs: Any
                    ) -> "LoRAForSequenceClassification":
        """A new classifier on a new language model of ``cfg``: the reference model when
        ``reference``, else the accelerated one (``kwargs`` go to it, e.g. ``impl``)."""
        lm_cls = _lm_class(reference)
        return cls(lm_cls.from_config(cfg, **kwargs), num_labels, id2label=id2label, pad_token_id=pad_token_id)

    def config_extra(self) -> dict[str, Any]:
        """The keys of config.json that only a classifier has (written by ``save_pretrained``)."""
        return {"classification": {"num_labels": self.num_labels,
                                   "id2label": {str(i): v for i, v in self.id2label.items()},
                                   "label2id": {v: i for i, v in self.id2label.items()},
                                   "pad_token_id": self.pad_token_id}}

    @classmethod
    def kwargs_from_config(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Constructor keywords from a classifier folder's config.json (inverse of config_extra)."""
        c = meta.get("classification")
        if not isinstance(c, dict) or "num_labels" not in c:
            raise ValueError("config.json of a LoRAForSequenceClassification has no 'classification' entry")
        return {"num_labels": c["num_labels"], "id2label": c.get("id2label"), "pad_token_id": c.get("pad_token_id")}

    @classmethod
    def _load_folder(cls, folder: str, device: str | torch.device, **kwargs: Any) -> "LoRAForSequenceClassification":
        """A classifier folder loads whole; a language-model folder loads into a new classifier
        (``num_labels`` required, ``id2label``/``pad_token_id`` optional; ``reference`` chooses
        the model class, the other keywords go to it)."""
        meta = read_config(folder)
        if meta.get("architecture", "LoRA") != "LoRA":
            return load_model(folder, cls, device, **kwargs)[0]
        head = {k: kwargs.pop(k) for k in ("num_labels", "id2label", "pad_token_id") if k in kwargs}
        if "num_labels" not in head:
            raise ValueError(f"{folder} holds a language model: pass num_labels= to make a classifier of it")
        lm, _ = load_model(folder, _lm_class(kwargs.pop("reference", False)), device, **kwargs)
        return cls(lm, **head)

    # ------------------------------------------------------------------ the language model's state
    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    @property
    def local_step(self) -> int:
        return self.transformer.local_step

    def redraw_local_(self, step: int) -> list[torch.Tensor]:
        """Redraw the language model's local tensors for training step ``step`` (see
        ``lorafast.reference.LoRA.redraw_local_``); returns the re-initialised trained tensors."""
        return self.transformer.redraw_local_(step)

    def named_local_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.transformer.named_local_parameters():
            yield f"transformer.{name}", t

    def local_parameters(self) -> Iterator[torch.Tensor]:
        return self.transformer.local_parameters()

    def global_parameters(self) -> Iterator[nn.Parameter]:
        local = {id(t) for t in self.local_parameters()}
        return (p for p in self.parameters() if id(p) not in local)

    # ------------------------------------------------------------------ forward
    def last_positions(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Index ``[B]`` (int64) of each row's last real position: from ``attention_mask``, else
        the rightmost id that is not ``pad_token_id`` (0 for a row of padding only, as GPT-2),
        else ``T - 1``. No validation, no host sync."""
        B, T = ids.shape
        if attention_mask is not None:
            return attention_mask.long().sum(-1) - 1  # [B]
        if self.pad_token_id is None:
            return torch.full((B,), T - 1, dtype=torch.int64, device=ids.device)
        not_pad = (ids != self.pad_token_id).long()  # [B, T]
        return (torch.arange(T, device=ids.device) * not_pad).argmax(-1)  # [B]

    def _check_mask(self, attention_mask: object, ids: torch.Tensor) -> torch.Tensor | None:
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of the ids {tuple(ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        m = attention_mask.long()
        if bool(((m != 0) & (m != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        if bool((m[:, 1:] > m[:, :-1]).any()) or bool((m[:, 0] == 0).any()):
            raise ValueError("attention_mask: each row must be ones then zeros (padding on the right, at least "
                             "one token); left padding would shift the learned positions")
        return m

    def logits_unchecked(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``score(h[b, last[b]])`` for validated int64 ids ``[B, T]`` and positions ``[B]``:
        logits ``[B, num_labels]``. No host sync."""
        h = self.transformer.hidden_unchecked(ids)  # [B, T, H]
        pooled = h[torch.arange(ids.shape[0], device=ids.device), last]  # [B, H]
        return self.score(pooled)  # [B, num_labels]

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, T]`` (right-padded) -> logits ``[B, num_labels]``. Raises
        TypeError/ValueError for bad ids (see ``lorafast.reference.check_ids``) or a bad mask."""
        ids = reference.check_ids(ids, self.config.vocab_size, self.config.max_seq_len)
        return self.logits_unchecked(ids, self.last_positions(ids, self._check_mask(attention_mask, ids)))

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy (fp32) of the logits of ids ``[B, T]`` against labels ``[B]``."""
        logits = self(ids, attention_mask)
        labels = _check_labels(labels, ids.shape[0], self.num_labels)
        return F.cross_entropy(logits.float(), labels.to(logits.device))

    def loss_unchecked(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` for validated int64 ids and labels, pooling by ``pad_token_id`` (no mask):
        no host sync, the interface of :func:`lorafast.train.train_step`."""
        return F.cross_entropy(self.logits_unchecked(ids, self.last_positions(ids)).float(), labels)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[str]:
        """Label names of ``texts``, tokenised with ``self.tokenizer`` (truncated to
        ``max_seq_len``). Raises ValueError when the model has no tokenizer."""
        if self.tokenizer is None:
            raise ValueError("predict needs a tokenizer: set model.tokenizer (see lorafast.tokenizer)")
        was = self.training
        self.eval()
        device = self.score.weight.device
        out: list[str] = []
        try:
            for i in range(0, len(texts), batch_size):
                seqs = [self.tokenizer.encode(t) for t in texts[i:i + batch_size]]
                ids, mask = pad_batch(seqs, self.pad_token_id or 0, self.config.max_seq_len)
                logits = self(ids.to(device), mask.to(device))
                out += [self.id2label[int(j)] for j in logits.argmax(-1)]
        finally:
            self.train(was)
        return out


def _lm_class(use_reference: bool) -> type:
    return reference.LoRA if use_reference else AcceleratedLoRA

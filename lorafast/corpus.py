"""Training text and byte-level tokenisation (vocabulary 256).

The built-in corpus is ``lorafast/data/stdlib.txt.gz``: 3.6 MB of CPython 3.11 standard-library
sources (code, comments, docstrings), 102 modules, one document each (made by
``tools/make_corpus.py``). Every 20th document is held out for validation, so the split is
deterministic. A user's own text file (``--data FILE``) is split by bytes: the last 5 % validate.

Tokens are bytes by default; ``load_corpus(tokenizer="bpe")`` trains a byte-level BPE on the
training split, or a ``tokenizer.json`` is given (:mod:`lorafast.tokenizer`). The corpus keeps
its tokenizer (``Corpus.tokenizer``) so that losses convert to bits per byte.
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import torch

from lorafast.tokenizer import ByteTokenizer, Tokenizer, encode_compact, make_tokenizer

VOCAB_SIZE = 256
BUILTIN = os.path.join(os.path.dirname(__file__), "data", "stdlib.txt.gz")
DOC_SEP = "\f"


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids [len]."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids: torch.Tensor | list[int]) -> str:
    data = bytes(int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))
    return data.decode("utf-8", errors="replace")


@dataclasses.dataclass
class Corpus:
    train: torch.Tensor  # token ids [n_train]: uint8 for bytes, int16/int32 for a BPE
    val: torch.Tensor  # token ids [n_val]
    source: str
    tokenizer: Tokenizer = dataclasses.field(default_factory=ByteTokenizer)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError unless every token id of both splits is below ``vocab_size`` (run once,
        at load, so that training steps can skip per-batch validation and its host sync)."""
        for split, data in (("train", self.train), ("validation", self.val)):
            top = int(data.max()) if len(data) else -1
            if top >= vocab_size:
                raise ValueError(f"{self.source}: the {split} split holds token id {top}, outside the "
                                 f"model's vocabulary [0, {vocab_size})")

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ids [B, T] and next-token targets [B, T] (int64, CPU)."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)  # [B]
        idx = starts[:, None] + torch.arange(seq_len + 1)  # [B, T + 1]
        win = data[idx].long()
        return win[:, :-1], win[:, 1:]


def load_corpus(path: str | None = None, min_len: int = 2, tokenizer: str | Tokenizer = "bytes",
                vocab_size: int = 8192) -> Corpus:
    """The built-in corpus (``path=None``) or a UTF-8 text file, split into train and validation,
    tokenised with ``tokenizer``: a tokenizer object, ``"bytes"``, ``"bpe"`` (a byte-level BPE of
    ``vocab_size`` ids trained on the training split) or a ``tokenizer.json`` file."""
    if path is None:
        with gzip.open(BUILTIN, "rb") as f:
            docs = f.read().decode("utf-8").split(DOC_SEP)
        train = DOC_SEP.join(d for i, d in enumerate(docs) if i % 20 != 19)
        val = DOC_SEP.join(d for i, d in enumerate(docs) if i % 20 == 19)
        source = "built-in (Python standard library sources)"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data: no such file: {path}")
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8", errors="replace")
        cut = int(len(text) * 0.95)
        train, val = text[:cut], text[cut:]
        source = path
    tok = tokenizer if not isinstance(tokenizer, str) else make_tokenizer(tokenizer, vocab_size, train.split(DOC_SEP))
    c = Corpus(encode_compact(tok, train), encode_compact(tok, val), source, tok)
    for split, data in (("train", c.train), ("validation", c.val)):
        if len(data) < min_len + 1:
            raise ValueError(f"{source}: the {split} split has {len(data)} bytes, fewer than seq_len + 1 = {min_len + 1}")
    return c

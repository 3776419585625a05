"""Training text and byte-level tokenisation (vocabulary 256).

The built-in corpus is ``lorafast/data/stdlib.txt.gz``: 3.6 MB of CPython 3.11 standard-library
sources (code, comments, docstrings), 102 modules, one document each (made by
``tools/make_corpus.py``). Every 20th document is held out for validation, so the split is
deterministic. A user's own text file (``--data FILE``) is split by bytes: the last 5 % validate.
"""
from __future__ import annotations

import dataclasses
import gzip
import os

import torch

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
    train: torch.Tensor  # uint8 [n_train]
    val: torch.Tensor  # uint8 [n_val]
    source: str

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


def load_corpus(path: str | None = None, min_len: int = 2) -> Corpus:
    """The built-in corpus (``path=None``) or a UTF-8 text file, split into train and validation."""
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
    c = Corpus(encode(train).to(torch.uint8), encode(val).to(torch.uint8), source)
    for split, data in (("train", c.train), ("validation", c.val)):
        if len(data) < min_len + 1:
            raise ValueError(f"{source}: the {split} split has {len(data)} bytes, fewer than seq_len + 1 = {min_len + 1}")
    return c

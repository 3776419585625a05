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
import hashlib
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
    digest: str = ""  # sha256 of the file the corpus was read from

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError unless every token id of both splits is below ``vocab_size`` (run once,
        at load, so that training steps can skip per-batch validation and its host sync)."""
        for split, data in (("train", self.train), ("validation", self.val)):
            top = int(data.max()) if len(data) else -1
            if top >= vocab_size:
                raise ValueError(f"{self.source}: the {split} split holds token id {top}, outside the "
                                 f"model's vocabulary [0, {vocab_size})")

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator,
              part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: ids [b, T] and next-token targets [b, T] (int64, CPU).

        The global batch of ``batch_size`` windows is drawn from ``gen`` (so ``gen`` advances the
        same way whatever ``part`` is); ``part = (i, n)`` returns its ``i``-th of ``n`` equal
        slices of rows, b = batch_size / n (data parallelism: rank i of n processes)."""
        i, n = part
        if n < 1 or not 0 <= i < n or batch_size % n:
            raise ValueError(f"part {part}: batch_size {batch_size} must split into {n} equal slices")
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)  # [B]
        b = batch_size // n
        starts = starts[i * b:(i + 1) * b]  # [b]
        idx = starts[:, None] + torch.arange(seq_len + 1)  # [b, T + 1]
        win = data[idx].long()
        return win[:, :-1], win[:, 1:]


def read_text(path: str, what: str = "data file") -> tuple[str, bytes]:
    """The text of the UTF-8 file ``path`` and its raw bytes. Raises FileNotFoundError (missing)
    or ValueError naming the file: a folder, unreadable, empty, not UTF-8 (offset and line of the
    first bad byte), or binary (a NUL byte)."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a folder, not a text file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not raw:
        raise ValueError(f"{what} {path}: the file is empty")
    nul = raw.find(b"\0")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(f"{what} {path}: a binary file, not text (NUL byte at offset {nul}, line {line})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{what} {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}, "
                         f"line {line})") from None
    return text, raw


def load_corpus(path: str | None = None, min_len: int = 2, tokenizer: str | Tokenizer = "bytes",
                vocab_size: int = 8192) -> Corpus:
    """The built-in corpus (``path=None``) or a UTF-8 text file, split into train and validation,
    tokenised with ``tokenizer``: a tokenizer object, ``"bytes"``, ``"bpe"`` (a byte-level BPE of
    ``vocab_size`` ids trained on the training split) or a ``tokenizer.json`` file.

    The file is validated here, once (:func:`read_text`); ``digest`` is the sha256 of its bytes,
    so that a resumed run can tell that its data changed. Raises FileNotFoundError or
    ValueError naming the file; ValueError when a split is shorter than ``min_len + 1`` bytes."""
    if path is None:
        with open(BUILTIN, "rb") as f:
            packed = f.read()
        docs = gzip.decompress(packed).decode("utf-8").split(DOC_SEP)
        train = DOC_SEP.join(d for i, d in enumerate(docs) if i % 20 != 19)
        val = DOC_SEP.join(d for i, d in enumerate(docs) if i % 20 == 19)
        source = "built-in (Python standard library sources)"
        digest = hashlib.sha256(packed).hexdigest()
    else:
        text, raw = read_text(path)
        cut = int(len(text) * 0.95)
        train, val = text[:cut], text[cut:]
        source = path
        digest = hashlib.sha256(raw).hexdigest()
    tok = tokenizer if not isinstance(tokenizer, str) else make_tokenizer(tokenizer, vocab_size, train.split(DOC_SEP))
    c = Corpus(encode_compact(tok, train), encode_compact(tok, val), source, tok, digest)
    for split, data in (("train", c.train), ("validation", c.val)):
        if len(data) < min_len + 1:
            raise ValueError(f"{source}: the {split} split has {len(data)} tokens, fewer than seq_len + 1 = {min_len + 1}")
    return c

"""Tokenizers: UTF-8 bytes (vocabulary 256, the default) or a byte-level BPE trained with the
Hugging Face ``tokenizers`` library.

Both kinds share one small interface, used by the corpus, the training loop, generation and
fine-tuning:

=========================  =================================================================
``encode(text)``           int64 token ids ``[n]`` (a CPU tensor)
``decode(ids)``            the text of a sequence of ids (tensor or list)
``vocab_size``             number of token ids (the model's ``vocab_size`` must equal it)
``pad_token_id``           id used to right-pad batches (classification)
``token_bytes()``          UTF-8 bytes each id stands for, ``[vocab_size]`` int64 (bits per byte)
``to_config()``            the JSON entry ``"tokenizer"`` of a model folder's ``config.json``
``save_pretrained(dir)``   the tokenizer's files in a model folder (none for bytes)
=========================  =================================================================

The BPE is byte-level, as GPT-2's: text is split by GPT-2's pre-tokenization regex, each byte is
mapped to one printable character (:func:`bytes_to_unicode`) and merges are learned on those, so
every string encodes (no unknown token) and decodes back to itself. Its files are the ones
``transformers`` reads: ``tokenizer.json`` (the ``tokenizers`` serialisation) and
``tokenizer_config.json`` (``tokenizer_class: PreTrainedTokenizerFast``), so
``transformers.AutoTokenizer.from_pretrained(folder)`` loads it too. One special token,
``<|endoftext|>`` (id 0), serves as padding, as GPT-2's end-of-text token does in fine-tuning.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Protocol

import torch

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
END_OF_TEXT = "<|endoftext|>"
KINDS = ("bytes", "bpe")


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_token_id: int

    def encode(self, text: str) -> torch.Tensor: ...
    def decode(self, ids: torch.Tensor | list[int]) -> str: ...
    def token_bytes(self) -> torch.Tensor: ...
    def to_config(self) -> dict: ...
    def save_pretrained(self, folder: str) -> None: ...


def _id_list(ids: torch.Tensor | Iterable[int]) -> list[int]:
    return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


class ByteTokenizer:
    """Token id = one UTF-8 byte (vocabulary 256). Decoding replaces invalid UTF-8 with U+FFFD.
    Padding uses byte 0 (NUL); classification pools by the attention mask or the pad id."""

    kind = "bytes"
    vocab_size = 256
    pad_token_id = 0

    def encode(self, text: str) -> torch.Tensor:
        data = bytearray(text.encode("utf-8"))
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return bytes(_id_list(ids)).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        return torch.ones(256, dtype=torch.int64)

    def to_config(self) -> dict:
        return {"type": "bytes", "vocab_size": 256}

    def save_pretrained(self, folder: str) -> None:
        """Nothing to write: the byte tokenizer is fully described by ``to_config()``."""

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (Radford et al. 2019, ``encoder.py``), which the
    ``tokenizers`` ByteLevel pre-tokenizer also uses: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class BPETokenizer:
    """A byte-level BPE (a ``tokenizers.Tokenizer``); build one with :meth:`train` or
    :meth:`from_file`. ``vocab_size`` includes the special token ``<|endoftext|>``."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        pad = tokenizer.token_to_id(END_OF_TEXT)
        if pad is None:
            raise ValueError(f"the BPE tokenizer has no {END_OF_TEXT} token (lorafast pads with it)")
        self.pad_token_id = pad

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> "BPETokenizer":
        """Learn a byte-level BPE of ``vocab_size`` ids (>= 257: the 256 byte symbols and
        ``<|endoftext|>`` come first) on ``texts``, offline. Deterministic for given texts."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {END_OF_TEXT}), got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=[END_OF_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        """Load a ``tokenizer.json``; raises FileNotFoundError / ValueError naming the file."""
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path!r}")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclass for bad files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({e})") from None
        return cls(tok)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(_id_list(ids), skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes per id: the length of the byte string the id's symbols map back to through
        :func:`bytes_to_unicode`; 0 for special tokens, which stand for no text."""
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        out = torch.zeros(self.vocab_size, dtype=torch.int64)
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in special:
                out[i] = sum(1 for c in token if c in inverse)
        return out

    def to_config(self) -> dict:
        return {"type": "bpe", "vocab_size": self.vocab_size, "file": TOKENIZER_FILE}

    def save_pretrained(self, folder: str) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (atomically)."""
        from lorafast.hub import atomic_write, write_json

        os.makedirs(folder, exist_ok=True)
        text = self.tokenizer.to_str(pretty=False)

        def write(p: str) -> None:
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(os.path.join(folder, TOKENIZER_FILE), write)
        write_json(os.path.join(folder, TOKENIZER_CONFIG_FILE), {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
            "pad_token": END_OF_TEXT, "unk_token": None, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False})

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` file, or a model folder holding a tokenizer.
    Raises FileNotFoundError / ValueError."""
    if spec == "bytes":
        return ByteTokenizer()
    if os.path.isdir(spec):
        with_file = os.path.join(spec, TOKENIZER_FILE)
        if os.path.isfile(with_file):
            return BPETokenizer.from_file(with_file)
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in folder {spec!r}")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--tokenizer {spec!r}: expected 'bytes', 'bpe' or a tokenizer.json file")
    return BPETokenizer.from_file(spec)


def make_tokenizer(spec: str, vocab_size: int, train_texts: Iterable[str]) -> Tokenizer:
    """The tokenizer of a training run: ``"bpe"`` trains a byte-level BPE of ``vocab_size`` on
    ``train_texts`` (the training split only); anything else goes to :func:`load_tokenizer`."""
    if spec == "bpe":
        return BPETokenizer.train(train_texts, vocab_size)
    return load_tokenizer(spec)


def run_tokenizer(spec: str, out: str, resume: bool) -> str | Tokenizer:
    """The tokenizer argument of a training run: with ``resume`` and a run in folder ``out``, the
    run's own tokenizer (a resumed run never retrains its BPE), else ``spec``."""
    if resume and os.path.isfile(os.path.join(out, "config.json")):
        from lorafast.hub import read_config

        meta = read_config(out)
        tok = tokenizer_from_config(meta.get("tokenizer"), out, int(meta["model"]["vocab_size"]))
        if tok is not None:
            return tok
    return spec


def tokenizer_from_config(entry: dict | None, folder: str, vocab_size: int) -> Tokenizer | None:
    """The tokenizer described by a model folder's ``config.json`` entry ``"tokenizer"``. Folders
    without one (written before tokenizers existed) are byte-level when ``vocab_size`` is 256,
    else have no known tokenizer (None). Raises ValueError when the entry is malformed or the
    tokenizer has more ids than the model (fewer is fine: a vocabulary padded for speed)."""
    if entry is None:
        return ByteTokenizer() if vocab_size == 256 else None
    if not isinstance(entry, dict) or entry.get("type") not in KINDS:
        raise ValueError(f"{folder}: unknown tokenizer entry {entry!r} in config.json (types: {KINDS})")
    if entry["type"] == "bytes":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok = BPETokenizer.from_file(os.path.join(folder, entry.get("file", TOKENIZER_FILE)))
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} ids, more than the model's vocab_size {vocab_size}")
    return tok


def encode_compact(tok: Tokenizer, text: str) -> torch.Tensor:
    """``tok.encode(text)`` stored in the narrowest dtype that holds the vocabulary (uint8 for
    bytes, int16 up to 32768 ids, else int32): the in-memory form of a tokenised corpus."""
    ids = tok.encode(text)
    dtype = torch.uint8 if tok.vocab_size <= 256 else torch.int16 if tok.vocab_size <= 1 << 15 else torch.int32
    return ids.to(dtype)


def bits_per_byte_factor(tok: Tokenizer, targets: Iterable[torch.Tensor]) -> float:
    """The factor that turns a mean cross-entropy in nats per target token into bits per UTF-8
    byte over the same targets: ``n_targets / (ln 2 * bytes(targets))``, the bytes counted from
    :meth:`Tokenizer.token_bytes`. ``1 / ln 2`` for the byte tokenizer. Raises ValueError when
    the targets hold no byte."""
    table = tok.token_bytes()
    n = nbytes = 0
    for y in targets:
        n += y.numel()
        nbytes += int(table[y.long().flatten().cpu()].sum())
    if nbytes == 0:
        raise ValueError("bits per byte: the targets hold no byte of text")
    return n / (math.log(2) * nbytes)


__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "bytes_to_unicode", "load_tokenizer", "make_tokenizer",
           "run_tokenizer", "tokenizer_from_config", "encode_compact", "bits_per_byte_factor", "TOKENIZER_FILE", "END_OF_TEXT"]

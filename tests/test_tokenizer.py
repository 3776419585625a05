"""Tokenizers: bytes and a byte-level BPE (tokenizers library), saved with the model, bits per byte."""
import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafast.tokenizer import (BPETokenizer, ByteTokenizer, bits_per_byte_factor, bytes_to_unicode, load_tokenizer,
                                tokenizer_from_config)

CODE = '''def parse(text, *, strict=True):
    """Split ``text`` into words; raise ValueError when strict and a word is empty."""
    words = [w for w in text.split(" ")]
    if strict and any(not w for w in words):
        raise ValueError("empty word in %r" % (text,))
    return words  # naïve, but enough — «quoted» ünïcödé 東京 🙂
'''


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([CODE] * 20, vocab_size=400)


# Any Unicode text: every code point but the surrogates (not encodable in UTF-8), NUL and
# controls included.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_bpe_round_trip_on_random_unicode(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == torch.int64 and (ids.numel() == 0 or int(ids.max()) < bpe.vocab_size)
    assert bpe.decode(ids) == text
    assert int(bpe.token_bytes()[ids].sum()) == len(text.encode("utf-8"))  # bits per byte counts every byte


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_byte_round_trip_on_random_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8")) and tok.decode(ids) == text


def test_bpe_learns_merges_and_is_deterministic(bpe):
    again = BPETokenizer.train([CODE] * 20, vocab_size=400)
    assert again.tokenizer.to_str() == bpe.tokenizer.to_str()
    assert bpe.vocab_size > 257 and bpe.pad_token_id == 0 and bpe.decode([0]) == "<|endoftext|>"
    n = len(bpe.encode(CODE))
    assert n < len(CODE.encode()) / 2, n  # merges compress the text it was trained on
    assert bits_per_byte_factor(bpe, [bpe.encode(CODE)]) == pytest.approx(n / (math.log(2) * len(CODE.encode())))
    assert bits_per_byte_factor(ByteTokenizer(), [torch.tensor([1, 2, 3])]) == pytest.approx(1 / math.log(2))
    assert len(set(bytes_to_unicode().values())) == 256
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train([CODE], vocab_size=100)


def test_bpe_files_load_back_and_in_transformers(bpe, tmp_path):
    bpe.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        again = load_tokenizer(spec)
        assert torch.equal(again.encode(CODE), bpe.encode(CODE))
    entry = bpe.to_config()
    assert tokenizer_from_config(entry, str(tmp_path), bpe.vocab_size).vocab_size == bpe.vocab_size
    assert tokenizer_from_config(None, str(tmp_path), 256).kind == "bytes"  # folders from before tokenizers
    with pytest.raises(ValueError, match="more than"):
        tokenizer_from_config(entry, str(tmp_path), bpe.vocab_size - 1)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    transformers = pytest.importorskip("transformers", reason="the [compare] extra is not installed")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(CODE)["input_ids"] == bpe.encode(CODE).tolist()
    assert hf.pad_token_id == bpe.pad_token_id and hf.decode(hf(CODE)["input_ids"]) == CODE


def test_training_with_bpe_saves_it_and_generate_uses_it(tmp_path):
    import subprocess
    import sys

    from lorafast.train import TrainConfig, train

    data = tmp_path / "text.txt"
    data.write_text(CODE * 40)
    run = tmp_path / "run"
    s = train(TrainConfig(steps=4, batch_size=4, seq_len=16, embedding_dim=16, hidden_dim=16, num_layers=1, warmup=1,
                          eval_every=2, eval_batches=1, sample_tokens=3, progress=False, reference=True, out=str(run),
                          data=str(data), tokenizer="bpe", vocab_size=320))
    meta = json.load(open(run / "config.json"))
    tok = load_tokenizer(str(run / "tokenizer.json"))
    assert meta["tokenizer"] == {"type": "bpe", "vocab_size": tok.vocab_size, "file": "tokenizer.json"}
    assert meta["model"]["vocab_size"] == tok.vocab_size
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = [r for r in recs if "val_loss" in r]
    assert evals and all(r["val_bpb"] < r["val_loss"] / math.log(2) for r in evals)  # > 1 byte per token
    assert s["val_bpb"][-1][1] == pytest.approx(evals[-1]["val_bpb"])
    # resuming uses the run's own tokenizer, whatever --tokenizer says
    s2 = train(TrainConfig(steps=6, batch_size=4, seq_len=16, embedding_dim=16, hidden_dim=16, num_layers=1, warmup=1,
                           eval_every=0, eval_batches=1, sample_tokens=0, progress=False, reference=True, out=str(run),
                           data=str(data), resume=True))
    assert s2["steps"] == 6 and json.load(open(run / "config.json"))["tokenizer"]["type"] == "bpe"
    g = subprocess.run([sys.executable, "-m", "lorafast", "generate", "--checkpoint", str(run), "--prompt", "raise ",
                        "--max-new-tokens", "5", "--reference"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("raise ")


def test_bytes_run_reports_bits_per_byte(tmp_path):
    from lorafast.train import TrainConfig, train

    train(TrainConfig(steps=2, batch_size=2, seq_len=8, embedding_dim=8, hidden_dim=16, num_layers=1, warmup=1,
                      eval_every=2, eval_batches=1, sample_tokens=0, progress=False, reference=True, out=str(tmp_path)))
    for r in (json.loads(line) for line in open(tmp_path / "metrics.jsonl")):
        if "val_loss" in r:
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)

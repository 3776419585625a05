"""Sequence classification: the GPT-2 head on either model, padding, fine-tuning, the demo task.

Tolerances: the accelerated model runs the Triton kernels under the interpreter (fp32); its
logits are compared with the reference's and with a float64 reference by the rule of the house
style, |acc - truth| <= 10 |ref32 - truth| + 1e-5 (the kernels accumulate in another order).
"""
import json

import pytest
import torch

import lorafast
from lorafast import LoRAForSequenceClassification, reference
from lorafast.classification import pad_batch
from lorafast.finetune import FinetuneConfig, accuracy, builtin_demo, finetune, macro_f1, read_rows

KW = dict(num_heads=2, max_seq_len=32)


def pair(local="ffn-alt", num_labels=3, seed=1):
    ref = LoRAForSequenceClassification(reference.LoRA(50, 24, 32, 2, local=local, seed=seed, **KW), num_labels)
    acc = LoRAForSequenceClassification(lorafast.LoRA(50, 24, 32, 2, local=local, seed=seed, **KW), num_labels)
    return ref, acc


def ragged(V=50, lengths=(13, 5, 9, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=gen) for n in lengths]


@pytest.mark.parametrize("local", ["branch"])
def test_logits_equal_between_reference_and_accelerated(local):
    ref, acc = pair(local)
    assert list(ref.state_dict()) == list(acc.state_dict())
    for (k, a), b in zip(ref.state_dict().items(), acc.state_dict().values()):
        assert torch.equal(a, b), k
    x, mask = pad_batch(ragged(), pad_token_id=0)
    got, want = acc(x, mask), ref(x, mask)
    truth = LoRAForSequenceClassification(reference.LoRA(50, 24, 32, 2, local=local, seed=1, **KW), 3).double()(x, mask)
    err, ref_err = (got.double() - truth).abs(), (want.double() - truth).abs()
    bad = err > 10 * ref_err + 1e-5
    assert not bad.any(), f"worst {err.max():.3g} at {divmod(int(err.argmax()), err.shape[1])}"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    y = torch.tensor([0, 2, 1, 1])
    lr, la = ref.loss(x, y, mask), acc.loss(x, y, mask)
    torch.testing.assert_close(la, lr, rtol=1e-5, atol=1e-6)
    lr.backward()
    la.backward()
    gr = dict(ref.named_parameters())
    for n, p in acc.named_parameters():
        if p.grad is None:
            assert gr[n].grad is None, n
            continue
        scale = gr[n].grad.abs().max().clamp_min(1e-6)
        assert (p.grad - gr[n].grad).abs().max() <= 1e-4 * scale + 1e-6, n


def test_padding_changes_no_logit():
    ref, _ = pair()
    seqs = ragged()
    alone = torch.cat([ref(s[None]) for s in seqs])  # [B, C]: each sequence unpadded
    x, mask = pad_batch(seqs, pad_token_id=0)
    torch.testing.assert_close(ref(x, mask), alone, rtol=1e-5, atol=1e-6)
    ref.pad_token_id = 0  # no mask: GPT-2's rule, the rightmost id that is not padding
    torch.testing.assert_close(ref(x), alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(ref.last_positions(x), ref.last_positions(x, mask))
    ref.pad_token_id = None  # no mask, no pad id: the last position
    assert ref.last_positions(x).tolist() == [12] * 4


def test_bad_input_raises():
    ref, _ = pair()
    x, mask = pad_batch(ragged(), pad_token_id=0)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right"):
        ref(x, left)
    with pytest.raises(ValueError, match="0 and 1"):
        ref(x, mask * 2)
    with pytest.raises(ValueError, match="shape"):
        ref(x, mask[:, :3])
    with pytest.raises(ValueError, match="labels"):
        ref.loss(x, torch.tensor([0, 1, 2, 3]), mask)
    with pytest.raises(ValueError, match="num_labels"):
        LoRAForSequenceClassification(reference.LoRA(50, 24, 32, 1, **KW), 0)
    with pytest.raises(TypeError):
        LoRAForSequenceClassification(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="id2label"):
        LoRAForSequenceClassification(reference.LoRA(50, 24, 32, 1, **KW), 2, id2label={0: "a", 5: "b"})


def test_save_and_load_classifier_bit_for_bit(tmp_path):
    ref, _ = pair(local="merge")
    ref.redraw_local_(25)
    ref.save_pretrained(tmp_path)
    meta = json.load(open(tmp_path / "config.json"))
    assert meta["architecture"] == "LoRAForSequenceClassification" and meta["step"] == 25
    assert meta["classification"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    back = LoRAForSequenceClassification.from_pretrained(tmp_path, reference=True)
    assert isinstance(back.transformer, reference.LoRA) and back.id2label == ref.id2label
    for (k, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x, mask = pad_batch(ragged(), pad_token_id=0)
    assert torch.equal(back(x, mask), ref.eval()(x, mask))
    # a language-model folder makes a new classifier: same language model, a new score layer
    ref.transformer.save_pretrained(tmp_path / "lm")
    clf = LoRAForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2, reference=True)
    h = ref.transformer.hidden(x)
    torch.testing.assert_close(clf.transformer.hidden(x), h, rtol=0, atol=0)
    assert clf.score.weight.shape == (2, 32)


def test_fine_tuning_step_redraws_local_tensors():
    from lorafast.train import make_optimizer, train_step

    ref, _ = pair(local="ffn-alt")
    opt = make_optimizer(FinetuneConfig(), ref)
    x, _ = pad_batch(ragged(), pad_token_id=0)
    ref.pad_token_id = 0
    seen = []
    for step in range(3):
        loss = train_step(ref, opt, x, torch.tensor([0, 1, 2, 0]), step, 1e-3)
        seen.append(next(ref.local_parameters()).clone())
        assert torch.isfinite(loss)
    assert not torch.equal(seen[0], seen[1]) and ref.local_step == 2


def test_metrics():
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]
    assert accuracy(y, p) == pytest.approx(4 / 6)
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+1+1), class 1: 4/(4+1+0), class 2: 2/(2+0+1)
    assert macro_f1(y, p) == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)


def test_read_rows(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\nbye,neg\n')
    assert read_rows(str(tmp_path / "a.csv"), "text", "label") == [("hello, world", "pos"), ("bye", "neg")]
    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 1}\n\n{"t": "z", "y": 0}\n')
    assert read_rows(str(tmp_path / "a.jsonl"), "t", "y") == [("x", "1"), ("z", "0")]
    with pytest.raises(ValueError, match="column 'body'"):
        read_rows(str(tmp_path / "a.csv"), "body", "label")
    (tmp_path / "b.jsonl").write_text('{"t": "x"}\n')
    with pytest.raises(ValueError, match="b.jsonl:1"):
        read_rows(str(tmp_path / "b.jsonl"), "t", "y")
    with pytest.raises(FileNotFoundError):
        read_rows(str(tmp_path / "none.csv"), "t", "y")


def test_demo_split_holds_out_disjoint_regions():
    from lorafast.corpus import BUILTIN, DOC_SEP
    import gzip

    train, test = builtin_demo()
    labels = {label for _, label in train}
    assert len(labels) == 10 and {label for _, label in test} == labels
    assert {"turtle", "inspect", "typing"} <= labels
    docs = {d.partition("\n")[0].rsplit(" ", 1)[-1][:-3]: d.partition("\n")[2]
            for d in gzip.open(BUILTIN, "rb").read().decode().split(DOC_SEP)}
    for label in labels:
        body = docs[label].encode()
        cut = int(len(body) * 0.95)
        train_region, test_region = body[:cut].decode(errors="ignore"), body[cut:].decode(errors="ignore")
        tr = [t for t, lab in train if lab == label]
        te = [t for t, lab in test if lab == label]
        assert all(t in train_region for t in tr) and all(t in test_region for t in te)
        assert len(te) >= 10 and 18 * len(te) <= len(tr) <= 20 * len(te) + 20
    assert not any("Python standard library:" in t for t, _ in train + test)  # the header names the module
    assert all(len(t.encode()) <= 256 for t, _ in train + test)


def test_finetune_on_a_csv_file_and_preset(tmp_path):
    """The pipeline on a task a few steps learn (the label is the text's last word), with another
    local preset than the checkpoint's; checks the folder, the metrics and the reload."""
    from lorafast.train import TrainConfig, train

    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma"]
    lines = ["text,label"]
    for i in range(300):
        k = int(torch.randint(0, 3, (1,), generator=gen))
        lines.append(f"item {i} says {words[k]},{words[k]}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    train(TrainConfig(steps=3, batch_size=2, seq_len=32, embedding_dim=16, hidden_dim=16, num_layers=2, warmup=1,
                      eval_every=0, eval_batches=1, sample_tokens=0, progress=False, reference=True,
                      out=str(tmp_path / "lm")))
    s = finetune(FinetuneConfig(checkpoint=str(tmp_path / "lm"), data=str(tmp_path / "d.csv"), steps=60,
                                batch_size=16, lr=1e-2, warmup=5, eval_every=30, progress=False, reference=True,
                                preset="branch", out=str(tmp_path / "ft")))
    assert s["labels"] == words and s["n_test"] == 30 and s["n_train"] == 270
    assert s["accuracy"] > s["baseline"]["accuracy"] + 0.3, s
    clf = LoRAForSequenceClassification.from_pretrained(tmp_path / "ft", reference=True)
    assert clf.config.local.name == "branch" and clf.local_step == 3 + 60
    assert clf.predict(["item 9 says gamma", "item 4 says alpha"]) == ["gamma", "alpha"]
    meta = json.load(open(tmp_path / "ft" / "config.json"))
    assert meta["metrics"]["accuracy"] == s["accuracy"] and meta["tokenizer"]["type"] == "bytes"


def test_demo_finetune_beats_the_majority_class(tmp_path):
    """The built-in demo task in a CI-sized run: a 2-block, width-32 model whose byte-level BPE
    (1024 ids) and language model are trained on a third of the demo's *training* snippets (so
    nothing of the held-out regions is seen before testing), then fine-tuned for 200 steps.
    Measured (default preset, one machine): accuracy 0.324 and macro-F1 0.301 against the majority
    class's 0.137 and 0.024 (README, "Classification and fine-tuning")."""
    from lorafast.train import TrainConfig, train

    train_rows, _ = builtin_demo()
    (tmp_path / "lm.txt").write_text("\n".join(t for t, _ in train_rows[::3]))
    train(TrainConfig(steps=30, batch_size=8, seq_len=64, embedding_dim=32, hidden_dim=32, num_layers=2, warmup=5,
                      eval_every=0, eval_batches=1, sample_tokens=0, progress=False, reference=True,
                      data=str(tmp_path / "lm.txt"), tokenizer="bpe", vocab_size=1024, out=str(tmp_path / "lm")))
    s = finetune(FinetuneConfig(checkpoint=str(tmp_path / "lm"), steps=200, batch_size=32, lr=3e-3, warmup=10,
                                eval_every=0, eval_batch_size=256, progress=False, reference=True,
                                out=str(tmp_path / "ft")))
    base = s["baseline"]
    assert base["label"] == "turtle" and base["accuracy"] == pytest.approx(28 / 204)
    assert s["accuracy"] >= base["accuracy"] + 0.15 and s["macro_f1"] >= base["macro_f1"] + 0.15, s

"""Training loop, checkpoints, corpus and the ``lorafast`` CLI (small, fast runs on CPU)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from lorafast.corpus import decode, encode, load_corpus
from lorafast.train import TrainConfig, load_checkpoint, lr_at, train

TINY = dict(steps=30, batch_size=8, seq_len=32, embedding_dim=32, hidden_dim=32, num_layers=2, warmup=5,
            eval_every=15, eval_batches=2, log_every=5, sample_tokens=8, progress=False, reference=True)


def test_builtin_corpus():
    c = load_corpus()
    assert len(c.train) + len(c.val) > 1_000_000  # at least 1 MB of real text
    assert 0.02 < len(c.val) / len(c.train) < 0.1
    assert torch.equal(load_corpus().val, c.val)  # deterministic split
    assert "def " in decode(c.train[:20000])
    x, y = c.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert decode(encode("héllo")) == "héllo"


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 55) == pytest.approx(0.55)


@pytest.mark.parametrize("preset,optimizer", [("ffn-alt", "adamw"), ("merge", "sgd")])
def test_short_training_run_loss_falls(tmp_path, preset, optimizer):
    lr = 3e-3 if optimizer == "adamw" else 0.3
    cfg = TrainConfig(out=str(tmp_path), preset=preset, optimizer=optimizer, lr=lr, **TINY)
    s = train(cfg)
    vals = [v for _, v in s["val_losses"]]
    assert vals[0] > 5.0  # about ln(256) at the start
    assert vals[-1] < vals[0] - 1.0, vals
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged] == [0, 1, 5, 10, 15, 20, 25, 30]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)
    assert s["first_loss"] == logged[1]["loss"] and s["last_loss"] == logged[-1]["loss"]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 15, 30]
    assert os.path.isfile(tmp_path / "model.safetensors") and os.path.isfile(tmp_path / "config.json")
    model, meta = load_checkpoint(str(tmp_path), reference=True)
    assert meta["step"] == 30 and meta["model"]["local"]["name"] == preset
    x = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(x)).all()


def _params(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("preset", ["ffn-alt", "merge"])
def test_resume_continues_where_it_stopped(tmp_path, preset):
    # constant learning rate after warmup, so that a 10-step run and a 20-step run share a schedule
    tiny = {**TINY, "lr": 3e-3, "min_lr": 3e-3, "eval_every": 0, "log_every": 1, "preset": preset}
    a = train(TrainConfig(out=str(tmp_path / "full"), **{**tiny, "steps": 20}))
    train(TrainConfig(out=str(tmp_path / "half"), **{**tiny, "steps": 10}))
    b = train(TrainConfig(out=str(tmp_path / "half"), resume=True, **{**tiny, "steps": 20}))
    assert b["losses"] == a["losses"][10:]  # bit-identical continuation
    pa, pb = _params(tmp_path / "full"), _params(tmp_path / "half")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    with pytest.raises(ValueError, match="another model configuration"):
        train(TrainConfig(out=str(tmp_path / "half"), resume=True, **{**tiny, "steps": 21, "seed": 5}))


def test_crash_keeps_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    import lorafast.reference as reference

    tiny = {**TINY, "steps": 12, "lr": 3e-3, "min_lr": 3e-3, "eval_every": 0, "log_every": 1}
    want = train(TrainConfig(out=str(tmp_path / "whole"), **tiny))
    calls = {"n": 0}
    real = reference.LoRA.loss_unchecked  # what the training step calls

    def flaky(self, *a, **k):  # Ctrl-C inside the 8th training loss, after its batch was drawn
        calls["n"] += torch.is_grad_enabled()  # evaluations run under no_grad
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(reference.LoRA, "loss_unchecked", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **tiny))
    assert json.load(open(tmp_path / "cut" / "config.json"))["step"] == 7
    monkeypatch.setattr(reference.LoRA, "loss_unchecked", real)
    got = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **tiny))
    assert got["losses"] == want["losses"][7:]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == list(range(0, 13))  # step 0 (initial evaluation), 1..7, then 8..12 after resuming


def test_bad_train_config(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(preset="nope")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(FileNotFoundError):  # its own --out: the checkout may hold a user's runs/lorafast
        train(TrainConfig(data="/no/such/file.txt", out=str(tmp_path / "run"), **TINY))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lorafast", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)


def test_cli_train_and_generate(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "run"
    r = _cli("train", "--steps", "20", "--batch-size", "8", "--seq-len", "32", "--hidden-dim", "32",
             "--embedding-dim", "16", "--num-layers", "1", "--eval-every", "10", "--data", str(data),
             "--out", str(out), "--no-progress", "--sample-tokens", "5", "--preset", "branch")
    assert r.returncode == 0, r.stderr
    assert "sample" in r.stdout and "val loss" in r.stderr
    g = _cli("generate", "--checkpoint", str(out), "--prompt", "the quick", "--max-new-tokens", "12")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("the quick") and len(g.stdout.encode()) >= len("the quick") + 1
    h = _cli("bench", "--help")
    assert h.returncode == 0 and "--full" in h.stdout, h.stderr
    bad = _cli("train", "--preset", "nope")
    assert bad.returncode != 0 and "nope" in bad.stderr
    missing = _cli("generate", "--checkpoint", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_dtypes_train(tmp_path, dtype):
    # The accelerated model (kernels under the interpreter) under CPU autocast; fp16 adds a GradScaler.
    cfg = TrainConfig(out=str(tmp_path), dtype=dtype, **{**TINY, "steps": 12, "eval_every": 12, "reference": False,
                                                         "lr": 1e-2})
    s = train(cfg)
    vals = [v for _, v in s["val_losses"]]
    assert all(math.isfinite(v) for v in vals) and vals[-1] < vals[0] - 0.3, vals


def test_bench_cli_records(tmp_path):
    # Smoke run of two suites on CPU: every record carries the environment and real numbers.
    out = tmp_path / "bench.jsonl"
    r = _cli("bench", "rerandomize", "model", "--device", "cpu", "--save", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in open(out)]
    assert {r["suite"] for r in recs} == {"rerandomize", "model"}
    for rec in recs:
        assert {"device", "torch", "commit", "time", "threads"} <= set(rec)
        assert rec.get("ms", 0) > 0 or rec.get("skipped"), rec  # a baseline not run here says why
    steps = {r["provider"]: r for r in recs if r["suite"] == "model"}
    from lorafast.bench.model import PROVIDERS

    assert set(steps) == set(PROVIDERS) and steps["lorafast"]["tokens_per_s"] > 0
    assert {"eager", "eager-sdpa", "lorafast"} <= {p for p, r in steps.items() if "ms" in r}


def test_training_step_validates_nothing_per_step(tmp_path, monkeypatch):
    """The loop validates the corpus once at load; its steps and evaluations run the unchecked
    loss (no per-batch validation, hence no host sync on a GPU)."""
    import lorafast.reference as reference

    def refuse(*a, **k):
        raise AssertionError("per-batch validation in the training loop")

    monkeypatch.setattr(reference, "check_ids", refuse)
    monkeypatch.setattr(reference, "check_targets", refuse)
    out = train(TrainConfig(out=str(tmp_path), **{**TINY, "steps": 3, "eval_every": 2, "sample_tokens": 0}))
    assert len(out["losses"]) == 3 and len(out["val_losses"]) == 3


def test_bench_times_the_training_step_of_train(monkeypatch):
    from lorafast.bench import model as bench_model
    import lorafast.train

    seen = []
    real = lorafast.train.train_step
    monkeypatch.setattr(lorafast.train, "train_step", lambda *a, **k: (seen.append(a[4]), real(*a, **k))[1])
    step = bench_model.setup("lorafast", V=32, E=16, H=16, L=1, B=2, T=8)
    step()
    assert seen == [0, 1]  # the warm-up step and the timed one, through lorafast.train.train_step


def test_gpt2_baseline_trains_with_the_same_step():
    pytest.importorskip("transformers", reason="the [compare] extra is not installed")
    from lorafast.config import ModelConfig
    from lorafast.gpt2 import gpt2_like
    from lorafast.train import train_step

    cfg = ModelConfig(64, 32, 32, 2, num_heads=2, max_seq_len=16, seed=3)
    g = gpt2_like(cfg)
    hf = g.model.config
    assert (hf.n_embd, hf.n_layer, hf.n_head, hf.n_inner, hf.n_positions, hf.vocab_size) == (32, 2, 2, 128, 16, 64)
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = [float(train_step(g, opt, x[:, :-1], x[:, 1:], s, 3e-3)) for s in range(8)]
    assert abs(losses[0] - math.log(64)) < 0.3 and losses[-1] < losses[0] - 0.5
    with pytest.raises(ValueError, match="embedding_dim"):
        gpt2_like(ModelConfig(64, 16, 32, 1))


# ------------------------------------------------------------------ issue 13: the training commands
SMALL = ["--reference", "--batch-size", "4", "--seq-len", "16", "--hidden-dim", "32", "--embedding-dim", "32",
         "--num-layers", "2", "--eval-every", "0", "--no-progress", "--sample-tokens", "0", "--threads", "1"]


def _run(capsys, *argv):
    """``lorafast ARGV`` in this process: (exit status, stdout, stderr)."""
    from lorafast.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("lorafast: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def _ranged_options():
    from lorafast.cli import GenerateConfig

    for cls in (TrainConfig, GenerateConfig):
        for f in __import__("dataclasses").fields(cls):
            if "range" in f.metadata or "real" in f.metadata:
                yield cls, f


@pytest.mark.parametrize("cls,field", list(_ranged_options()), ids=lambda x: getattr(x, "name", getattr(x, "__name__", "")))
def test_every_numeric_option_is_range_checked(cls, field):
    from lorafast.checks import _bound

    base = {"checkpoint": "x"} if cls.__name__ == "GenerateConfig" else {}
    if "range" in field.metadata:
        lo, hi = field.metadata["range"]
        for bad in (lo - 1, hi):
            with pytest.raises(ValueError, match=re.escape(f"{field.name} = {bad} is out of range [{lo}, {_bound(hi)})")):
                cls(**base, **{field.name: bad})
        with pytest.raises(TypeError, match=field.name):
            cls(**base, **{field.name: 1.5})
        cls(**base, **{field.name: hi - 1 if field.name == "seed" else lo})  # the ends of the range pass
    else:
        lo, hi, brackets = field.metadata["real"]
        for bad in ([lo] if brackets[0] == "(" else [lo - 1]) + [float("nan"), float("inf")]:
            with pytest.raises(ValueError, match=rf"{field.name} = .* is out of range"):
                cls(**base, **{field.name: bad})


def test_cli_rejects_out_of_range_values_in_one_line(capsys):
    rc, _, err = _run(capsys, "train", "--seed", str(2 ** 64))
    _one_line_error(rc, err, "--seed = 18446744073709551616 is out of range [0, 2^64)")
    rc, _, err = _run(capsys, "generate", "--checkpoint", "x", "--top-k", "0")
    _one_line_error(rc, err, "--top-k = 0 is out of range [1, 2^31)")  # the flag, not the field
    rc, _, err = _run(capsys, "train", "--batch-size", "0")
    _one_line_error(rc, err, "--batch-size = 0 is out of range")
    rc, _, err = _run(capsys, "finetune", "--steps", "-1")
    _one_line_error(rc, err, "--steps must be >= 1")
    rc, _, err = _run(capsys, "train", "--steps", "many")
    _one_line_error(rc, err, "--steps", "invalid int value")


def test_resume_restores_the_run_and_refuses_other_settings(tmp_path, capsys):
    data = tmp_path / "my.txt"
    data.write_text("a small text to train on. " * 200)
    out = str(tmp_path / "mine")
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "4", "--lr", "0.01", "--out", out)
    assert rc == 0, err
    # the README's example: only --out and --resume (and a longer run)
    rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--steps", "6", "--no-progress")
    assert rc == 0, err
    assert "resuming" in err and "now ends at step 6 instead of 4" in err
    assert f"data: {data}" in err and "1 thread" in err  # the saved data and settings, not the defaults
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["step"] == 6 and saved["train"]["lr"] == 0.01 and saved["train"]["data"] == str(data)
    assert saved["train"]["batch_size"] == 4 and saved["model"]["hidden_dim"] == 32
    for flag, value, want in [("--batch-size", "8", "--batch-size 4, not 8"), ("--lr", "0.003", "--lr 0.01, not 0.003"),
                              ("--data", str(tmp_path / "other.txt"), f"--data '{data}', not '{tmp_path / 'other.txt'}'"),
                              ("--hidden-dim", "64", "another model configuration")]:
        rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--steps", "8", flag, value)
        _one_line_error(rc, err, want)
    rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--steps", "5")
    _one_line_error(rc, err, "--steps 5", "already at step 6")
    data.write_text("other text " * 300)
    rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--steps", "8")
    _one_line_error(rc, err, "the data changed")


def test_a_fresh_run_refuses_a_folder_that_holds_one(tmp_path, capsys):
    out = str(tmp_path / "run")
    data = tmp_path / "t.txt"
    data.write_text("hello world. " * 300)
    assert _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "4", "--out", out)[0] == 0
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "2", "--out", out)
    _one_line_error(rc, err, f"--out {out} already holds a run (checkpoint of step 4)", "--resume", "--overwrite")
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 4  # untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "2", "--out", str(tmp_path / "other"))
    _one_line_error(rc, err, "already holds 1 files")
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "2", "--out", out, "--overwrite")
    assert rc == 0, err
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 2
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [0, 1, 2]
    rc, _, err = _run(capsys, "train", "--out", out, "--resume", "--overwrite")
    _one_line_error(rc, err, "--resume", "--overwrite")


@pytest.mark.parametrize("state", ["missing", "empty", "no checkpoint", "a file"])
def test_resume_with_nothing_to_resume_fails(tmp_path, capsys, state):
    out = tmp_path / "run"
    if state == "empty":
        out.mkdir()
    elif state == "no checkpoint":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 0}\n')
    elif state == "a file":
        out.write_text("x")
    rc, _, err = _run(capsys, "train", "--out", str(out), "--resume")
    _one_line_error(rc, err, f"--resume: nothing to resume: {out}")
    assert not (out / "checkpoints").exists() if out.is_dir() else True


@pytest.mark.parametrize("content,says", [
    (b"", "the file is empty"),
    (b"text\x00\x01\x02binary", "a binary file, not text (NUL byte at offset 4, line 1)"),
    (b"caf\xe9 latin-1\n", "not UTF-8 text (byte 0xe9 at offset 3, line 1)"),
    (None, "is a folder, not a text file"),
    ("missing", "no such file"),
])
def test_bad_data_files_are_reported_when_loaded(tmp_path, capsys, content, says):
    path = tmp_path / "data.txt"
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(says)):
        load_corpus(str(path))
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(path), "--out", str(tmp_path / "run"))
    _one_line_error(rc, err, f"data file {path}: {says}")
    assert not (tmp_path / "run").exists()  # validated before the run folder is touched


def test_threads_flag_and_header(tmp_path, capsys):
    before = torch.get_num_threads()
    data = tmp_path / "t.txt"
    data.write_text("hello world. " * 300)
    out = str(tmp_path / "run")
    rc, _, err = _run(capsys, "train", *SMALL, "--data", str(data), "--steps", "2", "--out", out)
    assert rc == 0 and ", 1 thread" in err, err
    assert torch.get_num_threads() == before  # train() gives the caller's setting back
    rc, text, err = _run(capsys, "generate", "--checkpoint", out, "--threads", "1", "--max-new-tokens", "3",
                         "--reference")
    assert rc == 0 and "1 thread" in err and "(step 2)" in err, err


@pytest.mark.parametrize("command", ["train", "generate", "finetune"])
def test_help_gives_every_flag_a_text_and_its_default_once(command):
    import argparse

    from lorafast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    fmt = argparse.HelpFormatter(command)
    checked = 0
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = fmt._expand_help(action)
        assert text.strip(), action.option_strings
        if action.required:
            continue
        assert text.count("default") == 1, (action.option_strings, text)
        checked += 1
    assert checked >= {"train": 30, "generate": 8, "finetune": 10}[command]
    assert "torchrun --nproc_per_node=N -m lorafast train" in sub.format_help() if command == "train" else True


def test_finetune_wants_a_local_checkpoint_and_keeps_an_earlier_run(tmp_path, capsys, monkeypatch):
    # A mistyped or missing checkpoint is a one-line error at once (it used to be looked up on
    # the Hugging Face Hub, 25 s of retries offline); a second fine-tuning into the same --out is
    # refused unless --overwrite, as lorafast train does.
    monkeypatch.chdir(tmp_path)
    for argv in (["finetune"], ["finetune", "--checkpoint", "nosuch"]):
        rc, _, err = _run(capsys, *argv)
        _one_line_error(rc, err, "no checkpoint or model folder at")
        assert "huggingface" not in err.lower()
    lm = tmp_path / "lm"
    assert _run(capsys, "train", *SMALL, "--steps", "2", "--out", str(lm))[0] == 0
    ft = ["finetune", "--checkpoint", str(lm), "--steps", "1", "--eval-every", "0", "--no-progress",
          "--reference", "--out", str(tmp_path / "ft")]
    assert _run(capsys, *ft)[0] == 0
    before = (tmp_path / "ft" / "metrics.jsonl").read_text()
    rc, _, err = _run(capsys, *ft)
    _one_line_error(rc, err, "--out", "is not empty", "--overwrite")
    assert (tmp_path / "ft" / "metrics.jsonl").read_text() == before
    assert _run(capsys, *ft, "--overwrite")[0] == 0


def test_top_level_help_lists_every_command(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for command in ("train", "generate", "finetune", "bench", "study"):
        assert command in out.split("positional arguments")[1], command


def test_warnings_for_a_preset_that_makes_nothing_local_and_a_run_shorter_than_warmup(tmp_path, capsys):
    rc, _, err = _run(capsys, "train", *SMALL, "--num-layers", "1", "--preset", "reservoir", "--steps", "2",
                      "--out", str(tmp_path / "r"))
    assert rc == 0
    assert "warning: preset reservoir makes no tensor local in a 1-block model" in err
    assert "warning: --warmup 50 >= --steps 2" in err
    rc, _, err = _run(capsys, "train", *SMALL, "--preset", "reservoir", "--steps", "2", "--warmup", "1",
                      "--out", str(tmp_path / "s"))
    assert rc == 0 and "lorafast: warning" not in err

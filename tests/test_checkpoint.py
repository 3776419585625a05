"""Checkpoints that lose nothing (one process, CPU): exact resume with dropout and fp16 loss
scaling, kill -9 during a write, damaged files, the newest K kept, non-finite losses, umask."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lorafast import checkpoint
from lorafast.train import NonFiniteLossError, TrainConfig, train

TINY = dict(batch_size=4, seq_len=16, embedding_dim=32, hidden_dim=32, num_layers=2, warmup=2, lr=3e-3,
            min_lr=3e-3, eval_every=0, eval_batches=1, log_every=1, sample_tokens=0, progress=False,
            reference=True)


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return str(p)


def _params(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint.latest(folder), "model.safetensors"))


def _same_params(a, b):
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("extra", [dict(dropout=0.1), dict(dropout=0.1, dtype="float16", preset="merge")],
                         ids=["dropout", "dropout-fp16-merge"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, data, extra):
    cfg = {**TINY, **extra, "data": data}
    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=8, **cfg))
    again = train(TrainConfig(out=str(tmp_path / "again"), steps=8, **cfg))
    assert again["losses"] == whole["losses"]  # dropout is seeded: two fresh runs agree
    train(TrainConfig(out=str(tmp_path / "cut"), steps=4, **cfg))
    rest = train(TrainConfig(out=str(tmp_path / "cut"), steps=8, resume=True, **cfg))
    assert rest["losses"] == whole["losses"][4:]
    assert _same_params(tmp_path / "whole", tmp_path / "cut")
    trainer = json.load(open(tmp_path / "cut" / "config.json"))["trainer"]
    assert (trainer["grad_scaler"] is not None) == (extra.get("dtype") == "float16")


_KILLER = r"""
import os, signal, sys
import lorafast.checkpoint as ck
from lorafast.train import TrainConfig, train
where, step = sys.argv[1], int(sys.argv[2])
real_write, real_link = ck.atomic_write, ck._symlink_over
def atomic_write(path, write):
    real_write(path, write)
    if where == "files" and f"step-{step:08d}" in path:  # half the checkpoint's files are on disk
        os.kill(os.getpid(), signal.SIGKILL)
def symlink_over(target, path):
    if where == "commit" and f"step-{step:08d}" in target:  # renamed into place, latest not switched
        os.kill(os.getpid(), signal.SIGKILL)
    real_link(target, path)
ck.atomic_write, ck._symlink_over = atomic_write, symlink_over
train(TrainConfig(**eval(sys.argv[3])))
"""


@pytest.mark.parametrize("where,resumes_at", [("files", 4), ("commit", 6)])
def test_kill_9_during_a_checkpoint_write(tmp_path, data, where, resumes_at):
    # the killed run is another process: the same thread count, so that its sums round alike
    cfg = {**TINY, "data": data, "checkpoint_every": 2, "steps": 10, "threads": torch.get_num_threads()}
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **cfg))
    out = str(tmp_path / "killed")
    r = subprocess.run([sys.executable, "-c", _KILLER, where, "6", repr({**cfg, "out": out})],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert checkpoint.latest(out).endswith(f"step-{resumes_at:08d}")  # the last complete checkpoint
    rest = train(TrainConfig(out=out, resume=True, **cfg))
    assert rest["losses"] == whole["losses"][resumes_at:]
    assert _same_params(tmp_path / "whole", out)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(11))  # the records logged after the checkpoint were dropped, not repeated
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000010"]  # no leftovers


def _damage(path, how):
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        if how == "truncate":
            f.write(raw[: len(raw) // 2])
        elif how == "empty":
            pass
        elif how == "flip":
            f.write(raw[:-9] + bytes([raw[-9] ^ 0xFF]) + raw[-8:])
        elif how == "garbage":
            f.write(b"\x00not json{")


@pytest.mark.parametrize("name,how,says", [
    ("model.safetensors", "truncate", "truncated or altered"),
    ("model.safetensors", "empty", "truncated or altered"),
    ("model.safetensors", "flip", "corrupted"),
    ("optimizer.safetensors", "truncate", "truncated or altered"),
    ("optimizer.safetensors", "flip", "corrupted"),
    ("config.json", "garbage", "not a readable JSON file"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, data, capsys, name, how, says):
    from lorafast.cli import main

    out = tmp_path / "run"
    train(TrainConfig(out=str(out), steps=3, data=data, **TINY))
    path = os.path.join(checkpoint.latest(str(out)), name)
    _damage(path, how)
    capsys.readouterr()
    for argv in (["generate", "--checkpoint", str(out), "--reference"],
                 ["train", "--out", str(out), "--resume", "--steps", "5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lorafast: error: ") and "Traceback" not in err, err
        assert path in err and says in err, err
    assert main(["generate", "--checkpoint", str(out), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_first_layout_resumes_and_damaged_optimizer_pt_is_one_line(tmp_path, data, capsys):
    """Run folders of the first layout (model.safetensors, config.json and optimizer.pt side by
    side) resume exactly; a damaged optimizer.pt is reported by name."""
    import shutil

    from lorafast.cli import main
    from lorafast.distributed import World
    from lorafast.train import make_optimizer, model_class

    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=6, data=data, **TINY))
    cfg = TrainConfig(out=str(tmp_path / "new"), steps=3, data=data, **TINY)
    train(cfg)
    ck = checkpoint.latest(cfg.out)
    model = model_class(True).from_config(cfg.model_config())
    opt = make_optimizer(cfg, model)
    rng = torch.Generator().get_state()
    checkpoint.load(ck, model, opt, World(), {"rng/batch": rng})
    old = tmp_path / "old"
    old.mkdir()
    meta = json.load(open(os.path.join(ck, "config.json")))
    del meta["files"], meta["trainer"]
    json.dump(meta, open(old / "config.json", "w"))
    shutil.copy(os.path.join(ck, "model.safetensors"), old / "model.safetensors")
    shutil.copy(os.path.join(cfg.out, "metrics.jsonl"), old / "metrics.jsonl")
    torch.save({"optimizer": opt.state_dict(), "batch_rng": rng}, old / "optimizer.pt")
    shutil.copytree(old, tmp_path / "broken")
    _damage(str(tmp_path / "broken" / "optimizer.pt"), "truncate")
    rest = train(TrainConfig(out=str(old), steps=6, data=data, resume=True, **TINY))
    assert rest["losses"] == whole["losses"][3:]
    assert os.path.islink(old / "config.json") and not os.path.exists(old / "optimizer.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "broken"), "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.pt: damaged" in err, err


def test_the_newest_k_checkpoints_are_kept(tmp_path, data):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), steps=7, checkpoint_every=2, keep_checkpoints=2, data=data, **TINY))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000006", "step-00000007"]
    assert os.readlink(out / "latest") == os.path.join("checkpoints", "step-00000007")
    assert json.load(open(out / "config.json"))["step"] == 7  # OUT reads as the newest model folder


def test_nonfinite_loss_stops_the_run_with_its_step(tmp_path, data, monkeypatch, capsys):
    import lorafast.reference as reference
    from lorafast.cli import main

    real = reference.LoRA.loss_unchecked
    calls = {"n": 0}

    def nan_at_3(self, *a, **k):
        loss = real(self, *a, **k)
        calls["n"] += torch.is_grad_enabled()
        return loss * float("nan") if calls["n"] == 3 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(reference.LoRA, "loss_unchecked", nan_at_3)
    # logged every 5 steps: the check is deferred (no per-step host sync) but names the step
    cfg = {**TINY, "log_every": 5, "checkpoint_every": 2, "steps": 8, "data": data}
    with pytest.raises(NonFiniteLossError, match=r"at step 3;.*last checkpoint, step 2"):
        train(TrainConfig(out=str(tmp_path / "stop"), **cfg))
    assert checkpoint.latest(str(tmp_path / "stop")).endswith("step-00000002")  # nothing saved after step 3
    calls["n"] = 0
    s = train(TrainConfig(out=str(tmp_path / "skip"), skip_nonfinite=True, **cfg))
    assert s["skipped_steps"] == 1 and all(v == v for _, v in s["losses"])
    recs = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert recs[-1]["skipped_steps"] == 1 and recs[-1]["step"] == 8
    calls["n"] = 0
    capsys.readouterr()
    argv = ["train", "--out", str(tmp_path / "cli"), "--reference", "--data", data, "--steps", "8",
            "--batch-size", "4", "--seq-len", "16", "--hidden-dim", "32", "--embedding-dim", "32",
            "--num-layers", "2", "--no-progress", "--sample-tokens", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lorafast: error: non-finite loss (NaN or Inf) at step 3;"), err


def test_files_follow_the_umask(tmp_path, data):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(TrainConfig(out=str(out), steps=2, checkpoint_every=1, keep_checkpoints=2, data=data, **TINY))
    finally:
        os.umask(old)
    seen = 0
    for dirpath, dirs, files in os.walk(out):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            want = 0o750 if os.path.isdir(p) else 0o640
            assert os.stat(p).st_mode & 0o777 == want, (p, oct(os.stat(p).st_mode))
            seen += 1
    assert seen >= 9  # metrics, checkpoints/, 2 step folders of 3 files each


def test_ctrl_c_inside_a_merge_step_resumes_exactly(tmp_path, data, monkeypatch):
    """Interrupted after the redraw of step 20 merged the adapters and re-initialised them (their
    optimizer state cleared) but before the update: the crash checkpoint holds that state, and
    the resumed run matches the uninterrupted one."""
    import lorafast.reference as reference

    cfg = {**TINY, "preset": "merge", "steps": 22, "data": data}  # merges at step 20
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **cfg))
    real = reference.LoRA.loss_unchecked
    calls = {"n": 0}

    def interrupt_21st(self, *a, **k):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 21:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(reference.LoRA, "loss_unchecked", interrupt_21st)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **cfg))
    monkeypatch.setattr(reference.LoRA, "loss_unchecked", real)
    assert json.load(open(tmp_path / "cut" / "config.json"))["step"] == 20
    rest = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg))
    assert rest["losses"] == whole["losses"][20:]
    assert _same_params(tmp_path / "whole", tmp_path / "cut")

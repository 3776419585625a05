"""The preset study (lorafast.study): FLOP accounting, statistics, the equal-time plan, a smoke
run of the command (records, report, plots), and the committed results (README section and a
re-trained figure)."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lorafast import reference, study
from lorafast.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "study")
TINY_FLAGS = ["--steps", "6", "--hidden-dim", "32", "--num-layers", "2", "--batch-size", "4", "--seq-len", "32",
              "--eval-every", "3", "--eval-batches", "1", "--seeds", "0", "--jobs", "0"]


def _counted_flops(model, B, T):
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them (GEMMs only)."""
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc:
        model.loss_unchecked(ids, ids).backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("config", [c for c in study.study_configs(2) if c != study.GPT2])
def test_analytic_flops_match_flop_counter(config):
    # The reference model writes attention as explicit matmuls, so every FLOP of the formula is a
    # GEMM the counter sees; skipped weight gradients (local tensors) must be absent from both.
    local = study.study_configs(2)[config]
    model = reference.LoRA(256, 32, 32, 2, max_seq_len=16, local=local, seed=0)
    B, T = 2, 16
    f = study.train_flops(model, B, T)
    assert f["total"] == f["forward"] + f["backward_input"] + f["backward_weight"]
    assert _counted_flops(model, B, T) == f["total"]
    all_global = study.train_flops(reference.LoRA(256, 32, 32, 2, max_seq_len=16, local="none"), B, T)
    assert (f["weight_grad_skipped"] == 0) == (config == "none")
    if config in ("ffn-alt", "reservoir", "ffn-in-all", "ffn-all"):
        # dense local tensors: exactly their weight-gradient GEMMs are saved
        assert f["weight_grad_skipped"] > 0 and f["total"] == all_global["total"] - f["weight_grad_skipped"]


def test_analytic_flops_of_gpt2():
    pytest.importorskip("transformers")
    from lorafast.gpt2 import gpt2_like

    cfg = TrainConfig(batch_size=2, seq_len=16, hidden_dim=32, embedding_dim=32, num_layers=2)
    model = gpt2_like(cfg.model_config())
    f = study.train_flops(model, 2, 16)
    attention = 12 * 2 * 16 * 2 * 16 * 32  # 12 L T C per token (PaLM), N = 32 tokens
    # GPT-2 runs SDPA, whose CPU kernel the counter may not see: GEMMs alone, or everything
    assert _counted_flops(model, 2, 16) in (f["total"], f["total"] - attention)
    assert f["weight_grad_skipped"] == 0


def test_compare_tie_rule():
    a = {0: 2.00, 1: 2.10, 2: 2.05}  # spread 0.05
    assert study.compare(a, {0: 2.02, 1: 2.12, 2: 2.07})["verdict"] == "tie"  # |delta| 0.02 < 0.05
    c = study.compare(a, {0: 2.20, 1: 2.30, 2: 2.25})
    assert c["verdict"] == "better" and c["delta"] == pytest.approx(-0.2) and c["delta_spread"] == pytest.approx(0)
    assert study.compare({0: 2.3}, {0: 2.2})["verdict"] == "worse"  # one seed: no spread
    assert study.mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_equal_time_plan(tmp_path):
    s = study.Study(out=str(tmp_path), configs=("none", "ffn-alt", "merge"), seeds=(0, 1, 2), steps=100)
    cal = {"wall_ms": {"none": 200.0, "ffn-alt": 180.0, "merge": 400.0}, "cpu_ms": {"none": 100.0, "ffn-alt": 100.0, "merge": 100.0}}
    plan = s.time_plan(cal)
    assert plan["budget_s"] == pytest.approx(100 * 0.2)  # none's step time x steps
    assert plan["steps"] == {"none": 100, "ffn-alt": 111, "merge": 50}
    spec = s.spec("merge", 0, "time", 50, plan)
    assert spec["eval_steps"] == [25, 50] and spec["train"]["steps"] == 50  # 2 evaluations, as in the steps regime
    cpu = study.Study(out=str(tmp_path), configs=("none", "merge"), steps=100, clock="cpu", budget_s=3.0).time_plan(cal)
    assert cpu["steps"] == {"none": 30, "merge": 30}


def test_bad_study_settings():
    with pytest.raises(ValueError, match="unknown study configuration"):
        study.Study(configs=("nope",))
    with pytest.raises(ValueError, match="clock"):
        study.Study(clock="sundial")
    with pytest.raises(ValueError, match="regimes"):
        study.Study(regimes=("fast",))


def test_study_smoke(tmp_path, capsys):
    """CI's smoke study: 2 presets, 1 seed, a few steps; records, report and plots come out, a
    second call resumes past the finished runs, --report-only regenerates the same report."""
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "s")
    assert study.main(["--out", out, "--configs", "none,ffn-alt", *TINY_FLAGS]) == 0
    for regime in study.REGIMES:
        for config in ("none", "ffn-alt"):
            rec = json.load(open(os.path.join(out, study.RECORDS, regime, config, "seed0.json")))
            assert rec["regime"] == regime and rec["config"] == config and rec["seed"] == 0
            assert [p["step"] for p in rec["curve"]][0] == 0 and rec["curve"][-1]["step"] == rec["steps"]
            for key in ("val_bpb", "seconds", "cpu_seconds"):
                assert all(p[key] >= 0 for p in rec["curve"])
            assert rec["curve"][0]["val_bpb"] > 7.0  # about log2(256) = 8 before training
            for key in ("tokens_per_s", "trainable_params", "optimizer_state_bytes", "checkpoint_bytes", "state_bytes"):
                assert rec[key] > 0, key
            assert rec["flops_per_step"]["total"] > 0 and rec["step_ms"]["median"] > 0
    steps = json.load(open(os.path.join(out, study.RECORDS, "steps", "ffn-alt", "seed0.json")))
    base = json.load(open(os.path.join(out, study.RECORDS, "steps", "none", "seed0.json")))
    assert steps["trainable_params"] < base["trainable_params"]
    assert steps["flops_per_step"]["total"] < base["flops_per_step"]["total"]
    for name in study.PLOTS.values():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = open(os.path.join(out, "REPORT.md")).read()
    assert "| `none` |" in text and "| `ffn-alt` |" in text and "**Default preset.**" in text
    capsys.readouterr()
    assert study.main(["--out", out, "--configs", "none,ffn-alt", *TINY_FLAGS]) == 0
    log = capsys.readouterr().out
    assert "study: 0 runs" in log and "timing" not in log  # resumed: nothing left to run, calibration kept
    cal = json.load(open(os.path.join(out, study.CALIBRATION)))
    assert set(cal["wall_ms"]) == set(cal["cpu_ms"]) == {"none", "ffn-alt"} and min(cal["cpu_ms"].values()) > 0
    os.remove(os.path.join(out, "REPORT.md"))
    assert study.main(["--out", out, "--report-only"]) == 0
    assert open(os.path.join(out, "REPORT.md")).read() == text


def test_report_only_without_records(tmp_path, capsys):
    assert study.main(["--out", str(tmp_path), "--report-only"]) == 2
    assert "no study records" in capsys.readouterr().err


needs_results = pytest.mark.skipif(not os.path.isdir(os.path.join(RESULTS, study.RECORDS)), reason="no committed study records")


@needs_results
def test_readme_section_is_generated_from_the_records():
    # Style rule 19: the README's table, verdicts and default come from the JSON records, untouched.
    summary = study.summary_of(RESULTS)
    assert study.readme_section(os.path.join(ROOT, "README.md")) == study.render_report(summary, "study")


@needs_results
def test_default_preset_follows_from_the_records():
    # Issue 12: the default is the local preset the committed study supports, not a guess.
    from lorafast.local import DEFAULT_PRESET

    assert DEFAULT_PRESET != "none"
    assert study.propose_default(study.summary_of(RESULTS))["preset"] == DEFAULT_PRESET


@needs_results
def test_committed_record_is_reproducible(monkeypatch):
    """Re-train the first evaluation interval of ffn-alt, seed 0, from its record's own spec:
    the validation figure agrees (bit-identical on one machine; 2e-3 bits/byte allows for other
    CPUs' kernels over the steps)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # "auto" = the PyTorch paths, as when recorded
    rec = json.load(open(os.path.join(RESULTS, study.RECORDS, "steps", "ffn-alt", "seed0.json")))
    spec = {**rec["spec"], "train": {**rec["spec"]["train"], "device": "cpu"}}
    first = rec["curve"][1]
    again = study.run_one(spec, stop_after=first["step"])
    assert again["curve"][0]["val_bpb"] == pytest.approx(rec["curve"][0]["val_bpb"], abs=1e-5)
    assert again["curve"][1]["step"] == first["step"]
    assert again["curve"][1]["val_bpb"] == pytest.approx(first["val_bpb"], abs=2e-3)

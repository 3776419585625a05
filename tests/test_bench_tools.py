"""The benchmark tooling (no timing claims here: speed belongs in benchmarks): the noise flag, the
case lists the pytest-benchmark suite reads from the suites, the skip reasons of the model
suite, ``--threads``, and the plots of the committed records."""
import glob
import os

import pytest
import torch

from lorafast.bench import attention, common, linear_ce, model, rerandomize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def test_spread_flags_noisy_above_threshold():
    assert common.spread(2.0, 3.0) == {"p80/p20": 1.5, "noisy": False}
    assert common.spread(2.0, 3.02)["noisy"] is True
    assert common.spread(0.0, 1.0)["noisy"] is True


def test_quantile_nearest_rank():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert (common.quantile(xs, 0.2), common.quantile(xs, 0.5), common.quantile(xs, 0.8)) == (3.0, 6.0, 9.0)


def test_time_fn_reports_spread():
    calls = []
    t = common.time_fn(lambda: calls.append(1), "cpu", rep=5, min_time_s=0.0)
    assert len(calls) == 1 + 5  # one warm-up call
    assert t["ms_p20"] <= t["ms"] <= t["ms_p80"]
    assert t["p80/p20"] == pytest.approx(t["ms_p80"] / t["ms_p20"]) and t["noisy"] == (t["p80/p20"] > 1.5)


def test_report_names_noisy_cases(capsys):
    text = common.report([{"provider": "a", "ms": 1.0, **common.spread(1.0, 1.2)},
                          {"provider": "b", "ms": 1.0, **common.spread(1.0, 2.0)}], "t")
    assert "NOISY: 1 of 2 timed cases" in text and "2.00" in text
    assert "NOISY" not in common.report([{"provider": "a", **common.spread(1.0, 1.2)}])
    capsys.readouterr()


def test_busy_note_when_load_exceeds_cores():
    cores = os.cpu_count() or 1
    assert common.busy_note({"load_1m": cores + 0.5}).startswith("BUSY: load average")
    assert common.busy_note({"load_1m": float(cores)}) == "" and common.busy_note({"load_1m": None}) == ""


def test_env_record_has_threads():
    env = common.env_record("cpu")
    assert env["threads"] == torch.get_num_threads() and "load_1m" in env


def test_threads_flag_applies_at_parse(monkeypatch):
    before = torch.get_num_threads()
    try:
        args = common.suite_parser("x", "doc", "full").parse_args(["--threads", "1"])
        assert args.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        common.suite_parser("x", "doc", "full").parse_args(["--threads", "0"])


@pytest.mark.parametrize("suite", [attention, linear_ce, rerandomize, model])
def test_timed_cases_are_the_suites_own(suite, monkeypatch):
    """The dry run records setup's arguments without building or timing anything."""
    def boom(*a, **k):
        raise AssertionError("a dry run must not time or measure")

    monkeypatch.setattr(common, "_resolve", boom)
    cases = common.timed_cases(suite, "cpu", quick=True)
    assert cases and all(c["device"] == "cpu" and "provider" in c for c in cases)
    assert len({tuple(sorted(c.items(), key=str)) for c in cases}) == len(cases)  # no duplicates
    if suite is attention:
        assert {(c["provider"], c["mode"]) for c in cases} == {
            (p, m) for p in attention._providers("cpu", True) for m in ("fwd", "bwd", "fwd_bwd")}
    if suite is model:
        assert [c["provider"] for c in cases] == list(model.PROVIDERS)


def test_model_skip_reasons(monkeypatch):
    with pytest.raises(ValueError, match="unknown provider"):
        model.unavailable("nope")
    import lorafast.gpt2

    monkeypatch.setattr(lorafast.gpt2, "transformers_available", lambda: False)
    assert model.unavailable("hf-gpt2", "cpu", quick=False) == lorafast.gpt2.INSTALL_HINT
    with pytest.raises(common.Unavailable, match="transformers is not installed"):
        model.setup("hf-gpt2", V=16, E=16, H=16, L=1, B=1, T=4)
    assert model.unavailable("eager", "cpu") is None and model.unavailable("lorafast", "cpu") is None
    assert model.unavailable("compile", "cuda", quick=True) is None


def test_compile_without_cxx_says_so(monkeypatch):
    monkeypatch.setattr(common, "_cxx_found", lambda: False)
    monkeypatch.setenv("CXX", "no-such-c++")
    why = common.compile_unavailable("cpu")
    assert why and "C++ compiler" in why and "no-such-c++" in why
    assert model.unavailable("compile-sdpa", "cpu", quick=False) == why
    assert common.compile_unavailable("cuda") is None


def test_plot_of_committed_records_is_deterministic(tmp_path):
    pytest.importorskip("matplotlib")
    from lorafast.bench.plot import load_records, plot_records

    src = sorted(glob.glob(os.path.join(RESULTS, "*.jsonl")))[0]
    records = [r for r in load_records(src) if r.get("suite") in ("model", "rerandomize")]  # 3 panels: quick
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    plot_records(records, str(a))
    plot_records(records, str(b))
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="no benchmark record"):
        plot_records([{"suite": "compile", "name": "k"}], str(tmp_path / "c.png"))


def test_results_readme_embeds_a_plot_of_every_record():
    readme = open(os.path.join(RESULTS, "README.md")).read()
    for src in glob.glob(os.path.join(RESULTS, "*.jsonl")):
        png = os.path.splitext(os.path.basename(src))[0] + ".png"
        assert os.path.exists(os.path.join(RESULTS, png)), f"{png} missing: python -m lorafast.bench.plot {src}"
        assert f"]({png})" in readme, f"bench/results/README.md does not embed {png}"


def test_timed_cases_dry_run_also_covers_names_imported_by_the_suite():
    import types

    def boom(*a, **k):
        raise AssertionError("a dry run must not time or measure")

    suite = types.ModuleType("fake_suite")
    suite.time_fn, suite.peak_memory = boom, boom  # as after `from lorafast.bench.common import time_fn`
    suite.setup = boom

    def run(device="cpu", quick=True):
        out = []
        for p in ("a", "b"):
            fn = suite.setup(provider=p, device=device, n=1 if quick else 2)
            out.append({**suite.time_fn(fn, device), "mb": suite.peak_memory("x:setup", {}, device),
                        "also": common.time_fn(fn, device)["ms"]})
        return out

    suite.run = run
    assert common.timed_cases(suite, "cpu", quick=False) == [dict(provider="a", device="cpu", n=2),
                                                            dict(provider="b", device="cpu", n=2)]
    assert suite.setup is boom and suite.time_fn is boom  # restored

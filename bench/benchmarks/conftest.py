"""The pytest-benchmark suite of lorafast: one benchmark per kernel, provider and case, and one per
training step, built on the suites' own ``setup`` factories and case lists
(:func:`lorafast.bench.common.timed_cases`), so it times exactly what ``lorafast bench`` times.

    python -m pytest bench --benchmark-only                     # small cases, default device
    python -m pytest bench --benchmark-only --benchmark-autosave            # save a baseline (.benchmarks/)
    python -m pytest bench --benchmark-only --benchmark-compare=0001 \\
        --benchmark-compare-fail=median:10%                     # compare with it; fail on a regression

Not collected by ``python -m pytest`` (pyproject's testpaths is ``tests``); CI does not run it.
Options are environment variables (a conftest below the command-line arguments cannot add
pytest flags): ``LORAFAST_BENCH_DEVICE`` (cpu or cuda; default cuda when available),
``LORAFAST_BENCH_FULL=1`` (the sizes of ``lorafast bench --full``), ``LORAFAST_BENCH_THREADS=N``
(``torch.set_num_threads(N)``; the count used is printed after collection and in the summary,
and saved with the machine info).

Names: ``test_bench[<suite>-<provider>-<key>=<value>-...]``, keys sorted, so two saved runs line
up case by case in ``--benchmark-compare``; ``benchmark.group`` is the suite and the case without
the provider, so each table holds the providers of one case (``--benchmark-group-by=fullname``
puts each benchmark alone beside its saved baseline).

Timing: ``benchmark.pedantic`` with one call per round. On CUDA the timed call ends with
``torch.cuda.synchronize()`` (pytest-benchmark's timer is wall-clock), and the untimed setup of
each round synchronizes and clears the gradients, so a round is one complete call on an idle
device. The sync adds microseconds per call: a few percent for the smallest GPU cases here
(attention forward at T = 1024, about 0.1-0.2 ms), negligible for the millisecond ones, and too
much for microsecond kernels, which would need several calls per sync. Unlike
``lorafast bench`` (``triton.testing.do_bench``), the L2 cache is not flushed between calls, so
the figures are for comparing commits, not for quoting. Rounds: ``--benchmark-max-time`` (default
1 s) over the time of one call, at least ``--benchmark-min-rounds`` (5). Each benchmark's
``extra_info`` holds the case, the thread count and its spread (p20, p80, p80/p20); a case
whose p80/p20 exceeds 1.5 is flagged noisy, and the terminal summary lists the noisy cases.
"""
from __future__ import annotations

import math
import os
import time

import pytest

from lorafast.bench import common
from lorafast.provenance import loadavg


def bench_device() -> str:
    import torch

    dev = os.environ.get("LORAFAST_BENCH_DEVICE", "auto")
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (dev == "cpu" or dev.startswith("cuda")):
        raise pytest.UsageError(f"LORAFAST_BENCH_DEVICE must be cpu, cuda or auto, got {dev!r}")
    return dev


def bench_quick() -> bool:
    return os.environ.get("LORAFAST_BENCH_FULL", "0") in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    n = os.environ.get("LORAFAST_BENCH_THREADS")
    if n:
        try:
            common.set_threads(int(n))
        except ValueError as e:
            raise pytest.UsageError(f"LORAFAST_BENCH_THREADS: {e}") from None


def _env_line() -> str:
    env = common.env_record(bench_device())
    line = (f"lorafast bench: device={env['device']} threads={env['threads']} load_1m={env['load_1m']} "
            f"commit={env['commit']} cases={'small' if bench_quick() else 'full'}")
    return line + ("\n" + common.busy_note(env) if common.busy_note(env) else "")


# (benchmark name, p80/p20) of every timed case of this session, for the summary
_SPREADS: list[tuple[str, float]] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    # a conftest below the rootdir cannot add to the report header: print the line here instead
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_env_line())


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _SPREADS:
        return
    terminalreporter.write_sep("-", "lorafast bench: spread")
    terminalreporter.write_line(_env_line())
    noisy = [(n, r) for n, r in _SPREADS if r > common.NOISY_SPREAD]
    if not noisy:
        terminalreporter.write_line(f"every timed case has p80/p20 <= {common.NOISY_SPREAD}")
        return
    import torch

    hint = "LORAFAST_BENCH_THREADS=1 or an idle machine" if torch.get_num_threads() > 1 else "an idle machine"
    terminalreporter.write_line(f"NOISY: {len(noisy)} of {len(_SPREADS)} timed cases have p80/p20 > "
                                f"{common.NOISY_SPREAD}; rerun them with {hint} before trusting them:", yellow=True)
    for name, ratio in noisy:
        terminalreporter.write_line(f"  {ratio:6.2f}  {name}")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """What must match for two saved runs to be comparable (pytest-benchmark warns when it does
    not): device, versions, thread count. The commit is in ``commit_info``; the load average goes
    to each benchmark's ``extra_info``."""
    env = common.env_record(bench_device())
    machine_info["lorafast"] = {k: env[k] for k in ("device", "torch", "triton", "cuda", "threads")}


def _keys(case: dict) -> str:
    """``key=value-...`` of a case, keys sorted, without provider and device."""
    return "-".join(f"{k}={v}" for k, v in sorted(case.items()) if k not in ("provider", "device", "warm"))


def case_id(case: dict) -> str:
    """``provider-key=value-...``: stable names, whatever order the suite builds its cases in."""
    return f"{case.get('provider')}-{_keys(case)}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize (``suite``, ``case``) over every suite of ``lorafast bench`` (discovered from
    ``lorafast.bench.cli.SUITES``, so a new suite is benchmarked here without a new file) and its
    timed cases; a suite that cannot be imported here gives one skipped benchmark saying why."""
    if not {"suite", "case"} <= set(metafunc.fixturenames):
        return
    import importlib

    from lorafast.bench.cli import SUITES

    params = []
    for name, modname in SUITES.items():
        try:
            module = importlib.import_module(modname)
        except ImportError as e:
            params.append(pytest.param(None, {}, id=name, marks=pytest.mark.skip(reason=f"{modname}: {e}")))
            continue
        params += [pytest.param(module, c, id=f"{name}-{case_id(c)}")
                   for c in common.timed_cases(module, bench_device(), bench_quick())]
    metafunc.parametrize(("suite", "case"), params)


def _skip_reason(module, case: dict, device: str) -> str | None:
    unavailable = getattr(module, "unavailable", None)
    if unavailable is not None:
        return unavailable(case["provider"], device, bench_quick())
    if str(case.get("provider", "")).startswith("compile"):
        return common.compile_unavailable(device)
    return None


@pytest.fixture
def measure(benchmark, request):
    """``measure(module, case)``: build the case with ``module.setup(**case)`` and time it."""
    device = bench_device()

    def run(module, case: dict) -> None:
        import torch

        from lorafast.bench.cli import SUITES

        why = _skip_reason(module, case, device)
        if why:
            pytest.skip(why)
        provider = str(case["provider"])
        try:
            fn = module.setup(**case)
        except (common.Unavailable, ImportError) as e:
            pytest.skip(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except RuntimeError as e:
            if provider.startswith("sdpa_"):  # this pinned SDPA backend does not take this case here
                pytest.skip(f"{provider}: " + (str(e).splitlines()[0][:120] if str(e) else type(e).__name__))
            raise
        cuda = device.startswith("cuda")
        params = list(getattr(fn, "params", None) or [])

        def round_setup() -> None:
            for t in params:
                t.grad = None
            if cuda:
                torch.cuda.synchronize()

        def call() -> None:
            fn()
            if cuda:
                torch.cuda.synchronize()

        round_setup()
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-6)
        max_time = float(request.config.getoption("benchmark_max_time"))
        min_rounds = int(request.config.getoption("benchmark_min_rounds"))
        rounds = max(min_rounds, min(10_000, math.ceil(max_time / one)))
        suite = next((k for k, v in SUITES.items() if v == module.__name__), module.__name__)
        benchmark.group = f"{suite}: {_keys(case)}"
        benchmark.extra_info.update(case, threads=torch.get_num_threads(),
                                    load_1m=None if (load := loadavg()) is None else round(load, 2))
        benchmark.pedantic(call, setup=round_setup, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: one call, no statistics
            return
        data = sorted(benchmark.stats.stats.data)
        p20, p80 = common.quantile(data, 0.2) * 1e3, common.quantile(data, 0.8) * 1e3
        s = common.spread(p20, p80)
        benchmark.extra_info.update(ms_p20=p20, ms_p80=p80, **s)
        _SPREADS.append((request.node.name, s["p80/p20"]))

    return run

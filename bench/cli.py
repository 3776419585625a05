"""``lorafast bench``: speed and memory of each fused op against its baselines, and the static
compile report (registers, spills, shared memory, and SASS counts of HGMMA, MUFU.EX2,
MEMBAR, atomics, BAR.SYNC, cp.async and TMA loads per kernel and per loop iteration).

    lorafast bench                    # every suite at small sizes on the default device
    lorafast bench attention --full   # one suite at the issue's sizes
    lorafast bench compile            # the AOT compile report for sm_90 / sm_80 (no GPU needed)
    lorafast bench --threads 1 --plot bench.png   # one intra-op thread; draw the results

Each record carries device, versions, git commit, UTC time, thread count and load average;
``--save FILE`` appends them as JSON lines (``bench/results/`` holds the committed ones).
``--plot FILE.png`` draws this run's records (:mod:`lorafast.bench.plot`, needs the ``[plot]``
extra). Every timed case reports its spread p80/p20; above 1.5 it is marked NOISY.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SUITES = {
    "attention": "lorafast.bench.attention",
    "linear-ce": "lorafast.bench.linear_ce",
    "rerandomize": "lorafast.bench.rerandomize",
    "model": "lorafast.bench.model",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="*", default=[],
                   help=f"suites to run, from {[*SUITES, 'compile', 'all']} (default: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--full", action="store_true", help="the issue's sizes instead of small ones (GPU)")
    p.add_argument("--save", default=None, help="append the records as JSON lines to this file")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw this run's records: per suite, time or throughput against size, one line per provider")
    from lorafast.bench.common import (THREADS_HELP, busy_note, env_line, env_record, report, save,
                                       threads_action)

    p.add_argument("--threads", type=int, default=None, action=threads_action(), metavar="N", help=THREADS_HELP)
    args = p.parse_args(argv)
    unknown = [s for s in args.suite if s not in (*SUITES, "compile", "all")]
    if unknown:
        p.error(f"unknown suite {unknown[0]!r}; choose from {[*SUITES, 'compile', 'all']}")
    if args.plot:
        from lorafast.bench.plot import INSTALL_HINT

        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the runs
            p.error(f"--plot: {INSTALL_HINT}")

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    suites = list(args.suite) or ["all"]
    if "all" in suites:
        suites = [*SUITES, "compile"]
    env = env_record(device)
    print(env_line(env), flush=True)
    if busy_note(env):
        print(busy_note(env), flush=True)
    plotted: list[dict] = []
    status = 0
    for name in suites:
        if name == "compile":
            from lorafast.compile_gate import exit_status, format_reports, report_record, run_gate

            reports = run_gate()
            print("## compile report (AOT, no GPU needed): SASS counts total/per loop iteration")
            print(format_reports(reports), flush=True)
            status = max(status, exit_status(reports))
            if args.save:
                save([{"suite": "compile", **report_record(r)} for r in reports], args.save, env)
            continue
        try:
            mod = importlib.import_module(SUITES[name])
        except ModuleNotFoundError as e:
            print(f"## {name}: not available ({e})", file=sys.stderr)
            status = 1
            continue
        records = mod.run(device=device, quick=not args.full)
        report(records, f"{name} (threads={env['threads']}, load {env['load_1m']})")
        records = [{"suite": name, **r} for r in records]
        plotted += [{**env, **r} for r in records]
        if args.save:
            save(records, args.save, env)
    if args.plot and plotted:
        from lorafast.bench.plot import plot_records

        try:
            print(f"plot: {plot_records(plotted, args.plot)}", flush=True)
        except ValueError as e:  # e.g. only the compile report ran: nothing to draw
            print(f"plot: not written: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())

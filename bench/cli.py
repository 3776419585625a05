"""``lorafast bench``: speed and memory of each fused op against its baselines, and the static
compile report (registers, spills, shared memory, and SASS counts of HGMMA, MUFU.EX2,
MEMBAR, atomics, BAR.SYNC, cp.async and TMA loads per kernel and per loop iteration).

    lorafast bench                    # every suite at small sizes on the default device
    lorafast bench attention --full   # one suite at the issue's sizes
    lorafast bench compile            # the AOT compile report for sm_90 / sm_80 (no GPU needed)

Each record carries device, versions, git commit and UTC time; ``--save FILE`` appends them as
JSON lines (``bench/results/`` holds the committed ones).
"""
from __future__ import annotations

import argparse
import importlib
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
    args = p.parse_args(argv)
    unknown = [s for s in args.suite if s not in (*SUITES, "compile", "all")]
    if unknown:
        p.error(f"unknown suite {unknown[0]!r}; choose from {[*SUITES, 'compile', 'all']}")

    import torch

    from lorafast.bench.common import env_record, report, save

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    suites = list(args.suite) or ["all"]
    if "all" in suites:
        suites = [*SUITES, "compile"]
    env = env_record(device)
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
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
        report(records, name)
        if args.save:
            save([{"suite": name, **r} for r in records], args.save, env)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

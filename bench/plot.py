"""Plots of benchmark records: per suite, time or throughput against size, one line per provider.

    lorafast bench attention --plot attention.png          # run, then plot this run's records
    python -m lorafast.bench.plot bench/results/*.jsonl     # regenerate bench/results/*.png from the records

The size axis is the op's problem size (attention: sequence length T; linear cross-entropy: N·V
logit elements; re-randomisation: elements drawn; training step: tokens per step); lines are
providers. Per (op, mode, metric), each variant (cases that differ in something other than the
size: heads and head dim, causal, law, dtype, ...) measured at two sizes or more gets its own
panel, and the variants measured at one size share a panel of grouped bars. Each suite starts a
row, at most four panels wide. An axis is logarithmic when its values span a decade or more. Timed values carry
their spread (20th to 80th percentile of the run time) as error bars; providers that were
skipped or failed are named under the panel. When a file holds several runs, the latest record
of each case is drawn.

Needs matplotlib (``pip install -e ".[plot]"``); :func:`plot_records` raises ImportError with that
command when it is missing. The drawing uses matplotlib's object API and the Agg canvas (no
pyplot, no global state); PNGs are written without a timestamp, so the same records give the
same file.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable

INSTALL_HINT = 'matplotlib is not installed: pip install -e ".[plot]"'

# op -> how to plot it: the size (label, function of a record), the metrics drawn (record key,
# axis label), the keys that split panels, and the keys that tell cases of one panel apart.
OPS: dict[str, dict[str, Any]] = {
    "attention": dict(suite="attention", size=("sequence length T", "T", lambda r: r.get("T")),
                      metrics=[("TFLOP/s", "TFLOP/s")], panel=("mode",), variant=("H", "D", "causal", "dtype")),
    "linear_cross_entropy": dict(suite="linear-ce", size=("N·V (logit elements)", "N·V",
                                                          lambda r: r["N"] * r["V"] if "N" in r else None),
                                 metrics=[("ms", "ms per fwd+bwd"), ("peak_mb", "peak memory (MB)")],
                                 panel=("mode",), variant=("D", "dtype")),
    "linear_softmax": dict(suite="linear-ce", size=("N·V (logit elements)", "N·V",
                                                    lambda r: r["N"] * r["V"] if "N" in r else None),
                           metrics=[("ms", "ms per call"), ("peak_mb", "peak memory (MB)")],
                           panel=("mode",), variant=("D", "dtype")),
    "rerandomize_": dict(suite="rerandomize", size=("elements drawn", "elements", lambda r: r.get("numel")),
                         metrics=[("GB/s", "GB/s")], panel=("mode",), variant=("case", "law", "dtype")),
    "train-step": dict(suite="model", size=("tokens per step (B·T)", "B·T",
                                            lambda r: r["B"] * r["T"] if "B" in r else None),
                       metrics=[("tokens_per_s", "tokens/s"), ("peak_mb", "peak memory (MB)")],
                       panel=(), variant=("V", "H", "L", "dtype")),
}
_ORDER = list(OPS)
# the project's own provider keeps one colour everywhere
_FIXED_COLOURS = {"lorafast": "tab:red", "fused": "tab:red"}
_PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
            "tab:olive", "tab:cyan"]
MAX_COLUMNS = 4
_ENV_KEYS = ("device", "torch", "triton", "cuda", "python", "commit", "time", "threads", "load_1m")


def load_records(path: str) -> list[dict[str, Any]]:
    """The records of a jsonl file (one JSON object a line; blank lines skipped). Raises
    FileNotFoundError, or ValueError naming the line that is not JSON."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    return out


def _latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each case (same keys other than the measured values and environment)."""
    measured = {"ms", "ms_p20", "ms_p80", "p80/p20", "noisy", "TFLOP/s", "GB/s", "tokens_per_s", "peak_mb",
                "error", "skipped"}
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k not in measured and k not in _ENV_KEYS
                          and not k.startswith(("speedup_", "mem_vs_", "vs_", "frac_"))}, sort_keys=True)
        last[key] = r
    return list(last.values())


def _colour(provider: str, colours: dict[str, str]) -> str:
    if provider in _FIXED_COLOURS:
        return _FIXED_COLOURS[provider]
    if provider not in colours:
        colours[provider] = _PALETTE[len(colours) % len(_PALETTE)]
    return colours[provider]


def _spans_decade(values: list[float]) -> bool:
    pos = [v for v in values if v and v > 0]
    return bool(pos) and max(pos) / min(pos) >= 10


def _yerr(r: dict[str, Any], metric: str, y: float) -> tuple[float, float]:
    """(below, above) of the 20-80 % spread of ``metric``; a throughput is inversely
    proportional to the time, so its spread comes from the time quantiles the other way round."""
    ms, p20, p80 = r.get("ms"), r.get("ms_p20"), r.get("ms_p80")
    if not (ms and p20 and p80) or metric == "peak_mb":
        return 0.0, 0.0
    if metric == "ms":
        return max(0.0, ms - p20), max(0.0, p80 - ms)
    return max(0.0, y - y * ms / p80), max(0.0, y * ms / p20 - y)


def _fmt_size(v: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:g}"


def _variant_label(r: dict[str, Any], keys: tuple[str, ...], varying: set[str]) -> str:
    parts = []
    for k in keys:
        v = r.get(k)
        if k in varying and v is not None:
            parts.append(f"{k}={v}" if not isinstance(v, str) else v)
    return ", ".join(parts)


def _panels(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The panels, in a fixed order: per (op, panel keys, metric), one line panel per variant
    measured at two sizes or more, and one bar panel for the variants measured at one size."""
    out = []
    ops = sorted({r["op"] for r in records if r.get("op") in OPS}, key=_ORDER.index)
    for op in ops:
        spec = OPS[op]
        size_of = spec["size"][2]
        rs = [r for r in records if r.get("op") == op]
        splits = list(dict.fromkeys(tuple(r.get(k) for k in spec["panel"]) for r in rs))  # run order
        for metric, ylabel in spec["metrics"]:
            for split in splits:
                sub = [r for r in rs if tuple(r.get(k) for k in spec["panel"]) == split]
                good = [r for r in sub if isinstance(r.get(metric), (int, float)) and size_of(r) is not None]
                if not good:
                    continue
                failed = sorted({r["provider"] for r in sub if "skipped" in r or "error" in r}
                                - {r["provider"] for r in good})
                varying = {k for k in spec["variant"] if len({str(r.get(k)) for r in good}) > 1}
                by_variant: dict[str, list[dict[str, Any]]] = {}
                for r in good:
                    by_variant.setdefault(_variant_label(r, spec["variant"], varying), []).append(r)
                title = " ".join([op] + [str(x) for x in split if x is not None])
                base = dict(op=op, suite=spec["suite"], metric=metric, ylabel=ylabel, spec=spec, failed=failed)
                single = []
                for var, vrs in by_variant.items():
                    if len({size_of(r) for r in vrs}) > 1:
                        out.append(dict(base, kind="lines", records=vrs,
                                        title=title + (f"\n{var}" if var else "")))
                    else:
                        single += vrs
                if single:
                    out.append(dict(base, kind="bars", records=single, title=title, varying=varying))
    return out


def _draw_panel(ax, panel: dict[str, Any], colours: dict[str, str]) -> None:
    spec, metric, good = panel["spec"], panel["metric"], panel["records"]
    xlabel, short, size_of = spec["size"]
    providers = list(dict.fromkeys(r["provider"] for r in good))
    if panel["kind"] == "lines":
        for prov in providers:
            rs = sorted((r for r in good if r["provider"] == prov), key=size_of)
            err = [list(e) for e in zip(*[_yerr(r, metric, r[metric]) for r in rs])]
            ax.errorbar([size_of(r) for r in rs], [r[metric] for r in rs], yerr=err if any(map(any, err)) else None,
                        color=_colour(prov, colours), marker="o", markersize=4, capsize=2, label=prov)
        ax.set_xlabel(xlabel)
        if _spans_decade([size_of(r) for r in good]):
            ax.set_xscale("log")
    else:
        # one size per case: grouped bars, one group per case, one bar per provider
        def group(r: dict[str, Any]) -> tuple[Any, str]:
            return size_of(r), _variant_label(r, spec["variant"], panel["varying"])

        groups = sorted({group(r) for r in good}, key=lambda g: (g[1], g[0]))
        width = 0.8 / len(providers)
        for pi, prov in enumerate(providers):
            mine = {group(r): r for r in good if r["provider"] == prov}
            at = [(gi, mine[g]) for gi, g in enumerate(groups) if g in mine]
            err = [list(e) for e in zip(*[_yerr(r, metric, r[metric]) for _, r in at])]
            ax.bar([gi - 0.4 + width * (pi + 0.5) for gi, _ in at], [r[metric] for _, r in at], width=width,
                   yerr=err if any(map(any, err)) else None, capsize=2, color=_colour(prov, colours), label=prov)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{short} = {_fmt_size(s)}" + (f"\n{v}" if v else "") for s, v in groups], fontsize=7)
    if _spans_decade([r[metric] for r in good]):
        ax.set_yscale("log")
    ax.set_ylabel(panel["ylabel"])
    ax.set_title(panel["title"], fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    if panel["failed"]:
        ax.annotate("not run: " + ", ".join(panel["failed"]), xy=(0.0, -0.02), xycoords="axes fraction",
                    fontsize=6, va="top", ha="left", xytext=(0, -28), textcoords="offset points", color="dimgray")


def _caption(records: list[dict[str, Any]]) -> str:
    env = next((r for r in records if "device" in r), {})
    parts = [env.get("device"), f"torch {env['torch']}" if env.get("torch") else None,
             f"CUDA {env['cuda']}" if env.get("cuda") else None,
             f"commit {env['commit']}" if env.get("commit") else None,
             (env.get("time") or "")[:10] or None,
             f"threads={env['threads']}" if env.get("threads") else None]
    return ", ".join(p for p in parts if p)


def plot_records(records: list[dict[str, Any]], path: str, title: str | None = None) -> str:
    """Draw the benchmark ``records`` (as ``lorafast bench --save`` writes them) into the PNG
    ``path``; returns ``path``. Records without a known ``op`` (the compile report) are ignored.

    Raises ImportError (with the install command) without matplotlib, ValueError when no record
    holds a value to plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    records = _latest(records)
    panels = _panels(records)
    if not panels:
        raise ValueError("no benchmark record with a time, throughput or memory value to plot")
    # one block of rows per suite, at most MAX_COLUMNS panels a row
    suites = list(dict.fromkeys(p["suite"] for p in panels))
    per_suite = [[p for p in panels if p["suite"] == s] for s in suites]
    cols = min(MAX_COLUMNS, max(len(ps) for ps in per_suite))
    grid = [ps[i:i + cols] for ps in per_suite for i in range(0, len(ps), cols)]
    fig = Figure(figsize=(4.3 * cols, 3.6 * len(grid)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(grid), cols, squeeze=False)
    colours: dict[str, str] = {}
    for ri, row in enumerate(grid):
        for ci in range(cols):
            if ci < len(row):
                _draw_panel(axes[ri][ci], row[ci], colours)
            else:
                axes[ri][ci].set_axis_off()
    fig.suptitle(title if title is not None else _caption(records), fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorafast.bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("records", nargs="+", help="jsonl files written by lorafast bench --save")
    p.add_argument("-o", "--out", default=None,
                   help="output PNG (only with one input; default: the input's path with .png)")
    args = p.parse_args(argv)
    if args.out and len(args.records) > 1:
        p.error("--out takes one input file")
    for src in args.records:
        out = args.out or os.path.splitext(src)[0] + ".png"
        print(plot_records(load_records(src), out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's deterministic figures against the commands named beside them (issue 13.12):
every loss quoted in "Default run" for a short run is re-computed here by the same training
loop, with the same defaults, for the accelerated and the reference model."""
import os
import re

import pytest

from lorafast.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 decimals are quoted; other CPUs' kernels move the last one after a few hundred steps.
TOL = 2e-3


def default_run_rows() -> dict[str, list[str]]:
    """The "Default run" table of the README: {row label: [accelerated cell, reference cell]}."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Default run\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and not set(cells[0]) <= {"-", ""}:
            rows[cells[0]] = cells[1:]
    return rows


def quoted_losses(cell: str) -> tuple[float, float] | None:
    m = re.fullmatch(r"(\d+\.\d{3}) → (\d+\.\d{3})", cell)
    return (float(m.group(1)), float(m.group(2))) if m else None


def short_runs() -> list[tuple[str, int, bool, tuple[float, float]]]:
    """(row, steps, reference, (first, last) validation loss) for every short-run row."""
    out = []
    for label, cells in default_run_rows().items():
        m = re.fullmatch(r"validation loss, step 0 → (\d+) \(`lorafast train --steps (\d+)`.*\)", label)
        if m and m.group(1) == m.group(2):
            for reference, cell in zip((False, True), cells):
                quoted = quoted_losses(cell)
                if quoted is not None:
                    out.append((label, int(m.group(1)), reference, quoted))
    return out


def test_the_readme_quotes_a_short_run_of_both_models():
    runs = short_runs()
    assert {r[2] for r in runs} == {False, True}, "README: no short-run validation losses to check"
    assert all(steps <= 200 for _, steps, _, _ in runs)  # short enough for CI
    full = next(cells for label, cells in default_run_rows().items() if label.startswith("validation loss, step 0 → 1000"))
    # every run starts from the same initial loss: same model, same validation batches
    assert quoted_losses(full[0])[0] == runs[0][3][0]


@pytest.mark.parametrize("label,steps,reference,quoted", short_runs(),
                         ids=lambda x: None if not isinstance(x, bool) else ("reference" if x else "accelerated"))
def test_quoted_short_run_losses(tmp_path, monkeypatch, label, steps, reference, quoted):
    # As on a user's CPU machine: "auto" runs the PyTorch paths (the suite's interpreter would run
    # the Triton kernels instead, a hundred times slower and not what the README measured).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s = train(TrainConfig(steps=steps, reference=reference, out=str(tmp_path / "run"), sample_tokens=0,
                          progress=False))
    first, last = s["val_losses"][0], s["val_losses"][-1]
    assert first[0] == 0 and last[0] == steps
    assert (first[1], last[1]) == pytest.approx(quoted, abs=TOL), label

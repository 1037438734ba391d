"""``make demo``, the README's first command, as a user runs it from a fresh clone.

The Makefile's own recipe runs (``make -o venv demo``: the environment this suite runs in stands
in for the one ``make venv`` builds), with its data and run folders in a temporary folder
(``DEMO_CACHE``, ``DEMO_RUN``), so the test checks the recipe itself, not a copy of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import tables

REPO = Path(__file__).resolve().parents[1]


def _make_demo(run: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            "venv",
            "demo",
            f"BIN={Path(sys.executable).parent}",
            f"DEMO_RUN={run}",
            f"DEMO_CACHE={cache}",
        ],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # generates data and trains the tiny ListOps model: ~30 s on 2 cores
def test_make_demo_generates_trains_and_reports_and_a_rerun_trains_no_more(tmp_path):
    """The demo generates tiny ListOps into DEMO_CACHE, trains it for its 200 steps into
    DEMO_RUN and prints the report with the run's row and its curves; run again, it trains no
    more and reports the same numbers. Nothing is written into the repository's cache/ or runs/."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    before = {name: (REPO / name).exists() for name in ("cache", "runs")}
    done = _make_demo(run, cache)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 200 and 0.0 <= results["test"] <= 100.0
    row = next(line for line in done.stdout.splitlines() if line.startswith("| ListOps |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2:] == [
        tables._fmt(results["test"]),  # rounded half up (28.125 -> 28.13)
        tables._fmt(results["best_val"]),
        "200",
        f"{run} (generated data)",
    ]
    assert f"training curves: {run / 'curves.png'}" in done.stdout
    assert (run / "curves.png").stat().st_size > 0
    assert [p.name.split("-")[0] for p in cache.iterdir()].count("listops") >= 1

    again = _make_demo(run, cache)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert json.loads((run / "results.json").read_text()) == results
    assert row in again.stdout.splitlines()
    assert {name: (REPO / name).exists() for name in ("cache", "runs")} == before

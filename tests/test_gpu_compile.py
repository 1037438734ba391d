"""benchmarks/gpu_compile.py without the CUDA plugin: which timed H200 row each compiled row is
matched with, and the fit of step times to bytes and kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_compile import add_measured, fit_step_times, step_identity


def test_step_time_fit_recovers_bandwidth_and_cost_per_kernel():
    """gpu_compile.py's fit: rows made from 4.0 TB/s and 8 us per kernel give those back; the
    Pallas row (slower than its bytes) and the unmeasured row are predicted, not fitted."""
    ms_per_gib = 2**30 / 4.0e12 * 1e3

    def row(gib, kernels, pallas=0, measured=True, excess_ms=0.0):
        ms = gib * ms_per_gib + kernels * 0.008 + excess_ms
        return dict(GiB=gib, kernels=kernels, pallas=pallas, measured_ms=ms if measured else None)

    rows = [row(16.5, 587), row(19.5, 318), row(65.9, 693), row(223.0, 343)]
    rows += [row(12.5, 476, pallas=24, excess_ms=2.4), row(15.8, 535, measured=False)]
    fit = fit_step_times(rows)
    assert fit["rows"] == 4
    assert fit["bandwidth_TBps"] == pytest.approx(4.0, rel=1e-9)
    assert fit["per_kernel_us"] == pytest.approx(8.0, rel=1e-9)
    assert abs(fit["largest_residual"]) < 1e-9
    pallas, unmeasured = rows[-2:]
    assert pallas["measured_ms"] - pallas["predicted_ms"] == pytest.approx(2.4, rel=1e-9)
    assert unmeasured["predicted_ms"] == pytest.approx(15.8 * ms_per_gib + 535 * 0.008)
    assert fit_step_times(rows[:2] + rows[-2:]) is None  # two fitted rows: no fit


def _compiled_row(model: str, variant: str, length: int = 1024) -> dict:
    """A row as gpu_compile.compile_rows makes it (its kernels and bytes made up)."""
    return {
        "model": model if variant == "after" else f"{model} ({variant})",
        "length": length,
        **step_identity("lra", model, variant, length),
        "GiB": 1.0,
        "kernels": 100,
        "pallas": 24 if "pallas" in model else 0,
    }


def test_rows_take_the_time_of_the_same_step_not_of_the_same_name(tmp_path):
    """The H200 rows (no configuration recorded) ran two scans per bidirectional layer, the
    kernel with its loads after its stores, BatchNorm's gradient by autodiff and each direction's
    phases on their own: today's default
    rows of the same names ran other steps and get no time, nor do variants that undo one of
    those changes only; the variant that undoes all of them gets it; a row with another change
    (separate projections) never does."""
    timed = [
        {"model": "hgrn[associative]", "length": 1024, "step_ms": 9.08},
        {"model": "hgrn[pallas]", "length": 1024, "step_ms": 9.87},
        {"model": "hgrn[pallas] (chained kernel)", "length": 1024, "step_ms": 1.0},
        {"model": "transformer", "length": 1024, "step_ms": 8.82},
        {"model": "transformer", "length": 2048, "step_ms": 22.1},
    ]
    path = tmp_path / "timed.json"
    path.write_text(json.dumps({"rows": timed}))
    as_timed = "as timed on the H200"
    rows = [
        _compiled_row("hgrn[associative]", "after"),
        _compiled_row("hgrn[associative]", "directions in two scans"),
        _compiled_row("hgrn[associative]", as_timed),
        _compiled_row("hgrn[auto]", as_timed),
        _compiled_row("hgrn[associative]", "separate projections"),
        _compiled_row("hgrn[pallas]", "after"),
        _compiled_row("hgrn[pallas]", "loads after stores"),
        _compiled_row("hgrn[pallas]", as_timed),
        _compiled_row("hgrn[pallas]", "chained kernel"),
        _compiled_row("transformer", "after"),
    ]
    assert rows[0]["configuration"] == {
        "method": "associative",
        "phases": "shared",
        "directions_merged": True,
        "batch_norm_gradient": "closed form",
    }
    add_measured(rows, path, "lra")
    measured = [r["measured_ms"] for r in rows]
    assert measured == [None, None, 9.08, 9.08, None, None, None, 9.87, None, 8.82]


def test_a_mosaic_gpu_row_is_not_matched_with_the_triton_rows_time(tmp_path):
    """A Mosaic GPU row recorded the same configuration as the Triton row, so the two timings
    overwrote each other in add_measured. The back-end is recorded now; a row of a JSON written
    before that (no back-end) ran Triton."""
    triton = _compiled_row("hgrn[pallas]", "after")
    mosaic = _compiled_row("hgrn[pallas]", "mosaic_gpu kernel")
    assert triton["configuration"]["backend"] == "triton"
    assert mosaic["configuration"]["backend"] == "mosaic_gpu"
    assert {k: v for k, v in triton["configuration"].items() if k != "backend"} == {
        k: v for k, v in mosaic["configuration"].items() if k != "backend"
    }
    older = {k: v for k, v in triton["configuration"].items() if k != "backend"}
    timed = [
        {"model": "hgrn[pallas]", "length": 1024, "step_ms": 5.0, "configuration": older},
        {
            "model": "hgrn[pallas] (mosaic_gpu kernel)",
            "length": 1024,
            "step_ms": 4.0,
            "configuration": mosaic["configuration"],
        },
    ]
    path = tmp_path / "timed.json"
    path.write_text(json.dumps({"rows": timed}))
    add_measured([triton, mosaic], path, "lra")
    assert (triton["measured_ms"], mosaic["measured_ms"]) == (5.0, 4.0)
    # Rows timed before configurations were recorded (the H200's) match the Triton row too.
    path.write_text(
        json.dumps({"rows": [{"model": "hgrn[pallas]", "length": 1024, "step_ms": 6.0}]})
    )
    rows = [_compiled_row("hgrn[pallas]", "as timed on the H200"), mosaic]
    add_measured(rows, path, "lra")
    assert [r["measured_ms"] for r in rows] == [6.0, None]


def test_runner_step_is_the_training_step_of_the_runner():
    """--step runner compiles hgrn_jax.training's step (gradient norm, clipping, non-finite
    guard) for train_throughput's models and losses; here it runs on the CPU: one update."""
    import argparse

    import jax
    import numpy as np

    from benchmarks import train_throughput as throughput
    from benchmarks.gpu_compile import runner_step_fn

    args = argparse.Namespace(task="lra", scan="1d", full=False, length=16, methods=["auto"])
    models, _, loss, vocab_size = throughput.builders(args, None)
    step, (state,) = runner_step_fn(models["hgrn[auto]"](), loss)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, throughput.random_tokens(2, 16, vocab_size))
    assert int(state.step) == 1 and int(state.nonfinite_step) == -1
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, state.params)
    assert any(jax.tree.leaves(moved))


def test_jax_starts_on_the_cpu_so_the_cuda_plugin_does_not_look_for_a_gpu():
    """On a machine without a GPU the CUDA plugin fails its start-up check unless JAX starts on
    another platform, and then JAX has no CUDA topology to compile for: gpu_compile.py picks the
    CPU before JAX reads its platforms, and leaves a user's own choice alone."""
    probe = (
        "import benchmarks.gpu_compile, jax, os; "
        "print(os.environ['JAX_PLATFORMS'], jax.config.jax_platforms)"
    )
    repo = Path(__file__).resolve().parents[1]

    def platforms(**env) -> str:
        environ = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | env
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=repo, env=environ, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    assert platforms() == ["cpu", "cpu"]
    assert platforms(JAX_PLATFORMS="cuda") == ["cuda", "cuda"]


def test_small_kernels_are_counted_per_row_and_per_line_of_code():
    """A kernel moving under 1 MiB is 'small' (launch-bound): counted in the row and by site."""
    from benchmarks.gpu_compile import SMALL_KERNEL_BYTES, kernel_columns
    from benchmarks.hlo_kernels import Kernel

    def kernel(site: str, size: int) -> Kernel:
        return Kernel("k", "fusion", "kLoop", "", size, 0, site)

    kernels = [
        kernel("optax:42", 16),
        kernel("optax:42", 32),
        kernel("norm.py:43", SMALL_KERNEL_BYTES - 1),
        kernel("norm.py:43", SMALL_KERNEL_BYTES),
        kernel("linear.py:422", 2**30),
    ]
    columns = kernel_columns(kernels)
    assert (columns["kernels"], columns["small"]) == (5, 3)
    assert {s["site"]: s["small"] for s in columns["small_sites"]} == {
        "optax:42": 2,
        "norm.py:43": 1,
    }
    assert {s["site"]: (s["kernels"], s["small"]) for s in columns["sites"]} == {
        "optax:42": (2, 2),
        "norm.py:43": (2, 1),
        "linear.py:422": (1, 0),
    }

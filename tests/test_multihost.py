"""A real multi-host run: two processes with 4 CPU devices each, a loopback coordinator and gloo
collectives, each feeding half of the batch, compute the same LM training step as this process
with 8 devices. This is the TPU-pod path (one process per host), minus the TPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from two_processes import run_two_processes

HERE = Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
TIMEOUT_S = 240  # generous: two JAX start-ups and one compile on 2 shared cores take ~20 s


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_two_processes_compute_the_same_step_as_one(tmp_path):
    out = tmp_path / "two_processes.npz"
    run_two_processes([sys.executable, str(WORKER), "--out", str(out)], timeout=TIMEOUT_S)
    single = _load_worker().train_step_outputs()  # this process: 8 devices, the whole batch
    with np.load(out) as data:
        multi = {k: data[k] for k in data.files}
    assert multi.keys() == single.keys()
    assert len(multi) > 40  # loss, parameters, adam moments and counters
    # Same computation; only the order of cross-device float32 sums may differ.
    for key, expected in single.items():
        np.testing.assert_allclose(multi[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)

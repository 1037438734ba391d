"""A real multi-host run: two processes with 4 CPU devices each, a loopback coordinator and gloo
collectives, each feeding half of the batch, compute the same LM training step as this process
with 8 devices. This is the TPU-pod path (one process per host), minus the TPU."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "multihost_worker.py"
TIMEOUT_S = 240  # generous: two JAX start-ups and one compile on 2 shared cores take ~20 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_two_processes(out: Path) -> None:
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent),
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--out", str(out)],
                              env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"


def test_two_processes_compute_the_same_step_as_one(tmp_path):
    out = tmp_path / "two_processes.npz"
    _run_two_processes(out)
    single = _load_worker().train_step_outputs()  # this process: 8 devices, the whole batch
    with np.load(out) as data:
        multi = {k: data[k] for k in data.files}
    assert multi.keys() == single.keys()
    assert len(multi) > 40  # loss, parameters, adam moments and counters
    # Same computation; only the order of cross-device float32 sums may differ.
    for key, expected in single.items():
        np.testing.assert_allclose(multi[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)

"""A run whose training batches come from a grain worker process (``data.workers=1``),
killed with SIGKILL, process group and worker together, then rerun until it finishes, ends
exactly as an undisturbed run with the same workers setting.

tests/test_kill_resume.py kills the toy task, whose batches are read in the training process;
here LRA ListOps' ``tiny`` preset (generated data, a smaller set) runs through the command line
with one worker process, so that every checkpoint carries grain's iterator state and every
resume restores it into a new worker. The kill comes during an evaluation (triggered by what the
workdir shows), the worker building batches ahead meanwhile; the second run finishes. (Kills at
other moments, a checkpoint being written among them: tests/test_kill_resume.py; a mid-save
kill here too cost ~15 s of suite time and found nothing the toy test's does not.) The toy
test's machinery (:class:`test_kill_resume.Attempt`, :func:`test_kill_resume.kill_and_rerun`)
checks each rerun (it resumes from the newest committed
checkpoint, prints no traceback, error or unexpected warning), that no process of a killed group
outlives the kill (no orphaned worker; multiprocessing's resource tracker, outside the group,
ends by itself) and that nothing the killed processes had in ``/dev/shm`` stays there. The
finished run's results, metrics records and kept checkpoints (arrays and input state) must equal
the undisturbed run's.

Its first run found the batches the worker had built ahead (and grain's semaphores: 37 files per
kill) left in ``/dev/shm`` for good: the resource tracker that removes them died in the group
(tests/test_grain_pipeline.py has the focused test).

The OOM killer kills the training process alone, not its group: the second test kills only it,
and its worker (with the resource tracker and the batches built ahead) must end by itself.

All runs share one persistent compilation cache, filled by the undisturbed run: a rerun then
starts in seconds instead of compiling again (~25 s on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_kill_resume import KEEP, Kill, Run, check_ends_as, kill_and_rerun, undisturbed
from two_processes import cli_env

STEPS = 10
EVAL_EVERY = 5


def listops_with_a_worker(data: str, compilation_cache: str) -> Run:
    """ListOps' tiny preset with one input worker, for ``STEPS`` steps, a checkpoint each, on a
    smaller generated set (in ``data``)."""
    args = (
        "--config=experiments/configs/lra/listops.py:tiny",
        f"--config.data.cache_dir={data}",
        "--config.data.workers=1",
        "--config.data.train_examples=640",
        "--config.data.val_examples=64",
        "--config.data.test_examples=64",
        f"--config.num_train_steps={STEPS}",
        "--config.schedule.warmup_steps=2",  # the preset's 10: a RunLengthWarning at 10 steps
        "--config.checkpoint_every=1",
        f"--config.eval_every={EVAL_EVERY}",
        "--config.log_every=1",
        f"--config.keep_checkpoints={KEEP}",
    )
    cache = {
        "JAX_COMPILATION_CACHE_DIR": compilation_cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    return Run(args, STEPS, EVAL_EVERY, env=lambda: {**cli_env(), **cache})


# Evaluating (step 5), the worker building batches ahead. (Mid-save, after the last step and
# others: tests/test_kill_resume.py.)
KILLS = [Kill("evaluation", 1)]


@pytest.mark.slow
def test_a_run_with_input_workers_killed_mid_evaluation_ends_as_an_undisturbed_one(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    run = listops_with_a_worker(str(tmp_path / "data"), str(tmp_path / "jax-cache"))
    # Run once: the toy test checks that the runner is deterministic, and a batch is a function
    # of its step whatever the workers (tests/test_grain_pipeline.py).
    reference, _ = undisturbed(run, tmp_path / "reference", logs, 1)
    # Each kept checkpoint holds grain's iterator state: what the reruns must restore.
    assert all(
        '"grain": {' in "".join(c["input"].values()) for c in reference["checkpoints"].values()
    )
    val = {r["step"]: r["accuracy"] for r in reference["records"] if r["split"] == "val"}

    workdir = tmp_path / "killed"
    report = kill_and_rerun(run, workdir, logs, KILLS, val)
    print("\n".join(report))
    # Every kill comes while training, and takes down the training process and its worker.
    assert all("processes killed" in line for line in report[: len(KILLS)]), report
    check_ends_as(workdir, reference, val)


@pytest.mark.slow  # data generated, a run started up to its worker's first batch: ~10 s
def test_input_workers_end_when_only_the_training_process_is_killed(tmp_path):
    """The kernel's out-of-memory killer kills one process, not its group: a SIGKILL of the
    training process alone left its input worker (and so multiprocessing's resource tracker,
    which the worker keeps open, and the batches it had built ahead in ``/dev/shm``) running
    under PID 1 for good, with its memory (222 MB for tiny ListOps; ImageNet starts one worker
    per CPU), making the next out-of-memory kill likelier. A worker now ends by itself once the
    process that started it is gone (:func:`hgrn_jax.data.grain_pipeline._worker_start`)."""
    from test_kill_resume import REPO
    from two_processes import (
        process_group,
        shared_memory_files,
        wait_until_gone,
        wait_until_removed,
    )

    run = listops_with_a_worker(str(tmp_path / "data"), str(tmp_path / "jax-cache"))
    command = [sys.executable, "-m", "experiments.train", *run.args, f"--workdir={tmp_path / 'w'}"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=run.env(), stdout=out, stderr=out, start_new_session=True
        )
    workers, outside, shm = [], [], set()
    try:
        # Training, its worker building batches ahead.
        deadline = time.monotonic() + 120
        while "step 1/" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no step trained: {log.read_text()[-3000:]}"
            time.sleep(0.05)
        group, outside = process_group(proc.pid)
        workers = [pid for pid in group if pid != proc.pid]
        assert workers, "no input worker process"
        shm = shared_memory_files(group)
        before = set(Path("/dev/shm").glob("psm_*"))
        os.kill(proc.pid, signal.SIGKILL)  # the training process only, as the OOM killer does
        proc.wait()
        killed = time.monotonic()
        survivors = [pid for pid in workers if not wait_until_gone(pid, timeout_s=5.0)]
        took = time.monotonic() - killed
        assert not survivors, f"input workers still running 5 s after the run's kill: {survivors}"
        outliving = [pid for pid in outside if not wait_until_gone(pid, timeout_s=5.0)]
        assert not outliving, f"the run's resource tracker still running: {outliving}"
        left = [path for path in shm if not wait_until_removed(path)]
        assert not left, f"{len(left)} files left in /dev/shm: {sorted(left)[:4]}"
        # Batches built ahead are named blocks that no process maps; the tracker removed them
        # (other runs on this machine may add blocks meanwhile: printed, not asserted).
        remaining = sorted(before & set(Path("/dev/shm").glob("psm_*")))
        print(f"{len(workers)} worker(s) ended {took:.2f} s after the kill; {remaining} remain")
    finally:  # nothing left behind, whatever failed
        if process_group(proc.pid)[0]:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in [*workers, *outside]:
            wait_until_gone(pid)
        for path in shm:
            path.unlink(missing_ok=True)

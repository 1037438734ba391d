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

All runs share one persistent compilation cache, filled by the undisturbed run: a rerun then
starts in seconds instead of compiling again (~25 s on 2 cores).
"""

from __future__ import annotations

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

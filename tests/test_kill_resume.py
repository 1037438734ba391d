"""A run killed with SIGKILL at any moment, several times in a row, then rerun until it finishes,
ends exactly as an undisturbed run of the same config.

The toy task (``tests/toy_task.py``) runs through the command line in a process group of its
own, checkpointing every step (so that an asynchronous checkpoint write is in flight most of the
time) and evaluating every 5 steps. A fixed-seed schedule (:func:`schedule`) kills the group
ten times: as it takes the workdir's lock, at startup (compiling, no checkpoint yet), at a
random moment, while a ``N.orbax-checkpoint-tmp`` folder is being written, while restoring
(just after Orbax removed the unfinished folders), between Orbax's commit of a step folder and
its ``integrity.json``, during an evaluation, and once the last step is committed (test split,
results). All but the startup and random kills are triggered by what the workdir shows, so they
land where aimed whatever the machine's speed; where each kill landed is read back from what it
left and printed (``pytest -s``). A kill that comes after the run finished is a finished run.
``HGRN_KILL_RESUME_SEED`` draws other offsets.

Checked: every rerun resumes from the newest committed checkpoint on disk; a committed checkpoint
that disappears was dropped by the keep policy (or moved to ``checkpoints.damaged/``, which a
kill cannot justify: none may be); no rerun prints a traceback, an error or a warning other than
the documented ones (the dead run's lock taken over, a checkpoint restored without checksums);
no process of a killed group outlives the kill, nor what it had in ``/dev/shm`` (used by runs
with input workers, tests/test_kill_resume_workers.py, which shares this machinery);
and the finished run's results, metrics records and kept checkpoints (every array, bit for bit,
the input state) equal those of an undisturbed run, itself checked to be deterministic by
running it twice. Its first run found a lock left empty by a kill, which blocked every rerun
(tests/test_faults.py has the focused test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from two_processes import (
    cli_env,
    process_group,
    shared_memory_files,
    wait_until_gone,
    wait_until_removed,
)

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "tests" / "toy_task.py"

TOTAL_STEPS = 20
EVAL_EVERY = 5
KEEP = 2
OVERRIDES = (
    f"--config.num_train_steps={TOTAL_STEPS}",
    f"--config.schedule.decay_steps={TOTAL_STEPS}",  # the toy's 12: a RunLengthWarning at 20
    "--config.checkpoint_every=1",
    f"--config.eval_every={EVAL_EVERY}",
    "--config.log_every=1",  # a record per step: the records do not depend on where a run resumed
    f"--config.keep_checkpoints={KEEP}",
)
SEED = int(os.environ.get("HGRN_KILL_RESUME_SEED", "20261202"))  # another seed, other moments
ATTEMPT_TIMEOUT_S = 180.0
POLL_S = 0.003

# What a rerun after a kill may print as a warning: the dead run's lock taken over, a checkpoint
# committed just before the kill restored without its checksums, a damaged one moved aside.
ALLOWED_WARNINGS = frozenset(
    {"StaleLockWarning", "CheckpointUnverifiedWarning", "CheckpointFallbackWarning"}
)
# What multiprocessing's resource tracker prints once a run with input workers is gone (it
# exited, or was killed): the batches they had built ahead, and the semaphores of a killed one,
# which it removes (docs/data.md; grain's issue google/grain#1031).
LEAKED_SHARED_MEMORY = re.compile(
    r"^.*resource_tracker\.py:\d+: UserWarning: resource_tracker: There appear to be \d+ "
    r"leaked (shared_memory|semaphore) objects to clean up at shutdown\n\s*warnings\.warn\(.*\n",
    re.M,
)
TIMING_KEYS = frozenset({"wall_time_s", "steps_per_sec"})
TMP_MARK = ".orbax-checkpoint-tmp"


# ----------------------------------------------------------------------------------------------
# One attempt: the command in its own process group, its output in files
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """What a test kills: ``experiments.train`` with ``args`` (the workdir added) in the
    environment ``env()`` returns; ``steps`` and ``eval_every`` are its config's, which the
    triggers and :func:`landed` read."""

    args: tuple[str, ...]
    steps: int
    eval_every: int
    env: Callable[[], dict[str, str]] = cli_env


TOY = Run((f"--config={TOY_CONFIG}", *OVERRIDES), TOTAL_STEPS, EVAL_EVERY)


class Attempt:
    """One run of ``run`` on ``workdir`` in a process group of its own; stdout and stderr go
    to files in ``logs``."""

    def __init__(self, run: Run, workdir: Path, logs: Path, index: int):
        self.run, self.workdir = run, workdir
        self.stderr_path = logs / f"attempt-{index}.stderr"
        self.stdout_path = logs / f"attempt-{index}.stdout"
        command = [sys.executable, "-m", "experiments.train", *run.args, f"--workdir={workdir}"]
        self.stale_lock = lock_record(workdir)  # left by the attempt before, if killed
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=run.env(), stdout=out, stderr=err, start_new_session=True
            )
        self.started = time.monotonic()
        self.killed_group: list[int] = []  # the process group's members when it was killed
        self.outside_group: list[int] = []  # their children in another group, left to end
        self.killed_shm: set[Path] = set()  # what the killed processes had in /dev/shm
        self.first_seen: dict[str, float] = {}

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def took_lock(self) -> bool:
        """Whether ``run.lock`` is there and not the one a killed attempt left before this one."""
        record = lock_record(self.workdir)
        return record is not None and record != self.stale_lock

    def seen(self, name: str, condition: Callable[[], bool]) -> float | None:
        """When ``condition`` was first found true (seconds after the start), or None."""
        if name not in self.first_seen and condition():
            self.first_seen[name] = self.elapsed()
        return self.first_seen.get(name)

    def kill_when(self, trigger: Callable[[Attempt], bool]) -> bool:
        """SIGKILL the process group once ``trigger(self)`` holds; False if the run ended first."""
        while self.proc.poll() is None:
            hung = self.elapsed() > ATTEMPT_TIMEOUT_S
            if hung or trigger(self):
                self.kill()
                assert not hung, f"hangs: {self.stderr()[-2000:]}"
                return True
            time.sleep(POLL_S)
        return False

    def kill(self) -> None:
        self.killed_group, self.outside_group = process_group(self.proc.pid)
        self.killed_shm = shared_memory_files(self.killed_group)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self) -> int:
        """The exit code of a run left to end (killed, and the test failed, if it hangs)."""
        try:
            return self.proc.wait(timeout=ATTEMPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"hangs: {self.stderr()[-2000:]}") from None


# ----------------------------------------------------------------------------------------------
# The workdir as the test sees it
# ----------------------------------------------------------------------------------------------


def lock_record(workdir: Path) -> bytes | None:
    try:
        return (workdir / "run.lock").read_bytes()
    except FileNotFoundError:
        return None


def committed(workdir: Path) -> list[int]:
    """Steps of the committed checkpoint folders (named by the step alone), ascending."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def tmp_folders(workdir: Path) -> list[str]:
    """Orbax's unfinished checkpoint folders (``N.orbax-checkpoint-tmp...``)."""
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name) if folder.is_dir() else []


def saving(workdir: Path) -> list[int]:
    """Steps whose checkpoint is being written."""
    return sorted(int(name.split(".")[0]) for name in tmp_folders(workdir))


def has_manifest(workdir: Path, step: int) -> bool:
    return (workdir / "checkpoints" / str(step) / "integrity.json").is_file()


def damaged(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints.damaged"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def resumed_at(stderr: str) -> int | None:
    """The step the startup summary names, or None before it is printed."""
    found = re.search(r"(?:starting at|resuming from) step (\d+) of", stderr)
    return int(found.group(1)) if found else None


def metrics_records(workdir: Path) -> list[dict]:
    """The whole records of ``metrics.jsonl`` (a line cut short by a kill is left out)."""
    path = workdir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def train_records(workdir: Path) -> list[int]:
    return [r["step"] for r in metrics_records(workdir) if r.get("split") == "train"]


# ----------------------------------------------------------------------------------------------
# The kill schedule: triggers read from the workdir and stderr
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kill:
    """A trigger: ``aim`` says what it aims at, ``after`` how many steps past the resumed one
    (or, for ``startup``, ``restore``, ``end`` and ``random``, how many seconds) it waits.
    ``lock`` kills as soon as ``run.lock`` appears."""

    aim: str
    after: float

    def __call__(self, attempt: Attempt) -> bool:
        workdir, now = attempt.workdir, attempt.elapsed()
        if self.aim == "lock":
            return attempt.took_lock()
        if self.aim == "startup":
            return attempt.took_lock() and now >= self.after
        if self.aim == "random":
            return now >= self.after
        if self.aim == "restore":  # Orbax removes the unfinished folders just before restoring
            gone = attempt.seen("tmp folders removed", lambda: not tmp_folders(workdir))
            return gone is not None and now >= gone + self.after
        if self.aim == "end":
            last = attempt.run.steps
            done = attempt.seen("last step committed", lambda: last in committed(workdir))
            return done is not None and now >= done + self.after
        start = resumed_at(attempt.stderr())
        if start is None:
            return False
        target = start + int(self.after)
        if self.aim == "mid-save":
            return any(step >= target for step in saving(workdir))
        if self.aim == "before-manifest":
            return any(
                step >= target and not has_manifest(workdir, step) for step in committed(workdir)
            )
        if self.aim == "evaluation":  # an evaluation step's train record is written just before
            every = attempt.run.eval_every
            return any(s >= target and s % every == 0 for s in train_records(workdir))
        raise ValueError(self.aim)


def schedule(rng: random.Random, reference_s: float) -> list[Kill]:
    """The kills in a fixed order, their offsets drawn from ``rng``: the first three land before
    any checkpoint exists or soon after (the first as the lock is taken), the others spread over restoring, saving, evaluating
    and the end. Each trigger after the first three waits at most 3 steps past the resumed step,
    so the run is still going when the next one is due."""

    def steps() -> int:
        return rng.randint(1, 3)

    return [
        Kill("lock", 0),
        Kill("startup", rng.uniform(1.0, 2.5)),
        Kill("random", rng.uniform(0.3 * reference_s, 0.6 * reference_s)),
        Kill("mid-save", steps()),
        Kill("restore", rng.uniform(0.0, 0.06)),
        Kill("before-manifest", steps()),
        Kill("evaluation", steps()),
        Kill("mid-save", steps()),
        Kill("restore", rng.uniform(0.0, 0.06)),
        Kill("end", rng.uniform(0.0, 0.3)),
    ]


def landed(attempt: Attempt, before: set[int]) -> str:
    """Where the kill of ``attempt`` landed, read from what it left: the lock, the startup line,
    the last metrics record, the unfinished and the newly committed checkpoint folders."""
    workdir, stderr = attempt.workdir, attempt.stderr()
    if resumed_at(stderr) is None:
        if not attempt.took_lock():
            return "before taking the lock"
        if not before:
            return "startup (no checkpoint yet)"
        # Orbax removes the unfinished folders when the run opens its checkpoints, just before
        # restoring the newest.
        return "startup, restoring" if not tmp_folders(workdir) else "startup"
    if (workdir / "results.json").exists():
        return "after writing results.json"
    records = metrics_records(workdir)
    last = records[-1] if records else {"split": "none", "step": 0}
    if last["split"] == "test":
        where = "after the test evaluation"
    elif last["split"] == "val":
        where = f"after the evaluation of step {last['step']}"
        if last["step"] == attempt.run.steps:
            where += " (finishing: test split, results)"
    elif last["step"] % attempt.run.eval_every == 0 and last["split"] == "train":
        where = f"evaluating step {last['step']}"
    else:
        where = f"training step {last['step'] + 1}"
    where += "".join(f", saving step {step}" for step in saving(workdir))
    where += "".join(
        f", step {step} committed but no manifest yet"
        for step in sorted(set(committed(workdir)) - before)
        if not has_manifest(workdir, step)
    )
    return where


# ----------------------------------------------------------------------------------------------
# What a finished run is: results, metrics records and kept checkpoints, timings left out
# ----------------------------------------------------------------------------------------------


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def _array_digests(tree) -> dict[str, str]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        out[jax.tree_util.keystr(path)] = f"{array.dtype}{array.shape}:{digest}"
    return out


def _checkpoint(folder: Path) -> dict:
    """Every array of the checkpoint (dtype, shape, SHA-256 of its bytes), its bookkeeping
    without the wall time, and the input pipeline's state."""
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(folder / "state")
    meta = json.loads((folder / "meta" / "metadata").read_text())
    inputs = sorted((folder / "input").glob("*.json"))
    return {
        "arrays": _array_digests(state),
        "meta": _untimed(meta),
        "input": {p.name: p.read_text() for p in inputs},
    }


def outcome(workdir: Path, steps: list[int]) -> dict:
    """The finished run in ``workdir`` without its timings: results, metrics records and the
    checkpoints of ``steps``."""
    results = json.loads((workdir / "results.json").read_text())
    return {
        "results": _untimed(results),
        "records": [_untimed(r) for r in metrics_records(workdir)],
        "checkpoints": {step: _checkpoint(workdir / "checkpoints" / str(step)) for step in steps},
    }


# ----------------------------------------------------------------------------------------------
# Checks on each attempt
# ----------------------------------------------------------------------------------------------


def check_stderr(stderr: str) -> list[str]:
    """The warning categories of one attempt's stderr, after checking that it holds no
    traceback, no error line (ours or absl's) and no warning but :data:`ALLOWED_WARNINGS` and
    the resource tracker's :data:`LEAKED_SHARED_MEMORY` note."""
    stderr = LEAKED_SHARED_MEMORY.sub("", stderr)
    assert "Traceback" not in stderr, stderr[-4000:]
    assert not re.search(r"^(error:|[EF]\d{4} )", stderr, re.M), stderr[-4000:]
    categories = re.findall(r"\b(\w+Warning):", stderr)
    assert set(categories) <= ALLOWED_WARNINGS, stderr[-4000:]
    return sorted(set(categories))


def dropped_by_keep_policy(step: int, others: set[int], val: dict[int, float]) -> bool:
    """Whether the keep policy (the latest ``KEEP`` and the best on validation, the later one on
    ties) drops checkpoint ``step`` when ``others`` are on disk."""
    newer = [s for s in others if s > step]
    if len(newer) < KEEP:
        return False
    if step not in val:
        return True
    return any(s in val and (val[s], s) > (val[step], step) for s in others)


def undisturbed(run: Run, workdir: Path, logs: Path, index: int) -> tuple[dict, float]:
    """Run to the end without a kill; the outcome and the seconds it took."""
    attempt = Attempt(run, workdir, logs, index)
    assert attempt.finish() == 0, attempt.stderr()[-4000:]
    seconds = attempt.elapsed()
    check_stderr(attempt.stderr())
    return outcome(workdir, committed(workdir)), seconds


def kill_and_rerun(
    run: Run, workdir: Path, logs: Path, kills: list[Kill], val: dict[int, float]
) -> list[str]:
    """Run once per kill, then until the run finishes; each attempt checked, and no process of
    a killed group may outlive the kill. Returns a line per attempt saying where its kill
    landed."""
    report = []
    for index, kill in enumerate([*kills, None], start=1):
        before, aside = set(committed(workdir)), damaged(workdir)
        attempt = Attempt(run, workdir, logs, 100 + index)
        killed = kill is not None and attempt.kill_when(kill)
        if not killed:  # not scheduled, or the run finished before its kill came
            assert attempt.finish() == 0, attempt.stderr()[-4000:]
        survivors = [pid for pid in attempt.killed_group if not wait_until_gone(pid)]
        assert not survivors, f"killed processes still running: {survivors}"
        outliving = [pid for pid in attempt.outside_group if not wait_until_gone(pid)]
        assert not outliving, f"processes of the killed run still running: {outliving}"
        # multiprocessing's resource tracker removes them once the processes are gone.
        left = [path for path in attempt.killed_shm if not wait_until_removed(path)]
        for path in left:  # not to fill the machine's /dev/shm
            path.unlink(missing_ok=True)
        assert not left, f"the killed processes left {len(left)} files in /dev/shm: {left[:4]}"
        stderr = attempt.stderr()
        warned = check_stderr(stderr)
        after, moved = set(committed(workdir)), sorted(set(damaged(workdir)) - set(aside))
        assert set(aside) <= set(damaged(workdir)), "a checkpoint moved aside disappeared"
        start = resumed_at(stderr)
        if start is not None:  # the newest committed checkpoint, unless found damaged
            usable = sorted(before - {int(name.split(".")[0]) for name in moved})
            assert start == (usable[-1] if usable else 0), (sorted(before), moved, stderr[-3000:])
        for step in sorted(before - after):
            assert str(step) in moved or dropped_by_keep_policy(step, after, val), (
                f"committed checkpoint {step} disappeared",
                sorted(before),
                sorted(after),
            )
        where = landed(attempt, before) if killed else "not killed: ran to the end"
        if len(attempt.killed_group) > 1:
            where += (
                f" ({len(attempt.killed_group)} processes killed, {len(attempt.outside_group)}"
                f" outside the group ended; {len(attempt.killed_shm)} files in /dev/shm removed)"
            )
        aim = f"{kill.aim} ({kill.after:.2f})" if kill else "final run"
        report.append(
            f"attempt {index}: {aim} -> {where}; resumed at {start}; {attempt.elapsed():.1f} s;"
            f" warnings {warned}; moved aside {moved}"
        )
        if not killed:
            return report
    raise AssertionError("unreachable: the last attempt has no kill")


def check_ends_as(workdir: Path, reference: dict, val: dict[int, float]) -> None:
    """The killed and rerun run in ``workdir`` ended as the undisturbed one (its
    :func:`outcome` ``reference``, validation metrics ``val``)."""
    kept = sorted(reference["checkpoints"])
    # SIGKILL cannot damage a committed checkpoint (Orbax renames a step folder into place once
    # its files are written, and they outlive the process in the page cache), so none may
    # have been found damaged: one moved aside would be a good checkpoint misjudged.
    assert damaged(workdir) == []
    # A kill while Orbax deleted a checkpoint the keep policy dropped leaves that folder half
    # deleted, until the next save's keep pass; only such folders may be there in addition.
    extra = sorted(set(committed(workdir)) - set(kept))
    assert set(kept) <= set(committed(workdir)), (kept, committed(workdir))
    assert all(dropped_by_keep_policy(step, set(kept), val) for step in extra), extra
    assert outcome(workdir, kept) == reference


@pytest.mark.slow
def test_a_run_killed_again_and_again_ends_as_an_undisturbed_one(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    reference, reference_s = undisturbed(TOY, tmp_path / "reference", logs, 1)
    again, _ = undisturbed(TOY, tmp_path / "reference-again", logs, 2)
    assert again == reference, "the undisturbed run is not deterministic; nothing to compare with"
    val = {r["step"]: r["accuracy"] for r in reference["records"] if r["split"] == "val"}

    workdir = tmp_path / "killed"
    kills = schedule(random.Random(SEED), reference_s)
    report = kill_and_rerun(TOY, workdir, logs, kills, val)
    print("\n".join(report))
    landed_kills = sum("not killed" not in line for line in report)
    assert landed_kills >= 7, report  # the run ended before most kills came: nothing tested
    check_ends_as(workdir, reference, val)

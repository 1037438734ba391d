"""The grain pipeline over random-access arrays: each example once per epoch over all processes,
exact resumption from the iterator's saved state, the same batches with worker processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from hgrn_jax.data import errors, grain_pipeline, loader

N, BATCH, PROCESSES = 48, 8, 2


def source() -> grain_pipeline.ArraySource:
    return grain_pipeline.ArraySource(
        {"inputs": np.arange(N * 3).reshape(N, 3), "labels": np.arange(N, dtype=np.int32)}
    )


def batches(process_index: int, count: int, **kwargs) -> list[dict[str, np.ndarray]]:
    loader = grain_pipeline.train_loader(
        source(),
        seed=7,
        batch_size=BATCH,
        process_index=process_index,
        process_count=PROCESSES,
        **kwargs,
    )
    iterator = iter(loader)
    out = [next(iterator) for _ in range(count)]
    iterator.close()
    return out


def test_every_example_once_per_epoch_over_all_processes():
    steps = N // BATCH  # one epoch: each process reads 4 records of each of the 6 global batches
    per_process = [batches(p, 2 * steps) for p in range(PROCESSES)]
    epochs = []
    for epoch in range(2):
        seen = np.concatenate(
            [b["labels"] for p in per_process for b in p[epoch * steps : (epoch + 1) * steps]]
        )
        assert sorted(seen.tolist()) == list(range(N))  # every example exactly once
        epochs.append(
            np.concatenate(
                [
                    np.concatenate([p[s]["labels"] for p in per_process])
                    for s in range(epoch * steps, (epoch + 1) * steps)
                ]
            )
        )
    assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled each epoch
    first = per_process[0][0]
    assert first["inputs"].shape == (BATCH // PROCESSES, 3)
    np.testing.assert_array_equal(first["inputs"][:, 0], first["labels"] * 3)  # rows intact
    # The two processes' shares of a step are the halves of the one-process global batch.
    whole = grain_pipeline.train_loader(source(), seed=7, batch_size=BATCH)
    iterator = iter(whole)
    for step in range(steps):
        np.testing.assert_array_equal(
            next(iterator)["labels"],
            np.concatenate([per_process[p][step]["labels"] for p in range(PROCESSES)]),
        )
    # The order is the documented one (loader.train_rows).
    np.testing.assert_array_equal(
        per_process[1][3]["labels"], loader.train_rows(7, 3, N, BATCH, 1, PROCESSES)
    )


def test_repeated_augmentation_order_repeats_each_record_in_a_row_within_epochs():
    """repeats=3 (DeiT's RASampler): an epoch is its permutation with each record three times
    in a row, cut to N // BATCH batches (N / 3 distinct records); the next epoch has another
    permutation; processes read their shares of the same global batches; resuming from a
    saved state (a state of the unrepeated order is refused) gives the same batches."""
    steps = N // BATCH
    per_process = [batches(p, 2 * steps + 1, repeats=3) for p in range(PROCESSES)]
    stream = np.concatenate(
        [b["labels"] for s in range(2 * steps) for b in (per_process[0][s], per_process[1][s])]
    )
    for epoch in range(2):
        order = loader.epoch_order(7, epoch, N)
        got = stream[epoch * N : (epoch + 1) * N]
        np.testing.assert_array_equal(got, np.repeat(order, 3)[:N])
        assert (got.reshape(-1, 3) == got[::3, None]).all()  # [a, a, a, b, b, b, ...]
        assert len(np.unique(got)) == N // 3
    assert stream[:N].tolist() != stream[N:].tolist()
    # An epoch cut mid-triple starts the next with a triple of the next permutation.
    np.testing.assert_array_equal(
        np.concatenate(
            [b["labels"] for b in (per_process[0][2 * steps], per_process[1][2 * steps])]
        ),
        np.repeat(loader.epoch_order(7, 2, N), 3)[:BATCH],
    )

    def fresh():
        return grain_pipeline.train_loader(
            source(),
            seed=7,
            batch_size=BATCH,
            process_index=1,
            process_count=PROCESSES,
            repeats=3,
        )

    iterator = iter(fresh())
    for _ in range(steps - 1):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = iter(fresh())
    resumed.set_state(state)
    for step in range(steps - 1, 2 * steps + 1):
        np.testing.assert_array_equal(next(resumed)["labels"], per_process[1][step]["labels"])
    unrepeated = grain_pipeline.train_loader(
        source(), seed=7, batch_size=BATCH, process_index=1, process_count=PROCESSES
    )
    with pytest.raises(ValueError, match="belongs to other data or settings.*3 times"):
        iter(unrepeated).set_state(state)
    with pytest.raises(ValueError, match="repeats 0 must be a whole number >= 1"):
        grain_pipeline.train_loader(source(), seed=7, batch_size=BATCH, repeats=0)


def test_resuming_from_the_saved_state_continues_exactly():
    def fresh():
        return grain_pipeline.train_loader(
            source(), seed=7, batch_size=BATCH, process_index=1, process_count=PROCESSES
        )

    iterator = iter(fresh())
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # it travels as JSON
    assert state["next_step"] == 5
    expected = [next(iterator)["labels"] for _ in range(6)]
    resumed = iter(fresh())
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["labels"] for _ in range(6)], expected)
    assert resumed.get_state()["next_step"] == 11
    # Starting at a step (no saved state) is the same position.
    np.testing.assert_array_equal(
        [next(fresh().iterator(5))["labels"] for _ in range(1)], expected[:1]
    )
    # A state from other data or another process's share is refused, naming both.
    other = grain_pipeline.train_loader(source(), seed=8, batch_size=BATCH, process_count=2)
    with pytest.raises(ValueError, match="belongs to other data or settings.*seed 7.*seed 8"):
        iter(other).set_state(state)


def test_in_process_random_access_gives_the_grain_iterators_batches():
    loader = grain_pipeline.train_loader(
        source(),
        seed=5,
        batch_size=BATCH,
        process_index=1,
        process_count=PROCESSES,
        transform=lambda r: {**r, "labels": r["labels"] + 100},
        batch_transform=AddStep(),
    )
    through_grain = iter(loader.dataset(3))  # grain's iterator over the same MapDataset
    random_access = loader.iterator(3)
    assert random_access.in_process
    for step in range(3, 3 + 2 * N // BATCH):  # two epochs
        expected = next(through_grain)
        batch = next(random_access)
        assert batch.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
        np.testing.assert_array_equal(loader.batch(step)["inputs"], expected["inputs"])
    assert random_access.get_state()["next_step"] == 3 + 2 * N // BATCH


def test_in_process_state_is_the_next_step_and_version_1_states_resume_exactly():
    def fresh():
        return grain_pipeline.train_loader(
            source(), seed=7, batch_size=BATCH, batch_transform=AddStep()
        )

    iterator = fresh().iterator(2)
    for _ in range(4):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    assert state["version"] == grain_pipeline.STATE_VERSION == 2
    assert state["next_step"] == 6 and state["grain"] is None and state["worker_count"] == 0
    expected = [next(iterator) for _ in range(5)]
    resumed = iter(fresh())
    resumed.set_state(state)
    for batch, want in zip([next(resumed) for _ in range(5)], expected, strict=True):
        np.testing.assert_array_equal(batch["inputs"], want["inputs"])
    # A version-1 state (grain's iterator state for every worker count, as written before the
    # in-process path read by random access) resumes at its step too.
    grain_iterator = iter(fresh().dataset(2))
    for _ in range(4):
        next(grain_iterator)
    old = {
        "version": 1,
        "next_step": 6,
        "base_step": 2,
        "worker_count": 0,
        "pipeline": fresh().describe(),
        "grain": json.loads(json.dumps(grain_iterator.get_state())),
    }
    from_old = iter(fresh())
    from_old.set_state(old)
    for batch, want in zip([next(from_old) for _ in range(5)], expected, strict=True):
        np.testing.assert_array_equal(batch["inputs"], want["inputs"])
    assert from_old.get_state()["next_step"] == 11
    with pytest.raises(ValueError, match="not an input-pipeline state of this version"):
        iter(fresh()).set_state({**state, "version": 3})


def test_a_transform_runs_on_every_record_and_bad_sizes_are_errors():
    doubled = batches(0, 1, transform=lambda r: {**r, "labels": r["labels"] * 2})[0]
    plain = batches(0, 1)[0]
    np.testing.assert_array_equal(doubled["labels"], plain["labels"] * 2)
    stepped = batches(0, 3, batch_transform=lambda b, step: {**b, "step": np.int64(step)})
    assert [int(b["step"]) for b in stepped] == [0, 1, 2]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        grain_pipeline.train_loader(source(), seed=0, batch_size=7, process_count=2)
    with pytest.raises(ValueError, match="fewer than batch_size 64"):
        grain_pipeline.train_loader(source(), seed=0, batch_size=64)
    with pytest.raises(ValueError, match="one row per example"):
        grain_pipeline.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


class AddStep:
    """A picklable batch transform (worker processes receive it pickled)."""

    def __call__(self, batch, step):
        return {**batch, "inputs": batch["inputs"] + 1000 * step}


def test_memory_mapped_arrays_travel_to_workers_as_file_names(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(N * 3).reshape(N, 3))
    mapped = grain_pipeline.ArraySource({"x": np.load(tmp_path / "x.npy", mmap_mode="r")})
    pickled = pickle.dumps(mapped)
    assert len(pickled) < 1000  # the file name, not the N x 3 values
    copy = pickle.loads(pickled)
    assert isinstance(copy.arrays["x"], np.memmap)
    np.testing.assert_array_equal(copy.read(np.array([5, 1]))["x"], [[15, 16, 17], [3, 4, 5]])
    # A slice of the memmap is a memmap of the same file too: sent as the file name, a worker
    # read the whole file's rows (row 0 of the slice was the file's row 0, not row 4).
    part = grain_pipeline.ArraySource({"x": np.load(tmp_path / "x.npy", mmap_mode="r")[4:]})
    copy = pickle.loads(pickle.dumps(part))
    assert len(copy) == N - 4
    np.testing.assert_array_equal(copy.read(np.array([0, 1]))["x"], [[12, 13, 14], [15, 16, 17]])


class BadAtStep2:
    """A batch transform that finds bad data at step 2 (as a reader's report would)."""

    def __call__(self, batch, step):
        if step == 2:
            report = errors.BadDataReport("fixture")
            report.add("fixture.tsv", 7, "label 12 not in 0..9")
            report.finish(skip=False)
        return batch


@pytest.mark.slow
def test_bad_data_found_in_a_worker_process_stops_with_its_message():
    loader = grain_pipeline.train_loader(
        source(), seed=0, batch_size=BATCH, worker_count=1, batch_transform=BadAtStep2()
    )
    iterator = iter(loader)
    next(iterator), next(iterator)
    with pytest.raises(errors.BadDataError, match=r"fixture.tsv:7: label 12 not in 0..9"):
        next(iterator)
    iterator.close()


@pytest.mark.slow
def test_two_worker_processes_give_the_in_process_batches_and_resume_across_counts():
    def run(workers: int, start=None, steps=5):
        loader = grain_pipeline.train_loader(
            source(),
            seed=3,
            batch_size=BATCH,
            process_index=1,
            process_count=PROCESSES,
            worker_count=workers,
            batch_transform=AddStep(),
        )
        iterator = iter(loader)
        if start is not None:
            iterator.set_state(start)
        out = [next(iterator) for _ in range(steps)]
        state = iterator.get_state()
        iterator.close()
        return out, state

    in_process, state0 = run(0)
    workers, state2 = run(2)
    assert state2["grain"] is not None and state0["grain"] is None
    for a, b in zip(in_process, workers):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    continued, _ = run(0, state0, 3)
    from_workers, _ = run(2, state2, 3)  # grain's own multi-worker state
    across, _ = run(0, state2, 3)  # saved with 2 workers, resumed with none
    into_workers, _ = run(2, state0, 3)  # saved in process, resumed with 2 workers
    from_version_1, _ = run(2, {**state2, "version": 1}, 3)  # grain's state, as version 1 kept it
    reference, _ = run(0, None, 8)
    for batch_list in (continued, from_workers, across, into_workers, from_version_1):
        assert len(batch_list) == 3
        for a, b in zip(batch_list, reference[5:]):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])


class KilledAtStep:
    """A batch transform whose worker process is killed (SIGKILL, as the out-of-memory killer
    does) while building the batch of ``step``, the first ``times`` times (counted in files:
    each worker is a fresh process). Never kills the process that created it."""

    def __init__(self, step: int, times: int, marks: Path):
        self.step, self.times, self.marks = step, times, marks
        self.creator = os.getpid()

    def __call__(self, batch, step):
        if step == self.step and os.getpid() != self.creator:
            killed = len(list(self.marks.iterdir()))
            if killed < self.times:
                (self.marks / f"kill-{killed}").touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return AddStep()(batch, step)


def batches_of(train_loader, count: int) -> list[dict[str, np.ndarray]]:
    iterator = iter(train_loader)
    out = [next(iterator) for _ in range(count)]
    iterator.close()
    return out


def killed_worker_loader(tmp_path: Path, times: int, workers: int = 2):
    marks = tmp_path / "marks"
    marks.mkdir()
    return grain_pipeline.train_loader(
        source(),
        seed=5,
        batch_size=BATCH,
        worker_count=workers,
        batch_transform=KilledAtStep(3, times, marks),
    )


def test_dead_worker_errors_are_told_apart_from_a_transform_s_own():
    died = RuntimeError(
        "Worker process was terminated unexpectedly with exit code -9. Search the logs above"
    )
    assert grain_pipeline._dead_worker_exit_code(died) == -9
    assert grain_pipeline._dead_worker_exit_code(RuntimeError("bad record 7")) is None
    assert grain_pipeline._dead_worker_exit_code(ValueError(str(died))) is None
    assert grain_pipeline.describe_exit_code(-9) == (
        "exit code -9: killed by SIGKILL, often the kernel's out-of-memory killer (see dmesg)"
    )
    assert grain_pipeline.describe_exit_code(-11) == "exit code -11: killed by SIGSEGV"
    assert grain_pipeline.describe_exit_code(1) == "exit code 1"


@pytest.mark.slow  # worker processes started three times: ~10 s
def test_a_killed_worker_is_replaced_and_the_batches_stay_the_same(tmp_path):
    in_process = grain_pipeline.train_loader(
        source(), seed=5, batch_size=BATCH, batch_transform=AddStep()
    )
    reference = batches_of(in_process, 11)
    iterator = iter(killed_worker_loader(tmp_path, times=1))
    with pytest.warns(grain_pipeline.InputWorkerRestarted) as warned:
        got = [next(iterator) for _ in range(8)]
    assert len(list((tmp_path / "marks").iterdir())) == 1
    message = str(warned[0].message)
    assert re.fullmatch(
        r"an input worker process died \(exit code -9: killed by SIGKILL, often the kernel's "
        r"out-of-memory killer \(see dmesg\)\); starting new workers at step [0-3], the "
        r"batches are the same",
        message,
    ), message
    state = iterator.get_state()
    iterator.close()
    (tmp_path / "again").mkdir()
    resumed = iter(killed_worker_loader(tmp_path / "again", times=0, workers=1))
    resumed.set_state(state)  # the state taken after the restart continues exactly
    got += [next(resumed) for _ in range(3)]
    resumed.close()
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.slow  # worker processes started two or three times: ~8 s
def test_a_worker_that_dies_again_at_once_stops_with_the_reason(tmp_path):
    """Killed at step 3 every time. A kill can also lose the batches the worker had finished
    (grain's queue is fed by a thread of the worker), so the restart that finds no progress
    may be at step 0-3, whichever batch the iterator was waiting for."""
    iterator = iter(killed_worker_loader(tmp_path, times=100, workers=1))
    with pytest.warns(grain_pipeline.InputWorkerRestarted):
        with pytest.raises(
            grain_pipeline.InputWorkerLost,
            match=r"^an input worker process died \(exit code -9: killed by SIGKILL.*\) and, "
            r"restarted at step [0-3], died again before delivering a batch: use fewer worker "
            r"processes or none \(the runner's config.data.workers\)",
        ):
            for _ in range(8):
                next(iterator)
    iterator.close()
    assert len(list((tmp_path / "marks").iterdir())) >= 2


class HungAtStep:
    """A batch transform whose worker process hangs while building the batch of ``step``, the
    first time only (it writes its pid to ``mark``). Never hangs the process that created it."""

    def __init__(self, step: int, mark: Path):
        self.step, self.mark = step, mark
        self.creator = os.getpid()

    def __call__(self, batch, step):
        if step == self.step and os.getpid() != self.creator and not self.mark.exists():
            self.mark.write_text(str(os.getpid()))
            time.sleep(3600)
        return AddStep()(batch, step)


@pytest.mark.slow  # worker processes started twice: ~6 s
def test_workers_killed_on_purpose_are_replaced_without_a_warning(tmp_path):
    """The training loop's step watchdog kills workers that hang, saying so first
    (``expect_worker_kill``, tests/test_launch.py has its logic): the ``next()`` waiting for
    them gets grain's dead-worker error promptly and starts new workers at the same step, with
    no warning of its own (the watchdog's says why), and the batches stay the same."""
    from two_processes import wait_until_gone

    in_process = grain_pipeline.train_loader(
        source(), seed=5, batch_size=BATCH, batch_transform=AddStep()
    )
    reference = batches_of(in_process, 6)
    mark = tmp_path / "hung.pid"
    iterator = iter(
        grain_pipeline.train_loader(
            source(),
            seed=5,
            batch_size=BATCH,
            worker_count=1,
            batch_transform=HungAtStep(3, mark),
        )
    )
    killed_at = []

    def kill_when_hung() -> None:
        while not mark.exists() or not mark.read_text():
            time.sleep(0.05)
        time.sleep(0.5)  # the main thread waits in next() by now
        iterator.expect_worker_kill()
        killed_at.append(time.monotonic())
        for child in multiprocessing.active_children():
            child.kill()

    killer = threading.Thread(target=kill_when_hung, daemon=True)
    killer.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error", grain_pipeline.InputWorkerRestarted)
        got = [next(iterator) for _ in range(6)]
    iterator.close()
    killer.join(1)
    assert killed_at and not killer.is_alive()
    assert wait_until_gone(int(mark.read_text()))
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.slow  # a worker process started: ~5 s
def test_workers_ignore_a_ctrl_c_which_the_training_process_handles():
    """A Ctrl-C at a terminal reaches the whole process group. The workers used to die of it
    (a KeyboardInterrupt traceback each, and an InputWorkerRestarted warning or a lost input
    in the step the training process finishes before saving); they now go on."""
    import multiprocessing
    import warnings

    reference = batches_of(
        grain_pipeline.train_loader(source(), seed=5, batch_size=BATCH, batch_transform=AddStep()),
        6,
    )
    iterator = iter(
        grain_pipeline.train_loader(
            source(), seed=5, batch_size=BATCH, worker_count=1, batch_transform=AddStep()
        )
    )
    got = [next(iterator) for _ in range(2)]
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", grain_pipeline.InputWorkerRestarted)
        got += [next(iterator) for _ in range(4)]
    assert all(worker.is_alive() for worker in workers)
    iterator.close()
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


HOLDS_SHARED_MEMORY = """
import sys
from multiprocessing import shared_memory

import numpy as np

from hgrn_jax.data import grain_pipeline

source = grain_pipeline.ArraySource({"x": np.zeros((4, 1))})
grain_pipeline.train_loader(source, seed=0, batch_size=2, worker_count=1).dataset(0)
memory = shared_memory.SharedMemory(create=True, size=64)  # as a worker's batch built ahead
print(memory.name, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_sigkill_of_the_run_s_process_group_leaves_no_shared_memory_behind():
    """multiprocessing's resource tracker removes the shared memory of a run that died. It ran
    in the run's process group, so a SIGKILL of the group (a run and its input workers) killed
    it too, and the batches the workers had built ahead stayed in /dev/shm for good (37 files
    per kill of a tiny ListOps run with 1 worker; tests/test_kill_resume_workers.py). A loader
    with workers starts it in a session of its own."""
    from two_processes import cpu_env, wait_until_removed

    process = subprocess.Popen(
        [sys.executable, "-c", HOLDS_SHARED_MEMORY],
        env=cpu_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the tracker's note on what it removed
        text=True,
        start_new_session=True,
    )
    try:
        name = process.stdout.readline().strip()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert name.startswith("psm_"), name
    path = Path("/dev/shm") / name
    left = not wait_until_removed(path)  # the tracker removes it once it sees the process gone
    path.unlink(missing_ok=True)
    assert not left, f"{path} left behind"


SHARED_MEMORY_CHILD = """
import atexit
import os

import numpy as np

from hgrn_jax.data import grain_pipeline


def main():
    source = grain_pipeline.ArraySource(
        {"inputs": np.arange(48 * 300).reshape(48, 300), "labels": np.arange(48, dtype=np.int32)}
    )
    iterator = iter(grain_pipeline.train_loader(source, seed=1, batch_size=8, worker_count=1))
    kept = [next(iterator) for _ in range(4)]
    # jax keeps a batch it was given by reference (on CPU) and lets it go at exit, after the
    # iterator is closed and before multiprocessing's own exit handler stops grain's threads.
    atexit.register(kept.clear)
    iterator.close()
    names = [array.shm.name.lstrip("/") for batch in kept for array in batch.values()]
    named = [name for name in names if os.path.exists(os.path.join("/dev/shm", name))]
    print(f"{len(names)} blocks received, {len(named)} still named after close")


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow  # a worker process started in a fresh interpreter: ~8 s
def test_closing_leaves_no_shared_memory_for_the_resource_tracker(tmp_path):
    """grain hands batches over in shared-memory blocks (/dev/shm/psm_*) which the receiving
    array unlinks when garbage-collected, in a thread pool that is stopped at exit: a batch
    still alive then (the last one, which jax holds on CPU) or one whose deletion was still
    queued was left to Python's resource tracker, which warned "There appear to be N leaked
    shared_memory objects" after every run with input workers. The iterator now unlinks each
    block's name when its batch arrives and waits for grain's deletions when it closes."""
    from two_processes import REPO, cpu_env

    script = tmp_path / "child.py"  # a file: worker processes are spawned, re-importing main
    script.write_text(SHARED_MEMORY_CHILD)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=cpu_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "8 blocks received, 0 still named after close", proc.stdout
    assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]

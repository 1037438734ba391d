"""The training input pipeline: grain over prepared random-access data.

A training run reads its batches through :func:`train_loader`: a grain ``MapDataset`` whose
element ``s`` is the process-local batch of step ``s``, read from a random-access source (the
memory-mapped ``.npy`` caches of :func:`hgrn_jax.data.loader.load_arrays`, the array_record
columns of :func:`hgrn_jax.data.tfds_builders.open_split`, ImageNet's tfds records) and
transformed, in ``worker_count`` grain worker processes when > 0 (``mp_prefetch``) or in the
calling process when 0.

Which records a batch holds (:func:`hgrn_jax.data.loader.train_rows`): epoch ``e`` visits the
records in the order ``np.random.default_rng((seed, e)).permutation(n)``; step ``s`` takes the
global batch ``s mod (n // B)`` of epoch ``s // (n // B)`` (the last partial batch of an epoch is
dropped), and process ``p`` of ``P`` reads only its ``B / P`` records of it, so every example is
read exactly once per epoch over all processes and the global batch does not depend on ``P``.
With ``repeats`` k > 1 (repeated augmentation) the epoch's permutation is read with each record
k times in a row, still ``n // B`` batches an epoch (:func:`hgrn_jax.data.loader.train_rows`).
The order is computed for a whole batch at once (one permutation per epoch) rather than with
grain's per-record index shuffle, which costs about 50 us per record in Python (measured:
``benchmarks/input.py``), ten times the rest of an LRA batch.

Because element ``s`` is a pure function of ``s`` (random augmentations draw from ``(seed, s)``,
:func:`hgrn_jax.data.loader.batch_rng`), the batches do not depend on the number of worker
processes, and with none (``worker_count`` 0) the iterator reads the dataset by random access:
it calls the function grain maps over the steps for step ``s`` directly (:meth:`TrainLoader.batch`)
instead of going through grain's machinery, which costs 20-30 us per element through
``to_iter_dataset`` and about 8 us through ``MapDataset.__getitem__`` (``benchmarks/input.py``,
``grain_overhead``), more than the whole memory-mapped read of a small batch. With workers,
grain's ``mp_prefetch`` builds the batches of upcoming steps in worker processes.

The iterator's state (:meth:`TrainIterator.get_state`, a small JSON-able dict) is saved with each
checkpoint and restored on resume: in-process it is the next step; with workers it also holds
grain's own iterator state, restored when the worker count is the same (version 1 of the format
kept grain's state without workers too; it is read as well). A state saved with another worker
count, or none at all (older checkpoints), positions the pipeline at the saved step directly
(``ds[step:]``), which is exact too.

A worker process killed by a signal (the kernel's out-of-memory killer, a crash in a decoder)
does not end the run: the iterator warns (:class:`InputWorkerRestarted`), starts new workers at
the step whose batch it was waiting for and goes on with the same batches. A worker killed
again before one batch arrives, or one that exits by itself (it failed to start: its error is
printed above), is not transient: that stops the iterator with :class:`InputWorkerLost`. Workers
that hang are killed by their caller (the training loop's step watchdog), who says so first
(:meth:`TrainIterator.expect_worker_kill`): the iterator then starts new ones without a warning
of its own. The other way round, the training process killed alone (the out-of-memory killer
kills one process, not its group): its workers see it gone within half a second and exit
(:func:`_worker_start`), instead of staying under PID 1 with their memory for good, and the
resource tracker (:func:`_resource_tracker_in_its_own_session`) then removes the batches they
had built ahead and exits too.

Shared memory: a worker hands each batch array over in a shared-memory block (grain's
``SharedMemoryArray``, a ``/dev/shm/psm_*`` file registered with Python's multiprocessing
resource tracker), and grain unlinks the block's name only when the array is garbage-collected,
in a background thread pool. Arrays still alive when the interpreter exits (the last batch, which
jax on CPU keeps by reference) or whose deletion was still queued when that pool was stopped at
exit were never unlinked, and the resource tracker warned "There appear to be N leaked
shared_memory objects" at every exit. So the iterator unlinks each block's name as soon as the
batch arrives (:func:`_unlink_shared_memory`: the mapping stays valid and the memory is freed
when the array is, as before), and :meth:`TrainIterator.close` waits for grain's pending
deletions of the batches the workers had prefetched.

Explicit arguments only: this module knows nothing of experiment configs.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from hgrn_jax.data import loader

STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
"""Version 1 (grain's iterator state for every worker count) is still restored exactly."""
_LAST_STEP = 2**62  # the step dataset is endless in practice
_WORKER_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")
"""grain's RuntimeError for a worker process that died (grain 0.2.18, pinned)."""


class InputWorkerRestarted(UserWarning):
    """A grain worker process died and the iterator started new ones at the same step."""


class InputWorkerLost(RuntimeError):
    """A grain worker process exited by itself, or was killed again before delivering a batch
    after a restart."""


def _unlink_shared_memory(tree: Any) -> None:
    """Unlink the names of the shared-memory blocks behind the arrays of ``tree`` (a batch from
    grain's workers): their memory stays mapped and is freed when the arrays are.

    grain (0.2.18, pinned) gives the receiving process's ``SharedMemoryArray`` the job of
    unlinking the block when it is garbage-collected (``_unlink_on_del``), which may be never
    before the interpreter exits; done here at once, it then only closes its mapping. The name
    is needed by nobody after the arrival (the worker closed its mapping when it queued the
    batch), so a batch must not be pickled by shared-memory name to another process after it.
    """
    if isinstance(tree, dict):
        for value in tree.values():
            _unlink_shared_memory(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _unlink_shared_memory(value)
    elif getattr(tree, "_unlink_on_del", False) and hasattr(tree, "shm"):
        tree.shm.unlink()  # also unregisters it from the resource tracker
        tree._unlink_on_del = False


def _wait_for_shared_memory_deletions(timeout_s: float = 10.0) -> None:
    """Wait until grain's background deletions of shared-memory arrays are done.

    grain (0.2.18, pinned) closes and unlinks a garbage-collected ``SharedMemoryArray`` in a
    one-thread pool; closing a grain iterator drops the batches it had prefetched, whose unlinks
    are then queued there, and the pool is stopped at interpreter exit without running what is
    left (each left a name for the resource tracker to unlink and warn about). A task queued
    after them runs after them (one thread, first in first out).
    """
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is None or sys.is_finalizing():
        return
    try:
        pool.apply_async(int).wait(timeout_s)
    except ValueError:  # the pool is stopped already (interpreter exit)
        pass


def describe_exit_code(code: int) -> str:
    """``-9`` -> ``"exit code -9: killed by SIGKILL, ..."``: how a worker process ended."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"exit code {code}"
    why = ", often the kernel's out-of-memory killer (see dmesg)" if name == "SIGKILL" else ""
    return f"exit code {code}: killed by {name}{why}"


def _dead_worker_exit_code(error: BaseException) -> int | None:
    """The exit code in grain's error for a worker process that died; None for other errors
    (an exception raised by a transform inside a worker reaches us as itself)."""
    match = _WORKER_DIED.search(str(error)) if type(error) is RuntimeError else None
    return None if match is None else int(match.group(1))


class BatchSource(Protocol):
    """What :func:`train_loader` reads: ``len`` records and ``read(rows)`` -> a batch dict of
    arrays with leading dimension ``len(rows)``; picklable when read in worker processes."""

    def __len__(self) -> int: ...

    def read(self, rows: np.ndarray) -> dict[str, Any]: ...


class ArraySource:
    """Same-length arrays or array-likes read by rows: ``len``, ``source[i]``, ``read(rows)``.

    ``name`` (e.g. the prepared folder) identifies the data in ``repr``, which is compared with
    a saved iterator state's when resuming. Memory-mapped ``.npy`` arrays are pickled as their
    file names (a worker process maps the file again instead of receiving a copy); a slice of
    one travels by value (:func:`~hgrn_jax.data.loader.npy_file_of`).
    """

    def __init__(self, arrays: Mapping[str, Any], name: str = ""):
        self.name = name
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            of = f" of {name}" if name else ""
            raise ValueError(
                f"the arrays of a source{of} must have one row per example; got the lengths "
                f"{lengths}"
            )
        self.arrays = dict(arrays)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        columns = ", ".join(
            f"{key}: {np.dtype(getattr(value, 'dtype', 'O'))}"
            f"{tuple(np.shape(value[0])) if self._length else ()}"
            for key, value in self.arrays.items()
        )
        return f"ArraySource({self.name!r}, {self._length} rows, {columns})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: np.asarray(value[index]) for key, value in self.arrays.items()}

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{key: array (len(rows), ...)}`` of the records at ``rows`` (one fancy index)."""
        return {key: np.asarray(value[rows]) for key, value in self.arrays.items()}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["arrays"] = {
            key: ("npy-file", file) if (file := loader.npy_file_of(value)) else value
            for key, value in self.arrays.items()
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["arrays"] = {
            key: np.load(value[1], mmap_mode="r")
            if isinstance(value, tuple) and value[:1] == ("npy-file",)
            else value
            for key, value in state["arrays"].items()
        }
        self.__dict__.update(state)


class _StepBatch:
    """grain ``map`` over step numbers: the process-local batch of a step (picklable)."""

    def __init__(
        self,
        source: BatchSource,
        seed: int,
        batch_size: int,
        process_index: int,
        process_count: int,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None,
        batch_transform: Callable[[dict[str, Any], int], dict[str, Any]] | None,
        repeats: int = 1,
    ):
        self.source, self.seed, self.batch_size = source, seed, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.transform, self.batch_transform = transform, batch_transform
        self.repeats = repeats

    def __call__(self, step: int) -> dict[str, Any]:
        step = int(step)
        rows = loader.train_rows(
            self.seed,
            step,
            len(self.source),
            self.batch_size,
            self.process_index,
            self.process_count,
            self.repeats,
        )
        batch = self.source.read(rows)
        if self.transform is not None:
            records = [
                self.transform({k: v[i] for k, v in batch.items()}) for i in range(len(rows))
            ]
            batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
        if self.batch_transform is not None:
            batch = self.batch_transform(batch, step)
        return batch


_TRACKERS: list[subprocess.Popen] = []
"""The resource tracker this process started (:func:`_resource_tracker_in_its_own_session`)."""


def _resource_tracker_in_its_own_session() -> None:
    """Start multiprocessing's resource tracker, unless running, in a session of its own.

    The tracker removes the shared memory and semaphores of grain's workers (the batches they
    built ahead) once the run's processes are gone. Started in the run's process group, it died
    with a SIGKILL of the group (``kill -9 -PGID``, a scheduler stopping the run and its
    workers), which left them in ``/dev/shm`` for good: 37 files per kill of a tiny ListOps run
    with 1 worker, up to ``4 x workers`` batches (gigabytes for ImageNet). Outside the group it
    outlives such a kill, sees the run's end (its pipe closes) and removes them, then exits.
    """
    from multiprocessing import resource_tracker, util

    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_fd", None) is not None:  # running: started before, or inherited
        return
    spawnv_passfds = util.spawnv_passfds

    def in_its_own_session(path: str, args: list[str], passfds: tuple[int, ...]) -> int:
        process = subprocess.Popen(args, executable=path, pass_fds=passfds, start_new_session=True)
        _TRACKERS.append(process)  # its exit is not ours to wait for (nor to warn about)
        return process.pid

    util.spawnv_passfds = in_its_own_session
    try:
        tracker.ensure_running()
    finally:
        util.spawnv_passfds = spawnv_passfds


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app, take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


_PARENT_POLL_S = 0.5
"""How often a worker looks whether the process that started it is still there."""


def _worker_start(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """Each worker's start (grain's ``worker_init_fn``, called with the worker's index and
    count; ``parent_pid`` is the training process's, bound when the dataset was built).

    A Ctrl-C at a terminal reaches the whole process group, and the training process decides
    when its workers stop (after the step and its checkpoint), so a worker ignores SIGINT (it
    used to die with a KeyboardInterrupt traceback); so is SIGHUP, which a shell sends to its
    jobs when its terminal closes (the training process saves and stops).

    A worker also ends by itself (``os._exit``) within :data:`_PARENT_POLL_S` of the training
    process's death. The kernel's out-of-memory killer kills one process, not its group: a
    SIGKILL of the training process alone left its workers running under PID 1 for good, with
    their memory, each such kill making the next likelier. A daemon thread compares
    ``os.getppid()`` with ``parent_pid`` every half second (a worker busy in C code that
    releases the GIL, or blocked on its queue, still runs it). Not ``prctl(PR_SET_PDEATHSIG)``:
    it fires when the *thread* that forked the child exits, and grain (0.2.18, pinned) starts
    each worker from a background thread of its own (a ``ThreadPrefetchDatasetIterator`` that
    makes the interleaved per-worker iterators; seen: not the main thread), which ends when the
    iterators are made or the iterator is closed, while the training process lives on: that
    would kill healthy workers.
    """
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.getppid() != parent_pid:  # gone before this worker got this far
        os._exit(1)

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        # Nobody reads this worker's batches any more; the blocks it built ahead are
        # registered with the resource tracker, which removes them once its users are gone.
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="exit-when-orphaned", daemon=True).start()


class TrainLoader:
    """The training batches of one process; ``iterator(start_step)`` (or ``iter``) reads them.

    See :func:`train_loader` for the arguments.
    """

    def __init__(
        self,
        source: BatchSource,
        *,
        seed: int,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int = 0,
        transform: Callable | None = None,
        batch_transform: Callable | None = None,
        worker_buffer_size: int = 1,
        repeats: int = 1,
    ):
        loader.process_slice(batch_size, process_index, process_count)  # validates
        if len(source) < batch_size:
            raise ValueError(
                f"{len(source)} training records are fewer than batch_size {batch_size}; "
                "lower the batch size"
            )
        if worker_count < 0:
            raise ValueError(f"worker_count {worker_count} must be >= 0 (0: no worker processes)")
        if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
            raise ValueError(f"repeats {repeats} must be a whole number >= 1 (1: no repeats)")
        self.source = source
        self.repeats = int(repeats)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.worker_count = int(worker_count)
        self.worker_buffer_size = int(worker_buffer_size)
        self._batch = _StepBatch(
            source,
            self.seed,
            self.batch_size,
            self.process_index,
            self.process_count,
            transform,
            batch_transform,
            self.repeats,
        )

    def describe(self) -> str:
        """What a saved state must match: the data, the order and this process's share."""
        repeats = f", each record {self.repeats} times" if self.repeats > 1 else ""
        return (
            f"{self.source!r}; seed {self.seed}, batch_size {self.batch_size}{repeats}, process "
            f"{self.process_index} of {self.process_count}"
        )

    def batch(self, step: int) -> dict[str, Any]:
        """The process-local batch of ``step`` (a pure function of it), read in this process:
        element ``step`` of the grain ``MapDataset`` that :meth:`dataset` iterates."""
        return self._batch(step)

    def dataset(self, start_step: int):
        """The grain ``IterDataset`` of the batches of steps ``start_step, ...`` (read in
        ``worker_count`` worker processes when > 0; iterate it in this process: its workers
        exit unless their parent is the process that built it, :func:`_worker_start`)."""
        import grain

        ds = grain.MapDataset.range(int(start_step), _LAST_STEP).map(self._batch)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.worker_count > 0:
            _absl_flags_parsed()
            _resource_tracker_in_its_own_session()
            ds = ds.mp_prefetch(
                grain.multiprocessing.MultiprocessingOptions(
                    num_workers=self.worker_count,
                    per_worker_buffer_size=self.worker_buffer_size,
                ),
                worker_init_fn=functools.partial(_worker_start, os.getpid()),
            )
        return ds

    def iterator(self, start_step: int = 0) -> TrainIterator:
        return TrainIterator(self, int(start_step))

    def __iter__(self) -> TrainIterator:
        return self.iterator(0)


class TrainIterator:
    """Endless process-local training batches with a saveable position.

    With ``worker_count`` 0 it reads step after step by random access (:meth:`TrainLoader.batch`);
    with workers it iterates grain's multi-process dataset (:meth:`TrainLoader.dataset`).
    ``get_state()`` -> a JSON-able dict (the next step, grain's iterator state when there are
    workers, and what the state belongs to); ``set_state(state)`` continues exactly where that
    state was taken.
    """

    def __init__(self, train_loader: TrainLoader, start_step: int):
        self.loader = train_loader
        self._kill_expected = False
        self._open(start_step)

    @property
    def in_process(self) -> bool:
        return self.loader.worker_count == 0

    def _open(self, start_step: int, grain_state: dict | None = None) -> None:
        self.close()
        self.base = self.next_step = int(start_step)
        self._restarted_without_a_batch = False
        if not self.in_process:
            self._iterator = iter(self.loader.dataset(start_step))
            if grain_state is not None:
                self._iterator.set_state(grain_state)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.in_process:
            batch = self.loader.batch(self.next_step)
        elif self._iterator is None:
            raise RuntimeError("the training iterator is closed; open a new one")
        else:
            batch = self._next_from_workers()
        self.next_step += 1
        return batch

    def _next_from_workers(self) -> dict[str, Any]:
        """The next batch from grain's workers; new workers at the same step when one died."""
        try:
            batch = next(self._iterator)
        except RuntimeError as error:
            code = _dead_worker_exit_code(error)
            if code is None:
                raise
            if self._kill_expected:
                self._kill_expected = False
                return self._restart()
            how = describe_exit_code(code)
            if code >= 0:  # not killed: it failed to start or exited, which a restart repeats
                raise InputWorkerLost(
                    f"an input worker process ended ({how}) before delivering the batch of "
                    f"step {self.next_step}; its own error is printed above"
                ) from error
            if self._restarted_without_a_batch:
                raise InputWorkerLost(
                    f"an input worker process died ({how}) and, restarted at step "
                    f"{self.next_step}, died again before delivering a batch: use fewer worker "
                    "processes or none (the runner's config.data.workers), or a smaller batch "
                    "if memory ran out; the run's checkpoints are kept, and rerunning resumes"
                ) from error
            warnings.warn(
                f"an input worker process died ({how}); starting new workers at step "
                f"{self.next_step}, the batches are the same",
                InputWorkerRestarted,
                stacklevel=3,
            )
            return self._restart()
        self._restarted_without_a_batch = False
        _unlink_shared_memory(batch)
        return batch

    def _restart(self) -> dict[str, Any]:
        """New workers at the step whose batch was awaited; that batch from them."""
        self._open(self.next_step)
        self._restarted_without_a_batch = True
        return self._next_from_workers()

    def expect_worker_kill(self) -> None:
        """Say, from another thread, that this iterator's worker processes are about to be
        killed on purpose (a watchdog that saw no batch for too long, and said so): the
        dead-worker error that the waiting ``next()`` then gets starts new workers at the same
        step, with no warning. A restart that delivered no batch yet does not prevent it (the
        caller decides how often it kills); a worker killed otherwise before the new workers
        deliver a batch stops the iterator as after any restart (:class:`InputWorkerLost`)."""
        self._kill_expected = True

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "next_step": self.next_step,
            "base_step": self.base,
            "worker_count": self.loader.worker_count,
            "pipeline": self.loader.describe(),
            "grain": None if self._iterator is None else self._iterator.get_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state` of the same pipeline, this version
        or version 1).

        Raises ValueError when it belongs to other data, another order or another process's
        share. A state taken with another worker count, or in process, resumes at its step
        (exact as well: a batch is a function of its step)."""
        if state.get("version") not in READABLE_STATE_VERSIONS or "next_step" not in state:
            raise ValueError(f"not an input-pipeline state of this version: {dict(state)!r:.200}")
        if state["pipeline"] != self.loader.describe():
            raise ValueError(
                "the saved input-pipeline state belongs to other data or settings: saved for "
                f"{state['pipeline']}; now {self.loader.describe()}"
            )
        same_workers = state["worker_count"] == self.loader.worker_count
        if same_workers and not self.in_process and state.get("grain") is not None:
            self._open(state["base_step"], state["grain"])
            self.next_step = int(state["next_step"])
        else:
            self._open(state["next_step"])

    def close(self) -> None:
        """Stop the worker processes (also done when the iterator is garbage-collected) and
        release the shared memory of the batches they had prefetched."""
        iterator = getattr(self, "_iterator", None)
        self._iterator = None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()
            _wait_for_shared_memory_deletions()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: grain's modules may be gone already
            pass


def train_loader(
    source: BatchSource,
    *,
    seed: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    batch_transform: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    worker_buffer_size: int = 1,
    repeats: int = 1,
) -> TrainLoader:
    """The endless process-local training batches of ``source`` (see the module docstring).

    ``batch_size`` is the global batch; each of the ``process_count`` processes reads its
    ``batch_size / process_count`` records of every global batch. ``transform`` maps each record
    (a dict of arrays), ``batch_transform(batch, step)`` the process-local batch; both run in the
    ``worker_count`` worker processes when it is > 0, so they must then be picklable. Each
    worker builds whole batches (every ``worker_count``-th step) and holds up to
    ``worker_buffer_size`` finished ones plus the one it is handing over, and the calling
    process's reader thread of that worker (grain's interleave, with a buffer of the same size)
    as many again, so up to about ``2 * worker_count * (worker_buffer_size + 1)`` batches sit
    in shared memory (measured: 4.1 batches with 1 worker, 8.2 with 2, for a slow consumer;
    grain's default buffer of 1: a buffer only absorbs pauses of the consumer).
    ``repeats`` > 1 reads each record of an epoch's order that many times in a row (repeated
    augmentation: the copies sit at different positions of the batches, so ``batch_transform``
    draws their augmentations apart). ``iter(loader)`` starts at step 0, ``loader.iterator(s)``
    at step ``s``.
    """
    return TrainLoader(
        source,
        seed=seed,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        transform=transform,
        batch_transform=batch_transform,
        worker_buffer_size=worker_buffer_size,
        repeats=repeats,
    )


def resolve_worker_count(value: int, config_key: str = "data.workers") -> int:
    """``-1`` -> one worker process per CPU of this host; other whole numbers >= 0 as given.

    Raises a ValueError naming ``config_key`` for anything else (-2 had meant one per CPU too).
    """
    if isinstance(value, bool) or not float(value).is_integer() or value < -1:
        raise ValueError(
            f"config.{config_key}={value} must be a whole number >= 0, or -1 (one worker "
            f"process per CPU); set --config.{config_key}"
        )
    value = int(value)
    return (os.cpu_count() or 1) if value == -1 else value

"""Orbax checkpoints of a run: asynchronous saves, the latest N and the best kept, safe resume.

Each checkpoint is a step folder with the items ``state`` (the train state's arrays, restored
directly into their shardings), ``meta`` (JSON: the next step and run bookkeeping) and, when the
task's training iterator has one, ``input``: the input pipeline's state, one JSON file per
process (``input/process_<i>-of-<n>.json``, written by grain's Orbax handler; process ``i``
restores its own, :meth:`Checkpoints.input_state`), and ``config`` (JSON: a copy of the run's
``config.json``, from which a lost or unreadable one is rebuilt:
:func:`hgrn_jax.training.workdir.config_copy`). Checkpoints of older code may lack ``input``
and ``config``; the loop then positions the input at the saved step. Checkpoints saved after an
evaluation carry the validation metric, and the one with the best value is kept besides the
latest ``keep`` ones.

Restoring never deletes. Once Orbax has committed a step saved by this :class:`Checkpoints`,
its files' checksums are recorded (:mod:`hgrn_jax.training.integrity`; the loop asks after each
step, :meth:`Checkpoints.record_finished`); a step folder found on disk without them (older
code, or a run killed between the commit and the checksums) is never
certified afterwards, since its bytes may have changed since. On restore a checkpoint is
classified:

- damaged (missing or truncated files, a failed checksum, or, without checksums, a failed
  restore): moved into ``<directory>.damaged/<step>`` with a :class:`CheckpointFallbackWarning`,
  and the next older one is tried;
- unreadable for another reason (permissions, I/O): :class:`CheckpointUnreadableError`;
- holding other array names/shapes/dtypes than the new model and optimizer:
  :class:`CheckpointMismatchError`. In the last two cases nothing is touched.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from hgrn_jax.data.loader import is_out_of_space, says_out_of_space
from hgrn_jax.training import agreement, integrity
from hgrn_jax.training.integrity import (
    MANIFEST,
    CheckpointError,
    CheckpointUnreadableError,
    DamagedCheckpointError,
)
from hgrn_jax.training.workdir import CONFIG_ITEM

__all__ = [
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointUnreadableError",
    "CheckpointUnverifiedWarning",
    "Checkpoints",
    "DamagedCheckpointError",
    "NoUsableCheckpointError",
]


def _drop_untracked_metric_notice(record: logging.LogRecord) -> bool:
    # Orbax warns on every save without metrics once a metric is tracked; ours are deliberate
    # (periodic checkpoints between evaluations).
    return not str(record.msg).startswith("Requested `tracked_metric`")


logging.getLogger("absl").addFilter(_drop_untracked_metric_notice)


def _out_of_space_somewhere(error: BaseException | None) -> bool:
    return any(is_out_of_space(e) for e in error_chain(error))


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and those it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _from_orbax_or_asyncio(record: logging.LogRecord) -> bool:
    """An error record of Orbax's, or of asyncio's (an Orbax read's or write's future, its
    exception never retrieved)."""
    ours = record.name == "asyncio" or "orbax" in Path(record.pathname).parts
    return record.levelno >= logging.ERROR and ours


def _is_echo_of_a_full_disk(record: logging.LogRecord) -> bool:
    """An error record of Orbax's or asyncio's about a write that failed for lack of space (in
    its message, the exception it logs, or one that exception was raised from)."""
    logged = record.exc_info[1] if record.exc_info else None
    return _from_orbax_or_asyncio(record) and bool(_of_a_full_disk(logged, record.getMessage()))


def _of_a_full_disk(error: BaseException | None, text: str) -> bool | None:
    return _out_of_space_somewhere(error) or says_out_of_space(text) or None


def _is_closed_loop_callback(unraisable) -> bool:
    """asyncio's ``RuntimeError: Event loop is closed`` from ``call_soon_threadsafe``: a read or
    write finishing after the event loop of the operation that failed had closed."""
    error, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
    return (
        isinstance(error, RuntimeError)
        and str(error) == "Event loop is closed"
        and any(f.name == "call_soon_threadsafe" and "asyncio" in f.filename for f in frames)
    )


LATE_CALLBACK = "late callback"
"""What :class:`Echoes` holds an ``Event loop is closed`` error (:func:`_is_closed_loop_callback`)
as: it names no file, so whatever explains the failed operation explains it."""


class Echoes:
    """A filter for the echoes of a failure that a command reports in one line of its own:
    Orbax's and asyncio's error records (each thread of a failed read or write logs it, with a
    traceback) and unraisable errors (its coroutines' and futures' exceptions, never retrieved)
    that ``echo_of(error, text)`` names (``error``: the exception logged, if any; ``text``: the
    message), and asyncio's ``Event loop is closed`` errors (:data:`LATE_CALLBACK`, from reads
    or writes finishing after the failed operation's event loop closed).

    ``echo_of`` returns what explains the echo (e.g. the checkpoint being read), or None for
    any other record, which passes. With ``conclusive`` the echoes ``echo_of`` names are
    dropped at once (the failure explains itself); otherwise they are held, with the late
    callbacks, until :meth:`release` says which are explained: those are left out, the others
    shown as they would have been. Active between :meth:`install` and :meth:`uninstall`."""

    HELD_AT_MOST = 100

    def __init__(
        self, echo_of: Callable[[BaseException | None, str], Hashable | None], conclusive: bool
    ):
        self.echo_of = echo_of
        self.conclusive = conclusive
        self.seen = False  # whether echo_of named an echo
        self.held: list[tuple[Hashable, logging.LogRecord | Any]] = []
        self.shown: Any = None  # the unraisable hook before ours
        self.active = False

    def install(self) -> None:
        for logger in ("absl", "asyncio"):
            logging.getLogger(logger).addFilter(self.keep_record)
        self.shown = _past_ended_filters(sys.unraisablehook)
        sys.unraisablehook = self.unraisable
        self.active = True

    def uninstall(self) -> None:
        """Stop filtering. The unraisable hook before ours is put back where ours is still the
        hook; where another was installed over it since (two loads in two threads, ended in
        the order they began), ours stays in that chain, passing everything on, until the
        filter over it ends and puts back the hook before both."""
        self.active = False
        for logger in ("absl", "asyncio"):
            logging.getLogger(logger).removeFilter(self.keep_record)
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = _past_ended_filters(self.shown)

    def keep_record(self, record: logging.LogRecord) -> bool:
        logged = record.exc_info[1] if record.exc_info else None
        what = self.echo_of(logged, record.getMessage()) if _from_orbax_or_asyncio(record) else None
        if what is None:
            return True
        self._hold(what, record)
        return False

    def unraisable(self, unraisable: Any) -> None:
        if not self.active:
            self.shown(unraisable)
            return
        what = self.echo_of(unraisable.exc_value, unraisable.err_msg or "")
        if what is None and _is_closed_loop_callback(unraisable):
            what = LATE_CALLBACK
        if what is None:
            self.shown(unraisable)
        else:
            self._hold(what, unraisable)

    def _hold(self, what: Hashable, echo: logging.LogRecord | Any) -> None:
        if what != LATE_CALLBACK:
            self.seen = True
            if self.conclusive:
                return
        if len(self.held) < self.HELD_AT_MOST:
            self.held.append((what, echo))

    def release(self, explained: Callable[[Hashable], bool]) -> None:
        """Leave out the held echoes whose cause is ``explained``; show the others (a record
        to its logger's handlers, an unraisable error to the hook before ours)."""
        held, self.held = self.held, []
        for what, echo in held:
            if explained(what):
                continue
            if isinstance(echo, logging.LogRecord):
                logging.getLogger(echo.name).callHandlers(echo)
            else:
                self.shown(echo)


def _past_ended_filters(hook: Any) -> Any:
    """``hook``, or the first hook chained below it that is not an ended :class:`Echoes`'s."""
    while isinstance(owner := getattr(hook, "__self__", None), Echoes) and not owner.active:
        hook = owner.shown
    return hook


def quiet_echoes_of_a_full_disk() -> None:
    """For a command that reports a save that failed for lack of space in one line
    (:func:`hgrn_jax.training.workdir.out_of_space`): Orbax's error logs of the same failure
    (each thread of the save logs it with a traceback) and asyncio's ``Event loop is closed``
    from its writes still finishing are left out (:class:`Echoes`). A 2 MB tmpfs filled at a
    save printed 1,079 lines above the one-line error. Other Orbax errors are shown, and so are
    the ``Event loop is closed`` errors (at exit) of a process that saw no full disk."""
    echoes = Echoes(_of_a_full_disk, conclusive=True)
    echoes.install()
    atexit.register(lambda: echoes.release(lambda what: echoes.seen))


INPUT_ITEM = "input"

REPLICA_PARALLEL_MIN_BYTES = 1 << 20
"""Arrays whose replicated shards split into slices smaller than this are saved by one replica.

Orbax's replica-parallel saving has every replica of a replicated shard write a slice of it (so
more hosts write at once), at the price of one compiled slicing program per array shape and
sharding in every process: a tiny ListOps run compiled 76 of them, a fifth of its CPU time.
Below this size writing is latency-bound and the split buys nothing; larger arrays (the
replicated parameters of the paper configurations) are still written in parallel. Saving from
one replica is Orbax's own path (its default on GPUs): each distinct shard is written once, by
the process that holds its replica 0, so a multi-host checkpoint stays complete and the format
is unchanged (checkpoints restore either way)."""


class _InputState:
    """A snapshot of an iterator state in the shape grain's Orbax handler saves and restores
    (``get_state`` / ``set_state`` of JSON bytes), taken when the save starts."""

    def __init__(self, state: bytes = b""):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


class CheckpointFallbackWarning(RuntimeWarning):
    """A checkpoint was damaged: it was moved aside and an older one is used instead."""


class CheckpointUnverifiedWarning(RuntimeWarning):
    """A checkpoint without recorded checksums is restored unverified."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's arrays do not fit the model/optimizer built from the new config."""


class NoUsableCheckpointError(CheckpointError):
    """Every checkpoint of the run was damaged (all moved aside): the run does not start again
    from step 0 over its own history unless asked to (``--config.resume=restart``)."""


# Failures of a restore that say nothing of its files (memory, a service, a cancelled read):
# a checkpoint without checksums that fails so is kept, not moved aside as damaged.
NOT_DAMAGE_MARKERS = (
    "RESOURCE_EXHAUSTED",
    "out of memory",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
)


def _not_damage(failure: BaseException | None, text: str) -> bool:
    """Whether a restore's ``failure`` (``text``: its one-line message) is of the machine, not
    of the checkpoint's files."""
    if failure is None:
        return False
    if isinstance(failure, MemoryError):
        return True
    lowered = text.lower()
    return any(marker.lower() in lowered for marker in NOT_DAMAGE_MARKERS)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def array_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``"params/embed/embedding" -> (shape, dtype)`` of every array leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def best_of(
    metrics_by_step: Mapping[int, Mapping[str, float] | None], metric: str, mode: str
) -> int | None:
    """The step whose saved ``metric`` is best (``mode`` "max" or "min"), or None when no step
    has it. On ties the later step wins, as in Orbax's BestN policy, so the step returned is
    one that was kept."""
    scored = [
        (step, m[metric]) for step, m in metrics_by_step.items() if m is not None and metric in m
    ]
    if not scored:
        return None
    return max(scored, key=lambda item: (ranking_score(item[1], mode), item[0]))[0]


def ranking_score(value: float, mode: str) -> float:
    """``value`` as a score to maximise (``mode`` "max" or "min"), a NaN (a diverged
    evaluation) the worst of all: compared as it is, a NaN at the first evaluation stayed the
    best checkpoint whatever came after (no comparison with it is true)."""
    value = float(value)
    if math.isnan(value):
        return -math.inf
    return value if mode == "max" else -value


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
    """Orbax's default type handlers (every type of ``supported_types()`` with the handler Orbax
    registered for it), jax.Array's with :data:`REPLICA_PARALLEL_MIN_BYTES`."""
    # The array metadata store is what Orbax's default jax.Array handler writes with (the
    # ``array_metadatas`` folder); it has no public name.
    from orbax.checkpoint._src.metadata import array_metadata_store

    handlers = []
    for kind in ocp.type_handlers.supported_types():
        handler = ocp.type_handlers.get_type_handler(kind)
        if kind is jax.Array:
            handler = ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
                array_metadata_store=array_metadata_store.Store(),
            )
        handlers.append((kind, handler))
    return ocp.type_handlers.create_type_handler_registry(*handlers)


class _StateHandler(ocp.StandardCheckpointHandler):
    """Orbax's StandardCheckpointHandler (same files) with :func:`_type_handlers`.

    StandardCheckpointHandler takes no type-handler registry; it delegates to the
    PyTreeCheckpointHandler in ``_impl``, which does. tests/test_checkpoint_save.py checks that
    the replacement takes effect."""

    def __init__(self):
        super().__init__()
        self._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96,  # StandardCheckpointHandler's defaults
            restore_concurrent_gb=96,
            type_handler_registry=_type_handlers(),
        )


# Orbax finds an item's handler from the class of its arguments.
@ocp.args.register_with_handler(_StateHandler, for_save=True)
class _StateSave(ocp.args.StandardSave):
    pass


@ocp.args.register_with_handler(_StateHandler, for_restore=True)
class _StateRestore(ocp.args.StandardRestore):
    pass


DAMAGED_INSIDE = "damaged"
"""The folder inside ``checkpoints/`` for damaged checkpoints where ``checkpoints.damaged/``
would be on another file system (:attr:`Checkpoints.damaged_directory`)."""


def _device(path: Path) -> int:
    """The file system ``path`` (followed if a link) lies on."""
    return os.stat(path).st_dev


# Every entry Orbax and this module write at the top of a step folder (the items, Orbax's
# metadata and commit marker, the checksums).
CHECKPOINT_ENTRIES = frozenset(
    {
        "_CHECKPOINT_METADATA",
        "commit_success.txt",
        "descriptor",
        "metrics",
        "state",
        "meta",
        CONFIG_ITEM,
        INPUT_ITEM,
        MANIFEST,
    }
)


def check_step_folders(directory: Path) -> None:
    """CheckpointError unless every step-numbered folder in ``directory`` holds only what a
    checkpoint of a run writes (:data:`CHECKPOINT_ENTRIES`; an empty or partly deleted one is
    a checkpoint the keep policy was removing). Orbax takes any numbered folder for a step, and
    its keep policy deletes it whole: a user's ``checkpoints/1/notes.txt`` was deleted at the
    run's next save."""
    if not directory.is_dir():
        return
    for folder in sorted(directory.iterdir()):
        if not (folder.name.isdigit() and folder.is_dir()):
            continue
        foreign = sorted(
            entry.name
            for entry in folder.iterdir()
            # integrity.json.tmp: a checksum file whose writing was cut short
            if entry.name not in CHECKPOINT_ENTRIES and not entry.name.startswith(MANIFEST)
        )
        if foreign:
            raise CheckpointError(
                f"{folder} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, "
                "which no checkpoint of a run writes, and the keep policy would delete it with "
                "the folder; nothing was changed. Move that folder out of "
                f"{directory} and run again"
            )


class Checkpoints:
    """A run's checkpoint folder.

    Args:
      directory: the folder (created if absent).
      keep: how many of the latest checkpoints to keep.
      best_metric: the metrics key that ranks checkpoints (e.g. ``"val_accuracy"``); the best
        checkpoint is kept in addition to the latest ``keep``.
      best_mode: ``"max"`` or ``"min"`` (for perplexity).
      async_save: write in a background thread (the arrays are copied off the devices first,
        so training continues at once and may donate the state's buffers).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', not {best_mode!r}")
        self.directory = Path(directory).absolute()
        check_step_folders(self.directory)
        self.best_metric, self.best_mode = best_metric, best_mode
        keep_policies: list[Any] = [policies.LatestN(n=max(int(keep), 1))]
        if best_metric is not None:
            keep_policies.append(
                policies.BestN(
                    # Largest is best: a NaN ranks last for either mode (ranking_score).
                    get_metric_fn=lambda metrics: ranking_score(metrics[best_metric], best_mode),
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax store the metrics with each checkpoint; what is kept is
            # decided by the preservation policy alone.
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep_policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.async_save = async_save
        self.primary = jax.process_index() == 0
        self._unrecorded: set[int] = set()  # steps saved here whose checksums are not recorded
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": _StateHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                CONFIG_ITEM: ocp.JsonCheckpointHandler(),
                INPUT_ITEM: grain_checkpoint.CheckpointHandler(),
            },
        )
        # Orbax removes unfinished temporary folders of earlier runs in a background thread;
        # wait for it, so that it never overlaps our listing and moving of step folders (nor a
        # test's patched file system). Orbax itself waits for it only at the first save.
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self.manager.all_steps())

    def step_folder(self, step: int) -> Path:
        return self.directory / str(step)

    def save(
        self,
        step: int,
        tree: Any,
        meta: dict,
        metrics: dict[str, float] | None = None,
        input_state: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Start saving ``tree`` (arrays), ``meta`` (JSON), this process's ``input_state``
        (the training iterator's JSON-able state, if any) and ``config`` (the run's config as
        JSON, if given) as checkpoint ``step``.

        Orbax finishes the previous asynchronous save first; its checksums are recorded then."""
        self.wait()
        items = {"state": _StateSave(tree), "meta": ocp.args.JsonSave(meta)}
        if config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(dict(config))
        if input_state is not None:
            snapshot = _InputState(json.dumps(dict(input_state), indent=1).encode())
            items[INPUT_ITEM] = grain_checkpoint.CheckpointSave(item=snapshot)
        args = ocp.args.Composite(**items)
        self.manager.save(step, args=args, metrics=metrics, force=True)
        self._unrecorded.add(step)
        if not self.async_save:
            self.record_checksums()

    def record_finished(self) -> None:
        """Record the checksums of saves that finished in the background since (cheap when
        none did, so the loop calls it after every step): a run killed between two saves
        leaves its newest checkpoint certified, not only those before it."""
        if self._unrecorded and not self.manager.is_saving_in_progress():
            self.record_checksums()

    def record_checksums(self) -> None:
        """Write the integrity manifest of each checkpoint this instance saved whose checksums
        are not recorded yet (process 0; call only when no save is in flight, so that only
        committed folders are hashed). Folders it did not write are never certified."""
        ready = self._unrecorded & set(self.all_steps())
        self._unrecorded -= ready
        if not self.primary:
            return
        for step in sorted(ready):
            folder = self.step_folder(step)
            if folder.is_dir() and not integrity.has_manifest(folder):
                try:
                    integrity.write_manifest(folder)
                except OSError as error:  # the run goes on; this checkpoint stays unverified
                    warnings.warn(
                        f"could not record the checksums of {folder} ({error}); it will "
                        "be restored unverified",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    def check_structure(self, step: int, target: Any) -> None:
        """Raise :class:`CheckpointMismatchError` when checkpoint ``step`` holds arrays of other
        names, shapes or dtypes than ``target`` (a changed model or optimizer)."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception as error:
            raise integrity.DamagedCheckpointError(
                f"{self.step_folder(step)}: its array metadata cannot be read "
                f"({type(error).__name__}: {str(error)[:200]})"
            ) from None
        stored_tree = getattr(stored, "tree", stored)
        if stored_tree is None:
            raise integrity.DamagedCheckpointError(
                f"{self.step_folder(step)}: its array metadata is missing"
            )
        have = array_shapes(stored_tree)
        want = array_shapes(target)
        problems = [f"{key}: missing in the checkpoint" for key in sorted(set(want) - set(have))]
        problems += [
            f"{key}: not in the new model/optimizer" for key in sorted(set(have) - set(want))
        ]
        problems += [
            f"{key}: checkpoint {have[key]}, now {want[key]}"
            for key in sorted(set(have) & set(want))
            if have[key] != want[key]
        ]
        if problems:
            listed = "; ".join(problems[:4]) + (
                f"; ... ({len(problems)} in all)" if len(problems) > 4 else ""
            )
            raise CheckpointMismatchError(
                f"checkpoint {self.step_folder(step)} holds a different model or optimizer state "
                f"({listed}); resume with the config it was saved with, or use a new --workdir"
            )

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Checkpoint ``step`` as ``(tree, meta)``; ``target`` gives shapes, dtypes, shardings.

        The files are first checked against their checksums; a damaged checkpoint is moved
        aside (:meth:`move_aside`) and :class:`DamagedCheckpointError` raised. Unreadable files
        raise :class:`CheckpointUnreadableError`, a changed structure
        :class:`CheckpointMismatchError`; in both cases nothing is touched.
        """
        self.wait()
        code, error = 0, None
        if self.primary:
            try:
                checked = integrity.verify(self.step_folder(step))
                if isinstance(checked, integrity.Unverified):
                    warnings.warn(
                        f"checkpoint at step {step}: {checked.reason}; restoring it unverified",
                        CheckpointUnverifiedWarning,
                        stacklevel=3,
                    )
                self.check_structure(step, target)
            except integrity.DamagedCheckpointError as damaged:
                code, error = 1, damaged
            except integrity.CheckpointError as stop:
                code, error = 2, stop
        code = agreement.broadcast_code(code)
        if code == 1:
            raise self._moved(step, error)
        if code == 2:
            raise (
                error
                if error is not None
                else agreement.StoppedByProcessZero(
                    f"process 0 cannot use checkpoint {step}; its log gives the reason"
                )
            )
        verified = self.primary and integrity.has_manifest(self.step_folder(step))
        failure = None
        try:
            args = ocp.args.Composite(state=_StateRestore(target), meta=ocp.args.JsonRestore())
            restored = self.manager.restore(step, args=args)
        except Exception as exc:
            failure = exc
        if not agreement.any_process(failure is not None):
            return restored.state, dict(restored.meta)
        one_line = " ".join(str(failure).split())  # TensorStore's messages span lines
        text = f"{type(failure).__name__}: {one_line[:300]}" if failure else "on another process"
        local_unreadable = isinstance(failure, OSError) or "PERMISSION_DENIED" in text
        if agreement.any_process(local_unreadable):
            if isinstance(failure, OSError):
                raise integrity.classify_os_error(failure, self.step_folder(step)) from None
            raise integrity.CheckpointUnreadableError(
                f"cannot read checkpoint {self.step_folder(step)} ({text[:200]}); give this user "
                "read access to it (or fix the file system) and run again"
            ) from None
        if agreement.broadcast_code(int(verified)) or agreement.any_process(
            _not_damage(failure, text)
        ):
            how = (
                "passes its checksums but does not restore"
                if verified
                else "did not restore for a reason that is not damage to its files"
            )
            raise integrity.CheckpointError(
                f"checkpoint {self.step_folder(step)} {how} ({text}); nothing was changed. "
                "Free what it needs (device memory, a service) and rerun; if it fails again, "
                "rerun with --traceback and report it"
            ) from None
        raise self._moved(
            step,
            integrity.DamagedCheckpointError(f"{self.step_folder(step)} does not restore ({text})"),
        )

    def _moved(self, step: int, error: BaseException | None) -> integrity.DamagedCheckpointError:
        """Move checkpoint ``step`` aside (process 0), warn, and return the error to raise."""
        reason = str(error) if error is not None else "damaged (process 0's log says why)"
        destination = self.move_aside(step)
        warnings.warn(
            f"checkpoint at step {step} in {self.directory} is damaged ({reason}); "
            f"moved it to {destination} (kept, not deleted); falling back to the "
            "previous checkpoint",
            CheckpointFallbackWarning,
            stacklevel=3,
        )
        return integrity.DamagedCheckpointError(
            f"checkpoint at step {step}: {reason}; moved to {destination}"
        )

    @property
    def damaged_directory(self) -> Path:
        """Where damaged checkpoints are moved: ``<directory>.damaged/``, or
        ``<directory>/damaged/`` when ``<directory>`` is a link to another file system (a
        rename cannot cross it; Orbax takes no non-numbered folder for a step)."""
        beside = self.directory.with_name(self.directory.name + ".damaged")
        inside = self.directory / DAMAGED_INSIDE
        if inside.is_dir() or (
            self.directory.is_symlink() and _device(self.directory) != _device(beside.parent)
        ):
            return inside
        return beside

    def move_aside(self, step: int) -> Path:
        """Rename checkpoint ``step`` into :attr:`damaged_directory` (process 0) and forget it.
        Returns the new folder."""
        aside = self.damaged_directory
        destination = aside / str(step)
        suffix = 1
        while destination.exists():
            suffix += 1
            destination = aside / f"{step}.{suffix}"
        if self.primary:
            aside.mkdir(parents=True, exist_ok=True)
            os.rename(self.step_folder(step), destination)
        agreement.broadcast_code(0)  # the others wait for the rename before re-listing
        self.manager.reload()
        return destination

    def input_state(self, step: int) -> dict[str, Any] | None:
        """This process's input-pipeline state saved with checkpoint ``step`` (restored after
        :meth:`restore` verified the folder), or None when the checkpoint has none (written by
        older code, or by a run with another number of processes)."""
        folder = self.step_folder(step) / INPUT_ITEM
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            if not (folder / name).is_file():
                return None
            holder = _InputState()
            grain_checkpoint.CheckpointHandler().restore(
                folder, args=grain_checkpoint.CheckpointRestore(item=holder)
            )
            return json.loads(holder.state.decode())
        except OSError as error:
            raise integrity.classify_os_error(error, folder / name) from None
        except ValueError as error:  # not JSON: damaged after the checksums were taken
            raise CheckpointError(
                f"{folder / name} is not a readable input-pipeline state ({error}); move the "
                "checkpoint aside (or delete that file to resume at its step) and run again"
            ) from None

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """The newest usable checkpoint as ``(step, tree, meta)``, or None if there is none.

        A damaged checkpoint (half-written, truncated, failing its checksums) is reported with a
        :class:`CheckpointFallbackWarning`, moved aside (never deleted) and the previous one is
        tried. Unreadable or structurally different checkpoints stop the search (see
        :meth:`restore`). None only for a run that never had a checkpoint: when every one was
        damaged (now or at an earlier start), :class:`NoUsableCheckpointError`, so that the run
        does not start again from step 0 over its own metrics and results.
        """
        self.wait()
        for step in reversed(self.all_steps()):
            try:
                tree, meta = self.restore(step, target)
            except integrity.DamagedCheckpointError:
                continue
            return step, tree, meta
        aside = self.damaged_directory
        damaged = self.primary and aside.is_dir() and any(aside.iterdir())
        if agreement.broadcast_code(int(damaged)):
            raise NoUsableCheckpointError(
                f"{self.directory} holds no usable checkpoint: every one was damaged and moved "
                f"to {aside} (kept); nothing else was changed. Put a good checkpoint back into "
                f"{self.directory}, or rerun with --config.resume=restart to keep this run in a "
                "previous-<time>/ folder and start again from step 0"
            )
        return None

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with checkpoint ``step`` (None for checkpoints saved without)."""
        metrics = self.manager.metrics(step)
        return dict(metrics) if metrics is not None else None

    def best_step(self) -> int | None:
        """The step whose ``best_metric`` is best, or None (:func:`best_of`)."""
        metrics = {step: self.metrics(step) for step in self.all_steps()}
        return best_of(metrics, self.best_metric, self.best_mode)

    def wait(self) -> None:
        """Block until pending asynchronous saves are written and their checksums recorded
        (only those of this instance's saves: see :meth:`record_checksums`)."""
        self.manager.wait_until_finished()
        self.record_checksums()

    def close(self) -> None:
        """Finish pending saves, record their checksums, release the manager's resources."""
        self.wait()
        self.manager.close()

"""One run per workdir, and what a rerun may change: the lock and the config comparison.

The lock: ``workdir/run.lock`` (JSON: host, pid, start time, command) is created exclusively by
process 0 before anything else is written to the workdir, complete in one step (a process killed
while taking it leaves no lock or a whole one), and removed when the run ends. A second
run on the same workdir stops at once with :class:`WorkdirInUseError` naming the holder. A lock
left by a dead process on the same host is taken over with a :class:`StaleLockWarning` (by one
run only when several find it at once: :meth:`WorkdirLock._take_over_if_stale`). A process on
another host cannot be checked, so the holder refreshes its lock's modification time every
:data:`LOCK_HEARTBEAT_S`; a run that finds another host's lock watches it for
:data:`LOCK_STALE_BEATS` heartbeat periods and takes it over when it did not change (its holder
died with its host), or stops naming the holder when it did; so is a lock of this host that
names a live pid but was not refreshed for that long (the pid went to another process). (A
lock written before heartbeats, without ``heartbeat_s``, cannot be judged: the message says how
to clear it.) A holder whose lock no longer names it stops before its next checkpoint
(:meth:`WorkdirLock.check`).

A run writes ``config.json`` right after taking the lock, before any other file; a workdir
holding run files (:data:`RUN_FILES`) without it belongs to something else and is refused
(:class:`WorkdirError`), touching nothing, unless its checkpoints hold a copy of a run's config
(:func:`config_copy`): then ``config.json`` was lost, and is rebuilt from the newest copy. So is
a ``config.json`` that is not JSON (cut short by a power loss), which is first moved aside.

The config: on a rerun, the workdir's ``config.json`` is compared with the new config
(:func:`compare_configs`). Keys that change the model, the data's shapes, the task or the
optimizer's state structure refuse the resume (:class:`ConfigChangedError`) unless
``config.resume`` says otherwise; a workdir without a committed checkpoint (an earlier attempt
that failed before its first one) has nothing to continue, so the new config replaces its
``config.json`` (one line says so). A model key absent from the saved config (a run from before
the field existed) stands for the field's default, so a new field whose default keeps the old
behaviour never blocks an old run; that is the rule for adding one.

- ``"auto"`` (default): resume; refuse structural changes; list the others in a warning.
- ``"force"``: resume with the new values anyway (still refused, touching nothing, if the
  checkpoint's arrays no longer fit the model or optimizer).
- ``"restart"``: keep the previous run (config, checkpoints, metrics, results) in
  ``workdir/previous-<UTC time>/`` and start again from step 0 with the new config.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hgrn_jax.data.disk_space import describe_free_space
from hgrn_jax.data.loader import TENSORSTORE_OS_ERROR, file_in_the_way, is_out_of_space
from hgrn_jax.training.logging import (
    EVENTS_FILE,
    KEPT_RESULTS,
    jsonable,
    read_metric_lines,
    write_json,
)

LOCK_NAME = "run.lock"
LOCK_HEARTBEAT_S = 5.0
"""How often a run refreshes its lock file's modification time. A lock names a process, whose
life only its own host can check; the heartbeat lets a run on another host (a job requeued
after its node died) tell a live holder from a dead one."""
LOCK_STALE_BEATS = 4
"""A lock of another host whose file stays unchanged over this many of its holder's heartbeat
periods is stale (its holder would have refreshed it four times). Process 0 watches the lock
while the other processes of a pod wait for it in their first collective, whose set-up gives
up after 30 s on CPU pods (gloo's rendezvous): 4 x 5 s stays well inside that."""
LOCK_POLL_S = 1.0
"""How often a run watching another host's lock looks at it again."""
RESUME_CHOICES = ("auto", "force", "restart")

# Keys whose change never matters to the saved state or the data position.
HARMLESS_KEYS = (
    "num_train_steps",
    "epochs",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "max_train_time_s",
    "keep_checkpoints",
    "eval_batch_size",
    "resume",
    "data.workers",  # the batches are the same whatever the number of input workers
)
HARMLESS_PREFIXES = ("mesh.", "paper.")
# Model keys that change neither parameters nor their shapes (how, not what, is computed): the
# recurrence method and sequence parallelism live in ``model.mixer`` (the flat ``model.method``
# and ``model.sequence_axis`` are their deprecated spellings), so that a run can resume on
# another mesh with the time axis split over it.
MODEL_HARMLESS = (
    "model.dropout",
    "model.position_dropout",
    "model.method",
    "model.remat",
    "model.sequence_axis",
    "model.mixer.method",
    "model.mixer.sequence_axis",
)
# Keys that change the data's shapes or the examples behind a step, the task, or the optimizer
# state's structure. Every other model.* key counts too.
STRUCTURAL_KEYS = (
    "task",
    "seed",  # the shuffled order: which examples each step reads
    "batch_size",
    "data.source",
    "data.seq_len",
    "data.image_size",
    "data.grayscale",
    "data.tokenizer_path",
    "data.path_length",
    "data.train_examples",
    "data.min_length",
    "data.max_length",
    "data.max_depth",
    "data.max_args",
    "data.generator_seed",
    "optimizer.name",
    "optimizer.accumulate_steps",
    "optimizer.weight_decay_mask",
    "data.repeated_augmentation",
    "data.wikitext_release",
)
# What a key added since stands for in a task's run saved before the key existed: the data
# that run read (its task alone: a key in every config, like wikitext_release, means nothing
# to another task's run).
OLDER_RUNS_READ = {
    "imagenet": {"data.repeated_augmentation": 1},
    "wikitext103": {"data.wikitext_release": "tokens"},
}
_ADDED_DATA_KEYS = frozenset(key for keys in OLDER_RUNS_READ.values() for key in keys)
# Keys whose structure matters only when they switch between zero and non-zero.
ZERO_SWITCH_KEYS = ("optimizer.grad_clip_norm",)


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do."""


class WorkdirInUseError(WorkdirError):
    """Another run holds the workdir's lock."""


class WorkdirNotWritableError(WorkdirError):
    """The workdir (or its parent) cannot be written."""


class WorkdirFullError(WorkdirError):
    """The workdir's file system ran out of space (or quota) while the run wrote to it."""


# What link() fails with on a file system without hard links (some FUSE and network ones).
NO_HARD_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
_TENSORSTORE_FILE = re.compile(r'Failed writing: "([^"]+)"')


class ConfigChangedError(WorkdirError):
    """The new config changes keys that its checkpoints cannot continue with."""


class ConfigNotJsonError(WorkdirError):
    """The workdir's ``config.json`` is not JSON (empty, cut short, overwritten); ``problem``
    says so in a few words."""

    def __init__(self, path: Path, error: ValueError):
        self.problem = f"{path} is not JSON ({error})"
        super().__init__(
            f"{self.problem} and no checkpoint of the run holds a copy of its config (there is "
            "none, or they were saved by an older version); nothing was changed. Put the run's "
            "config.json back (from a backup), or use another --workdir"
        )


class StaleLockWarning(RuntimeWarning):
    """The workdir's lock was left by a process that is gone; it was taken over."""


class ConfigChangeWarning(UserWarning):
    """A resumed run uses some new config values (listed)."""


def not_writable(path: str | Path, error: OSError) -> WorkdirNotWritableError:
    """The error for a write to ``path`` (the workdir or a file in it) that failed with
    ``error``: a workdir that is a file, or below one, is named so (the OSError said only
    "File exists" or "Not a directory"); otherwise the OSError's reason."""
    path = Path(path)
    existing = file_in_the_way(path)
    if existing is not None:
        if existing == path:
            return WorkdirNotWritableError(
                f"--workdir {path} is a file, not a folder; choose a folder for --workdir (a "
                "new or an existing one)"
            )
        return WorkdirNotWritableError(
            f"cannot make --workdir {path}: {existing} is a file, not a folder; choose a "
            "--workdir whose parents are folders"
        )
    reason = error.strerror or type(error).__name__
    if is_out_of_space(error):
        folder = path if path.is_dir() else path.parent
        return WorkdirNotWritableError(
            f"cannot write to {path}: its file system is full ({describe_free_space(folder)}); "
            "nothing was changed. Free space there and run again, or choose another --workdir"
        )
    return WorkdirNotWritableError(
        f"cannot write to {path} ({reason}); choose a writable --workdir or fix its permissions"
    )


def check_checkpoints_writable(workdir: str | Path) -> None:
    """Raise :class:`WorkdirNotWritableError` (or OSError for lack of space, which the caller
    words) when a run's existing ``workdir/checkpoints`` folder cannot take a new checkpoint:
    a folder owned by another user or on a read-only mount was found only at the first save,
    after ``checkpoint_every`` steps of training were lost. Makes and removes one empty folder,
    ``.write-check-<pid>-<random>``, beside the step folders (Orbax lists only numbered ones;
    a unique name, since ``mkdir`` of an existing one says "File exists" before it checks the
    permissions)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return  # made by the first save, in the workdir the lock was just written to
    probe = folder / f".write-check-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise WorkdirNotWritableError(
                f"cannot write new checkpoints into {folder} ({error.strerror}); nothing was "
                "changed. Give this user write access to it (and to the workdir), or copy "
                "the run to a writable --workdir and run there"
            ) from None
        raise


# ----------------------------------------------------------------------------- the lock


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def this_machine() -> str | None:
    """``"<boot id>/<pid namespace>"``: processes that see the same value see the same process
    behind a pid (the same boot of the same machine, the same pid namespace: a container on
    the same machine has its own); None without Linux's ``/proc``. Read once per process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}/{namespace}"


def process_status(pid: int) -> tuple[str, int] | None:
    """``(state letter, start time in clock ticks after boot)`` of process ``pid`` from
    ``/proc/<pid>/stat`` (``R``/``S``/``D`` running or waiting, ``T``/``t`` stopped, ``Z``
    exited, not yet reaped); None when there is no such process (or no ``/proc``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        after_name = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
        return after_name[0], int(after_name[19])
    except (OSError, ValueError, IndexError):
        return None


def _same_machine(holder: dict[str, Any]) -> bool:
    """Whether ``holder``'s pid names a process this process can look up: it is of this host
    and, where both record it, of this :func:`this_machine` (a lock of the same host name but
    another boot, or another container's pid namespace, is another machine's)."""
    if holder.get("host") != socket.gethostname():
        return False
    machine = holder.get("machine")
    return machine is None or this_machine() in (None, machine)


def _judged_here(holder: dict[str, Any]) -> str | None:
    """``"running"``, ``"suspended"`` (stopped by Ctrl-Z or SIGSTOP) or ``"gone"`` (exited, or
    its pid now names a process started later) for a holder this process can judge exactly:
    one of this host, boot and pid namespace that recorded its start; None for any other
    (another machine's, a container's, or a lock from before runs recorded theirs)."""
    pid, start = holder.get("pid"), holder.get("process_start")
    if (
        not _same_machine(holder)
        or not isinstance(pid, int)
        or not isinstance(start, int)
        or holder.get("machine") != this_machine()
    ):
        return None
    status = process_status(pid)
    if status is None or status[1] != start or status[0] in "ZX":
        return "gone"
    return "suspended" if status[0] in "Tt" else "running"


def _write_synced(path: Path, flags: int, data: bytes) -> None:
    """Write ``data`` to ``path`` opened with ``flags``, synced; a file this call created is
    removed again when the write fails (a full disk), so that no empty file is left."""
    fd = os.open(path, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if flags & os.O_EXCL or flags & os.O_TRUNC:  # created (or emptied) by this call
            path.unlink(missing_ok=True)
        raise


def _holder_in(data: bytes) -> dict[str, Any]:
    """The holder a lock file's ``data`` names; empty if it names none (empty or not JSON)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
        f"{holder.get('start_time', '?')}"
    )


def _beats(holder: dict[str, Any]) -> bool:
    """Whether ``holder`` refreshes its lock (a run from before heartbeats does not)."""
    beat = holder.get("heartbeat_s")
    return isinstance(beat, int | float) and not isinstance(beat, bool) and beat > 0


def _stale_after_s(holder: dict[str, Any]) -> float:
    return LOCK_STALE_BEATS * float(holder["heartbeat_s"])


def _signature(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _lock_signature(path: Path) -> tuple[int, ...] | None:
    """The lock file's identity and modification time, None when it is gone. The file is
    opened (NFS clients revalidate a file's attributes on open, not on a cached stat)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _signature(os.fstat(fd))
    finally:
        os.close(fd)


def lock_state(workdir: str | Path) -> tuple[str, dict[str, Any]]:
    """Who holds ``workdir``'s lock, reading only: ``("free", {})`` without a lock file;
    ``("live", holder)`` for a live process of this host; ``("suspended", holder)`` for one
    stopped by Ctrl-Z or SIGSTOP; ``("unchecked", holder)`` for a process of another host, or a
    lock that cannot be read (whose holder's life cannot be checked from here); ``("dead",
    holder)`` for a process of this host that is gone (or whose pid went to another process),
    or a lock naming none (a stale lock: the next run takes it over)."""
    path = Path(workdir) / LOCK_NAME
    try:
        holder = _holder_in(path.read_bytes())
    except FileNotFoundError:
        return "free", {}
    except OSError:
        return "unchecked", {}
    judged = _judged_here(holder)
    if judged is not None:
        return {"running": "live", "suspended": "suspended", "gone": "dead"}[judged], holder
    pid = holder.get("pid")
    if not _same_machine(holder):
        return ("unchecked" if holder.get("host") else "dead"), holder
    alive = isinstance(pid, int) and _process_alive(pid)
    return ("live" if alive and not _pid_reused(path, holder) else "dead"), holder


def lock_refresh_age(path: Path, holder: dict[str, Any]) -> tuple[float, float] | None:
    """``(seconds since the lock file at path was last refreshed, by this machine's clock;
    its stale limit)`` for a ``holder`` that refreshes its lock; None for one that does not,
    or a file that cannot be read."""
    if not _beats(holder):
        return None
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError:
        return None
    return age, _stale_after_s(holder)


def _pid_reused(path: Path, holder: dict[str, Any]) -> bool:
    """Whether a lock of this host that refreshes itself, naming a live pid, was not refreshed
    for longer than its stale limit by this host's clock: its run died and the pid went to
    another process (for a lock that :func:`_judged_here` cannot judge; a stopped run's lock
    looks the same)."""
    refresh = lock_refresh_age(path, holder)
    return refresh is not None and refresh[0] > refresh[1]


class WorkdirLock:
    """The lock of one workdir, taken with :meth:`acquire` and dropped with :meth:`release`."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.token = secrets.token_hex(8)
        self.held = False
        self.lost: str | None = None  # why the lock no longer names this run, once it does not
        # What check_resume said as the lock was taken (process 0), for the run's start record.
        self.resume_notes: list[str] = []
        self._stop_beating = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> WorkdirLock:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise not_writable(self.workdir, error) from None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "token": self.token,
            "heartbeat_s": LOCK_HEARTBEAT_S,
        }
        status, machine = process_status(os.getpid()), this_machine()
        if status is not None and machine is not None:
            record |= {"machine": machine, "process_start": status[1]}
        data = (json.dumps(record, indent=1) + "\n").encode()
        for _ in range(3):
            try:
                created = self._create(data)
            except OSError as error:
                raise not_writable(self.workdir, error) from None
            if created:
                self.held = True
                self._remove_records_of_dead_runs()
                self._heartbeat = threading.Thread(
                    target=self._beat_until_released, name="workdir-lock-heartbeat", daemon=True
                )
                self._heartbeat.start()
                return self
            self._take_over_if_stale()
        raise WorkdirInUseError(
            f"{self.workdir} is being locked by another run at this moment; "
            "wait for it or use another --workdir"
        )

    def _beat_until_released(self) -> None:
        while not self._stop_beating.wait(LOCK_HEARTBEAT_S):
            if not self.beat():
                return

    def beat(self) -> bool:
        """Refresh the lock file's modification time if it still names this run; otherwise
        record why in :attr:`lost` (for :meth:`check`) and return False. A file-system error
        skips one beat (False only for a lock that is gone or another run's)."""
        try:
            holder = _holder_in(self.path.read_bytes())
        except FileNotFoundError:
            holder = {}
        except OSError:
            return True
        if holder.get("token") != self.token:
            now = f"names another run ({_describe(holder)})" if holder else "is gone"
            self.lost = (
                f"{self.path} no longer names this run: it {now}, so another run may be "
                f"writing to {self.workdir}; this run stops without writing more (its last "
                "complete checkpoint is kept)"
            )
            return False
        try:
            os.utime(self.path)
        except OSError:
            pass
        return True

    def check(self) -> None:
        """Raise :class:`WorkdirInUseError` if the lock no longer names this run (taken over
        while this process stood still for longer than the stale limit, or deleted by hand):
        what a heartbeat found, or a beat now (a held lock's file is read again)."""
        if self.lost is None and self.held:
            self.beat()
        if self.lost is not None:
            raise WorkdirInUseError(self.lost)

    def _create(self, data: bytes) -> bool:
        """Create the lock file holding ``data`` in one step; False when it exists.

        ``data`` goes into a file of this process first, which is then hard-linked as the lock:
        a process killed at any moment leaves no lock or a complete one. (A lock created empty
        and then written is left empty by a kill in between, and an empty lock names no holder
        whose death could be checked: every later run would stop.) On a file system without
        hard links the lock is created empty and written."""
        record = self.workdir / f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.tmp"
        _write_synced(record, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, data)
        try:
            os.link(record, self.path)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in NO_HARD_LINK_ERRNOS:
                raise
            try:
                _write_synced(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, data)
            except FileExistsError:
                return False
        finally:
            record.unlink(missing_ok=True)
        return True

    def _remove_records_of_dead_runs(self) -> None:
        """Remove the record files (:meth:`_create`) left by runs on this host that were killed
        while taking the lock (those of dead processes: a run taking the lock now is alive)."""
        host = socket.gethostname()
        prefix, suffix = f"{LOCK_NAME}.{host}.", ".tmp"
        for path in self.workdir.glob(f"{LOCK_NAME}.*{suffix}"):
            pid = path.name[len(prefix) : -len(suffix)]
            if path.name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        """Remove the lock if its holder is a dead process on this host, with a
        :class:`StaleLockWarning`, for :meth:`acquire` to try again; raise
        :class:`WorkdirInUseError` if it is held (or cannot be checked).

        Runs that find the same stale lock at once remove it one at a time: each holds an
        ``flock`` of the lock file it reads and judges, and removes it only while the lock is
        still that file, so the lock that a faster run made after removing the stale one is
        never removed. (Renaming the path judged stale moved that live lock away, and both runs
        held the workdir.) Only locks of this host are taken over, so an ``flock`` that holds
        within the host is enough: on NFS it holds across clients, or within each client with
        ``local_lock``; where it fails (NFS without a lock service) the user is asked to delete
        the stale lock."""
        try:
            holder = _holder_in(self.path.read_bytes())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError:
            holder = {}
        unchanged = None
        if (
            _judged_here(holder) is None
            and _beats(holder)
            and (not _same_machine(holder) or self._live_pid_reused(holder))
        ):
            unchanged = self._watch_holder(holder)
            if unchanged is None:
                return  # released meanwhile: try again
        else:
            self._refuse_unless_stale(holder)
        try:
            fd = os.open(self.path, os.O_RDWR)  # NFS locks only files open for writing
        except FileNotFoundError:
            return
        except OSError as error:
            raise self._cannot_take_over(holder, error) from None
        with os.fdopen(fd, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX)
            except OSError as error:
                raise self._cannot_take_over(holder, error) from None
            try:
                if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return  # taken over meanwhile: try again
            except FileNotFoundError:
                return
            if unchanged is not None:
                if _signature(os.fstat(fd)) != unchanged:
                    return  # refreshed at the last moment: look again
                holder = _holder_in(file.read())
                gone = (
                    f"on host {holder.get('host', '?')}, which did not refresh it in "
                    f"{_stale_after_s(holder):g} s"
                )
            else:
                holder = _holder_in(file.read())
                self._refuse_unless_stale(holder)
                gone = "that is gone"
            self.path.unlink(missing_ok=True)
        warnings.warn(
            f"{self.path} was left by a run {gone} ({_describe(holder)}); taking it over",
            StaleLockWarning,
            stacklevel=3,
        )

    def _watch_holder(self, holder: dict[str, Any]) -> tuple[int, ...] | None:
        """Watch the lock of a run on another host (or of one whose pid looks reused) for
        :data:`LOCK_STALE_BEATS` of its heartbeat periods. Raise :class:`WorkdirInUseError` as soon as it changes (its holder
        is alive); return its unchanged signature when it did not (its holder is dead), None
        when it was removed meanwhile."""
        wait_s = _stale_after_s(holder)
        print(
            f"{self.path} is held by a run on host {holder.get('host', '?')} (pid "
            f"{holder.get('pid', '?')}); watching it for {wait_s:g} s to see whether that run "
            "is alive (it refreshes the file every "
            f"{float(holder['heartbeat_s']):g} s)",
            file=sys.stderr,
            flush=True,
        )
        first = _lock_signature(self.path)
        deadline = time.monotonic() + wait_s
        while first is not None and time.monotonic() < deadline:
            time.sleep(min(LOCK_POLL_S, max(deadline - time.monotonic(), 0.0)))
            now = _lock_signature(self.path)
            if now != first:
                if now is None:
                    return None
                try:  # the same run, or one that took the lock over meanwhile
                    holder = _holder_in(self.path.read_bytes()) or holder
                except OSError:
                    pass
                raise WorkdirInUseError(
                    f"{self.workdir} is in use by a live run ({_describe(holder)}; "
                    f"{self.path} changed a moment ago); wait for it to finish or use another "
                    "--workdir"
                )
        return first

    def _live_pid_reused(self, holder: dict[str, Any]) -> bool:
        """:func:`_pid_reused` for a live pid (then :meth:`_watch_holder` confirms it without
        trusting clocks)."""
        pid = holder.get("pid")
        return isinstance(pid, int) and _process_alive(pid) and _pid_reused(self.path, holder)

    def _refuse_unless_stale(self, holder: dict[str, Any]) -> None:
        """Raise :class:`WorkdirInUseError` unless ``holder`` is a dead process on this host."""
        same_host = _same_machine(holder)
        pid = holder.get("pid")
        judged = _judged_here(holder)
        if judged == "gone" or (
            judged is None and same_host and isinstance(pid, int) and not _process_alive(pid)
        ):
            return
        if judged == "suspended":
            raise WorkdirInUseError(
                f"{self.workdir} is in use by a suspended run ({_describe(holder)}; lock file "
                f"{self.path}): its process is stopped (Ctrl-Z or SIGSTOP), not gone; resume it "
                f"(fg in its shell, or kill -CONT {pid}) or end it (kill {pid}; kill -CONT "
                f"{pid}: it saves a checkpoint and exits), or use another --workdir"
            )
        how = (
            "if no run is using it any more"
            if same_host or not holder
            else "if that run is gone (it is on another host, and its lock is from before runs "
            "refreshed theirs, so this cannot be checked)"
        )
        raise WorkdirInUseError(
            f"{self.workdir} is in use by another run ({_describe(holder)}; lock file "
            f"{self.path}); wait for it to finish or use another --workdir; {how}, delete "
            f"{self.path}"
        )

    def _cannot_take_over(self, holder: dict[str, Any], error: OSError) -> WorkdirInUseError:
        return WorkdirInUseError(
            f"{self.path} was left by a run that is gone ({_describe(holder)}), but it cannot be "
            f"locked to take it over safely ({error.strerror or type(error).__name__}); if no "
            f"run is using {self.workdir}, delete {self.path}"
        )

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        self._stop_beating.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5.0)
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the config


def flatten_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one dict of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_keys(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config: Any) -> dict[str, Any]:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(jsonable(as_dict)))


def is_structural(key: str, old: Any, new: Any) -> bool:
    """Whether changing ``key`` from ``old`` to ``new`` changes the model, the data's shapes or
    examples, the task or the optimizer state's structure."""
    if key in STRUCTURAL_KEYS:
        return True
    if key in ZERO_SWITCH_KEYS:
        return (not old) != (not new)
    if key == "dtype":  # a float16 run's optimizer state holds its loss scale too
        return (old == "float16") != (new == "float16")
    return key.startswith("model.") and key not in MODEL_HARMLESS


def is_harmless(key: str) -> bool:
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)


def compare_configs(
    old: dict[str, Any], new: Any, defaults: Mapping[str, Any] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """``(structural, harmless, other)`` changes between a saved ``config.json`` dict and the
    new config, each as ``"key: old -> new"``.

    ``defaults`` (nested as a config, e.g. :func:`hgrn_jax.tasks.model_defaults`) says what a
    key absent from one side stands for: a run saved before a model field existed was built
    with its default, so the new config's default value is no change (listed as harmless, as
    ``"key: absent (default v) -> v"``), while any other value still is. A data key added
    since stands, in an older run of its task, for the data that run read
    (:data:`OLDER_RUNS_READ`): an ImageNet run saved before ``data.repeated_augmentation``
    read each image once an epoch, an LM run before ``data.wikitext_release`` the ``tokens``
    release."""
    old_flat, new_flat = flatten_keys(old), flatten_keys(_plain(new))
    implied = flatten_keys(_plain(defaults or {}))
    older = OLDER_RUNS_READ.get(str(old.get("task")), {})

    def shown(flat: dict[str, Any], key: str) -> str:
        if key in flat:
            return repr(flat[key])
        if flat is old_flat and key in older:
            return f"absent (saved before the key: {older[key]!r})"
        return f"absent (default {implied[key]!r})" if key in implied else "absent"

    structural, harmless, other = [], [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        before = old_flat.get(key, older.get(key, implied.get(key)))
        after = new_flat.get(key, implied.get(key))
        line = f"{key}: {shown(old_flat, key)} -> {shown(new_flat, key)}"
        if key in _ADDED_DATA_KEYS and key not in old_flat and key not in older:
            harmless.append(line)  # an older run of a task that does not read it
            continue
        if before == after:
            if (key in implied or key in older) and (key not in old_flat or key not in new_flat):
                harmless.append(line)
            continue
        if is_harmless(key):
            harmless.append(line)
        elif is_structural(key, before, after):
            structural.append(line)
        else:
            other.append(line)
    return structural, harmless, other


def resume_choice(config: Any) -> str:
    value = str(config.get("resume", "auto") if hasattr(config, "get") else "auto")
    if value not in RESUME_CHOICES:
        raise ValueError(f"--config.resume={value!r} is not one of {', '.join(RESUME_CHOICES)}")
    return value


def is_run_config(saved: Any) -> bool:
    """Whether a parsed ``config.json`` is the config of a run of this program (a JSON object
    with a task name and a model), not another program's (a model folder's, say)."""
    return (
        isinstance(saved, dict)
        and isinstance(saved.get("task"), str)
        and isinstance(saved.get("model"), dict)
    )


def mixer_kind(config: Any) -> str:
    """The token mixer's kind, ``model.mixer.kind``, of a config or a run's config.json (a
    dict); ``"hgrn"`` (the paper's model) when it has none."""
    model = config.get("model", None)
    mixer = model.get("mixer", None) if hasattr(model, "get") else None
    return str(mixer.get("kind", "hgrn")) if hasattr(mixer, "get") else "hgrn"


def read_saved_config(workdir: str | Path) -> dict[str, Any] | None:
    """The workdir's ``config.json``, or None without one. Raises :class:`ConfigNotJsonError`
    when it is not JSON, :class:`WorkdirError` when it cannot be read or is not a run's."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise WorkdirError(
            f"{path} cannot be read ({error}); give this user read access to it, or use "
            "another --workdir"
        ) from None
    except ValueError as error:
        raise ConfigNotJsonError(path, error) from None
    if not isinstance(saved, dict):
        raise WorkdirError(f"{path} does not hold a config (a JSON object); use another --workdir")
    if not is_run_config(saved):
        # Another program's config.json (a model folder's, say): never replaced nor moved.
        raise WorkdirError(
            f"{path} is not the config of a run of this program (it has no task and model); "
            "nothing was changed. Choose an empty or new --workdir"
        )
    return saved


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The committed checkpoint steps of run folder ``workdir``, ascending: the step folders of
    ``workdir/checkpoints`` named by an integer (Orbax's unfinished ones carry a suffix)."""
    folder = Path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(e.name) for e in folder.iterdir() if e.name.isdigit() and e.is_dir())


CONFIG_ITEM = "config"
"""The checkpoint item holding a copy of the run's config (Orbax's JSON handler writes it to
``<step>/config/metadata``)."""


def config_copy(workdir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """``(file, config)``: the copy of the run's config in its newest committed checkpoint that
    holds a readable one (checkpoints of older versions hold none), or None."""
    for step in reversed(checkpoint_steps(workdir)):
        path = Path(workdir) / "checkpoints" / str(step) / CONFIG_ITEM / "metadata"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if is_run_config(saved):
            return path, saved
    return None


def readable_run_config(workdir: str | Path) -> tuple[Path, dict[str, Any] | None, str]:
    """``(file, config, problem)`` for readers that change nothing (a trained model's loader,
    the report): ``config.json``'s run config, with ``problem`` ""; where that file is missing,
    unreadable, not JSON or not a run's config, the copy in the newest checkpoint holding one
    (:func:`config_copy`; ``file`` is the copy's), with ``problem`` saying what is wrong with
    ``config.json`` (``"not found"``, ``"is not valid JSON (...)"``, ...); ``(config.json,
    None, problem)`` when there is neither."""
    path = Path(workdir) / "config.json"
    problem = "not found"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            problem = f"cannot be read ({error})"
        except ValueError as error:
            problem = f"is not valid JSON ({error})"
        else:
            if is_run_config(saved):
                return path, saved, ""
            problem = "holds no run config (a JSON object with task and model)"
    copy = config_copy(workdir)
    if copy is None:
        return path, None, problem
    return copy[0], copy[1], problem


def _rebuild_config(workdir: Path, copy: tuple[Path, dict[str, Any]]) -> str:
    """Write ``config.json`` from a checkpoint's ``copy`` (:func:`config_copy`), moving a
    ``config.json`` that is there aside first (never over another file). Returns where it was
    moved, or ``""``."""
    path = workdir / "config.json"
    aside = ""
    if path.exists():
        target, suffix = workdir / "config.json.unreadable", 1
        while target.exists():
            suffix += 1
            target = workdir / f"config.json.unreadable-{suffix}"
        os.rename(path, target)
        aside = str(target)
    write_json(path, copy[1])
    return aside


def _saved_or_rebuilt_config(workdir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The run's saved config and the lines saying what was done to get it: a ``config.json``
    that is not JSON, or missing beside run files, is rebuilt from the copy in the newest
    checkpoint (:func:`config_copy`); without one, the folder is refused (not a run's, or a
    run that cannot be told from its files), touching nothing."""
    try:
        saved = read_saved_config(workdir)
    except ConfigNotJsonError as error:
        copy = config_copy(workdir)
        if copy is None:
            raise
        aside = _rebuild_config(workdir, copy)
        return copy[1], [
            f"{error.problem}: moved it to {aside} and rebuilt {workdir / 'config.json'} from "
            f"the copy in {copy[0]}"
        ]
    if saved is not None:
        return saved, []
    found = [name for name in RUN_FILES if (workdir / name).exists()]
    if not found:
        return None, []
    copy = config_copy(workdir)
    if copy is None:
        raise WorkdirError(
            f"{workdir} holds {', '.join(found)} but no config.json, so it is not a run "
            "folder of this program; nothing was changed. Choose an empty or new --workdir"
        )
    _rebuild_config(workdir, copy)
    return copy[1], [f"{workdir} had lost its config.json; rebuilt it from the copy in {copy[0]}"]


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether the run in ``workdir`` has checkpointed: ``checkpoints/`` holds a committed
    checkpoint, or ``checkpoints.damaged/`` (``checkpoints/damaged/`` where that is a link to
    another file system) one moved aside as damaged. Either way its ``config.json`` describes
    them, and a new config is checked against it rather than written over it (a run whose every
    checkpoint is damaged stops: ``NoUsableCheckpointError``)."""
    workdir = Path(workdir)
    damaged = (workdir / "checkpoints.damaged", workdir / "checkpoints" / "damaged")
    return bool(checkpoint_steps(workdir)) or any(d.is_dir() and any(d.iterdir()) for d in damaged)


def _mebibytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def out_of_space(
    workdir: str | Path, error: BaseException, resume_hint: str, keep: int
) -> WorkdirFullError:
    """The one-line error for a run whose writes into ``workdir`` failed for lack of space
    (:func:`hgrn_jax.data.loader.is_out_of_space`): where, how much is free, which checkpoint
    is the last complete one and its size (each of the ``keep`` kept checkpoints takes as
    much), and how to go on (``resume_hint``). Reads only."""
    workdir = Path(workdir)
    if isinstance(error, OSError):
        filename, reason = error.filename, error.strerror or str(error)
    else:
        written = _TENSORSTORE_FILE.search(str(error))
        code = TENSORSTORE_OS_ERROR.search(str(error))
        filename = written and written.group(1)
        reason = os.strerror(int(code.group(1)) if code else errno.ENOSPC)
    writing = f" writing {filename}" if filename else ""
    free = describe_free_space(workdir)
    steps = checkpoint_steps(workdir)
    if steps:
        size = _mebibytes(workdir / "checkpoints" / str(steps[-1]))
        kept = (
            f"the run stopped; its checkpoints are kept, the last complete one at step "
            f"{steps[-1]} ({size:.1f} MiB; config.keep_checkpoints={keep} of them are kept, "
            "plus the one being written)"
        )
    else:
        kept = "the run stopped before it completed a checkpoint"
    return WorkdirFullError(
        f"{reason} on the file system of {workdir}{writing} ({free}): {kept}; free space "
        f"(or inodes: delete files) there, then {resume_hint}"
    )


def has_previous_run(workdir: str | Path) -> bool:
    workdir = Path(workdir)
    return any((workdir / name).exists() for name in ("config.json", "checkpoints"))


RUN_FILES = (
    "checkpoints",
    "checkpoints.damaged",
    "metrics.jsonl",
    EVENTS_FILE,
    "tensorboard",
    "results.json",
    "curves.png",
)
"""What a run writes into its workdir besides ``config.json`` (which it writes first)."""
PREVIOUS_RUN_ENTRIES = ("config.json", *RUN_FILES)


def archive_previous_run(workdir: str | Path) -> Path:
    """Move the previous run's files into ``workdir/previous-<UTC time>/`` (nothing deleted).

    ``config.json`` goes last: a move cut short leaves the rest beside it, still a run folder
    (:func:`check_resume` refuses run files without a config.json)."""
    workdir = Path(workdir)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = workdir / f"previous-{stamp}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = workdir / f"previous-{stamp}-{suffix}"
    folder.mkdir()
    kept_results = sorted(path.name for path in workdir.glob(f"{KEPT_RESULTS}*.json"))
    for name in (*RUN_FILES, *kept_results, "config.json"):
        if (workdir / name).exists():
            os.rename(workdir / name, folder / name)
    return folder


LISTED_CHANGES = 6
"""How many changes the note on a replaced config.json of a run without checkpoints lists (a
first attempt with another config file changes dozens of keys)."""


def _last_logged_step(metrics: Path) -> int:
    """The largest ``step`` in a ``metrics.jsonl`` (0 without one); a damaged line raises
    ValueError naming it (:func:`~hgrn_jax.training.logging.read_metric_lines`)."""
    if not metrics.is_file():
        return 0
    steps = (record.get("step") for record, _ in read_metric_lines(metrics))
    return max((s for s in steps if isinstance(s, int) and not isinstance(s, bool)), default=0)


def _first_two_saves(saved: dict[str, Any]) -> list[int]:
    """The steps of a run's first two checkpoints by its saved config (fewer when it saves
    fewer times; none when the config gives no step count). The loop saves after each
    evaluation (every ``eval_every`` steps, default ``num_train_steps``), every
    ``checkpoint_every`` steps (default ``eval_every``) and at the last step."""

    def count(key: str) -> int | None:
        value = saved.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    total = count("num_train_steps")
    if total is None or total < 1:
        return []
    evaluate = max(count("eval_every") or total, 1)
    save = max(count("checkpoint_every") or evaluate, 1)
    steps = {m for every in (evaluate, save) for m in (every, 2 * every) if m < total}
    return sorted(steps | {total})[:2]


def _refuse_history_without_checkpoints(workdir: Path, saved: dict[str, Any]) -> None:
    """Raise :class:`WorkdirError` when ``workdir`` has no checkpoint but a finished run's
    ``results.json``, or metrics logged past a save that must have completed: its checkpoints
    were deleted, and a rerun would train from step 0 over its history. (An attempt that
    stopped before it completed a checkpoint is rerun as before.)

    Which save: without a ``checkpoints/`` folder (the run makes it as it starts, so it was
    deleted), the first. With one, the second: saves run in the background, each waiting for
    the one before, so a run killed during its first save has logged up to its second."""
    saves, which = _first_two_saves(saved), "first"
    if (workdir / "checkpoints").is_dir():
        saves, which = saves[1:], "second"
    if (workdir / "results.json").exists():
        what = "a finished run's results.json"
    elif saves and (logged := _last_logged_step(workdir / "metrics.jsonl")) > saves[0]:
        what = f"metrics logged up to step {logged} (its {which} checkpoint is at step {saves[0]})"
    else:
        return
    raise WorkdirError(
        f"{workdir} holds {what} but no checkpoint in {workdir / 'checkpoints'} (deleted?); "
        "nothing was changed. To train that run again from step 0, rerun with "
        "--config.resume=restart (it keeps the old run in a previous-<time>/ folder), or use a "
        "new --workdir"
    )


def _refuse_an_edited_config(
    workdir: Path, config: Any, defaults: Mapping[str, Any] | None, structural: list[str]
) -> None:
    """Raise :class:`ConfigChangedError` saying so when ``config.json`` was changed after the
    run's newest checkpoint was saved and the new ``config`` matches that checkpoint's copy
    (:func:`config_copy`) in the ``structural`` keys it changes: ``config.json`` was edited by
    hand (or a forced resume stopped before its first checkpoint). The general refusal blamed
    the new config and offered ``restart`` first, which would set a run aside that its
    command still fits."""
    copy = config_copy(workdir)
    if copy is None:
        return
    changed = {line.split(":", 1)[0] for line in structural}
    against_copy, _, _ = compare_configs(copy[1], config, defaults)
    if changed & {line.split(":", 1)[0] for line in against_copy}:
        return
    raise ConfigChangedError(
        f"{workdir / 'config.json'} differs from the config its newest checkpoint was saved "
        f"with ({copy[0]}), which the new config matches ({'; '.join(structural)}): "
        "config.json was edited after that save (or a --config.resume=force resume stopped "
        "before its first checkpoint); nothing was changed. To resume the checkpoints as "
        "saved, rerun with --config.resume=force (config.json then takes the new config)"
    )


def check_resume(
    workdir: str | Path, config: Any, defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """Decide whether the run in ``workdir`` may continue with ``config`` (process 0, before
    anything of the new run is written). Returns lines describing what happened (for the log).
    ``defaults``: what absent keys stand for (:func:`compare_configs`). The changes a resume
    accepts are one line, the structural ones (``--config.resume=force``) first.

    Raises :class:`WorkdirError` when the workdir holds files of a run (checkpoints, metrics,
    ...) but no ``config.json`` and no checkpoint holding a copy of one: a run writes that
    first, right after taking the lock, so these are someone else's and are left alone (with a
    copy, ``config.json`` is rebuilt from it, as is one that is not JSON). Raises :class:`ConfigChangedError` on
    structural changes with ``resume="auto"`` when the
    workdir holds a committed checkpoint; without one (an earlier attempt failed before its
    first checkpoint) there is nothing to continue and the new config is accepted.
    """
    workdir = Path(workdir)
    choice = resume_choice(config)
    saved, notes = _saved_or_rebuilt_config(workdir)
    if choice == "restart":
        if has_previous_run(workdir):
            folder = archive_previous_run(workdir)
            return [
                *notes,
                f"--config.resume=restart: the previous run in {workdir} was moved to "
                f"{folder}; starting again from step 0",
            ]
        return notes
    if saved is None:
        return notes
    if not has_checkpoint(workdir):
        _refuse_history_without_checkpoints(workdir, saved)
    structural, harmless, other = compare_configs(saved, config, defaults)
    if structural and not has_checkpoint(workdir):
        changes = structural + other
        shown = "; ".join(changes[:LISTED_CHANGES])
        if len(changes) > LISTED_CHANGES:
            shown += f"; and {len(changes) - LISTED_CHANGES} more"
        return [
            f"{workdir / 'config.json'} (of an attempt that saved no checkpoint) is replaced by "
            f"the new config ({shown})"
        ]
    if structural and choice == "auto":
        _refuse_an_edited_config(workdir, config, defaults, structural)
        raise ConfigChangedError(
            f"{workdir / 'config.json'} holds a run whose checkpoints cannot continue with the "
            f"new values ({', '.join(structural)}); nothing was changed. Use a new --workdir, "
            "or --config.resume=restart to keep that run in a previous-<time>/ folder of this "
            "workdir and start again, or --config.resume=force to try resuming anyway"
        )
    # One line, the structural changes first: as several warnings, a forced resume's changed
    # model was easy to miss under the run settings that followed it.
    parts = []
    if structural:
        parts.append(
            "changed model/data/optimizer settings (--config.resume=force): "
            + "; ".join(structural)
        )
    if other:
        parts.append("new values that change training from here on: " + "; ".join(other))
    if harmless:
        parts.append("new run settings: " + "; ".join(harmless))
    return [*notes, "resuming with " + "; and with ".join(parts)] if parts else notes

"""Failure detection: a lost peer and a stalled step or input end the run, never hang.

Two background threads:

- :class:`PeerMonitor` (multi-process runs only) asks the coordination service every ``poll_s``
  which processes are alive. The service declares a process dead after ``heartbeat_timeout``
  seconds without a heartbeat (see :func:`hgrn_jax.sharding.maybe_initialize_distributed`); the
  monitor then prints one line naming the lost processes and exits. A collective of the main
  thread usually fails first (gloo: ``Connection reset by peer``, at once): :class:`Guard` then
  asks the monitor (:meth:`PeerMonitor.collective_failed`) and the process ends with the same
  line, instead of a traceback followed by JAX's abort at the shutdown barrier in Python's exit
  handlers. JAX itself also terminates the surviving processes once the service reports the
  failure (a ``Terminating process because the JAX distributed service detected fatal errors``
  abort); the monitor's exit usually comes first, JAX's log line sometimes still shows.
- :class:`StepWatchdog` (every run, one process too) ends the process when the training loop
  has made no progress for ``timeout_s`` seconds: no batch from the input pipeline (a hung input
  worker, a stalled data folder) or no finished step (a stuck device computation or checkpoint
  write; in a pod, a peer that is alive but stuck, a collective that never completes). The clock
  starts after the first step (which compiles); each step and each delivered batch resets it.
  ``HGRN_STEP_TIMEOUT_S=0`` turns it off.

  One exception: in a one-process run whose input is read in worker processes, the first input
  stall since the last delivered batch does not end the run. The watchdog warns, kills the
  worker processes and starts its clock again; the training loop, waiting in grain's ``next()``,
  then gets grain's dead-worker error and the input pipeline starts new workers at the same step
  (:mod:`hgrn_jax.data.grain_pipeline`; the batches are the same). A second stall before a batch
  arrives ends the run as any other stall, its message saying that a restart was tried.

Before exiting, a process kills its own multiprocessing children (the input workers; a hung one
would outlive it). The exit code is :data:`EXIT_LOST_PEER`; the last complete checkpoint stays
on disk, and running the same command again resumes from it (with ``--config.resume=auto`` for
a run started with another choice: the messages say so).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

EXIT_LOST_PEER = 3
"""Exit code of a process that stopped because a peer process was lost, or the step or its
input stalled."""

DEFAULT_STEP_TIMEOUT_S = 1800.0
"""Step watchdog limit when ``HGRN_STEP_TIMEOUT_S`` is unset: longer than any evaluation or
checkpoint of the paper configurations on a pod slice, so it only fires on a real stall."""

RESUME_HINT = "run the same command again to resume"
"""How the messages say to resume (a run started with ``--config.resume=restart`` passes its
own: the same command would start again)."""


def step_timeout_from_env() -> float:
    """``HGRN_STEP_TIMEOUT_S`` in seconds (0: no step watchdog), else the default; ValueError
    naming the variable for anything else."""
    text = os.environ.get("HGRN_STEP_TIMEOUT_S", "")
    if not text.strip():
        return DEFAULT_STEP_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"HGRN_STEP_TIMEOUT_S={text!r} must be a number of seconds (0 turns the step "
            f"watchdog off; unset: {DEFAULT_STEP_TIMEOUT_S:.0f})"
        )
    return value


def kill_child_processes() -> int:
    """SIGKILL this process's multiprocessing children (the input workers, perhaps hung ones);
    how many there were."""
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    return len(children)


_exit_lock = threading.Lock()


COORDINATOR_LINGER_S = 5.0
"""Seconds process 0 of a pod waits after its lost-peer line before exiting: it hosts the
coordination service, whose end makes JAX abort every process still connected to it (``Failed
to send RPC to coordination service``, SIGABRT); the other survivors learn of the loss from the
same poll and end with their own line in that time."""


def _exit_with(message: str, linger_s: float = 0.0) -> None:
    # One line only: the peer monitor and the main thread (a failed collective) may both get
    # here; the second waits on the lock until the first has ended the process. One write, so
    # that a log line of JAX's C++ threads cannot land inside it.
    with _exit_lock:
        sys.stderr.flush()
        os.write(2, (message + "\n").encode())
        kill_child_processes()  # a hung input worker would outlive this process
        time.sleep(linger_s)
        # os._exit, not sys.exit: the main thread may be blocked in a collective forever, and
        # JAX's exit handler would meet the lost process at the shutdown barrier, which fails
        # and aborts the process (``Check failure``, SIGABRT) after this line.
        os._exit(EXIT_LOST_PEER)


def heartbeat_timeout_from_env() -> float:
    """The coordination service's heartbeat timeout: ``HGRN_HEARTBEAT_TIMEOUT_S``, else JAX's
    default (100 s); see :func:`hgrn_jax.sharding.maybe_initialize_distributed`."""
    try:
        return float(os.environ.get("HGRN_HEARTBEAT_TIMEOUT_S", "") or 100)
    except ValueError:
        return 100.0


_STATUS_CODES = (
    "UNKNOWN",
    "INTERNAL",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "ABORTED",
    "CANCELLED",
    "FAILED_PRECONDITION",
    "DATA_LOSS",
)


def is_collective_failure(error: BaseException) -> bool:
    """An error that a lost peer process may cause in a multi-process run: JAX's runtime error
    (``jax.errors.JaxRuntimeError``), or an XLA status surfaced as another type (gloo's
    ``Connection reset by peer`` arrives as ``ValueError: UNKNOWN: Gloo AllGather failed`` when
    it breaks a transfer to the host). Only the coordination service can tell whether a peer was
    really lost (:meth:`PeerMonitor.collective_failed`)."""
    import jax

    if isinstance(error, jax.errors.JaxRuntimeError):
        return True
    return isinstance(error, Exception) and str(error).startswith(
        tuple(f"{code}: " for code in _STATUS_CODES)
    )


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters of the message."""
    text = (str(error).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def collective_failure_message(
    process_index: int, error: BaseException, resume_hint: str = RESUME_HINT, waited_s=None
) -> str:
    """The line of a process whose collective failed when no lost process could be named."""
    waited = (
        f"; the coordination service named no lost process in {waited_s:.0f} s"
        if waited_s is not None
        else ""
    )
    return (
        f"error: process {process_index}: a collective failed: a peer process was probably lost "
        f"({first_line(error)}){waited}; stopping. The last complete checkpoint is kept: "
        f"{resume_hint} from it."
    )


def _print_warning(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _live_nodes_of_client() -> Callable[[Sequence[int]], Sequence[int]] | None:
    from jax._src import distributed  # the coordination client has no public accessor

    client = distributed.global_state.client
    if client is None:
        return None
    return lambda ids: list(client.get_live_nodes(list(ids)))


_started_monitors: list[PeerMonitor] = []


class PeerMonitor:
    """Polls the coordination service for live processes; on a loss calls ``on_lost(message)``.

    Args:
      process_index, process_count: this process and how many there are.
      live_nodes: ``ids -> live ids`` (default: the JAX coordination client's
        ``get_live_nodes``); tests pass their own.
      poll_s: seconds between polls.
      on_lost: called with the message (default: print it and exit with
        :data:`EXIT_LOST_PEER`; process 0, which hosts the coordination service, after
        :data:`COORDINATOR_LINGER_S`).
      resume_hint: how the message says to resume (:data:`RESUME_HINT`).
    """

    def __init__(
        self,
        process_index: int,
        process_count: int,
        *,
        live_nodes: Callable[[Sequence[int]], Sequence[int]] | None = None,
        poll_s: float = 1.0,
        on_lost: Callable[[str], None] | None = None,
        resume_hint: str = RESUME_HINT,
    ):
        if on_lost is None:
            linger_s = COORDINATOR_LINGER_S if process_index == 0 else 0.0
            on_lost = functools.partial(_exit_with, linger_s=linger_s)
        self.process_index, self.process_count = process_index, process_count
        self.resume_hint = resume_hint
        self._live_nodes = live_nodes
        self.poll_s, self.on_lost = poll_s, on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._polled = threading.Condition()
        self._polls = 0  # polls that found every process alive
        self._done = False  # the polling thread ended

    def lost(self) -> list[int]:
        """The processes the coordination service no longer counts as alive."""
        everyone = range(self.process_count)
        return sorted(set(everyone) - set(self._live_nodes(everyone)))

    def message(self, lost: Sequence[int]) -> str:
        names = ", ".join(map(str, lost))
        return (
            f"error: process {self.process_index}: lost process{'es' if len(lost) > 1 else ''}"
            f" {names} (no heartbeat: killed, crashed or preempted); stopping. The last "
            f"complete checkpoint is kept: {self.resume_hint} from it."
        )

    def _watch(self) -> None:
        try:
            self._poll_until_lost()
        finally:
            with self._polled:
                self._done = True
                self._polled.notify_all()

    def _poll_until_lost(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                lost = self.lost()
            except Exception as error:
                if self._stop.is_set():
                    return
                self.on_lost(
                    f"error: process {self.process_index}: the coordination service "
                    f"stopped answering ({type(error).__name__}: {str(error)[:200]}); "
                    f"process 0 is probably lost; {self.resume_hint}."
                )
                return
            # The service's answer waits until every live process has asked too, so a process
            # that left the training loop (and stopped asking) is seen as gone only once it has
            # exited: by then this process has left the loop as well, and stop() was called.
            if lost and not self._stop.is_set():
                self.on_lost(self.message(lost))
                return
            with self._polled:
                self._polls += 1
                self._polled.notify_all()

    def collective_failed(self, error: BaseException, timeout_s: float) -> bool:
        """The main thread's collective raised ``error``: was a peer lost? Waits for a poll
        that began after the failure (the coordination service answers once every live
        process has asked, so a dead peer delays the answer until its heartbeat timeout, and
        the answer names it). False when that poll found every process alive (the error is
        this process's own; the caller raises it). Otherwise True, ``on_lost`` having been
        called with the monitor's line naming the lost processes or, when no poll answered
        within ``timeout_s``, with :func:`collective_failure_message` (by default either
        ends the process, exit :data:`EXIT_LOST_PEER`). A monitor that is not running
        (one process) returns False at once."""
        if self._thread is None or self._stop.is_set():
            return False
        with self._polled:
            # The poll under way may have begun before the failure; the next one did not.
            target = self._polls + 2
            answered = self._polled.wait_for(lambda: self._polls >= target or self._done, timeout_s)
            if answered and not self._done:
                return False
            if self._done:  # the monitor called on_lost (or was stopped)
                return True
        self.on_lost(
            collective_failure_message(self.process_index, error, self.resume_hint, timeout_s)
        )
        return True

    def start(self) -> PeerMonitor:
        if self.process_count > 1:
            if self._live_nodes is None:
                self._live_nodes = _live_nodes_of_client()
            if self._live_nodes is not None:
                self._thread = threading.Thread(
                    target=self._watch, name="peer-monitor", daemon=True
                )
                self._thread.start()
                _started_monitors.append(self)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the polling thread to end; True if it has (or never ran)."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            return not self._thread.is_alive()
        return True


class StepWatchdog:
    """Calls ``on_stall(message)`` when the training loop made no progress for ``timeout_s``.

    Progress is a finished step (:meth:`beat`), a finished evaluation (:meth:`evaluated`) or a
    delivered batch (the end of :meth:`waiting_for_input`). Armed by the first :meth:`beat` (the
    first step compiles, which may take long); :meth:`pause` stops the clock for a phase with
    its own duration (a whole evaluation), and the next progress starts it again.

    With ``restart_input`` (a one-process run whose input has worker processes, see
    :class:`Guard`), the first input stall since the last delivered batch calls
    ``on_warning(message)`` and ``restart_input()`` (which must make the waiting ``next()``
    return or raise: the training loop passes one that kills the input workers, which the
    input pipeline then replaces) and starts the clock again, so the new workers' start-up
    counts against ``timeout_s``. A second stall for the same batch calls ``on_stall`` as any
    other stall.
    ``clock`` (seconds, default :func:`time.monotonic`) lets tests drive :meth:`check` with a
    clock of their own instead of :meth:`start`'s thread.
    """

    def __init__(
        self,
        timeout_s: float,
        process_index: int = 0,
        *,
        process_count: int = 1,
        on_stall: Callable[[str], None] = _exit_with,
        poll_s: float | None = None,
        resume_hint: str = RESUME_HINT,
        restart_input: Callable[[], object] | None = None,
        on_warning: Callable[[str], None] = _print_warning,
        clock: Callable[[], float] = time.monotonic,
    ):
        if timeout_s <= 0:
            raise ValueError(f"step timeout must be positive, got {timeout_s}")
        self.timeout_s, self.process_index, self.on_stall = timeout_s, process_index, on_stall
        self.process_count = process_count
        self.resume_hint = resume_hint
        self.restart_input, self.on_warning, self._clock = restart_input, on_warning, clock
        self.poll_s = poll_s if poll_s is not None else min(1.0, timeout_s / 4)
        self._armed = False
        self._last: float | None = None
        self._step = 0
        self._input_step: int | None = None  # the step whose batch is awaited, if any
        self._restarted_for: int | None = None  # the step whose batch a restart awaits
        self._after_evaluation = False  # since an evaluation, no batch fetched yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int) -> None:
        """Step ``step`` finished (was dispatched); restart the clock."""
        self._step, self._armed, self._last = step, True, self._clock()
        self._after_evaluation = False

    def evaluated(self, step: int) -> None:
        """The evaluation after step ``step`` finished; restart the clock (what follows, a
        checkpoint and the next batch, is timed again)."""
        self.beat(step)
        self._after_evaluation = True

    def pause(self) -> None:
        """Stop the clock until the next wait for input or :meth:`beat`."""
        self._last = None

    @contextlib.contextmanager
    def waiting_for_input(self, step: int) -> Iterator[None]:
        """Around fetching the batch of step ``step`` (0-based): a stall inside is the input's."""
        self._input_step = step
        if self._armed:
            self._last = self._clock()
        try:
            yield
        finally:
            self._input_step = None
            self._after_evaluation = False
            if self._armed:
                self._last = self._clock()

    def _stall(self, step: int | None) -> str:
        """What stalled, ``step`` being the awaited batch's if any: ``"the input pipeline
        delivered no batch ..."``."""
        waited = f"{self.timeout_s:.0f} s"
        if step is not None:
            return f"the input pipeline delivered no batch for step {step} in {waited}"
        if self._after_evaluation:
            return f"no progress in {waited} after the evaluation at step {self._step}"
        return f"no training step finished in {waited} after step {self._step}"

    def message(self) -> str:
        """What a stall now would print."""
        me = f"error: process {self.process_index}: " if self.process_count > 1 else "error: "
        step = self._input_step  # read once: the main thread may go on meanwhile
        what = self._stall(step)
        if step is not None and step == self._restarted_for:
            what += (
                ", again after its worker processes were killed and restarted at that step (a "
                "data folder that stopped answering, or a batch that hangs every worker); "
                "stopping. Raise HGRN_STEP_TIMEOUT_S if a batch can take this long"
            )
        elif step is not None:
            what += (
                " (a hung input worker process, or a data folder that stopped answering); "
                "stopping. Raise HGRN_STEP_TIMEOUT_S if a batch can take this long"
            )
        elif self._after_evaluation:
            stuck = (
                "a peer process is stuck or lost, or still evaluating (every process must yield "
                "the same number of evaluation batches, see docs/tasks.md)"
                if self.process_count > 1
                else "a checkpoint write is stuck"
            )
            what += (
                f"; {stuck}; stopping. Raise HGRN_STEP_TIMEOUT_S if a checkpoint can take this long"
            )
        else:
            stuck = (
                "a peer process is stuck or lost"
                if self.process_count > 1
                else "a device computation or a checkpoint write is stuck"
            )
            what += f"; {stuck}, stopping. Raise HGRN_STEP_TIMEOUT_S if steps are this slow"
        return f"{me}{what}. The last complete checkpoint is kept: {self.resume_hint}."

    def _may_restart_input(self, step: int | None) -> bool:
        return self.restart_input is not None and step is not None and step != self._restarted_for

    def _restart_input(self, step: int) -> bool:
        """Warn, restart the input and start the clock again; False (after ``on_stall``) when
        ``restart_input`` raised."""
        self.on_warning(
            f"warning: {self._stall(step)}; killing its worker processes and starting new ones at "
            f"step {step} (the batches are the same)"
        )
        try:
            self.restart_input()
        except Exception as error:  # the thread would end, and the run hang for good
            self.on_stall(f"{self.message()} Restarting the input failed: {error!r:.200}")
            return False
        self._restarted_for = step
        self._last = self._clock()
        return True

    def check(self) -> bool:
        """One look at the clock: on a stall, restart the input (see the class docstring) or
        call ``on_stall``. True once the watchdog is done (it called ``on_stall``)."""
        last = self._last
        if last is None or self._clock() - last <= self.timeout_s:
            return False
        step = self._input_step  # read once: the main thread may go on meanwhile
        if self._may_restart_input(step):
            return not self._restart_input(step)
        self.on_stall(self.message())
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check():
                return

    def start(self) -> StepWatchdog:
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


PEERS_ALIVE_NOTE = "(every peer process was alive when this error was raised)"
"""The note a multi-process run's runtime error gets once the peer monitor found every process
alive: not a lost peer (experiments.train then shows it as any other error)."""


class Guard:
    """Both monitors for one run, used as a context manager around training: ``beat`` after
    every step, ``waiting_for_input`` around fetching a batch, ``pause`` before an evaluation
    and ``evaluated`` after it.
    The peer monitor runs only with several processes; the step watchdog always, unless
    ``step_timeout_s`` (default ``HGRN_STEP_TIMEOUT_S``, see :func:`step_timeout_from_env`)
    is 0.

    ``restart_input`` (the training loop passes one when the input is read in worker
    processes) lets the step watchdog restart a stalled input once per batch instead of ending
    the run (:class:`StepWatchdog`), in a one-process run only. A process of a pod keeps
    ending the run: its peers wait for it in the step's collectives, their own watchdogs end
    them after the same timeout (no step finished), and the rerun resumes the whole pod from
    the last checkpoint, which a restart of one process's input cannot spare.

    With several processes, a runtime error leaving the ``with`` block
    (:func:`is_collective_failure`: a collective that failed because a peer died) first asks the peer monitor whether a peer was lost
    (:meth:`PeerMonitor.collective_failed`): if so the process ends there with the monitor's
    line and exit 3; if every peer is alive, the error gets :data:`PEERS_ALIVE_NOTE` and
    propagates. ``expected`` errors (a preemption every process agreed on) are not asked
    about."""

    def __init__(
        self,
        process_index: int,
        process_count: int,
        step_timeout_s: float | None = None,
        resume_hint: str = RESUME_HINT,
        restart_input: Callable[[], object] | None = None,
        expected: tuple[type[BaseException], ...] = (),
    ):
        self.expected = expected
        if step_timeout_s is None:
            step_timeout_s = step_timeout_from_env()
        self.process_count = process_count
        self.peers = PeerMonitor(process_index, process_count, resume_hint=resume_hint)
        self.steps = (
            StepWatchdog(
                step_timeout_s,
                process_index,
                process_count=process_count,
                resume_hint=resume_hint,
                restart_input=restart_input if process_count == 1 else None,
            )
            if step_timeout_s > 0
            else None
        )

    def __enter__(self) -> Guard:
        self.peers.start()  # a no-op with one process
        if self.steps is not None:
            self.steps.start()
        return self

    def beat(self, step: int) -> None:
        if self.steps is not None:
            self.steps.beat(step)

    def pause(self) -> None:
        if self.steps is not None:
            self.steps.pause()

    def evaluated(self, step: int) -> None:
        if self.steps is not None:
            self.steps.evaluated(step)

    def waiting_for_input(self, step: int) -> contextlib.AbstractContextManager[None]:
        if self.steps is None:
            return contextlib.nullcontext()
        return self.steps.waiting_for_input(step)

    def __exit__(self, kind, error, traceback) -> None:
        if (
            self.process_count > 1
            and is_collective_failure(error)
            and not isinstance(error, self.expected)
        ):
            # A collective failing (gloo: ``Connection closed by peer``, raised as one error
            # type or another) is how the main thread learns of a lost peer, often long before
            # the heartbeat timeout. Ask the peer monitor first: a lost peer ends the process
            # here with the monitor's one line and exit 3, instead of a traceback (or a
            # one-line error, exit 2) and then JAX's abort at the shutdown barrier. With every
            # peer alive the answer takes a poll or two. Errors every process raises together
            # (a non-finite loss, a preemption) are not asked about: a process done asking
            # stops polling, and a peer still asking would take it for lost.
            self.pause()  # the wait below is not a stalled step
            if not self.peers.collective_failed(error, heartbeat_timeout_from_env() + 15):
                error.add_note(PEERS_ALIVE_NOTE)  # the error is this process's own
        self.peers.stop()
        if self.steps is not None:
            self.steps.stop()


def stop_after_collective_failure(
    error: BaseException, process_index: int, resume_hint: str = RESUME_HINT
) -> None:
    """A runtime error outside the training loop (no peer monitor to ask) in a multi-process
    run: print :func:`collective_failure_message` and exit :data:`EXIT_LOST_PEER` (os._exit:
    JAX's exit handler would abort at the shutdown barrier, which a lost peer never reaches)."""
    _exit_with(collective_failure_message(process_index, error, resume_hint))


def shut_down_distributed(timeout_s: float = 30.0) -> bool:
    """End a multi-process run cleanly, before the interpreter exits: stop every peer monitor,
    shut JAX's coordination client down (a barrier with the other processes), then wait up to
    ``timeout_s`` for the monitors' threads. True if they all ended; a no-op with one process.

    A monitor's thread may be inside the client's ``get_live_nodes`` when training ends: the
    call waits until every live process has asked, and the others have stopped asking. Left to
    the interpreter's exit, JAX's own shutdown releases the call while the interpreter is
    finalizing; the thread, returning to Python, is unwound through C++ frames that cannot
    unwind, and the process aborts (``terminate called after throwing an instance of ''``,
    SIGABRT) with every result already written. Shut down here, the call returns (or raises)
    into a live interpreter and the thread ends.
    """
    import jax

    for monitor in _started_monitors:
        monitor.stop()
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    ended = all([monitor.join(timeout_s) for monitor in _started_monitors])
    _started_monitors.clear()
    return ended

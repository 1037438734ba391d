"""Stopping a run between steps: SIGTERM (preemption), SIGHUP (its terminal closed) and
Ctrl-C, agreed across processes.

:class:`StopSignals` notes a SIGTERM or SIGHUP, or a first Ctrl-C while the training loop runs;
:func:`stop_requests` makes every process of a pod stop at the same step; the loop then writes a
checkpoint and raises :class:`Preempted`, whose message says how to resume
(:func:`how_to_resume`).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax

from hgrn_jax.training import agreement, watchdog
from hgrn_jax.training.terminal import leave_the_terminal

PREEMPTED_EXIT_CODE = 0
"""Exit code of ``experiments.train`` after a SIGTERM: the checkpoint is safe; rerun to resume.
(After a Ctrl-C it ends by SIGINT, as an interrupted program should, so that the shell or
script that ran it stops too.)"""


PREEMPTION_CHECK_EVERY = 10
"""In multi-process runs, how often (in steps) the processes agree on whether to stop."""


class Preempted(Exception):
    """SIGTERM (or a first Ctrl-C, SIGINT) arrived; a checkpoint at ``step`` was written.

    The message says how to resume: with ``resume="auto"`` (the default) the same command
    again; with another ``config.resume``, the command with ``--config.resume=auto`` (the same
    command with ``restart`` would move the run aside and start again at step 0).
    """

    def __init__(
        self, step: int, workdir: str | Path, resume: str = "auto", signal_name: str = "SIGTERM"
    ):
        self.step, self.workdir, self.resume = step, workdir, resume
        self.signal_name = signal_name
        how = {"SIGINT": "interrupted", "SIGHUP": "hung up"}.get(signal_name, "preempted")
        saved = f"{how} ({signal_name}): saved a checkpoint at step {step} in {workdir}; "
        super().__init__(saved + how_to_resume(resume))


def how_to_resume(resume: str) -> str:
    """How a stopped run's messages say to resume it, for its ``config.resume`` choice: the
    same command with ``auto``; otherwise the command with ``--config.resume=auto``."""
    if resume == "auto":
        return watchdog.RESUME_HINT
    how = "to resume, run the command again with --config.resume=auto"
    if resume == "restart":
        how += (
            " (the same command, with --config.resume=restart, would move this run aside and "
            "start again at step 0)"
        )
    return how


class StopSignals:
    """Sets ``requested`` on SIGTERM or SIGHUP, or on a first SIGINT (Ctrl-C) while the
    training loop runs, while it is entered (from the main thread only); restores the previous
    handlers on exit.

    SIGHUP: the terminal that started the run closed (an ssh connection lost, a terminal
    window shut, without ``nohup`` or ``tmux``). Its default action ended the run at once,
    losing every step since the last checkpoint; it is now a stop after the step with a
    checkpoint, as SIGTERM, and the hung-up terminal's stdout and stderr are pointed at
    ``/dev/null`` first (:func:`~hgrn_jax.training.terminal.leave_the_terminal`: writing to
    it fails with EIO, which would stop the run before it saved). A run started under
    ``nohup`` ignores SIGHUP and still does.

    A first Ctrl-C in the training loop (:meth:`training`) says at once that the run will stop
    after the step and save; a second one, or one before the loop (building, preparing data:
    nothing to save yet) or after it (the test evaluation), raises :class:`KeyboardInterrupt`
    as usual. A SIGTERM is noted whenever it comes (a preemption notice during start-up stops
    the run at its first step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signum != signal.SIGTERM and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # ignored Ctrl-C (a script's background job), nohup: kept so
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def training(self, running: bool) -> None:
        """Whether the training loop runs, where a first Ctrl-C saves before it stops."""
        self._training = running

    def _handle(self, signum, frame) -> None:
        del frame
        interrupt = signum == signal.SIGINT
        if interrupt and (not self._training or self.signal_name == "SIGINT"):
            raise KeyboardInterrupt
        if signum == signal.SIGHUP:
            leave_the_terminal()
        if interrupt:
            # os.write: the main thread, which runs this handler, may be inside a print.
            os.write(
                2,
                b"\ninterrupted (SIGINT): stopping after this step and saving a checkpoint; "
                b"press Ctrl-C again to stop at once (the last complete checkpoint is kept)\n",
            )
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def stop_requests(step: int, preempted: bool, out_of_time: bool) -> tuple[bool, bool]:
    """(preempted, out_of_time) after ``step``, each true on every process when it is true on
    any (SIGTERM received, the time budget spent), decided at the same step everywhere.

    One process takes its flags after every step. Several processes must stop at the same step,
    so they compare flags (one small all-gather for both, which waits for the devices) every
    :data:`PREEMPTION_CHECK_EVERY` steps only, keeping the step pipeline full in between.
    """
    if jax.process_count() > 1 and step % PREEMPTION_CHECK_EVERY:
        return False, False
    return agreement.any_process_each((preempted, out_of_time))

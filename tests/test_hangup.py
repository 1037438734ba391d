"""A run whose terminal closes (SIGHUP: an ssh connection lost, a terminal window shut, without
``nohup`` or ``tmux``) saves a checkpoint and stops, as after SIGTERM; by SIGHUP's default
action it died at once, losing every step since its last checkpoint and leaving its lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(script: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )


def test_a_hangup_is_a_stop_with_a_checkpoint_and_leaves_the_dead_terminal():
    """In the training loop SIGHUP asks for a stop after the step, as SIGTERM; stderr, a
    terminal that hung up (writes fail with EIO: a validation line printed before the save
    stopped the run), now goes to /dev/null, and stdout, a pipe, is kept. Under ``nohup``
    (SIGHUP ignored) the run still ignores it. An input worker ignores SIGHUP, which a shell
    sends to its whole job."""
    done = _python(
        """
        import os, pty, signal, sys
        from hgrn_jax.training.preemption import Preempted, StopSignals

        master, terminal = pty.openpty()
        os.dup2(terminal, 2)
        os.close(master)  # the terminal hangs up
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            print("a line after the hangup", file=sys.stderr, flush=True)
        print(stop.requested, stop.signal_name, Preempted(7, "DIR", signal_name="SIGHUP"))

        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
        print("under nohup:", stop.requested)
        """
    )
    assert done.returncode == 0, done.stderr or f"exit status {done.returncode}"
    assert done.stdout.splitlines() == [
        "True SIGHUP hung up (SIGHUP): saved a checkpoint at step 7 in DIR; run the same "
        "command again to resume",
        "under nohup: False",
    ]


def test_an_input_worker_ignores_a_hangup():
    done = _python(
        """
        import os, signal
        from hgrn_jax.data import grain_pipeline

        grain_pipeline._worker_start(os.getppid(), 0, 1)
        os.kill(os.getpid(), signal.SIGHUP)
        print("alive")
        """
    )
    assert done.stdout == "alive\n", f"{done.returncode}: {done.stderr}"


def test_a_hung_up_stdout_is_left_too_and_a_piped_stderr_kept():
    """stdout on the terminal that hung up goes to /dev/null as stderr does (a print after the
    hangup failed with EIO); stderr, a pipe here, keeps its pipe."""
    done = _python(
        """
        import os, pty, sys
        from hgrn_jax.training.terminal import leave_the_terminal

        master, terminal = pty.openpty()
        os.dup2(terminal, 1)
        os.close(master)  # the terminal hangs up
        leave_the_terminal()
        print("a line after the hangup", flush=True)
        print("stderr kept", file=sys.stderr, flush=True)
        """
    )
    assert done.returncode == 0, done.stderr or f"exit status {done.returncode}"
    assert done.stderr == "stderr kept\n"

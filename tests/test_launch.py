"""The pod launcher, the failure monitors and the pod logs, without JAX processes (seconds).

The real multi-process runs are in tests/test_pod.py; here the launcher runs small Python
programs, and the monitors get fake clocks and fake coordination services.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from two_processes import wait_until_gone

from experiments import launch
from hgrn_jax.data import loader
from hgrn_jax.training import podlog, watchdog

REPO = Path(__file__).resolve().parents[1]


def test_process_env_sets_the_coordinator_and_devices_and_keeps_other_settings():
    base = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d",
        "JAX_COMPILATION_CACHE_DIR": "/c",
        "JAX_LOCAL_DEVICE_IDS": "0",
        "HOME": "/h",
        "HGRN_STEP_TIMEOUT_S": "5",
    }
    env = launch.process_env(base, 2, 4, 3, 1234)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("4", "2")
    assert env["JAX_NUM_CPU_DEVICES"] == env["HGRN_NUM_CPU_DEVICES"] == "3"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"
    assert "JAX_LOCAL_DEVICE_IDS" not in env
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/c" and env["HOME"] == "/h"
    assert env["HGRN_STEP_TIMEOUT_S"] == "5"  # the user's choice wins over the launcher's default
    assert env["HGRN_HEARTBEAT_TIMEOUT_S"] == str(launch.HEARTBEAT_TIMEOUT_S)


def test_train_command_and_exit_descriptions():
    assert launch.train_command(["--config=c.py", "--workdir=w"]) == [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=c.py",
        "--workdir=w",
    ]
    assert launch.train_command(["python3", "x.py", "--a"]) == [sys.executable, "x.py", "--a"]
    assert launch.train_command(["./tool", "--a"]) == ["./tool", "--a"]
    assert launch.describe_exit(3) == "exit code 3"
    assert launch.describe_exit(-9) == "killed by SIGKILL"


def test_parse_args_requires_the_train_arguments(capsys):
    args, rest = launch.parse_args(
        ["--num_processes=4", "--devices_per_process=2", "--", "--config=x"]
    )
    assert (args.num_processes, args.devices_per_process, rest) == (4, 2, ["--config=x"])
    with pytest.raises(SystemExit) as exit_info:
        launch.parse_args(["--num_processes=4", "--devices_per_process=2"])
    assert exit_info.value.code == 2
    assert "give the experiments.train arguments after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.parse_args(["--num_processes=0", "--devices_per_process=2", "--", "--x"])


# Each process says hello on stdout and stderr; process 1 then fails with exit code 3 while the
# others wait for a signal and report it.
CHILD = r"""
import os, signal, sys, time
me = int(os.environ["JAX_PROCESS_ID"])
def stop(signum, frame):
    print(f"got {signal.Signals(signum).name}", flush=True)
    if signum == signal.SIGINT and os.environ.get("SIGINT_ENDS_BY_SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as experiments.train after a Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, stop)
print(f"hello from {me} of {os.environ['JAX_NUM_PROCESSES']}", flush=True)
print(f"devices {os.environ['JAX_NUM_CPU_DEVICES']}", file=sys.stderr, flush=True)
if me == int(os.environ.get("FAIL", -1)):
    sys.exit(3)
time.sleep(60)
"""


def test_a_failing_process_is_named_and_the_others_are_stopped(monkeypatch, tmp_path):
    monkeypatch.setattr(launch, "LOST_PEER_GRACE_S", 0.5)
    monkeypatch.setattr(launch, "STOP_GRACE_S", 5.0)
    monkeypatch.setenv("FAIL", "1")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out, err = io.StringIO(), io.StringIO()
    pod = launch.Pod(launch.train_command(["python", str(script)]), 3, 2, stdout=out, stderr=err)
    code = pod.wait()
    assert code == 3
    text = err.getvalue()
    assert "[launch] process 1 failed (exit code 3); waiting up to 0 s for processes 0, 2" in text
    assert "[launch] processes 0, 2 still running; stopping them" in text
    assert "[launch] FAILED: process 1 (exit code 3)" in text
    assert "[1] devices 2" in text
    lines = out.getvalue().splitlines()
    for i in range(3):
        assert f"[{i}] hello from {i} of 3" in lines
    assert "[0] got SIGTERM" in lines and "[2] got SIGTERM" in lines


def test_processes_that_all_failed_before_the_launcher_looked_are_a_failure():
    """Every process crashing at once (a coordination service's fatal error aborts them all
    together) used to be reported as success: the launcher stopped looking when none was
    running, before it had looked at how they ended, and exited 0."""
    err = io.StringIO()
    command = [sys.executable, "-c", "import sys; sys.exit(134)"]
    pod = launch.Pod(command, 2, 1, stdout=io.StringIO(), stderr=err)
    for proc in pod.procs:
        proc.wait()
    assert pod.wait() == 134
    assert "[launch] FAILED: process 0 (exit code 134)" in err.getvalue()
    assert "[launch] process 1 stopped (exit code 134)" in err.getvalue()


def _launch_and_signal(tmp_path, signum: int, env: dict | None = None) -> tuple[int, str, str]:
    """Run CHILD in 2 processes under the launcher, send ``signum`` to the launcher once both
    have started; its exit code, stdout and stderr."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "experiments.launch",
            "--num_processes=2",
            "--devices_per_process=1",
            "--",
            "python",
            str(script),
        ],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    while len([line for line in lines if "hello from" in line]) < 2:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"the launcher ended early: {proc.stderr.read()}")
        lines.append(line.strip())
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_the_launcher_forwards_sigterm_and_exits_0_when_all_do(tmp_path):
    code, out, err = _launch_and_signal(tmp_path, signal.SIGTERM)
    assert code == 0, err
    assert "[launch] forwarding SIGTERM to every process" in err
    assert {"[0] got SIGTERM", "[1] got SIGTERM"} <= set(out.split("\n"))


def test_the_launcher_forwards_a_hangup_instead_of_dying_by_it(tmp_path):
    """Its terminal closed: by SIGHUP's default action the launcher died, and its processes
    (in sessions of their own, out of the terminal's reach) died at their next line into its
    pipes, without saving. experiments.train saves and exits 0 after a SIGHUP."""
    code, out, err = _launch_and_signal(tmp_path, signal.SIGHUP)
    assert code == 0, err
    assert "[launch] forwarding SIGHUP to every process" in err
    assert {"[0] got SIGHUP", "[1] got SIGHUP"} <= set(out.split("\n"))


def test_a_forwarded_ctrl_c_that_ends_every_process_is_no_failure(tmp_path):
    """experiments.train saves and ends by SIGINT after a Ctrl-C; the launcher then says so
    and ends with status 130, instead of naming process 0 as failed."""
    code, out, err = _launch_and_signal(tmp_path, signal.SIGINT, env={"SIGINT_ENDS_BY_SIGINT": "1"})
    assert code == 128 + signal.SIGINT, err
    assert "[launch] forwarding SIGINT to every process" in err
    assert "[launch] interrupted (SIGINT): every process stopped" in err
    assert "FAILED" not in err and "stopped (" not in err
    assert {"[0] got SIGINT", "[1] got SIGINT"} <= set(out.split("\n"))


def test_peer_monitor_names_the_lost_process():
    messages = []
    monitor = watchdog.PeerMonitor(
        1, 4, live_nodes=lambda ids: [0, 1, 3], poll_s=0.01, on_lost=messages.append
    )
    monitor.start()
    deadline = time.monotonic() + 5
    while not messages and time.monotonic() < deadline:
        time.sleep(0.01)
    monitor.stop()
    assert messages and messages[0].startswith("error: process 1: lost process 2 (no heartbeat")
    assert "run the same command again to resume" in messages[0]
    assert watchdog.PeerMonitor(0, 3, live_nodes=lambda ids: [0]).lost() == [1, 2]


def test_process_0_lingers_after_its_lost_peer_line_so_the_others_end_by_themselves(
    monkeypatch,
):
    """Process 0 hosts the coordination service: exiting at once made JAX abort a survivor
    still waiting for the poll that names the lost peer ("Failed to send RPC to coordination
    service", SIGABRT; seen in test_pod.py under load). Its default exit waits first; the
    other processes' does not."""
    events = []
    monkeypatch.setattr(watchdog.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(watchdog.os, "_exit", lambda code: events.append(("exit", code)))
    monkeypatch.setattr(watchdog.os, "write", lambda fd, data: events.append(("write", data)))
    for index, linger in ((0, watchdog.COORDINATOR_LINGER_S), (2, 0.0)):
        events.clear()
        monitor = watchdog.PeerMonitor(index, 4, live_nodes=lambda ids: [0, 2, 3])
        monitor.on_lost(monitor.message(monitor.lost()))
        assert events == [
            ("write", monitor.message([1]).encode() + b"\n"),
            ("sleep", linger),
            ("exit", watchdog.EXIT_LOST_PEER),
        ]
    assert watchdog.COORDINATOR_LINGER_S >= 5


def test_peer_monitor_stopped_while_asking_reports_nothing():
    """The service answers once every live process has asked; a process that has left training
    is missing from the answer given after it exits, and this one stopped by then."""
    answer, messages = threading.Event(), []

    def live_nodes(ids):
        answer.wait(5)
        return [0]

    monitor = watchdog.PeerMonitor(
        0, 2, live_nodes=live_nodes, poll_s=0.01, on_lost=messages.append
    ).start()
    time.sleep(0.1)
    monitor.stop()
    answer.set()
    time.sleep(0.1)
    assert messages == []


def test_a_failed_collective_asks_the_peer_monitor_who_is_lost():
    """A collective fails in the main thread at once when a peer dies (gloo: "Connection reset
    by peer"); the coordination service names the peer only after its heartbeat timeout. The
    main thread waits for the monitor's answer: a lost peer is named in the monitor's one line
    (a pod's survivors exited with a traceback and then JAX's abort at the shutdown barrier);
    every process alive means the error is this process's own; no answer at all, the
    collective's line."""
    error = jax.errors.JaxRuntimeError("UNKNOWN: Gloo AllGather failed: Connection reset by peer")
    # The dead peer delays the service's answer, which then names it.
    dead, messages = threading.Event(), []

    def live_nodes(ids):
        dead.wait(5)
        return [0, 1, 3]

    monitor = watchdog.PeerMonitor(
        1, 4, live_nodes=live_nodes, poll_s=0.01, on_lost=messages.append
    ).start()
    threading.Timer(0.3, dead.set).start()
    assert monitor.collective_failed(error, timeout_s=10)
    assert messages == [monitor.message([2])] and "lost process 2 (no heartbeat" in messages[0]
    monitor.stop()

    # Every process alive: not a lost peer, nothing said.
    messages = []
    monitor = watchdog.PeerMonitor(
        1, 4, live_nodes=lambda ids: ids, poll_s=0.01, on_lost=messages.append
    ).start()
    start = time.monotonic()
    assert not monitor.collective_failed(error, timeout_s=10)
    assert time.monotonic() - start < 5 and messages == []
    monitor.stop()

    # No answer in time: the collective's own line, once.
    never = threading.Event()
    monitor = watchdog.PeerMonitor(
        1, 4, live_nodes=lambda ids: never.wait(30) or ids, poll_s=0.01, on_lost=messages.append
    ).start()
    assert monitor.collective_failed(error, timeout_s=0.3)
    assert messages == [
        "error: process 1: a collective failed: a peer process was probably lost "
        "(JaxRuntimeError: UNKNOWN: Gloo AllGather failed: Connection reset by peer); the "
        "coordination service named no lost process in 0 s; stopping. The last complete "
        "checkpoint is kept: run the same command again to resume from it."
    ]
    monitor.stop()
    never.set()
    # One process: no monitor runs, nothing to ask.
    assert not watchdog.PeerMonitor(0, 1).start().collective_failed(error, timeout_s=1)


def test_the_guard_ends_a_pod_process_on_a_lost_peer_and_notes_its_own_errors(monkeypatch):
    """A runtime error leaving the training loop of a pod is asked about (gloo's failure
    arrives as JaxRuntimeError or, breaking a transfer to the host, as ValueError: UNKNOWN:
    ...); an expected one (a preemption) or another error (raised by every process together:
    a process done asking would look lost to the others) is not."""
    asked = []

    def collective_failed(self, error, timeout_s):
        asked.append(type(error).__name__)
        return isinstance(error, ValueError)  # "a peer was lost" for ValueError only

    monkeypatch.setattr(watchdog.PeerMonitor, "collective_failed", collective_failed)
    monkeypatch.setenv("HGRN_HEARTBEAT_TIMEOUT_S", "1")

    class Expected(jax.errors.JaxRuntimeError):
        pass

    own = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
    for error in (ValueError("UNKNOWN: Gloo"), own, Expected("x"), KeyError("x")):
        with pytest.raises(type(error)) as raised:
            with watchdog.Guard(0, 2, step_timeout_s=0, expected=(Expected,)):
                raise error
        notes = getattr(raised.value, "__notes__", [])
        assert notes == ([watchdog.PEERS_ALIVE_NOTE] if error is own else [])
    assert asked == ["ValueError", "JaxRuntimeError"]
    with pytest.raises(jax.errors.JaxRuntimeError):  # one process: nothing to ask
        with watchdog.Guard(0, 1, step_timeout_s=0):
            raise jax.errors.JaxRuntimeError("x")
    assert asked == ["ValueError", "JaxRuntimeError"]
    assert watchdog.is_collective_failure(ValueError("UNKNOWN: Gloo AllGather failed"))
    assert watchdog.is_collective_failure(jax.errors.JaxRuntimeError("anything"))
    assert not watchdog.is_collective_failure(ValueError("vocab_size must be >= 1"))


def test_a_killed_process_whose_peers_stopped_on_it_ends_the_launcher_with_3():
    """A lost host (killed by a signal) and the others stopping on it with exit 3: the
    launcher exits 3 too, as each surviving host of a real pod does (a requeue script checks
    for 3); a killed process whose peers did not say so stays 128 + signal."""
    err = io.StringIO()
    killed = "import os, signal, time; time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)"
    command = [
        sys.executable,
        "-c",
        "import os, sys, time\n"
        f"if os.environ['JAX_PROCESS_ID'] == '1':\n    exec({killed!r})\n"
        "time.sleep(1.5); sys.exit(3)",
    ]
    pod = launch.Pod(command, 3, 1, stdout=io.StringIO(), stderr=err)
    assert pod.wait() == 3
    assert (
        "[launch] FAILED: process 1 (killed by SIGKILL); processes 0, 2 stopped on the lost peer "
        "(exit code 3)" in err.getvalue()
    )
    err = io.StringIO()
    command = [sys.executable, "-c", killed]
    pod = launch.Pod(command, 2, 1, stdout=io.StringIO(), stderr=err)
    assert pod.wait() == 128 + signal.SIGKILL
    assert "stopped on the lost peer" not in err.getvalue()


def test_shut_down_distributed_releases_a_monitor_blocked_in_the_service(monkeypatch):
    """At the end of a run a monitor's thread may be waiting inside the coordination service's
    get_live_nodes. Shutting the client down releases that call, and only then are the threads
    joined: the thread has ended before the interpreter exits (an abort at exit otherwise)."""
    released, messages, calls = threading.Event(), [], []

    def live_nodes(ids):
        calls.append(len(calls))
        released.wait(30)  # like the service's answer: only when the client shuts down
        return [0]

    def shutdown():
        calls.append("shutdown")
        released.set()

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "shutdown", shutdown)
    monitor = watchdog.PeerMonitor(
        0, 2, live_nodes=live_nodes, poll_s=0.01, on_lost=messages.append
    ).start()
    while not calls:
        time.sleep(0.01)
    start = time.monotonic()
    assert watchdog.shut_down_distributed(timeout_s=10)
    assert time.monotonic() - start < 5
    assert not monitor._thread.is_alive()
    assert calls == [0, "shutdown"] and messages == []
    # A second call (nothing left to stop) is harmless.
    assert watchdog.shut_down_distributed(timeout_s=1)


def test_step_watchdog_fires_only_when_armed_and_stalled():
    messages = []
    dog = watchdog.StepWatchdog(
        0.2, 3, process_count=4, on_stall=messages.append, poll_s=0.02
    ).start()
    time.sleep(0.4)
    assert messages == []  # not armed before the first step (which compiles)
    dog.beat(7)
    dog.pause()
    time.sleep(0.4)
    assert messages == []  # paused (an evaluation)
    dog.beat(8)
    time.sleep(0.6)
    dog.stop()
    assert len(messages) == 1
    assert messages[0].startswith(
        "error: process 3: no training step finished in 0 s after step 8; a peer process is "
        "stuck or lost, stopping."
    )
    with pytest.raises(ValueError, match="positive"):
        watchdog.StepWatchdog(0)


def test_step_watchdog_names_a_stalled_input_and_times_it_after_an_evaluation():
    """The input's wait is timed once the watchdog is armed, also right after a paused
    evaluation (the pause used to last until the next finished step, so an input that hung
    after an evaluation was never caught); before the first step it is not (workers start)."""
    messages = []
    dog = watchdog.StepWatchdog(0.2, on_stall=messages.append, poll_s=0.02).start()
    with dog.waiting_for_input(0):
        time.sleep(0.4)
    assert messages == []
    dog.beat(1)
    with dog.waiting_for_input(1):
        time.sleep(0.1)  # a batch within the limit, then the step: the clock restarts
    time.sleep(0.15)
    assert messages == []
    dog.beat(2)
    dog.pause()  # an evaluation
    time.sleep(0.4)
    assert messages == []
    with dog.waiting_for_input(2):
        time.sleep(0.5)
    dog.stop()
    assert messages == [
        "error: the input pipeline delivered no batch for step 2 in 0 s (a hung input worker "
        "process, or a data folder that stopped answering); stopping. Raise "
        "HGRN_STEP_TIMEOUT_S if a batch can take this long. The last complete checkpoint is "
        "kept: run the same command again to resume."
    ]
    one_process = watchdog.StepWatchdog(5.0)
    one_process.beat(4)
    assert one_process.message().startswith(
        "error: no training step finished in 5 s after step 4; a device computation or a "
        "checkpoint write is stuck, stopping."
    )
    one_process.evaluated(6)
    assert one_process.message().startswith(
        "error: no progress in 5 s after the evaluation at step 6; a checkpoint write is stuck;"
    )
    with one_process.waiting_for_input(6):
        pass
    assert one_process.message().startswith("error: no training step finished in 5 s after step 6")


def test_step_watchdog_times_what_follows_an_evaluation():
    """The clock was paused from an evaluation until the next step: a checkpoint or a peer
    stuck after it (a process still evaluating an extra batch) was never caught."""
    messages = []
    dog = watchdog.StepWatchdog(
        0.2, 1, process_count=2, on_stall=messages.append, poll_s=0.02
    ).start()
    dog.beat(6)
    dog.pause()
    time.sleep(0.4)
    assert messages == []  # the evaluation itself is not timed
    dog.evaluated(6)
    time.sleep(0.5)
    dog.stop()
    assert len(messages) == 1 and messages[0].startswith(
        "error: process 1: no progress in 0 s after the evaluation at step 6; a peer process is "
        "stuck or lost, or still evaluating (every process must yield the same number of "
        "evaluation batches, see docs/tasks.md); stopping."
    )


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watched(timeout_s: float, clock: FakeClock, restart_input, process_count: int = 1):
    """A step watchdog driven by hand (``check``), recording its stalls and warnings."""
    stalls, warnings_ = [], []
    dog = watchdog.StepWatchdog(
        timeout_s,
        process_count=process_count,
        on_stall=stalls.append,
        restart_input=restart_input,
        on_warning=warnings_.append,
        clock=clock,
    )
    return dog, stalls, warnings_


def test_a_stalled_input_with_workers_is_restarted_once_per_batch():
    """One process, input workers: the first stall of a batch's wait restarts them (no exit,
    the clock starts again); a second one for the same batch ends the run saying so; a batch
    delivered in between allows a restart again."""
    clock, restarts = FakeClock(), []
    dog, stalls, warned = watched(10, clock, lambda: restarts.append(clock.now))
    dog.beat(4)
    with dog.waiting_for_input(4):
        clock.now += 10
        assert not dog.check() and restarts == []  # not longer than the limit yet
        clock.now += 1
        assert not dog.check()
        assert restarts == [111.0] and stalls == []
        assert warned == [
            "warning: the input pipeline delivered no batch for step 4 in 10 s; killing its "
            "worker processes and starting new ones at step 4 (the batches are the same)"
        ]
        clock.now += 10
        assert not dog.check()  # the clock started again at the restart
        clock.now += 1
        assert dog.check()
    assert restarts == [111.0] and len(warned) == 1
    assert stalls == [
        "error: the input pipeline delivered no batch for step 4 in 10 s, again after its "
        "worker processes were killed and restarted at that step (a data folder that stopped "
        "answering, or a batch that hangs every worker); stopping. Raise HGRN_STEP_TIMEOUT_S "
        "if a batch can take this long. The last complete checkpoint is kept: run the same "
        "command again to resume."
    ]

    clock, restarts = FakeClock(), []
    dog, stalls, warned = watched(10, clock, lambda: restarts.append(clock.now))
    dog.beat(4)
    with dog.waiting_for_input(4):
        clock.now += 11
        assert not dog.check()
        clock.now += 5  # the new workers deliver the batch
    dog.beat(5)
    with dog.waiting_for_input(5):
        clock.now += 11
        assert not dog.check()
    assert restarts == [111.0, 127.0] and stalls == [] and len(warned) == 2
    assert "for step 5" in warned[1]
    dog.beat(6)
    clock.now += 11  # a step that does not finish: nothing to restart
    assert dog.check() and len(restarts) == 2
    assert stalls[0].startswith("error: no training step finished in 10 s after step 6;")


def test_a_stall_that_no_restart_can_help_ends_the_run_at_once():
    """A step that does not finish, the input read in this process (``restart_input`` None)
    and a process of a pod (the Guard passes no restart) end the run at the first stall."""
    clock, restarts = FakeClock(), []
    dog, stalls, warned = watched(10, clock, lambda: restarts.append(clock.now))
    dog.beat(4)
    clock.now += 11
    assert dog.check() and restarts == [] and warned == []
    assert stalls[0].startswith("error: no training step finished in 10 s after step 4;")

    clock = FakeClock()
    dog, stalls, warned = watched(10, clock, None)
    dog.beat(4)
    with dog.waiting_for_input(4):
        clock.now += 11
        assert dog.check()
    assert warned == [] and stalls[0].startswith(
        "error: the input pipeline delivered no batch for step 4 in 10 s (a hung input worker "
        "process, or a data folder that stopped answering); stopping."
    )

    restart = lambda: None
    assert watchdog.Guard(0, 1, step_timeout_s=10, restart_input=restart).steps.restart_input
    assert (
        watchdog.Guard(1, 4, step_timeout_s=10, restart_input=restart).steps.restart_input is None
    )


def test_a_restart_that_fails_ends_the_run():
    clock = FakeClock()

    def fail():
        raise OSError("no such process")

    dog, stalls, warned = watched(10, clock, fail)
    dog.beat(4)
    with dog.waiting_for_input(4):
        clock.now += 11
        assert dog.check()
    assert len(warned) == 1 and len(stalls) == 1
    assert stalls[0].startswith("error: the input pipeline delivered no batch for step 4 in 10 s (")
    assert stalls[0].endswith("Restarting the input failed: OSError('no such process')")


def test_guard_watches_steps_in_one_process_unless_turned_off(monkeypatch):
    with watchdog.Guard(0, 1, step_timeout_s=60) as guard:
        assert guard.steps._thread.is_alive() and guard.peers._thread is None
        with guard.waiting_for_input(3):
            assert guard.steps._input_step == 3
    assert guard.steps._stop.is_set()
    monkeypatch.setenv("HGRN_STEP_TIMEOUT_S", "0")
    with watchdog.Guard(0, 1) as guard:
        guard.beat(1)
        with guard.waiting_for_input(1):
            guard.pause()
    assert guard.steps is None
    monkeypatch.setenv("HGRN_STEP_TIMEOUT_S", "12.5")
    assert watchdog.Guard(0, 1).steps.timeout_s == 12.5
    monkeypatch.delenv("HGRN_STEP_TIMEOUT_S")
    assert watchdog.step_timeout_from_env() == watchdog.DEFAULT_STEP_TIMEOUT_S
    for bad in ("ten", "-1", "nan", "inf"):
        monkeypatch.setenv("HGRN_STEP_TIMEOUT_S", bad)
        with pytest.raises(ValueError) as error:
            watchdog.step_timeout_from_env()
        assert str(error.value) == (
            f"HGRN_STEP_TIMEOUT_S={bad!r} must be a number of seconds (0 turns the step "
            "watchdog off; unset: 1800)"
        )


def test_a_stall_kills_this_process_s_worker_processes_before_it_exits(tmp_path):
    """A hung input worker would outlive the process that gave up on it."""
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == watchdog.EXIT_LOST_PEER, proc.stderr
    assert proc.stderr.strip() == "stalled"
    assert wait_until_gone(int(proc.stdout))


STALL = r"""
import multiprocessing, time
from hgrn_jax.training import watchdog

if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    worker.start()
    print(worker.pid, flush=True)
    watchdog._exit_with("stalled")
"""


def test_plain_progress_lines_and_start_up_summary():
    stream = io.StringIO()
    bar = podlog.PlainProgress(100, 20, stream=stream)
    bar._t0 -= 10.0  # 10 s for the 20 steps below: 2 steps/s, 60 steps left
    bar.update(20, loss=1.23456, lr=0.1)
    bar.write("step 40: val loss 1.0000")
    # Later lines leave the first compile out: 30 steps in the 5 s since the first line.
    bar._first_line = (bar._first_line[0] - 5.0, bar._first_line[1])
    bar.update(30, loss=0.5)
    assert stream.getvalue().splitlines() == [
        "step 40/100  loss 1.2346  2.00 steps/s  30s left",
        "step 40: val loss 1.0000",
        "step 70/100  loss 0.5000  6.00 steps/s  5s left",
    ]
    silent = io.StringIO()
    podlog.PlainProgress(10, 0, enabled=False, stream=silent).update(1, loss=1.0)
    assert silent.getvalue() == ""
    assert [podlog.format_duration(s) for s in (5, 125, 7300)] == ["5s", "2m05s", "2h01m"]
    lines = podlog.startup_summary(
        task="listops",
        source="release",
        sizes={"train": 96000, "val": 2000, "test": 2000},
        num_params=11850,
        mesh_shape={"data": 2, "fsdp": 2, "model": 2},
        process_count=4,
        device_count=8,
        local_device_count=2,
        platform="tpu",
        start_step=300,
        total_steps=1000,
        workdir="/runs/x",
    )
    assert lines == [
        "task listops: data source 'release' (train 96,000, val 2,000, test 2,000 examples)",
        "model: 11,850 parameters; mesh data=2 x fsdp=2 x model=2",
        "4 processes x 2 tpu devices = 8 devices",
        "resuming from step 300 of 1000 in /runs/x",
    ]

    def mesh_line(mesh_shape: dict[str, int], sequence_axis: str) -> str:
        return podlog.startup_summary(
            task="t",
            source="s",
            sizes={},
            num_params=1,
            mesh_shape=mesh_shape,
            process_count=1,
            device_count=4,
            local_device_count=4,
            platform="cpu",
            start_step=0,
            total_steps=1,
            workdir="w",
            sequence_axis=sequence_axis,
        )[1]

    for axis in ("model", "data"):
        assert mesh_line({"data": 2, "fsdp": 1, "model": 2}, axis) == (
            f"model: 1 parameters; mesh data=2 x fsdp=1 x model=2; the sequence split 2 ways "
            f"over {axis}"
        )
    assert mesh_line({"data": 4, "fsdp": 1, "model": 1}, "model").endswith(
        "; sequence_axis=model has size 1: the sequence is not split"
    )


def test_a_task_that_names_no_data_source_is_not_said_to_read_one():
    """A factory's task was said to read the config's data.source, or ``data source None``."""
    lines = podlog.startup_summary(
        task="myparity",
        source=None,
        sizes={"train": 96},
        num_params=1,
        mesh_shape={"data": 1},
        process_count=1,
        device_count=1,
        local_device_count=1,
        platform="cpu",
        start_step=0,
        total_steps=1,
        workdir="w",
    )
    assert lines[0] == "task myparity (train 96 examples)"


def test_secondary_processes_prefix_their_warnings(capsys):
    previous, root = warnings.showwarning, logging.getLogger()
    level, formatters = root.level, [h.formatter for h in root.handlers]
    try:
        podlog.quiet_secondary_processes(2)
        warnings.warn("checkpoint is slow", RuntimeWarning, stacklevel=1)
    finally:
        warnings.showwarning = previous
        root.setLevel(level)
        for handler, formatter in zip(root.handlers, formatters):
            handler.setFormatter(formatter)
    err = capsys.readouterr().err
    assert err.startswith("[process 2] ") and "RuntimeWarning: checkpoint is slow" in err


def test_each_process_reads_only_its_share():
    """The rows each of 4 processes loads are disjoint and together are the one-process batch."""
    for step in (0, 5):
        whole = loader.train_rows(0, step, 400, 32, 0, 1)
        shares = [loader.train_rows(0, step, 400, 32, p, 4) for p in range(4)]
        assert all(len(s) == 8 for s in shares)
        np.testing.assert_array_equal(np.concatenate(shares), whole)
    whole = loader.eval_rows(40, 32, 0, 1)
    shares = [loader.eval_rows(40, 32, p, 4) for p in range(4)]
    for batch, (rows, valid) in enumerate(whole):  # every eval batch, padding included
        np.testing.assert_array_equal(np.concatenate([s[batch][0] for s in shares]), rows)
        np.testing.assert_array_equal(np.concatenate([s[batch][1] for s in shares]), valid)
    assert sum(int(v.sum()) for s in shares for _, v in s) == 40  # each example once


def test_lost_peer_and_stall_messages_say_how_a_restart_run_resumes():
    """A run started with --config.resume=restart: the same command would start again at step
    0, so the monitors' messages name --config.resume=auto, as the preemption message does."""
    from hgrn_jax.training.preemption import how_to_resume

    hint = how_to_resume("restart")
    assert "--config.resume=auto" in hint and "step 0" in hint
    assert how_to_resume("auto") == watchdog.RESUME_HINT
    guard = watchdog.Guard(1, 4, step_timeout_s=0.1, resume_hint=hint)
    assert hint in guard.peers.message([2])
    messages = []
    dog = watchdog.StepWatchdog(0.1, 1, on_stall=messages.append, poll_s=0.02, resume_hint=hint)
    dog.start().beat(3)
    deadline = time.monotonic() + 5
    while not messages and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.stop()
    assert messages and hint in messages[0]
    assert guard.steps.resume_hint == hint


def test_a_command_that_cannot_run_is_one_line_and_exit_2(capsys):
    """A missing program after -- was a FileNotFoundError traceback from the first Popen."""
    from experiments import launch

    assert launch.main(["--num_processes=2", "--devices_per_process=1", "--", "nosuchcmd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot run 'nosuchcmd' (No such file or directory)")
    assert len(err.strip().splitlines()) == 1

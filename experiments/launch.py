"""A pod on one machine: ``python -m experiments.launch --num_processes=4 --devices_per_process=2 --
<experiments.train args>``.

Starts ``num_processes`` JAX processes, each with ``devices_per_process`` simulated CPU devices,
that find each other through a coordinator on loopback (a free port) and run collectives with
gloo, exactly as the hosts of a TPU pod slice or a GPU cluster do: every process runs the same
``python -m experiments.train`` command and learns its id from ``JAX_PROCESS_ID``.

- Output: each line a process prints is prefixed with its index (``[2] ...``), on the stream it
  was printed to.
- Signals: SIGINT and SIGTERM sent to the launcher are forwarded to every process (a SIGTERM is a
  preemption notice: the processes agree on a step, save it, and exit 0; after a Ctrl-C they do
  the same and end by SIGINT, and so does the launcher, with status 130; a second Ctrl-C stops
  them at once).
- Failures: when a process fails (non-zero exit, or killed by a signal), the launcher names it
  and waits up to :data:`LOST_PEER_GRACE_S` for the others to notice the lost peer themselves
  (the coordination service's heartbeat and the step watchdog make them exit); any still running
  then is stopped. The launcher exits with the first failing process's code (128 + signal for a
  signal), or 0 when every process exits 0. A process ended by a signal the launcher forwarded
  has not failed. One exception: when the first failure is a process killed by a signal (a lost
  host: SIGKILL, a crash) and others stopped on it with exit code 3 (a lost peer), the launcher
  exits 3 too, as each surviving host of a real pod does.

After ``--``, arguments starting with ``--`` are ``experiments.train`` flags; anything else is a
whole command to run in every process instead (e.g. ``-- python my_script.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from hgrn_jax.training.terminal import leave_the_terminal

LOST_PEER_GRACE_S = 60.0
"""How long the surviving processes get to exit on their own after one fails."""

EXIT_LOST_PEER = 3
"""``experiments.train``'s exit code after losing a peer process
(:data:`hgrn_jax.training.watchdog.EXIT_LOST_PEER`; not imported: the launcher runs any
command and imports no JAX)."""

STOP_GRACE_S = 10.0
"""After the launcher sends SIGTERM to stop a process, how long before it sends SIGKILL."""

HEARTBEAT_TIMEOUT_S = 20
"""The coordination service's heartbeat timeout in launched processes (JAX's default is 100 s,
meant for real clusters; on one machine a lost process is known sooner). At 10 s, two healthy
processes compiling on a loaded 2-core machine were both declared dead (CI, 2026-12-01)."""

STEP_TIMEOUT_S = 120
"""The step watchdog's limit in launched processes (see :mod:`hgrn_jax.training.watchdog`)."""


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: dict[str, str], process_id: int, num_processes: int, devices_per_process: int, port: int
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` plus the coordinator, process count
    and id, CPU devices and the gloo collectives. A simulated device count in ``XLA_FLAGS`` and
    ``JAX_LOCAL_DEVICE_IDS`` (which would clash) are dropped; other settings (e.g.
    ``JAX_COMPILATION_CACHE_DIR``, ``HGRN_HEARTBEAT_TIMEOUT_S``, ``HGRN_STEP_TIMEOUT_S``) pass.
    """
    env = {k: v for k, v in base.items() if k != "JAX_LOCAL_DEVICE_IDS"}
    flags = [
        f
        for f in env.pop("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_NUM_CPU_DEVICES=str(devices_per_process),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo" if num_processes > 1 else "none",
        HGRN_NUM_CPU_DEVICES=str(devices_per_process),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("HGRN_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_TIMEOUT_S))
    env.setdefault("HGRN_STEP_TIMEOUT_S", str(STEP_TIMEOUT_S))
    return env


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _pump(stream: IO[str], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


class LaunchError(RuntimeError):
    """The processes could not be started (the message says why); none is left running."""


class Pod:
    """``num_processes`` child processes running ``command``, their output pumped with prefixes."""

    def __init__(
        self,
        command: Sequence[str],
        num_processes: int,
        devices_per_process: int,
        *,
        cwd: str | None = None,
        stdout: IO[str] = sys.stdout,
        stderr: IO[str] = sys.stderr,
    ):
        self.command = list(command)
        self.num_processes = num_processes
        port = free_port()
        self._lock = threading.Lock()
        self._stderr = stderr
        self.procs: list[subprocess.Popen] = []
        self.forwarded: set[int] = set()  # signals sent on the user's behalf
        self._pumps: list[threading.Thread] = []
        for i in range(num_processes):
            try:
                proc = subprocess.Popen(
                    self.command,
                    cwd=cwd,
                    text=True,
                    bufsize=1,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # signals come from us only
                    env=process_env(dict(os.environ), i, num_processes, devices_per_process, port),
                )
            except OSError as error:
                for started in self.procs:
                    started.kill()
                    started.wait()
                raise LaunchError(
                    f"cannot run {self.command[0]!r} ({error.strerror}); after -- give "
                    "experiments.train flags (--config=...) or a whole command"
                ) from None
            self.procs.append(proc)
            for stream, out in ((proc.stdout, stdout), (proc.stderr, stderr)):
                pump = threading.Thread(
                    target=_pump, args=(stream, out, f"[{i}] ", self._lock), daemon=True
                )
                pump.start()
                self._pumps.append(pump)
        self.say(
            f"started {num_processes} processes x {devices_per_process} devices, "
            f"coordinator 127.0.0.1:{port}; pids "
            + ", ".join(f"{i}={p.pid}" for i, p in enumerate(self.procs))
        )

    def say(self, message: str) -> None:
        with self._lock:
            print(f"[launch] {message}", file=self._stderr, flush=True)

    def signal_all(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def forward(self, signum: int) -> None:
        """Send the user's ``signum`` to every process; one ended by it has not failed."""
        self.say(f"forwarding {signal.Signals(signum).name} to every process")
        self.forwarded.add(signum)
        self.signal_all(signum)

    def _failed(self, proc: subprocess.Popen) -> bool:
        code = proc.returncode
        return code not in (0, None) and -code not in self.forwarded

    def _running(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def _wait_all(self, deadline: float) -> bool:
        while self._running() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self._running()

    def wait(self) -> int:
        """Wait for every process; returns the launcher's exit code (see the module doc)."""
        failed: int | None = None
        while failed is None:
            running = self._running()  # polls, so every return code is current
            failures = [i for i, p in enumerate(self.procs) if self._failed(p)]
            if failures:
                failed = failures[0]
            elif not running:
                break
            else:
                time.sleep(0.1)
        if failed is not None:
            code = self.procs[failed].returncode
            others = self._running()
            self.say(
                f"process {failed} failed ({describe_exit(code)})"
                + (
                    f"; waiting up to {LOST_PEER_GRACE_S:.0f} s for processes "
                    f"{', '.join(map(str, others))} to stop"
                    if others
                    else ""
                )
            )
            if not self._wait_all(time.monotonic() + LOST_PEER_GRACE_S):
                stuck = self._running()
                self.say(f"processes {', '.join(map(str, stuck))} still running; stopping them")
                self.signal_all(signal.SIGTERM)
                if not self._wait_all(time.monotonic() + STOP_GRACE_S):
                    self.signal_all(signal.SIGKILL)
                    self._wait_all(time.monotonic() + STOP_GRACE_S)
        for pump in self._pumps:
            pump.join(timeout=5.0)
        for i, proc in enumerate(self.procs):
            if i != failed and self._failed(proc):
                self.say(f"process {i} stopped ({describe_exit(proc.returncode)})")
        if failed is None:
            ended_by = {-p.returncode for p in self.procs if p.returncode and p.returncode < 0}
            if ended_by:
                signum = max(ended_by)
                self.say(f"interrupted ({signal.Signals(signum).name}): every process stopped")
                return 128 + signum
            return 0
        code = self.procs[failed].returncode
        said_lost = [
            i for i, p in enumerate(self.procs) if i != failed and p.returncode == EXIT_LOST_PEER
        ]
        if code < 0 and said_lost:
            # A process killed (SIGKILL, a crash, the OOM killer: a lost host) and the others
            # stopped on it by themselves: the pod's outcome is theirs, a lost peer, exit 3, as
            # each host of a real pod ends; a requeue script checks for it.
            self.say(
                f"FAILED: process {failed} ({describe_exit(code)}); processes "
                f"{', '.join(map(str, said_lost))} stopped on the lost peer "
                f"(exit code {EXIT_LOST_PEER})"
            )
            return EXIT_LOST_PEER
        self.say(f"FAILED: process {failed} ({describe_exit(code)})")
        return 128 - code if code < 0 else code


def train_command(args: Sequence[str]) -> list[str]:
    """The command every process runs: ``experiments.train`` with ``args`` when they are flags,
    else ``args`` itself (``python script.py ...``; a leading ``python`` is this interpreter)."""
    args = list(args)
    if not args or args[0].startswith("--"):
        return [sys.executable, "-m", "experiments.train", *args]
    if os.path.basename(args[0]).startswith("python"):
        args[0] = sys.executable
    return args


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description="Run a multi-process (pod) job on this machine: N processes x D CPU devices.",
        epilog="Example: python -m experiments.launch --num_processes=4 --devices_per_process=2 "
        "-- --config=experiments/configs/lra/listops.py:tiny --workdir=runs/pod",
    )
    parser.add_argument(
        "--num_processes", type=int, required=True, help="number of processes (simulated hosts)"
    )
    parser.add_argument(
        "--devices_per_process", type=int, required=True, help="CPU devices each process sees"
    )
    args = parser.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")
    if not rest:
        parser.error(
            "give the experiments.train arguments after --, e.g. "
            "-- --config=experiments/configs/lra/listops.py:tiny --workdir=runs/pod"
        )
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    pod: Pod | None = None
    early: list[int] = []  # signals that came while the processes were being started

    def forward(signum, frame):
        del frame
        if signum == signal.SIGHUP:
            leave_the_terminal()  # the processes' lines then go nowhere, not into EIO errors
        if pod is None:
            early.append(signum)
        else:
            pod.forward(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # not under nohup
        # The terminal closed: by SIGHUP's default action this launcher died, and the
        # processes (sessions of their own) died at their next line into its pipes, unsaved.
        signal.signal(signal.SIGHUP, forward)
    try:
        pod = Pod(train_command(rest), args.num_processes, args.devices_per_process)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for signum in early:
        pod.forward(signum)
    return pod.wait()


if __name__ == "__main__":
    from experiments import cli

    cli.show_warnings_on_one_line()
    sys.exit(main())

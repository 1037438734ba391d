"""Run a command as two JAX processes on one machine (the multi-host tests): a loopback
coordinator, CPU devices, each process told its id through ``JAX_PROCESS_ID``."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags_without(*names: str) -> str:
    """This process's ``XLA_FLAGS`` less the flags ``names`` (without their leading ``--``)."""
    return " ".join(
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if flag.lstrip("-").split("=")[0] not in names
    )


def xla_flags_without_device_count() -> str:
    """``XLA_FLAGS`` less a simulated device count (a child sets its own); the other flags (the
    suite's compile flags, see conftest) pass, so that children compile like this process."""
    return xla_flags_without("xla_force_host_platform_device_count")


def cpu_env(**extra: str) -> dict[str, str]:
    """This environment without its ``JAX_*`` settings and simulated device count, on CPU, with
    the repository importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags_without_device_count()
    )
    env.update(extra)
    return env


def run_two_processes(
    command: list[str], *, timeout: float, cwd: Path | None = None, **extra_env: str
) -> list[str]:
    """Run ``command`` as processes 0 and 1 and return their logs (stdout and stderr); fails
    with the log of a process that exits with an error, and kills any left on a timeout."""
    port = free_port()
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cpu_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
                **extra_env,
            ),
        )
        for i in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
    return logs


def cli_env() -> dict[str, str]:
    """This environment for a one-process ``experiments.train`` child: CPU with 8 simulated
    devices (``HGRN_NUM_CPU_DEVICES``), ``tests/`` and the repository importable (the toy
    task's config lives in ``tests/``), the suite's compile flags."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        HGRN_NUM_CPU_DEVICES="8",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        XLA_FLAGS=xla_flags_without_device_count(),
    )
    return env


def _live_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, parent pid, process
    group, ...), or None when the process is gone or a zombie waiting to be reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # ended meanwhile
        return None
    return None if fields[0] == "Z" else fields


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    return _live_stat(pid) is not None


def _processes() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every live process."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _live_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None:
            found.append((int(entry.name), int(fields[1]), int(fields[2])))
    return found


def process_group(pgid: int) -> tuple[list[int], list[int]]:
    """The live processes of process group ``pgid`` (e.g. a run and its input workers), and
    their children in other groups (multiprocessing's resource tracker, in a session of its
    own)."""
    processes = _processes()
    members = sorted(pid for pid, _, group in processes if group == pgid)
    outside = sorted(pid for pid, ppid, group in processes if ppid in members and group != pgid)
    return members, outside


def shared_memory_files(pids: list[int]) -> set[Path]:
    """The files in ``/dev/shm`` that processes ``pids`` have open or mapped (multiprocessing's
    shared memory and semaphores)."""
    names = set()
    for pid in pids:
        proc = Path(f"/proc/{pid}")
        targets = []
        try:
            targets += [line.split()[-1] for line in (proc / "maps").read_text().splitlines()]
            fds = list((proc / "fd").iterdir())
        except OSError:  # the process is gone
            continue
        for fd in fds:
            try:
                targets.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                pass
        names.update(Path(t) for t in targets if t.startswith("/dev/shm/"))
    return names


def wait_until_gone(pid: int, timeout_s: float = 10.0) -> bool:
    """Wait up to ``timeout_s`` for process ``pid`` to end; True once it has."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


def wait_until_removed(path: Path, timeout_s: float = 5.0) -> bool:
    """Wait up to ``timeout_s`` for ``path`` to be removed; True once it is gone."""
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not path.exists()

"""What a run prints when nobody watches a terminal (pods, batch jobs): plain lines, process 0 only.

- :func:`progress`: on a terminal, the tqdm bar of :class:`~hgrn_jax.training.logging.ProgressBar`;
  otherwise (stderr redirected, as on every pod host and batch job) a :class:`PlainProgress` that
  prints ``step 40/200  loss 2.1034  3.52 steps/s  45s left`` every ``log_every`` steps.
- :func:`startup_summary`: the lines a run prints before training (task, data source and sizes,
  parameters, mesh, processes, devices, resume step).
- :func:`quiet_secondary_processes`: processes other than 0 print only warnings and errors, each
  prefixed with ``[process N]`` so a merged pod log says who spoke.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

from hgrn_jax.training.logging import ProgressBar


def format_duration(seconds: float) -> str:
    """``45s``, ``12m05s`` or ``3h07m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress:
    """ProgressBar's interface as plain lines on stderr (process 0 only when ``enabled``).

    The rate, and the time left from it, count from the first line on (evaluations and
    checkpoints included, the first compile not); the first line's count from the start."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, initial, enabled
        self._stream = stream
        self._t0, self._done0 = time.time(), initial
        self._first_line: tuple[float, int] | None = None  # (time, steps done) at the first line

    def _print(self, line: str) -> None:
        if self.enabled:
            print(line, file=self._stream or sys.stderr, flush=True)

    def update(self, steps: int, **postfix: float) -> None:
        self.done += steps
        now = time.time()
        if self._first_line is None:
            self._first_line = (now, self.done)
            since, done_then = self._t0, self._done0
        else:
            since, done_then = self._first_line
        elapsed = now - since
        rate = (self.done - done_then) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        fields = [f"step {self.done}/{self.total}"]
        if "loss" in postfix:
            fields.append(f"loss {postfix['loss']:.4f}")
        fields.append(f"{rate:.2f} steps/s")
        fields.append(f"{format_duration(left)} left" if left == left else "time left unknown")
        self._print("  ".join(fields))

    def write(self, message: str) -> None:
        self._print(message)

    def close(self) -> None:
        pass


def progress(total: int, initial: int, *, enabled: bool = True) -> ProgressBar | PlainProgress:
    """A tqdm bar on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        return ProgressBar(total, initial, enabled=enabled)
    return PlainProgress(total, initial, enabled=enabled)


def startup_summary(
    *,
    task: str,
    source: str | None,
    sizes: Mapping[str, int],
    num_params: int,
    mesh_shape: Mapping[str, int],
    process_count: int,
    device_count: int,
    local_device_count: int,
    platform: str,
    start_step: int,
    total_steps: int,
    workdir: Any,
    sequence_axis: str | None = None,
) -> list[str]:
    """The start-up lines of a run (see the module docstring); ``source``: the data source the
    task reads, None when it names none (a ``module:factory`` task); ``sequence_axis``: the mesh
    axis the model's recurrences split the sequence over, if any (a size-1 axis splits
    nothing)."""
    split_sizes = (
        (" (" + ", ".join(f"{split} {n:,}" for split, n in sizes.items()) + " examples)")
        if sizes
        else ""
    )
    mesh = " x ".join(f"{axis}={size}" for axis, size in mesh_shape.items())
    if sequence_axis is not None:
        ways = int(mesh_shape.get(sequence_axis, 1))
        mesh += (
            f"; the sequence split {ways} ways over {sequence_axis}"
            if ways > 1
            else f"; sequence_axis={sequence_axis} has size 1: the sequence is not split"
        )
    resume = f"resuming from step {start_step}" if start_step else "starting at step 0"
    return [
        f"task {task}" + (f": data source {source!r}" if source is not None else "") + split_sizes,
        f"model: {num_params:,} parameters; mesh {mesh}",
        f"{process_count} process{'es' if process_count > 1 else ''} x {local_device_count} "
        f"{platform} device{'s' if local_device_count != 1 else ''} = {device_count} "
        f"device{'s' if device_count != 1 else ''}",
        f"{resume} of {total_steps} in {workdir}",
    ]


def quiet_secondary_processes(process_index: int) -> None:
    """On processes other than 0: warnings and errors only, each prefixed ``[process N]``."""
    if process_index == 0:
        return
    prefix = f"[process {process_index}] "
    show = warnings.showwarning

    def show_prefixed(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file or sys.stderr).write(prefix + text)

    if show is not show_prefixed:
        warnings.showwarning = show_prefixed
    root = logging.getLogger()
    root.setLevel(max(root.level, logging.WARNING))
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(message)s"))

"""The toy task's training input through the grain pipeline (``config.data.grain``), in
``config.data.workers`` worker processes when > 0.

A module of its own, importing numpy and the pipeline only: a worker process imports it to
unpickle the batch transform, and the toy task's module would add JAX, Flax and optax to every
worker's start-up (which a restarted worker's first batch waits for, under the step watchdog's
clock).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data import grain_pipeline

TRAIN_EXAMPLES = 64


class ToyBatch:
    """The batch transform: the toy's ``weight`` and ``scale`` columns (``scale`` inf at
    ``nan_at_step``). In a worker process building the batch of ``hang_at_step`` it hangs for
    an hour, appending its pid to ``hang_pid_file``, if fewer than ``hang_times`` workers did
    (-1: every worker hangs there)."""

    def __init__(self, nan_at_step: int, hang_at_step: int, hang_times: int, hang_pid_file: str):
        self.nan_at_step, self.hang_at_step = nan_at_step, hang_at_step
        self.hang_times, self.hang_pid_file = hang_times, hang_pid_file
        self.creator = os.getpid()

    def _hang_if_due(self) -> None:
        pids = Path(self.hang_pid_file)
        hung = len(pids.read_text().split()) if pids.exists() else 0
        if self.hang_times < 0 or hung < self.hang_times:
            with pids.open("a") as file:
                file.write(f"{os.getpid()}\n")
            time.sleep(3600)

    def __call__(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        if step == self.hang_at_step and os.getpid() != self.creator:
            self._hang_if_due()
        rows = len(batch["labels"])
        scale = np.inf if step == self.nan_at_step else 1.0
        return {
            **batch,
            "weight": np.ones((rows,), np.float32),
            "scale": np.full((rows,), scale, np.float32),
        }


def train_iterator(
    examples: dict[str, np.ndarray],
    data: Any,
    seed: int,
    batch_size: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> grain_pipeline.TrainIterator:
    """The training batches of ``examples`` from ``start_step`` (``data``: the config's)."""
    transform = ToyBatch(
        int(data.get("nan_at_step", -1)),
        int(data.get("hang_at_step", -1)),
        int(data.get("hang_times", 1)),
        str(data.get("hang_pid_file", "")),
    )
    return grain_pipeline.train_loader(
        grain_pipeline.ArraySource(examples, name="toy"),
        seed=seed,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        worker_count=int(data.get("workers", 0)),
        batch_transform=transform,
    ).iterator(start_step)

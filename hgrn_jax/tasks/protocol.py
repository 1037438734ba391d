"""The :class:`Task` protocol: everything the training loop asks of an experiment.

A task owns its data, model and loss. The loop (:mod:`hgrn_jax.training.loop`) uses only the
members below, so any object with them trains (``config.task="package.module:factory"`` loads
one, made by ``factory(config)`` or by a :class:`~hgrn_jax.tasks.dataset_entry.Dataset`;
:func:`check_task` checks it; docs/tasks.md, "A task of your own, without a Dataset", has a
minimal one, trained by a test). Optional:
``data_source``, a string that the start-up line and results.json name as the task's data source
(a task from a factory otherwise names none: ``config.data.source`` is what the package's own
tasks read).

Batches are dicts of numpy arrays with a leading batch dimension: this process's rows of the
global batch. Training batches are a pure function of ``(seed, step)`` (so a resumed run sees the
same data; an iterator with a saveable state is checkpointed too); evaluation batches cover the
split exactly once over all processes, padding rows carrying ``weight`` 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

Batch = dict[str, np.ndarray]
Metrics = dict[str, jax.Array]

METRICS = ("accuracy", "perplexity")
"""The values of :attr:`Task.metric`."""
METHODS = ("build_model", "train_batches", "eval_batches", "loss_fn")
"""The methods of :class:`Task`."""


@runtime_checkable
class Task(Protocol):
    """What :func:`hgrn_jax.training.loop.train_and_evaluate` needs of an experiment."""

    name: str
    """Shown in logs and ``results.json``."""

    metric: str
    """``"accuracy"`` (higher is better; ``loss_fn`` sums ``correct``) or ``"perplexity"``."""

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh model (float32 parameters)."""
        ...

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """Process-local batches of steps ``start_step, start_step + 1, ...`` (endless), each
        array with ``config.batch_size // process_count`` rows (the loop checks both).

        The iterator may offer ``get_state() -> dict`` (JSON-able) and ``set_state(dict)``
        (the tasks' grain iterators, :class:`hgrn_jax.data.grain_pipeline.TrainIterator`): the
        loop then saves the state with each checkpoint and restores it on resume."""
        ...

    def eval_batches(
        self, split: str, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """Process-local batches covering ``split`` (``"val"`` or ``"test"``) once: any rows
        that split over the mesh's batch shards (the loop checks), the arrays of the train
        batches with their shapes after the batch axis (train-only ones may be left out), and
        as many batches on every process (pad with weight-0 batches; not checked: a process
        with an extra batch waits for the others forever)."""
        ...

    def loss_fn(self, model: nnx.Module, batch: dict, *, train: bool) -> tuple[jax.Array, Metrics]:
        """``(mean loss, sums)``: a float scalar and a dict of scalars holding ``loss_sum``,
        ``weight`` (and, for ``"accuracy"``, ``correct``), so that evaluation is exact when
        summed over batches (checked when the step is traced). The mean loss, which training
        differentiates, is ``loss_sum / max(weight, 1)`` (not checked): gradient accumulation
        scales each micro-batch's mean loss and gradient back by ``max(weight, 1)`` and divides
        their sum by the batch's, which is the whole batch's step only under this form."""
        ...


def a_type_name(value: Any) -> str:
    """``value``'s type name with its article, for messages: ``"an int"``, ``"a str"``."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_task(task: Any, where: str) -> Task:
    """``task`` after checking that it has the members of :class:`Task` and a known
    ``metric``; otherwise a one-line ValueError naming ``where`` (e.g. ``"config.task=..."``),
    what is missing and this protocol."""
    missing = [name for name in METHODS if not callable(getattr(task, name, None))]
    missing += [name for name in ("name", "metric") if not hasattr(task, name)]
    if missing:
        raise ValueError(
            f"{where} gave {a_type_name(task)} without {', '.join(missing)}; a task needs "
            f"name, metric and the methods {', '.join(METHODS)} (the Task protocol of "
            "hgrn_jax/tasks/protocol.py; docs/tasks.md has a minimal one)"
        )
    if task.metric not in METRICS:
        raise ValueError(
            f"{where} gave a task whose metric is {task.metric!r}; set its metric to "
            f"{' or '.join(repr(m) for m in METRICS)} (the Task protocol of "
            "hgrn_jax/tasks/protocol.py)"
        )
    return task

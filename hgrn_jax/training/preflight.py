"""Checks that run before the first training step, so a bad input never costs a run.

:func:`open_splits` opens every split through the task interface (the first training batch at the
resume step, positioned by the input state saved with the checkpoint when there is one; the first
batch of ``val`` and ``test``), so a missing or malformed validation or
test file stops the run before training rather than at the first evaluation or after the last
step; :class:`EvalBatchCheck` checks the layout of evaluation batches (the first here, every
other layout as evaluation reads it); :func:`check_token_ids` checks the token ids of every split
against the model's vocabulary (the task's settled ``config.model.vocab_size`` where it has one:
a 0 in the run's config follows the data), :func:`check_class_labels` the first batches' class
labels against ``config.model.num_classes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

TOKEN_KEYS = ("inputs", "inputs2", "ids")


def _model_vocab_size(config: Any) -> int | None:
    model = config.get("model", {}) if hasattr(config, "get") else {}
    if not hasattr(model, "get"):
        return None
    if model.get("encoder", "embed") != "embed":
        return None
    size = model.get("vocab_size")
    return int(size) if size else None


def _outside(values: Any, size: int) -> int | None:
    """A value of integer array ``values`` outside ``[0, size)`` (the largest if too large,
    else the smallest), or None when all are inside, ``values`` is None, empty or not
    integers."""
    if values is None or not np.issubdtype(np.asarray(values[:0]).dtype, np.integer):
        return None
    if len(values) == 0:
        return None
    low, high = int(np.min(values)), int(np.max(values))
    if high >= size:
        return high
    return low if low < 0 else None


def check_token_ids(arrays: dict[str, Any], vocab_size: int, where: str) -> None:
    """Raise ValueError when an integer token array of ``arrays`` leaves ``[0, vocab_size)``."""
    for key in TOKEN_KEYS:
        bad = _outside(arrays.get(key), vocab_size)
        if bad is not None:
            raise ValueError(
                f"{where}: token id {bad} in {key!r} is outside [0, {vocab_size}) "
                f"(config.model.vocab_size={vocab_size}); set --config.model.vocab_size to "
                "the data's vocabulary size or re-prepare the data with this vocabulary"
            )


def _model_classes(config: Any) -> int | None:
    model = config.get("model", {}) if hasattr(config, "get") else {}
    classes = model.get("num_classes") if hasattr(model, "get") else None
    return int(classes) if classes else None


def check_class_labels(arrays: dict[str, Any], num_classes: int, where: str) -> None:
    """Raise ValueError when integer ``labels`` of ``arrays`` leave ``[0, num_classes)``
    (``config.model.num_classes``): a task of the user's own whose labels ran 1 to 2 for 2
    classes trained without a word, on all-zero one-hot targets. (The package's tasks check
    their splits as they load them.)"""
    bad = _outside(arrays.get("labels"), num_classes)
    if bad is not None:
        raise ValueError(
            f"{where}: class label {bad} is outside [0, {num_classes}) "
            f"(config.model.num_classes={num_classes}); give labels 0 to {num_classes - 1}, or "
            "set --config.model.num_classes to the data's number of classes"
        )


def check_batch_rows(batch: dict, rows: int, where: str) -> None:
    """Raise ValueError naming the key when an array of ``batch`` does not have ``rows`` rows
    (``where`` says whose batch and why that many, e.g. ``config.batch_size`` per process)."""
    for path, value in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = np.shape(value)
        if not shape or shape[0] != rows:
            got = f"{shape[0]} rows" if shape else "no batch axis"
            raise ValueError(
                f"{where} yielded batch{jax.tree_util.keystr(path)} with {got}, not "
                f"{rows}; yield {rows} rows per array (config.batch_size // process count: "
                "this process's share of the global batch), or change --config.batch_size"
            )


def batch_layout(batch: dict) -> dict[str, tuple[int, ...]]:
    """Each array of ``batch`` by its key path (e.g. ``['inputs']``): its shape."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(value)) for path, value in leaves}


class EvalBatchCheck:
    """Checks a task's evaluation batches, each layout (keys and shapes) once, so evaluation
    pays one dict of shapes per batch: every array has the batch axis first and the same rows,
    which split over the processes and the mesh's ``shards`` batch shards, and (once
    :attr:`train_layout` is known, from the first training batch) every key is one the train
    batches have, with their shape after the batch axis. Call it with ``(batch, split, index)``;
    a bad batch is a one-line ValueError naming the task, the split, the batch index, the
    array, its shape and the fix. A train batch's key may be absent (train-only arrays, such as
    ImageNet's soft targets); :meth:`missing_key` explains it if ``loss_fn`` reads it."""

    def __init__(self, task_name: str, shards: int, processes: int):
        self.task_name, self.shards, self.processes = task_name, shards, processes
        self.train_layout: dict[str, tuple[int, ...]] | None = None
        self._checked: set[tuple] = set()

    def __call__(self, batch: dict, split: str, index: int) -> None:
        layout = batch_layout(batch)
        signature = tuple(layout.items())
        if signature in self._checked:
            return
        where = f"the {split!r} eval_batches of task {self.task_name!r} yielded batch {index}"
        rows = None
        for key, shape in layout.items():
            if not shape:
                raise ValueError(
                    f"{where} whose {key} is a scalar (shape ()); give every array of a batch "
                    "its rows as the first axis"
                )
            if rows is None:
                first, rows = key, shape[0]
            elif shape[0] != rows:
                raise ValueError(
                    f"{where} whose {key} has shape {shape}, {shape[0]} rows where {first} has "
                    f"{rows}; give every array of a batch the same rows (the first axis)"
                )
        if rows is not None and (rows * self.processes) % self.shards:
            per_process = self.shards // self.processes
            plural = "es" if self.processes > 1 else ""
            raise ValueError(
                f"{where} whose {first} has shape {layout[first]}: {rows} rows per process x "
                f"{self.processes} process{plural} do not split over the mesh's {self.shards} "
                f"batch shards (config.mesh.data x fsdp); yield a multiple of {per_process} rows "
                "per process (pad with weight-0 rows), or change --config.mesh.*"
            )
        if self.train_layout is not None:
            self._compare_with_train(layout, where)
        self._checked.add(signature)

    def missing_key(self, error: KeyError, batch: dict, split: str, index: int) -> ValueError:
        """The one-line error for ``loss_fn``'s KeyError on evaluation batch ``index``, when the
        key is one the train batches have and this batch lacks (an evaluation batch may leave
        out train-only arrays, e.g. ImageNet's soft mixup targets, that ``loss_fn`` reads only
        in training); None for any other KeyError."""
        key = f"[{error.args[0]!r}]" if error.args else None
        if key is None or self.train_layout is None or key not in self.train_layout:
            return None
        if key in batch_layout(batch):
            return None
        return ValueError(
            f"the {split!r} eval_batches of task {self.task_name!r} yielded batch {index} "
            f"without {key}, which the train batches have and loss_fn reads; yield it in "
            "evaluation batches too (or make loss_fn do without it when train=False)"
        )

    def _compare_with_train(self, layout: dict[str, tuple[int, ...]], where: str) -> None:
        train = self.train_layout or {}
        fix = "yield the arrays train_batches yields (padding rows carry weight 0)"
        extra = [key for key in layout if key not in train]
        if extra:
            raise ValueError(
                f"{where} with {extra[0]}, which the train batches do not have (they have "
                f"{', '.join(sorted(train))}); {fix}"
            )
        for key, shape in layout.items():
            if shape[1:] != train[key][1:]:
                want = ", ".join(["rows", *map(str, train[key][1:])])
                raise ValueError(
                    f"{where} whose {key} has shape {shape}; the train batches' is {train[key]} "
                    f"({want}): yield the same shape after the batch axis"
                )


class TrainBatches:
    """The training iterator with its first batch already read by the checks; ``get_state()``
    is the wrapped iterator's position as the training loop sees it (None when the task's
    iterator keeps no state). With ``rows``, every batch is checked to have that many rows
    (:func:`check_batch_rows`; ``where`` names the iterator in the error); an iterator that
    ends is a ValueError (training batches are endless)."""

    def __init__(self, train: Iterator[dict], rows: int | None = None, where: str = ""):
        self._train = train
        self._rows, self._where = rows, where or "train_batches"
        self._read = 0
        self.stateful = callable(getattr(train, "get_state", None))
        self._state_before_first = train.get_state() if self.stateful else None
        self._first: list[dict] = [self._next_checked()]

    def _next_checked(self) -> dict:
        try:
            batch = next(self._train)
        except StopIteration:
            raise ValueError(
                f"{self._where} ended after {self._read} batches; yield one batch per step, "
                "endlessly (start the next epoch where one ends), as the Task protocol of "
                "hgrn_jax/tasks/protocol.py says"
            ) from None
        self._read += 1
        if self._rows is not None:
            check_batch_rows(batch, self._rows, self._where)
        return batch

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        if self._first:
            return self._first.pop()
        return self._next_checked()

    def peek(self) -> dict:
        return self._first[0]

    def get_state(self) -> dict | None:
        if not self.stateful:
            return None
        return self._state_before_first if self._first else self._train.get_state()

    @property
    def restartable_workers(self) -> bool:
        """Whether the wrapped iterator reads in worker processes and starts new ones when
        told that they are killed (:meth:`expect_worker_kill`: grain's, with workers)."""
        return getattr(self._train, "in_process", True) is False and callable(
            getattr(self._train, "expect_worker_kill", None)
        )

    def expect_worker_kill(self) -> None:
        """Tell the wrapped iterator that its worker processes are about to be killed on
        purpose (see :meth:`hgrn_jax.data.grain_pipeline.TrainIterator.expect_worker_kill`)."""
        self._train.expect_worker_kill()

    def close(self) -> None:
        """Close the wrapped iterator when it can be (a generator, grain's workers)."""
        close = getattr(self._train, "close", None)
        if callable(close):
            close()


def open_splits(
    task: Any,
    config: Any,
    start_step: int,
    input_state: dict | None = None,
    eval_check: EvalBatchCheck | None = None,
) -> TrainBatches:
    """Open and validate train, val and test; return the training batches from ``start_step``
    (positioned by ``input_state``, the iterator state saved with the checkpoint, if given).

    Raises whatever the task's readers raise for a missing or malformed split (their messages
    name the file), ValueError for an empty evaluation split, out-of-vocabulary ids, an input
    state that belongs to other data, or training batches (any of them, as they are read)
    without ``config.batch_size // process_count`` rows. ``eval_check`` (the run's, which
    evaluation calls on every batch) learns the train batches' layout here and checks the first
    batch of each evaluation split.
    """
    index, count = jax.process_index(), jax.process_count()
    vocab_size = _model_vocab_size(getattr(task, "config", None)) or _model_vocab_size(config)
    classes = _model_classes(getattr(task, "config", None)) or _model_classes(config)
    train = iter(task.train_batches(start_step, index, count))
    if input_state is not None and callable(getattr(train, "set_state", None)):
        try:
            train.set_state(input_state)
        except ValueError as error:
            raise ValueError(
                f"cannot resume the input pipeline at step {start_step}: {error}; resume with "
                "the data and settings the checkpoint was saved with, or use a new --workdir"
            ) from None
    batch_size = config.get("batch_size", None) if hasattr(config, "get") else None
    rows = int(batch_size) // count if batch_size else None
    where = (
        f"the train_batches of task {getattr(task, 'name', '?')!r} (config.batch_size="
        f"{batch_size} over {count} process{'es' if count > 1 else ''})"
    )
    batches = TrainBatches(train, rows, where)
    first = batches.peek()
    if eval_check is not None:
        eval_check.train_layout = batch_layout(first)
    for split in ("val", "test"):
        batch = next(iter(task.eval_batches(split, index, count)), None)
        if batch is None:
            raise ValueError(
                f"the {split!r} split of task {getattr(task, 'name', '?')!r} has no "
                "examples; check its data files"
            )
        if eval_check is not None:
            eval_check(batch, split, 0)
        if vocab_size is not None:
            check_token_ids(batch, vocab_size, f"the first {split} batch")
            check_token_ids(_whole_split(task, split), vocab_size, f"the {split} split")
        if classes is not None:
            check_class_labels(batch, classes, f"the first {split} batch")
    if vocab_size is not None:
        check_token_ids(first, vocab_size, "the first training batch")
        check_token_ids(_whole_split(task, "train"), vocab_size, "the train split")
    if classes is not None:
        check_class_labels(first, classes, "the first training batch")
    return batches


def _whole_split(task: Any, split: str) -> dict:
    """All examples of ``split`` where the task keeps them as arrays (already loaded by the
    first batch), else nothing."""
    examples = getattr(task, "examples", None)
    if examples is None:
        return {}
    try:
        arrays = examples(split)
    except Exception:
        return {}
    return arrays if isinstance(arrays, dict) else {}

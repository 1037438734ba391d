"""A tiny classification task honouring the runner's Task interface, for the training tests.

Synthetic data: token sequences whose label is (sum of tokens) mod ``num_classes``; a small
model with an embedding, BatchNorm, dropout and a linear head, so that parameters, BatchNorm
statistics and dropout RNG streams all go through the train state and checkpoints. Extras read
from ``config.data`` (all optional):
  nan_at_step: the loss of that training step is multiplied by inf (tests the NaN stop);
  sleep_per_step: seconds to sleep before yielding each training batch (gives tests time to
    kill a run in the middle);
  hang_at_step: the batch of that step never comes: a child process (an input worker, as grain
    starts them) is started and waited for, and it sleeps for an hour; its pid is written to
    ``hang_pid_file``. With ``grain``, the worker process building that batch hangs instead
    (``hang_times`` of them, -1: all; their pids are appended to ``hang_pid_file``);
  grain: read the training batches through :mod:`hgrn_jax.data.grain_pipeline`, in ``workers``
    worker processes when > 0 (``tests/toy_workers.py``; other batches than without it, the
    same for every ``workers``; ``sleep_per_step`` is not applied);
  extra_val_batch_on: the process of that index yields one more ``val`` batch than the others
    (a Task that breaks the protocol's rule of equal evaluation batches).
Use it from a config with ``task = "toy_task:make_task"`` and ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import toy_workers
from flax import nnx

VOCAB, LENGTH, CLASSES = 16, 8, 4


def toy_config() -> ml_collections.ConfigDict:
    """A complete run config (the contract's schema) for :class:`ToyTask`."""
    c = ml_collections.ConfigDict()
    c.task = "toy_task:make_task"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(features=16, dropout=0.1))
    c.data = ml_collections.ConfigDict(
        dict(
            num_val=20,
            num_test=28,
            nan_at_step=-1,
            sleep_per_step=0.0,
            hang_at_step=-1,
            hang_pid_file="",
            hang_times=1,
            grain=False,
            workers=0,
            extra_val_batch_on=-1,
        )
    )
    c.batch_size = 8
    c.num_train_steps = 12
    c.epochs = 1
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-2,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.01,
            weight_decay_mask="all",
            grad_clip_norm=0.0,
            accumulate_steps=1,
        )
    )
    c.schedule = ml_collections.ConfigDict(
        dict(name="cosine", warmup_steps=2, decay_steps=12, min_lr=0.0)
    )
    c.eval_every = 6
    c.checkpoint_every = 3
    c.log_every = 2
    c.keep_checkpoints = 2
    c.resume = "auto"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.dtype = "float32"
    c.paper = ml_collections.ConfigDict(dict(metric="accuracy", value=50.0))
    return c


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """So that this file is also a config file for ``experiments.train``."""
    del preset
    return toy_config()


class ToyModel(nnx.Module):
    def __init__(self, features: int, dropout: float, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, features, rngs=rngs)
        self.hidden = nnx.Linear(features, features, rngs=rngs)
        self.norm = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(features, CLASSES, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens).mean(axis=1)  # (B, d)
        x = self.dropout(jax.nn.gelu(self.norm(self.hidden(x))))
        return self.head(x)  # (B, classes)


def hang_in_a_child_process(pid_file: Path) -> None:
    """Start a child process that sleeps for an hour, write its pid, and wait for it."""
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(3600,))
    worker.start()
    pid_file.write_text(str(worker.pid))
    worker.join()


def _examples(seed: int | list[int], n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, size=(n, LENGTH), dtype=np.int32)
    return {"inputs": inputs, "labels": (inputs.sum(axis=1) % CLASSES).astype(np.int32)}


class ToyTask:
    name = "toy"
    metric = "accuracy"

    def __init__(self, config):
        self.config = config
        self.data = config.data

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return ToyModel(self.config.model.features, self.config.model.dropout, rngs=rngs)

    def train_batches(
        self, start_step: int, process_index: int, process_count: int
    ) -> Iterator[dict[str, np.ndarray]]:
        if self.data.get("grain", False):
            return toy_workers.train_iterator(
                _examples([3, self.config.seed], toy_workers.TRAIN_EXAMPLES),
                self.data,
                self.config.seed,
                self.config.batch_size,
                start_step,
                process_index,
                process_count,
            )
        return self._generated_batches(start_step, process_index, process_count)

    def _generated_batches(
        self, start_step: int, process_index: int, process_count: int
    ) -> Iterator[dict[str, np.ndarray]]:
        local = self.config.batch_size // process_count
        for step in range(start_step, 1 << 30):
            sleep = float(self.data.get("sleep_per_step", 0.0))
            if sleep:
                time.sleep(sleep)
            if step == int(self.data.get("hang_at_step", -1)):
                hang_in_a_child_process(Path(self.data.hang_pid_file))
            batch = _examples(self.config.seed * 100003 + step, self.config.batch_size)
            batch = {
                k: v[process_index * local : (process_index + 1) * local] for k, v in batch.items()
            }
            scale = np.inf if step == int(self.data.get("nan_at_step", -1)) else 1.0
            batch["weight"] = np.full((local,), 1.0, np.float32)
            batch["scale"] = np.full((local,), scale, np.float32)
            yield batch

    def eval_batches(
        self, split: str, process_index: int, process_count: int
    ) -> Iterator[dict[str, np.ndarray]]:
        n = int(self.data.num_val if split == "val" else self.data.num_test)
        examples = _examples({"val": 1, "test": 2}[split], n)
        size, local = self.config.batch_size, self.config.batch_size // process_count
        for start in range(0, n, size):
            rows = {k: v[start : start + size] for k, v in examples.items()}
            valid = len(rows["labels"])
            rows = {
                k: np.concatenate([v, np.zeros((size - valid, *v.shape[1:]), v.dtype)])
                for k, v in rows.items()
            }
            rows["weight"] = (np.arange(size) < valid).astype(np.float32)
            rows["scale"] = np.ones((size,), np.float32)
            yield {
                k: v[process_index * local : (process_index + 1) * local] for k, v in rows.items()
            }
        if split == "val" and process_index == int(self.data.get("extra_val_batch_on", -1)):
            yield {k: v[:local] for k, v in rows.items()}

    def loss_fn(self, model, batch, *, train: bool):
        del train
        logits = model(batch["inputs"])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        weight = batch["weight"]
        loss_sum = jnp.sum(losses * weight)
        loss = loss_sum / jnp.maximum(weight.sum(), 1.0) * batch["scale"][0]
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weight)
        return loss, {"loss_sum": loss_sum, "weight": weight.sum(), "correct": correct}


def make_task(config) -> ToyTask:
    return ToyTask(config)

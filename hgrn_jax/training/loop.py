"""``train_and_evaluate(config, workdir)``: the whole run, resumable and preemption-safe.

Steps: lock the workdir and compare its config.json with the new config
(:mod:`hgrn_jax.training.workdir`); build the task and a sharded train state; resume from the
newest usable checkpoint in ``workdir/checkpoints`` (the data position is the input pipeline's
state saved with it, or the saved step for checkpoints without one; damaged checkpoints are moved
aside, see :mod:`hgrn_jax.training.checkpoint`) and only then replace ``config.json`` (a
refused checkpoint leaves it as it was); open and validate every
split (:mod:`hgrn_jax.training.preflight`); train with logging; evaluate the
whole validation split every ``eval_every`` steps and checkpoint with the validation metric (the
best one is kept); checkpoint every ``checkpoint_every`` steps; at the end evaluate the test split
with the best validation checkpoint and write ``results.json``.

Stopping:
- SIGTERM (preemption): the current step finishes, a checkpoint is written, and
  :class:`Preempted` is raised; ``experiments.train`` turns it into exit code
  :data:`PREEMPTED_EXIT_CODE`. Running the same command again resumes from that step; a run
  started with ``--config.resume=restart`` or ``force`` is resumed with
  ``--config.resume=auto``, as the message says (the same command with ``restart`` would start
  again at step 0).
- A NaN/inf loss or gradient: :class:`NonFiniteLossError` naming the first bad step; nothing
  after the last healthy checkpoint is saved.
- ``config.max_train_time_s`` (optional, seconds; 0: no limit): once the run's training wall
  time (carried across resumptions) reaches it, the step that noticed is treated as the last one:
  validation, checkpoint, then the test split with the best checkpoint; ``results.json`` gives
  the steps done and ``stopped_by``. Rerunning a run that stopped this way trains no more. Every
  train and val record carries ``wall_time_s``, for curves against time
  (``experiments.report --x time``).

Accuracy is reported in percent (as the paper's tables); perplexity as exp(mean token loss).
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hgrn_jax import sharding
from hgrn_jax.tasks.protocol import Task
from hgrn_jax.training import agreement, optim, podlog, preflight, watchdog
from hgrn_jax.training.checkpoint import CheckpointError, Checkpoints, DamagedCheckpointError
from hgrn_jax.training.logging import MetricsWriter, write_config, write_results
from hgrn_jax.training.state import (
    TrainState,
    abstract_checkpoint_tree,
    count_params,
    create_train_state,
    from_checkpoint_tree,
    release_buffers,
    to_checkpoint_tree,
)
from hgrn_jax.training.steps import (
    SUMS,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)
from hgrn_jax.training.workdir import (
    ConfigChangeWarning,
    WorkdirError,
    WorkdirLock,
    check_resume,
    has_checkpoint,
    is_out_of_space,
    not_writable,
    out_of_space,
    resume_choice,
)

PREEMPTED_EXIT_CODE = 0
"""Exit code of ``experiments.train`` after a SIGTERM: the checkpoint is safe; rerun to resume.
(After a Ctrl-C it ends by SIGINT, as an interrupted program should, so that the shell or
script that ran it stops too.)"""


PREEMPTION_CHECK_EVERY = 10
"""In multi-process runs, how often (in steps) the processes agree on whether to stop."""


class InputStateWarning(UserWarning):
    """A checkpoint without the input pipeline's state: the input resumes at its step."""


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient became NaN or infinite."""


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
        how = "interrupted" if signal_name == "SIGINT" else "preempted"
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


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def summarize(sums: dict[str, float], metric: str) -> dict[str, float]:
    """Loss and the task metric from summed ``loss_sum``, ``weight`` (and ``correct``)."""
    weight = float(sums["weight"])
    if weight <= 0:
        raise ValueError("evaluation saw no examples with weight > 0; check the split's data")
    out = {"loss": float(sums["loss_sum"]) / weight}
    if metric == "accuracy":
        out["accuracy"] = 100.0 * float(sums["correct"]) / weight
    elif metric == "perplexity":
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    else:
        raise ValueError(f"unknown task metric {metric!r}; use 'accuracy' or 'perplexity'")
    return out


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------


class _StopSignals:
    """Sets ``requested`` on SIGTERM, or on a first SIGINT (Ctrl-C) while the training loop
    runs, while it is entered (from the main thread only); restores the previous handlers on
    exit.

    A first Ctrl-C in the training loop (:meth:`training`) says at once that the run will stop
    after the step and save; a second one, or one before the loop (building, preparing data:
    nothing to save yet) or after it (the test evaluation), raises :class:`KeyboardInterrupt`
    as usual. A SIGTERM is noted whenever it comes (a preemption notice during start-up stops
    the run at its first step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # started ignoring Ctrl-C (a script's background job): keep it so
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


def _stop_requests(step: int, preempted: bool, out_of_time: bool) -> tuple[bool, bool]:
    """(preempted, out_of_time) after ``step``, each true on every process when it is true on
    any (SIGTERM received, the time budget spent), decided at the same step everywhere.

    One process takes its flags after every step. Several processes must stop at the same step,
    so they compare flags (one small all-gather for both, which waits for the devices) every
    :data:`PREEMPTION_CHECK_EVERY` steps only, keeping the step pipeline full in between.
    """
    if jax.process_count() > 1 and step % PREEMPTION_CHECK_EVERY:
        return False, False
    return agreement.any_process_each((preempted, out_of_time))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _config_int(config: Any, key: str, default: int) -> int:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return int(value)


def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def mesh_config(config: Any) -> sharding.MeshConfig:
    """``config.mesh`` (absent axes at :class:`~hgrn_jax.sharding.MeshConfig`'s defaults);
    ValueError naming ``config.mesh.<axis>`` when a size is not a whole number >= 1 or -1."""
    section = config.get("mesh", None) if hasattr(config, "get") else None
    section = section if hasattr(section, "get") else {}
    defaults, sizes = sharding.MeshConfig(), {}
    for axis in sharding.MESH_AXES:
        value = section.get(axis, getattr(defaults, axis))
        if not _whole(value) or value == 0 or value < -1:
            raise ValueError(
                f"config.mesh.{axis}={value} must be a whole number >= 1, or -1 (the devices "
                f"the other axes leave); set --config.mesh.{axis}"
            )
        sizes[axis] = int(value)
    return sharding.MeshConfig(**sizes)


def _check_batch_key(
    key: str, value: Any, minimum: int, shards: int, split: str, zero_means: str
) -> None:
    """ValueError naming ``config.<key>`` when a global batch size is set but is not a whole
    number >= ``minimum`` or does not split over the mesh's ``shards`` batch shards."""
    if value is None:
        return
    if not _whole(value) or value < minimum:
        raise ValueError(
            f"config.{key}={value} must be a whole number >= {minimum}{zero_means}; set "
            f"--config.{key}"
        )
    if value % shards:  # shards is a multiple of the process count
        raise ValueError(
            f"config.{key}={value} does not split over {split}; set --config.{key} to a "
            f"multiple of {shards}{zero_means}, or change --config.mesh.*"
        )


def check_mesh_and_batches(
    config: Any,
    num_devices: int | None = None,
    num_processes: int | None = None,
    num_slices: int | None = None,
) -> tuple[int, int, int]:
    """The ``(data, fsdp, model)`` sizes of ``config.mesh`` on ``num_devices`` devices in
    ``num_processes`` processes and ``num_slices`` TPU slices (default: this run's), after
    checking, each a ValueError naming the key, its value and the fix, that the sizes fit the
    devices, that ``model`` fits inside one slice (multislice), that every global batch
    (``batch_size``, ``eval_batch_size``, an ``optimizer.accumulate_steps`` micro-batch count)
    splits over the processes and the mesh's ``data x fsdp`` batch shards, and that
    ``model.mixer.sequence_axis`` names a mesh axis. Needs no model, data or workdir, so a run
    checks this before it touches its workdir (otherwise the mesh failed after config.json was
    written, and an eval batch size that did not split failed at the first evaluation)."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    processes = jax.process_count() if num_processes is None else num_processes
    if num_slices is None:
        num_slices = len(sharding.device_slices(jax.devices()))
    try:
        sizes = mesh_config(config).axis_sizes(num_devices)
    except sharding.MeshSizeError as error:
        raise ValueError(
            f"config.{error.problem} ({processes} process{'es' if processes > 1 else ''}); "
            "set --config.mesh.data, --config.mesh.fsdp and --config.mesh.model so that "
            f"their product is {num_devices} (one of them -1: the devices the others leave)"
        ) from None
    if num_slices > 1:
        per_slice = num_devices // num_slices
        try:
            mesh_config(config).slice_split(num_slices, per_slice)
        except sharding.MeshSizeError as error:
            raise ValueError(
                f"config.{error.problem}; set --config.mesh.model to a divisor of {per_slice} "
                "(the devices of one slice), or --config.mesh.data and --config.mesh.fsdp so "
                f"that data x fsdp is a multiple of {num_slices} (the slices go along data, "
                "then fsdp)"
            ) from None
    data, fsdp, _ = sizes
    shards = data * fsdp
    split = f"the mesh's {shards} batch shards (config.mesh.data x fsdp = {data} x {fsdp})"
    if shards % processes:
        raise ValueError(
            f"{split} do not divide over the {processes} processes (each process must feed "
            f"its own rows); set --config.mesh.data and --config.mesh.fsdp so that data x fsdp "
            f"is a multiple of {processes}"
        )
    get = config.get if hasattr(config, "get") else lambda key, default=None: default
    batch_size = get("batch_size", None)
    _check_batch_key("batch_size", batch_size, 1, shards, split, "")
    _check_batch_key(
        "eval_batch_size", get("eval_batch_size", None), 0, shards, split, " (0: batch_size)"
    )
    optimizer = get("optimizer", None)
    accumulate = optimizer.get("accumulate_steps", 1) if hasattr(optimizer, "get") else 1
    accumulate = 1 if accumulate is None else accumulate
    if not _whole(accumulate) or accumulate < 0:
        raise ValueError(
            f"config.optimizer.accumulate_steps={accumulate} must be a whole number >= 1; set "
            "--config.optimizer.accumulate_steps (1, or 0: no accumulation)"
        )
    if accumulate > 1 and _whole(batch_size) and batch_size % accumulate:
        raise ValueError(
            f"config.optimizer.accumulate_steps={accumulate} does not divide "
            f"config.batch_size={batch_size} into micro-batches; set "
            "--config.optimizer.accumulate_steps to a divisor of the batch size"
        )
    model = get("model", None)
    mixer = model.get("mixer", None) if hasattr(model, "get") else None
    for key, section in (("model.mixer", mixer), ("model", model)):
        axis = section.get("sequence_axis", None) if hasattr(section, "get") else None
        if axis is None:
            continue
        if axis not in sharding.MESH_AXES:
            raise ValueError(
                f"config.{key}.sequence_axis={axis!r} is not a mesh axis; set "
                f"--config.{key}.sequence_axis to one of {', '.join(sharding.MESH_AXES)} "
                "(usually model), or leave it unset for no sequence parallelism"
            )
        kind = mixer.get("kind", "hgrn") if hasattr(mixer, "get") else "hgrn"
        layout = mixer.get("layout", "official") if hasattr(mixer, "get") else "official"
        if kind == "attention":
            raise ValueError(
                f"config.{key}.sequence_axis={axis!r} needs a recurrent mixer: HGRN (kind "
                f"'hgrn', either layout) or HGRN2 (kind 'hgrn2'), not kind {kind!r} with layout "
                f"{layout!r}; set --config.model.mixer.kind=hgrn or hgrn2, or leave "
                f"--config.{key}.sequence_axis unset for this model"
            )
    return sizes


def task_factory(config: Any) -> Any:
    """What ``config.task = "package.module:factory"`` names, imported (a ``factory(config) ->
    Task``, or a :class:`~hgrn_jax.tasks.base.Dataset` such as a dataset module's ``DATASET``);
    None for a task name of the registry. ValueError naming ``config.task`` when it cannot be
    imported."""
    name = str(config.task)
    if ":" not in name:
        return None
    import importlib

    module_name, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"config.task={name!r}: cannot import {attr!r} from {module_name!r} ({error}); "
            "use a task name or 'module:factory' with the module's folder on PYTHONPATH"
        ) from error


def check_task_name(config: Any) -> None:
    """ValueError naming ``config.task`` when it is neither a task of the registry nor a
    ``module:factory`` that can be imported (checked before a run touches its workdir)."""
    if task_factory(config) is None:
        from hgrn_jax.tasks import dataset

        dataset(config)


def resolve_task(config: Any) -> Task:
    """The task of ``config.task``: a name in :data:`hgrn_jax.tasks.registry.DATASETS`, or
    ``"package.module:factory"`` for a user-defined task (``factory(config) -> Task``, or a
    :class:`~hgrn_jax.tasks.base.Dataset`). ValueError naming ``config.task`` when the factory
    cannot be called with the config or its task lacks a member of the Task protocol."""
    factory = task_factory(config)
    if factory is None:
        from hgrn_jax.tasks import get_task

        return get_task(config)
    from hgrn_jax.tasks.base import Dataset
    from hgrn_jax.tasks.protocol import check_task

    where = f"config.task={str(config.task)!r}"
    if isinstance(factory, Dataset):
        return check_task(factory.task(config), where)
    try:
        takes_config = callable(factory) and bool(inspect.signature(factory).bind(config))
    except TypeError:
        takes_config = False
    except ValueError:  # no signature to inspect (some builtins): let the call tell
        takes_config = True
    if not takes_config:
        raise ValueError(
            f"{where} is a {type(factory).__name__} that cannot be called with the config "
            "alone; name a function factory(config) -> Task, or a dataset module's Dataset "
            "(e.g. module:DATASET)"
        )
    return check_task(factory(config), where)


class Run:
    """One run's task, mesh, sharded initial state, jitted steps, checkpoints and writer
    (what :func:`train_and_evaluate` drives; tests use it to evaluate a state directly)."""

    def __init__(self, config: Any, workdir: str | Path, task: Task | None = None):
        self.config = config
        self.workdir = Path(workdir)
        self.primary = jax.process_index() == 0
        self.task = task if task is not None else resolve_task(config)
        self.mesh = sharding.make_mesh(*check_mesh_and_batches(config))
        self.schedule = None

        def make_tx(params):
            tx, self.schedule = optim.make_optimizer(config, params)
            return tx

        self.graphdef, self.tx, self.state, self.shardings = create_train_state(
            self.task.build_model, make_tx, int(config.seed), self.mesh
        )
        self.num_params = count_params(self.state.params)
        accumulate = int(dict(config.optimizer).get("accumulate_steps", 1) or 1)
        self.metric = self.task.metric
        sums = SUMS + (("correct",) if self.metric == "accuracy" else ())
        self.train_step = jit_train_step(
            make_train_step(
                self.graphdef,
                self.tx,
                self.task.loss_fn,
                self.schedule,
                accumulate_steps=accumulate,
                sums_keys=sums,
            ),
            self.shardings,
            self.mesh,
        )
        self.eval_step = jit_eval_step(
            make_eval_step(self.graphdef, self.task.loss_fn, sums), self.shardings, self.mesh
        )
        # The layout of each evaluation batch (the train batches' once preflight has read one).
        self.eval_check = preflight.EvalBatchCheck(
            getattr(self.task, "name", "?"),
            sharding.num_batch_shards(self.mesh),
            jax.process_count(),
        )
        self.best_mode = "max" if self.metric == "accuracy" else "min"
        self.best_key = f"val_{self.metric}"
        self.checkpoints = Checkpoints(
            self.workdir / "checkpoints",
            keep=_config_int(config, "keep_checkpoints", 2),
            best_metric=self.best_key,
            best_mode=self.best_mode,
        )
        self.ckpt_target = abstract_checkpoint_tree(
            jax.eval_shape(lambda s: s, self.state), self.shardings
        )
        self.writer = MetricsWriter(self.workdir, enabled=self.primary)

    def close(self) -> None:
        """Close ``metrics.jsonl``, the TensorBoard writer and the checkpoint manager (after
        the saves in flight are written)."""
        self.writer.close()
        self.checkpoints.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        """Closes the run however its block ends, so that a script or notebook that goes on
        after an error keeps no open file or checkpoint manager of it. After an error, that
        error stays the one raised; a failure to close is added to it as a note."""
        if error is None:
            self.close()
            return
        try:
            self.close()
        except Exception as also:
            error.add_note(f"closing the run after this error failed too: {also!r}")

    # -- checkpoints ---------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint (or ``step``) as ``(state, meta)``."""
        if step is None:
            found = self.checkpoints.restore_latest(self.ckpt_target)
            if found is None:
                return None
            _, tree, meta = found
        else:
            tree, meta = self.checkpoints.restore(step, self.ckpt_target)
        return from_checkpoint_tree(tree, self.state), meta

    def save(
        self,
        state: TrainState,
        meta: dict,
        metrics: dict | None = None,
        input_state: dict | None = None,
    ) -> None:
        """Checkpoint ``state`` with ``meta``, ``metrics`` and the training iterator's
        ``input_state`` (this process's; None when the task's iterator keeps none)."""
        self.check_finite(state)
        step = int(jax.device_get(state.step))
        self.checkpoints.save(step, to_checkpoint_tree(state), meta, metrics, input_state)

    @staticmethod
    def check_finite(state: TrainState) -> None:
        bad = int(jax.device_get(state.nonfinite_step))
        if bad >= 0:
            raise NonFiniteLossError(
                f"the training loss or gradient became NaN/inf at step {bad}; stopping (the last "
                "checkpoint before it is kept). Lower optimizer.learning_rate, enable "
                "optimizer.grad_clip_norm, or use dtype='float32'"
            )

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
        """Loss and metric over the whole ``split``: per-batch sums (kept on the devices until
        the end, so batches are dispatched without waiting) added up in float64."""
        per_batch = []
        with jax.set_mesh(self.mesh):
            batches = self.task.eval_batches(split, jax.process_index(), jax.process_count())
            for index, batch in enumerate(batches):
                self.eval_check(batch, split, index)
                try:
                    sums = self.eval_step(
                        state.params, state.model_state, sharding.shard_batch(batch, self.mesh)
                    )
                except KeyError as error:  # raised while tracing: a new layout, not every batch
                    explained = self.eval_check.missing_key(error, batch, split, index)
                    if explained is None:
                        raise
                    raise explained from None
                per_batch.append(sums)
        if not per_batch:
            raise ValueError(f"the {split!r} split yielded no batches; check the data folder")
        per_batch = jax.device_get(per_batch)
        total = {
            key: float(np.sum([np.float64(sums[key]) for sums in per_batch]))
            for key in per_batch[0]
        }
        return summarize(total, self.metric)


def _restore_best(run: Run, workdir: Path) -> tuple[int, TrainState]:
    """The best validation checkpoint; a damaged one is moved aside and the next best used."""
    while True:
        best_step = run.checkpoints.best_step()
        if best_step is None:
            raise CheckpointError(
                f"no usable checkpoint with a validation metric in {workdir}/checkpoints (damaged "
                f"ones are kept in {workdir}/checkpoints.damaged); run again with a larger "
                "--config.num_train_steps to evaluate and checkpoint again"
            )
        try:
            best_state, _ = run.restore(best_step)
        except DamagedCheckpointError:
            continue
        return best_step, best_state


def check_run_lengths(config: Any) -> None:
    """Raise ValueError naming the key when a step count or frequency is not positive, or the
    time budget is negative."""
    for key in ("num_train_steps", "eval_every", "checkpoint_every", "log_every"):
        value = _config_int(config, key, 1)
        if value < 1:
            raise ValueError(f"config.{key}={value} must be at least 1; set --config.{key}")
    budget = _time_budget(config)
    if budget < 0:
        raise ValueError(
            f"config.max_train_time_s={budget} must be 0 (no limit) or a number of seconds; "
            "set --config.max_train_time_s"
        )


def check_seed(config: Any) -> None:
    """Raise ValueError naming the key when ``config.seed`` is not a whole number >= 0 (numpy's
    generators, which order the training batches, take no negative seed)."""
    seed = config.get("seed", 0) if hasattr(config, "get") else 0
    if not _whole(seed) or seed < 0:
        raise ValueError(
            f"config.seed={seed} must be a whole number >= 0; set --config.seed (e.g. 0)"
        )


def check_not_in_a_worker_process() -> None:
    """RuntimeError when called while a process that multiprocessing started is still importing
    the main script: a script that calls :func:`train_and_evaluate` at its top level runs again
    in each data worker (``data.workers`` > 0 start them by importing the script), where the
    run would find its own workdir locked. (Python's own check for that phase; a run started
    in a multiprocessing worker's target, e.g. a sweep, is not refused.)"""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "train_and_evaluate was called while a worker process that multiprocessing started "
            f"({multiprocessing.current_process().name}) imports the main script: the script "
            "runs again in each data worker; put the call under `if __name__ == '__main__':`, "
            "or set config.data.workers=0"
        )


def check_config_values(config: Any) -> None:
    """The checks of values a run can make before it touches its workdir, each a ValueError
    naming the key: run lengths, the seed, the model's sizes, the activation dtype of a
    registered task, the optimizer's numbers, the mesh with the batch sizes and sequence
    axis on it (:func:`check_mesh_and_batches`), and the input workers (``data.workers``)."""
    from hgrn_jax.data import grain_pipeline
    from hgrn_jax.tasks import base, registry

    check_run_lengths(config)
    check_seed(config)
    registry.check_model_sizes(config)
    if str(config.get("task", "")) in registry.DATASETS:
        base.activation_dtype(config.get("dtype", "float32"))
    optim.check_optimizer_config(config)
    check_mesh_and_batches(config)
    data = config.get("data", None)
    if hasattr(data, "get"):
        grain_pipeline.resolve_worker_count(data.get("workers", 0))  # checks data.workers


def _time_budget(config: Any) -> float:
    """``config.max_train_time_s``: seconds of training wall time after which the run stops
    as if it had reached its last step (0 or absent: no limit)."""
    value = config.get("max_train_time_s", 0) if hasattr(config, "get") else 0
    return float(value or 0)


def _write_config(workdir: Path, config: Any) -> None:
    try:
        write_config(workdir, config)
    except OSError as os_error:
        raise not_writable(workdir / "config.json", os_error) from None


def prepare_workdir(workdir: Path, config: Any) -> WorkdirLock:
    """Lock ``workdir`` (process 0, before anything is written) and check that its run may
    continue with ``config``; the other processes learn the outcome.

    Without a committed checkpoint ``config.json`` is written at once, before any other file of
    the run; otherwise it describes the checkpoints and is replaced only once one of them has
    been restored with the new config (:func:`commit_config`)."""
    lock, error = WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
            from hgrn_jax.tasks import model_defaults

            for line in check_resume(workdir, config, model_defaults(config)):
                warnings.warn(line, ConfigChangeWarning, stacklevel=3)
            if not has_checkpoint(workdir):
                _write_config(workdir, config)
        except (WorkdirError, ValueError, OSError) as failure:
            lock.release()
            error = failure
    agreement.share_outcome(error, f"preparing {workdir}")
    return lock


def commit_config(workdir: Path, config: Any) -> None:
    """Write ``config.json`` (process 0) once the run's checkpoint has been restored with
    ``config``, so that a refused checkpoint leaves the saved config as it was; every process
    learns the outcome."""
    error = None
    if jax.process_index() == 0:
        try:
            _write_config(workdir, config)
        except WorkdirError as failure:
            error = failure
    agreement.share_outcome(error, f"writing {workdir / 'config.json'}")


def _startup_summary(run: Run, start: int, total_steps: int) -> list[str]:
    count = getattr(run.task, "num_examples", None)  # user-defined tasks may not count
    sizes = {split: count(split) for split in ("train", "val", "test")} if callable(count) else {}
    data = run.config.get("data", None) if hasattr(run.config, "get") else None
    source = data.get("source", "unknown") if hasattr(data, "get") else "unknown"
    return podlog.startup_summary(
        task=run.task.name,
        source=str(source),
        sizes=sizes,
        num_params=run.num_params,
        mesh_shape=dict(run.mesh.shape),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        platform=jax.devices()[0].platform,
        start_step=start,
        total_steps=total_steps,
        workdir=run.workdir,
    )


def train_and_evaluate(config: Any, workdir: str | Path, task: Any = None) -> dict[str, Any]:
    """Train, evaluate and report one run; resumes if ``workdir`` holds checkpoints.

    ``task`` overrides :func:`resolve_task` (tests and notebooks pass their own). Returns the
    results written to ``workdir/results.json``. Raises :class:`Preempted` after a SIGTERM, or
    a first Ctrl-C in the training loop (checkpoint saved; ``signal_name`` says which), and
    :class:`NonFiniteLossError` when the loss diverges; user errors
    (config, data, workdir, checkpoints) raise ValueError, OSError,
    :class:`~hgrn_jax.training.workdir.WorkdirError` or
    :class:`~hgrn_jax.training.checkpoint.CheckpointError` with a message naming the fix.
    The workdir is locked for the whole run (:class:`~hgrn_jax.training.workdir.WorkdirLock`).
    """
    check_not_in_a_worker_process()
    workdir = Path(workdir)
    check_config_values(config)  # before anything is written to the workdir
    step_timeout_s = watchdog.step_timeout_from_env()  # a bad value stops the run here
    if task is None:
        check_task_name(config)
    # The SIGTERM and SIGINT handlers are installed before anything else, so that a preemption
    # notice or a Ctrl-C that arrives while the model is built or compiled is not fatal: it
    # stops the run at the first step at which the processes compare their flags.
    with _StopSignals() as stop_signals:
        lock = prepare_workdir(workdir, config)
        try:
            return _train_and_evaluate(config, workdir, task, stop_signals, step_timeout_s)
        except Exception as error:
            if not is_out_of_space(error):
                raise
            hint = how_to_resume(resume_choice(config))
            keep = _config_int(config, "keep_checkpoints", 2)
            raise out_of_space(workdir, error, hint, keep) from error
        finally:
            lock.release()


def _train_and_evaluate(
    config: Any, workdir: Path, task: Any, stop_signals: _StopSignals, step_timeout_s: float
) -> dict[str, Any]:
    with Run(config, workdir, task) as run:
        return _train_validate_and_test(run, config, workdir, stop_signals, step_timeout_s)


def _input_restart(batches: preflight.TrainBatches) -> Callable[[], None] | None:
    """How the step watchdog restarts an input whose worker processes hang: the iterator
    learns that they die on purpose, then they are killed, and the ``next()`` waiting for them
    starts new ones at the same step. None when the input is read in this process (nothing to
    kill: this process itself is stuck)."""
    if not batches.restartable_workers:
        return None

    def restart() -> None:
        batches.expect_worker_kill()
        watchdog.kill_child_processes()

    return restart


def _train_validate_and_test(
    run: Run, config: Any, workdir: Path, stop_signals: _StopSignals, step_timeout_s: float
) -> dict[str, Any]:
    total_steps = int(config.num_train_steps)
    eval_every = max(_config_int(config, "eval_every", total_steps), 1)
    ckpt_every = max(_config_int(config, "checkpoint_every", eval_every), 1)
    log_every = max(_config_int(config, "log_every", 50), 1)

    budget = _time_budget(config)
    state, meta = run.state, {"step": 0, "wall_time_s": 0.0}
    restored = run.restore()
    input_state = None
    if restored is not None:
        state, meta = restored
        release_buffers(run.state)  # the fresh initial state is not needed: free its memory
        input_state = run.checkpoints.input_state(int(meta["step"]))
    commit_config(workdir, config)
    start = int(meta["step"])
    run.writer.rewind(start)
    wall_before = float(meta.get("wall_time_s", 0.0))
    bar = podlog.progress(total_steps, start, enabled=run.primary)
    if run.primary:
        for line in _startup_summary(run, start, total_steps):
            bar.write(line)
    batches = preflight.open_splits(run.task, config, start, input_state, run.eval_check)
    if restored is not None and input_state is None and batches.stateful:
        warnings.warn(
            f"the checkpoint at step {start} holds no input-pipeline state (saved by older "
            f"code or with another process count); the input resumes at step {start} by "
            "skipping ahead",
            InputStateWarning,
            stacklevel=2,
        )
    t_start = time.time()

    def wall_time() -> float:
        """Training wall time of the run so far, resumptions included: from the input being
        open to now (compilation, steps, evaluations and checkpoints; not opening the data,
        whose cost depends on what an earlier run left prepared)."""
        return wall_before + time.time() - t_start

    def bookkeeping(step: int) -> dict:
        return {
            "step": step,
            "wall_time_s": wall_time(),
            "task": run.task.name,
        }

    def save(state: TrainState, done: int, metrics: dict | None = None) -> None:
        run.save(state, bookkeeping(done), metrics, batches.get_state())

    pending: list[dict] = []
    t_log, steps_since_log = time.time(), 0
    done = start
    # A run that already spent its time budget (resumed after stopping on it) trains no more;
    # wall_before comes from the checkpoint, the same on every process.
    end = start if budget > 0 and wall_before >= budget else total_steps
    stop_signals.training(True)
    try:
        with (
            jax.set_mesh(run.mesh),
            watchdog.Guard(
                jax.process_index(),
                jax.process_count(),
                step_timeout_s,
                resume_hint=how_to_resume(resume_choice(config)),
                restart_input=_input_restart(batches),
            ) as guard,
        ):
            for step in range(start, end):
                with guard.waiting_for_input(step):
                    batch = next(batches)
                batch = sharding.shard_batch(batch, run.mesh)
                state, metrics = run.train_step(state, batch)
                guard.beat(step + 1)
                pending.append(metrics)
                done, steps_since_log = step + 1, steps_since_log + 1
                preempted, out_of_time = _stop_requests(
                    done, stop_signals.requested, budget > 0 and wall_time() >= budget
                )
                last = done == total_steps or out_of_time

                if done % log_every == 0 or last:
                    run.check_finite(state)
                    host = jax.device_get(pending)
                    rate = steps_since_log / max(time.time() - t_log, 1e-9)
                    record = {
                        "loss": float(np.mean([m["loss"] for m in host])),
                        "lr": float(host[-1]["lr"]),
                        "grad_norm": float(host[-1]["grad_norm"]),
                        "steps_per_sec": rate,
                        "wall_time_s": wall_time(),
                    }
                    if run.metric == "accuracy" and "correct" in host[-1]:
                        weight = sum(float(m["weight"]) for m in host)
                        record["accuracy"] = (
                            100.0 * sum(float(m["correct"]) for m in host) / max(weight, 1e-9)
                        )
                    run.writer.write(done, "train", record)
                    bar.update(steps_since_log, loss=record["loss"], lr=record["lr"])
                    pending, t_log, steps_since_log = [], time.time(), 0

                if done % eval_every == 0 or last:
                    run.check_finite(state)
                    guard.pause()  # an evaluation takes as long as it takes; peers still watched
                    val = run.evaluate(state, "val")
                    guard.evaluated(done)  # the checkpoint after it is timed again
                    run.writer.write(done, "val", {**val, "wall_time_s": wall_time()})
                    bar.write(
                        f"step {done}: val " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    )
                    save(state, done, {run.best_key: val[run.metric]})
                elif done % ckpt_every == 0:
                    save(state, done)

                if preempted and not last:
                    if done % eval_every and done % ckpt_every:
                        save(state, done)
                    raise Preempted(
                        done, workdir, resume_choice(config), stop_signals.signal_name or "SIGTERM"
                    )
                if out_of_time:
                    bar.write(
                        f"step {done}: the time budget (config.max_train_time_s={budget:g}) is "
                        "spent; testing the best checkpoint"
                    )
                    break
    finally:
        bar.close()
        batches.close()  # stops the input workers, which would outlive an exception
        run.checkpoints.wait()
    stop_signals.training(False)

    wall = wall_time() if start < end else wall_before
    best_step, best_state = _restore_best(run, workdir)
    best_val = run.checkpoints.metrics(best_step)[run.best_key]
    test = run.evaluate(best_state, "test")
    run.writer.write(done, "test", {**test, "best_step": best_step})
    paper = config.get("paper", {}) if hasattr(config, "get") else {}
    results = {
        "task": run.task.name,
        "metric": run.metric,
        "best_val": best_val,
        "best_step": best_step,
        "test": test[run.metric],
        "test_loss": test["loss"],
        "paper": (paper.get("value") if hasattr(paper, "get") else None) or None,  # 0: unknown
        "steps": done,
        "stopped_by": "time budget" if done < total_steps else "num_train_steps",
        "wall_time_s": wall,
        "num_params": run.num_params,
        "devices": jax.device_count(),
        "process_count": jax.process_count(),
    }
    if run.primary:
        write_results(workdir, results)
    return results

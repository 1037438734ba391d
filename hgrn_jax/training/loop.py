"""``train_and_evaluate(config, workdir)``: the whole run, resumable and preemption-safe.

Steps: check the config (:mod:`hgrn_jax.training.config_checks`); lock the workdir and compare
its config.json with the new config (:mod:`hgrn_jax.training.workdir`); build the task
(:mod:`hgrn_jax.training.task_choice`) and a sharded train state; resume from the
newest usable checkpoint in ``workdir/checkpoints`` (the data position is the input pipeline's
state saved with it, or the saved step for checkpoints without one; damaged checkpoints are moved
aside, see :mod:`hgrn_jax.training.checkpoint`) and only then replace ``config.json`` (a
refused checkpoint leaves it as it was); open and validate every
split (:mod:`hgrn_jax.training.preflight`); train with logging; evaluate the
whole validation split every ``eval_every`` steps and checkpoint with the validation metric (the
best one is kept); checkpoint every ``checkpoint_every`` steps; at the end evaluate the test split
with the best validation checkpoint and write ``results.json``.

Stopping:
- SIGTERM (preemption) or a first Ctrl-C (:mod:`hgrn_jax.training.preemption`): the current
  step finishes, a checkpoint is written, and :class:`~hgrn_jax.training.preemption.Preempted`
  is raised; ``experiments.train`` turns it into exit code
  :data:`~hgrn_jax.training.preemption.PREEMPTED_EXIT_CODE` (130, by SIGINT, after a Ctrl-C). Running the same command again resumes from that step; a run
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

import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hgrn_jax import sharding
from hgrn_jax.data.loader import is_out_of_space
from hgrn_jax.tasks.protocol import Task
from hgrn_jax.training import agreement, loss_scale, optim, podlog, preemption, preflight, watchdog
from hgrn_jax.training.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    Checkpoints,
    DamagedCheckpointError,
)
from hgrn_jax.training.config_checks import (
    check_config_values,
    check_mesh_and_batches,
    check_not_in_a_worker_process,
    config_int,
    time_budget,
)
from hgrn_jax.training.logging import MetricsWriter, config_as_json, write_config, write_results
from hgrn_jax.training.loss_scale import LossScaleStartWarning, LossScaleState
from hgrn_jax.training.preemption import Preempted, StopSignals, how_to_resume
from hgrn_jax.training.state import (
    TrainState,
    abstract_checkpoint_tree,
    count_params,
    create_train_state,
    from_checkpoint_tree,
    model_class_name,
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
from hgrn_jax.training.task_choice import (
    check_task_name,
    data_source,
    quoted_paper_number,
    resolve_task,
)
from hgrn_jax.training.train_window import TrainWindow
from hgrn_jax.training.workdir import (
    ConfigChangedError,
    ConfigChangeWarning,
    WorkdirError,
    WorkdirLock,
    check_checkpoints_writable,
    check_resume,
    has_checkpoint,
    not_writable,
    out_of_space,
    resume_choice,
)


class InputStateWarning(UserWarning):
    """A checkpoint without the input pipeline's state: the input resumes at its step."""


class NonFiniteValidationWarning(RuntimeWarning):
    """An evaluation's metric was NaN or infinite while the training loss was finite."""


class NonFiniteLossError(RuntimeError):
    """The training loss or gradient became NaN or infinite."""


def stop_reason(error: BaseException, limit: int = 400) -> str:
    """What stopped a run, in one line for its ``events.jsonl`` (``experiments.report`` shows
    it): ``Type: first line of the message``, cut at ``limit`` characters."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (SIGINT) at once"
    text = str(error).strip().splitlines()
    if isinstance(error, Preempted):  # its message starts "preempted (SIGTERM): ..."
        line = text[0]
    else:
        line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
# The run
# ----------------------------------------------------------------------------------------------


class Run:
    """One run's task, mesh, sharded initial state, jitted steps, checkpoints and writer
    (what :func:`train_and_evaluate` drives; tests use it to evaluate a state directly)."""

    def __init__(
        self,
        config: Any,
        workdir: str | Path,
        task: Task | None = None,
        lock: WorkdirLock | None = None,
    ):
        self.config = config
        self.workdir = Path(workdir)
        self.lock = lock  # process 0's; checked before each checkpoint
        self.primary = jax.process_index() == 0
        self.task, error = task, None
        if task is None:
            try:
                self.task = resolve_task(config)
            except Exception as failure:  # one process's data files: every process stops
                error = failure
        agreement.share_failures(error, "building the task (opening its data)")
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
            keep=config_int(config, "keep_checkpoints", 2),
            best_metric=self.best_key,
            best_mode=self.best_mode,
        )
        self.ckpt_target = abstract_checkpoint_tree(
            jax.eval_shape(lambda s: s, self.state), self.shardings
        )
        self.writer = MetricsWriter(self.workdir, enabled=self.primary)
        self.started = False  # set by :meth:`start`: a run refused before it records no stop

    def start(self, step: int) -> None:
        """Record that training (re)starts at ``step``, after every check that may refuse the
        run: forget the records a killed run wrote after ``step`` and note the start in
        ``events.jsonl``, with the devices and processes it runs on (a resume may change
        them; results.json gives only the last) and what the workdir's check said
        (``"notes"``: the config changes a resume accepted, a rebuilt ``config.json``), which
        ``config.json``, rewritten with the new values, no longer shows), and the model's class
        (the report's label of a run without results)."""
        self.writer.rewind(step)
        notes = self.lock.resume_notes if self.lock is not None else []
        self.writer.event(
            "started",
            step=step,
            devices=jax.device_count(),
            processes=jax.process_count(),
            model_class=model_class_name(self.graphdef),
            **({"notes": notes} if notes else {}),
        )
        self.started = True

    def close(self) -> None:
        """Close ``metrics.jsonl``, the TensorBoard writer and the checkpoint manager (after
        the saves in flight are written), the manager also when closing the writers fails (a
        full disk, or an I/O error on their files): a save in flight was left unfinished."""
        try:
            self.writer.close()
        finally:
            self.checkpoints.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error: BaseException | None, traceback) -> None:
        """Closes the run however its block ends, so that a script or notebook that goes on
        after an error keeps no open file or checkpoint manager of it. After an error, that
        error stays the one raised; a failure to close is added to it as a note."""
        if self.started:
            try:
                if error is None:
                    self.writer.event("finished")
                else:
                    self.writer.event("stopped", reason=stop_reason(error))
            except OSError:
                pass  # a full disk: the error says so, or results.json holds the end
        if error is None:
            self.close()
            return
        try:
            self.close()
        except Exception as also:
            error.add_note(f"closing the run after this error failed too: {also!r}")

    # -- checkpoints ---------------------------------------------------------------------------

    def restore(self, step: int | None = None) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint (or ``step``) as ``(state, meta)``.

        Across a change into or out of float16 (forced: it is a structural change) the
        checkpoint's parameters and optimizer state resume: a float16 run restores a checkpoint
        without loss-scale state (saved in another dtype, or by a float16 run from before loss
        scaling) with a new scale and a
        :class:`~hgrn_jax.training.loss_scale.LossScaleStartWarning`; a run in another dtype
        restores a float16 run's checkpoint without its scale, with a
        :class:`~hgrn_jax.training.loss_scale.LossScaleDroppedWarning`."""
        try:
            found = self._restore(self.ckpt_target, step)
        except CheckpointMismatchError as mismatch:
            found = self._restore_across_loss_scaling(step, mismatch)
        if found is None:
            return None
        _, tree, meta = found
        return from_checkpoint_tree(tree, self.state), meta

    def _restore_across_loss_scaling(
        self, step: int | None, mismatch: CheckpointMismatchError
    ) -> tuple[int, Any, dict] | None:
        """:meth:`restore` of a checkpoint whose optimizer state has a loss scale where this
        run's has none, or the reverse; raises ``mismatch`` when it is not that."""
        target = self.ckpt_target
        if isinstance(target.opt_state, LossScaleState):
            found = self._restore(target.replace(opt_state=target.opt_state.inner), step)
            if found is None:
                return None
            restored_step, tree, meta = found
            fresh = jax.jit(
                loss_scale.initial_state,
                out_shardings=(
                    self.shardings.opt_state.scale,
                    self.shardings.opt_state.good_steps,
                ),
            )()
            warnings.warn(
                f"checkpoint at step {restored_step} holds no float16 loss scale (saved in "
                "another dtype, or before float16 runs scaled their loss): its parameters "
                f"and optimizer state resume, with the loss scale at {float(fresh[0]):g}",
                LossScaleStartWarning,
                stacklevel=3,
            )
            return (
                restored_step,
                tree.replace(opt_state=LossScaleState(*fresh, tree.opt_state)),
                meta,
            )
        replicated = sharding.replicated(self.mesh)
        scaled = LossScaleState(
            jax.ShapeDtypeStruct((), np.float32, sharding=replicated),
            jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
            target.opt_state,
        )
        try:
            found = self._restore(target.replace(opt_state=scaled), step)
        except CheckpointMismatchError:
            raise mismatch from None
        if found is None:
            return None
        restored_step, tree, meta = found
        warnings.warn(
            f"checkpoint at step {restored_step} is a float16 run's: its parameters and "
            f"optimizer state resume without its loss scale ({float(tree.opt_state.scale):g}), "
            f"which dtype={getattr(self.config, 'dtype', 'float32')!r} does not use",
            loss_scale.LossScaleDroppedWarning,
            stacklevel=3,
        )
        return restored_step, tree.replace(opt_state=tree.opt_state.inner), meta

    def _restore(self, target: Any, step: int | None) -> tuple[int, Any, dict] | None:
        if step is None:
            return self.checkpoints.restore_latest(target)
        return (step, *self.checkpoints.restore(step, target))

    def save(
        self,
        state: TrainState,
        meta: dict,
        metrics: dict | None = None,
        input_state: dict | None = None,
    ) -> None:
        """Checkpoint ``state`` with ``meta``, ``metrics``, the training iterator's
        ``input_state`` (this process's; None when the task's iterator keeps none) and a copy of
        the config, which rebuilds a lost or unreadable ``config.json``. Raises
        :class:`~hgrn_jax.training.workdir.WorkdirInUseError` instead when the workdir's lock
        no longer names this run."""
        if self.lock is not None:
            self.lock.check()
        self.check_finite(state)
        step = int(jax.device_get(state.step))
        self.checkpoints.save(
            step,
            to_checkpoint_tree(state),
            meta,
            metrics,
            input_state,
            config=config_as_json(self.config),
        )

    def check_finite(self, state: TrainState) -> None:
        """Raise :class:`NonFiniteLossError` once the loss or a gradient was not finite."""
        bad = int(jax.device_get(state.nonfinite_step))
        if bad >= 0:
            kept = (
                "the last checkpoint before it is kept"
                if has_checkpoint(self.workdir)
                else "no checkpoint was saved before it"
            )
            fixes = (
                "Lower optimizer.learning_rate or enable optimizer.grad_clip_norm"
                if getattr(self.config, "dtype", "float32") == "float32"
                else "Lower optimizer.learning_rate, enable optimizer.grad_clip_norm, or use "
                "dtype='float32'"
            )
            if bad == 0:  # no update yet: the initial parameters' loss
                raise NonFiniteLossError(
                    "the training loss or gradient was NaN/inf at step 0, before any update; "
                    f"stopping ({kept}). The task's loss_fn or its data give it (a NaN or inf "
                    "in the inputs, a log of 0, a division by 0), not the learning rate"
                )
            raise NonFiniteLossError(
                f"the training loss or gradient became NaN/inf at step {bad}; stopping ({kept}). "
                + fixes
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


def _write_config(workdir: Path, config: Any) -> None:
    try:
        write_config(workdir, config)
    except OSError as os_error:
        raise not_writable(workdir / "config.json", os_error) from None


def _full_disk_error(workdir: Path, config: Any, error: BaseException) -> WorkdirError | None:
    """The one-line :func:`~hgrn_jax.training.workdir.out_of_space` error for ``error`` when it
    is a write that failed for lack of space (:func:`is_out_of_space`), else None."""
    if not is_out_of_space(error):
        return None
    hint = how_to_resume(resume_choice(config))
    return out_of_space(workdir, error, hint, config_int(config, "keep_checkpoints", 2))


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

            lock.resume_notes = check_resume(workdir, config, model_defaults(config))
            for line in lock.resume_notes:
                warnings.warn(line, ConfigChangeWarning, stacklevel=3)
            try:
                check_checkpoints_writable(workdir)
            except OSError as failure:
                raise _full_disk_error(workdir, config, failure) or failure from None
            if not has_checkpoint(workdir):
                _write_config(workdir, config)
        except (WorkdirError, ValueError, OSError) as failure:
            lock.release()
            error = failure
    agreement.share_outcome(error, f"preparing {workdir}")
    return lock


def commit_config(workdir: Path, config: Any) -> None:
    """Write ``config.json`` (process 0) once the run's checkpoint and input pipeline have
    been restored with ``config``, so that a refused resume leaves the saved config as it was;
    every process learns the outcome."""
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
    get = run.config.get if hasattr(run.config, "get") else lambda key, default=None: default
    model = get("model", None)
    mixer = model.get("mixer", None) if hasattr(model, "get") else None
    sequence_axis = next(
        (
            section.get("sequence_axis", None)
            for section in (mixer, model)
            if hasattr(section, "get") and section.get("sequence_axis", None)
        ),
        None,
    )
    return podlog.startup_summary(
        task=run.task.name,
        source=data_source(run.config, run.task),
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
        sequence_axis=sequence_axis,
    )


def train_and_evaluate(
    config: Any,
    workdir: str | Path,
    task: Any = None,
    on_checked: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and report one run; resumes if ``workdir`` holds checkpoints.

    ``task`` overrides :func:`resolve_task` (tests and notebooks pass their own).
    ``on_checked`` is called once the config has passed the checks made before the workdir is
    touched (the runner quotes its paper number then, so no note precedes a config error).
    Returns the results written to ``workdir/results.json``. Raises :class:`Preempted` after a SIGTERM, or
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
    if on_checked is not None:
        on_checked()
    # The SIGTERM and SIGINT handlers are installed before anything else, so that a preemption
    # notice or a Ctrl-C that arrives while the model is built or compiled is not fatal: it
    # stops the run at the first step at which the processes compare their flags.
    with StopSignals() as stop_signals:
        lock = prepare_workdir(workdir, config)
        try:
            return _train_and_evaluate(config, workdir, task, stop_signals, step_timeout_s, lock)
        except Exception as error:
            full = _full_disk_error(workdir, config, error)
            if full is None:
                raise
            raise full from error
        finally:
            lock.release()


def _train_and_evaluate(
    config: Any,
    workdir: Path,
    task: Any,
    stop_signals: StopSignals,
    step_timeout_s: float,
    lock: WorkdirLock | None,
) -> dict[str, Any]:
    with Run(config, workdir, task, lock) as run:
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
    run: Run, config: Any, workdir: Path, stop_signals: StopSignals, step_timeout_s: float
) -> dict[str, Any]:
    total_steps = int(config.num_train_steps)
    eval_every = max(config_int(config, "eval_every", total_steps), 1)
    ckpt_every = max(config_int(config, "checkpoint_every", eval_every), 1)
    log_every = max(config_int(config, "log_every", 50), 1)

    budget = time_budget(config)
    state, meta = run.state, {"step": 0, "wall_time_s": 0.0}
    restored = run.restore()
    input_state = None
    if restored is not None:
        state, meta = restored
        release_buffers(run.state)  # the fresh initial state is not needed: free its memory
        input_state = run.checkpoints.input_state(int(meta["step"]))
    start = int(meta["step"])
    window = TrainWindow.from_meta(meta, str(run.checkpoints.step_folder(start)))
    if start > total_steps and not (workdir / "results.json").exists():
        # (A finished run rerun with fewer steps trains nothing and is tested again.)
        raise ConfigChangedError(
            f"the latest checkpoint in {workdir / 'checkpoints'} is at step {start}, past "
            f"--config.num_train_steps={total_steps}, of a run that has not finished; nothing "
            f"was changed. Set num_train_steps to {start} or more to continue that run ({start} "
            "tests it as it is), or use a new --workdir"
        )
    wall_before = float(meta.get("wall_time_s", 0.0))
    bar = podlog.progress(total_steps, start, enabled=run.primary)
    if run.primary:
        for line in _startup_summary(run, start, total_steps):
            bar.write(line)
    batches, error = None, None
    try:
        run.writer.check()
        batches = preflight.open_splits(run.task, config, start, input_state, run.eval_check)
    except Exception as failure:  # one process's data files: every process stops
        error = failure
    agreement.share_failures(error, "opening and checking the data splits")
    run.start(start)
    if restored is None or start < total_steps:  # a finished run trains nothing of config
        commit_config(workdir, config)  # after the input resumed: a refusal leaves config.json
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

    saved_wall = wall_before  # the training wall time the newest checkpoint holds

    def save(state: TrainState, done: int, metrics: dict | None = None) -> None:
        nonlocal saved_wall
        meta = bookkeeping(done) | window.to_meta()
        run.save(state, meta, metrics, batches.get_state())
        saved_wall = meta["wall_time_s"]

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
                expected=(Preempted,),
            ) as guard,
        ):
            for step in range(start, end):
                with guard.waiting_for_input(step):
                    batch = next(batches)
                batch = sharding.shard_batch(batch, run.mesh)
                state, metrics = run.train_step(state, batch)
                guard.beat(step + 1)
                run.checkpoints.record_finished()
                window.add(metrics)
                done, steps_since_log = step + 1, steps_since_log + 1
                preempted, out_of_time = preemption.stop_requests(
                    done, stop_signals.requested, budget > 0 and wall_time() >= budget
                )
                last = done == total_steps or out_of_time

                if done % log_every == 0 or last:
                    run.check_finite(state)
                    record = window.record(with_accuracy=run.metric == "accuracy")
                    record["steps_per_sec"] = steps_since_log / max(time.time() - t_log, 1e-9)
                    record["wall_time_s"] = wall_time()
                    run.writer.write(done, "train", record)
                    bar.update(steps_since_log, loss=record["loss"], lr=record["lr"])
                    t_log, steps_since_log = time.time(), 0

                if done % eval_every == 0 or last:
                    run.check_finite(state)
                    guard.pause()  # an evaluation takes as long as it takes; peers still watched
                    val = run.evaluate(state, "val")
                    guard.evaluated(done)  # the checkpoint after it is timed again
                    run.writer.write(done, "val", {**val, "wall_time_s": wall_time()})
                    bar.write(
                        f"step {done}: val " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    )
                    if not math.isfinite(val[run.metric]):
                        warnings.warn(
                            f"step {done}: the validation {run.metric} is {val[run.metric]} (a "
                            "diverged evaluation); its checkpoint is kept, never as the best",
                            NonFiniteValidationWarning,
                            stacklevel=2,
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

    best_step, best_state = _restore_best(run, workdir)
    best_val = run.checkpoints.metrics(best_step)[run.best_key]
    test = run.evaluate(best_state, "test")
    kept_results = run.writer.end(done)
    if kept_results is not None:
        print(
            f"the results.json of this run's earlier end is kept as {kept_results.name} (its "
            "test record stays in metrics.jsonl)",
            file=sys.stderr,
        )
    run.writer.write(done, "test", {**test, "best_step": best_step})
    results = {
        "task": run.task.name,
        "metric": run.metric,
        "best_val": best_val,
        "best_step": best_step,
        "test": test[run.metric],
        "test_loss": test["loss"],
        "paper": quoted_paper_number(config),
        "data_source": data_source(config, run.task),
        "steps": done,
        "stopped_by": "time budget" if done < total_steps else "num_train_steps",
        "wall_time_s": saved_wall,  # the last checkpoint's: a rerun reports the same
        "num_params": run.num_params,
        "model_class": model_class_name(run.graphdef),
        "devices": jax.device_count(),
        "process_count": jax.process_count(),
    }
    if run.primary:
        write_results(workdir, results)
    return results

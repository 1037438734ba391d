"""The checks a run makes of its config before it touches its workdir.

Each failure is a ValueError (RuntimeError for a call from an importing worker process) naming
``config.<key>``, its value and the fix: run lengths and the time budget, the seed, the mesh and
the batch sizes on it, the sequence axis, the model's sizes, the optimizer's numbers and the
input workers (:func:`check_config_values` runs them all). Needs no model, data or devices
beyond their count. A run length that departs from its schedule or its epochs is legitimate (a
shortened paper run) and only warned of (:func:`run_length_warnings`).
"""

from __future__ import annotations

import multiprocessing
import warnings
from typing import Any

import jax
import numpy as np

from hgrn_jax import sharding
from hgrn_jax.training import optim
from hgrn_jax.training.workdir import flatten_keys


def config_int(config: Any, key: str, default: int) -> int:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return int(value)


def is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def mesh_config(config: Any) -> sharding.MeshConfig:
    """``config.mesh`` (absent axes at :class:`~hgrn_jax.sharding.MeshConfig`'s defaults);
    ValueError naming ``config.mesh.<axis>`` when a size is not a whole number >= 1 or -1."""
    section = config.get("mesh", None) if hasattr(config, "get") else None
    section = section if hasattr(section, "get") else {}
    defaults, sizes = sharding.MeshConfig(), {}
    for axis in sharding.MESH_AXES:
        value = section.get(axis, getattr(defaults, axis))
        if not is_whole(value) or value == 0 or value < -1:
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
    if not is_whole(value) or value < minimum:
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
        simulate = (
            "; on CPUs, HGRN_NUM_CPU_DEVICES=N before the command simulates N devices"
            if jax.default_backend() == "cpu" and error.needs_more_devices
            else ""
        )
        raise ValueError(
            f"config.{error.problem} ({processes} process{'es' if processes > 1 else ''}); "
            "set --config.mesh.data, --config.mesh.fsdp and --config.mesh.model so that "
            f"their product is {num_devices} (one of them -1: the devices the others leave)"
            + simulate
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
    if not is_whole(accumulate) or accumulate < 0:
        raise ValueError(
            f"config.optimizer.accumulate_steps={accumulate} must be a whole number >= 1; set "
            "--config.optimizer.accumulate_steps (1, or 0: no accumulation)"
        )
    if accumulate > 1 and is_whole(batch_size) and batch_size % accumulate:
        raise ValueError(
            f"config.optimizer.accumulate_steps={accumulate} does not divide "
            f"config.batch_size={batch_size} into micro-batches; set "
            "--config.optimizer.accumulate_steps to a divisor of the batch size"
        )
    if accumulate > 1 and is_whole(batch_size) and (batch_size // accumulate) % shards:
        raise ValueError(
            f"config.optimizer.accumulate_steps={accumulate} makes micro-batches of "
            f"{batch_size // accumulate} rows (config.batch_size={batch_size}), which do not "
            f"split over {split}: devices would sit idle; set "
            "--config.optimizer.accumulate_steps to a divisor of "
            f"{batch_size // shards} (the rows of one batch shard), or change --config.mesh.*"
        )
    model = get("model", None)
    groups = model.get("batch_norm_groups", 1) if hasattr(model, "get") else 1
    rows = batch_size // max(accumulate, 1) if is_whole(batch_size) else None
    if is_whole(groups) and groups > 1 and rows is not None and rows % groups:
        micro = f" (micro-batches of {rows})" if accumulate > 1 else ""
        raise ValueError(
            f"config.model.batch_norm_groups={groups} does not divide "
            f"config.batch_size={batch_size}{micro} into equal slices for BatchNorm's "
            "statistics; set --config.model.batch_norm_groups to a divisor of "
            f"{rows}, or change --config.batch_size"
        )
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


def check_run_lengths(config: Any) -> None:
    """Raise ValueError naming the key when a step count, frequency or the number of
    checkpoints kept is not positive (``keep_checkpoints`` 0 or -1 meant 1), or the time
    budget is negative."""
    for key in (
        "num_train_steps",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "keep_checkpoints",
    ):
        value = config_int(config, key, 1)
        if value < 1:
            raise ValueError(f"config.{key}={value} must be at least 1; set --config.{key}")
    budget = time_budget(config)
    if budget < 0:
        raise ValueError(
            f"config.max_train_time_s={budget} must be 0 (no limit) or a number of seconds; "
            "set --config.max_train_time_s"
        )


def check_probabilities(config: Any) -> None:
    """Raise ValueError naming the key when a dropout rate of ``config.model`` (any key that
    ends in ``dropout``, nested ones too) is not in [0, 1): 1.5 and -0.1 used to train."""
    model = config.get("model", None) if hasattr(config, "get") else None
    model = model.to_dict() if hasattr(model, "to_dict") else model
    if not isinstance(model, dict):
        return
    for name, value in flatten_keys(model, "model.").items():
        if name.endswith("dropout") and isinstance(value, int | float):
            if isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(
                    f"config.{name}={value} must be a dropout rate in [0, 1); set "
                    f"--config.{name} (0 turns it off)"
                )


def check_seed(config: Any) -> None:
    """Raise ValueError naming the key when ``config.seed`` is not a whole number >= 0 (numpy's
    generators, which order the training batches, take no negative seed)."""
    seed = config.get("seed", 0) if hasattr(config, "get") else 0
    if not is_whole(seed) or seed < 0:
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
    naming the key: run lengths, the seed, the model's sizes and (a registered task) its
    config class's rules and the settings its source does not read, the activation dtype of a
    registered task, the optimizer's names and numbers, the mesh with the batch sizes and sequence
    axis on it (:func:`check_mesh_and_batches`), and the input workers (``data.workers``). Then
    (process 0) one :class:`RunLengthWarning` per line of :func:`run_length_warnings` and one
    :class:`ShardingWarning` per line of :func:`sharding_warnings`."""
    from hgrn_jax.data import grain_pipeline
    from hgrn_jax.tasks import model_settings, registry
    from hgrn_jax.training.task_choice import dataset_entry

    check_run_lengths(config)
    check_probabilities(config)
    check_seed(config)
    entry = dataset_entry(config)
    registry.check_model_sizes(config, entry)
    if entry is not None:
        model_settings.activation_dtype(config.get("dtype", "float32"))
    optim.check_optimizer_config(config)
    _, fsdp, _ = check_mesh_and_batches(config)
    registry.check_model_and_settings(config, entry)  # after the runner's own, which name flags
    data = config.get("data", None)
    if hasattr(data, "get"):
        grain_pipeline.resolve_worker_count(data.get("workers", 0))  # checks data.workers
    if jax.process_index() == 0:
        for line in run_length_warnings(config):
            warnings.warn(line, RunLengthWarning, stacklevel=2)
        for line in sharding_warnings(config, fsdp):
            warnings.warn(line, ShardingWarning, stacklevel=2)


def sharding_warnings(config: Any, fsdp: int) -> list[str]:
    """What is slow in ``config``'s sharding with ``fsdp`` = the mesh's resolved fsdp size: a
    time axis split over ``data`` while the batch is split over data x fsdp (XLA gathered the
    recurrences' inputs and outputs whole; fine with ``fsdp`` or ``model``, or fsdp = 1)."""
    model = config.get("model", None) if hasattr(config, "get") else None
    mixer = model.get("mixer", None) if hasattr(model, "get") else None
    lines = []
    for key, section in (("model.mixer", mixer), ("model", model)):
        axis = section.get("sequence_axis", None) if hasattr(section, "get") else None
        if axis == "data" and fsdp > 1:
            lines.append(
                f"config.{key}.sequence_axis='data' with config.mesh.fsdp={fsdp}: the batch is "
                "split over data x fsdp, data first, and XLA cannot move its data split onto "
                "the time axis but by gathering each recurrence's inputs and outputs whole "
                '("Involuntary full rematerialization"); set '
                f"--config.{key}.sequence_axis=fsdp (it spans hosts too) or model, or "
                "--config.mesh.fsdp=1"
            )
    return lines


class ShardingWarning(UserWarning):
    """A mesh and ``sequence_axis`` that train correctly but move whole activations between
    devices every step; the run goes ahead."""


class RunLengthWarning(UserWarning):
    """``num_train_steps`` departs from the schedule or the epochs the config records (a
    shortened paper run, a cosine that outlasts its ``decay_steps``); the run goes ahead."""


def _section(config: Any, name: str) -> dict[str, Any]:
    """``config.<name>`` as a dict (empty when the config has no such section)."""
    section = config.get(name, None) if hasattr(config, "get") else None
    return dict(section) if hasattr(section, "get") else {}


def run_length_warnings(config: Any) -> list[str]:
    """One line for each way ``config.num_train_steps`` departs from the rest of the config:

    - it ends the run before ``schedule.warmup_steps`` (the last update, at step
      ``num_train_steps - 1``, has less than the peak learning rate);
    - a ``cosine`` schedule's updates go past ``schedule.decay_steps``, where the rate reaches
      ``min_lr`` and then rises again (:func:`hgrn_jax.training.optim.cosine_with_warmup`);
    - ``epochs`` > 0 and it is not ``epochs x (data.train_examples // batch_size)``: the paper
      configs derive their steps from the reference's training-set size, which they record in
      ``data.train_examples`` (the size of a generated split too); a config without it, or
      with ``epochs`` 0, is not checked.

    An ``eval_every`` beyond the run is not one: the loop evaluates after the last step too.
    Call after the values were checked (:func:`check_config_values`)."""
    steps = config_int(config, "num_train_steps", 1)
    schedule, lines = _section(config, "schedule"), []
    name = schedule.get("name", "constant")
    warmup = int(schedule.get("warmup_steps", 0) or 0)
    decay = int(schedule.get("decay_steps", 0) or 0)
    peak = float(_section(config, "optimizer").get("learning_rate", 0.0))
    if 0 < warmup and steps <= warmup:
        last_rate = float(optim.make_schedule(schedule, peak)(steps - 1))
        fraction = last_rate / peak if peak > 0 else (steps - 1) / warmup
        lines.append(
            f"config.num_train_steps={steps} ends within config.schedule.warmup_steps={warmup}: "
            f"the learning rate never reaches its peak {peak:g} (the last step's is "
            f"{fraction:.2%} of it, {fraction * peak:.3g}); set --config.schedule.warmup_steps "
            "below the run's steps"
            + (f" and --config.schedule.decay_steps={steps}" if name == "cosine" else "")
        )
    if name == "cosine" and steps - 1 > decay >= warmup:
        min_lr = float(schedule.get("min_lr", 0.0))
        back_at_peak = 2 * decay - warmup
        again = f", back at {peak:g} at step {back_at_peak}" if back_at_peak < steps else ""
        last = float(optim.cosine_with_warmup(peak, warmup, decay, min_lr)(steps - 1))
        lines.append(
            f"config.num_train_steps={steps} runs past config.schedule.decay_steps={decay}: the "
            f"cosine learning rate reaches schedule.min_lr={min_lr:g} at step {decay} and rises "
            f"again after it{again} ({last:.3g} at the last step), as the reference LRA "
            f"trainer's does; to end the cosine with the run, set "
            f"--config.schedule.decay_steps={steps}"
        )
    epochs, batch_size = config_int(config, "epochs", 0), config_int(config, "batch_size", 0)
    examples = int(_section(config, "data").get("train_examples", 0) or 0)
    per_epoch = examples // batch_size if batch_size > 0 else 0
    schedule_epoch = int(schedule.get("steps_per_epoch", 0) or 0)
    if name == "timm_cosine" and per_epoch > 0 and schedule_epoch != per_epoch:
        lines.append(
            f"config.schedule.steps_per_epoch={schedule_epoch} is not an epoch of the data "
            f"(config.data.train_examples={examples} // config.batch_size={batch_size} = "
            f"{per_epoch} steps): timm_cosine changes the learning rate every {schedule_epoch} "
            f"steps; set --config.schedule.steps_per_epoch={per_epoch} (and "
            f"--config.schedule.warmup_steps, --config.schedule.decay_steps to whole epochs of it)"
        )
    if epochs > 0 and per_epoch > 0 and steps != epochs * per_epoch:
        trained = steps / per_epoch
        record = (
            f"--config.epochs={steps // per_epoch}"
            if steps % per_epoch == 0
            else "--config.epochs=0 (a run counted in steps)"
        )
        lines.append(
            f"config.num_train_steps={steps} is not config.epochs={epochs} over "
            f"config.data.train_examples={examples} at config.batch_size={batch_size} "
            f"({epochs} x {per_epoch} = {epochs * per_epoch} steps): the run trains "
            f"{trained:.3g} epochs and config.json records {epochs}; set "
            f"--config.num_train_steps={epochs * per_epoch} (and "
            f"--config.schedule.decay_steps, --config.eval_every to follow) for {epochs} "
            f"epochs, or {record} with --config.num_train_steps={steps}"
        )
    return lines


def time_budget(config: Any) -> float:
    """``config.max_train_time_s``: seconds of training wall time after which the run stops
    as if it had reached its last step (0 or absent: no limit)."""
    value = config.get("max_train_time_s", 0) if hasattr(config, "get") else 0
    return float(value or 0)

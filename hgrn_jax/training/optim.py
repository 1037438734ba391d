"""Optimizers, learning-rate schedules and weight-decay masks from a run's config.

Schedules take the optimizer step (the number of updates already applied, starting at 0) and
return the learning rate of the next update:

- ``cosine``: the reference LRA trainer's (``transformers.get_cosine_schedule_with_warmup`` with
  its default half cycle, stepped every update): a linear warmup ``lr * step / warmup_steps``, then
  ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2`` with ``progress = (step -
  warmup_steps) / (decay_steps - warmup_steps)``, which reaches ``min_lr`` at ``decay_steps``
  (counted from step 0, warmup included). ``progress`` is not clipped at 1, as in the reference:
  past ``decay_steps`` the rate rises again, back to ``lr`` at progress 2 (the LRA Image and
  Path-X configs run that long; the runner warns, see
  :func:`hgrn_jax.training.config_checks.run_length_warnings`).
- ``inverse_sqrt``: fairseq's ``lr * min(step / warmup, sqrt(warmup / step))``.
- ``constant``: ``lr`` (after an optional linear warmup).
- ``timm_cosine``: the reference ImageNet trainer's (DeiT's ``main.py`` with timm's
  ``CosineLRScheduler``), constant within each epoch of ``schedule.steps_per_epoch`` steps:
  :func:`timm_cosine`.

``schedule.min_lr`` is cosine's and timm_cosine's alone (another schedule refuses a value > 0),
``schedule.warmup_lr`` timm_cosine's alone (likewise); ``schedule.decay_steps`` is theirs too and
``schedule.steps_per_epoch`` timm_cosine's (the other schedules ignore them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hgrn_jax.training.loss_scale import dynamic_loss_scale

Schedule = Callable[[jax.Array | int], jax.Array]

SCHEDULES = ("cosine", "inverse_sqrt", "constant", "timm_cosine")
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
WEIGHT_DECAY_MASKS = ("all", "no_bias_norm", "timm")

# Parameters whose path contains one of these names are "norm-like" and never decayed under
# ``no_bias_norm``: biases, norm scales, HGRU's phase and the lower-bound matrix.
_NO_DECAY_NAMES = ("bias", "scale", "theta", "lower_bounds")

# HGRU's phases: (d,) here, (1, 1, d) in hgru-pytorch (Hgru1d.theta, BiHgru1d.theta_forward and
# theta_reverse), so not 1-D to timm's weight-decay rule.
_NOT_1D_IN_THE_REFERENCE = ("theta", "theta_reverse")


def _warmup_factor(step: jax.Array, warmup_steps: int) -> jax.Array:
    if warmup_steps <= 0:
        return jnp.ones_like(step)
    return jnp.minimum(step / warmup_steps, 1.0)


def cosine_with_warmup(
    learning_rate: float, warmup_steps: int, decay_steps: int, min_lr: float = 0.0
) -> Schedule:
    """Linear warmup to ``learning_rate``, then cosine to ``min_lr`` at ``decay_steps`` and, past
    it, up again (the reference's periodic cosine: ``learning_rate`` at ``2 * decay_steps -
    warmup_steps``)."""
    if decay_steps < warmup_steps:
        raise ValueError(
            f"schedule.decay_steps ({decay_steps}) must be >= schedule.warmup_steps "
            f"({warmup_steps})"
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
        cosine = min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(
            step < warmup_steps, learning_rate * _warmup_factor(step, warmup_steps), cosine
        )

    return schedule


def inverse_sqrt(learning_rate: float, warmup_steps: int) -> Schedule:
    """fairseq's ``inverse_sqrt``: ``lr * min(step / warmup, sqrt(warmup / step))`` (0 at step 0)."""
    if warmup_steps <= 0:
        raise ValueError("schedule.warmup_steps must be > 0 for the inverse_sqrt schedule")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        decay = jnp.sqrt(warmup_steps / jnp.maximum(step, 1.0))
        return learning_rate * jnp.minimum(step / warmup_steps, decay)

    return schedule


def constant(learning_rate: float, warmup_steps: int = 0) -> Schedule:
    """``learning_rate``, reached by a linear warmup over ``warmup_steps`` when that is > 0."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return learning_rate * _warmup_factor(step, warmup_steps)

    return schedule


def timm_cosine(
    learning_rate: float,
    *,
    steps_per_epoch: int,
    warmup_epochs: int,
    epochs: int,
    warmup_lr: float,
    min_lr: float,
) -> Schedule:
    """The learning rate of the reference ImageNet run: timm's ``CosineLRScheduler`` (timm 0.3
    to 0.5) as DeiT's ``main.py`` makes and steps it, per epoch of ``steps_per_epoch`` steps.

    timm's rate for epoch ``t`` (``t_in_epochs``, ``warmup_prefix`` False, ``cycle_limit`` 1,
    ``t_initial = epochs``) is ``warmup_lr + t * (learning_rate - warmup_lr) / warmup_epochs``
    for ``t < warmup_epochs``, ``min_lr + (learning_rate - min_lr) * (1 + cos(pi * t /
    epochs)) / 2`` for ``warmup_epochs <= t < epochs`` (``t`` counted from 0, not from the end of
    the warmup) and ``min_lr`` after. The scheduler sets timm's rate for ``t = 0`` when it is
    made and ``main.py`` calls ``lr_scheduler.step(epoch)`` at the end of each epoch, so epoch
    ``e`` trains at timm's rate for ``t = max(e - 1, 0)`` (timm's own ``train.py`` steps with
    ``epoch + 1``): epochs 0 and 1 both at ``warmup_lr``. The rates are computed per epoch in
    float64 and looked up, so the float32 result is the rounded float64 value (a float32
    cosine near the end of the run is 1e-5 off, relative).
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(
            f"timm_cosine needs steps_per_epoch ({steps_per_epoch}) and epochs ({epochs}) >= 1"
        )
    rates = jnp.asarray(
        [
            _timm_epoch_rate(t, learning_rate, warmup_epochs, epochs, warmup_lr, min_lr)
            for t in range(epochs + 1)
        ],
        jnp.float32,
    )

    def schedule(step):
        epoch = jnp.asarray(step).astype(jnp.int32) // steps_per_epoch
        return rates[jnp.clip(epoch - 1, 0, epochs)]

    return schedule


def _timm_epoch_rate(
    t: int, learning_rate: float, warmup_epochs: int, epochs: int, warmup_lr: float, min_lr: float
) -> float:
    """timm's ``CosineLRScheduler._get_lr(t)`` with DeiT's settings (see :func:`timm_cosine`)."""
    if t < warmup_epochs:
        return warmup_lr + t * (learning_rate - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * t / epochs))


def _timm_cosine_from_config(cfg: Mapping[str, Any], learning_rate: float) -> Schedule:
    """:func:`timm_cosine` of ``schedule.steps_per_epoch``, with ``schedule.warmup_steps`` and
    ``schedule.decay_steps`` (timm's ``t_initial``) whole numbers of its epochs."""
    per_epoch = cfg.get("steps_per_epoch", 0)
    if not _whole_non_negative(per_epoch) or int(per_epoch) < 1:
        raise ValueError(
            f"config.schedule.steps_per_epoch={per_epoch} must be an integer >= 1 with "
            "schedule.name='timm_cosine'; set --config.schedule.steps_per_epoch to the steps of "
            "an epoch (data.train_examples // batch_size)"
        )
    per_epoch = int(per_epoch)
    epochs = {}
    for key in ("warmup_steps", "decay_steps"):
        steps = cfg.get(key, 0)
        least = per_epoch if key == "decay_steps" else 0
        if not _whole_non_negative(steps) or int(steps) % per_epoch or int(steps) < least:
            raise ValueError(
                f"config.schedule.{key}={steps} must be a whole number of epochs of "
                f"schedule.steps_per_epoch={per_epoch} steps"
                + (" (at least one)" if key == "decay_steps" else "")
                + f" with schedule.name='timm_cosine'; set --config.schedule.{key} to a "
                f"multiple of {per_epoch}"
            )
        epochs[key] = int(steps) // per_epoch
    return timm_cosine(
        learning_rate,
        steps_per_epoch=per_epoch,
        warmup_epochs=epochs["warmup_steps"],
        epochs=epochs["decay_steps"],
        warmup_lr=float(cfg.get("warmup_lr", 0.0)),
        min_lr=float(cfg.get("min_lr", 0.0)),
    )


def make_schedule(schedule_config: Any, learning_rate: float) -> Schedule:
    """The schedule named by ``schedule_config.name`` (a ConfigDict or dict)."""
    cfg = dict(schedule_config)
    name = cfg.get("name", "constant")
    warmup = int(cfg.get("warmup_steps", 0))
    if name == "timm_cosine":
        return _timm_cosine_from_config(cfg, learning_rate)
    if name == "cosine":
        return cosine_with_warmup(
            learning_rate, warmup, int(cfg["decay_steps"]), float(cfg.get("min_lr", 0.0))
        )
    if name == "inverse_sqrt":
        return inverse_sqrt(learning_rate, warmup)
    if name == "constant":
        return constant(learning_rate, warmup)
    raise ValueError(f"unknown schedule.name {name!r}; choose one of {', '.join(SCHEDULES)}")


def _section(config: Any, name: str) -> Mapping[str, Any]:
    """``config.<name>`` as a mapping (empty when the config has no such section)."""
    section = config.get(name, None) if hasattr(config, "get") else None
    return dict(section) if section is not None else {}


def _check_number(key: str, value: Any, *, positive: bool, example: str) -> None:
    """Raise ValueError naming ``config.<key>`` unless ``value`` is a finite number > 0
    (``positive``) or >= 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number) and (number > 0 if positive else number >= 0)
    if not ok:
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(
            f"config.{key}={value} must be {need}; set --config.{key} (e.g. {example})"
        )


def _whole_non_negative(value: Any) -> bool:
    """Whether ``value`` is a whole number >= 0 (an int, or a float such as 10.0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number >= 0 and number.is_integer()


def check_optimizer_config(config: Any) -> None:
    """Raise ValueError naming the key when ``optimizer.learning_rate`` is not a finite number
    > 0, ``optimizer.weight_decay`` or ``schedule.min_lr`` not a finite number >= 0, or
    ``schedule.warmup_steps`` not an integer >= 0, and when ``optimizer.name``,
    ``optimizer.weight_decay_mask`` or ``schedule.name`` is not one there is. Keys the config
    lacks are not checked."""
    opt, schedule = _section(config, "optimizer"), _section(config, "schedule")
    for key, value, choices in (
        ("optimizer.name", opt.get("name"), OPTIMIZERS),
        ("optimizer.weight_decay_mask", opt.get("weight_decay_mask"), WEIGHT_DECAY_MASKS),
        ("schedule.name", schedule.get("name"), SCHEDULES),
    ):
        if value is not None and value not in choices:
            raise ValueError(
                f"unknown config.{key} {value!r}; set --config.{key} to one of {', '.join(choices)}"
            )
    if "learning_rate" in opt:
        _check_number(
            "optimizer.learning_rate", opt["learning_rate"], positive=True, example="1e-3"
        )
    for key, value in (
        ("optimizer.weight_decay", opt.get("weight_decay")),
        ("schedule.min_lr", schedule.get("min_lr")),
        ("schedule.warmup_lr", schedule.get("warmup_lr")),
    ):
        if value is not None:
            _check_number(key, value, positive=False, example="0")
    warmup = schedule.get("warmup_steps")
    if warmup is not None and not _whole_non_negative(warmup):
        raise ValueError(
            f"config.schedule.warmup_steps={warmup} must be an integer >= 0; set "
            "--config.schedule.warmup_steps (0: no warmup)"
        )
    check_unused_settings(opt, schedule)
    if schedule.get("name") == "timm_cosine":
        _timm_cosine_from_config(schedule, 1.0)  # its steps_per_epoch and whole epochs


# Adam's settings, which optimizer.name="sgd" does not have, at their defaults.
ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}


def check_unused_settings(opt: Mapping[str, Any], schedule: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key for a setting the chosen optimizer or schedule would
    ignore: ``weight_decay`` with ``adam`` (no decay; adamw has it), Adam's ``b1``, ``b2``,
    ``eps`` with ``sgd`` other than their defaults (sgd's momentum is ``optimizer.momentum``),
    ``schedule.min_lr`` with a schedule other than ``cosine`` and ``timm_cosine`` (the ones that
    decay to it) and ``schedule.warmup_lr`` with one other than ``timm_cosine`` (the one that
    warms up from it). ``schedule.decay_steps`` is theirs too, and ``schedule.steps_per_epoch``
    timm_cosine's; the other schedules ignore them."""
    name = opt.get("name", "adamw")
    decay = opt.get("weight_decay", 0.0)
    if name == "adam" and _is_number(decay) and float(decay) > 0:
        raise ValueError(
            f"config.optimizer.weight_decay={decay} does nothing with optimizer.name='adam' "
            "(optax.adam has no weight decay); set --config.optimizer.name=adamw (decoupled "
            "decay) or --config.optimizer.weight_decay=0"
        )
    if name == "sgd":
        for key, default in ADAM_DEFAULTS.items():
            value = opt.get(key, default)
            if _is_number(value) and float(value) != default:
                raise ValueError(
                    f"config.optimizer.{key}={value} is an Adam setting that "
                    "optimizer.name='sgd' ignores (its momentum is optimizer.momentum, 0.9 "
                    f"unless set); set --config.optimizer.{key}={default} (its default) or "
                    "use adamw, adam or lamb"
                )
    min_lr, kind = schedule.get("min_lr", 0.0), schedule.get("name", "constant")
    if kind not in ("cosine", "timm_cosine") and _is_number(min_lr) and float(min_lr) > 0:
        raise ValueError(
            f"config.schedule.min_lr={min_lr} does nothing with schedule.name={kind!r} (only "
            "cosine and timm_cosine decay to a minimum); set --config.schedule.min_lr=0 or "
            "--config.schedule.name=cosine"
        )
    warmup_lr = schedule.get("warmup_lr", 0.0)
    if kind != "timm_cosine" and _is_number(warmup_lr) and float(warmup_lr) > 0:
        raise ValueError(
            f"config.schedule.warmup_lr={warmup_lr} does nothing with schedule.name={kind!r} "
            "(only timm_cosine warms up from it; the others from 0); set "
            "--config.schedule.warmup_lr=0 or --config.schedule.name=timm_cosine"
        )


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _path_names(path: tuple) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return names


def _timm_decays(path: tuple, leaf: Any) -> bool:
    """timm's ``add_weight_decay`` rule for the parameter at ``path``: decayed unless 1-D in
    the reference model or a bias (the reference ImageNet model's ``no_weight_decay()`` list,
    position embeddings and class token, names nothing this model has)."""
    names = [n for n in _path_names(path) if n != "value"]
    name = names[-1] if names else ""
    ndim = 3 if name in _NOT_1D_IN_THE_REFERENCE else jnp.ndim(leaf)
    return not (ndim == 1 or name == "bias")


def weight_decay_mask(params: Any, mode: str = "all") -> Any:
    """A pytree of bools like ``params``: True where weight decay applies.

    ``"all"`` decays every parameter (the paper's LRA and LM recipes). ``"timm"`` decays what
    the reference ImageNet run (timm's ``create_optimizer``) decays: every parameter but the
    biases and the ones that are 1-D in the reference model (norm scales), so the kernels,
    HGRU's phases (``(1, 1, d)`` there) and the lower-bound matrix (depth, d) are decayed.
    ``"no_bias_norm"`` leaves out biases, norm scales, every parameter with fewer than 2
    dimensions (HGRU's theta) and the lower-bound matrix. With ``weight_decay`` 0 (or
    ``adam``, which refuses a decay) the mask selects what a decay of 0 applies to: nothing
    changes either way.
    """
    if mode == "all":
        return jax.tree.map(lambda _: True, params)
    if mode == "timm":
        return jax.tree_util.tree_map_with_path(_timm_decays, params)
    if mode != "no_bias_norm":
        raise ValueError(
            f"unknown optimizer.weight_decay_mask {mode!r}; choose one of "
            f"{', '.join(WEIGHT_DECAY_MASKS)}"
        )

    def decays(path, leaf) -> bool:
        names = _path_names(path)
        return jnp.ndim(leaf) >= 2 and not any(n in _NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def _on_several_devices() -> bool:
    """Whether arrays being traced may be sharded: the mesh set by ``jax.set_mesh`` has several
    devices or, with no mesh set, the process sees several."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.size > 1 if not mesh.empty else jax.device_count() > 1


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all of ``tree``'s leaves together (``optax.tree.norm``), summed in float32
    (or the leaves' dtype when wider; optax sums bfloat16 leaves in bfloat16).

    On one device the leaves are raveled and concatenated into one sum of squares, which XLA
    fuses with the concatenation: a GPU runs it as one or two kernels, where a sum per leaf is
    one or two kernels per leaf (the runner's LRA Text step at L = 1k compiled for an H200:
    610 -> 520 kernels). On a mesh of several devices (``jax.set_mesh``), or with several
    devices and no mesh set, it sums leaf by leaf: concatenating sharded leaves would gather
    them. The two differ only in the order of the additions.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
    leaves = [jnp.abs(x).astype(dtype) for x in leaves]
    if _on_several_devices():
        return jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves])
    return jnp.sqrt(jnp.sum(flat * flat))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (the same state, so the same checkpoints, and the same
    scaling) with the norm of :func:`global_norm`."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        within = norm < max_norm
        return jax.tree.map(
            lambda t: jax.lax.select(within, t, (t / norm.astype(t.dtype)) * max_norm), updates
        ), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(config: Any, params: Any) -> tuple[optax.GradientTransformation, Schedule]:
    """The optax transformation for ``config.optimizer`` / ``config.schedule``, and the schedule.

    Gradient clipping by global norm comes first when ``optimizer.grad_clip_norm > 0``. A float16
    run (``config.dtype``) wraps it all in :func:`~hgrn_jax.training.loss_scale.
    dynamic_loss_scale`, which unscales the gradient before the clipping. Gradient
    accumulation (``optimizer.accumulate_steps``) is done by the train step itself, which splits
    each global batch into micro-batches, so the optimizer always sees one update per step.
    Bad values (a learning rate <= 0, a negative weight decay, ...) raise ValueError naming the
    key (:func:`check_optimizer_config`).
    """
    check_optimizer_config(config)
    opt = dict(config.optimizer)
    name = opt.get("name", "adamw")
    lr = float(opt["learning_rate"])
    schedule = make_schedule(config.schedule, lr)
    b1, b2, eps = (
        float(opt.get("b1", 0.9)),
        float(opt.get("b2", 0.999)),
        float(opt.get("eps", 1e-8)),
    )
    weight_decay = float(opt.get("weight_decay", 0.0))
    mask = weight_decay_mask(params, opt.get("weight_decay_mask", "all"))
    if name == "adamw":
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "adam":
        tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    elif name == "lamb":
        tx = optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay, mask),
            optax.sgd(schedule, momentum=float(opt.get("momentum", 0.9)) or None),
        )
    else:
        raise ValueError(f"unknown optimizer.name {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    clip = float(opt.get("grad_clip_norm", 0.0))
    if clip > 0:
        tx = optax.chain(clip_by_global_norm(clip), tx)
    if getattr(config, "dtype", "float32") == "float16":
        tx = dynamic_loss_scale(tx)
    return tx, schedule

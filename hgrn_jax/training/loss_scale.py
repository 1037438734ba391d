"""Dynamic loss scaling, for training with float16 activations.

A float16 gradient underflows: a mean over N tokens gives each position a cotangent of about
1/N, below float16's smallest normal number (6.1e-5) from N = 16k on, and bits are lost long
before it flushes to 0 (the tiny LM at 64k tokens a batch: a bias gradient 73% off float32's,
the others 7%; bfloat16, with float32's range, 1%). The train step therefore differentiates
``loss * scale`` and :func:`dynamic_loss_scale` divides the gradient by ``scale`` in float32
before the optimizer sees it. ``scale`` starts at :data:`INITIAL_SCALE`. A step whose scaled
gradient overflowed (a NaN or inf anywhere) is skipped: parameters and optimizer state stay as
they were and the scale halves. After :data:`GROWTH_PERIOD` finite steps in a row it doubles.
PyTorch's ``GradScaler`` does the same (2^16, 2000 steps).

The scale lives in the optimizer state (:class:`LossScaleState`, the outermost state), so it is
checkpointed and restored with it. A skipped step leaves the inner optimizer's moments and
Adam's bias-correction count as they were but advances its learning-rate schedules' counts, so
the rate of every applied update is the schedule at the run's step (the ``lr`` the runner
logs), as with PyTorch, whose scheduler steps every iteration while ``GradScaler`` skips only
the optimizer's step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

INITIAL_SCALE = 2.0**15
"""The first step's scale: float16's largest finite value is 65504, so a loss of order 1
scaled by 2^15 leaves headroom before the first overflow."""

GROWTH_PERIOD = 2000
"""Finite steps in a row after which the scale doubles."""


class LossScaleState(NamedTuple):
    """``scale``: float32 scalar, the factor of the next step's loss; ``good_steps``: int32
    scalar, finite steps since the scale last changed; ``inner``: the wrapped optimizer's
    state."""

    scale: jax.Array
    good_steps: jax.Array
    inner: Any


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    initial_scale: float = INITIAL_SCALE,
    growth_period: int = GROWTH_PERIOD,
) -> optax.GradientTransformation:
    """``inner`` fed with gradients of ``loss * scale`` (the scale of the state passed in).

    ``update(scaled_grads, state, params)`` divides the gradients by ``state.scale``. If they are
    all finite, it returns ``inner``'s updates of them and counts the step (doubling the scale
    after ``growth_period`` of them); otherwise zero updates, ``inner``'s state unchanged but
    for its schedules' step counts (:func:`skipped_step_state`), and the scale halved (not
    below 1).
    """
    if initial_scale < 1 or growth_period < 1:
        raise ValueError(
            f"initial_scale={initial_scale} and growth_period={growth_period} must be >= 1"
        )

    def init(params: Any) -> LossScaleState:
        return LossScaleState(*initial_state(initial_scale), inner.init(params))

    def update(scaled_grads: Any, state: LossScaleState, params: Any = None):
        grads = unscale(scaled_grads, state.scale)
        finite = all_finite(grads)
        updates, inner_state = inner.update(grads, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner_state = skipped_step_state(finite, inner_state, state.inner)
        grow = finite & (state.good_steps + 1 >= growth_period)
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * 2, state.scale),
            jnp.maximum(state.scale / 2, 1.0),
        )
        good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0).astype(jnp.int32)
        return updates, LossScaleState(scale, good_steps, inner_state)

    return optax.GradientTransformation(init, update)


def _is_schedule_state(node: Any) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def skipped_step_state(finite: jax.Array, new: Any, old: Any) -> Any:
    """The inner optimizer state after a step: ``new`` where ``finite`` (a bool scalar), else
    ``old`` except in ``optax.ScaleByScheduleState`` nodes (the learning-rate schedule's step
    count), which take ``new`` either way so that the schedule keeps the run's step."""

    def select(new_node, old_node):
        if _is_schedule_state(new_node):
            return new_node
        return jnp.where(finite, new_node, old_node)

    return jax.tree.map(select, new, old, is_leaf=_is_schedule_state)


class LossScaleStartWarning(UserWarning):
    """A float16 run resumed from a checkpoint without loss-scale state; the scale starts
    again at :data:`INITIAL_SCALE`."""


class LossScaleDroppedWarning(UserWarning):
    """A run in another dtype resumed from a float16 run's checkpoint without its loss
    scale."""


def initial_state(initial_scale: float = INITIAL_SCALE) -> tuple[jax.Array, jax.Array]:
    """``(scale, good_steps)`` before the first step."""
    return jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32)


def unscale(scaled_grads: Any, scale: jax.Array) -> Any:
    """Each leaf divided by ``scale``, in at least float32, back in the leaf's dtype."""

    def divide(g):
        wide = jnp.promote_types(g.dtype, jnp.float32)
        return (g.astype(wide) / scale.astype(wide)).astype(g.dtype)

    return jax.tree.map(divide, scaled_grads)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite (a bool scalar; True for no leaves)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

"""Dynamic loss scaling for float16 training: the transformation, and the train step with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hgrn_jax.training.loss_scale import INITIAL_SCALE, LossScaleState, dynamic_loss_scale
from hgrn_jax.training.state import initial_train_state, split_model
from hgrn_jax.training.steps import make_train_step

PARAMS = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
GRADS = {"w": jnp.array([0.25, 0.5, -1.0]), "b": jnp.array(2.0)}


def _scaled(grads, scale):
    return jax.tree.map(lambda g: g * scale, grads)


def test_a_finite_step_is_the_inner_optimizer_s_on_the_unscaled_gradient():
    inner = optax.adam(0.1)
    tx = dynamic_loss_scale(inner, initial_scale=64.0, growth_period=3)
    state = tx.init(PARAMS)
    updates, state = tx.update(_scaled(GRADS, 64.0), state, PARAMS)
    expected, inner_state = inner.update(GRADS, inner.init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)  # dividing by a power of two is exact
    for a, b in zip(jax.tree.leaves(state.inner), jax.tree.leaves(inner_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (float(state.scale), int(state.good_steps)) == (64.0, 1)
    for _ in range(2):  # the third finite step in a row doubles the scale
        _, state = tx.update(_scaled(GRADS, state.scale), state, PARAMS)
    assert (float(state.scale), int(state.good_steps)) == (128.0, 0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_an_overflowed_step_is_skipped_and_halves_the_scale_down_to_1(bad):
    tx = dynamic_loss_scale(optax.adam(0.1), initial_scale=4.0)
    state = tx.init(PARAMS)
    _, state = tx.update(_scaled(GRADS, 4.0), state, PARAMS)  # one finite step: count 1
    before = state.inner
    grads = {"w": jnp.array([1.0, bad, 1.0]), "b": jnp.array(1.0)}
    for expected_scale in (2.0, 1.0, 1.0):
        updates, state = tx.update(grads, state, PARAMS)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        for a, b in zip(jax.tree.leaves(state.inner), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)  # Adam's moments and count as they were
        assert (float(state.scale), int(state.good_steps)) == (expected_scale, 0)


def test_a_skipped_step_advances_the_schedule_but_not_adam():
    """PyTorch steps its scheduler every iteration and GradScaler skips only the optimizer's
    step: the learning rate of an update is the schedule at the run's step, while Adam's moments
    and bias-correction count see only the applied steps."""
    schedule = lambda count: 0.1 * (count + 1.0)
    tx = dynamic_loss_scale(optax.adam(schedule), initial_scale=8.0)
    state = tx.init(PARAMS)
    overflow = {"w": jnp.array([1.0, np.inf, 1.0]), "b": jnp.array(1.0)}
    _, state = tx.update(_scaled(GRADS, state.scale), state, PARAMS)  # step 0: applied
    for _ in range(2):  # steps 1 and 2: skipped
        _, state = tx.update(overflow, state, PARAMS)
    updates, state = tx.update(_scaled(GRADS, state.scale), state, PARAMS)  # step 3

    adam = optax.scale_by_adam()
    inner_state = adam.init(PARAMS)
    for _ in range(2):  # Adam's direction after its two applied steps
        direction, inner_state = adam.update(GRADS, inner_state, PARAMS)
    expected = jax.tree.map(lambda d: -schedule(3) * d, direction)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # float32 arithmetic in another order
    adam_state, schedule_state = state.inner
    assert int(adam_state.count) == 2
    assert int(schedule_state.count) == 4


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="initial_scale=0.5 and growth_period=10 must be >= 1"):
        dynamic_loss_scale(optax.sgd(1.0), initial_scale=0.5, growth_period=10)


class _Float16Dense(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 2, dtype=jnp.float16, rngs=nnx.Rngs(0))


def _step_and_state(tx, *, weight: float = 1e-3, positions: int = 1 << 16):
    """One train step of a float16 dense layer whose loss, mean(dense(x) * c) over ``positions``
    rows with c ~ ``weight``, gives each row a cotangent of ``weight / positions``: 1.5e-8 at the
    defaults, below float16's smallest subnormal step (6e-8), so it flushes to zero unless scaled.
    Returns the step, the state and the float64 gradient of the kernel."""
    model = _Float16Dense()
    model.dense.kernel[...] = jnp.zeros((4, 2))  # so that SGD(1)'s new kernel is -gradient, exactly
    graphdef, params, model_state = split_model(model)
    x = jax.random.normal(jax.random.key(1), (positions, 4), jnp.float32)
    c = weight * jax.random.uniform(jax.random.key(2), (positions, 2), jnp.float32, 0.5, 1.5)

    def loss_fn(model, batch, train):
        del train
        y = model.dense(batch["x"]).astype(jnp.float32)
        loss = jnp.sum(y * batch["c"]) / positions
        return loss, {"loss_sum": loss, "weight": jnp.ones(())}

    step = jax.jit(make_train_step(graphdef, tx, loss_fn, lambda s: 1.0))
    with np.errstate(invalid="ignore"):  # weight inf
        truth = np.asarray(x, np.float64).T @ np.asarray(c, np.float64) / positions
    return step, initial_train_state(params, model_state, tx), {"x": x, "c": c}, truth


def _kernel_change(state, new_state) -> np.ndarray:
    old, new = state.params["dense"]["kernel"][...], new_state.params["dense"]["kernel"][...]
    return np.asarray(old, np.float64) - np.asarray(new, np.float64)  # SGD(1): the gradient


def test_loss_scaling_keeps_a_float16_gradient_that_underflows_without_it():
    """Without scaling the float16 backward flushes every row's cotangent to 0 and the kernel's
    gradient is 0; scaled by 2^15, the rows' cotangents are 5e-4, normal float16 numbers, and the
    gradient is float16-accurate (each cotangent rounded to 11 bits: 2^-11 = 4.9e-4 relative)."""
    step, state, batch, truth = _step_and_state(optax.sgd(1.0))
    new_state, metrics = step(state, batch)
    assert "loss_scale" not in metrics
    assert np.max(np.abs(_kernel_change(state, new_state))) < 1e-3 * np.max(np.abs(truth))

    step, state, batch, truth = _step_and_state(dynamic_loss_scale(optax.sgd(1.0)))
    new_state, metrics = step(state, batch)
    assert float(metrics["loss_scale"]) == INITIAL_SCALE
    change = _kernel_change(state, new_state)
    assert np.max(np.abs(change - truth)) < 2e-3 * np.max(np.abs(truth))
    assert int(new_state.nonfinite_step) == -1


def test_an_overflow_skips_the_step_until_the_scale_fits_and_is_not_a_nonfinite_step():
    """A weight of 4 gives cotangents of 4 * 2^15 / 2^10 = 128 per row at the first scale;
    the kernel gradient's sums over 1024 rows overflow float16 (65504) until the scale has
    dropped to 2^10 or so. The skipped steps leave the parameters as they were, do not count as
    non-finite, and halve the scale; the first step that fits updates."""
    step, state, batch, truth = _step_and_state(
        dynamic_loss_scale(optax.sgd(1.0)), weight=4.0, positions=1 << 10
    )
    scales, first = [], state
    while True:
        new_state, metrics = step(state, batch)
        scales.append(float(metrics["loss_scale"]))
        assert int(new_state.nonfinite_step) == -1
        if np.any(_kernel_change(first, new_state) != 0):
            break
        assert float(new_state.opt_state.scale) == scales[-1] / 2
        state = new_state
        assert len(scales) < 16, scales
    assert scales[0] == INITIAL_SCALE and len(scales) > 1, scales
    change = _kernel_change(first, new_state)
    assert np.max(np.abs(change - truth)) < 2e-3 * np.max(np.abs(truth))


def test_a_nonfinite_gradient_at_scale_1_is_a_nonfinite_step():
    step, state, batch, _ = _step_and_state(
        dynamic_loss_scale(optax.sgd(1.0), initial_scale=1.0), weight=np.inf, positions=8
    )
    new_state, _ = step(state, batch)
    assert int(new_state.nonfinite_step) == 0
    assert isinstance(new_state.opt_state, LossScaleState)

"""Jitted train and eval steps over :class:`~hgrn_jax.training.state.TrainState`.

The loss function is the task's: ``loss_fn(model, batch, train=...) -> (mean_loss, sums)`` with
``sums`` holding per-batch metric sums (``loss_sum``, ``weight`` and, for classifiers,
``correct``). Batches are dicts of global arrays sharded along axis 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from hgrn_jax import sharding
from hgrn_jax.tasks.protocol import a_type_name
from hgrn_jax.training.loss_scale import LossScaleState, unscale
from hgrn_jax.training.optim import global_norm
from hgrn_jax.training.state import TrainState, merge_model, split_model

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

SUMS = ("loss_sum", "weight")
"""The sums every ``loss_fn`` returns (an ``"accuracy"`` task's also ``correct``)."""


def check_loss_output(output: Any, sums_keys: tuple[str, ...] = SUMS) -> tuple[Any, Any]:
    """``loss_fn``'s ``(loss, sums)`` after checking, at trace time, that the loss is a float
    scalar and ``sums`` a dict of scalars holding ``sums_keys``; otherwise a one-line
    ValueError saying what came back and what the Task protocol asks for."""
    keys = ", ".join(repr(k) for k in sums_keys)
    fix = (
        f"; return (mean loss: a float scalar, sums: a dict of scalars with {keys}), as the "
        "Task protocol of hgrn_jax/tasks/protocol.py says"
    )

    def what(value: Any) -> str:
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            return f"an array of shape {tuple(value.shape)} and dtype {value.dtype}"
        return a_type_name(value)

    if not isinstance(output, (tuple, list)) or len(output) != 2:
        size = f" of {len(output)}" if isinstance(output, (tuple, list)) else ""
        raise ValueError(f"the task's loss_fn returned {what(output)}{size}{fix}")
    loss, sums = output
    if jnp.ndim(loss) != 0 or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(f"the task's loss_fn returned as its loss {what(loss)}{fix}")
    if not isinstance(sums, Mapping):
        raise ValueError(f"the task's loss_fn returned as its sums {what(sums)}{fix}")
    missing = [k for k in sums_keys if k not in sums]
    if missing:
        raise ValueError(
            f"the task's loss_fn returned sums without {', '.join(map(repr, missing))}{fix}"
        )
    for key, value in sums.items():
        if jnp.ndim(value) != 0:
            raise ValueError(f"the task's loss_fn returned as sums[{key!r}] {what(value)}{fix}")
    return loss, sums


def _micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """(B, ...) arrays -> (k, B/k, ...); micro-batch j takes rows j, j+k, ... so that every
    device keeps its own rows (the batch axis is sharded in contiguous blocks)."""

    def split(x):
        if x.shape[0] % k:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into "
                f"optimizer.accumulate_steps={k} micro-batches; make batch_size a "
                f"multiple of {k}"
            )
        return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def _select(pred: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
        return new  # RNG stream keys never change during training (only their counters do)
    return jnp.where(pred, new, old)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    schedule: Callable,
    *,
    accumulate_steps: int = 1,
    sums_keys: tuple[str, ...] = SUMS,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` (not yet jitted; see :func:`jit_train_step`).

    With ``accumulate_steps = k > 1`` the batch is split into k micro-batches (``lax.scan``:
    activations of one micro-batch live at a time) whose losses and gradients make one update:
    micro-batch j's mean loss (``loss_sum_j / max(w_j, 1)`` by the Task protocol, with ``w_j``
    its ``sums["weight"]``) and gradient are scaled back by ``max(w_j, 1)``, summed in float32
    and divided by ``max(sum_j w_j, 1)``, so the loss, gradient and update are the whole batch's
    up to float rounding whatever the rows' weights (a micro-batch of weight 0 adds nothing; a
    batch of weight 0 has loss and gradient 0). Only BatchNorm statistics differ: each
    micro-batch has its own.
    If the loss or the gradient norm is not finite, the state is left unchanged except for
    ``nonfinite_step``, which records the first such step; the loop stops on it.
    With ``tx`` wrapped in :func:`~hgrn_jax.training.loss_scale.dynamic_loss_scale` (float16
    runs), the gradient is that of ``loss * scale``; a gradient that overflows while the scale
    can still drop is the wrapper's skipped step, not a non-finite one, and the metrics carry
    ``loss_scale``. ``loss`` and ``grad_norm`` are unscaled.
    ``loss_fn``'s output is checked when the step is traced (:func:`check_loss_output`).
    """

    def loss_and_state(params, model_state, batch, scale):
        # Fresh Variables at this trace level: BatchNorm and RNG counters are updated in place.
        params, model_state = jax.tree.map(lambda x: x, (params, model_state))
        model = merge_model(graphdef, params, model_state)
        model.train()
        loss, sums = check_loss_output(loss_fn(model, batch, train=True), sums_keys)
        _, _, new_model_state = split_model(model)
        scaled = loss if scale is None else loss.astype(jnp.float32) * scale
        return scaled, (loss, sums, new_model_state)

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        scaling = isinstance(state.opt_state, LossScaleState)
        scale = state.opt_state.scale if scaling else None
        if accumulate_steps == 1:
            (_, (loss, sums, model_state)), grads = grad_fn(
                state.params, state.model_state, batch, scale
            )
        else:

            def body(carry, micro):
                grad_sum, loss_sum, model_state, sum_acc = carry
                (_, (loss, sums, model_state)), grads = grad_fn(
                    state.params, model_state, micro, scale
                )
                # The mean is loss_sum / max(weight, 1): scaled back, it adds up over micro-batches.
                weight = jnp.maximum(sums["weight"].astype(jnp.float32), 1.0)
                grad_sum = jax.tree.map(lambda s, g: s + weight * g, grad_sum, grads)
                sum_acc = jax.tree.map(jnp.add, sum_acc, sums)
                loss_sum = loss_sum + weight * loss.astype(jnp.float32)
                return (grad_sum, loss_sum, model_state, sum_acc), None

            micro = _micro_batches(batch, accumulate_steps)
            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(grad_fn, state.params, state.model_state, first, scale)
            sums_shape = sums_shape[0][1][1]
            zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
            init = (
                jax.tree.map(
                    lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                    state.params,
                ),
                jnp.zeros((), jnp.float32),
                state.model_state,
                zeros(sums_shape),
            )
            (grad_sum, loss_sum, model_state, sums), _ = jax.lax.scan(body, init, micro)
            total = jnp.maximum(sums["weight"].astype(jnp.float32), 1.0)
            grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grad_sum, state.params)
            loss = loss_sum / total

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = global_norm(grads if scale is None else unscale(grads, scale))
        finite_grads = jnp.isfinite(grad_norm)
        if scaling:  # an overflow while the scale can still drop: dynamic_loss_scale skips it
            finite_grads = finite_grads | (scale > 1)
        finite = jnp.isfinite(loss) & finite_grads
        healthy = finite & (state.nonfinite_step < 0)
        updated = TrainState(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            nonfinite_step=state.nonfinite_step,
        )
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(lambda new, old: _select(healthy, new, old), updated, kept)
        new_state = new_state.replace(
            nonfinite_step=jnp.where(
                (state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step
            )
        )
        metrics = dict(sums, loss=loss, grad_norm=grad_norm, lr=schedule(state.step))
        if scaling:
            metrics["loss_scale"] = scale
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, loss_fn: LossFn, sums_keys: tuple[str, ...] = SUMS
) -> Callable[[Any, Any, dict], dict[str, jax.Array]]:
    """``eval_step(params, model_state, batch) -> sums`` in evaluation mode (no dropout,
    BatchNorm running statistics); ``loss_fn``'s output is checked as in training."""

    def eval_step(params, model_state, batch):
        model = merge_model(graphdef, params, model_state)
        model.eval()
        _, sums = check_loss_output(loss_fn(model, batch, train=False), sums_keys)
        return sums

    return eval_step


def jit_train_step(train_step: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """``train_step`` jitted with explicit shardings; the state argument is donated."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(eval_step: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """``eval_step`` jitted with the params/model-state shardings of ``state_shardings``."""
    return jax.jit(
        eval_step,
        in_shardings=(
            state_shardings.params,
            state_shardings.model_state,
            sharding.batch_sharding(mesh),
        ),
        out_shardings=sharding.replicated(mesh),
    )

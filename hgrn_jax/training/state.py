"""The train state as pure pytrees (for ``jax.jit`` with explicit shardings and donation).

A model is split once into its static ``graphdef`` and three pytrees of variables: ``params``
(``nnx.Param``), ``model_state`` (everything else: BatchNorm statistics, dropout RNG streams) and
the optimizer state. :class:`TrainState` holds them with the step counter and the first step
whose loss or gradients were not finite (-1 while training is healthy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from hgrn_jax import sharding


@struct.dataclass
class TrainState:
    """Everything that changes during training.

    step: int32 scalar, optimizer updates applied so far (= index of the next training batch).
    params: ``nnx.State`` of the model's ``nnx.Param`` variables.
    model_state: ``nnx.State`` of the model's other variables (BatchNorm stats, RNG streams).
    opt_state: the optax state for ``params``.
    nonfinite_step: int32 scalar, the first step whose loss or gradient norm was NaN/inf, or -1.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    nonfinite_step: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, model_state)`` of a module."""
    return nnx.split(model, nnx.Param, ...)


def merge_model(graphdef: nnx.GraphDef, params: Any, model_state: Any) -> nnx.Module:
    """The module rebuilt from :func:`split_model`'s parts."""
    return nnx.merge(graphdef, params, model_state)


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (concrete or abstract)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params)))


def initial_train_state(
    params: Any, model_state: Any, tx: optax.GradientTransformation
) -> TrainState:
    """The state before the first step: step 0, ``tx``'s initial state, no non-finite step."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def model_class_name(graphdef: nnx.GraphDef) -> str | None:
    """``module.QualifiedName`` of the model class whose ``graphdef`` this is (results.json's
    ``model_class``: the report sets only the package's models beside the papers' rows), or
    None where Flax's GraphDef no longer says it the same way (a run must not fail over it)."""
    nodes = getattr(graphdef, "nodes", None)
    cls = getattr(nodes[0], "type", None) if nodes else None
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else None


def create_train_state(
    build_model: Callable[[nnx.Rngs], nnx.Module],
    make_tx: Callable[[Any], optax.GradientTransformation],
    seed: int,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, optax.GradientTransformation, TrainState, Any]:
    """Build the train state directly in its shards on ``mesh``.

    ``build_model(rngs)`` makes the model; ``make_tx(abstract_params)`` the optimizer (it may
    read parameter paths and shapes, e.g. for weight-decay masks). The state is created in its
    shards by :func:`hgrn_jax.sharding.init_sharded`, so no device ever holds more than its
    shards.

    Returns ``(graphdef, tx, state, state_shardings)``.
    """

    def build() -> nnx.Module:
        return build_model(nnx.Rngs(seed))

    # Not nnx.eval_shape: under a set mesh it reads the logical axis names as mesh axes.
    graphdef, abstract_params, _ = jax.eval_shape(lambda: split_model(build()))
    tx = make_tx(abstract_params)

    def init() -> TrainState:
        _, params, model_state = split_model(build())
        return initial_train_state(params, model_state, tx)

    state, shardings = sharding.init_sharded(init, mesh)
    return graphdef, tx, state, shardings


# ----------------------------------------------------------------------------------------------
# Checkpoint form: typed PRNG keys become their raw uint32 data (Orbax stores plain arrays).
# ----------------------------------------------------------------------------------------------


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` (an array or ShapeDtypeStruct) holds typed PRNG keys."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def to_checkpoint_tree(state: TrainState) -> Any:
    """``state`` with every typed PRNG key array replaced by ``jax.random.key_data`` of it."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, state)


def abstract_checkpoint_tree(abstract_state: TrainState, shardings: Any) -> Any:
    """The restore target (ShapeDtypeStructs with shardings) matching :func:`to_checkpoint_tree`."""

    def target(x, s):
        if is_prng_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=s)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(target, abstract_state, shardings)


def from_checkpoint_tree(restored: Any, like: TrainState) -> TrainState:
    """Undo :func:`to_checkpoint_tree`, taking key implementations from ``like``."""

    def back(x, ref):
        if is_prng_key(ref):
            return jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref))
        return x

    return jax.tree.map(back, restored, like)


def release_buffers(state: TrainState) -> None:
    """Free the device memory of ``state``'s arrays, except its (tiny) PRNG keys, which stay
    usable as the key-type reference of :func:`from_checkpoint_tree`."""
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not is_prng_key(leaf) and not leaf.is_deleted():
            leaf.delete()

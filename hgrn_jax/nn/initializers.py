"""Parameter initialisers that match the reference PyTorch code, and dense layers with logical axes.

Every parameter carries logical axis names (``embed``, ``rnn``, ``mlp``, ``vocab``, ``layers``,
``classes``); :mod:`hgrn_jax.sharding` maps them to mesh axes with one table of rules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.linear import Linear

# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nnx.Initializer:
    """PyTorch's nn.Linear bias default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def phase_init(features: int) -> nnx.Initializer:
    """HGRU's phase: theta_j = 10000^(-2j/d), j = 0..d-1 (as the reference initialises it)."""

    def init(key, shape, dtype=jnp.float32):
        del key
        theta = 10000.0 ** (-2.0 * jnp.arange(features, dtype=jnp.float32) / features)
        return jnp.broadcast_to(theta, shape).astype(dtype)

    return init


def logical(init: nnx.Initializer, axes: tuple[str | None, ...]) -> nnx.Initializer:
    """Attach logical axis names to an initialiser; the mesh placement is decided by the caller.

    Eager sharding stays off so that modules build identically with or without a mesh;
    :mod:`hgrn_jax.sharding` turns the names into shardings under ``jax.jit``.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def axes_metadata(axes: tuple[str | None, ...]) -> dict:
    """Metadata for Flax layers that take ``*_metadata`` arguments (norms)."""
    return {"out_sharding": axes, "eager_sharding": False}


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
) -> Linear:
    """A :class:`~hgrn_jax.nn.linear.Linear` (its bias added in float32) with PyTorch-default
    initialisation and logical axis names ``axes``.

    The kernel is (in_features, out_features) with names ``axes``; the bias (out_features,) is
    named after the output axis.
    """
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=logical(torch_linear_kernel_init, axes),
        bias_init=logical(torch_linear_bias_init(in_features), (axes[1],)),
        rngs=rngs,
    )

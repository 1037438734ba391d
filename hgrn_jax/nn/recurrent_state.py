"""The dtypes of a mixer's recurrent state and gates, shared by its full pass and ``step``.

A state is carried between :meth:`step` calls (a ``lax.scan`` carry, a decoding cache), so it
keeps one dtype: the layer's accumulation dtype (float32, complex64 for the complex HGRU;
float64 / complex128 for a float64 layer), which ``init_state`` gives, or a wider one the caller
chose. Inputs wider than the layer (float64 activations under ``jax_enable_x64``) are computed
in their own dtype, and the state they leave is stored back in the carried dtype.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from hgrn_jax.ops.common import accumulation_dtype


def gate_dtype(x_dtype: jnp.dtype, dtype: jnp.dtype | None, param_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype gates and recurrence inputs are computed in: the accumulation dtype of what
    the projections compute in (Flax's rule: ``dtype``, or the inputs and parameters promoted),
    so that a float64 layer fed float32 activations is not rounded to float32 first."""
    return accumulation_dtype(jnp.result_type(x_dtype, dtype or param_dtype))


def compute_dtype(x_dtype: jnp.dtype, dtype: jnp.dtype | None, param_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a layer's projections and norms compute in (Flax's rule: ``dtype``, or the
    inputs and parameters promoted); a recurrence's output is cast to it, not to the inputs'
    dtype, so that a float32 layer fed bfloat16 activations does not round its states'
    readout to bfloat16 before the norm."""
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(x_dtype, param_dtype)


def layer_state_dtype(
    dtype: jnp.dtype | None, param_dtype: jnp.dtype, complex_valued: bool = False
) -> jnp.dtype:
    """The dtype of ``init_state``: the accumulation dtype of the layer's compute dtype."""
    state = accumulation_dtype(dtype or param_dtype)
    return jnp.promote_types(state, jnp.complex64) if complex_valued else state


def zero_state(shape: tuple[int, ...], dtype: jnp.dtype, layer: str) -> jax.Array:
    """Zeros of ``shape`` (batch first) and ``dtype``; ValueError naming ``batch_size`` unless
    the batch is a whole number >= 0 (-1, 2.5 or None gave JAX shape errors naming nothing)."""
    batch = shape[0]
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0:
        raise ValueError(
            f"{layer}.init_state: batch_size must be a whole number >= 0; got {batch!r}"
        )
    return jnp.zeros((int(batch), *shape[1:]), dtype)


def carried(last: jax.Array, state: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The state ``last`` after a ``step`` from ``state``, in ``state``'s dtype when that is the
    layer's state ``dtype`` or wider: a step's state is the same type as the one it was given,
    as a ``lax.scan`` carry must be."""
    return last.astype(jnp.promote_types(dtype, state.dtype))

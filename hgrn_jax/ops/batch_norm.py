"""Batch normalisation in training mode, with the closed-form gradient.

Statistics are taken over every axis but the last, optionally only where a mask is true. They
are two-pass: the mean, then the mean of squared deviations, in at least float32. The forward
is Flax's ``nnx.BatchNorm`` (``use_fast_variance=False``) operation for operation, so its
outputs and statistics are bitwise the same.

The gradient is the closed form, the one PyTorch's batch-norm backward uses. With
``inv = rsqrt(var + eps)``, ``xhat = (x - mean) * inv``, and ``n`` positions counted by the mask
``m`` (1 everywhere without one):

    dbias  = S1 = sum(dy)              dscale = S2 = sum(dy * xhat)
    dx     = scale * inv * dy
             - m * (scale * inv * (S1 + xhat * S2) - dmean - 2 dvar (x - mean)) / n

``S1`` and ``S2`` run over every position, padding included: every output depends on the
statistics. ``dmean`` and ``dvar`` are the cotangents of the returned statistics. They are zero
when the statistics only feed running averages, as in a BatchNorm layer.

Autodiff of the two-pass statistics needs more passes over ``x`` and ``dy``, each a column
reduction that a GPU runs as two kernels. Compiled for an H200, the LRA classifier's training
step launches 29 fewer kernels with this gradient at L = 1k, 40 fewer at 4k
(``benchmarks/README.md``). The gradient rounds differently from autodiff's. Both are within
float32 rounding of the float64 gradient (``tests/test_batch_norm.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _reduction_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _forward(x, scale, bias, mask, epsilon, out_dtype):
    axes = _reduction_axes(x)
    stats_x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = stats_x.mean(axes, where=mask)
    var = lax.square(stats_x - mean).mean(axes, where=mask)
    inv = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv * scale) + bias
    return (y.astype(out_dtype), mean, var), (x, mask, mean, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm(x, scale, bias, mask, epsilon, out_dtype):
    return _forward(x, scale, bias, mask, epsilon, out_dtype)[0]


def _backward(epsilon, out_dtype, residuals, cotangents):
    del epsilon, out_dtype
    x, mask, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    axes = _reduction_axes(x)
    acc = mean.dtype
    centred = x.astype(acc) - mean
    xhat = centred * inv
    dy = dy.astype(acc)
    s1 = dy.sum(axes)
    s2 = (dy * xhat).sum(axes)
    gain = scale.astype(acc) * inv
    through_stats = gain * (s1 + xhat * s2) - dmean - 2 * dvar * centred
    if mask is None:
        count = x.size // x.shape[-1]
        dx = gain * dy - through_stats / count
    else:
        count = jnp.sum(mask, axes, dtype=acc)
        dx = gain * dy - jnp.where(mask, through_stats / count, 0)
    return dx.astype(x.dtype), s2.astype(x.dtype), s1.astype(x.dtype), None


_batch_norm.defvjp(_forward, _backward)


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    epsilon: float,
    mask: jax.Array | None = None,
    out_dtype: jnp.dtype | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalise ``x`` (..., d) by its batch statistics over every axis but the last.

    ``scale`` and ``bias`` are (d,); the three are promoted to one dtype, ``y``'s by default
    (``out_dtype``). ``mask`` is a bool array of ``x``'s shape, true where a position counts
    towards the statistics (None: all of them). Returns ``(y, mean, var)``: ``y`` (..., d), and the
    batch mean and (biased) variance (d,) in at least float32.
    """
    if x.shape[-1:] != scale.shape or scale.shape != bias.shape:
        raise ValueError(
            f"scale and bias must be ({x.shape[-1]},) for x of shape {x.shape}; got "
            f"{scale.shape} and {bias.shape}"
        )
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask must have x's shape {x.shape}; got {mask.shape}")
    if jnp.iscomplexobj(x):
        raise ValueError("batch_norm_train takes real inputs; got a complex x")
    dtype = jnp.result_type(x, scale, bias)
    x, scale, bias = (jnp.asarray(v, dtype) for v in (x, scale, bias))
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    mask = None if mask is None else mask.astype(bool)
    return _batch_norm(x, scale, bias, mask, epsilon, out_dtype)

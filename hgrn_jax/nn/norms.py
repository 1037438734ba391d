"""Normalisation layers used by the HGRN models, built from one name."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes

from hgrn_jax.nn.initializers import axes_metadata
from hgrn_jax.ops.batch_norm import batch_norm_train

NormKind = Literal["layer", "rms", "batch", "sync_batch", "scale_free_rms"]

# BatchNorm's training gradient in closed form (hgrn_jax.ops.batch_norm); False: autodiff's, as
# nnx.BatchNorm computes it (a switch for benchmarks/train_throughput.py's before/after rows).
CLOSED_FORM_BATCH_NORM_GRADIENT = True


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with the closed-form gradient in training mode.

    The variables, the outputs and the running statistics are ``nnx.BatchNorm``'s bit for bit.
    Only the gradient is computed differently (:func:`hgrn_jax.ops.batch_norm.batch_norm_train`):
    fewer passes over the activations. It applies to real inputs normalised over every axis but
    the last, two-pass statistics, a scale and a bias, without ``axis_name``. Other uses, and
    evaluation with the running statistics, are ``nnx.BatchNorm``'s own code.
    """

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (..., d) -> (..., d); ``mask`` (bool, ``x``'s shape): positions counted by the
        batch statistics."""
        running = self.use_running_average if use_running_average is None else use_running_average
        if running or not self._closed_form_applies(x):
            return super().__call__(x, use_running_average, mask=mask)
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype
        )
        y, mean, var = batch_norm_train(
            x,
            scale,
            bias,
            epsilon=self.epsilon,
            mask=None if mask is None else jnp.broadcast_to(mask, x.shape),
            out_dtype=flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype),
        )
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y

    def _closed_form_applies(self, x: jax.Array) -> bool:
        return (
            CLOSED_FORM_BATCH_NORM_GRADIENT
            and self.axis in (-1, x.ndim - 1)
            and self.axis_name is None
            and not self.use_fast_variance
            and self.scale is not None
            and self.bias is not None
            and not jnp.iscomplexobj(x)
        )


class ScaleFreeRMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps)`` with no parameters (the ImageNet model's final norm)."""

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return y.astype(x.dtype)


def make_norm(
    kind: NormKind,
    features: int,
    *,
    epsilon: float = 1e-5,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    axis_name: str | None = None,
    axis: str = "embed",
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A norm over the last axis of (..., features) activations, whose parameters carry the
    logical axis name ``axis`` (``"embed"`` between blocks, ``"rnn"`` inside a token mixer).

    ``"batch"`` and ``"sync_batch"`` are BatchNorm over every axis but the last. Under ``jax.jit``
    over a global (sharded) batch the statistics are global already, so ``"sync_batch"`` differs
    from ``"batch"`` only inside ``shard_map``/``pmap``, where ``axis_name`` names the replica axis.
    """
    meta = dict(scale_metadata=axes_metadata((axis,)), bias_metadata=axes_metadata((axis,)))
    common = dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(features, use_fast_variance=False, **common, **meta)
    if kind == "rms":
        return nnx.RMSNorm(features, scale_metadata=meta["scale_metadata"], **common)
    if kind in ("batch", "sync_batch"):
        return BatchNorm(
            features,
            momentum=0.9,
            use_fast_variance=False,
            axis_name=axis_name if kind == "sync_batch" else None,
            **common,
            **meta,
        )
    if kind == "scale_free_rms":
        return ScaleFreeRMSNorm(epsilon)
    raise ValueError(
        f"unknown norm {kind!r}; choose layer, rms, batch, sync_batch or scale_free_rms"
    )


def apply_norm(norm: nnx.Module, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``norm(x)`` on (B, ..., d); BatchNorm's batch statistics count only positions where
    ``mask`` (B, ...) is true, so padding does not shift them."""
    if mask is not None and isinstance(norm, nnx.BatchNorm):
        return norm(x, mask=jnp.broadcast_to(mask.astype(bool)[..., None], x.shape))
    return norm(x)


def inference_norm(norm: nnx.Module, x: jax.Array) -> jax.Array:
    """``norm(x)`` with BatchNorm's running statistics, in either mode: statistics of one
    streamed step's batch are not those of the whole sequence, and would move the running ones."""
    if isinstance(norm, nnx.BatchNorm):
        return norm(x, use_running_average=True)
    return norm(x)

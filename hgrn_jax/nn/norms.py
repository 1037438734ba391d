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

    ``groups`` > 1 normalises each of ``groups`` equal slices of the batch (axis 0) by its own
    statistics in training, as an unsynchronised BatchNorm does on each of ``groups`` data-
    parallel devices (PyTorch's ``nn.BatchNorm`` under DDP); the running statistics follow
    the first slice's, as DDP's default ``broadcast_buffers`` makes every device's rank 0's.
    """

    def __init__(self, num_features: int, *, groups: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"BatchNorm(groups={groups!r}): groups must be an integer >= 1")
        if groups > 1 and self.axis_name is not None:
            raise ValueError(
                f"BatchNorm(groups={groups}) normalises slices of the batch; a synchronised "
                f"one (axis_name={self.axis_name!r}) normalises all of it: choose one"
            )
        self.groups = groups

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
        grouped = self.groups > 1 and not running
        if grouped and not self._closed_form_applies(x, ignore_switch=True):
            raise ValueError(
                f"BatchNorm(groups={self.groups}) takes real inputs normalised over every axis "
                "but the last, with a scale and a bias"
            )
        if not grouped and (running or not self._closed_form_applies(x)):
            return super().__call__(x, use_running_average, mask=mask)
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype
        )
        out_dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
        if grouped:
            y, mean, var = self._grouped(x, scale, bias, mask, out_dtype)
        else:
            y, mean, var = batch_norm_train(
                x, scale, bias, epsilon=self.epsilon, mask=mask, out_dtype=out_dtype
            )
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
        return y

    def _grouped(self, x, scale, bias, mask, out_dtype):
        """``x`` (B, ..., d) normalised per slice of B / groups rows: ``y`` (B, ..., d) and the
        first slice's mean and variance (d,)."""
        groups, rows = self.groups, x.shape[0]
        if rows % groups:
            raise ValueError(
                f"BatchNorm(groups={groups}) normalises {groups} equal slices of the batch; "
                f"got {rows} rows: make the batch (per micro-batch with gradient accumulation) "
                f"a multiple of {groups}"
            )

        def split(t: jax.Array) -> jax.Array:
            return t.reshape(groups, rows // groups, *t.shape[1:])

        def one(x_slice, mask_slice):
            return batch_norm_train(
                x_slice, scale, bias, epsilon=self.epsilon, mask=mask_slice, out_dtype=out_dtype
            )

        if mask is None:
            y, mean, var = jax.vmap(lambda x_slice: one(x_slice, None))(split(x))
        else:
            y, mean, var = jax.vmap(one)(split(x), split(mask))
        return y.reshape(x.shape), mean[0], var[0]

    def _closed_form_applies(self, x: jax.Array, ignore_switch: bool = False) -> bool:
        return (
            (CLOSED_FORM_BATCH_NORM_GRADIENT or ignore_switch)
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
    batch_norm_groups: int = 1,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A norm over the last axis of (..., features) activations, whose parameters carry the
    logical axis name ``axis`` (``"embed"`` between blocks, ``"rnn"`` inside a token mixer).

    ``"batch"`` and ``"sync_batch"`` are BatchNorm over every axis but the last. Under ``jax.jit``
    over a global (sharded) batch the statistics are global already, so ``"sync_batch"`` differs
    from ``"batch"`` only inside ``shard_map``/``pmap``, where ``axis_name`` names the replica axis.
    ``batch_norm_groups`` > 1 (``"batch"`` only): :class:`BatchNorm`'s ``groups``.
    """
    if batch_norm_groups != 1 and kind != "batch":
        raise ValueError(
            f"batch_norm_groups={batch_norm_groups} is for norm='batch' (statistics per slice of "
            f"the batch); norm={kind!r} has no batch groups: set batch_norm_groups=1"
        )
    meta = dict(scale_metadata=axes_metadata((axis,)), bias_metadata=axes_metadata((axis,)))
    common = dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(features, use_fast_variance=False, **common, **meta)
    if kind == "rms":
        return nnx.RMSNorm(features, scale_metadata=meta["scale_metadata"], **common)
    if kind in ("batch", "sync_batch"):
        return BatchNorm(
            features,
            groups=batch_norm_groups,
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

"""Normalisation layers used by the HGRN models, built from one name."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.nnx.nn import normalization as flax_normalization

from hgrn_jax.nn.initializers import axes_metadata
from hgrn_jax.ops.batch_norm import batch_norm_train

NormKind = Literal["layer", "rms", "batch", "sync_batch", "scale_free_rms"]

# BatchNorm's training gradient in closed form (hgrn_jax.ops.batch_norm); False: autodiff's, as
# nnx.BatchNorm computes it (a switch for benchmarks/train_throughput.py's before/after rows).
CLOSED_FORM_BATCH_NORM_GRADIENT = True


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with PyTorch's running variance and the closed-form gradient in training.

    What differs from ``nnx.BatchNorm``:

    * The running variance is PyTorch's: in training, ``var <- momentum * var + (1 - momentum)
      * v * n / (n - 1)``, with ``v`` the batch's (biased) variance and ``n`` the positions it
      counts per feature (the mask's true ones where there is a mask; under ``axis_name``, summed
      over the replicas, as PyTorch's ``SyncBatchNorm`` counts). ``nnx.BatchNorm`` keeps ``v``.
      Where ``n`` <= 1 the biased ``v`` is kept (0 for one position; PyTorch raises for one
      value per channel, but a mask's count is known only inside the trace).
      ``unbiased_running_variance=False`` keeps Flax's convention. The running mean, the
      variables (names, shapes, dtypes: a checkpoint of either convention restores) and, in
      evaluation, the outputs from given running statistics are ``nnx.BatchNorm``'s.
    * The gradient in training is computed in closed form
      (:func:`hgrn_jax.ops.batch_norm.batch_norm_train`): fewer passes over the activations. It
      applies to real inputs normalised over every axis but the last, two-pass statistics, a
      scale and a bias, without ``axis_name``. Other uses (and every use with
      ``CLOSED_FORM_BATCH_NORM_GRADIENT`` off) take ``nnx.BatchNorm``'s statistics and
      normalisation code, so their outputs and gradients are its own bit for bit; the closed
      form's outputs are too, and its gradient is within float32 rounding of autodiff's.

    ``groups`` > 1 normalises each of ``groups`` equal slices of the batch (axis 0) by its own
    statistics in training, as an unsynchronised BatchNorm does on each of ``groups`` data-
    parallel devices (PyTorch's ``nn.BatchNorm`` under DDP); the running statistics follow
    the first slice's (its own count ``n``), as DDP's default ``broadcast_buffers`` makes every
    device's rank 0's.
    """

    def __init__(
        self,
        num_features: int,
        *,
        groups: int = 1,
        unbiased_running_variance: bool = True,
        **kwargs,
    ):
        super().__init__(num_features, **kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"BatchNorm(groups={groups!r}): groups must be an integer >= 1")
        if groups > 1 and self.axis_name is not None:
            raise ValueError(
                f"BatchNorm(groups={groups}) normalises slices of the batch; a synchronised "
                f"one (axis_name={self.axis_name!r}) normalises all of it: choose one"
            )
        if not isinstance(unbiased_running_variance, bool):
            raise ValueError(
                f"BatchNorm(unbiased_running_variance={unbiased_running_variance!r}): "
                "give True (PyTorch's running variance) or False (Flax's biased one)"
            )
        self.groups = groups
        self.unbiased_running_variance = unbiased_running_variance

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | None = None,
        *,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (..., d) -> (..., d); ``mask`` (bool, broadcastable to ``x``): positions counted
        by the batch statistics."""
        running = self.use_running_average if use_running_average is None else use_running_average
        if running:
            return super().__call__(x, use_running_average, mask=mask)
        grouped = self.groups > 1
        if grouped and not self._closed_form_applies(x, ignore_switch=True):
            raise ValueError(
                f"BatchNorm(groups={self.groups}) takes real inputs normalised over every axis "
                "but the last, with a scale and a bias"
            )
        if not grouped and not self._closed_form_applies(x):
            return self._nnx_training_call(x, mask)
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype
        )
        out_dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        mask = None if mask is None else jnp.broadcast_to(mask, x.shape)
        if grouped:
            y, mean, var, count = self._grouped(x, scale, bias, mask, out_dtype)
        else:
            y, mean, var = batch_norm_train(
                x, scale, bias, epsilon=self.epsilon, mask=mask, out_dtype=out_dtype
            )
            count = _count(x, tuple(range(x.ndim - 1)), mask, var.dtype)
        self._update_running_statistics(mean, var, count)
        return y

    def _nnx_training_call(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``nnx.BatchNorm.__call__`` in training, with its own statistics and normalisation
        (outputs and gradients its own bit for bit), but this class's running update."""
        feature_axes = flax_normalization._canonicalize_axes(x.ndim, self.axis)
        reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
        )
        mean, var = flax_normalization._compute_stats(
            x,
            reduction_axes,
            dtype=self.dtype,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            mask=mask,
        )
        count = _count(x, reduction_axes, mask, var.dtype)
        if self.axis_name is not None:
            count = jax.lax.psum(
                jnp.asarray(count, var.dtype),
                self.axis_name,
                axis_index_groups=self.axis_index_groups,
            )
        self._update_running_statistics(mean, var, count)
        return flax_normalization._normalize(
            x, mean, var, scale, bias, reduction_axes, feature_axes, self.dtype, self.epsilon
        )

    def _update_running_statistics(
        self, mean: jax.Array, var: jax.Array, count: jax.Array | int
    ) -> None:
        """Move the running statistics towards the batch's ``mean`` and biased ``var`` (d,),
        taken over ``count`` positions per feature (an int, or an array of ``var``'s shape)."""
        if self.unbiased_running_variance:
            if isinstance(count, int):
                var = var * (count / (count - 1)) if count > 1 else var
            else:
                var = jnp.where(count > 1, var * count / jnp.maximum(count - 1, 1), var)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var

    def _grouped(self, x, scale, bias, mask, out_dtype):
        """``x`` (B, ..., d) normalised per slice of B / groups rows: ``y`` (B, ..., d), and the
        first slice's mean and variance (d,) and its count of positions (an int, or (d,))."""
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
        first_mask = None if mask is None else split(mask)[0]
        count = _count(split(x)[0], tuple(range(x.ndim - 1)), first_mask, var.dtype)
        return y.reshape(x.shape), mean[0], var[0], count

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


def _count(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, dtype: jnp.dtype
) -> jax.Array | int:
    """The positions of ``x`` that statistics over ``axes`` count: an int without ``mask``, else
    the mask's true ones (``dtype``, the shape of ``x`` less ``axes``), summed as ``jnp.mean``
    sums them (so XLA computes the sum once for both)."""
    if mask is None:
        return math.prod(x.shape[a] for a in axes)
    return jnp.sum(jnp.broadcast_to(mask, x.shape), axes, dtype=dtype)


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

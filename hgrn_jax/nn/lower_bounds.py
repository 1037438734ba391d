"""Per-layer forget-gate lower bounds from one (num_layers, d) parameter (docs/design.md 3.2)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.initializers import logical
from hgrn_jax.ops.common import broadcasts_to

Scheme = Literal["lra", "lm"]


def lower_bounds(param: jax.Array, scheme: Scheme = "lra") -> jax.Array:
    """Bounds gamma (num_layers, d) from the model's parameter Gamma (num_layers, d).

    With P = softmax(Gamma) over layers (axis 0), separately per channel:

    - ``"lra"`` (the LRA and ImageNet code): gamma_k = sum_{i<k} P_i, an exclusive cumulative sum;
      gamma_0 = 0 and the last row of P is unused.
    - ``"lm"`` (the fairseq WikiText-103 LM and fla): gamma_k = sum_{i<=k} P_i - P_0; gamma_0 = 0
      and row 0 of P is the unused slack.

    Both increase with depth, so upper layers keep longer memories.
    """
    p = jax.nn.softmax(param, axis=0)
    if scheme == "lra":
        return jnp.cumsum(p, axis=0) - p
    if scheme == "lm":
        return jnp.cumsum(p, axis=0) - p[:1]
    raise ValueError(f"unknown lower-bound scheme {scheme!r}; use 'lra' or 'lm'")


def check_lower_bound(lower_bound: jax.Array | float | None, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``lower_bound`` (None: no bound) broadcasts to the forget gate's
    ``shape`` (..., d): a scalar or (d,), as the models pass it; a bound given as a Python or
    NumPy number (not a JAX array, whose values are not read here) must lie in [0, 1]: above 1
    the decays exceed 1 and the states grow without limit, below 0 they change sign."""
    if lower_bound is None:
        return
    got = tuple(jnp.shape(lower_bound))
    if not broadcasts_to(got, shape):
        # layer(x, mask) puts a (B, L) padding mask where the bound goes.
        hint = (
            " (a padding mask goes as mask=..., after the bound)"
            if len(shape) > 1 and got == tuple(shape[:-1])
            else ""
        )
        raise ValueError(
            f"lower_bound of shape {got} does not broadcast to the forget gate's shape "
            f"{tuple(shape)}; pass a scalar or one bound per channel, ({shape[-1]},){hint}"
        )
    if isinstance(lower_bound, (int, float, np.number, np.ndarray)):
        values = np.asarray(lower_bound, np.float64)
        if values.size and not (values.min() >= 0.0 and values.max() <= 1.0):
            got = (
                f"{values.item():g}"
                if values.size == 1
                else f"values from {values.min():g} to {values.max():g}"
            )
            raise ValueError(
                f"lower_bound must lie in [0, 1] (the least decay a forget gate may give); "
                f"got {got}"
            )


def apply_lower_bound(forget: jax.Array, lower_bound: jax.Array | float | None) -> jax.Array:
    """The bounded decay ``lam = gamma + (1 - gamma) * forget`` (..., d) of a forget gate
    ``forget`` in (0, 1), with ``gamma`` the layer's bound (a scalar or (d,); None: 0) taken in
    ``forget``'s dtype (the official HGRN and HGRN2 layers). A bound that does not broadcast to
    ``forget`` is a ValueError (:func:`check_lower_bound`)."""
    check_lower_bound(lower_bound, forget.shape)
    gamma = jnp.asarray(0.0 if lower_bound is None else lower_bound, forget.dtype)
    return gamma + (1.0 - gamma) * forget


def bounded_decay_and_log(
    logits: jax.Array, lower_bound: jax.Array | float | None
) -> tuple[jax.Array, jax.Array]:
    """``lam = gamma + (1 - gamma) * sigmoid(logits)`` (..., d) as :func:`apply_lower_bound`
    computes it (the official HGRN2 layer), and ``log lam``, finite with finite gradients for
    every ``logits`` and every ``gamma`` in [0, 1].

    ``log lam`` is ``log(lam)`` (the reference's value and gradients) wherever ``lam`` is a
    normal number. Since ``lam >= gamma``, ``lam`` underflows (float32: ``logits`` below about
    -87) only for ``gamma`` below the smallest normal number, which the arithmetic flushes to 0
    (no bound, or the first layer of a schedule); there ``lam = sigmoid(logits)`` and its log
    is ``log_sigmoid(logits)``. The gradient reaching ``gamma`` through ``log lam`` there, 1 /
    ``lam``, is beyond the dtype's range and is dropped (the decay ``exp(log lam)`` is 0 either
    way); the gradient through ``lam`` itself (the key ``1 - lam``) is kept.
    """
    lam = apply_lower_bound(jax.nn.sigmoid(logits), lower_bound)
    normal = lam >= jnp.finfo(lam.dtype).tiny
    log_lam = jnp.log(jnp.where(normal, lam, 1.0))
    return lam, jnp.where(normal, log_lam, jax.nn.log_sigmoid(logits))


def apply_log_lower_bound(
    log_forget: jax.Array, lower_bound: jax.Array | float | None
) -> jax.Array:
    """``log lam`` for ``lam = gamma + (1 - gamma) * exp(log_forget)``, computed in log space as
    ``logaddexp(log gamma, log1p(-gamma) + log_forget)`` (fla's HGRN and HGRN2 layers); None:
    no bound, ``log_forget`` itself.

    Like fla, ``log gamma`` and ``log1p(-gamma)`` are evaluated in the bound's own dtype (float32
    in its LMs) and then promoted to ``log_forget``'s: that keeps the last bits.

    At ``gamma`` 0 and 1, where one of those logs is -inf, the values are fla's (``log_forget``
    and 0) but come from forms whose gradients are finite: ``log_forget + log1p(gamma *
    expm1(-log_forget))`` and ``log1p((gamma - 1) * -expm1(log_forget))`` (fla's form gives a
    nan gradient with respect to ``gamma`` there, and to ``log_forget`` at 1).
    """
    if lower_bound is None:
        return log_forget
    check_lower_bound(lower_bound, log_forget.shape)
    gamma = jnp.asarray(lower_bound)
    acc = log_forget.dtype
    at_zero, at_one = gamma == 0, gamma == 1
    inner = jnp.where(at_zero | at_one, 0.5, gamma)
    value = jnp.logaddexp(jnp.log(inner).astype(acc), jnp.log1p(-inner).astype(acc) + log_forget)
    zero = jnp.where(at_zero, gamma, 0.0).astype(acc)
    # exp(-log_forget) overflows below this; the gradient there, ~1/forget, overflows anyway.
    far = jnp.maximum(log_forget, math.log(jnp.finfo(acc).tiny))
    from_zero = log_forget + jnp.log1p(zero * jnp.expm1(-far))
    one = jnp.where(at_one, gamma, 1.0).astype(acc)
    from_one = jnp.log1p((one - 1.0) * -jnp.expm1(log_forget))
    return jnp.where(at_zero, from_zero, jnp.where(at_one, from_one, value))


class LowerBounds(nnx.Module):
    """The model-level parameter Gamma (num_layers, d), initialised to ones as in the reference.

    Calling it returns the per-layer bounds (num_layers, d), or zeros when ``enabled=False`` (the
    paper's ablation without lower bounds; the parameter is then not created).
    ``dtype`` is the dtype the bounds are computed in (fla computes them in float32 even in a
    float64 model).
    """

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        scheme: Scheme = "lra",
        enabled: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.num_layers, self.features = num_layers, features
        self.scheme, self.enabled, self.dtype = scheme, enabled, dtype
        if enabled:
            init = logical(nnx.initializers.ones, ("layers", "rnn"))
            self.param = nnx.Param(init(None, (num_layers, features), param_dtype))

    def __call__(self) -> jax.Array:
        if not self.enabled:
            return jnp.zeros((self.num_layers, self.features), self.dtype or jnp.float32)
        param = self.param[...]
        if self.dtype is not None:
            param = param.astype(self.dtype)
        return lower_bounds(param, self.scheme)

"""The matrix-state gated recurrence behind HGRN2 (a gated linear attention).

Each head carries a ``K x V`` state. With ``g_t = log(lambda_t) <= 0`` the log forget gate of the
key channels, per head::

    S_t = diag(exp(g_t)) @ S_{t-1} + outer(k_t, v_t)        S: (K, V), S_{-1} = h0 (zeros)
    o_t = scale * q_t @ S_t                                 o: (V,)

Arrays are ``(..., L, H, K)`` for ``q``, ``k`` and ``log_decay``, ``(..., L, H, V)`` for ``v``:
any leading (batch) axes, then time, heads and the head width. States are ``(..., H, K, V)``
(key index first; fla's cache stores the transpose ``(..., H, V, K)``). Whatever the input
precision, states accumulate in float32 or wider; outputs come back in the inputs' dtype unless
``out_dtype`` says otherwise.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

MatrixMethod = Literal["auto", "sequential"]
MATRIX_METHODS: tuple[str, ...] = ("sequential",)


def default_matrix_method(length: int, platform: str | None = None) -> str:
    """The method ``method="auto"`` picks for :func:`matrix_recurrence`."""
    del length, platform
    return "sequential"


def _check_shapes(q, k, v, log_decay, h0) -> tuple[int, ...]:
    if q.ndim < 3:
        raise ValueError(f"q must be (..., length, heads, key_dim); got shape {q.shape}")
    if k.shape != q.shape or log_decay.shape != q.shape:
        raise ValueError(
            f"q, k and log_decay must share one shape (..., length, heads, key_dim); got "
            f"q {q.shape}, k {k.shape}, log_decay {log_decay.shape}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must be (..., length, heads, value_dim) with q's leading axes {q.shape[:-1]}; "
            f"got {v.shape}")
    state_shape = q.shape[:-3] + q.shape[-2:] + v.shape[-1:]
    if h0 is not None and h0.shape != state_shape:
        raise ValueError(f"h0 must have shape {state_shape} (..., heads, key_dim, value_dim); "
                         f"got {h0.shape}")
    return state_shape


def _sequential(q, k, v, log_decay, h0, scale):
    """Time-major scan: ``q, k, g`` (L, B, H, K), ``v`` (L, B, H, V), ``h0`` (B, H, K, V)."""

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)

    last, o = jax.lax.scan(step, h0, (q, k, v, log_decay))
    return o, last


def matrix_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    h0: jax.Array | None = None,
    *,
    scale: float = 1.0,
    method: MatrixMethod = "auto",
    return_last_state: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Outputs of the HGRN2 recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``.

    Args:
      q: queries ``(..., L, H, K)`` (HGRN2's output gate).
      k: keys ``(..., L, H, K)`` (HGRN2's ``1 - lambda``).
      v: values ``(..., L, H, V)`` (HGRN2's input).
      log_decay: log forget gates ``(..., L, H, K)``, ``<= 0``.
      h0: initial state ``(..., H, K, V)``; zeros when omitted.
      scale: the constant ``c`` in ``o_t = c * q_t S_t`` (1 for hgru2-pytorch, ``1/sqrt(K)`` for fla).
      method: ``"sequential"`` (a scan over time) or ``"auto"``.
      return_last_state: also return the state after the last step, ``(..., H, K, V)``.
      out_dtype: dtype of ``o``; the promoted input dtype by default.

    Returns:
      ``o`` of shape ``(..., L, H, V)``, and the last state (float32 or wider) when
      ``return_last_state``.
    """
    q, k, v, log_decay = (jnp.asarray(t) for t in (q, k, v, log_decay))
    state_shape = _check_shapes(q, k, v, log_decay, h0)
    dtype = jnp.result_type(q, k, v, log_decay)
    out_dtype = out_dtype or dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    if method == "auto":
        method = default_matrix_method(q.shape[-3])
    if method not in MATRIX_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('auto',) + MATRIX_METHODS}")

    batch_shape = q.shape[:-3]
    length = q.shape[-3]

    def time_major(t):
        t = t.astype(acc).reshape((-1,) + t.shape[-3:])
        return jnp.moveaxis(t, 1, 0)

    h0 = (jnp.zeros(state_shape, acc) if h0 is None else jnp.asarray(h0).astype(acc))
    h0 = h0.reshape((-1,) + h0.shape[-3:])
    o, last = _sequential(*(time_major(t) for t in (q, k, v, log_decay)), h0, scale)
    o = jnp.moveaxis(o, 0, 1).reshape(batch_shape + (length,) + v.shape[-2:]).astype(out_dtype)
    last = last.reshape(state_shape)
    return (o, last) if return_last_state else o

"""Maths shared by every implementation of ``h_t = a_t * h_{t-1} + x_t``.

The accumulation dtype, the checks of the ``(a, x, h0)`` arguments, and the chaining of carries
across consecutive pieces of the time axis (chunks of one scan, or shards of a sharded one).
Imports nothing else of ``hgrn_jax``, so every recurrence module can import it.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Parts = tuple[jax.Array, ...]  # a real value (1-tuple) or a complex one as (real, imag)


# True inside a compiled copy's own call: under ``jax.disable_jit()`` (and in the rerun that
# ``jax_debug_nans`` makes of a call that gave a NaN) its inputs are concrete again, and the
# copy would call itself without end.
_IN_COMPILED_COPY = contextvars.ContextVar("hgrn_jax_in_compiled_copy", default=False)


def outside_transforms(*args: Any) -> bool:
    """Whether the call runs eagerly, outside ``jax.jit``, ``jax.grad``, ``jax.vmap`` and the
    like (no leaf of ``args`` is a tracer), and not already inside a :func:`compiled_copy`.

    The recurrences then run through a compiled copy of themselves: called op by op, their
    time loops were traced and compiled anew at every call (about 50 ms on CPU, even for one
    token), which made an eager ``step()`` loop or a notebook slow."""
    if _IN_COMPILED_COPY.get():
        return False
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


def compiled_copy(function: Callable[..., Any], static_argnames: Sequence[str]) -> Callable:
    """``jax.jit(function)`` whose calls :func:`outside_transforms` sees as inside it, even
    where they run op by op (``jax.disable_jit()``, ``jax_debug_nans``'s rerun)."""

    @functools.wraps(function)
    def marked(*args: Any, **kwargs: Any) -> Any:
        token = _IN_COMPILED_COPY.set(True)
        try:
            return function(*args, **kwargs)
        finally:
            _IN_COMPILED_COPY.reset(token)

    return jax.jit(marked, static_argnames=tuple(static_argnames))


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype states are accumulated in: float32 (complex64 for complex inputs) or the
    input dtype when wider (float64, complex128)."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.promote_types(dtype, jnp.complex64)
    return jnp.promote_types(dtype, jnp.float32)


def check_inputs(a, x, h0=None, axis: int = -2) -> tuple[jax.Array, jax.Array, jnp.dtype]:
    """``a`` and ``x`` as arrays and the promoted dtype of ``(a, x, h0)``.

    Raises a one-line ``ValueError`` naming the problem when ``x`` is not
    ``(..., length, channels)``, ``axis`` (the time axis) is not one of its axes, the time axis
    has length 0 (the recurrence needs at least one step: every method rejects an empty
    sequence rather than return an empty result), ``a`` does not broadcast to ``x``'s shape
    (``a`` may be smaller, never larger), or ``h0`` is not ``x``'s shape without the time axis.
    Shape checks only: free at trace time.
    """
    a, x = jnp.asarray(a), jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be (..., length, channels); got shape {x.shape}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    if x.shape[axis] == 0:
        raise ValueError(
            f"x has length 0 along the time axis {axis} (shape {x.shape}); the recurrence "
            "needs at least one step: skip the call for an empty sequence"
        )
    if not broadcasts_to(a.shape, x.shape):
        raise ValueError(
            f"a of shape {a.shape} does not broadcast to x's shape {x.shape}; pass decays "
            f"shaped like x or broadcastable to it (e.g. (channels,) = {x.shape[-1:]})"
        )
    shape = state_shape(x, axis)
    if h0 is not None and jnp.shape(h0) != shape:
        raise ValueError(f"h0 must have shape {shape}; got {jnp.shape(h0)}")
    dtype = jnp.result_type(a, x) if h0 is None else jnp.result_type(a, x, h0)
    return a, x, dtype


def broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` (NumPy rules, without growing
    ``target``)."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


def resolve_out_dtype(dtype: jnp.dtype, out_dtype: jnp.dtype | None) -> jnp.dtype:
    """``out_dtype``, or the promoted input ``dtype`` when None (float32 for integer or bool
    inputs, whose states are not whole numbers).

    Raises ``ValueError`` for a real ``out_dtype`` with complex inputs: casting the states
    would drop their imaginary parts (silently, by ``astype``); likewise for an integer or bool
    ``out_dtype``, which would truncate them.
    """
    if out_dtype is None and not jnp.issubdtype(dtype, jnp.inexact):
        dtype = accumulation_dtype(dtype)
    out = jnp.dtype(dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out, jnp.inexact):
        raise ValueError(
            f"out_dtype={out} would truncate the states to whole numbers; pass a floating or "
            "complex out_dtype (e.g. float32) or None"
        )
    if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(out, jnp.complexfloating):
        raise ValueError(
            f"out_dtype={out} would drop the imaginary part of the {jnp.dtype(dtype)} states; "
            "pass a complex out_dtype (e.g. complex64) or None, and take jnp.real(...) "
            "yourself if that is what you want"
        )
    return out


def check_chunk_size(chunk_size: Any) -> None:
    """ValueError unless ``chunk_size`` is a whole number >= 1 (``True``, ``2.5`` or ``"64"``
    gave TypeErrors from inside the scans, or ran as 1)."""
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a whole number >= 1; got {chunk_size!r}")


def matrix_inputs_dtype(dtype: jnp.dtype, h0: jax.Array | None) -> jnp.dtype:
    """The dtype a matrix recurrence computes in: its inputs' ``dtype``, promoted with ``h0``'s
    where the initial state is complex or wider than their accumulation dtype (a state is never
    cast down)."""
    inputs_acc = accumulation_dtype(dtype)
    if h0 is not None and jnp.promote_types(inputs_acc, h0.dtype) != inputs_acc:
        return jnp.result_type(dtype, h0)
    return dtype


def last_state_dtype(dtype: jnp.dtype, out_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype of a returned last state: the accumulation dtype of the inputs' ``dtype``, or
    ``out_dtype`` where that is wider (a bfloat16 chain's state stays float32, so that decoding
    continues it without a rounding at every call)."""
    return jnp.promote_types(accumulation_dtype(dtype), out_dtype)


def state_shape(x: jax.Array, axis: int = -2) -> tuple[int, ...]:
    """The shape of one state of ``x``: its shape without the time ``axis`` (``(..., C)`` for
    ``x`` ``(..., L, C)``)."""
    axis %= x.ndim
    return x.shape[:axis] + x.shape[axis + 1 :]


def chain_carries(
    decays: jax.Array, finals: jax.Array, h0: jax.Array, *, reverse: bool, axis: int = 0
) -> tuple[jax.Array, jax.Array]:
    """The state entering each of ``n`` consecutive pieces of a recurrence, and the state after
    all of them.

    Over one piece the recurrence is the affine map ``h -> D_k * h + S_k``, with ``D_k`` the
    product of the piece's decays and ``S_k`` its final state from a zero start. This is the
    exclusive scan of those maps from ``h0``, by ``lax.associative_scan`` (log-depth: no loop of
    ``n`` steps, which on a GPU would be ``n`` launches).

    Args:
      decays, finals: ``D_k`` and ``S_k`` stacked along ``axis`` in time order (``n`` pieces).
      h0: the state entering the first piece walked (the last one when ``reverse``), shaped
        like one slice of ``decays`` along ``axis`` (size 1 or removed: both are accepted).
      reverse: walk the pieces from the last to the first.
      axis: the pieces' axis.

    Returns:
      ``(carry_in, last)``: ``carry_in`` shaped like ``decays``, ``last`` like ``h0``.
    """
    axis = axis % decays.ndim
    init = h0 if h0.ndim == decays.ndim else jnp.expand_dims(h0, axis)

    def compose(first, then):
        return then[0] * first[0], then[0] * first[1] + then[1]

    decay, final = jax.lax.associative_scan(compose, (decays, finals), reverse=reverse, axis=axis)
    after = decay * init + final  # the state leaving each piece
    n = decays.shape[axis]
    if reverse:
        carry_in = jnp.concatenate([jax.lax.slice_in_dim(after, 1, n, axis=axis), init], axis)
        last = jax.lax.slice_in_dim(after, 0, 1, axis=axis)
    else:
        carry_in = jnp.concatenate([init, jax.lax.slice_in_dim(after, 0, n - 1, axis=axis)], axis)
        last = jax.lax.slice_in_dim(after, n - 1, n, axis=axis)
    return carry_in, last.reshape(h0.shape)


def shifted_backward(scan, a, h, h0, g, reverse: bool):
    """``(da, dx, dh0)`` of the recurrence, by ``scan(a, x, h0, reverse) -> h`` (any forward
    implementation) run in the opposite time direction over the decays shifted by one step::

        d_t  = g_t + a_{t+1} * d_{t+1}     (reverse time; a_{t-1} and forward time when reversed)
        dx_t = d_t,   da_t = d_t * h_{t-1} (h_{-1} = h0),   dh0 = a_0 * d_0

    ``a``, ``h``, ``g``: ``(..., L, C)``; ``h0``: ``(..., C)``.
    """
    zeros = jnp.zeros_like(a[..., :1, :])
    if not reverse:
        a_next = jnp.concatenate([a[..., 1:, :], zeros], axis=-2)
        d = scan(a_next, g, jnp.zeros_like(h0), True)
        h_prev = jnp.concatenate([h0[..., None, :], h[..., :-1, :]], axis=-2)
        dh0 = a[..., 0, :] * d[..., 0, :]
    else:
        a_prev = jnp.concatenate([zeros, a[..., :-1, :]], axis=-2)
        d = scan(a_prev, g, jnp.zeros_like(h0), False)
        h_prev = jnp.concatenate([h[..., 1:, :], h0[..., None, :]], axis=-2)
        dh0 = a[..., -1, :] * d[..., -1, :]
    return d * h_prev, d, dh0


def parts_mul(p: Parts, q: Parts) -> Parts:
    """Product of two real (1-tuple) or complex ((real, imag) pair) values, as kernels carry
    them."""
    if len(p) == 1:
        return (p[0] * q[0],)
    (pr, pi), (qr, qi) = p, q
    return pr * qr - pi * qi, pr * qi + pi * qr


def parts_add(p: Parts, q: Parts) -> Parts:
    return tuple(u + v for u, v in zip(p, q))


def chain_chunk_parts(
    last_parts: Sequence[jax.Array],
    decay_parts: Sequence[jax.Array],
    init_parts: Sequence[jax.Array],
    reverse: bool,
) -> list[jax.Array]:
    """The carry entering each chunk, ``(B, chunks, C)`` parts, from the chunks' summaries
    (their final carries from a zero start and their decay products, in time order) and the
    carry entering the first chunk walked (``init``, ``(B, 1, C)``): :func:`chain_carries` on
    values given as real parts (1 real, 2 complex)."""

    def value(parts):
        return jax.lax.complex(*parts) if len(parts) == 2 else parts[0]

    last, decay, init = (value(p) for p in (last_parts, decay_parts, init_parts))
    carry_in, _ = chain_carries(decay, last, init, reverse=reverse, axis=1)
    if len(init_parts) == 2:
        return [jnp.real(carry_in), jnp.imag(carry_in)]
    return [carry_in]

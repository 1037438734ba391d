"""The first-order linear recurrence ``h_t = a_t * h_{t-1} + x_t``.

Arrays are ``(..., length, channels)``: any number of leading (batch) axes, then time, then
channels. ``a`` and ``x`` may be real or complex. Whatever the input precision, states are
accumulated in float32 (complex64 for complex inputs) or wider, and returned in the dtype of
``x`` (promoted with ``a``) unless ``out_dtype`` says otherwise.

Every method has a custom VJP whose backward pass is itself a linear recurrence run in the
opposite time direction over the saved ``a`` and ``h`` (for ``"pallas"``, one fused kernel:
:mod:`hgrn_jax.ops.pallas_streaming`):

    d_t   = g_t + a_{t+1} * d_{t+1}        (the gradient flowing into h_t; reverse time)
    dx_t  = d_t
    da_t  = d_t * h_{t-1}                  (h_{-1} = h0)
    dh0   = a_0 * d_0

so differentiating costs two passes over O(B*L*D) memory and never stores the intermediate
levels of a parallel scan. JAX's cotangents are transposes, not adjoints, so no conjugates
appear for complex inputs.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from hgrn_jax.ops.common import (
    accumulation_dtype,
    chain_carries,
    check_chunk_size,
    check_inputs,
    compiled_copy,
    last_state_dtype,
    outside_transforms,
    resolve_out_dtype,
    shifted_backward,
)
from hgrn_jax.ops.pallas_recurrence import pallas_linear_recurrence

__all__ = ["METHODS", "Method", "default_method", "linear_recurrence", "shifted_backward"]

Method = Literal["auto", "sequential", "associative", "chunked", "pallas"]
METHODS: tuple[str, ...] = ("sequential", "associative", "chunked", "pallas")

_TIME_AXIS = -2
_DEFAULT_CHUNK = 64
# Loop steps per iteration of the sequential method. 1, because both loops update their input
# buffer in place (the states over ``x``, the gradients over the cotangent): with 2 or more steps
# per iteration XLA:CPU no longer proves the in-place update safe and copies the whole buffer at
# every iteration (measured: 16 MiB of temporaries and ~1000x the time at (8, 1024, 512)).
# tests/test_recurrence.py checks that a compiled forward+backward keeps no such copy. Against the
# previous loops (results in fresh buffers, unroll 2), benchmarks/train_throughput.py --variants
# "scan not in place" on a quiet machine: training steps as fast (0.95-1.26x over two runs) with
# 2-16 MiB less peak memory; benchmarks/scan.py: forward+backward 2.1-2.5x faster on donated inputs.
_SEQUENTIAL_UNROLL = 1
GPU_PALLAS_MIN_LENGTH = 2048


def default_method(length: int, platform: str | None = None) -> str:
    """The method ``method="auto"`` picks.

    CPU: ``"sequential"`` at every length. Measured by ``benchmarks/scan.py`` (B=8, D=512,
    float32 and complex64, L = 1024 to 16384, ``--methods sequential associative chunked``): the
    in-place time loop is the fastest method forward and forward+backward at every length,
    2-3x faster than ``"chunked"`` and ``"associative"``, and its gradient step needs the least
    temporary memory (one array). A CPU runs one step over all B*D channels at memory speed,
    so the parallel scans' extra passes over memory cost more than they save.

    GPU: ``"pallas"`` from ``GPU_PALLAS_MIN_LENGTH`` steps, ``"associative"`` below. Measured
    on an H100 by ``benchmarks/peers_gpu.py`` (``benchmarks/results/peers_gpu.json``): at
    L = 4k to 64k the Pallas kernel is the fastest forward+backward (float32 and bfloat16); at
    L = 1k, where the whole pass takes ~0.3 ms, XLA's single fused associative scan beats its
    three launches. ``"chunked"`` (a loop over chunks) and ``"sequential"`` (a loop over steps)
    are 5-100x slower there: each loop iteration is a kernel launch.

    TPU: ``"pallas"`` at every length: the kernel's tiled schedule (Mosaic), one pass over
    ``a`` and ``x`` per direction with the carry kept in on-chip memory across time blocks. Not
    timed on a TPU (none was available); reasoned from memory traffic and checked in Pallas's
    TPU interpret mode (``tests/test_pallas.py``: values and gradients against float64 loops,
    real and complex, ragged lengths). Its forward+backward moves ~11 array passes, ~3.7x the
    floor's 3 (forward 3; backward: the shifted decays 2, the reverse kernel 3,
    ``da = d * h_prev`` 3), against ~31x the floor's bytes for ``"associative"`` (XLA's cost
    analysis of the compiled forward+backward at (8, 4096, 512): log2(L) levels each way) and
    a loop iteration per step for ``"sequential"``. Should Mosaic reject the kernel on some TPU
    generation, pass
    ``method="associative"``.
    """
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "sequential"
    if platform == "tpu":
        return "pallas"
    if platform in ("gpu", "cuda", "rocm") and length >= GPU_PALLAS_MIN_LENGTH:
        return "pallas"
    return "associative"


def linear_recurrence(
    a: jax.Array,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    reverse: bool = False,
    method: Method = "auto",
    return_last_state: bool = False,
    chunk_size: int = _DEFAULT_CHUNK,
    out_dtype: jnp.dtype | None = None,
    axis: int = -2,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """All states of ``h_t = a_t * h_{t-1} + x_t`` along the time axis.

    Args:
      a: decays, ``(..., L, C)`` or anything that broadcasts to ``x``'s shape.
      x: inputs, ``(..., L, C)``, real or complex, ``L >= 1`` (an empty sequence is a
        ``ValueError``, as is a decay shape that does not broadcast to ``x``'s).
      h0: initial state ``(..., C)``; zeros when omitted. With ``reverse=True`` it is the state
        after the last step (``h_L``).
      reverse: run from ``t = L-1`` down to 0: ``h_t = a_t * h_{t+1} + x_t``.
      method: ``"sequential"`` (an in-place loop over time), ``"associative"`` (``lax.associative_scan``),
        ``"chunked"`` (parallel inside chunks of ``chunk_size``, carried across chunks),
        ``"pallas"`` (a one-pass Pallas kernel, :mod:`hgrn_jax.ops.pallas_recurrence`;
        interpreted on CPU) or ``"auto"`` (see :func:`default_method`).
      return_last_state: also return the final state ``(..., C)`` (``h_{L-1}``, or ``h_0`` when
        ``reverse``), for streaming, in the accumulation dtype (float32 for 16-bit inputs, or
        ``out_dtype`` if wider), as :func:`~hgrn_jax.ops.matrix_recurrence` returns its state:
        a state rounded to bfloat16 between chunks drifts from one long pass.
      chunk_size: chunk length of the chunked method.
      out_dtype: dtype of the result; the promoted input dtype by default. Complex inputs need
        a complex ``out_dtype`` (every method raises rather than drop the imaginary part).
      axis: the time axis; every other axis is independent channels (``h0`` and the final
        state are ``x``'s shape without it). ``"sequential"`` steps along it in place; the
        other methods move it next to the last axis and back (two copies per array).

    Returns:
      ``h`` with ``x``'s shape, and the final state when ``return_last_state``.
    """
    a, x, dtype = check_inputs(a, x, h0, axis)
    out_dtype = resolve_out_dtype(dtype, out_dtype)
    acc = accumulation_dtype(dtype)
    state_dtype = last_state_dtype(dtype, out_dtype)
    time_axis = axis % x.ndim
    if method == "auto":
        method = default_method(x.shape[time_axis])
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('auto',) + METHODS}")
    check_chunk_size(chunk_size)
    if outside_transforms(a, x, h0):  # checked above, so errors name the caller's arguments
        return _compiled_linear_recurrence(
            a,
            x,
            h0,
            reverse=reverse,
            method=method,
            return_last_state=return_last_state,
            chunk_size=chunk_size,
            out_dtype=out_dtype,
            axis=axis,
        )
    if method == "pallas" and x.size == 0:  # no rows or channels: no kernel grid to run
        method = "sequential"
    if time_axis != x.ndim - 2 and method != "sequential":
        moved = linear_recurrence(
            jnp.moveaxis(jnp.broadcast_to(a, x.shape), time_axis, -2),
            jnp.moveaxis(x, time_axis, -2),
            h0,
            reverse=reverse,
            method=method,
            return_last_state=return_last_state,
            chunk_size=chunk_size,
            out_dtype=out_dtype,
        )
        if return_last_state:
            return jnp.moveaxis(moved[0], -2, time_axis), moved[1]
        return jnp.moveaxis(moved, -2, time_axis)
    if method == "pallas":
        # The kernel reads a and x in their own dtype and accumulates in float32 inside.
        h0 = None if h0 is None else jnp.asarray(h0).astype(acc)
        if jax.default_backend() == "cpu":  # the Pallas interpreter is slow on 16-bit refs
            a, x = jnp.asarray(a).astype(acc), x.astype(acc)
        # The last state is read off h: written in float32 when it is asked for.
        kernel_dtype = state_dtype if return_last_state else out_dtype
        h = pallas_linear_recurrence(a, x, h0, reverse=reverse, out_dtype=kernel_dtype)
    else:
        # Converted up front, measured: on CPU a 16-bit state buffer is not updated in place
        # inside the sequential loop (quadratic time: 1.8 s instead of 14 ms at L=1k), and
        # per-step conversions of the inputs cost more than one pass (24 ms against 14 ms).
        a = jnp.broadcast_to(a, x.shape).astype(acc)
        x = x.astype(acc)
        # zeros_like keeps x's batch sharding (a replicated carry breaks lax.scan on an
        # Explicit mesh).
        h0 = jnp.zeros_like(_at(x, 0, time_axis)) if h0 is None else jnp.asarray(h0).astype(acc)
        # Negative, so that it names the same axis of every (..., L, C) array in the loops.
        h = _recurrence(a, x, h0, reverse, method, chunk_size, time_axis - x.ndim)
    out = h.astype(out_dtype)
    if return_last_state:
        last = _at(h, 0 if reverse else x.shape[time_axis] - 1, time_axis)
        return out, last.astype(state_dtype)
    return out


# An eager call's compiled copy (see common.outside_transforms); under it the inputs are tracers.
_compiled_linear_recurrence = compiled_copy(
    linear_recurrence,
    ("reverse", "method", "return_last_state", "chunk_size", "out_dtype", "axis"),
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _recurrence(a, x, h0, reverse, method, chunk_size, axis):
    return _scan(a, x, h0, reverse, method, chunk_size, axis)


def _recurrence_fwd(a, x, h0, reverse, method, chunk_size, axis):
    h = _scan(a, x, h0, reverse, method, chunk_size, axis)
    return h, (a, h, h0)


def _recurrence_bwd(reverse, method, chunk_size, axis, residuals, g):
    a, h, h0 = residuals
    g = jnp.asarray(g, h.dtype)  # jax.vjp passes NumPy cotangents through as they are
    if method == "sequential":
        return _sequential_backward(a, h, h0, g, reverse, axis)
    scan = functools.partial(_scan, method=method, chunk_size=chunk_size, axis=axis)
    return shifted_backward(scan, a, h, h0, g, reverse)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _scan(a, x, h0, reverse, method, chunk_size, axis=_TIME_AXIS):
    """``h`` by ``method`` along ``axis`` (only ``"sequential"`` takes another than -2)."""
    if method == "sequential":
        return _sequential(a, x, h0, reverse, axis)
    if method == "associative":
        return _associative(a, x, h0, reverse)
    return _chunked(a, x, h0, reverse, chunk_size)


def _time_index(i, length: int, reverse: bool):
    """The time step visited at loop iteration ``i``."""
    return length - 1 - i if reverse else i


def _at(array: jax.Array, t, axis: int = _TIME_AXIS) -> jax.Array:
    """``array[..., t, :]`` (index ``t`` of ``axis``) for a traced ``t``."""
    return jax.lax.dynamic_index_in_dim(array, t, axis=axis % array.ndim, keepdims=False)


def _put(array: jax.Array, value: jax.Array, t, axis: int = _TIME_AXIS) -> jax.Array:
    """``array.at[..., t, :].set(value)`` (index ``t`` of ``axis``), in place inside a loop."""
    return jax.lax.dynamic_update_index_in_dim(array, value, t, axis=axis % array.ndim)


def _sequential(a, x, h0, reverse, axis=_TIME_AXIS):
    """One step per loop iteration, each state written over its input in ``x``'s buffer.

    Step t reads ``x_t`` and writes ``h_t`` at the same place, so the loop needs no buffer of
    its own and no transposes: it reads ``a`` and ``x`` and writes ``h``, the memory floor. When
    ``x`` is still needed after the call, XLA copies it once before the loop. ``axis`` may be
    any axis: a step reads and writes one slice across it.
    """
    length = x.shape[axis]

    def body(i, carry):
        h, states = carry
        t = _time_index(i, length, reverse)
        h = _at(a, t, axis) * h + _at(states, t, axis)
        return h, _put(states, h, t, axis)

    _, states = jax.lax.fori_loop(0, length, body, (h0, x), unroll=_SEQUENTIAL_UNROLL)
    return states


def _sequential_backward(a, h, h0, g, reverse, axis=_TIME_AXIS):
    """The custom VJP's backward pass as one loop over reverse time, in place.

    Carries ``a_{t+1} d_{t+1}`` (``a_{t-1} d_{t-1}`` when ``reverse``) so that no shifted copies
    of ``a`` or ``h`` are made. Both results overwrite arrays that are dead after the loop:
    ``dx`` the cotangent ``g`` (step t reads ``g_t`` and writes ``dx_t = d_t`` at the same
    place), ``da`` the states ``h`` (step t reads ``h_{t-1}`` and writes ``da_t`` where ``h_t``
    was, which step t+1 has already read). So the loop reads ``a``, ``h`` and ``g`` and writes
    ``da`` and ``dx``, the floor. ``d_t`` is read back from the updated ``dx`` rather than
    reused: with ``d`` feeding both updates XLA copies ``dx`` at every iteration. Returns
    (da, dx, dh0).
    """
    length = h.shape[axis]

    def body(i, carry):
        flowing, da, dx = carry
        t = _time_index(i, length, not reverse)
        dx = _put(dx, _at(dx, t, axis) + flowing, t, axis)
        d = _at(dx, t, axis)
        prev = t + 1 if reverse else t - 1
        at_edge = prev == (length if reverse else -1)
        h_prev = jnp.where(at_edge, h0, _at(da, jnp.clip(prev, 0, length - 1), axis))
        return _at(a, t, axis) * d, _put(da, d * h_prev, t, axis), dx

    init = (jnp.zeros_like(h0), h, g)  # da is written over h, dx over g
    dh0, da, dx = jax.lax.fori_loop(0, length, body, init, unroll=_SEQUENTIAL_UNROLL)
    return da, dx, dh0


def _combine(left, right):
    """Compose two affine maps h -> a*h + x, ``left`` applied first."""
    a_l, x_l = left
    a_r, x_r = right
    return a_r * a_l, a_r * x_l + x_r


def _fold_initial_state(a, x, h0, reverse):
    """Add the initial state's contribution to the first step (last step when reversed)."""
    idx = -1 if reverse else 0
    first = a[..., idx, :] * h0 + x[..., idx, :]
    return x.at[..., idx, :].set(first)


def _associative(a, x, h0, reverse):
    x = _fold_initial_state(a, x, h0, reverse)
    _, h = jax.lax.associative_scan(_combine, (a, x), reverse=reverse, axis=x.ndim + _TIME_AXIS)
    return h


def _chunked(a, x, h0, reverse, chunk_size):
    length, channels = x.shape[-2:]
    chunk = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        # Identity steps (a = 1, x = 0) at the end carry h0 through unchanged when reversed and
        # are dropped afterwards in either direction.
        widths = [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)]
        a = jnp.pad(a, widths, constant_values=1)
        x = jnp.pad(x, widths)
    lead = x.shape[:-2]
    a_c = a.reshape(lead + (num_chunks, chunk, channels))
    x_c = x.reshape(lead + (num_chunks, chunk, channels))
    time_axis = a_c.ndim - 2
    # Within each chunk, with a zero carry in: cumulative decay and local states.
    decay, local = jax.lax.associative_scan(_combine, (a_c, x_c), reverse=reverse, axis=time_axis)
    edge = 0 if reverse else -1
    carry_in, _ = chain_carries(
        decay[..., edge, :], local[..., edge, :], h0, reverse=reverse, axis=-2
    )
    carry_in = carry_in[..., None, :]  # (..., num_chunks, 1, C)
    h = local + decay * carry_in
    return h.reshape(lead + (num_chunks * chunk, channels))[..., :length, :]

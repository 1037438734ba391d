"""A Pallas kernel for the linear recurrence ``h_t = a_t * h_{t-1} + x_t``.

One pass over the data: every element of ``a`` and ``x`` is read once and every state written
once, the time axis is walked sequentially inside the kernel while batch rows and channel tiles
run in parallel, and states are accumulated in float32 (float64 for float64 inputs) whatever the
input dtype. Complex recurrences are carried as (real, imaginary) pairs of real arrays.

Two schedules of the same arithmetic, picked by platform:

``"tiled"`` (TPU through Mosaic; CPU through the Pallas interpreter)
    grid ``(batch, channel tiles, time blocks)`` with time the innermost, sequential grid axis.
    Pallas streams each ``(block_length, block_channels)`` tile of ``a`` and ``x`` into on-chip
    memory (double-buffered, so the next tile loads while this one is scanned). The carry lives in
    the last-state output block: its index does not depend on the time block, so the block stays
    resident across the time steps of one (batch, channel tile) and is written back once, as the
    final state. Inside a tile, rows are scanned in aligned groups of 8 (16 for 16-bit inputs) so
    loads and stores are whole register tiles.

``"streaming"`` (GPU through Triton)
    grid ``(batch, channel tiles)``; each program walks the whole time axis with its carry in
    registers, loading and storing one contiguous row of ``block_channels`` values per step.
    Triton runs grid programs concurrently, so the carry cannot cross grid steps there.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Schedule = Literal["tiled", "streaming"]
SCHEDULES: tuple[str, ...] = ("tiled", "streaming")

_MAX_TILED_CHANNELS = 512
_TILED_LENGTH = 256
_STREAMING_CHANNELS = 32
_STREAMING_UNROLL = 8
_LANES = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _real_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself when real."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)


def _group_rows(dtypes: Sequence[jnp.dtype]) -> int:
    """Rows in one aligned register tile: 8 for 32-bit, 16 for 16-bit inputs."""
    return max(8, 32 // min(jnp.dtype(d).itemsize for d in dtypes))


def _default_platform() -> str:
    return jax.default_backend()


def _step(a: Sequence[jax.Array], x: Sequence[jax.Array], h: Sequence[jax.Array]
          ) -> tuple[jax.Array, ...]:
    """One step on real values (1-tuples) or complex values as (real, imag) pairs."""
    if len(h) == 1:
        return (a[0] * h[0] + x[0],)
    (ar, ai), (xr, xi), (hr, hi) = a, x, h
    return ar * hr - ai * hi + xr, ar * hi + ai * hr + xi


def _split_refs(refs, parts: int):
    return [refs[k * parts:(k + 1) * parts] for k in range(5)]


def _tiled_kernel(*refs, parts: int, reverse: bool, block_length: int, group: int, acc):
    """One (block_length, block_channels) tile; the carry is the resident last-state block."""
    a_refs, x_refs, h0_refs, h_refs, last_refs = _split_refs(refs, parts)

    @pl.when(pl.program_id(2) == 0)
    def _load_initial_state():
        for last, h0 in zip(last_refs, h0_refs):
            last[...] = h0[...]

    channels = h_refs[0].shape[-1]
    row_ids = jax.lax.broadcasted_iota(jnp.int32, (group, channels), 0)
    num_groups = block_length // group

    def scan_group(g, carry):
        j = num_groups - 1 - g if reverse else g
        rows = (pl.ds(pl.multiple_of(j * group, group), group), slice(None))
        a_tile = [r[rows].astype(acc) for r in a_refs]
        x_tile = [r[rows].astype(acc) for r in x_refs]
        out = [jnp.zeros((group, channels), acc) for _ in range(parts)]
        for i in (reversed(range(group)) if reverse else range(group)):
            carry = _step([t[i:i + 1] for t in a_tile], [t[i:i + 1] for t in x_tile], carry)
            out = [jnp.where(row_ids == i, c, o) for c, o in zip(carry, out)]
        for ref, o in zip(h_refs, out):
            ref[rows] = o.astype(ref.dtype)
        return carry

    carry = tuple(last[...] for last in last_refs)
    carry = jax.lax.fori_loop(0, num_groups, scan_group, carry)
    for last, c in zip(last_refs, carry):
        last[...] = c


def _streaming_kernel(*refs, parts: int, reverse: bool, length: int, unroll: int, acc):
    """The whole time axis of one (batch row, channel tile), one row per step."""
    a_refs, x_refs, h0_refs, h_refs, last_refs = _split_refs(refs, parts)

    def step(t, carry):
        row = (pl.ds(t, 1), slice(None))
        a = [r[row].astype(acc) for r in a_refs]
        x = [r[row].astype(acc) for r in x_refs]
        carry = _step(a, x, carry)
        for ref, c in zip(h_refs, carry):
            ref[row] = c.astype(ref.dtype)
        return carry

    # Unrolled by hand (Triton's loop lowering takes no unroll): the loads of a group do not
    # depend on the carry, so they can be issued ahead of its serial chain.
    def step_group(g, carry):
        for k in range(unroll):
            i = g * unroll + k
            carry = step(length - 1 - i if reverse else i, carry)
        return carry

    carry = tuple(h0[...].astype(acc) for h0 in h0_refs)
    carry = jax.lax.fori_loop(0, length // unroll, step_group, carry)
    for i in range(length - length % unroll, length):
        carry = step(length - 1 - i if reverse else i, carry)
    for last, c in zip(last_refs, carry):
        last[...] = c


def _out_shapes(like: jax.Array, shape, out_dtype, acc, parts: int) -> list:
    """States then final states; under ``shard_map`` they vary over the manual axes ``like``
    varies over."""
    mat = jax.typeof(like).manual_axis_type
    batch, _, channels = shape
    return ([jax.ShapeDtypeStruct(shape, out_dtype, manual_axis_type=mat)] * parts
            + [jax.ShapeDtypeStruct((batch, 1, channels), acc, manual_axis_type=mat)] * parts)


def _tiled_call(a_parts, x_parts, h0_parts, *, reverse, block_length, block_channels, group,
                acc, out_dtype, interpret):
    batch, length, channels = x_parts[0].shape
    parts = len(x_parts)
    num_blocks = length // block_length
    grid = (batch, channels // block_channels, num_blocks)

    def time_block(t):
        return num_blocks - 1 - t if reverse else t

    tile = pl.BlockSpec((pl.squeezed, block_length, block_channels),
                        lambda b, c, t: (b, time_block(t), c))
    state = pl.BlockSpec((pl.squeezed, 1, block_channels), lambda b, c, t: (b, 0, c))
    kernel = functools.partial(_tiled_kernel, parts=parts, reverse=reverse,
                               block_length=block_length, group=group, acc=acc)
    from jax.experimental.pallas import tpu as pltpu

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[tile] * (2 * parts) + [state] * parts,
        out_specs=[tile] * parts + [state] * parts,
        out_shape=_out_shapes(x_parts[0], (batch, length, channels), out_dtype, acc, parts),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="linear_recurrence_tiled",
    )(*a_parts, *x_parts, *h0_parts)
    return out[:parts], out[parts:]


def _streaming_call(a_parts, x_parts, h0_parts, *, reverse, block_channels, acc, out_dtype,
                    interpret):
    batch, length, channels = x_parts[0].shape
    parts = len(x_parts)
    grid = (batch, channels // block_channels)
    column = pl.BlockSpec((pl.squeezed, length, block_channels), lambda b, c: (b, 0, c))
    state = pl.BlockSpec((pl.squeezed, 1, block_channels), lambda b, c: (b, 0, c))
    kernel = functools.partial(_streaming_kernel, parts=parts, reverse=reverse, length=length,
                               unroll=_STREAMING_UNROLL, acc=acc)
    from jax.experimental.pallas import triton as pltriton

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[column] * (2 * parts) + [state] * parts,
        out_specs=[column] * parts + [state] * parts,
        out_shape=_out_shapes(x_parts[0], (batch, length, channels), out_dtype, acc, parts),
        compiler_params=pltriton.CompilerParams(num_warps=max(1, block_channels // 32),
                                                num_stages=1),
        interpret=interpret,
        name="linear_recurrence_streaming",
    )(*a_parts, *x_parts, *h0_parts)
    return out[:parts], out[parts:]


def _as_parts(v: jax.Array, is_complex: bool) -> list[jax.Array]:
    return [jnp.real(v), jnp.imag(v)] if is_complex else [v]


def pallas_recurrence(
    a: jax.Array,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    reverse: bool = False,
    out_dtype: jnp.dtype | None = None,
    schedule: Schedule | None = None,
    block_length: int | None = None,
    block_channels: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """All states and the final state of ``h_t = a_t * h_{t-1} + x_t``, by a Pallas kernel.

    Args:
      a: decays ``(..., L, C)`` (or broadcastable to ``x``), real or complex, any float dtype.
      x: inputs ``(..., L, C)``.
      h0: initial state ``(..., C)`` (the state after the last step when ``reverse``); zeros
        when omitted.
      reverse: run from ``t = L-1`` down to 0.
      out_dtype: dtype of the states; the promoted input dtype by default. Accumulation is in
        float32 (float64 for float64 inputs) regardless.
      schedule: ``"tiled"`` or ``"streaming"`` (see the module docstring); by default
        ``"streaming"`` on GPU and ``"tiled"`` elsewhere.
      block_length: time rows per tile of the tiled schedule (a multiple of 8, or of 16 for
        16-bit inputs); ``L`` is padded up to a multiple of it.
      block_channels: channels per program; ``C`` is padded up to a multiple of it (on GPU it
        must be a power of two).
      interpret: run the Pallas interpreter; by default exactly when the backend is CPU.

    Returns:
      ``(h, last)``: the states ``(..., L, C)`` in ``out_dtype`` and the final state ``(..., C)``
      in the accumulation dtype (``h_{L-1}``, or ``h_0`` when ``reverse``).
    """
    a, x = jnp.asarray(a), jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be (..., length, channels); got shape {x.shape}")
    a = jnp.broadcast_to(a, x.shape)
    dtype = jnp.result_type(a, x) if h0 is None else jnp.result_type(a, x, h0)
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    acc = jnp.promote_types(_real_dtype(dtype), jnp.float32)
    out_dtype = jnp.dtype(out_dtype or dtype)
    if is_complex and not jnp.issubdtype(out_dtype, jnp.complexfloating):
        raise ValueError(f"out_dtype must be complex for complex inputs; got {out_dtype}")
    platform = _default_platform()
    interpret = platform == "cpu" if interpret is None else interpret
    schedule = schedule or ("streaming" if platform == "gpu" else "tiled")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if schedule == "tiled" and platform == "gpu" and not interpret:
        raise ValueError("the tiled schedule carries state across grid steps, which Triton runs "
                         "concurrently: use schedule='streaming' on GPU")

    lead, (length, channels) = x.shape[:-2], x.shape[-2:]
    batch = math.prod(lead)
    state_shape = lead + (channels,)
    if h0 is None:
        h0 = jnp.zeros(state_shape, dtype)
    elif h0.shape != state_shape:
        raise ValueError(f"h0 must have shape {state_shape}; got {h0.shape}")

    a_parts = [p.reshape(batch, length, channels) for p in _as_parts(a, is_complex)]
    x_parts = [p.reshape(batch, length, channels) for p in _as_parts(x, is_complex)]
    h0_parts = [p.reshape(batch, 1, channels).astype(acc) for p in _as_parts(h0, is_complex)]

    if schedule == "tiled":
        group = _group_rows([p.dtype for p in a_parts + x_parts])
        block_length = block_length or min(_TILED_LENGTH, _round_up(length, group))
        if block_length % group:
            raise ValueError(f"block_length must be a multiple of {group} for these dtypes; "
                             f"got {block_length}")
        block_channels = block_channels or min(_MAX_TILED_CHANNELS, _round_up(channels, _LANES))
        padded_length = _round_up(length, block_length)
    else:
        block_channels = block_channels or min(_STREAMING_CHANNELS, pl.next_power_of_2(channels))
        if not interpret and block_channels & (block_channels - 1):
            raise ValueError(f"block_channels must be a power of two on GPU; got {block_channels}")
        padded_length = length
    padded_channels = _round_up(channels, block_channels)

    # Identity steps (a = 1, x = 0) after the end leave the carry unchanged in either
    # direction, so the final state is exact; padded channels are dropped.
    def pad(parts, value, time=True):
        widths = [(0, 0), (0, padded_length - length if time else 0),
                  (0, padded_channels - channels)]
        return [jnp.pad(p, widths, constant_values=value) for p in parts]

    a_parts = pad(a_parts[:1], 1) + pad(a_parts[1:], 0)  # a = 1 + 0i
    x_parts = pad(x_parts, 0)
    h0_parts = pad(h0_parts, 0, time=False)

    part_dtype = _real_dtype(out_dtype)
    common = dict(reverse=reverse, block_channels=block_channels, acc=acc,
                  out_dtype=part_dtype, interpret=interpret)
    if schedule == "tiled":
        h_parts, last_parts = _tiled_call(a_parts, x_parts, h0_parts, block_length=block_length,
                                          group=group, **common)
    else:
        h_parts, last_parts = _streaming_call(a_parts, x_parts, h0_parts, **common)

    h_parts = [p[:, :length, :channels].reshape(x.shape) for p in h_parts]
    last_parts = [p[:, 0, :channels].reshape(state_shape) for p in last_parts]
    if is_complex:
        h = jax.lax.complex(*h_parts).astype(out_dtype)
        last = jax.lax.complex(*last_parts)
    else:
        h, last = h_parts[0], last_parts[0]
    return h, last


def pallas_scan(a: jax.Array, x: jax.Array, h0: jax.Array, reverse: bool) -> jax.Array:
    """The states of :func:`pallas_recurrence` in ``x``'s dtype: the ``method="pallas"`` body
    of :func:`hgrn_jax.ops.linear_recurrence`."""
    h, _ = pallas_recurrence(a, x, h0, reverse=reverse, out_dtype=x.dtype)
    return h

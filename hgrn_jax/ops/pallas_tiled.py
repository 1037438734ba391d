"""The tiled schedule of the Pallas recurrence (TPU through Mosaic; CPU through the Pallas
interpreter): its kernel and :func:`tiled_call`, which
:func:`hgrn_jax.ops.pallas_recurrence.pallas_recurrence` runs it by.

Grid ``(batch, channel tiles, time blocks)`` with time the innermost, sequential grid axis.
Pallas streams each ``(block_length, block_channels)`` tile of ``a`` and ``x`` into on-chip
memory (double-buffered, so the next tile loads while this one is scanned). The carry lives in
the last-state output block: its index does not depend on the time block, so the block stays
resident across the time steps of one (batch, channel tile) and is written back once, as the
final state. Inside a tile, rows are scanned in aligned groups of 8 (16 for 16-bit inputs) so
loads and stores are whole register tiles.

Arrays are ``(B, L, C)`` real parts (two per complex array) with ``L`` a multiple of
``block_length`` and ``C`` of ``block_channels``, as the calling layout pads them; states are
``(B, 1, C)``. The backward pass is not here: it is a reverse run of this forward kernel
(:func:`hgrn_jax.ops.common.shifted_backward`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hgrn_jax.ops.pallas_common import split_refs


def _step(
    a: Sequence[jax.Array], x: Sequence[jax.Array], h: Sequence[jax.Array]
) -> tuple[jax.Array, ...]:
    """One step on real values (1-tuples) or complex values as (real, imag) pairs."""
    if len(h) == 1:
        return (a[0] * h[0] + x[0],)
    (ar, ai), (xr, xi), (hr, hi) = a, x, h
    return ar * hr - ai * hi + xr, ar * hi + ai * hr + xi


def _tiled_kernel(*refs, parts: int, reverse: bool, block_length: int, group: int, acc):
    """One (block_length, block_channels) tile; the carry is the resident last-state block."""
    a_refs, x_refs, h0_refs, h_refs, last_refs = split_refs(refs, parts)

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
        for i in reversed(range(group)) if reverse else range(group):
            carry = _step([t[i : i + 1] for t in a_tile], [t[i : i + 1] for t in x_tile], carry)
            out = [jnp.where(row_ids == i, c, o) for c, o in zip(carry, out)]
        for ref, o in zip(h_refs, out):
            ref[rows] = o.astype(ref.dtype)
        return carry

    carry = tuple(last[...] for last in last_refs)
    carry = jax.lax.fori_loop(0, num_groups, scan_group, carry)
    for last, c in zip(last_refs, carry):
        last[...] = c


def _out_shapes(like: jax.Array, shape, out_dtype, acc, parts: int) -> list:
    """States then final states; under ``shard_map`` they vary over the manual axes ``like``
    varies over."""
    mat = jax.typeof(like).manual_axis_type
    batch, _, channels = shape
    return [jax.ShapeDtypeStruct(shape, out_dtype, manual_axis_type=mat)] * parts + [
        jax.ShapeDtypeStruct((batch, 1, channels), acc, manual_axis_type=mat)
    ] * parts


def tiled_call(
    a_parts,
    x_parts,
    h0_parts,
    *,
    reverse,
    block_length,
    block_channels,
    group,
    acc,
    out_dtype,
    interpret,
):
    """States ``(B, L, C)`` parts in ``out_dtype`` and final states ``(B, 1, C)`` parts in
    ``acc``, from parts of ``a`` and ``x`` ``(B, L, C)`` and of ``h0`` ``(B, 1, C)``."""
    batch, length, channels = x_parts[0].shape
    parts = len(x_parts)
    num_blocks = length // block_length
    grid = (batch, channels // block_channels, num_blocks)

    def time_block(t):
        return num_blocks - 1 - t if reverse else t

    tile = pl.BlockSpec(
        (pl.squeezed, block_length, block_channels), lambda b, c, t: (b, time_block(t), c)
    )
    state = pl.BlockSpec((pl.squeezed, 1, block_channels), lambda b, c, t: (b, 0, c))
    kernel = functools.partial(
        _tiled_kernel, parts=parts, reverse=reverse, block_length=block_length, group=group, acc=acc
    )
    from jax.experimental.pallas import tpu as pltpu

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[tile] * (2 * parts) + [state] * parts,
        out_specs=[tile] * parts + [state] * parts,
        out_shape=_out_shapes(x_parts[0], (batch, length, channels), out_dtype, acc, parts),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="linear_recurrence_tiled",
    )(*a_parts, *x_parts, *h0_parts)
    return out[:parts], out[parts:]

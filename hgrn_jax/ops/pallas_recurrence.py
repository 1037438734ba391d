"""A Pallas kernel for the linear recurrence ``h_t = a_t * h_{t-1} + x_t``.

Every element of ``a`` and ``x`` is read once (twice when the GPU schedule below splits time
into chunks) and every state written once, the time axis is walked sequentially inside the
kernel while batch rows and channel tiles run in parallel, and states are accumulated in float32 (float64 for float64 inputs) whatever the
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
    grid ``(batch, channel tiles, time chunks)``; each program walks its chunk of the time axis
    with its carry in registers, loading and storing one contiguous row of ``block_channels``
    values per step. Triton runs grid programs concurrently, so the carry cannot cross grid
    steps: with one chunk (short sequences, or many batch rows and channels) the kernel is one
    pass over the data; with several, a first pass reads ``a`` and ``x`` once to summarise each
    chunk (its final state from a zero start and the product of its decays), the chunks' carries
    are chained on the small ``(batch, chunks, channels)`` summaries, and a second pass rescans
    each chunk from its carry and writes the states: 5 array passes instead of 3, bought for
    ``chunks`` times more parallel programs when ``batch * channels`` alone cannot keep the GPU's
    memory system busy.

    Two options of :class:`StreamingOptions` cut what is not array traffic. ``loads_ahead`` (on)
    issues a group of steps' loads before their stores: otherwise each step's loads follow the
    previous step's store, which the compiler keeps in that order (nothing tells it the arrays
    do not overlap), and each step waits one memory latency. ``chain_in_kernel`` (off until
    timed on a GPU) chains the carries inside the second kernel (each program walks the
    summaries of the chunks before its own), so no XLA operations run between the two launches.

    ``backend="mosaic_gpu"`` runs the same kernels, grid and chunking on Mosaic GPU instead of
    Triton (:mod:`hgrn_jax.ops.mosaic_gpu_recurrence`: time streamed through shared memory by
    TMA copies; H100/H200; opt-in until timed).

The backward pass (:func:`pallas_linear_recurrence`'s custom VJP) on the streaming schedule is one
fused kernel of the same shape: walking time the other way it reads ``a``, the cotangent and the
saved states and writes ``da`` and ``dx`` (5 array passes, the minimum), chunked the same way.
The tiled schedule's backward is the generic one of :mod:`hgrn_jax.ops.recurrence` (a reverse
run of the forward kernel on shifted decays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hgrn_jax.ops.common import (
    Parts,
    accumulation_dtype,
    chain_chunk_parts,
    check_inputs,
    parts_add,
    parts_mul,
    resolve_out_dtype,
    shifted_backward,
)

Schedule = Literal["tiled", "streaming"]
SCHEDULES: tuple[str, ...] = ("tiled", "streaming")

_MAX_TILED_CHANNELS = 512
_TILED_LENGTH = 256
_STREAMING_CHANNELS = 32
_LANES = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _real_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself when real."""
    return (
        jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)
    )


def _group_rows(dtypes: Sequence[jnp.dtype]) -> int:
    """Rows in one aligned register tile: 8 for 32-bit, 16 for 16-bit inputs."""
    return max(8, 32 // min(jnp.dtype(d).itemsize for d in dtypes))


def _mosaic_gpu():
    """:mod:`hgrn_jax.ops.mosaic_gpu_recurrence`, imported on first use: Mosaic GPU's Python
    modules add about a quarter to ``import hgrn_jax.ops``."""
    from hgrn_jax.ops import mosaic_gpu_recurrence

    return mosaic_gpu_recurrence


def _triton_available() -> bool:
    """Whether this JAX still has Pallas's Triton back-end (deprecated since JAX 0.11)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _default_platform() -> str:
    return jax.default_backend()


def _step(
    a: Sequence[jax.Array], x: Sequence[jax.Array], h: Sequence[jax.Array]
) -> tuple[jax.Array, ...]:
    """One step on real values (1-tuples) or complex values as (real, imag) pairs."""
    if len(h) == 1:
        return (a[0] * h[0] + x[0],)
    (ar, ai), (xr, xi), (hr, hi) = a, x, h
    return ar * hr - ai * hi + xr, ar * hi + ai * hr + xi


def _split_refs(refs, parts: int, count: int = 5):
    """``refs`` in ``count`` groups of ``parts`` (1 real, 2 complex) refs each."""
    return [refs[k * parts : (k + 1) * parts] for k in range(count)]


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


def _chunk_rows(length: int, chunk_length: int):
    """First row and number of rows of this program's time chunk (grid axis 2)."""
    start = pl.program_id(2) * chunk_length
    if length % chunk_length == 0:
        return start, chunk_length
    return start, jnp.minimum(chunk_length, length - start)


def _walk(load, update, carry, *, start, rows, reverse: bool, unroll: int, loads_ahead: bool):
    """``carry = update(t, load(t), carry)`` over the chunk's rows in time order (or reversed).

    Unrolled by hand (Triton's loop lowering takes no unroll): the loads of a group do not
    depend on the carry, so they can be issued ahead of its serial chain. With ``loads_ahead``
    the group's loads come first in program order; otherwise each step's loads follow the
    previous step's stores, which a compiler that cannot prove the arrays distinct must keep
    in that order (one memory latency per step).
    """

    def time(i):
        return start + rows - 1 - i if reverse else start + i

    def group(g, carry):
        times = [time(g * unroll + k) for k in range(unroll)]
        if loads_ahead:
            for t, loaded in zip(times, [load(t) for t in times]):
                carry = update(t, loaded, carry)
            return carry
        for t in times:
            carry = update(t, load(t), carry)
        return carry

    def one(i, carry):
        t = time(i)
        return update(t, load(t), carry)

    groups = rows // unroll
    carry = jax.lax.fori_loop(0, groups, group, carry)
    if isinstance(rows, int):
        for i in range(groups * unroll, rows):
            carry = one(i, carry)
        return carry
    return jax.lax.fori_loop(groups * unroll, rows, one, carry)


def _load(refs, t, acc) -> Parts:
    return tuple(r[pl.ds(t, 1), :].astype(acc) for r in refs)


def _store(refs, t, values: Parts) -> None:
    for r, v in zip(refs, values):
        r[pl.ds(t, 1), :] = v.astype(r.dtype)


def _store_block(refs, values: Parts) -> None:
    for r, v in zip(refs, values):
        r[...] = v.astype(r.dtype)


def _identity(like, parts: int, acc) -> tuple[Parts, Parts]:
    """Zero state and unit decay, shaped like one ``(1, block_channels)`` row."""
    zeros = tuple(jnp.zeros(like.shape, acc) for _ in range(parts))
    return zeros, (jnp.ones(like.shape, acc),) + zeros[1:]


def _chained_carry(
    init: Parts, finals_refs, decays_refs, *, reverse, num_chunks, walk, acc
) -> Parts:
    """The carry entering this program's chunk (grid axis 2), chained from ``init`` over the
    summaries ``(num_chunks, block)`` of the chunks walked before it: ``h -> D_j * h + S_j``
    for each, in the order walked (what :func:`chain_chunk_parts` computes for every chunk at
    once, here by one program for its own chunk)."""
    k = pl.program_id(2)
    start, rows = (k + 1, num_chunks - 1 - k) if reverse else (0, k)

    def load(j):
        return _load(finals_refs, j, acc), _load(decays_refs, j, acc)

    def update(j, loaded, carry):
        final, decay = loaded
        return parts_add(parts_mul(decay, carry), final)

    return walk(load, update, init, start=start, rows=rows, reverse=reverse)


def _forward_summary_kernel(*refs, parts, reverse, length, chunk_length, num_chunks, walk, acc):
    """Per chunk: the final state from a zero start and the product of the decays."""
    a_refs, x_refs, last_refs, decay_refs = _split_refs(refs, parts, 4)
    start, rows = _chunk_rows(length, chunk_length)

    def load(t):
        return _load(a_refs, t, acc), _load(x_refs, t, acc)

    def update(t, loaded, carry):
        (a, x), (h, decay) = loaded, carry
        return parts_add(parts_mul(a, h), x), parts_mul(a, decay)

    h, decay = walk(
        load, update, _identity(last_refs[0], parts, acc), start=start, rows=rows, reverse=reverse
    )
    _store_block(last_refs, h)
    _store_block(decay_refs, decay)


def _forward_kernel(
    *refs, parts, reverse, length, chunk_length, num_chunks, walk, acc, chained: bool = False
):
    """Per chunk, from its carried-in state: every state, and the chunk's final state.

    The carry comes in per chunk (``(B, chunks, C)``, chained outside the kernel) or, when
    ``chained``, as the initial state and every chunk's summary, chained by the program itself.
    """
    if chained:
        a_refs, x_refs, init_refs, finals_refs, decays_refs, h_refs, last_refs = _split_refs(
            refs, parts, 7
        )
        h = _chained_carry(
            tuple(r[...].astype(acc) for r in init_refs),
            finals_refs,
            decays_refs,
            reverse=reverse,
            num_chunks=num_chunks,
            walk=walk,
            acc=acc,
        )
    else:
        a_refs, x_refs, init_refs, h_refs, last_refs = _split_refs(refs, parts, 5)
        h = tuple(r[...].astype(acc) for r in init_refs)
    start, rows = _chunk_rows(length, chunk_length)

    def load(t):
        return _load(a_refs, t, acc), _load(x_refs, t, acc)

    def update(t, loaded, h):
        a, x = loaded
        h = parts_add(parts_mul(a, h), x)
        _store(h_refs, t, h)
        return h

    _store_block(last_refs, walk(load, update, h, start=start, rows=rows, reverse=reverse))


def _backward_summary_kernel(*refs, parts, reverse, length, chunk_length, num_chunks, walk, acc):
    """Per chunk, walking against the forward direction: the flowing gradient ``a_t * d_t``
    left at the chunk's far edge from a zero start, and the product of the decays."""
    a_refs, g_refs, flow_refs, decay_refs = _split_refs(refs, parts, 4)
    start, rows = _chunk_rows(length, chunk_length)

    def load(t):
        return _load(a_refs, t, acc), _load(g_refs, t, acc)

    def update(t, loaded, carry):
        (a, g), (flow, decay) = loaded, carry
        return parts_mul(a, parts_add(g, flow)), parts_mul(a, decay)

    flow, decay = walk(
        load,
        update,
        _identity(flow_refs[0], parts, acc),
        start=start,
        rows=rows,
        reverse=not reverse,
    )
    _store_block(flow_refs, flow)
    _store_block(decay_refs, decay)


def _backward_kernel(
    *refs, parts, reverse, length, chunk_length, num_chunks, walk, acc, chained: bool = False
):
    """Per chunk, from the gradient flowing in: ``dx_t = d_t``, ``da_t = d_t * h_{t-1}`` and
    the gradient flowing out (``dh0`` for the chunk holding the first step). The flowing
    gradient comes in per chunk or, when ``chained``, as the chunks' summaries (from zero)."""
    if chained:
        (
            a_refs,
            g_refs,
            h_refs,
            h0_refs,
            finals_refs,
            decays_refs,
            da_refs,
            dx_refs,
            flow_out_refs,
        ) = _split_refs(refs, parts, 9)
        flow = _chained_carry(
            _identity(h0_refs[0], parts, acc)[0],
            finals_refs,
            decays_refs,
            reverse=not reverse,
            num_chunks=num_chunks,
            walk=walk,
            acc=acc,
        )
    else:
        a_refs, g_refs, h_refs, h0_refs, flow_in_refs, da_refs, dx_refs, flow_out_refs = (
            _split_refs(refs, parts, 8)
        )
        flow = tuple(r[...].astype(acc) for r in flow_in_refs)
    start, rows = _chunk_rows(length, chunk_length)
    offset, edge = (1, length - 1) if reverse else (-1, 0)
    h0 = tuple(r[...].astype(acc) for r in h0_refs)

    def load(t):
        h_prev = _load(h_refs, jnp.clip(t + offset, 0, length - 1), acc)
        return _load(g_refs, t, acc), h_prev, _load(a_refs, t, acc)

    def update(t, loaded, flow):
        g, h_prev, a = loaded
        d = parts_add(g, flow)
        h_prev = tuple(jnp.where(t == edge, s, v) for s, v in zip(h0, h_prev))
        _store(dx_refs, t, d)
        _store(da_refs, t, parts_mul(d, h_prev))
        return parts_mul(a, d)

    _store_block(
        flow_out_refs, walk(load, update, flow, start=start, rows=rows, reverse=not reverse)
    )


def _out_shapes(like: jax.Array, shape, out_dtype, acc, parts: int) -> list:
    """States then final states; under ``shard_map`` they vary over the manual axes ``like``
    varies over."""
    mat = jax.typeof(like).manual_axis_type
    batch, _, channels = shape
    return [jax.ShapeDtypeStruct(shape, out_dtype, manual_axis_type=mat)] * parts + [
        jax.ShapeDtypeStruct((batch, 1, channels), acc, manual_axis_type=mat)
    ] * parts


def _tiled_call(
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


@dataclasses.dataclass(frozen=True)
class StreamingOptions:
    """Launch parameters of the streaming (GPU) schedule.

    Attributes:
      block_channels: channels per program (a power of two on GPU); by default 32, one warp
        with one channel per thread.
      chunk_length: time steps per program; by default the whole sequence when
        ``batch * channels >= min_parallel_chains`` already, else the sequence is split into
        chunks of at least ``min_chunk_length`` steps until it is (see the module docstring).
      unroll: time steps per loop iteration.
      num_warps: warps per program; by default one per 32 channels.
      num_stages: Triton software-pipelining stages.
      min_parallel_chains: how many independent (row, channel, chunk) chains to aim for.
      min_chunk_length: the shortest chunk the default splitting makes.
      loads_ahead: issue each unrolled group's loads before its stores (see :func:`_walk`).
      chain_in_kernel: chain the chunks' carries inside the state-writing kernel (each program
        walks the summaries of the chunks before its own) instead of by XLA between the two
        kernels: two launches per direction instead of two plus the chain's.
      backend: ``"triton"`` (the default) or ``"mosaic_gpu"``: the same kernels on Mosaic GPU
        (:mod:`hgrn_jax.ops.mosaic_gpu_recurrence`), which streams time through shared memory
        by TMA copies; 128 chains per program (``block_channels`` 128, or 64 / 32 of 2 / 4
        batch rows; by default the narrowest the channels and batch allow), the length padded
        to whole blocks.
      block_rows: time steps per shared-memory block (``mosaic_gpu`` only; a multiple of 8).
      stages: blocks in flight per program (``mosaic_gpu`` only).
      auto_barriers: let Mosaic GPU put a warpgroup barrier before and after every
        shared-memory store (``mosaic_gpu`` only; off: the kernels place their own, see
        :mod:`hgrn_jax.ops.mosaic_gpu_recurrence`).
    """

    block_channels: int | None = None
    chunk_length: int | None = None
    unroll: int = 8
    num_warps: int | None = None
    num_stages: int = 1
    # Measured on an H100 (benchmarks/results/pallas_sweep_gpu.json, B=8, D=512, float32): more
    # chains in flight win until chunks get short; 2^19 chains of >= 128 steps was the fastest
    # variant forward+backward at L = 4k and 16k (1.21x and 1.28x faster than 2^16 of >= 256).
    min_parallel_chains: int = 1 << 19
    min_chunk_length: int = 128
    # loads_ahead: in the machine code compiled for sm_90 (benchmarks/kernel_sass.py, no GPU
    # needed) the time loop of the state-writing kernels waits one memory latency per step
    # without it and one per unrolled group with it, at no spills (<= 90 registers). Not yet
    # timed on a GPU: the H200 numbers of benchmarks/README.md are of loads_ahead=False.
    loads_ahead: bool = True
    # Off until timed on a GPU (benchmarks/pallas_gpu.py times it beside the defaults): each
    # program's chain is serial, up to (chunks - 1) steps, against XLA's few small launches.
    chain_in_kernel: bool = False
    # Mosaic GPU: untimed (no GPU lent since it was written). 16 rows of 128 float32 channels
    # are 8 KiB per array and stage: the backward's five arrays in two stages take 80 KiB of an
    # SM's 228 KiB of shared memory, so two programs fit on one SM.
    backend: Literal["triton", "mosaic_gpu"] = "triton"
    block_rows: int = 16
    stages: int = 2
    # On, the time loop compiles (sm_90a, benchmarks/mosaic_ptx.py) to a bar.sync before and
    # after every shared-memory store: 3 per step forward, 5.6 backward.
    auto_barriers: bool = False

    def chunking(self, chains: int, length: int) -> tuple[int, int]:
        """``(chunk_length, num_chunks)`` for ``chains`` = batch * padded channels."""
        multiple = self.block_rows if self.backend == "mosaic_gpu" else self.unroll
        if self.chunk_length is not None:
            chunk = max(1, min(self.chunk_length, length))
        else:
            wanted = -(-self.min_parallel_chains // max(chains, 1))
            most = max(1, length // self.min_chunk_length)
            chunk = -(-length // max(1, min(wanted, most)))
            chunk = min(length, _round_up(chunk, multiple))
        if self.backend == "mosaic_gpu":  # whole blocks (the length is padded to them)
            chunk = min(_round_up(length, multiple), _round_up(chunk, multiple))
        return chunk, -(-length // chunk)


_streaming_defaults = StreamingOptions()


@contextlib.contextmanager
def streaming_options(**overrides):
    """Override :class:`StreamingOptions` fields for kernels traced inside the block (for
    tuning, as ``benchmarks/pallas_gpu.py`` does): functions jitted and first called inside see
    the overrides (a function already traced keeps the options it was traced with)."""
    global _streaming_defaults
    saved = _streaming_defaults
    _streaming_defaults = dataclasses.replace(saved, **overrides)
    try:
        yield _streaming_defaults
    finally:
        _streaming_defaults = saved


_STREAMING_KERNELS = {
    "forward_summary": (_forward_summary_kernel, ("column", "column"), ("chunk", "chunk")),
    "forward": (_forward_kernel, ("column", "column", "chunk"), ("column", "chunk")),
    "forward_chained": (
        functools.partial(_forward_kernel, chained=True),
        ("column", "column", "state", "summaries", "summaries"),
        ("column", "chunk"),
    ),
    "backward_summary": (_backward_summary_kernel, ("column", "column"), ("chunk", "chunk")),
    "backward": (
        _backward_kernel,
        ("column", "column", "column", "state", "chunk"),
        ("column", "column", "chunk"),
    ),
    "backward_chained": (
        functools.partial(_backward_kernel, chained=True),
        ("column", "column", "column", "state", "summaries", "summaries"),
        ("column", "column", "chunk"),
    ),
}


def _streaming_call(
    name: str,
    inputs: Sequence[Sequence[jax.Array]],
    out_dtypes,
    *,
    reverse,
    chunk_length,
    num_chunks,
    options: StreamingOptions,
    acc,
    interpret,
):
    """Run one streaming kernel. ``inputs``: one list of parts per array of the kernel's
    signature; ``out_dtypes``: the dtype of each output array's parts (``None``: ``acc``).
    Array kinds: ``column`` (B, L, C) walked in time, ``chunk`` (B, chunks, C) one row per
    chunk, ``summaries`` the same array whole in every chunk's program, ``state`` (B, 1, C)
    shared by all chunks."""
    if options.backend == "mosaic_gpu":
        return _mosaic_gpu().call(
            name,
            inputs,
            [dtype or acc for dtype in out_dtypes],
            reverse=reverse,
            chunk_length=chunk_length,
            num_chunks=num_chunks,
            block_rows=options.block_rows,
            stages=options.stages,
            auto_barriers=options.auto_barriers,
            width=options.block_channels,
            acc=acc,
            interpret=interpret,
        )
    kernel, in_kinds, out_kinds = _STREAMING_KERNELS[name]
    parts = len(inputs[0])
    like = inputs[0][0]
    batch, length, channels = like.shape
    block = options.block_channels
    specs = {
        "column": pl.BlockSpec((pl.squeezed, length, block), lambda b, c, k: (b, 0, c)),
        "chunk": pl.BlockSpec((pl.squeezed, 1, block), lambda b, c, k: (b, k, c)),
        "summaries": pl.BlockSpec((pl.squeezed, num_chunks, block), lambda b, c, k: (b, 0, c)),
        "state": pl.BlockSpec((pl.squeezed, 1, block), lambda b, c, k: (b, 0, c)),
    }
    shapes = {"column": (batch, length, channels), "chunk": (batch, num_chunks, channels)}
    mat = jax.typeof(like).manual_axis_type
    out_shape = [
        jax.ShapeDtypeStruct(shapes[kind], dtype or acc, manual_axis_type=mat)
        for kind, dtype in zip(out_kinds, out_dtypes)
        for _ in range(parts)
    ]
    from jax.experimental.pallas import triton as pltriton

    out = pl.pallas_call(
        functools.partial(
            kernel,
            parts=parts,
            reverse=reverse,
            length=length,
            chunk_length=chunk_length,
            num_chunks=num_chunks,
            walk=functools.partial(_walk, unroll=options.unroll, loads_ahead=options.loads_ahead),
            acc=acc,
        ),
        grid=(batch, channels // block, num_chunks),
        in_specs=[specs[kind] for kind, array in zip(in_kinds, inputs) for _ in array],
        out_specs=[specs[kind] for kind in out_kinds for _ in range(parts)],
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(
            num_warps=options.num_warps or max(1, block // 32), num_stages=options.num_stages
        ),
        interpret=interpret,
        name=f"linear_recurrence_{name}",
    )(*[p for array in inputs for p in array])
    return [list(out[k * parts : (k + 1) * parts]) for k in range(len(out_kinds))]


def _streaming_forward(
    a_parts, x_parts, h0_parts, *, reverse, acc, out_dtype, interpret, options: StreamingOptions
):
    """States (B, L, C) parts and final state (B, 1, C) parts; C a multiple of the block."""
    batch, length, channels = x_parts[0].shape
    chunk_length, num_chunks = options.chunking(batch * channels, length)
    call = functools.partial(
        _streaming_call,
        reverse=reverse,
        chunk_length=chunk_length,
        num_chunks=num_chunks,
        options=options,
        acc=acc,
        interpret=interpret,
    )
    if num_chunks == 1:
        h, last = call("forward", [a_parts, x_parts, h0_parts], [out_dtype, None])
    else:
        finals, decays = call("forward_summary", [a_parts, x_parts], [None, None])
        if options.chain_in_kernel:
            h, last = call(
                "forward_chained", [a_parts, x_parts, h0_parts, finals, decays], [out_dtype, None]
            )
        else:
            carry_in = chain_chunk_parts(finals, decays, h0_parts, reverse)
            h, last = call("forward", [a_parts, x_parts, carry_in], [out_dtype, None])
    edge = 0 if reverse else num_chunks - 1
    return h, [p[:, edge : edge + 1] for p in last]


def _streaming_backward(
    a_parts,
    g_parts,
    h_parts,
    h0_parts,
    *,
    reverse,
    acc,
    interpret,
    options: StreamingOptions,
    da_dtype,
    dx_dtype,
):
    """``(da, dx, dh0)`` parts of :func:`pallas_linear_recurrence` (channels padded)."""
    batch, length, channels = g_parts[0].shape
    chunk_length, num_chunks = options.chunking(batch * channels, length)
    call = functools.partial(
        _streaming_call,
        reverse=reverse,
        chunk_length=chunk_length,
        num_chunks=num_chunks,
        options=options,
        acc=acc,
        interpret=interpret,
    )
    out_dtypes = [da_dtype, dx_dtype, None]
    columns = [a_parts, g_parts, h_parts, h0_parts]
    zeros = [jnp.zeros_like(p, dtype=acc) for p in h0_parts]
    if num_chunks == 1:
        da, dx, flow_out = call("backward", [*columns, zeros], out_dtypes)
    else:
        finals, decays = call("backward_summary", [a_parts, g_parts], [None, None])
        if options.chain_in_kernel:
            da, dx, flow_out = call("backward_chained", [*columns, finals, decays], out_dtypes)
        else:
            flow_in = chain_chunk_parts(finals, decays, zeros, not reverse)
            da, dx, flow_out = call("backward", [*columns, flow_in], out_dtypes)
    edge = num_chunks - 1 if reverse else 0
    return da, dx, [p[:, edge : edge + 1] for p in flow_out]


def _cotangent(value: jax.Array, dtype) -> jax.Array:
    """``value`` as the cotangent of a ``dtype`` input: the real part for a real input of a
    complex recurrence (the transpose of the real-to-complex conversion)."""
    if jnp.iscomplexobj(value) and not jnp.issubdtype(dtype, jnp.complexfloating):
        value = jnp.real(value)
    return value.astype(dtype)


def _as_parts(v: jax.Array, is_complex: bool) -> list[jax.Array]:
    return [jnp.real(v), jnp.imag(v)] if is_complex else [v]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How ``(..., L, C)`` arrays become the kernels' ``(B, L', C')`` real parts and back:
    leading axes flattened into B, complex values split into (real, imag), time padded to
    ``padded_length`` and channels to ``padded_channels``."""

    shape: tuple[int, ...]
    is_complex: bool
    padded_length: int
    padded_channels: int

    @property
    def batch(self) -> int:
        return math.prod(self.shape[:-2])

    def split(self, value: jax.Array, fill: float = 0.0) -> list[jax.Array]:
        """``(..., L, C)`` -> parts ``(B, L', C')``, padded with ``fill`` (imaginary: 0)."""
        length, channels = self.shape[-2:]
        parts = _as_parts(value, self.is_complex)
        widths = [(0, 0), (0, self.padded_length - length), (0, self.padded_channels - channels)]
        return [
            jnp.pad(
                p.reshape(self.batch, length, channels),
                widths,
                constant_values=fill if k == 0 else 0,
            )
            for k, p in enumerate(parts)
        ]

    def split_state(self, value: jax.Array, dtype) -> list[jax.Array]:
        """``(..., C)`` -> parts ``(B, 1, C')`` in ``dtype``."""
        channels = self.shape[-1]
        return [
            jnp.pad(
                p.reshape(self.batch, 1, channels).astype(dtype),
                [(0, 0), (0, 0), (0, self.padded_channels - channels)],
            )
            for p in _as_parts(value, self.is_complex)
        ]

    def merge(self, parts: Sequence[jax.Array], dtype) -> jax.Array:
        """Parts ``(B, L', C')`` -> ``(..., L, C)`` in ``dtype``."""
        length, channels = self.shape[-2:]
        return self._join([p[:, :length, :channels].reshape(self.shape) for p in parts], dtype)

    def merge_state(self, parts: Sequence[jax.Array], dtype=None) -> jax.Array:
        """Parts ``(B, 1, C')`` -> ``(..., C)`` in ``dtype`` (the parts' own when None)."""
        channels = self.shape[-1]
        shape = self.shape[:-2] + (channels,)
        return self._join([p[:, 0, :channels].reshape(shape) for p in parts], dtype)

    def _join(self, parts: Sequence[jax.Array], dtype=None) -> jax.Array:
        """One array from its parts; the real part alone when ``dtype`` is real (the cotangent
        of a real input of a complex recurrence)."""
        if self.is_complex and (dtype is None or jnp.issubdtype(dtype, jnp.complexfloating)):
            value = jax.lax.complex(*parts)
        else:
            value = parts[0]
        return value if dtype is None else value.astype(dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The resolved schedule, tiles and layout of one call."""

    schedule: str
    interpret: Any  # bool, or a pltpu.InterpretParams
    layout: _Layout
    acc: jnp.dtype
    block_channels: int
    block_length: int = 0
    group: int = 0
    streaming: StreamingOptions | None = None


def _plan(
    x_shape, dtypes, *, is_complex, schedule, block_length, block_channels, interpret
) -> _Plan:
    platform = _default_platform()
    interpret = platform == "cpu" if interpret is None else interpret
    gpu_interpret = not isinstance(interpret, bool) and _mosaic_gpu().is_interpret_params(interpret)
    tpu_interpret = not isinstance(interpret, bool) and not gpu_interpret
    if gpu_interpret and _streaming_defaults.backend != "mosaic_gpu":
        raise ValueError(
            "Mosaic GPU interpret mode runs the mosaic_gpu backend: trace inside "
            "streaming_options(backend='mosaic_gpu')"
        )
    streams = (platform == "gpu" or gpu_interpret) and not tpu_interpret
    schedule = schedule or ("streaming" if streams else "tiled")
    if tpu_interpret and schedule != "tiled":
        raise ValueError(
            "TPU interpret mode (interpret=pltpu.InterpretParams(...)) runs the TPU "
            f"schedule: use schedule='tiled', not {schedule!r}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if schedule == "tiled" and platform == "gpu" and not interpret:
        raise ValueError(
            "the tiled schedule carries state across grid steps, which Triton runs "
            "concurrently: use schedule='streaming' on GPU"
        )
    acc = jnp.promote_types(_real_dtype(jnp.result_type(*dtypes)), jnp.float32)
    part_dtypes = [_real_dtype(d) for d in dtypes]
    length, channels = x_shape[-2:]
    if schedule == "tiled":
        group = _group_rows(part_dtypes)
        block_length = block_length or min(_TILED_LENGTH, _round_up(length, group))
        if block_length % group:
            raise ValueError(
                f"block_length must be a multiple of {group} for these dtypes; got {block_length}"
            )
        block_channels = block_channels or min(_MAX_TILED_CHANNELS, _round_up(channels, _LANES))
        layout = _Layout(
            tuple(x_shape),
            is_complex,
            _round_up(length, block_length),
            _round_up(channels, block_channels),
        )
        return _Plan(
            schedule, interpret, layout, acc, block_channels, block_length=block_length, group=group
        )
    options = _streaming_defaults
    if options.backend == "triton" and not _triton_available():
        warnings.warn(
            "this JAX has no Pallas Triton back-end: the streaming kernels run on Mosaic GPU "
            "(streaming_options(backend='mosaic_gpu'))",
            stacklevel=4,
        )
        options = dataclasses.replace(options, backend="mosaic_gpu")
    if options.backend == "mosaic_gpu":
        return _mosaic_gpu_plan(x_shape, acc, is_complex, block_channels, interpret, options)
    block_channels = (
        block_channels
        or options.block_channels
        or min(_STREAMING_CHANNELS, pl.next_power_of_2(channels))
    )
    if not interpret and block_channels & (block_channels - 1):
        raise ValueError(f"block_channels must be a power of two on GPU; got {block_channels}")
    options = dataclasses.replace(options, block_channels=block_channels)
    layout = _Layout(tuple(x_shape), is_complex, length, _round_up(channels, block_channels))
    return _Plan(schedule, interpret, layout, acc, block_channels, streaming=options)


def _mosaic_gpu_plan(x_shape, acc, is_complex, block_channels, interpret, options) -> _Plan:
    """The streaming schedule on Mosaic GPU: 128 chains per program (128 channels, or 4 / 2
    batch rows of 32 / 64 channels), whole blocks of rows."""
    length, channels = x_shape[-2:]
    batch = math.prod(x_shape[:-2])
    chains = _mosaic_gpu().CHANNELS
    width = block_channels or options.block_channels
    if width is None:
        width = _mosaic_gpu().program_width(channels, batch)
    elif width not in (32, 64, chains) or batch % (chains // width):
        raise ValueError(
            f"the mosaic_gpu backend runs 32, 64 or 128 channels per program, with 4, 2 or 1 "
            f"batch rows to make 128 chains; got {width} channels for a batch of {batch}"
        )
    if acc != jnp.float32:
        raise ValueError(
            f"the mosaic_gpu backend accumulates in float32; {acc} inputs need backend='triton'"
        )
    if options.chain_in_kernel:
        raise ValueError(
            "chain_in_kernel is a Triton option; the mosaic_gpu backend has no chained kernels"
        )
    capability = None if interpret else getattr(jax.devices()[0], "compute_capability", None)
    if capability is not None and float(capability) < 9.0:
        raise ValueError(
            "the mosaic_gpu backend needs a GPU of compute capability 9.0 or more (H100/H200); "
            f"this one has {capability}: use backend='triton'"
        )
    if options.block_rows % 8 or options.block_rows <= 0:
        raise ValueError(f"block_rows must be a positive multiple of 8; got {options.block_rows}")
    layout = _Layout(
        tuple(x_shape),
        is_complex,
        _round_up(length, options.block_rows),
        _round_up(channels, width),
    )
    options = dataclasses.replace(options, block_channels=width)
    return _Plan("streaming", interpret, layout, acc, width, streaming=options)


def _check_inputs(a, x, h0, out_dtype):
    """Broadcast ``a``, fill ``h0``, and return ``(a, x, h0, dtype, out_dtype, is_complex)``."""
    a, x, dtype = check_inputs(a, x, h0)
    a = jnp.broadcast_to(a, x.shape)
    is_complex = jnp.issubdtype(dtype, jnp.complexfloating)
    out_dtype = resolve_out_dtype(dtype, out_dtype)
    if h0 is None:
        # Varies over shard_map's manual axes as x does, as dh0 will (like x's cotangent).
        h0 = jnp.zeros_like(x[..., 0, :], dtype=dtype)
    return a, x, jnp.asarray(h0), dtype, out_dtype, is_complex


def _forward(plan: _Plan, a, x, h0, reverse: bool, out_dtype) -> tuple[jax.Array, jax.Array]:
    layout, acc = plan.layout, plan.acc
    a_parts, x_parts = layout.split(a, fill=1.0), layout.split(x)  # pads: a = 1, x = 0
    h0_parts = layout.split_state(h0, acc)
    part_dtype = _real_dtype(out_dtype)
    if plan.schedule == "tiled":
        h_parts, last_parts = _tiled_call(
            a_parts,
            x_parts,
            h0_parts,
            reverse=reverse,
            block_length=plan.block_length,
            block_channels=plan.block_channels,
            group=plan.group,
            acc=acc,
            out_dtype=part_dtype,
            interpret=plan.interpret,
        )
    else:
        h_parts, last_parts = _streaming_forward(
            a_parts,
            x_parts,
            h0_parts,
            reverse=reverse,
            acc=acc,
            out_dtype=part_dtype,
            interpret=plan.interpret,
            options=plan.streaming,
        )
    return layout.merge(h_parts, out_dtype), layout.merge_state(last_parts)


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
    interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """All states and the final state of ``h_t = a_t * h_{t-1} + x_t``, by a Pallas kernel.

    Not differentiable by itself: :func:`pallas_linear_recurrence` (and
    ``linear_recurrence(method="pallas")``) add the backward kernel.

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
        must be a power of two). Further streaming options: :func:`streaming_options`.
      interpret: run the Pallas interpreter; by default exactly when the backend is CPU. A
        ``jax.experimental.pallas.tpu.InterpretParams`` runs the tiled (TPU) schedule in
        Pallas's TPU interpret mode: on CPU, with the TPU's memory spaces, the sequential time
        axis and uninitialised (NaN) buffers simulated, so the Mosaic schedule is checked
        beyond lowering.

    Returns:
      ``(h, last)``: the states ``(..., L, C)`` in ``out_dtype`` and the final state ``(..., C)``
      in the accumulation dtype (``h_{L-1}``, or ``h_0`` when ``reverse``).
    """
    a, x, h0, dtype, out_dtype, is_complex = _check_inputs(a, x, h0, out_dtype)
    plan = _plan(
        x.shape,
        [a.dtype, x.dtype],
        is_complex=is_complex,
        schedule=schedule,
        block_length=block_length,
        block_channels=block_channels,
        interpret=interpret,
    )
    return _forward(plan, a, x, h0, reverse, out_dtype)


def pallas_linear_recurrence(
    a: jax.Array,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    reverse: bool = False,
    out_dtype: jnp.dtype | None = None,
    schedule: Schedule | None = None,
    interpret: Any = None,
) -> jax.Array:
    """The states of :func:`pallas_recurrence`, differentiable: the ``method="pallas"`` body of
    :func:`hgrn_jax.ops.linear_recurrence`.

    Inputs are used in their own dtype (a bf16 ``a`` and ``x`` are read as bf16 and accumulated
    in float32 inside the kernel, with no conversion passes); the states are returned, and saved
    for the backward pass, in ``out_dtype``. The gradients ``(da, dx, dh0)`` come in the dtypes
    of ``a``, ``x`` and ``h0``. ``schedule`` and ``interpret`` as in :func:`pallas_recurrence`.
    """
    a, x, h0, dtype, out_dtype, is_complex = _check_inputs(a, x, h0, out_dtype)
    plan = _plan(
        x.shape,
        [a.dtype, x.dtype],
        is_complex=is_complex,
        schedule=schedule,
        block_length=None,
        block_channels=None,
        interpret=interpret,
    )
    return _differentiable(a, x, h0, reverse, out_dtype, plan)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _differentiable(a, x, h0, reverse, out_dtype, plan):
    return _forward(plan, a, x, h0, reverse, out_dtype)[0]


def _differentiable_fwd(a, x, h0, reverse, out_dtype, plan):
    h = _forward(plan, a, x, h0, reverse, out_dtype)[0]
    # x itself is not needed: an empty array of its dtype says what dx must be.
    return h, (a, jnp.zeros((0,), x.dtype), h, h0)


def _differentiable_bwd(reverse, out_dtype, plan, residuals, g):
    a, x_like, h, h0 = residuals
    x_dtype = x_like.dtype
    g = jnp.asarray(g, h.dtype)
    if plan.schedule == "tiled":
        acc = accumulation_dtype(jnp.result_type(plan.acc, a.dtype, h.dtype))

        def scan(a, x, h0, reverse):
            return _forward(plan, a, x, h0, reverse, acc)[0]

        da, dx, dh0 = shifted_backward(
            scan, a.astype(acc), h.astype(acc), h0.astype(acc), g.astype(acc), reverse
        )
        return _cotangent(da, a.dtype), _cotangent(dx, x_dtype), _cotangent(dh0, h0.dtype)
    layout, acc = plan.layout, plan.acc
    h_parts, h0_parts = layout.split(h), layout.split_state(h0, acc)
    length = h.shape[-2]
    if reverse and layout.padded_length > length:
        # The padded steps are identity steps run first, so their states are h0: the kernels
        # read the state after step L-1 from there.
        after_end = jnp.arange(layout.padded_length)[:, None] >= length
        h_parts = [jnp.where(after_end, s.astype(p.dtype), p) for p, s in zip(h_parts, h0_parts)]
    da, dx, dh0 = _streaming_backward(
        layout.split(a, fill=1.0),
        layout.split(g),
        h_parts,
        h0_parts,
        reverse=reverse,
        acc=acc,
        interpret=plan.interpret,
        options=plan.streaming,
        da_dtype=_real_dtype(a.dtype),
        dx_dtype=_real_dtype(x_dtype),
    )
    return layout.merge(da, a.dtype), layout.merge(dx, x_dtype), layout.merge_state(dh0, h0.dtype)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)

"""The streaming schedule of the Pallas recurrence (GPU through Triton, or Mosaic GPU): its
options (:class:`StreamingOptions`, :func:`streaming_options`), its kernels and the forward and
backward passes built on them (:func:`streaming_forward`, :func:`streaming_backward`), behind
:func:`hgrn_jax.ops.pallas_recurrence.pallas_linear_recurrence`.

Grid ``(batch, channel tiles, time chunks)``; each program walks its chunk of the time axis
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

The backward pass is one fused kernel of the same shape: walking time the other way it reads
``a``, the cotangent and the saved states and writes ``da`` and ``dx`` (5 array passes, the
minimum), chunked the same way.

Arrays are ``(B, L, C)`` real parts (two per complex array) with ``C`` a multiple of
``block_channels`` (and ``L`` of ``block_rows`` on Mosaic GPU), as the calling layout pads
them; per-chunk arrays are ``(B, chunks, C)`` and states ``(B, 1, C)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hgrn_jax.ops.common import Parts, chain_chunk_parts, parts_add, parts_mul
from hgrn_jax.ops.pallas_common import round_up, split_refs


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
            chunk = min(length, round_up(chunk, multiple))
        if self.backend == "mosaic_gpu":  # whole blocks (the length is padded to them)
            chunk = min(round_up(length, multiple), round_up(chunk, multiple))
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


def active_streaming_options() -> StreamingOptions:
    """The options in force: the defaults with the overrides of the enclosing
    :func:`streaming_options` blocks."""
    return _streaming_defaults


def mosaic_gpu_backend():
    """:mod:`hgrn_jax.ops.mosaic_gpu_recurrence`, imported on first use: Mosaic GPU's Python
    modules add about a quarter to ``import hgrn_jax.ops``."""
    from hgrn_jax.ops import mosaic_gpu_recurrence

    return mosaic_gpu_recurrence


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
    a_refs, x_refs, last_refs, decay_refs = split_refs(refs, parts, 4)
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
        a_refs, x_refs, init_refs, finals_refs, decays_refs, h_refs, last_refs = split_refs(
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
        a_refs, x_refs, init_refs, h_refs, last_refs = split_refs(refs, parts, 5)
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
    a_refs, g_refs, flow_refs, decay_refs = split_refs(refs, parts, 4)
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
        ) = split_refs(refs, parts, 9)
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
        a_refs, g_refs, h_refs, h0_refs, flow_in_refs, da_refs, dx_refs, flow_out_refs = split_refs(
            refs, parts, 8
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
        return mosaic_gpu_backend().call(
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


def _chunked_call(rows: int, length: int, reverse, acc, interpret, options: StreamingOptions):
    """``(call, num_chunks)``: :func:`_streaming_call` bound to the time chunking that
    ``options`` choose for ``rows`` (B x C) sequences of ``length`` steps."""
    chunk_length, num_chunks = options.chunking(rows, length)
    call = functools.partial(
        _streaming_call,
        reverse=reverse,
        chunk_length=chunk_length,
        num_chunks=num_chunks,
        options=options,
        acc=acc,
        interpret=interpret,
    )
    return call, num_chunks


def streaming_forward(
    a_parts, x_parts, h0_parts, *, reverse, acc, out_dtype, interpret, options: StreamingOptions
):
    """States (B, L, C) parts and final state (B, 1, C) parts; C a multiple of the block."""
    batch, length, channels = x_parts[0].shape
    call, num_chunks = _chunked_call(batch * channels, length, reverse, acc, interpret, options)
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


def streaming_backward(
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
    """``(da, dx, dh0)`` parts of
    :func:`hgrn_jax.ops.pallas_recurrence.pallas_linear_recurrence` (channels padded)."""
    batch, length, channels = g_parts[0].shape
    call, num_chunks = _chunked_call(batch * channels, length, reverse, acc, interpret, options)
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

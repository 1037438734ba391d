"""The streaming schedule's kernels on Mosaic GPU, Pallas's ``plgpu`` back-end for Hopper GPUs.

The same four kernels as :mod:`hgrn_jax.ops.pallas_streaming`'s Triton ones (chunk summaries
and states, forward and backward), with the same grid ``(batch, channel tiles, time chunks)``
and the same arithmetic, but the time axis moved by the TMA engine: each program (one
warpgroup, a chain per CUDA lane: 128 channels of one batch row, or 64 of 2, or 32 of 4,
:func:`program_width`) streams its chunk through shared memory in
blocks of ``block_rows`` steps, ``stages`` blocks in flight, and writes its states back from
shared memory by asynchronous copies. The serial chain of each channel then waits on shared
memory, never on global memory, whatever the order of its loads and stores (the Triton
kernel's ``loads_ahead`` problem does not arise), and many more bytes are in flight per
program than one row per step.

Why a second back-end: JAX 0.11 deprecates Pallas's Triton back-end, which the default GPU
kernel is written for. Select this one with ``streaming_options(backend="mosaic_gpu")``. It
is checked on CPU in Mosaic GPU's interpret mode (JAX >= 0.11: ``make test-mosaic-gpu``, in
CI) and lowered for an H200 in every CI run; it has not been timed on a GPU yet, so ``auto``
does not pick it.

Barriers: every lane reads and writes only its own chains' elements of the shared-memory
blocks (one element per lane per row, ``_strided``), so no two threads touch the same bytes and
the kernels run without Mosaic GPU's automatic barrier before and after each shared-memory store
(``plgpu.CompilerParams(unsafe_no_auto_barriers=True)``; otherwise 3 ``bar.sync`` per time
step forward and 5.6 backward). The only cross-thread orders are with the TMA engine, and each
has its barrier: ``commit_smem`` (a proxy fence, then a warpgroup barrier) before a block is
copied out and before a slot that was read is refilled, ``wait_smem_to_gmem`` (a wait, then a
warpgroup barrier) before a slot that was copied out is written again, and the slot's mbarrier
before it is read. ``StreamingOptions.auto_barriers`` puts Mosaic GPU's back, to compare.

Arrays are ``(B, L, C)`` real parts (two per complex array) with ``L`` a multiple of
``block_rows`` and ``C`` of the program's width, as the calling layout pads them; per-chunk arrays are
``(B, chunks, C)`` and states ``(B, 1, C)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hgrn_jax.ops.common import Parts, parts_add, parts_mul

CHANNELS = 128  # chains per program: one per CUDA lane of the warpgroup that runs it
SHARED_MEMORY_BYTES = 227 * 1024  # what one program may use on an H100/H200 (sm_90)
_GROUP = 8  # rows whose loads are issued before their serial steps


def interpret_params(interpret: object) -> object:
    """What ``plgpu.kernel`` takes for ``interpret``: ``None`` on a GPU, Mosaic GPU's interpret
    mode for ``True`` (JAX >= 0.11), or the caller's own ``plgpu.InterpretGPUParams``."""
    if interpret is False or interpret is None:
        return None
    if interpret is True:
        params = getattr(plgpu, "InterpretGPUParams", None)
        if params is None:
            raise ValueError(
                "the mosaic_gpu back-end runs off a GPU only in Mosaic GPU's interpret mode, "
                f"which needs jax >= 0.11 (this is jax {jax.__version__}): run it on an "
                "H100/H200, or use backend='triton' in streaming_options"
            )
        return params()
    return interpret


def is_interpret_params(interpret: object) -> bool:
    """Whether ``interpret`` asks for Mosaic GPU's interpret mode (a ``plgpu.InterpretGPUParams``,
    which JAX >= 0.11 has)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    return params is not None and isinstance(interpret, params)


def program_width(channels: int, batch: int) -> int:
    """Channels per program: 128, or 32 / 64 when the channels fit in them and the batch rows
    come in groups of 4 / 2 to fill the program's 128 lanes (a program then carries those
    rows' channels side by side, so few channels are not padded up to 128)."""
    width = min(CHANNELS, max(32, 1 << max(channels - 1, 0).bit_length()))
    while batch % (CHANNELS // width):
        width *= 2
    return width


def _strided(value: jax.Array) -> jax.Array:
    """A state ``(batch rows, width)`` in the layout its rows loaded from shared memory have
    (one element per lane)."""
    return plgpu.layout_cast(value, plgpu.Layout.WG_STRIDED(value.shape, vec_size=1))


def _constant(value: float, parts: int, acc, shape) -> Parts:
    """``value`` as a real (1 part) or complex (2 parts) state; the imaginary part is 0."""
    return tuple(_strided(jnp.full(shape, value if k == 0 else 0.0, acc)) for k in range(parts))


class _Program:
    """One program's place in the grid and its chunk of the time axis."""

    def __init__(self, *, length: int, chunk_length: int, block_rows: int, width: int):
        batch_rows = CHANNELS // width
        self.shape = (batch_rows, width)  # one state: its chains, one per lane
        self.rows = pl.ds(jax.lax.axis_index("batch") * batch_rows, batch_rows)
        self.chunk = jax.lax.axis_index("chunks")
        self.columns = pl.ds(jax.lax.axis_index("channels") * width, width)
        self.block_rows = block_rows
        self.first_block = self.chunk * (chunk_length // block_rows)
        if length % chunk_length == 0:
            self.num_blocks = chunk_length // block_rows
        else:  # the last chunk is shorter (still whole blocks: length is padded to them)
            rows = jnp.minimum(chunk_length, length - self.chunk * chunk_length)
            self.num_blocks = rows // block_rows

    def block(self, ref, start):
        """The ``(batch rows, block_rows, width)`` window of ``ref`` ``(B, L, C)`` from time
        ``start``."""
        return ref.at[self.rows, pl.ds(start, self.block_rows), self.columns]

    def row(self, ref, index):
        """The ``(batch rows, 1, width)`` window of a per-chunk or state array ``(B, n, C)``."""
        return ref.at[self.rows, pl.ds(index, 1), self.columns]

    def read_rows(self, refs, buffers, barrier, index, acc) -> Parts:
        """Row ``index`` of each part in ``refs``, through ``buffers`` ``(batch rows, 1,
        width)``."""
        plgpu.commit_smem()  # earlier reads of the buffers before the copy overwrites them
        for ref, buffer in zip(refs, buffers):
            plgpu.copy_gmem_to_smem(self.row(ref, index), buffer, barrier)
        plgpu.barrier_wait(barrier)
        return tuple(buffer[:, 0, :].astype(acc) for buffer in buffers)

    def write_rows(self, values: Parts, refs, buffers, index) -> None:
        """``values`` into row ``index`` of ``refs``, through ``buffers`` ``(batch rows, 1,
        width)``."""
        for value, buffer in zip(values, buffers):
            buffer[:, 0, :] = value.astype(buffer.dtype)
        plgpu.commit_smem()
        for ref, buffer in zip(refs, buffers):
            plgpu.copy_smem_to_gmem(buffer, self.row(ref, index))

    def walk(
        self,
        block_fn: Callable,
        carry,
        *,
        reverse: bool,
        stages: int,
        sources: Sequence,
        source_buffers: Sequence,
        sinks: Sequence = (),
        sink_buffers: Sequence = (),
        loaded,
        fetch_extra: Callable | None = None,
    ):
        """``carry = block_fn(slot, start, carry)`` over the chunk's blocks in time order (or
        reversed), with ``stages`` blocks of every ``sources`` array in flight in
        ``source_buffers`` ``(stages, batch rows, block_rows, width)``; each block's ``sink_buffers`` are
        copied out to ``sinks`` after it. ``loaded``: one barrier per stage, arriving once per
        source copy (and per copy ``fetch_extra(slot, start, barrier)`` issues)."""

        def start(j):
            block = self.num_blocks - 1 - j if reverse else j
            return (self.first_block + block) * self.block_rows

        def fetch(j):
            slot = j % stages
            for ref, buffer in zip(sources, source_buffers):
                plgpu.copy_gmem_to_smem(self.block(ref, start(j)), buffer.at[slot], loaded.at[slot])
            if fetch_extra is not None:
                fetch_extra(slot, start(j), loaded.at[slot])

        for j in range(stages):
            pl.when(j < self.num_blocks)(functools.partial(fetch, j))

        def body(j, carry):
            slot = j % stages
            plgpu.barrier_wait(loaded.at[slot])
            if sinks:  # this slot's previous copy-out must have read its buffers
                plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
            carry = block_fn(slot, start(j), carry)
            plgpu.commit_smem()  # the block's writes visible to, its reads ordered before, TMA
            for n, (ref, buffer) in enumerate(zip(sinks, sink_buffers)):
                plgpu.copy_smem_to_gmem(
                    buffer.at[slot], self.block(ref, start(j)), commit_group=n == len(sinks) - 1
                )
            pl.when(j + stages < self.num_blocks)(functools.partial(fetch, j + stages))
            return carry

        return jax.lax.fori_loop(0, self.num_blocks, body, carry)


def _rows_in_groups(block_rows: int, reverse: bool) -> list[list[int]]:
    """A block's rows in walk order, in groups of up to 8."""
    rows = list(range(block_rows))[::-1] if reverse else list(range(block_rows))
    return [rows[i : i + _GROUP] for i in range(0, block_rows, _GROUP)]


def _tile_rows(buffers, slot, rows, acc) -> list[Parts]:
    """Time rows ``rows`` of one stage of each part's buffer, in ``acc``."""
    return [tuple(buffer[slot, :, r, :].astype(acc) for buffer in buffers) for r in rows]


def _summary_body(refs, *, parts, reverse, backward, program, stages, acc):
    """Per chunk, from a zero start: the forward's final state and decay product, or (walking
    against the recurrence) the backward's flowing gradient and decay product."""
    n = parts
    a_refs, y_refs = refs[:n], refs[n : 2 * n]
    finals_refs, decays_refs = refs[2 * n : 3 * n], refs[3 * n : 4 * n]
    a_bufs, y_bufs = refs[4 * n : 5 * n], refs[5 * n : 6 * n]
    row_bufs, loaded = refs[6 * n : 7 * n], refs[7 * n]
    walk_reverse = reverse != backward

    def block_fn(slot, start, carry):
        for rows in _rows_in_groups(program.block_rows, walk_reverse):
            for a, y in zip(
                _tile_rows(a_bufs, slot, rows, acc), _tile_rows(y_bufs, slot, rows, acc)
            ):
                h, decay = carry
                h = parts_mul(a, parts_add(y, h)) if backward else parts_add(parts_mul(a, h), y)
                carry = h, parts_mul(a, decay)
        return carry

    zero, one = (_constant(v, parts, acc, program.shape) for v in (0.0, 1.0))
    h, decay = program.walk(
        block_fn,
        (zero, one),
        reverse=walk_reverse,
        stages=stages,
        sources=[*a_refs, *y_refs],
        source_buffers=[*a_bufs, *y_bufs],
        loaded=loaded,
    )
    program.write_rows(h, finals_refs, row_bufs, program.chunk)
    plgpu.wait_smem_to_gmem(0)
    program.write_rows(decay, decays_refs, row_bufs, program.chunk)
    plgpu.wait_smem_to_gmem(0)


def _forward_body(refs, *, parts, reverse, program, stages, acc):
    """Per chunk, from the carry entering it: every state, and the chunk's final state."""
    n = parts
    a_refs, x_refs, init_refs = refs[:n], refs[n : 2 * n], refs[2 * n : 3 * n]
    h_refs, last_refs = refs[3 * n : 4 * n], refs[4 * n : 5 * n]
    a_bufs, x_bufs, h_bufs = refs[5 * n : 6 * n], refs[6 * n : 7 * n], refs[7 * n : 8 * n]
    row_bufs, loaded, row_loaded = refs[8 * n : 9 * n], refs[9 * n], refs[9 * n + 1]

    def block_fn(slot, start, h):
        for rows in _rows_in_groups(program.block_rows, reverse):
            loads = zip(_tile_rows(a_bufs, slot, rows, acc), _tile_rows(x_bufs, slot, rows, acc))
            for r, (a, x) in zip(rows, loads):
                h = parts_add(parts_mul(a, h), x)
                for buffer, value in zip(h_bufs, h):
                    buffer[slot, :, r, :] = value.astype(buffer.dtype)
        return h

    # One carry row per chunk (the initial state when there is one chunk).
    h = program.read_rows(init_refs, row_bufs, row_loaded, program.chunk, acc)
    h = program.walk(
        block_fn,
        tuple(_strided(v) for v in h),
        reverse=reverse,
        stages=stages,
        sources=[*a_refs, *x_refs],
        source_buffers=[*a_bufs, *x_bufs],
        sinks=h_refs,
        sink_buffers=h_bufs,
        loaded=loaded,
    )
    plgpu.wait_smem_to_gmem(0)
    program.write_rows(h, last_refs, row_bufs, program.chunk)
    plgpu.wait_smem_to_gmem(0)


def _backward_body(refs, *, parts, reverse, program, stages, acc, length):
    """Per chunk, from the gradient flowing in: ``dx_t = d_t``, ``da_t = d_t * h_{t-1}`` and the
    gradient flowing out. ``h_{t-1}`` (``h_{t+1}`` when ``reverse``) is the state row before
    each row in the same block, or, for a block's edge row, a neighbour row fetched with the
    block (``h0`` at the sequence's edge)."""
    n = parts
    a_refs, g_refs, h_refs, h0_refs, flow_in_refs = (refs[k * n : (k + 1) * n] for k in range(5))
    da_refs, dx_refs, flow_out_refs = (refs[k * n : (k + 1) * n] for k in range(5, 8))
    a_bufs, g_bufs, h_bufs, da_bufs, dx_bufs, edge_bufs, row_bufs = (
        refs[k * n : (k + 1) * n] for k in range(8, 15)
    )
    loaded, row_loaded = refs[15 * n], refs[15 * n + 1]
    block_rows = program.block_rows
    step = 1 if reverse else -1  # where h_prev is, relative to t
    edge_start = length - block_rows if reverse else 0  # the block whose neighbour is h0

    def fetch_neighbour(slot, start, barrier):
        neighbour = start + block_rows if reverse else start - 1
        neighbour = jnp.clip(neighbour, 0, length - 1)
        for ref, buffer in zip(h_refs, edge_bufs):
            plgpu.copy_gmem_to_smem(program.row(ref, neighbour), buffer.at[slot], barrier)

    h0 = program.read_rows(h0_refs, row_bufs, row_loaded, 0, acc)

    def block_fn(slot, start, flow):
        @pl.when(start == edge_start)
        def _h0_at_the_edge():
            for buffer, value in zip(edge_bufs, h0):
                buffer[slot, :, 0, :] = value.astype(buffer.dtype)

        for rows in _rows_in_groups(block_rows, not reverse):
            a_rows = _tile_rows(a_bufs, slot, rows, acc)
            g_rows = _tile_rows(g_bufs, slot, rows, acc)
            prev_rows = []
            for r in rows:
                p = r + step
                if 0 <= p < block_rows:
                    prev_rows.append(tuple(b[slot, :, p, :].astype(acc) for b in h_bufs))
                else:
                    prev_rows.append(tuple(b[slot, :, 0, :].astype(acc) for b in edge_bufs))
            for r, a, g, h_prev in zip(rows, a_rows, g_rows, prev_rows):
                d = parts_add(g, flow)
                for buffer, value in zip(dx_bufs, d):
                    buffer[slot, :, r, :] = value.astype(buffer.dtype)
                for buffer, value in zip(da_bufs, parts_mul(d, h_prev)):
                    buffer[slot, :, r, :] = value.astype(buffer.dtype)
                flow = parts_mul(a, d)
        return flow

    flow = program.read_rows(flow_in_refs, row_bufs, row_loaded, program.chunk, acc)
    flow = program.walk(
        block_fn,
        tuple(_strided(v) for v in flow),
        reverse=not reverse,
        stages=stages,
        sources=[*a_refs, *g_refs, *h_refs],
        source_buffers=[*a_bufs, *g_bufs, *h_bufs],
        sinks=[*da_refs, *dx_refs],
        sink_buffers=[*da_bufs, *dx_bufs],
        loaded=loaded,
        fetch_extra=fetch_neighbour,
    )
    plgpu.wait_smem_to_gmem(0)
    program.write_rows(flow, flow_out_refs, row_bufs, program.chunk)
    plgpu.wait_smem_to_gmem(0)


def call(
    name: str,
    inputs: Sequence[Sequence[jax.Array]],
    out_dtypes: Sequence,
    *,
    reverse: bool,
    chunk_length: int,
    num_chunks: int,
    block_rows: int,
    stages: int,
    width: int,
    acc,
    interpret,
    auto_barriers: bool = False,
) -> list[list[jax.Array]]:
    """Run one of the streaming schedule's kernels (``forward_summary``, ``forward``,
    ``backward_summary``, ``backward``) on Mosaic GPU; the arguments and results are those of
    ``pallas_streaming._streaming_call``: one list of parts per array. Each program carries
    ``128 // width`` batch rows of ``width`` channels (:func:`program_width`).
    ``auto_barriers``: Mosaic GPU's barriers around every shared-memory store, which the
    kernels do not need (the module docstring says why)."""
    parts = len(inputs[0])
    like = inputs[0][0]
    batch, length, channels = like.shape
    batch_rows = CHANNELS // width
    if (
        length % block_rows
        or chunk_length % block_rows
        or width not in (32, 64, CHANNELS)
        or channels % width
        or batch % batch_rows
    ):
        raise ValueError(
            f"the mosaic_gpu kernels need the length ({length}) and chunk length "
            f"({chunk_length}) in whole blocks of {block_rows} rows, a width of 32, 64 or 128 "
            f"channels (got {width}) that divides the channels ({channels}), and the batch "
            f"({batch}) in whole groups of {batch_rows} rows"
        )
    chunk_shape, column_shape = (batch, num_chunks, channels), (batch, length, channels)
    block = (stages, batch_rows, block_rows, width)

    def smem(shape, dtype):
        return [plgpu.SMEM(shape, dtype) for _ in range(parts)]

    in_dtypes = [array[0].dtype for array in inputs]
    row = smem((batch_rows, 1, width), acc)
    if name in ("forward_summary", "backward_summary"):
        out_shapes = [(chunk_shape, acc)] * 2
        scratch = [
            *smem(block, in_dtypes[0]),
            *smem(block, in_dtypes[1]),
            *row,
            plgpu.Barrier(num_arrivals=2 * parts, num_barriers=stages),
        ]
        body = functools.partial(_summary_body, backward=name == "backward_summary")
    elif name == "forward":
        out_shapes = [(column_shape, out_dtypes[0]), (chunk_shape, acc)]
        scratch = [
            *smem(block, in_dtypes[0]),
            *smem(block, in_dtypes[1]),
            *smem(block, out_dtypes[0]),
            *row,
            plgpu.Barrier(num_arrivals=2 * parts, num_barriers=stages),
            plgpu.Barrier(num_arrivals=parts, num_barriers=1),
        ]
        body = _forward_body
    elif name == "backward":
        out_shapes = [(column_shape, out_dtypes[0]), (column_shape, out_dtypes[1])]
        out_shapes.append((chunk_shape, acc))
        scratch = [
            *smem(block, in_dtypes[0]),
            *smem(block, in_dtypes[1]),
            *smem(block, in_dtypes[2]),
            *smem(block, out_dtypes[0]),
            *smem(block, out_dtypes[1]),
            *smem((stages, batch_rows, 1, width), in_dtypes[2]),
            *row,
            plgpu.Barrier(num_arrivals=4 * parts, num_barriers=stages),
            plgpu.Barrier(num_arrivals=parts, num_barriers=1),
        ]
        body = functools.partial(_backward_body, length=length)
    else:
        raise ValueError(f"no mosaic_gpu kernel {name!r} (the chained kernels are Triton's only)")

    shared = sum(
        math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in scratch if hasattr(b, "shape")
    )
    if shared > SHARED_MEMORY_BYTES:
        raise ValueError(
            f"the mosaic_gpu {name} kernel would use {shared // 1024} KiB of shared memory with "
            f"block_rows={block_rows}, stages={stages} and {parts} part(s) per array, over the "
            f"{SHARED_MEMORY_BYTES // 1024} KiB of an H100/H200: lower block_rows or stages"
        )

    def kernel(*refs):
        program = _Program(
            length=length, chunk_length=chunk_length, block_rows=block_rows, width=width
        )
        body(refs, parts=parts, reverse=reverse, program=program, stages=stages, acc=acc)

    out_type = [
        jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_shapes for _ in range(parts)
    ]
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(batch // batch_rows, channels // width, num_chunks),
        grid_names=("batch", "channels", "chunks"),
        kernel_name=f"hgrn_{name}",
        compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=not auto_barriers),
        interpret=interpret_params(interpret),
    )(*[p for array in inputs for p in array])
    # Under shard_map the results vary over the manual axes the inputs vary over (plgpu.kernel
    # leaves them invariant), as the custom VJP's cotangents must.
    varying = tuple(sorted(jax.typeof(like).manual_axis_type.varying))
    if varying:
        out = [jax.lax.pcast(o, varying, to="varying") for o in out]
    return [list(out[k * parts : (k + 1) * parts]) for k in range(len(out_shapes))]

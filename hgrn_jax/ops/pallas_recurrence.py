"""Pallas kernels for the linear recurrence ``h_t = a_t * h_{t-1} + x_t``: the entry points
(:func:`pallas_recurrence`; :func:`pallas_linear_recurrence` with its custom VJP) and the plan
of one call (its schedule, tiles, and the layout that turns ``(..., L, C)`` arrays into the
kernels' ``(B, L', C')`` real parts and back).

Every element of ``a`` and ``x`` is read once (twice when the GPU schedule below splits time
into chunks) and every state written once, the time axis is walked sequentially inside the
kernel while batch rows and channel tiles run in parallel, and states are accumulated in
float32 (float64 for float64 inputs) whatever the input dtype. Complex recurrences are carried
as (real, imaginary) pairs of real arrays.

Two schedules of the same arithmetic, picked by platform, each in its own module:

``"tiled"`` (TPU through Mosaic; CPU through the Pallas interpreter)
    :mod:`hgrn_jax.ops.pallas_tiled`: grid ``(batch, channel tiles, time blocks)`` with time
    the innermost, sequential grid axis; the carry stays in the resident last-state block
    across the time blocks.

``"streaming"`` (GPU through Triton, or Mosaic GPU)
    :mod:`hgrn_jax.ops.pallas_streaming`: grid ``(batch, channel tiles, time chunks)``; each
    program walks its chunk with its carry in registers, and when ``batch * channels`` alone
    cannot keep the GPU busy, time is split into chunks whose carries are chained on their
    summaries between two passes. Its options, :class:`StreamingOptions` and
    :func:`streaming_options`, are importable from here too.

The backward pass (:func:`pallas_linear_recurrence`'s custom VJP) on the streaming schedule is one
fused kernel of the same shape: walking time the other way it reads ``a``, the cotangent and the
saved states and writes ``da`` and ``dx`` (5 array passes, the minimum), chunked the same way.
The tiled schedule's backward is the generic one of :mod:`hgrn_jax.ops.recurrence` (a reverse
run of the forward kernel on shifted decays).
"""

from __future__ import annotations

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
    accumulation_dtype,
    check_inputs,
    resolve_out_dtype,
    shifted_backward,
)
from hgrn_jax.ops.pallas_common import round_up
from hgrn_jax.ops.pallas_streaming import (
    StreamingOptions,
    active_streaming_options,
    mosaic_gpu_backend,
    streaming_backward,
    streaming_forward,
    streaming_options,
)
from hgrn_jax.ops.pallas_tiled import tiled_call

__all__ = [
    "SCHEDULES",
    "Schedule",
    "StreamingOptions",
    "pallas_linear_recurrence",
    "pallas_recurrence",
    "streaming_options",
]

Schedule = Literal["tiled", "streaming"]
SCHEDULES: tuple[str, ...] = ("tiled", "streaming")

_MAX_TILED_CHANNELS = 512
_TILED_LENGTH = 256
_STREAMING_CHANNELS = 32
_LANES = 128


def _real_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for complex64, float64 for complex128, the dtype itself when real."""
    return (
        jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.dtype(dtype)
    )


def _group_rows(dtypes: Sequence[jnp.dtype]) -> int:
    """Rows in one aligned register tile: 8 for 32-bit, 16 for 16-bit inputs."""
    return max(8, 32 // min(jnp.dtype(d).itemsize for d in dtypes))


def _triton_available() -> bool:
    """Whether this JAX still has Pallas's Triton back-end (deprecated since JAX 0.11)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _default_platform() -> str:
    return jax.default_backend()


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
    gpu_interpret = not isinstance(interpret, bool) and mosaic_gpu_backend().is_interpret_params(
        interpret
    )
    tpu_interpret = not isinstance(interpret, bool) and not gpu_interpret
    if gpu_interpret and active_streaming_options().backend != "mosaic_gpu":
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
        block_length = block_length or min(_TILED_LENGTH, round_up(length, group))
        if block_length % group:
            raise ValueError(
                f"block_length must be a multiple of {group} for these dtypes; got {block_length}"
            )
        block_channels = block_channels or min(_MAX_TILED_CHANNELS, round_up(channels, _LANES))
        layout = _Layout(
            tuple(x_shape),
            is_complex,
            round_up(length, block_length),
            round_up(channels, block_channels),
        )
        return _Plan(
            schedule, interpret, layout, acc, block_channels, block_length=block_length, group=group
        )
    options = active_streaming_options()
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
    layout = _Layout(tuple(x_shape), is_complex, length, round_up(channels, block_channels))
    return _Plan(schedule, interpret, layout, acc, block_channels, streaming=options)


def _mosaic_gpu_plan(x_shape, acc, is_complex, block_channels, interpret, options) -> _Plan:
    """The streaming schedule on Mosaic GPU: 128 chains per program (128 channels, or 4 / 2
    batch rows of 32 / 64 channels), whole blocks of rows."""
    length, channels = x_shape[-2:]
    batch = math.prod(x_shape[:-2])
    chains = mosaic_gpu_backend().CHANNELS
    width = block_channels or options.block_channels
    if width is None:
        width = mosaic_gpu_backend().program_width(channels, batch)
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
        round_up(length, options.block_rows),
        round_up(channels, width),
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
        h_parts, last_parts = tiled_call(
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
        h_parts, last_parts = streaming_forward(
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
    da, dx, dh0 = streaming_backward(
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

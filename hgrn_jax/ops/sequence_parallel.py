"""The linear recurrence over a time axis sharded across devices (sequence parallelism).

With the time axis split into ``n`` contiguous shards, shard ``k`` holds ``a`` and ``x`` for its
own steps. The recurrence is affine in its initial state, so over one shard it is the map
``h -> D_k * h + S_k`` with ``D_k`` the product of the shard's decays and ``S_k`` its final state
from a zero start. Three steps:

1. every shard scans locally from zero and reduces its decays: ``(D_k, S_k)``, each (..., C);
2. the small pairs are all-gathered and every shard runs the same ``n``-step scan over them to
   find the state entering each shard (``carry_k``) and the final state;
3. each shard rescans its steps from ``carry_k``. That is the correction
   ``h_local + cumprod(a)_local * carry_k`` computed in one fused pass instead of two, without
   storing the cumulative decays.

Communication is one all-gather of ``2 * n`` states per device; the work per device is two scans
of its ``L / n`` steps (one and a correction for the matrix recurrence, below). Gradients flow
through :func:`linear_recurrence`'s custom VJP and the transpose of the all-gather (a
reduce-scatter).

:func:`sharded_matrix_recurrence` does the same for HGRN2's matrix state
(:func:`~hgrn_jax.ops.matrix_recurrence`): over one shard ``S -> diag(D_k) S + S_k`` with
``D_k = exp(sum of the shard's log decays)`` acting on the key axis, so the pairs are
``(D_k, S_k)`` of shapes (..., H, K) and (..., H, K, V), and the carries come from the same chain.
Its step 3 is the correction, not a second scan: with ``G_t`` the shard's log decays summed up
to step ``t`` (a cumulative sum), the states from ``carry_k`` are
``S_local_t + diag(exp(G_t)) carry_k``, so the outputs are the local scan's plus
``scale * (q_t * exp(G_t)) . carry_k``, one einsum of ``L / n * H * K * V`` multiply-adds per
batch row (as many as the scan's own readouts). The local scan's outputs and final state come
from the one scan of step 1; gradients flow through its custom VJP and the einsum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hgrn_jax.ops.common import (
    accumulation_dtype,
    chain_carries,
    check_inputs,
    last_state_dtype,
    matrix_inputs_dtype,
    resolve_out_dtype,
    state_shape,
)
from hgrn_jax.ops.matrix_recurrence import DEFAULT_CHUNK_SIZE, _check_shapes, matrix_recurrence
from hgrn_jax.ops.recurrence import linear_recurrence


def _resolve_mesh(mesh, axis_name: str):
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis_name not in mesh.axis_names:
        names = () if mesh is None or mesh.empty else tuple(mesh.axis_names)
        raise ValueError(
            f"sequence parallelism over mesh axis {axis_name!r} needs a mesh with that axis; "
            f"the mesh in use has axes {names}: pass mesh=... or call inside "
            "`with jax.set_mesh(mesh):`"
        )
    return mesh


def _explicit_axes(mesh) -> set[str]:
    return {
        n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Explicit
    }


def _without_axis(entry, axis_name: str):
    """One entry of a partition spec without mesh axis ``axis_name`` (a tuple of axes keeps its
    others: ``("data", "seq")`` -> ``"data"``)."""
    if isinstance(entry, tuple) and axis_name in entry:
        rest = tuple(name for name in entry if name != axis_name)
        return rest[0] if len(rest) == 1 else (rest or None)
    return None if entry == axis_name else entry


def _spec(x: jax.Array) -> list:
    """``x``'s partition spec (its Explicit axes), one entry per axis."""
    return (list(jax.typeof(x).sharding.spec) + [None] * x.ndim)[: x.ndim]


def _time_sharded_spec(x: jax.Array, axis_name: str, time_axis: int = -2) -> tuple[list, bool]:
    """``x``'s partition spec (its Explicit axes) with the time axis on ``axis_name``, and
    whether another of ``x``'s axes was sharded over ``axis_name`` (a batch over
    ``("data", axis_name)``): it is taken off them, as one mesh axis shards one array axis."""
    spec = _spec(x)
    time_axis %= x.ndim
    moved = [_without_axis(s, axis_name) if i != time_axis else s for i, s in enumerate(spec)]
    elsewhere = moved != spec
    moved[time_axis] = axis_name
    return moved, elsewhere


def _resharder(mesh):
    """``reshard(t, spec)`` on ``mesh``: a ``NamedSharding`` on a concrete mesh passed as
    ``mesh=`` (a bare spec needs ``jax.set_mesh``), the spec itself on the abstract mesh in use."""
    if isinstance(mesh, jax.sharding.Mesh):
        return lambda t, spec: jax.sharding.reshard(t, NamedSharding(mesh, spec))
    return jax.sharding.reshard


def mesh_axis_size(axis_name: str) -> int:
    """The size of mesh axis ``axis_name`` in the mesh set by ``jax.set_mesh`` (1 without a
    mesh or without that axis): how many shards a sequence split over it has."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(axis_name, 1)


def pad_time(arrays: tuple[jax.Array, ...], values: tuple[float, ...], shards: int, time_axis: int):
    """``arrays`` padded at the end of ``time_axis`` to a multiple of ``shards`` steps, each with
    its ``values`` (a recurrence's identity step: decay 1 or log decay 0, input 0)."""
    pad = -arrays[0].shape[time_axis] % shards
    if not pad:
        return arrays

    def padded(t: jax.Array, value: float) -> jax.Array:
        widths = [(0, 0)] * t.ndim
        widths[time_axis] = (0, pad)
        return jnp.pad(t, widths, constant_values=value)

    return tuple(padded(t, value) for t, value in zip(arrays, values, strict=True))


def cut_time(y: jax.Array, length: int, axis_name: str, time_axis: int) -> jax.Array:
    """The first ``length`` steps of ``y`` along ``time_axis``, split over mesh axis
    ``axis_name`` (the padding :func:`pad_time` added cut off). An Explicit axis shards the
    padded time axis, so it is gathered first."""
    if y.shape[time_axis] == length:
        return y
    if axis_name in _explicit_axes(jax.sharding.get_abstract_mesh()):
        spec = (list(jax.typeof(y).sharding.spec) + [None] * y.ndim)[: y.ndim]
        spec[time_axis] = None
        y = jax.sharding.reshard(y, P(*spec))
    return jax.lax.slice_in_dim(y, 0, length, axis=time_axis % y.ndim)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _chain_carries_recomputed(decays, finals, h0, reverse):
    """:func:`chain_carries`, recomputed in the backward pass from its inputs (``2 n`` small
    states) instead of saving its intermediates. ``lax.associative_scan`` over a few shards slices
    arrays of zero elements, and a zero-sized residual of a ``shard_map`` crashes XLA's SPMD
    partitioner in jaxlib 0.11.2 (a segmentation fault when compiling the gradient; 0.10.2 is
    unaffected)."""
    return chain_carries(decays, finals, h0, reverse=reverse)


def _local(a, x, h0, *, axis_name, reverse, method, chunk_size, out_dtype):
    acc = h0.dtype
    # In the accumulation dtype once (as in _local_matrix), so that the gradients of 16-bit
    # inputs from the two scans and the decay product add up before their one rounding.
    a, x = a.astype(acc), x.astype(acc)
    _, final = linear_recurrence(
        a,
        x,
        reverse=reverse,
        method=method,
        chunk_size=chunk_size,
        return_last_state=True,
        out_dtype=acc,
    )
    decay = jnp.prod(a, axis=-2)
    # Every shard gets all pairs and computes the same carries and final state.
    decays = jax.lax.all_gather(decay, axis_name, to="varying")
    finals = jax.lax.all_gather(final, axis_name, to="varying")
    carry_in, last = _chain_carries_recomputed(decays, finals, h0, reverse)
    carry = carry_in[jax.lax.axis_index(axis_name)]
    h = linear_recurrence(
        a, x, carry, reverse=reverse, method=method, chunk_size=chunk_size, out_dtype=out_dtype
    )
    return h, last


def sharded_linear_recurrence(
    a: jax.Array,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    axis_name: str,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    reverse: bool = False,
    method: str = "auto",
    chunk_size: int = 64,
    return_last_state: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`linear_recurrence` with the time axis split over mesh axis ``axis_name``.

    Args:
      a: decays ``(..., L, C)`` or broadcastable to ``x``; real or complex.
      x: inputs ``(..., L, C)``; ``L`` must be a multiple of the size of ``axis_name``.
      h0: initial state ``(..., C)`` (after the last step when ``reverse``); zeros if omitted.
      axis_name: the mesh axis the time axis is sharded over. Other axes keep their sharding
        (e.g. a batch axis over ``data``); one sharded over ``axis_name`` too (a batch over
        ``("data", axis_name)``) keeps the rest of it (``data``) inside the split.
      mesh: the mesh; the one set by ``jax.set_mesh`` when omitted (a ``Mesh`` passed here
        needs no ``jax.set_mesh``).
      reverse, method, chunk_size, return_last_state, out_dtype: as in
        :func:`linear_recurrence` (``method`` is each shard's local scan).

    Returns:
      ``h`` with ``x``'s shape (time still sharded over ``axis_name``), and the final state
      ``(..., C)`` (float32 or wider) when ``return_last_state``. Where ``x``'s other axes were
      sharded over ``axis_name`` (Explicit meshes), both come back in ``x``'s own sharding
      instead, so that they combine with arrays laid out like ``x``.
    """
    mesh = _resolve_mesh(mesh, axis_name)
    a, x, dtype = check_inputs(a, x, h0)
    shards, length = mesh.shape[axis_name], x.shape[-2]
    if length % shards:
        raise ValueError(
            f"sequence length {length} is not a multiple of the {shards} devices on mesh axis "
            f"{axis_name!r}: pad the sequence to a multiple of {shards}"
        )
    if shards == 1:
        # Nothing to split: the plain recurrence, the same computation. (The split path over
        # one device makes XLA:CPU abort compiling an HGRU model's gradient, jaxlib 0.10.2.)
        return linear_recurrence(
            a,
            x,
            h0,
            reverse=reverse,
            method=method,
            chunk_size=chunk_size,
            return_last_state=return_last_state,
            out_dtype=out_dtype,
        )
    acc = accumulation_dtype(dtype)
    out_dtype = resolve_out_dtype(dtype, out_dtype)
    a = jnp.broadcast_to(a, x.shape)
    h0 = jnp.zeros(state_shape(x), acc) if h0 is None else jnp.asarray(h0).astype(acc)
    # Explicit mesh axes are made manual too, with the inputs' own specs (a batch sharded over
    # `data` stays so); Auto axes stay automatic.
    explicit = _explicit_axes(mesh)
    given_spec = _spec(x)
    x_spec, elsewhere = _time_sharded_spec(x, axis_name)
    state_spec = P(*x_spec[:-2], x_spec[-1])
    x_spec = P(*x_spec)
    reshard = _resharder(mesh)
    if explicit:
        a, x = reshard(a, x_spec), reshard(x, x_spec)
        h0 = reshard(h0, state_spec)
    body = functools.partial(
        _local,
        axis_name=axis_name,
        reverse=reverse,
        method=method,
        chunk_size=chunk_size,
        out_dtype=out_dtype,
    )
    h, last = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(x_spec, x_spec, state_spec),
        out_specs=(x_spec, state_spec),
        axis_names={axis_name} | explicit,
        # Unchecked: the Pallas interpreter's grid loop does not carry varying-axis types
        # (JAX 0.10). Gradients, the replicated final state's included, are tested.
        check_vma=False,
    )(a, x, h0)
    if explicit and elsewhere:  # back to x's own layout, to combine with arrays in it
        h = reshard(h, P(*given_spec))
        last = reshard(last, P(*given_spec[:-2], given_spec[-1]))
    if return_last_state:
        return h, last.astype(last_state_dtype(dtype, out_dtype))
    return h


def padded_sharded_linear_recurrence(
    a: jax.Array,
    x: jax.Array,
    h0: jax.Array | None = None,
    *,
    axis_name: str,
    reverse: bool = False,
    method: str = "auto",
) -> jax.Array:
    """:func:`sharded_linear_recurrence` of ``(..., L, C)`` inputs of any length ``L``, over
    mesh axis ``axis_name`` of the mesh set by ``jax.set_mesh``: the states ``(..., L, C)``.

    ``a`` is broadcast to ``x``'s shape, both are padded at the end of time to a multiple of the
    axis size with identity steps (decay 1, input 0: a forward scan never sees them, a reverse
    one passes its initial state through them unchanged) and the padding is cut off the states.
    The layers' full-sequence scans (:class:`~hgrn_jax.nn.HGRU`,
    :class:`~hgrn_jax.nn.FlaHGRNAttention`) run through this."""
    a = jnp.broadcast_to(a, jnp.broadcast_shapes(a.shape, x.shape))
    length = x.shape[-2]
    a, x = pad_time((a, x), (1.0, 0.0), mesh_axis_size(axis_name), time_axis=-2)
    h = sharded_linear_recurrence(a, x, h0, axis_name=axis_name, reverse=reverse, method=method)
    return cut_time(h, length, axis_name, time_axis=-2)


def _local_matrix(q, k, v, g, h0, scale, *, axis_name, method, chunk_size, out_dtype):
    acc = h0.dtype
    # In the accumulation dtype once, so that the gradients of 16-bit inputs from the scan and
    # from the correction add up before their one rounding.
    q, k, v, g = (t.astype(acc) for t in (q, k, v, g))
    o_local, final = matrix_recurrence(
        q,
        k,
        v,
        g,
        scale=scale,
        method=method,
        chunk_size=chunk_size,
        return_last_state=True,
        out_dtype=acc,
    )
    cumulative = _cumulative_sum(g)  # G_t (..., L, H, K)
    decay = jnp.exp(cumulative[..., -1, :, :])  # (..., H, K): the shard's decay of the key axis
    decays = jax.lax.all_gather(decay, axis_name, to="varying")
    finals = jax.lax.all_gather(final, axis_name, to="varying")
    decays = jnp.broadcast_to(decays[..., None], finals.shape)
    carry_in, last = _chain_carries_recomputed(decays, finals, h0, False)
    carry = carry_in[jax.lax.axis_index(axis_name)]  # (..., H, K, V)
    # From the carried-in state the states are S_local_t + diag(exp(G_t)) carry.
    entering = jnp.einsum("...lhk,...hkv->...lhv", q * jnp.exp(cumulative), carry)
    return (o_local + scale * entering).astype(out_dtype), last


def _cumulative_sum(g: jax.Array) -> jax.Array:
    """``G_t = g_0 + ... + g_t`` along the time axis of ``g`` (..., L, H, K), by pairwise sums.

    Precision: every ``g <= 0``, so a sum of any of them in any order is rounded to a relative
    error of at most (terms - 1) * 2^-24, and the absolute error of ``exp(G_t)`` is
    ``exp(-|G|) |G|`` times that, at most 1/e of it: a shard of ``n`` steps is no worse than the
    product of ``n`` rounded factors in a scan, and very negative sums underflow to 0, their
    value. The pairwise tree rounds far less (~log2(n) roundings per sum). Measured over 16,384
    steps against float64 (CPU, 64 channels): the largest error of ``exp(G_t)`` is 1.2e-7 with
    log decays uniform in [-1e-3, 0], 5e-8 in [-1e-5, 0], 2.4e-8 in [-5, 0]; a sequential
    float32 cumulative sum gives up to 9e-7, and multiplying ``exp(g_t)`` step by step, as a
    scan does, up to 2.3e-5 (near-0 log decays). On one CPU device ``lax.associative_scan``
    took 0.16 ms at 2 x 512 x 4 x 32, ``jnp.cumsum`` (XLA's reduce-window) 0.63 ms; inside the
    8-device benchmark (``benchmarks/matrix_recurrence.py --sequence-parallel``) the two were
    within its noise.
    """
    return jax.lax.associative_scan(jnp.add, g, axis=-3)


def sharded_matrix_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    h0: jax.Array | None = None,
    *,
    axis_name: str,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    scale: float | jax.Array = 1.0,
    method: str = "auto",
    return_last_state: bool = False,
    out_dtype: jnp.dtype | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """:func:`~hgrn_jax.ops.matrix_recurrence` with the time axis split over mesh axis
    ``axis_name``.

    Args:
      q, k, log_decay: ``(..., L, H, K)``; ``L`` must be a multiple of the size of ``axis_name``.
      v: ``(..., L, H, V)``.
      h0: initial state ``(..., H, K, V)``; zeros if omitted. A complex one, or one wider
        than the states' accumulation dtype, promotes the computation and the outputs to its
        dtype, as in :func:`~hgrn_jax.ops.matrix_recurrence`.
      axis_name: the mesh axis the time axis is sharded over. The leading (batch) and head axes
        keep their Explicit sharding (less ``axis_name`` where they use it too, as in
        :func:`sharded_linear_recurrence`); the key and value axes are gathered inside each
        shard.
      mesh: the mesh; the one set by ``jax.set_mesh`` when omitted (a ``Mesh`` passed here
        needs no ``jax.set_mesh``).
      scale, method, return_last_state, out_dtype, chunk_size: as in
        :func:`~hgrn_jax.ops.matrix_recurrence` (``method`` is each shard's local scan, run
        once per shard: the state carried in from the earlier shards enters the outputs by
        the correction of the module docstring).

    Returns:
      ``o`` with ``v``'s shape (time still sharded over ``axis_name``), and the final state
      ``(..., H, K, V)`` (float32 or wider) when ``return_last_state``. Where ``q``'s or
      ``v``'s other axes were sharded over ``axis_name`` (Explicit meshes), both come back in
      ``v``'s own sharding instead (as in :func:`sharded_linear_recurrence`).
    """
    mesh = _resolve_mesh(mesh, axis_name)
    q, k, v, log_decay = (jnp.asarray(t) for t in (q, k, v, log_decay))
    state = _check_shapes(q, k, v, log_decay, h0)
    shards, length = mesh.shape[axis_name], q.shape[-3]
    if length % shards:
        raise ValueError(
            f"sequence length {length} is not a multiple of the {shards} devices on mesh axis "
            f"{axis_name!r}: pad the sequence to a multiple of {shards}"
        )
    kwargs = dict(method=method, out_dtype=out_dtype, chunk_size=chunk_size)
    if shards == 1:  # nothing to split: the plain recurrence (see sharded_linear_recurrence)
        return matrix_recurrence(
            q, k, v, log_decay, h0, scale=scale, return_last_state=return_last_state, **kwargs
        )
    h0 = None if h0 is None else jnp.asarray(h0)
    dtype = matrix_inputs_dtype(jnp.result_type(q, k, v, log_decay), h0)
    acc = accumulation_dtype(dtype)
    out_dtype = resolve_out_dtype(dtype, out_dtype)
    h0 = jnp.zeros(state, acc) if h0 is None else h0.astype(acc)
    scale = jnp.asarray(scale, acc)
    # Batch and head axes keep q's Explicit sharding (v takes the same); the key and value axes
    # are whole inside a shard (the readout sums over the key axis).
    given_spec = _spec(v)
    qk_spec, elsewhere = _time_sharded_spec(q, axis_name, time_axis=-3)
    elsewhere = elsewhere or _time_sharded_spec(v, axis_name, time_axis=-3)[1]
    qk_spec[-1] = None
    qk_spec = P(*qk_spec)
    v_spec = P(*qk_spec[:-1], None)
    state_spec = P(*qk_spec[:-3], qk_spec[-2], None, None)
    explicit = _explicit_axes(mesh)
    reshard = _resharder(mesh)
    if explicit:
        q, k, log_decay = (reshard(t, qk_spec) for t in (q, k, log_decay))
        v = reshard(v, v_spec)
        h0 = reshard(h0, state_spec)
        scale = reshard(scale, P())
    body = functools.partial(
        _local_matrix,
        axis_name=axis_name,
        method=method,
        chunk_size=chunk_size,
        out_dtype=out_dtype,
    )
    o, last = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(qk_spec, qk_spec, v_spec, qk_spec, state_spec, P()),
        out_specs=(v_spec, state_spec),
        axis_names={axis_name} | explicit,
        check_vma=False,  # as in sharded_linear_recurrence
    )(q, k, v, log_decay, h0, scale)
    if explicit and elsewhere:  # back to v's own layout, as in sharded_linear_recurrence
        o = reshard(o, P(*given_spec))
        last = reshard(last, P(*given_spec[:-3], given_spec[-2], None, None))
    if return_last_state:
        return o, last
    return o

"""Sequence parallelism on the 8 simulated devices: the time axis split over a mesh axis gives
the unsharded recurrence, gradients included, and so does an HGRU layer built with it; the same
for HGRN2's matrix-state recurrence and its layers."""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from hgrn_jax.nn import (
    HGRN2,
    HGRN2D,
    HGRU,
    HGRU2D,
    FlaHGRN2Attention,
    FlaHGRNAttention,
    HGRN2DSeries,
    MixerConfig,
    make_mixer,
)
from hgrn_jax.ops import linear_recurrence, matrix_recurrence
from hgrn_jax.ops.sequence_parallel import sharded_linear_recurrence, sharded_matrix_recurrence

# The sharded result differs from the unsharded one only in how the state entering each shard is
# rounded (D_k * h + S_k instead of step by step): a few float32 ulps of the O(1..10) states and
# of the O(10..100) gradients.
RTOL, ATOL = 1e-5, 2e-6


def assert_close(got, want, scale=1.0):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL * scale)


MESHES = {
    "8-auto": ((8,), ("seq",), AxisType.Auto),
    "8-explicit": ((8,), ("seq",), AxisType.Explicit),
    "2x4-explicit": ((2, 4), ("data", "seq"), AxisType.Explicit),
    "4x2-explicit": ((4, 2), ("data", "seq"), AxisType.Explicit),
    "4-auto": ((4,), ("seq",), AxisType.Auto),
    "2-auto": ((2,), ("seq",), AxisType.Auto),
}


def make_mesh(name):
    shape, names, kind = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def make_inputs(complex_valued, shape=(4, 32, 6), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.6, 1.0, shape)
    x = rng.normal(size=shape)
    h0 = rng.normal(size=shape[:1] + shape[2:])
    if complex_valued:
        a = a * np.exp(1j * rng.uniform(-1, 1, shape))
        x = x + 1j * rng.normal(size=shape)
        dtype = np.complex64
    else:
        dtype = np.float32
    return tuple(jnp.asarray(v, dtype) for v in (a, x, h0))


def loss(recurrence, a, x, h0):
    """Uses every state and the final state, real and imaginary parts."""
    h, last = recurrence(a, x, h0)
    w = jnp.arange(h.shape[-1], dtype=jnp.float32)
    return jnp.sum(jnp.sin(jnp.real(h)) + jnp.imag(h) * w) + jnp.sum(jnp.cos(jnp.real(last)) * w)


def outputs_and_grads(recurrence, loss_fn, *inputs):
    """``recurrence(*inputs)`` and the gradients of ``loss_fn(recurrence, *inputs)`` w.r.t. every
    input, compiled as one function (eagerly, each small op compiles on its own)."""

    def both(*inputs):
        argnums = tuple(range(len(inputs)))
        loss = functools.partial(loss_fn, recurrence)
        return recurrence(*inputs), jax.grad(loss, argnums)(*inputs)

    return jax.jit(both)(*inputs)


@pytest.mark.parametrize(
    "mesh_name, complex_valued, reverse",
    [
        ("8-auto", False, False),
        ("8-auto", True, True),
        ("8-explicit", True, False),
        ("2x4-explicit", False, True),
        ("2x4-explicit", True, False),
    ],
)
@pytest.mark.slow
def test_equals_unsharded_with_gradients(mesh_name, complex_valued, reverse):
    a, x, h0 = make_inputs(complex_valued)
    kwargs = dict(reverse=reverse, method="sequential", return_last_state=True)
    unsharded = functools.partial(linear_recurrence, **kwargs)
    mesh = make_mesh(mesh_name)
    sharded = functools.partial(sharded_linear_recurrence, axis_name="seq", **kwargs)
    (want_h, want_last), want_grads = outputs_and_grads(unsharded, loss, a, x, h0)
    with jax.set_mesh(mesh):
        if "data" in mesh.axis_names:
            a, x, h0 = (jax.device_put(v, P("data")) for v in (a, x, h0))
        (h, last), grads = outputs_and_grads(sharded, loss, a, x, h0)
    assert h.sharding.spec[1] == "seq"  # the states stay split over the sequence axis
    if "data" in mesh.axis_names:
        assert h.sharding.spec[0] == "data"  # and the batch keeps its own sharding
    assert_close(h, want_h)
    assert_close(last, want_last)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        assert_close(g, w, scale=10.0)


@pytest.mark.slow
def test_pallas_local_scans_broadcast_decay_and_no_h0():
    """Each shard's scans through the Pallas kernel (interpreted), a (C,) decay, zero h0."""
    a, x, _ = make_inputs(False, shape=(2, 16, 5), seed=1)
    a = a[0, 0]
    mesh = make_mesh("8-explicit")
    sharded = functools.partial(sharded_linear_recurrence, axis_name="seq", method="pallas")

    def square_loss(recurrence, a, x):
        return jnp.sum(recurrence(a, x) ** 2)

    with jax.set_mesh(mesh):
        h, (da, _) = outputs_and_grads(sharded, square_loss, a, x)
    want_h, (want_da, _) = outputs_and_grads(linear_recurrence, square_loss, a, x)
    assert_close(h, want_h)
    assert_close(da, want_da, scale=10.0)


def test_errors_name_the_fix():
    a, x, _ = make_inputs(False, shape=(1, 12, 3))
    with pytest.raises(ValueError, match="needs a mesh with that axis.*jax.set_mesh"):
        sharded_linear_recurrence(a, x, axis_name="seq")
    with jax.set_mesh(make_mesh("8-explicit")):
        with pytest.raises(ValueError, match="not a multiple of the 8 devices.*pad the sequence"):
            sharded_linear_recurrence(a, x, axis_name="seq")


def layer_loss(layer, x, mask=None):
    return jnp.sum(layer(x, 0.3, mask) ** 2)


@nnx.jit
def layer_output_and_grads(layer, x, mask=None):
    """``layer(x, 0.3, mask)`` and the parameter gradients of :func:`layer_loss`, compiled as one
    function: the unsharded reference too (run eagerly, its many small ops each compiled cost
    ~4x the CPU time), and the sharded layer's forward and backward in one compile."""
    return layer(x, 0.3, mask), nnx.grad(layer_loss)(layer, x, mask)


@pytest.mark.slow
@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_hgru_layer_with_sequence_axis_equals_unsharded(bidirectional):
    layer = HGRU(8, bidirectional=bidirectional, method="sequential", rngs=nnx.Rngs(0))
    x0 = x = jax.random.normal(jax.random.key(1), (2, 16, 8))
    want, want_grads = layer_output_and_grads(layer, x)
    layer.sequence_axis = "seq"
    with jax.set_mesh(make_mesh("2x4-explicit")):
        x = jax.device_put(x, P("data"))
        got, grads = layer_output_and_grads(layer, x)
    assert_close(got, want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(g, w, scale=10.0)
    if not bidirectional:  # step() decodes unsharded with the same layer
        y, _ = layer.step(x0[:, :3], layer.init_state(2), 0.3)
        assert_close(y, want[:, :3])


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name, length", [("8-auto", 12), ("2x4-explicit", 6)])
def test_hgru_layer_pads_a_length_the_axis_does_not_divide(mesh_name, length):
    """Sequence parallelism over an axis whose size does not divide the length (2,000 ListOps
    tokens on 3 or 6 devices) stopped the run at its first step; the layer pads the time axis
    with identity steps and equals the unsharded layer, gradients included, in both directions."""
    layer = HGRU(8, bidirectional=True, method="sequential", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, length, 8))
    want, want_grads = layer_output_and_grads(layer, x)
    layer.sequence_axis = "seq"
    mesh = make_mesh(mesh_name)
    with jax.set_mesh(mesh):
        if "data" in mesh.axis_names:
            x = jax.device_put(x, P("data"))
        got, grads = layer_output_and_grads(layer, x)
    assert got.shape == want.shape
    assert_close(got, want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close(g, w, scale=10.0)


@pytest.mark.slow
def test_hgru2d_rows_sharded_equals_unsharded():
    layer = HGRU2D(4, causal=False, method="sequential", rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (1, 8, 3, 4))
    forward = nnx.jit(lambda layer, x: layer(x, 0.2))
    want = forward(layer, x)
    layer.sequence_axis = "seq"
    with jax.set_mesh(make_mesh("8-auto")):
        got = forward(layer, x)
    assert_close(got, want)


def _shard_map_outputs(jaxpr) -> list:
    """The output variables of every ``shard_map`` in ``jaxpr``, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found += eqn.outvars
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _shard_map_outputs(sub)
    return found


@pytest.mark.parametrize("shards", [2, 8])
def test_gradient_saves_no_zero_sized_residuals(shards):
    # The forward shard_map's outputs include the residuals its backward reads. One with zero
    # elements (lax.associative_scan over a few shards slices such arrays) crashes XLA's SPMD
    # partitioner in jaxlib 0.11.2: a segmentation fault while compiling any such gradient.
    mesh = jax.make_mesh((shards,), ("seq",), axis_types=(AxisType.Auto,))
    a, x, h0 = make_inputs(False, shape=(2, 4 * shards, 3))
    recurrence = functools.partial(
        sharded_linear_recurrence, axis_name="seq", mesh=mesh, return_last_state=True
    )
    grad = jax.grad(functools.partial(loss, recurrence), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        outputs = _shard_map_outputs(jax.make_jaxpr(grad)(a, x, h0).jaxpr)
    assert outputs, "no shard_map found: the test no longer reads the sharded recurrence"
    empty = [str(v.aval) for v in outputs if v.aval.size == 0]
    assert not empty, empty


# --- HGRN2's matrix-state recurrence


def make_matrix_inputs(shape=(2, 16, 2, 3), value_dim=4, dtype=np.float32, seed=0):
    """q, k, v, log decays and h0 (B, H, K, V). The log decays are log_sigmoid of normal draws
    (a decay of 0.5 on average, some near 0.1, some near 0.95): a shard's decay product is small
    but far from 0, so the state carried in from earlier shards is an O(1) part of the outputs."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=shape)
    k = rng.uniform(0.0, 1.0, shape)
    v = rng.normal(size=shape[:-1] + (value_dim,))
    g = -np.logaddexp(0.0, -(rng.normal(size=shape) + 1.0))
    h0 = rng.normal(size=shape[:1] + shape[2:] + (value_dim,))
    return tuple(jnp.asarray(t, dtype) for t in (q, k, v, g, h0))


def matrix_loss(recurrence, q, k, v, g, h0):
    """Uses every output and the final state."""
    o, last = recurrence(q, k, v, g, h0)
    return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(last) * jnp.arange(last.shape[-1]))


def assert_close_to_scale(got, want, rtol=1e-5):
    """Max error below ``rtol`` of ``want``'s largest magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("mesh_name", ["2-auto", "4-explicit", "2x4-explicit"])
def test_matrix_equals_unsharded_with_gradients(mesh_name):
    """Outputs, final state and the gradients w.r.t. q, k, v, log decays and h0 equal the
    unsharded recurrence's. Tolerance: 1e-5 of each array's largest magnitude. The sharded form
    only sums in another order (D_k S + S_k at the shard boundaries instead of step by step), so
    both are float32 roundings of one value: measured against a float64 reference, each is within
    ~5e-7 of the scale (16 steps, K=3), the sharded as close as the unsharded."""
    q, k, v, g, h0 = make_matrix_inputs()
    kwargs = dict(scale=0.7, method="sequential", return_last_state=True)
    unsharded = functools.partial(matrix_recurrence, **kwargs)
    sharded = functools.partial(sharded_matrix_recurrence, axis_name="seq", **kwargs)
    (want_o, want_last), want_grads = outputs_and_grads(unsharded, matrix_loss, q, k, v, g, h0)
    shape, names = {"2-auto": ((2,), ("seq",)), "4-explicit": ((4,), ("seq",))}.get(
        mesh_name, ((2, 4), ("data", "seq"))
    )
    kind = AxisType.Auto if mesh_name.endswith("auto") else AxisType.Explicit
    mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))
    inputs = (q, k, v, g, h0)
    with jax.set_mesh(mesh):
        if "data" in names:
            inputs = tuple(jax.device_put(t, P("data")) for t in inputs)
        (o, last), grads = outputs_and_grads(sharded, matrix_loss, *inputs)
    assert o.sharding.spec[1] == "seq"  # the outputs stay split over the sequence axis
    if "data" in names:
        assert o.sharding.spec[0] == "data"  # and the batch keeps its own sharding
    assert o.dtype == want_o.dtype and last.dtype == want_last.dtype
    assert_close_to_scale(o, want_o)
    assert_close_to_scale(last, want_last)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == want.dtype
        assert_close_to_scale(got, want)
    # The carries matter: each shard's recurrence from a zero state is O(1) off.
    shards = mesh.shape["seq"]
    shard_alone = jax.jit(functools.partial(matrix_recurrence, scale=0.7))
    chunks = [
        shard_alone(*(jnp.split(t, shards, axis=1)[i] for t in (q, k, v, g))) for i in range(shards)
    ]
    no_carries = jnp.concatenate(chunks, axis=1)
    assert np.max(np.abs(no_carries - want_o)) > 0.1 * np.max(np.abs(want_o))


def test_matrix_float64_zero_h0_and_chunked_local_scans():
    """float64 inputs stay float64 (states and outputs), h0 omitted, each shard's scans chunked."""
    with jax.enable_x64(True):
        q, k, v, g, _ = make_matrix_inputs(shape=(1, 32, 1, 2), value_dim=2, dtype=np.float64)
        sharded = functools.partial(
            sharded_matrix_recurrence, axis_name="seq", method="chunked", chunk_size=4
        )
        with jax.set_mesh(make_mesh("8-explicit")):
            o, last = jax.jit(functools.partial(sharded, return_last_state=True))(q, k, v, g)
        want_o, want_last = jax.jit(matrix_recurrence, static_argnames="return_last_state")(
            q, k, v, g, return_last_state=True
        )
    assert o.dtype == last.dtype == jnp.float64
    np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(last, want_last, rtol=1e-12, atol=1e-13)


def linear_matrix_loss(recurrence, q, k, v, g, h0, *, weights):
    """A fixed weighting of every output and of the final state: the gradients are the
    recurrence's own backward pass for fixed cotangents, with nothing of the loss's rounding."""
    o, last = recurrence(q, k, v, g, h0)
    return jnp.sum(o * weights[0].astype(o.dtype)) + jnp.sum(last * weights[1])


def matrix_weights(v, h0, seed=9):
    """Cotangents for :func:`linear_matrix_loss`: normal draws rounded to bfloat16 (exact in
    every dtype the tests use, so the float64 reference sees the same ones)."""
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(jnp.asarray(rng.normal(size=t.shape), jnp.bfloat16), jnp.float32)
        for t in (v, h0)
    )


def float64_matrix_reference(inputs, weights, scale):
    """The unsharded recurrence in float64 from the same (rounded) inputs: outputs, final state
    and the gradients of :func:`linear_matrix_loss` w.r.t. q, k, v, log decays and h0."""
    with jax.enable_x64(True):
        inputs = tuple(jnp.asarray(np.asarray(t, np.float64)) for t in inputs)
        weights = tuple(jnp.asarray(np.asarray(w, np.float64)) for w in weights)
        recurrence = functools.partial(
            matrix_recurrence, scale=scale, method="sequential", return_last_state=True
        )
        loss = functools.partial(linear_matrix_loss, weights=weights)
        (o, last), grads = outputs_and_grads(recurrence, loss, *inputs)
        return [np.asarray(t) for t in (o, last, *grads)]


def sharded_matrix_results(inputs, weights, mesh, scale, **kwargs):
    """The sharded recurrence's outputs, final state and gradients (as :func:
    `float64_matrix_reference`) on ``mesh`` (batch over ``data`` when the mesh has it)."""
    recurrence = functools.partial(
        sharded_matrix_recurrence, axis_name="seq", scale=scale, return_last_state=True, **kwargs
    )
    loss = functools.partial(linear_matrix_loss, weights=weights)
    with jax.set_mesh(mesh):
        if "data" in mesh.axis_names:
            inputs = tuple(jax.device_put(t, P("data")) for t in inputs)
        (o, last), grads = outputs_and_grads(recurrence, loss, *inputs)
    return [o, last, *grads]


@functools.cache
def matrix_case_2x64() -> tuple[tuple, tuple, list]:
    """Inputs (B, L, H, K) = (2, 64, 2, 3), V = 4, their cotangents and the float64 reference:
    computed once for the three methods of :func:`test_matrix_against_float64_with_gradients`."""
    inputs = make_matrix_inputs(shape=(2, 64, 2, 3))
    weights = matrix_weights(inputs[2], inputs[4])
    return inputs, weights, float64_matrix_reference(inputs, weights, 0.7)


@pytest.mark.parametrize("method", ["sequential", "chunked", "pallas"])
def test_matrix_against_float64_with_gradients(method):
    """Outputs, final state and gradients (q, k, v, log decays, h0) on a 2 x 4 mesh (batch over
    ``data``, time over ``seq``, 16 steps a shard; "pallas" in the Pallas interpreter) against
    the float64 unsharded recurrence: within 2e-6 of each array's largest magnitude. Measured:
    at most 2.5e-7 for every method, as close as the unsharded float32 recurrence (its own
    largest error 1.8-2.7e-7)."""
    inputs, weights, want = matrix_case_2x64()
    mesh = make_mesh("2x4-explicit")
    got = sharded_matrix_results(inputs, weights, mesh, 0.7, method=method, chunk_size=16)
    assert got[0].sharding.spec[:2] == ("data", "seq")
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.float32
        assert_close_to_scale(g, w, rtol=2e-6)


def test_matrix_bfloat16_inputs():
    """bfloat16 inputs: the state accumulates in float32 (the final state is float32), and the
    outputs and gradients come back in bfloat16, each element within one bfloat16 rounding
    (2^-8 of it) of the float64 value from the same inputs, plus 1e-5 of the array's largest
    magnitude for float32's own rounding. (The two-scan shards summed the gradients of the two
    scans in bfloat16, two roundings: up to 4e-3 of the scale off on dv and the log decays.)"""
    inputs = make_matrix_inputs(shape=(2, 64, 2, 3), dtype=jnp.bfloat16)
    weights = matrix_weights(inputs[2], inputs[4])
    want = float64_matrix_reference(inputs, weights, 0.7)
    got = sharded_matrix_results(inputs, weights, make_mesh("8-explicit"), 0.7)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.float32] + [jnp.bfloat16] * 5
    assert_close_to_scale(got[1], want[1], rtol=1e-6)
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:], strict=True):
        atol = 2.0**-8 * np.abs(w) + 1e-5 * np.max(np.abs(w))
        assert np.all(np.abs(np.asarray(g, np.float64) - w) <= atol)


@functools.cache
def long_shards_case(decay: str) -> tuple[tuple, tuple, list]:
    """:func:`test_matrix_long_shards`' inputs (B, L, H, K) = (1, 32768, 1, 4), V = 4, with log
    decays uniform in [-5, 0] ("strong") or [-1e-4, 0] ("weak"), their cotangents and the float64
    reference: computed once for both methods."""
    rng = np.random.default_rng(3)
    shape = (1, 2 * 16384, 1, 4)
    q, k, v, _, h0 = make_matrix_inputs(shape=shape, value_dim=4, seed=3)
    g = jnp.asarray(rng.uniform(-5.0 if decay == "strong" else -1e-4, 0.0, shape), jnp.float32)
    inputs = (q, k, v, g, h0)
    weights = matrix_weights(v, h0)
    return inputs, weights, float64_matrix_reference(inputs, weights, 0.5)


@pytest.mark.slow  # 32k steps; one float64 reference per decay, for both methods: 1-5 s each
@pytest.mark.parametrize("method", ["sequential", "chunked"])
@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_matrix_long_shards(decay, method):
    """Two shards of 16,384 steps, log decays uniform in [-5, 0] (the carried-in state fades
    within a few steps and the cumulative decays reach -4e4, far past exp's underflow) or in
    [-1e-4, 0] (it reaches the shard's end, through cumulative decays near -0.8), against the
    float64 unsharded recurrence, relative to each array's largest magnitude. Measured: at most
    1e-7 (strong) and 3.8e-6 (weak) with the sequential scans, 9.2e-6 and 7e-7 chunked; the
    unsharded float32 recurrence is as far (up to 4.1e-6 sequential; chunked, 9.2e-6 with
    strong decays: its exp(b_i - b_j) in 64-step chunks whose decays sum to about -160, see
    matrix_recurrence's docstring). Tolerances: 1e-5 sequential, 2e-5 chunked."""
    inputs, weights, want = long_shards_case(decay)
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,))
    got = sharded_matrix_results(inputs, weights, mesh, 0.5, method=method)
    for g, w in zip(got, want, strict=True):
        assert_close_to_scale(g, w, rtol=1e-5 if method == "sequential" else 2e-5)


def test_matrix_shard_runs_one_scan():
    """Each shard runs the recurrence once (its outputs then corrected by the carried-in
    state), not a second time from that state."""
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,))
    q, k, v, g, h0 = make_matrix_inputs(shape=(1, 8, 1, 2), value_dim=2)
    recurrence = functools.partial(sharded_matrix_recurrence, axis_name="seq", mesh=mesh)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(recurrence)(q, k, v, g, h0).jaxpr

    def count(jaxpr, name) -> int:
        return sum(
            (eqn.primitive.name == name)
            + sum(count(sub, name) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
            for eqn in jaxpr.eqns
        )

    (shard_map,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    (body,) = jax.extend.core.jaxprs_in_params(shard_map.params)
    # matrix_recurrence's core is the one custom-VJP function inside.
    assert count(body, "custom_vjp_call") == 1


def test_matrix_errors_name_the_fix():
    q, k, v, g, _ = make_matrix_inputs(shape=(1, 12, 1, 2), value_dim=2)
    with pytest.raises(ValueError, match="needs a mesh with that axis.*jax.set_mesh"):
        sharded_matrix_recurrence(q, k, v, g, axis_name="seq")
    with jax.set_mesh(make_mesh("8-explicit")):
        with pytest.raises(ValueError, match="not a multiple of the 8 devices.*pad the sequence"):
            sharded_matrix_recurrence(q, k, v, g, axis_name="seq")
        with pytest.raises(ValueError, match="h0 must have shape"):
            sharded_matrix_recurrence(q[:, :8], k[:, :8], v[:, :8], g[:, :8], q, axis_name="seq")


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_matrix_gradient_saves_no_zero_sized_residuals(steps):
    # As test_gradient_saves_no_zero_sized_residuals, for the matrix recurrence's chain, and for
    # the shards' cumulative decays (lax.associative_scan over `steps` steps).
    mesh = jax.make_mesh((2,), ("seq",), axis_types=(AxisType.Auto,))
    inputs = make_matrix_inputs(shape=(1, 2 * steps, 1, 2), value_dim=2)
    recurrence = functools.partial(
        sharded_matrix_recurrence, axis_name="seq", mesh=mesh, return_last_state=True
    )
    grad = jax.grad(functools.partial(matrix_loss, recurrence), argnums=(0, 1, 2, 3, 4))
    with jax.set_mesh(mesh):
        outputs = _shard_map_outputs(jax.make_jaxpr(grad)(*inputs).jaxpr)
    assert outputs, "no shard_map found: the test no longer reads the sharded recurrence"
    empty = [str(v.aval) for v in outputs if v.aval.size == 0]
    assert not empty, empty


def assert_layer_matches(layer, x, mesh_name, mask=None):
    """``layer`` with ``sequence_axis="seq"`` on the mesh against itself without it: outputs and
    parameter gradients within 1e-5 of each array's scale (float32 roundings of one value, as
    for the op; the norms and projections are the same computation)."""
    want, want_grads = layer_output_and_grads(layer, x, mask)
    layer.sequence_axis = "seq"
    mesh = make_mesh(mesh_name)
    with jax.set_mesh(mesh):
        if "data" in mesh.axis_names:
            x = jax.device_put(x, P("data"))
            mask = None if mask is None else jax.device_put(mask, P("data"))
        got, grads = layer_output_and_grads(layer, x, mask)
        jaxpr = jax.make_jaxpr(lambda x, mask: layer(x, 0.3, mask))(x, mask)
    assert _shard_map_outputs(jaxpr.jaxpr), "the layer did not run the sharded recurrence"
    assert got.shape == want.shape
    assert_close_to_scale(got, want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close_to_scale(g, w)
    return want


@pytest.mark.slow  # a layer and its gradient compiled sharded and unsharded: ~2-7 s each
@pytest.mark.parametrize(
    "layout, bidirectional, mesh_name, length",
    [
        ("official", False, "2x4-explicit", 16),
        ("official", True, "8-auto", 12),  # padded to 16: four identity steps per direction
        ("fla", False, "2x4-explicit", 10),  # padded to 12
        # (bidirectional on 2x4-explicit, padded 7 -> 8: the padding-mask test below)
    ],
)
def test_hgrn2_layer_with_sequence_axis_equals_unsharded(layout, bidirectional, mesh_name, length):
    """The layer with ``sequence_axis`` set equals the same layer without it, in both directions
    and for lengths the axis does not divide (padded with identity steps at the end)."""
    if layout == "official":
        layer = HGRN2(8, bidirectional=bidirectional, method="sequential", rngs=nnx.Rngs(0))
    else:
        layer = FlaHGRN2Attention(
            8, expand_ratio=4, bidirectional=bidirectional, method="sequential", rngs=nnx.Rngs(0)
        )
    x = jax.random.normal(jax.random.key(1), (2, length, 8))
    want = assert_layer_matches(layer, x, mesh_name)
    if not bidirectional:  # step() decodes unsharded with the same layer
        y, _ = layer.step(x[:, :3], layer.init_state(2), 0.3)
        assert_close_to_scale(y, want[:, :3])


@pytest.mark.slow  # as above
def test_hgrn2_layer_with_sequence_axis_and_padding_mask():
    """A padding mask (left padding and a hole) with sequence parallelism and a padded length:
    masked steps are identity steps of the sharded scans as of the unsharded ones."""
    layer = HGRN2(8, bidirectional=True, method="sequential", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 8))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]], jnp.int32)
    want = assert_layer_matches(layer, x, "2x4-explicit", mask)
    assert np.all(np.asarray(want)[0, :2] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("layer_class", [HGRN2D, HGRN2DSeries])
def test_hgrn2d_rows_sharded_equals_unsharded(layer_class):
    layer = layer_class(4, method="sequential", rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (1, 6, 3, 4))  # 6 rows padded to 8
    assert_layer_matches(layer, x, "8-auto")


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: HGRN2(8, bidirectional=True, method="sequential", rngs=nnx.Rngs(0)),
        lambda: FlaHGRNAttention(8, method="sequential", rngs=nnx.Rngs(0)),
    ],
    ids=["hgrn2", "fla-hgrn"],
)
def test_a_layer_on_a_one_device_sequence_axis_is_the_plain_layer(make_layer):
    """A sequence axis of one device runs the plain recurrence (no shard_map), as for HGRU."""
    layer = make_layer()
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    forward = nnx.jit(lambda layer, x: layer(x, 0.3))
    want = forward(layer, x)
    layer.sequence_axis = "seq"
    mesh = jax.make_mesh((8, 1), ("data", "seq"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        got = forward(layer, x)
        jaxpr = jax.make_jaxpr(lambda x: layer(x, 0.3))(x)
    assert not _shard_map_outputs(jaxpr.jaxpr)
    assert_close_to_scale(got, want)


def test_mixer_config_sequence_axis_for_hgrn2_and_fla_hgrn():
    for kind, layout, scan in (
        ("hgrn2", "official", "1d"),
        ("hgrn2", "fla", "1d"),
        ("hgrn2", "official", "2d"),
        ("hgrn", "fla", "1d"),
    ):
        config = MixerConfig(
            kind=kind, layout=layout, scan=scan, expand_ratio=4, sequence_axis="seq"
        )
        mixer = make_mixer(config, 8, causal=scan == "1d", use_lower_bound=True, rngs=nnx.Rngs(0))
        assert mixer.sequence_axis == "seq"
    with pytest.raises(
        ValueError,
        match=r"sequence_axis=.seq. \(sequence parallelism\) needs a recurrent mixer: hgrn "
        r"\(kind='hgrn', either layout\) or hgrn2 .*change the mixer or leave sequence_axis unset",
    ):
        MixerConfig(kind="attention", sequence_axis="seq")


# --- fla's HGRN layer (FlaHGRNAttention): the linear recurrence, as HGRU's


@pytest.mark.slow  # a layer and its gradient compiled sharded and unsharded: ~2 s each
@pytest.mark.parametrize(
    "mesh_name, length, masked",
    [  # the shard_map path is HGRU's (tested on more meshes above): two meshes suffice here
        ("2x4-explicit", 10, False),  # 4 shards: padded to 12, the batch over data
        ("4-auto", 7, True),  # 4 shards: padded to 8, with left padding and a hole
    ],
)
def test_fla_hgrn_layer_with_sequence_axis_equals_unsharded(mesh_name, length, masked):
    """fla's HGRN layer with ``sequence_axis`` set equals the same layer without it: outputs and
    parameter gradients (``assert_layer_matches``: within 1e-5 of each array's largest
    magnitude; the sharded scan only re-associates the float32 sums at the shard boundaries,
    ``D_k * h + S_k`` instead of step by step; measured at most 1.1e-7 on the outputs and 1.9e-7
    on the gradients, against 0.5-0.96 for shards that dropped their carried-in state). A length
    the axis does not divide is padded with identity steps at the end; a padding mask keeps fla's
    meaning (padded steps get no input but still decay the state) on the split sequence.
    ``step()`` decodes unsharded with the same layer."""
    layer = FlaHGRNAttention(8, expand_ratio=2, method="sequential", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, length, 8))
    mask = None
    if masked:  # left padding, a hole, none, right padding
        rows = [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1], [1] * 7, [1, 1, 1, 1, 1, 0, 0]]
        mask = jnp.asarray(rows, jnp.int32)
    want = assert_layer_matches(layer, x, mesh_name, mask)
    y, _ = layer.step(x[:, :3], layer.init_state(4), 0.3, None if mask is None else mask[:, :3])
    assert_close_to_scale(y, want[:, :3])

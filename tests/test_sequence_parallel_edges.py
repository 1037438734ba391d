"""Edge cases of sequence parallelism on the simulated devices (conftest.py: 8 CPU devices):
16-bit gradients of the linear recurrence, a mesh passed as ``mesh=`` without ``jax.set_mesh``,
an initial state that promotes the matrix recurrence's dtype, and a batch sharded over a tuple
of mesh axes that includes the sequence axis."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from hgrn_jax import sharding
from hgrn_jax.nn import HGRN2, HGRU
from hgrn_jax.ops import linear_recurrence, matrix_recurrence
from hgrn_jax.ops.sequence_parallel import sharded_linear_recurrence, sharded_matrix_recurrence


def explicit_mesh(shape=(4,), names=("seq",)):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))


def linear_inputs(shape=(2, 64, 8), seed=0, dtype=jnp.float32):
    """Decays in [0.6, 1], normal inputs, an initial state, and normal cotangents for the states
    and the final state rounded to bfloat16 (exact in every dtype used here)."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.6, 1.0, shape), dtype)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    h0 = jnp.asarray(rng.normal(size=shape[:-2] + shape[-1:]), jnp.float32)
    cotangents = tuple(
        jnp.asarray(jnp.asarray(rng.normal(size=s), jnp.bfloat16), jnp.float32)
        for s in (shape, h0.shape)
    )
    return (a, x, h0), cotangents


def matrix_inputs(shape=(2, 16, 2, 3), value_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=shape)
    k = rng.uniform(0.0, 1.0, shape)
    v = rng.normal(size=shape[:-1] + (value_dim,))
    g = -rng.uniform(0.0, 1.0, shape)
    h0 = rng.normal(size=shape[:-3] + shape[-2:] + (value_dim,))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v, g, h0))


def weighted_loss(cotangents):
    """A fixed weighting of every state and of the final state: the gradients are the
    recurrence's backward pass for fixed cotangents, with nothing of the loss's own rounding."""

    def loss(recurrence, a, x, h0):
        h, last = recurrence(a, x, h0)
        dtype = jnp.promote_types(h.dtype, jnp.float32)
        states = jnp.sum(h.astype(dtype) * cotangents[0].astype(dtype))
        return states + jnp.sum(last * cotangents[1].astype(last.dtype))

    return loss


def linear_loss(recurrence, a, x, h0):
    h, last = recurrence(a, x, h0)
    return jnp.sum(jnp.sin(h)) + jnp.sum(last)


def matrix_loss(recurrence, q, k, v, g, h0):
    o, last = recurrence(q, k, v, g, h0)
    w = jnp.arange(o.shape[-1], dtype=o.dtype)
    return jnp.sum(jnp.sin(o) * w) + jnp.sum(jnp.cos(last))


def values_and_grads(recurrence, loss, *inputs):
    """``recurrence(*inputs)`` and the gradients of ``loss(recurrence, *inputs)`` w.r.t. every
    input, compiled as one function."""

    def both(*inputs):
        grads = jax.grad(functools.partial(loss, recurrence), tuple(range(len(inputs))))(*inputs)
        return recurrence(*inputs), grads

    return jax.jit(both)(*inputs)


def assert_close_to_scale(got, want, rtol=1e-5):
    """Every element within ``rtol`` of the largest magnitude of ``want``."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(np.max(np.abs(want)), 1e-30))


# --- bfloat16 gradients of the linear recurrence


def relative_error(got, want) -> float:
    """Largest error of an element relative to its own magnitude (plus 1e-5 of the array's
    largest, so that elements near 0 do not dominate)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / (np.abs(want) + 1e-5 * np.max(np.abs(want)))))


@pytest.mark.parametrize("reverse", [False, True])
def test_bfloat16_gradients_are_rounded_once(reverse):
    """bfloat16 decays and inputs (a float32 h0) over 4 shards: the states, the final state and
    the gradients (bfloat16 for a and x, float32 for h0) are as close to the float64 recurrence
    from the same inputs as the unsharded recurrence's, within 2x (or 2 bfloat16 roundings where
    that is larger). Each shard's two scans and its decay product each gave a bfloat16 gradient,
    added in bfloat16: measured here, relative errors of da 3.6e-1 / 3.3e-1 and of dx 1.6e-1 /
    1.7e-1 (forward / reverse) against 3.6-3.9e-3 unsharded; now the unsharded ones."""
    (a, x, h0), cotangents = linear_inputs(dtype=jnp.bfloat16)
    loss = weighted_loss(cotangents)
    kwargs = dict(method="sequential", reverse=reverse, return_last_state=True)
    with jax.enable_x64(True):
        wide = tuple(jnp.asarray(np.asarray(t, np.float64)) for t in (a, x, h0))
        wide_cotangents = tuple(jnp.asarray(np.asarray(c, np.float64)) for c in cotangents)
        (h, last), grads = values_and_grads(
            functools.partial(linear_recurrence, **kwargs), weighted_loss(wide_cotangents), *wide
        )
        want = [np.asarray(t) for t in (h, last, *grads)]
    (h, last), grads = values_and_grads(
        functools.partial(linear_recurrence, **kwargs), loss, a, x, h0
    )
    unsharded = [h, last, *grads]
    with jax.set_mesh(explicit_mesh()):
        sharded_fn = functools.partial(sharded_linear_recurrence, axis_name="seq", **kwargs)
        (h, last), grads = values_and_grads(sharded_fn, loss, a, x, h0)
    sharded = [h, last, *grads]
    assert sharded[2].dtype == sharded[3].dtype == jnp.bfloat16
    assert [t.dtype for t in sharded] == [t.dtype for t in unsharded]
    for name, s, u, w in zip(["h", "last", "da", "dx", "dh0"], sharded, unsharded, want):
        bound = 2 * max(relative_error(u, w), 2.0**-8 if s.dtype == jnp.bfloat16 else 0.0)
        assert relative_error(s, w) <= bound, (name, relative_error(s, w), relative_error(u, w))


# --- a mesh passed as mesh= (no jax.set_mesh)


@pytest.mark.parametrize("jit", [False, True])
def test_linear_with_an_explicit_mesh_passed_as_argument(jit):
    """``mesh=`` an Explicit mesh and no ``jax.set_mesh``: the op reshards onto that mesh itself
    (it raised JAX's "Using PartitionSpec when you are not under a mesh context"). Values
    eagerly and jitted, gradients jitted (an eager ``jax.grad`` of a value sharded over an
    Explicit mesh fails in JAX itself outside ``jax.set_mesh``, for any op)."""
    (a, x, h0), _ = linear_inputs(shape=(2, 16, 8))
    mesh = explicit_mesh()
    sharded = functools.partial(
        sharded_linear_recurrence, axis_name="seq", mesh=mesh, reverse=True, return_last_state=True
    )
    plain = functools.partial(linear_recurrence, reverse=True, return_last_state=True)
    h, last = (jax.jit(sharded) if jit else sharded)(a, x, h0)
    want_h, want_last = plain(a, x, h0)
    assert h.sharding.spec[:2] == (None, "seq")
    assert_close_to_scale(h, want_h)
    assert_close_to_scale(last, want_last)
    _, grads = values_and_grads(sharded, linear_loss, a, x, h0)
    _, want_grads = values_and_grads(plain, linear_loss, a, x, h0)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_to_scale(g, w)


@pytest.mark.parametrize("jit", [False, True])
def test_matrix_with_an_explicit_mesh_passed_as_argument(jit):
    """As above, for the matrix recurrence."""
    inputs = matrix_inputs()
    mesh = explicit_mesh()
    sharded = functools.partial(
        sharded_matrix_recurrence, axis_name="seq", mesh=mesh, scale=0.7, return_last_state=True
    )
    plain = functools.partial(matrix_recurrence, scale=0.7, return_last_state=True)
    o, last = (jax.jit(sharded) if jit else sharded)(*inputs)
    want_o, want_last = plain(*inputs)
    assert o.sharding.spec[:2] == (None, "seq")
    assert_close_to_scale(o, want_o)
    assert_close_to_scale(last, want_last)
    _, grads = values_and_grads(sharded, matrix_loss, *inputs)
    _, want_grads = values_and_grads(plain, matrix_loss, *inputs)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_to_scale(g, w)


# --- an initial state that promotes the matrix recurrence


def test_matrix_complex_h0_promotes_as_unsharded():
    """float32 inputs with a complex64 h0: complex states and outputs, as matrix_recurrence
    (the sharded op cast h0 to float32, dropping its imaginary part: 0.68 off)."""
    q, k, v, g, h0 = matrix_inputs(shape=(1, 8, 1, 2), value_dim=2)
    h0 = h0 + 1j * jnp.flip(h0, -1)
    sharded = functools.partial(sharded_matrix_recurrence, axis_name="seq", return_last_state=True)
    with jax.set_mesh(explicit_mesh()):
        o, last = jax.jit(sharded)(q, k, v, g, h0)
    want_o, want_last = matrix_recurrence(q, k, v, g, h0, return_last_state=True)
    assert o.dtype == want_o.dtype == jnp.complex64
    assert last.dtype == want_last.dtype == jnp.complex64
    assert_close_to_scale(o, want_o)
    assert_close_to_scale(last, want_last)


def test_matrix_float64_h0_promotes_as_unsharded():
    """float32 inputs with a float64 h0 (x64 on): the states and outputs in float64, as
    matrix_recurrence (the sharded op computed and returned float32)."""
    q, k, v, g, h0 = matrix_inputs(shape=(1, 8, 1, 2), value_dim=2)
    with jax.enable_x64(True):
        h0 = jnp.asarray(h0, jnp.float64) + 2.0**-30
        sharded = functools.partial(
            sharded_matrix_recurrence, axis_name="seq", return_last_state=True
        )
        with jax.set_mesh(explicit_mesh()):
            o, last = jax.jit(sharded)(q, k, v, g, h0)
        want_o, want_last = matrix_recurrence(q, k, v, g, h0, return_last_state=True)
        assert o.dtype == want_o.dtype == jnp.float64
        assert last.dtype == want_last.dtype == jnp.float64
        assert_close_to_scale(o, want_o, rtol=1e-12)
        assert_close_to_scale(last, want_last, rtol=1e-12)


# --- a batch sharded over a tuple of mesh axes that includes the sequence axis


def test_linear_batch_sharded_over_a_tuple_with_the_sequence_axis():
    """A batch over ("data", "seq") on a 2 x 4 Explicit mesh, the time axis split over "seq":
    the batch keeps "data" inside the op (it raised DuplicateSpecError for
    P(("data", "seq"), "seq", None)), and the outputs come back in the input's sharding."""
    (a, x, h0), _ = linear_inputs(shape=(8, 16, 4))
    plain = functools.partial(linear_recurrence, return_last_state=True)
    (want_h, want_last), want_grads = values_and_grads(plain, linear_loss, a, x, h0)
    with jax.set_mesh(explicit_mesh((2, 4), ("data", "seq"))):
        a, x = (jax.device_put(t, P(("data", "seq"))) for t in (a, x))
        h0 = jax.device_put(h0, P(("data", "seq")))
        sharded = functools.partial(
            sharded_linear_recurrence, axis_name="seq", return_last_state=True
        )
        (h, last), grads = values_and_grads(sharded, linear_loss, a, x, h0)
    assert h.sharding.spec == P(("data", "seq"), None, None)
    assert last.sharding.spec == P(("data", "seq"), None)
    assert_close_to_scale(h, want_h)
    assert_close_to_scale(last, want_last)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_to_scale(g, w)


def test_matrix_batch_sharded_over_a_tuple_with_the_sequence_axis():
    """As above, for the matrix recurrence."""
    inputs = matrix_inputs(shape=(8, 16, 2, 3))
    plain = functools.partial(matrix_recurrence, scale=0.7, return_last_state=True)
    (want_o, want_last), want_grads = values_and_grads(plain, matrix_loss, *inputs)
    with jax.set_mesh(explicit_mesh((2, 4), ("data", "seq"))):
        inputs = tuple(jax.device_put(t, P(("data", "seq"))) for t in inputs)
        sharded = functools.partial(
            sharded_matrix_recurrence, axis_name="seq", scale=0.7, return_last_state=True
        )
        (o, last), grads = values_and_grads(sharded, matrix_loss, *inputs)
    assert o.sharding.spec == P(("data", "seq"), None, None, None)
    assert_close_to_scale(o, want_o)
    assert_close_to_scale(last, want_last)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close_to_scale(g, w)


@pytest.mark.slow  # a layer and its gradient compiled sharded and unsharded: ~3 s each
@pytest.mark.parametrize(
    "make_layer, mesh_shape, batch_spec, sequence_axis",
    [
        # The library's own layout: batch_sharding(mesh, 3) = P(("data", "fsdp")), the
        # sequence over "fsdp".
        (lambda **kw: HGRU(8, method="sequential", **kw), (2, 2, 2), None, "fsdp"),
        (
            lambda **kw: HGRU(8, bidirectional=True, method="sequential", **kw),
            (2, 2, 2),
            None,
            "fsdp",
        ),
        (lambda **kw: HGRN2(8, method="sequential", **kw), (2, 2, 2), None, "fsdp"),
        # The batch over the sequence axis alone.
        (lambda **kw: HGRU(8, method="sequential", **kw), (4, 2, 1), P("data"), "data"),
    ],
    ids=["hgru", "hgru-bidirectional", "hgrn2", "hgru-batch-on-sequence-axis"],
)
def test_layer_batch_sharded_over_the_sequence_axis(
    make_layer, mesh_shape, batch_spec, sequence_axis
):
    """A layer whose input batch is sharded over its own sequence axis (Explicit mesh): the
    sharded scan's outputs come back in the input's sharding, so they combine with the layer's
    other values (a ShardingTypeError in the output gate before), and the layer equals the
    unsharded one, outputs and parameter gradients."""
    x = jax.random.normal(jax.random.key(0), (4, 12, 8))
    loss = lambda layer, x: jnp.sum(layer(x, 0.3) ** 2)
    plain = make_layer(rngs=nnx.Rngs(0))
    want, want_grads = plain(x, 0.3), nnx.grad(loss)(plain, x)
    layer = make_layer(rngs=nnx.Rngs(0), sequence_axis=sequence_axis)
    mesh = explicit_mesh(mesh_shape, sharding.MESH_AXES)
    with jax.set_mesh(mesh):
        spec = sharding.batch_sharding(mesh, 3).spec if batch_spec is None else batch_spec
        x = jax.device_put(x, spec)
        y = nnx.jit(lambda layer, x: layer(x, 0.3))(layer, x)
        grads = nnx.jit(nnx.grad(loss))(layer, x)
    assert y.sharding.spec[0] == x.sharding.spec[0]
    assert_close_to_scale(y, want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert_close_to_scale(g, w)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_a_padded_sharded_scan_passes_its_initial_state_through_the_padding(reverse):
    """A length (13) that the axis (8) does not divide is padded with identity steps: a reverse
    scan enters its initial state through them unchanged. (The layers call this with no initial
    state; a user's call with one was untested.)"""
    from hgrn_jax.ops.sequence_parallel import padded_sharded_linear_recurrence

    (a, x, h0), _ = linear_inputs(shape=(2, 13, 3))
    with jax.set_mesh(jax.make_mesh((8,), ("seq",))):
        got = padded_sharded_linear_recurrence(a, x, h0, axis_name="seq", reverse=reverse)
    want = linear_recurrence(a, x, h0, reverse=reverse)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

"""HGRN2's matrix recurrence: every method's values and gradients against a float64 NumPy loop
(with a hand-written adjoint) and JAX autodiff of a plain ``lax.scan``; bf16 accumulation; a
4096-step sequence whose cumulative decays underflow; the Pallas kernel's Triton lowering;
shape errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_text

from hgrn_jax.ops import MATRIX_METHODS, default_matrix_method, matrix_recurrence
from hgrn_jax.ops.matrix_recurrence import _pallas

# float64 throughout: the methods differ only in the order of float64 roundings over <= 45 steps
# of O(1) values, ~1e-15 relative; 1e-11 leaves room and still catches any wrong term.
F64_TOL = 1e-11


def loop_reference(q, k, v, g, h0, scale):
    """float64 loop over time on (B..., L, H, ·) arrays; returns o, the last state and all
    states (..., L, H, K, V)."""
    q, k, v, g = (np.asarray(t, np.float64) for t in (q, k, v, g))
    state = np.array(h0, np.float64)
    o = np.zeros(v.shape)
    states = np.zeros(q.shape + v.shape[-1:])
    for t in range(q.shape[-3]):
        state = (
            np.exp(g[..., t, :, :])[..., None] * state
            + k[..., t, :, :, None] * v[..., t, :, None, :]
        )
        states[..., t, :, :, :] = state
        o[..., t, :, :] = scale * np.einsum("...hk,...hkv->...hv", q[..., t, :, :], state)
    return o, state, states


def loop_adjoint(q, k, v, g, h0, scale, do, dlast):
    """float64 gradients of ``sum(o * do) + sum(last * dlast)`` by the adjoint recurrence
    ``D_{t-1} = exp(g_t) D_t + scale * q_{t-1} do_{t-1}^T`` (D = dL/dS), walked back in time."""
    q, k, v, g, do = (np.asarray(t, np.float64) for t in (q, k, v, g, do))
    _, _, states = loop_reference(q, k, v, g, h0, scale)
    adjoint = np.array(dlast, np.float64)
    dq, dk, dg = (np.zeros(q.shape) for _ in range(3))
    dv = np.zeros(v.shape)
    for t in reversed(range(q.shape[-3])):
        at = (Ellipsis, t, slice(None), slice(None))
        adjoint = adjoint + scale * q[at][..., None] * do[at][..., None, :]
        previous = states[..., t - 1, :, :, :] if t else np.asarray(h0, np.float64)
        dq[at] = scale * np.einsum("...kv,...v->...k", states[..., t, :, :, :], do[at])
        dk[at] = np.einsum("...kv,...v->...k", adjoint, v[at])
        dv[at] = np.einsum("...kv,...k->...v", adjoint, k[at])
        dg[at] = np.exp(g[at]) * np.sum(adjoint * previous, axis=-1)
        adjoint = np.exp(g[at])[..., None] * adjoint
    return dq, dk, dv, dg, adjoint


def scan_reference(q, k, v, g, h0, scale):
    """A plain ``lax.scan`` on (B, L, H, ·) arrays: JAX autodiff of it is a gradient reference."""

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = jnp.exp(g_t)[..., None] * state + k_t[..., None] * v_t[..., None, :]
        return state, scale * jnp.einsum("bhk,bhkv->bhv", q_t, state)

    last, o = jax.lax.scan(step, h0, tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v, g)))
    return jnp.moveaxis(o, 0, 1), last


def value_and_grads(loss, *inputs, has_aux=False):
    """``jax.value_and_grad(loss)`` w.r.t. every input, compiled as one function (run eagerly,
    each of its many small ops is compiled on its own, at several times the CPU time)."""
    argnums = tuple(range(len(inputs)))
    return jax.jit(jax.value_and_grad(loss, argnums, has_aux=has_aux))(*inputs)


def make_inputs(batch_shape, length, heads, key_dim, value_dim, seed=0, log_decay_scale=3.0):
    """q, k, v, log_decay, h0 in float64; forget gates spread over (0.05, 1), scaled in log space
    so some steps decay hard (log_decay down to ~ -9)."""
    rng = np.random.default_rng(seed)
    qk = batch_shape + (length, heads, key_dim)
    q = rng.normal(size=qk)
    k = rng.normal(size=qk)
    v = rng.normal(size=batch_shape + (length, heads, value_dim))
    g = log_decay_scale * np.log(rng.uniform(0.05, 1.0, qk))
    h0 = rng.normal(size=batch_shape + (heads, key_dim, value_dim))
    return q, k, v, g, h0


# (method, chunk_size, length). For the chunked form: 16 with L = 45 (3 chunks, the last one
# ragged, one sub-chunk each); 32 with L = 45 (2 sub-chunks per chunk: the cross-sub-chunk
# factors); 8 (chunks shorter than a sub-chunk); the default 64 with L = 37 (one chunk padded to
# 48 = 3 sub-chunks). The other methods' chunks only set where boundary states are stored.
CHUNKINGS = [
    ("chunked", 16, 45),
    ("chunked", 32, 45),
    ("chunked", 8, 45),
    ("chunked", 64, 37),
    ("sequential", 16, 45),
    ("pallas", 16, 45),
]


@pytest.mark.parametrize("method,chunk_size,length", CHUNKINGS)
def test_values_match_float64_loop(method, chunk_size, length):
    """Two leading axes, 3 heads, K = 5 != V = 7, h0 and the last state."""
    q, k, v, g, h0 = make_inputs((2, 1), length, 3, 5, 7, seed=chunk_size)
    ours = functools.partial(
        matrix_recurrence, scale=0.7, method=method, return_last_state=True, chunk_size=chunk_size
    )
    with jax.enable_x64(True):
        o, last = jax.jit(ours)(q, k, v, g, h0)
    want, want_last, _ = loop_reference(q, k, v, g, h0, 0.7)
    assert o.shape == (2, 1, length, 3, 7) and last.shape == (2, 1, 3, 5, 7)
    assert o.dtype == last.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(o), want, rtol=F64_TOL, atol=F64_TOL)
    np.testing.assert_allclose(np.asarray(last), want_last, rtol=F64_TOL, atol=F64_TOL)


def weighted_loss(fn, do, dlast, *args):
    """``sum(o * do) + sum(last * dlast)`` of ``fn(*args) = (o, last)``."""
    o, last = fn(*args)
    return jnp.sum(o * do) + jnp.sum(last * dlast)


@functools.cache
def gradient_references(seed: int) -> tuple[tuple, tuple, tuple, list]:
    """Inputs (B, L, H, K) = (2, 45, 2, 4), V = 6, the cotangents (do, dlast), the float64
    adjoint loop's gradients and autodiff of lax.scan's, for scale 0.4: computed once for every
    method of :func:`test_gradients_match_float64_adjoint_and_autodiff`."""
    q, k, v, g, h0 = make_inputs((2,), 45, 2, 4, 6, seed=seed)
    rng = np.random.default_rng(3)
    do = rng.normal(size=v.shape)
    dlast = rng.normal(size=h0.shape)
    scan = functools.partial(scan_reference, scale=0.4)
    with jax.enable_x64(True):
        _, autodiff = value_and_grads(
            functools.partial(weighted_loss, scan, do, dlast), q, k, v, g, h0
        )
    adjoint = loop_adjoint(q, k, v, g, h0, 0.4, do, dlast)
    return (q, k, v, g, h0), (do, dlast), adjoint, [np.asarray(t) for t in autodiff]


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_gradients_match_float64_adjoint_and_autodiff(method, chunk_size=32):
    """Gradients for q, k, v, log_decay and h0 of a loss on o and on the last state (45 steps:
    two chunks of two sub-chunks, the last chunk ragged) against the float64 adjoint loop and
    autodiff of lax.scan."""
    inputs, (do, dlast), adjoint, autodiff = gradient_references(10 + chunk_size)
    ours = functools.partial(
        matrix_recurrence, scale=0.4, method=method, return_last_state=True, chunk_size=chunk_size
    )
    with jax.enable_x64(True):
        _, got = value_and_grads(functools.partial(weighted_loss, ours, do, dlast), *inputs)
    for name, ours_, loop_, auto_ in zip(
        ("dq", "dk", "dv", "dlog_decay", "dh0"), got, adjoint, autodiff
    ):
        assert ours_.shape == loop_.shape and ours_.dtype == jnp.float64, name
        np.testing.assert_allclose(
            np.asarray(ours_), loop_, rtol=F64_TOL, atol=F64_TOL, err_msg=name
        )
        np.testing.assert_allclose(
            np.asarray(auto_), loop_, rtol=F64_TOL, atol=F64_TOL, err_msg=name
        )


@pytest.mark.parametrize("key_dim,value_dim", [(3, 4), (4, 3)])
@pytest.mark.parametrize("chunk_size,length", [(1, 5), (16, 1), (16, 17), (16, 33), (32, 16)])
def test_sequential_at_chunk_edges(chunk_size, length, key_dim, value_dim):
    """The sequential loops hold states (V, K) when K >= V, else (K, V), and the backward's
    loop applies each step's decay one iteration early (step t's iteration applies step t+1's;
    a chunk's first step's after its loop): values, last state and gradients against the
    float64 loops, with one-step chunks, L = 1, a step past a chunk (L = 17, 33: the last chunk
    ragged) and a sequence shorter than its chunk, h0 and a loss on the last state."""
    q, k, v, g, h0 = make_inputs((2,), length, 2, key_dim, value_dim, seed=20 + length)
    rng = np.random.default_rng(21)
    do = rng.normal(size=v.shape)
    dlast = rng.normal(size=h0.shape)
    ours = functools.partial(
        matrix_recurrence,
        scale=0.6,
        method="sequential",
        return_last_state=True,
        chunk_size=chunk_size,
    )

    def loss(*args):
        o, last = ours(*args)
        return jnp.sum(o * do) + jnp.sum(last * dlast), (o, last)

    with jax.enable_x64(True):
        (_, (o, last)), got = value_and_grads(loss, q, k, v, g, h0, has_aux=True)
    want_o, want_last, _ = loop_reference(q, k, v, g, h0, 0.6)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=F64_TOL, atol=F64_TOL)
    np.testing.assert_allclose(np.asarray(last), want_last, rtol=F64_TOL, atol=F64_TOL)
    want = loop_adjoint(q, k, v, g, h0, 0.6, do, dlast)
    for name, ours_, loop in zip(("dq", "dk", "dv", "dlog_decay", "dh0"), got, want):
        np.testing.assert_allclose(
            np.asarray(ours_), loop, rtol=F64_TOL, atol=F64_TOL, err_msg=name
        )


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_without_h0_or_last_state_float32(method):
    """Defaults: zero h0, no last state, float32 in and out, the scale; float32 accumulation over
    40 contracting steps of O(1) values: a few ulps of the O(1..10) outputs, below 2e-5."""
    q, k, v, g, _ = make_inputs((3,), 40, 2, 8, 4, seed=5)
    ours = functools.partial(matrix_recurrence, scale=0.25, method=method, chunk_size=16)
    o = jax.jit(ours)(*(t.astype(np.float32) for t in (q, k, v, g)))
    want, _, _ = loop_reference(
        *(t.astype(np.float32) for t in (q, k, v, g)), np.zeros((3, 2, 8, 4)), 0.25
    )
    assert o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_bf16_inputs_accumulate_in_float32(method):
    """bf16 in: outputs in bf16 by default, states and gradients accumulated in float32."""
    q, k, v, g, h0 = make_inputs((2,), 33, 2, 4, 4, seed=7, log_decay_scale=0.5)
    q16, k16, v16, g16 = (jnp.asarray(t, jnp.bfloat16) for t in (q, k, v, g))
    exact, exact_last, _ = loop_reference(
        *(np.asarray(t, np.float64) for t in (q16, k16, v16, g16)), h0, 1.0
    )
    ours = functools.partial(matrix_recurrence, method=method, chunk_size=16)
    o16, last = jax.jit(functools.partial(ours, return_last_state=True))(
        q16, k16, v16, g16, h0.astype(np.float32)
    )
    assert o16.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    # One bf16 rounding of each output (relative 2^-8), nothing accumulated in bf16 (33 steps
    # of bf16 accumulation would be off by several bf16 ulps).
    np.testing.assert_allclose(
        np.asarray(o16, np.float64), exact, rtol=2**-8, atol=2**-8 * np.abs(exact).max() / 8
    )
    # The last state never went through bf16: float32 rounding only.
    np.testing.assert_allclose(np.asarray(last), exact_last, rtol=1e-5, atol=1e-5)
    w = np.random.default_rng(8).normal(size=v.shape)

    def loss(q, k, v, g):
        o = ours(q, k, v, g, h0.astype(np.float32), out_dtype=jnp.float32)
        return jnp.sum(o * w), o

    (_, o32), grads = value_and_grads(loss, q16, k16, v16, g16, has_aux=True)
    assert o32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o32), exact, rtol=1e-5, atol=1e-5)
    exact_grads = loop_adjoint(
        *(np.asarray(t, np.float64) for t in (q16, k16, v16, g16)), h0, 1.0, w, np.zeros(h0.shape)
    )
    for name, got, want in zip(("dq", "dk", "dv", "dlog_decay"), grads, exact_grads):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            want,
            rtol=2**-7,
            atol=2**-7 * np.abs(want).max(),
            err_msg=name,
        )


def test_scale_may_be_traced_and_differentiated():
    """``scale`` as a traced argument under jit, and its gradient: d/dc sum(o * w) = sum(o/c * w)."""
    q, k, v, g, h0 = make_inputs((1,), 20, 2, 3, 4, seed=14)
    w = np.random.default_rng(15).normal(size=v.shape)

    def loss(scale):
        return jnp.sum(matrix_recurrence(q, k, v, g, h0, scale=scale, method="sequential") * w)

    with jax.enable_x64(True):
        value, grad = jax.jit(jax.value_and_grad(loss))(jnp.float64(0.3))
    want, _, _ = loop_reference(q, k, v, g, h0, 1.0)
    np.testing.assert_allclose(float(value), 0.3 * np.sum(want * w), rtol=F64_TOL)
    np.testing.assert_allclose(float(grad), np.sum(want * w), rtol=F64_TOL)


def long_inputs(length=4096, seed=11):
    """B = 1, H = 2, K = V = 8; log forget gates log sigmoid(f), f ~ N(0, 3): per-step log decays
    down to ~ -12, so the cumulative decay exp(sum g) underflows within a few dozen steps."""
    rng = np.random.default_rng(seed)
    shape = (1, length, 2, 8)
    g = -np.logaddexp(0.0, -3.0 * rng.normal(size=shape))  # log sigmoid
    k = 1.0 - np.exp(g)
    q = rng.normal(size=shape)
    v = rng.normal(size=shape)
    return tuple(t.astype(np.float32) for t in (q, k, v, g))


def test_long_sequence_chunked_matches_sequential_where_cumulative_decay_underflows():
    """L = 4096: the chunked method's values and gradients equal the sequential scan's (and the
    float64 loop's) to float32 precision, although the naive factors exp(+-cumsum g) are 0 / inf.

    Tolerance 5e-5 relative to the largest value: inside a chunk of 64 steps the cumulative log
    decay reaches |b| ~ 200, whose float32 rounding (|b| * 2^-24 ~ 1e-5) is the relative error of
    each factor exp(b_i - b_j); the recurrence contracts, so these errors do not grow with L
    (measured: chunked within 5.5e-6 of the largest |value| in every output, sequential within
    3e-7 of float64). A wrong or overflowing term (inf/nan, or a missing decay) is off by O(1).
    """
    q, k, v, g = long_inputs()
    cumulative = np.cumsum(g, axis=1)
    with np.errstate(over="ignore"):
        assert np.exp(cumulative).min() == 0.0 and np.isinf(np.exp(-cumulative)).any()
    w = np.random.default_rng(12).normal(size=v.shape).astype(np.float32)

    def loss(method, q, k, v, g):
        o = matrix_recurrence(q, k, v, g, method=method)
        return jnp.sum(o * w), o

    results = {}
    for method in ("chunked", "sequential"):
        (_, o), grads = value_and_grads(functools.partial(loss, method), q, k, v, g, has_aux=True)
        results[method] = (o,) + tuple(grads)
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(t, jnp.float64) for t in (q, k, v, g))
        h0 = jnp.zeros((1, 2, 8, 8), jnp.float64)

        def loss64(*args):
            o = scan_reference(*args, h0, 1.0)[0]
            return jnp.sum(o * w), o

        (_, o64), grads64 = value_and_grads(loss64, *args64, has_aux=True)
        exact = (o64,) + tuple(grads64)
    names = ("o", "dq", "dk", "dv", "dlog_decay")
    for name, chunked, sequential, want in zip(
        names, results["chunked"], results["sequential"], exact
    ):
        want = np.asarray(want)
        tol = 5e-5 * np.abs(want).max()
        assert np.isfinite(np.asarray(chunked)).all(), name
        np.testing.assert_allclose(
            np.asarray(chunked), np.asarray(sequential), rtol=0, atol=tol, err_msg=name
        )
        np.testing.assert_allclose(np.asarray(chunked), want, rtol=0, atol=tol, err_msg=name)


def test_pallas_kernel_lowers_for_gpu():
    """The kernel lowers through Triton at key and value widths that need padding to powers of
    two, several value blocks, and a length (3 chunks of 16) that is not a power of two."""
    rows, length, key_dim, value_dim = 6, 48, 20, 40
    keys = jax.ShapeDtypeStruct((rows, length, key_dim), jnp.float32)
    values = jax.ShapeDtypeStruct((rows, length, value_dim), jnp.float32)
    state = jax.ShapeDtypeStruct((rows, key_dim, value_dim), jnp.float32)
    kernel = functools.partial(_pallas, scale=0.5, chunk=16, interpret=False)
    text = lowered_text(kernel, "cuda", keys, keys, values, keys, state)
    assert "triton" in text and "matrix_recurrence_forward" in text


def test_auto_picks_a_method_everywhere():
    for platform in ("cpu", "gpu", "tpu"):
        for length in (1, 255, 256, 100_000):
            assert default_matrix_method(length, platform) in MATRIX_METHODS
    assert default_matrix_method(4096, "gpu") == "chunked"  # matrix_recurrence_gpu.json
    q, k, v, g, _ = make_inputs((1,), 20, 1, 2, 3, seed=13)
    with jax.enable_x64(True):
        auto = jax.jit(matrix_recurrence)(q, k, v, g)
    np.testing.assert_allclose(
        np.asarray(auto),
        loop_reference(q, k, v, g, np.zeros((1, 1, 2, 3)), 1.0)[0],
        rtol=F64_TOL,
        atol=F64_TOL,
    )


def test_bad_shapes_and_arguments_name_the_fix():
    q, k, v, g, h0 = (np.asarray(t, np.float32) for t in make_inputs((2,), 8, 3, 4, 5))
    with pytest.raises(ValueError, match=r"q must be \(\.\.\., length, heads, key_dim\)"):
        matrix_recurrence(q[0, 0], k[0, 0], v[0, 0], g[0, 0])
    with pytest.raises(ValueError, match=r"log_decay \(2, 8, 3, 3\)"):
        matrix_recurrence(q, k, v, g[..., :3])
    with pytest.raises(
        ValueError,
        match=r"v must be \(\.\.\., length, heads, value_dim\) with "
        r"q's leading axes \(2, 8, 3\)",
    ):
        matrix_recurrence(q, k, v[:, :7], g)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3, 4, 5\)"):
        matrix_recurrence(q, k, v, g, h0[..., :3, :])
    with pytest.raises(ValueError, match="unknown method 'parallel'"):
        matrix_recurrence(q, k, v, g, method="parallel")
    with pytest.raises(
        ValueError, match="chunk_size must be a multiple of 16 or at most 16; got 40"
    ):
        matrix_recurrence(q, k, v, g, chunk_size=40)
    with pytest.raises(ValueError, match=r"out_dtype=float32 would drop the imaginary part"):
        matrix_recurrence(q, k, v.astype(np.complex64), g, out_dtype=jnp.float32)


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_every_method_reproduces_official_hgrn2_1d(golden, method):
    """hgru2-pytorch's ``Hgru2_1d`` (golden ``official_hgrn2_1d``, float64) with its recurrence
    done by each method: the projections and LayerNorm written out here, every shape and the
    head width read from the case (README, "HGRN2 cases")."""
    case = golden("official_hgrn2_1d")
    p = case.params
    key_dim = case.meta["derived"]["head_k_dim"]
    x = case.arrays["input"]  # (L, B, d) time-major
    width = x.shape[-1]
    heads = width // key_dim

    def layer(lower_bound):
        u, a, f = np.split(x @ p["in_proj.weight"].T + p["in_proj.bias"], 3, axis=-1)
        value = jax.nn.silu(u)
        query = jax.nn.sigmoid(a)
        forget = lower_bound + (1 - lower_bound) * jax.nn.sigmoid(f)

        def by_head(t):  # (L, B, d) -> (B, L, H, K)
            return jnp.swapaxes(t, 0, 1).reshape(t.shape[1], t.shape[0], heads, -1)

        o = matrix_recurrence(
            by_head(query),
            by_head(1 - forget),
            by_head(value),
            by_head(jnp.log(forget)),
            method=method,
            chunk_size=16,
        )
        o = jnp.swapaxes(o.reshape(o.shape[:2] + (width,)), 0, 1)
        mean = o.mean(-1, keepdims=True)
        normed = (o - mean) / jnp.sqrt(((o - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
        normed = normed * p["norm.weight"] + p["norm.bias"]
        return normed @ p["out_proj.weight"].T + p["out_proj.bias"]

    with jax.enable_x64(True):
        layer = jax.jit(layer)  # one compile for both lower bounds
        np.testing.assert_allclose(
            np.asarray(layer(case.arrays["lower_bound"])), case.arrays["output"], atol=1e-10, rtol=0
        )
        np.testing.assert_allclose(
            np.asarray(layer(0.0)), case.arrays["output/lb0"], atol=1e-10, rtol=0
        )


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_an_empty_sequence_is_an_error_as_in_linear_recurrence(method):
    q = jnp.ones((2, 0, 3, 4))
    v = jnp.ones((2, 0, 3, 5))
    with pytest.raises(ValueError, match=r"q has length 0 along the time axis -3 \(shape"):
        matrix_recurrence(q, q, v, q, method=method)


@pytest.mark.parametrize("hard", [-1e6, float(np.finfo(np.float32).min), -np.inf])
def test_decays_of_any_negative_size_match_the_sequential_method(hard):
    """Forget gates that close completely (log decay -1e6, float32's most negative number,
    -inf) for steps 5..29. The chunked method was off by 6 at -1e6 and nan at finfo.min (the
    cumulative sums of the chunk lost every digit, then overflowed), as were the Pallas
    method's gradients (its backward is the chunked one); the docstring promised "very
    negative values are fine".

    Tolerance: 2e-3 absolute on outputs of size ~5 and gradients of size ~20: after the clamp
    at -104.3 the chunk's cumulative decay reaches |b| ~ 2.6e3, whose float32 rounding
    (|b| * 2^-24 ~ 1.6e-4) is the relative error of each factor exp(b_i - b_j) (measured:
    8e-4 on outputs, 1.5e-3 on gradients); a wrong term is off by O(1)."""
    q, k, v, g, _ = (np.asarray(t, np.float32) for t in make_inputs((1,), 64, 1, 4, 4, seed=5))
    g[:, 5:30] = hard
    w = np.random.default_rng(6).normal(size=v.shape).astype(np.float32)

    def loss(method, q, k, v, g):
        o = matrix_recurrence(q, k, v, g, method=method)
        return jnp.sum(o * w), o

    results = {}
    for method in MATRIX_METHODS:
        (_, o), grads = value_and_grads(functools.partial(loss, method), q, k, v, g, has_aux=True)
        results[method] = (o,) + grads[:3]  # dlog_decay is 0 where exp(g) is: not compared
    want = loop_reference(q, k, v, np.maximum(g, -1e4), np.zeros((1, 1, 4, 4)), 1.0)[0]
    np.testing.assert_allclose(results["sequential"][0], want, rtol=1e-5, atol=1e-5)
    for method in ("chunked", "pallas"):
        for name, got, sequential in zip(
            ("o", "dq", "dk", "dv"), results[method], results["sequential"], strict=True
        ):
            assert np.isfinite(np.asarray(got)).all(), (method, name)
            np.testing.assert_allclose(got, sequential, rtol=0, atol=2e-3, err_msg=method + name)


def test_empty_batches_and_widths_give_empty_or_zero_results():
    """A batch of 0 rows (or 0 heads) gave ZeroDivisionError from a reshape; with key_dim 0 the
    state is empty and every output 0, as in ``linear_recurrence``'s empty batch."""
    for batch, heads, key_dim, value_dim in ((0, 2, 3, 4), (2, 0, 3, 4), (2, 2, 0, 4)):
        q = jnp.ones((batch, 5, heads, key_dim))
        v = jnp.ones((batch, 5, heads, value_dim))
        o, last = matrix_recurrence(q, q, v, -q, return_last_state=True)
        assert o.shape == (batch, 5, heads, value_dim) and not np.asarray(o).any()
        assert last.shape == (batch, heads, key_dim, value_dim) and last.dtype == jnp.float32


def test_h0_takes_part_in_the_dtype_and_integers_become_float32():
    """A complex (or wider) h0 was cast to the inputs' real dtype, dropping its imaginary part
    with only a ComplexWarning; integer inputs came back as truncated integers."""
    q, k, v, g, _ = (np.asarray(t, np.float32) for t in make_inputs((1,), 6, 1, 2, 2))
    h0 = np.full((1, 1, 2, 2), 1j, np.complex64)
    o, last = matrix_recurrence(q, k, v, g, h0, return_last_state=True, method="sequential")
    want_o, want_last, _ = loop_reference(q, k, v, g, h0.imag, 1.0)  # linear in the state
    without_h0 = loop_reference(q, k, v, g, np.zeros((1, 1, 2, 2)), 1.0)
    assert o.dtype == last.dtype == jnp.complex64
    np.testing.assert_allclose(o.imag, want_o - without_h0[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last.imag, want_last - without_h0[1], rtol=1e-5, atol=1e-5)
    ints = (np.ones((1, 3, 1, 2), np.int32),) * 3 + (np.zeros((1, 3, 1, 2), np.int32),)
    from_ints = matrix_recurrence(*ints)
    assert from_ints.dtype == jnp.float32
    np.testing.assert_array_equal(from_ints, loop_reference(*ints, np.zeros((1, 1, 2, 2)), 1.0)[0])
    with pytest.raises(ValueError, match="out_dtype=int32 would truncate the states"):
        matrix_recurrence(q, k, v, g, out_dtype=jnp.int32)


NAN_STEP = 20  # inside the second chunk of 16 steps (L = 40): steps 16..19 come before it


def _with_bad_step(inputs, name, bad):
    """``inputs`` (q, k, v, g) float32 with every channel of ``name`` at row 0, step NAN_STEP
    set to ``bad``."""
    index = "qkvg".index(name)
    return tuple(t.at[0, NAN_STEP].set(bad) if i == index else t for i, t in enumerate(inputs))


@pytest.mark.parametrize("name,bad", [("v", np.nan), ("k", np.nan), ("v", np.inf)])
def test_a_non_finite_input_reaches_no_earlier_output(name, bad):
    """A causal recurrence: a nan or inf at step 20 leaves every output before it exactly as
    without it, by every method (the chunked one multiplied later values and keys by the 0
    scores of its causal mask, spreading nan back to step 16, the chunk's start), and makes the
    outputs from step 20 on non-finite."""
    q, k, v, g, _ = make_inputs((2,), 40, 1, 4, 4, seed=11)
    inputs = tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v, g))
    bad_inputs = _with_bad_step(inputs, name, bad)
    for method in MATRIX_METHODS:
        run = jax.jit(functools.partial(matrix_recurrence, method=method, chunk_size=16))
        clean, got = np.asarray(run(*inputs)), np.asarray(run(*bad_inputs))
        np.testing.assert_array_equal(got[0, :NAN_STEP], clean[0, :NAN_STEP], err_msg=method)
        np.testing.assert_array_equal(got[1], clean[1], err_msg=method)
        assert not np.isfinite(got[0, NAN_STEP]).all(), method


@pytest.mark.parametrize("name", ["v", "k"])
def test_a_nan_input_leaves_the_gradients_of_earlier_outputs_finite(name):
    """The gradients of a loss on the outputs before a nan at step 20 are those without it at
    every earlier step: q, k and v exactly (to float32 rounding: the two runs' arrays differ in
    position only); log_decay in the chunks before the nan's (within its chunk every method's
    ``dg`` sums ``k dk`` over the later steps, and ``dk`` at the nan step is ``0 * nan``)."""
    q, k, v, g, _ = make_inputs((2,), 40, 1, 4, 4, seed=12)
    inputs = tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v, g))
    bad_inputs = _with_bad_step(inputs, name, np.nan)
    for method in MATRIX_METHODS:

        def loss(*args, method=method):
            o = matrix_recurrence(*args, method=method, chunk_size=16)
            return jnp.sum(o[:, :NAN_STEP] ** 2)

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        for clean, got, until in zip(grads(*inputs), grads(*bad_inputs), (20, 20, 20, 16)):
            np.testing.assert_allclose(
                np.asarray(got[:, :until]), np.asarray(clean[:, :until]), rtol=1e-6, err_msg=method
            )


@pytest.mark.parametrize("chunk_size", [True, 2.5, "64", 0])
def test_a_chunk_size_that_is_no_whole_number_is_named(chunk_size):
    """True ran as 1 (sequential) or was "iota does not accept dtype bool" (chunked); 2.5 and
    "64" were TypeErrors from inside the scans. linear_recurrence already refused them."""
    q = jnp.ones((1, 4, 1, 2))
    for method in ("sequential", "chunked"):
        with pytest.raises(ValueError, match=r"^chunk_size must be a whole number >= 1; got"):
            matrix_recurrence(q, q, q, -q, method=method, chunk_size=chunk_size)


def test_pallas_names_complex_states_it_does_not_run():
    """A complex h0 (or inputs) with method='pallas' was NotImplementedError: complex64 from
    inside the Pallas interpreter; sequential and chunked run them."""
    q = jnp.ones((1, 3, 1, 2))
    h0 = jnp.full((1, 1, 2, 2), 1j, jnp.complex64)
    with pytest.raises(ValueError, match=r"^method='pallas' runs real states only; these are "):
        matrix_recurrence(q, q, q, -q, h0, method="pallas")
    assert matrix_recurrence(q, q, q, -q, h0, method="chunked").dtype == jnp.complex64


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_second_derivatives_match_the_scan_s(method):
    """A Hessian-vector product (grad of grad) against JAX's autodiff of a plain scan, in
    float64: the backward pass is differentiated again, through the boundary states the forward
    kept. ``"pallas"`` failed there ("Linearization failed": JAX cannot linearize a
    ``pallas_call``); its forward now takes the chunked form's tangents. rtol 1e-10: float64
    sums in another order."""
    with jax.enable_x64(True):
        q, k, v, g, h0 = (jnp.asarray(t) for t in make_inputs((1,), 19, 1, 3, 2, seed=4))
        direction = jnp.asarray(np.random.default_rng(5).normal(size=v.shape))

        def hvp(recurrence):
            def loss(v):
                return jnp.sum(jnp.sin(recurrence(v)))

            return jax.jit(jax.grad(lambda v: jnp.vdot(jax.grad(loss)(v), direction)))(v)

        got = hvp(lambda v: matrix_recurrence(q, k, v, g, h0, method=method, chunk_size=16))
        want = hvp(lambda v: scan_reference(q, k, v, g, h0, 1.0)[0])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_an_eager_call_is_compiled_once_per_shape_and_setting(monkeypatch):
    """As for ``linear_recurrence``: an eager call runs a compiled copy, not the chunk loops
    traced again at every call (about 0.1 s each on CPU)."""
    import importlib

    module = importlib.import_module("hgrn_jax.ops.matrix_recurrence")  # not the function

    traced = []
    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *args: traced.append(1) or forward(*args))
    module._compiled_matrix_recurrence.clear_cache()
    q = jax.random.normal(jax.random.key(0), (2, 7, 3, 5))  # shapes no other test uses
    v = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))
    g = -jnp.abs(q)
    first = matrix_recurrence(q, 1 - jnp.exp(g), v, g, scale=0.5, return_last_state=True)
    again = matrix_recurrence(q, 1 - jnp.exp(g), v, g, scale=0.25, return_last_state=True)
    assert len(traced) == 1  # scale is an array argument, not a setting
    np.testing.assert_allclose(again[0], first[0] / 2, rtol=1e-6)
    np.testing.assert_array_equal(again[1], first[1])


def test_an_eager_call_keeps_out_dtype():
    """The compiled copy of an eager call is given the caller's ``out_dtype``: the outputs are
    what the same call under ``jax.jit`` gives, bfloat16 from float32 inputs."""
    q = jax.random.normal(jax.random.key(2), (1, 3, 2, 4))
    g = -jnp.abs(q)
    got = matrix_recurrence(q, q, q, g, out_dtype=jnp.bfloat16)
    want = jax.jit(lambda q, g: matrix_recurrence(q, q, q, g, out_dtype=jnp.bfloat16))(q, g)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want)


def test_an_eager_call_under_disable_jit_runs_op_by_op():
    """Under ``jax.disable_jit()`` the compiled copy called itself without end (RecursionError)."""
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    g = -jnp.abs(q)
    want = jax.jit(matrix_recurrence)(q, q, q, g)
    with jax.disable_jit():
        got = matrix_recurrence(q, q, q, g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # op by op: other rounding

"""``linear_recurrence`` against a float64 NumPy loop, its custom VJP, jit and sharding.

Test data: decays with modulus in [0.9, 1) (so that states carry over ~10-100 steps and the
whole sequence matters) and standard normal inputs; complex decays have a random phase.

Tolerances:
- float32 (atol 1e-4, rtol 1e-5): states have modulus up to ~10, float32 rounding is 6e-8
  relative per operation and errors are damped by |a| < 1, so the measured worst error over
  L = 1000 is ~5e-6 (associative) and ~2e-6 (sequential); 1e-4 leaves a 20x margin.
- bfloat16 output: the states are accumulated in float32 (error ~1e-5 as above) and rounded
  once to bfloat16, whose round-to-nearest error is at most 2^-8 of the value (8 significant
  bits). Hence |out - loop| <= 2^-8 |loop| + 1e-4.
- float64 gradients: finite differences with eps 1e-4 (check_grads' defaults for float64), and
  our VJP against JAX's own differentiation of ``lax.scan``: same maths, so 1e-10.

Compilation dominates the runtime on CPU, so most tests jit one function that runs every method
and direction at once and then check each result separately.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from hgrn_jax.ops import default_method, linear_recurrence

# The pure-JAX methods ("pallas" has its own tests in test_pallas.py).
CORE_METHODS = ("sequential", "associative", "chunked")
ALL_METHODS = CORE_METHODS + ("auto",)
DIRECTIONS = {"forward": False, "reverse": True}
F32_TOL = dict(atol=1e-4, rtol=1e-5)
BF16_RTOL = 2.0**-8
BF16_ATOL = 1e-4


def loop_reference(a, x, h0=None, reverse=False) -> np.ndarray:
    """All states of h_t = a_t h_{t-1} + x_t by a plain loop in float64 / complex128."""
    x = np.asarray(x, dtype=np.result_type(np.asarray(x).dtype, np.float64))
    a = np.broadcast_to(
        np.asarray(a, dtype=np.result_type(np.asarray(a).dtype, np.float64)), x.shape
    )
    dtype = np.result_type(a, x)
    length = x.shape[-2]
    h = np.zeros(x.shape[:-2] + x.shape[-1:], dtype)
    if h0 is not None:
        h = h + np.asarray(h0, np.result_type(np.asarray(h0).dtype, np.float64))
        dtype = h.dtype
    out = np.empty(x.shape, dtype)
    for t in range(length - 1, -1, -1) if reverse else range(length):
        h = a[..., t, :] * h + x[..., t, :]
        out[..., t, :] = h
    return out


def random_inputs(shape, *, complex_valued=False, dtype=np.float32, seed=0, with_h0=False):
    """(a, x, h0) with |a| in [0.9, 1); h0 is None unless ``with_h0``."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.9, 1.0, shape)
    x = rng.standard_normal(shape)
    h0 = rng.standard_normal(shape[:-2] + shape[-1:]) if with_h0 else None
    if complex_valued:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
        x = x + 1j * rng.standard_normal(shape)
        if with_h0:
            h0 = h0 + 1j * rng.standard_normal(h0.shape)
        dtype = np.result_type(dtype, np.complex64)
    cast = lambda v: None if v is None else v.astype(dtype)
    return cast(a), cast(x), cast(h0)


def scan_reference(a, x, h0, reverse=False):
    """The recurrence through a plain ``lax.scan``, differentiated by JAX itself."""

    def step(h, inputs):
        a_t, x_t = inputs
        h = a_t * h + x_t
        return h, h

    _, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, -2, 0), jnp.moveaxis(x, -2, 0)), reverse=reverse)
    return jnp.moveaxis(h, 0, -2)


def run_all(fn, methods=ALL_METHODS, directions=DIRECTIONS):
    """``{"method/direction": fn(method, reverse)}`` for every method and direction."""
    return {f"{m}/{d}": fn(m, r) for m in methods for d, r in directions.items()}


def key_reverse(key: str) -> bool:
    return DIRECTIONS[key.split("/")[1]]


# ------------------------------------------------------------------ values against the loop


@pytest.mark.slow
@pytest.mark.parametrize("length", [1, 2, 37, 1000])
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
def test_every_method_matches_loop(complex_valued, length):
    # Real inputs start from zeros (h0=None), complex ones from a given h0.
    a, x, h0 = random_inputs((2, length, 3), complex_valued=complex_valued, with_h0=complex_valued)
    results = jax.jit(
        lambda a, x, h0: run_all(
            lambda m, r: linear_recurrence(a, x, h0, reverse=r, method=m, return_last_state=True)
        )
    )(a, x, h0)
    for key, (out, last) in results.items():
        reverse = key_reverse(key)
        expected = loop_reference(a, x, h0, reverse)
        chex.assert_shape(out, x.shape)
        chex.assert_type([out, last], x.dtype)
        np.testing.assert_allclose(out, expected, **F32_TOL, err_msg=key)
        np.testing.assert_array_equal(last, out[:, 0] if reverse else out[:, -1], err_msg=key)


@pytest.mark.parametrize(
    "length,chunk_sizes",
    [
        (37, (1, 5, 37)),  # 5 doesn't divide 37 (64, the default, > 37 runs elsewhere)
        (1000, (8, 37)),  # 37 doesn't divide 1000 (nor does the default 64, run elsewhere)
    ],
)
def test_chunk_sizes(length, chunk_sizes):
    a, x, h0 = random_inputs((2, length, 3), complex_valued=True, with_h0=True)
    results = jax.jit(
        lambda a, x, h0: run_all(
            lambda c, r: linear_recurrence(a, x, h0, reverse=r, method="chunked", chunk_size=c),
            methods=chunk_sizes,
        )
    )(a, x, h0)
    for key, out in results.items():
        np.testing.assert_allclose(
            out,
            loop_reference(a, x, h0, key_reverse(key)),
            **F32_TOL,
            err_msg=f"chunk_size/direction {key}",
        )


def test_auto_runs_the_default_method():
    a, x, _ = random_inputs((2, 37, 3))
    # The measured choices (see default_method's docstring and benchmarks/results/).
    expected = {
        ("cpu", 1024): "sequential",
        ("cpu", 65536): "sequential",
        ("gpu", 1024): "associative",
        ("gpu", 4096): "pallas",
        ("gpu", 65536): "pallas",
        ("tpu", 4096): "pallas",
    }
    for (platform, length), method in expected.items():
        assert default_method(length, platform) == method, (platform, length)
    auto, chosen = jax.jit(
        lambda a, x: (
            linear_recurrence(a, x, method="auto"),
            linear_recurrence(a, x, method=default_method(37)),
        )
    )(a, x)
    np.testing.assert_array_equal(auto, chosen)


@pytest.mark.parametrize("shape", [(11, 3), (2, 3, 11, 4)], ids=["no_batch", "two_batch_axes"])
def test_leading_axes(shape):
    a, x, h0 = random_inputs(shape, complex_valued=True, with_h0=True)
    results = jax.jit(
        lambda a, x, h0: run_all(
            lambda m, r: linear_recurrence(a, x, h0, reverse=r, method=m, chunk_size=4),
            methods=CORE_METHODS,
        )
    )(a, x, h0)
    for key, out in results.items():
        np.testing.assert_allclose(
            out, loop_reference(a, x, h0, key_reverse(key)), **F32_TOL, err_msg=key
        )


def test_decay_broadcasts():
    _, x, _ = random_inputs((2, 11, 3))
    per_step = np.random.default_rng(1).uniform(0.9, 1.0, (11, 3)).astype(np.float32)
    scalar = np.float32(0.95)
    results = jax.jit(
        lambda a1, a2, x: run_all(
            lambda m, r: (
                linear_recurrence(a1, x, reverse=r, method=m, chunk_size=4),
                linear_recurrence(a2, x, reverse=r, method=m, chunk_size=4),
            ),
            methods=CORE_METHODS,
        )
    )(per_step, scalar, x)
    for key, (out_per_step, out_scalar) in results.items():
        reverse = key_reverse(key)
        np.testing.assert_allclose(
            out_per_step, loop_reference(per_step, x, reverse=reverse), **F32_TOL, err_msg=key
        )
        np.testing.assert_allclose(
            out_scalar, loop_reference(scalar, x, reverse=reverse), **F32_TOL, err_msg=key
        )


def test_streaming_with_the_last_state():
    """Feeding one part's last state as the next part's h0 reproduces the whole sequence."""
    a, x, h0 = random_inputs((2, 37, 3), complex_valued=True, with_h0=True)
    split = 20

    def halves(method, reverse):
        first, second = slice(None, split), slice(split, None)
        if reverse:  # the reverse recurrence consumes the end first
            first, second = second, first
        run = functools.partial(
            linear_recurrence, reverse=reverse, method=method, chunk_size=8, return_last_state=True
        )
        out1, state = run(a[:, first], x[:, first], h0)
        out2, last = run(a[:, second], x[:, second], state)
        whole = jnp.concatenate([out2, out1] if reverse else [out1, out2], axis=1)
        return whole, last, run(a, x, h0)

    for key, (streamed, last, (full, full_last)) in jax.jit(lambda: run_all(halves))().items():
        np.testing.assert_allclose(streamed, full, **F32_TOL, err_msg=key)
        np.testing.assert_allclose(last, full_last, **F32_TOL, err_msg=key)


# ------------------------------------------------------------------ low precision


def test_bfloat16_accumulates_in_float32():
    a, x, h0 = random_inputs((2, 1000, 3), dtype=jnp.bfloat16, with_h0=True)
    results = jax.jit(
        lambda a, x, h0: run_all(
            lambda m, r: (
                linear_recurrence(a, x, h0, reverse=r, method=m),
                linear_recurrence(a, x, h0, reverse=r, method=m, out_dtype=jnp.float32),
            ),
            methods=CORE_METHODS,
        )
    )(a, x, h0)
    for key, (out, wide) in results.items():
        # The loop sees exactly the bf16-rounded inputs.
        expected = loop_reference(
            a.astype(np.float64), x.astype(np.float64), h0.astype(np.float64), key_reverse(key)
        )
        chex.assert_type(out, jnp.bfloat16)
        error = np.abs(np.asarray(out, np.float64) - expected)
        assert np.all(error <= BF16_RTOL * np.abs(expected) + BF16_ATOL), (key, error.max())
        # A float32 result exposes the accumulator: float32-accurate, where a bf16 accumulator
        # would be off by ~1e-2.
        chex.assert_type(wide, jnp.float32)
        np.testing.assert_allclose(wide, expected, **F32_TOL, err_msg=key)


def test_the_last_state_of_bfloat16_inputs_is_float32_accurate():
    """The streamed state is the accumulator (float32), as matrix_recurrence's: it was rounded
    to the bf16 output, so each chunk of a stream started from a state off by up to 2^-8."""
    a, x, h0 = random_inputs((2, 40, 3), dtype=jnp.bfloat16, with_h0=True)
    results = jax.jit(
        lambda a, x, h0: run_all(
            lambda m, r: linear_recurrence(a, x, h0, reverse=r, method=m, return_last_state=True),
            methods=CORE_METHODS + ("pallas",),
        )
    )(a, x, h0)
    for key, (out, last) in results.items():
        reverse = key_reverse(key)
        expected = loop_reference(*(np.asarray(t, np.float64) for t in (a, x, h0)), reverse)
        chex.assert_type([out, last], [jnp.bfloat16, jnp.float32])
        np.testing.assert_allclose(last, expected[:, 0 if reverse else -1], **F32_TOL, err_msg=key)


def test_output_dtypes():
    a, x, _ = random_inputs((2, 5, 3))
    f16, c64, bf16 = jax.jit(
        lambda a, x: (
            linear_recurrence(a.astype(jnp.float16), x.astype(jnp.float16)),
            linear_recurrence(a.astype(jnp.complex64), x),
            linear_recurrence(a, x, out_dtype=jnp.bfloat16),
        )
    )(a, x)
    chex.assert_type([f16, c64, bf16], [jnp.float16, jnp.complex64, jnp.bfloat16])


@pytest.mark.parametrize("method", CORE_METHODS + ("pallas",))
def test_real_out_dtype_for_complex_inputs_is_an_error(method):
    """Every method refuses a real out_dtype for complex states: the pure-JAX methods used to
    return the real part silently (astype), "pallas" alone raised."""
    a, x, _ = random_inputs((1, 3, 2), complex_valued=True)
    with pytest.raises(ValueError, match=r"out_dtype=float32 would drop the imaginary part"):
        linear_recurrence(a, x, method=method, out_dtype=jnp.float32)
    # The accepted case, compiled: one program instead of one eager dispatch per operation.
    run = jax.jit(functools.partial(linear_recurrence, method=method, out_dtype=jnp.complex64))
    assert jnp.iscomplexobj(run(a, x))


def test_bfloat16_gradients():
    a, x, _ = random_inputs((2, 11, 3))
    w = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)

    def grads(a, x):
        def loss(method):
            return lambda a, x: jnp.sum(
                linear_recurrence(a, x, method=method).astype(jnp.float32) * w
            )

        return {m: jax.grad(loss(m), argnums=(0, 1))(a, x) for m in CORE_METHODS}

    both = jax.jit(
        lambda a, x: (grads(a, x), grads(a.astype(jnp.bfloat16), x.astype(jnp.bfloat16)))
    )
    grads32, grads16 = both(a, x)
    for method in CORE_METHODS:
        for g16, g32 in zip(grads16[method], grads32[method]):
            chex.assert_type(g16, jnp.bfloat16)
            # bf16 inputs (2^-9 relative) move the states, and the gradients are rounded to
            # bf16: a few percent of the gradient's scale.
            np.testing.assert_allclose(
                np.asarray(g16, np.float32),
                g32,
                rtol=0.03,
                atol=0.03 * np.abs(g32).max(),
                err_msg=method,
            )


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
def test_gradients_against_finite_differences(complex_valued):
    """d/da, d/dx, d/dh0 of all states and of the last state, every method, both directions.

    One random direction through all of them at once: a wrong gradient in any one is an O(1)
    share of the projection, far above the 1e-5 tolerance.
    """
    with jax.enable_x64(True):
        a, x, h0 = random_inputs(
            (2, 11, 3), complex_valued=complex_valued, dtype=np.float64, with_h0=True
        )
        # chunk 4 does not divide 11, so the padding is differentiated too.
        f = jax.jit(
            lambda a, x, h0: run_all(
                lambda m, r: linear_recurrence(
                    a, x, h0, reverse=r, method=m, chunk_size=4, return_last_state=True
                ),
                methods=CORE_METHODS,
            )
        )
        jax.test_util.check_grads(f, (a, x, h0), order=1, modes=("rev",))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["real", "complex", "real_decay_complex_input"])
def test_vjp_matches_jax_through_lax_scan(kind):
    with jax.enable_x64(True):
        a, x, h0 = random_inputs(
            (2, 11, 3), complex_valued=kind != "real", dtype=np.float64, with_h0=True
        )
        if kind == "real_decay_complex_input":
            a = np.abs(a)
        cotangent = jnp.asarray(
            random_inputs(x.shape, complex_valued=kind != "real", dtype=np.float64, seed=3)[1]
        )

        def vjps(a, x, h0, cotangent):
            def ours(method, reverse):
                out, vjp = jax.vjp(
                    lambda *args: linear_recurrence(
                        *args, reverse=reverse, method=method, chunk_size=4
                    ),
                    a,
                    x,
                    h0,
                )
                return out, vjp(cotangent)

            def theirs(_, reverse):
                out, vjp = jax.vjp(
                    lambda a, x, h0: scan_reference(a.astype(x.dtype), x, h0, reverse), a, x, h0
                )
                return out, vjp(cotangent)

            return run_all(ours, methods=CORE_METHODS), run_all(theirs, methods=("lax.scan",))

        ours, theirs = jax.jit(vjps)(a, x, h0, cotangent)
        for key, (out, grads) in ours.items():
            out_ref, grads_ref = theirs["lax.scan/" + key.split("/")[1]]
            np.testing.assert_allclose(out, out_ref, atol=1e-10, err_msg=key)
            for name, g, g_ref, arg in zip("a x h0".split(), grads, grads_ref, (a, x, h0)):
                chex.assert_type(g, arg.dtype)
                np.testing.assert_allclose(
                    g, g_ref, atol=1e-10, rtol=1e-10, err_msg=f"{key} d{name}"
                )


@pytest.mark.slow
@pytest.mark.parametrize("method", CORE_METHODS)
def test_vjp_accepts_numpy_cotangents(method):
    a, x, _ = random_inputs((1, 2, 1))
    _, vjp = jax.vjp(functools.partial(linear_recurrence, method=method), a, x)
    da, dx = vjp(np.ones_like(x))
    np.testing.assert_allclose(dx, [[[1 + a[0, 1, 0]], [1]]], rtol=1e-6)
    np.testing.assert_allclose(da, [[[0], [x[0, 0, 0]]]], rtol=1e-6)


def test_gradient_of_broadcast_decay_is_summed():
    with jax.enable_x64(True):
        _, x, _ = random_inputs((2, 11, 3), dtype=np.float64)
        a = np.random.default_rng(4).uniform(0.9, 1.0, (11, 3))

        def grads(a):
            ours = {
                m: jax.grad(lambda a: jnp.sum(linear_recurrence(a, x, method=m) ** 2))(a)
                for m in CORE_METHODS
            }
            theirs = jax.grad(
                lambda a: jnp.sum(
                    scan_reference(jnp.broadcast_to(a, x.shape), x, jnp.zeros((2, 3))) ** 2
                )
            )(a)
            return ours, theirs

        ours, theirs = jax.jit(grads)(a)
        for method, g in ours.items():
            chex.assert_shape(g, a.shape)
            np.testing.assert_allclose(g, theirs, rtol=1e-10, err_msg=method)


# ------------------------------------------------------------------ jit (chex variants)


def _sum_of_squares(run):
    """A real loss of all states and the last state: sum |h|^2 + sum |h_last|^2."""

    def loss(a, x, h0):
        h, last = run(a, x, h0)
        return jnp.sum(jnp.abs(h) ** 2) + jnp.sum(jnp.abs(last) ** 2)

    return loss


@functools.cache
def _jit_test_case():
    """Inputs, loop states and lax.scan gradients shared by every JitTest variant."""
    a, x, h0 = random_inputs((2, 11, 3), complex_valued=True, with_h0=True)
    states = {r: loop_reference(a, x, h0, r) for r in (False, True)}

    def scan_run(a, x, h0):
        h = scan_reference(a, x, h0)
        return h, h[:, -1]

    grads = jax.jit(jax.grad(_sum_of_squares(scan_run), argnums=(0, 1, 2)))(a, x, h0)
    return (a, x, h0), states, grads


class JitTest(chex.TestCase):
    """The same states and gradients with and without ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*ALL_METHODS)
    def test_values_and_gradients(self, method):
        (a, x, h0), states, expected_grads = _jit_test_case()
        for reverse in (False, True):
            run = functools.partial(
                linear_recurrence,
                reverse=reverse,
                method=method,
                chunk_size=4,
                return_last_state=True,
            )
            out, last = self.variant(run)(a, x, h0)
            np.testing.assert_allclose(out, states[reverse], **F32_TOL)
            np.testing.assert_allclose(last, states[reverse][:, 0 if reverse else -1], **F32_TOL)
        run = functools.partial(
            linear_recurrence, method=method, chunk_size=4, return_last_state=True
        )
        grads = self.variant(jax.grad(_sum_of_squares(run), argnums=(0, 1, 2)))(a, x, h0)
        for g, g_ref in zip(grads, expected_grads):
            np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ time axis


@pytest.mark.parametrize("axis", [0, 1, -3], ids=["axis0", "axis1", "axis-3"])
def test_time_axis_other_than_second_to_last(axis):
    """``axis=``: values, final state and gradients (a, x, h0) equal the same recurrence run on
    arrays with that axis moved to -2 (the float64 loop for values). ``"sequential"`` steps
    along the axis in place, the others move it; both directions, complex, with h0."""
    a, x, _ = random_inputs((3, 6, 5, 2), complex_valued=True, seed=3)
    h0 = np.moveaxis(x, axis, -2)[..., 0, :] * 0.5  # x's shape without the time axis
    moved = lambda v: np.moveaxis(v, axis, -2)

    def loss(run, a, x, h0):
        out, last = run(a, x, h0)
        return jnp.sum(jnp.abs(out) ** 2) + jnp.sum(jnp.abs(last) ** 2)

    def everything(a, x, h0):
        def one(method, reverse):
            def run(a, x, h0):
                return linear_recurrence(
                    a, x, h0, reverse=reverse, method=method, return_last_state=True, axis=axis
                )

            def run_moved(a, x, h0):
                out, last = linear_recurrence(
                    jnp.moveaxis(a, axis, -2),
                    jnp.moveaxis(x, axis, -2),
                    h0,
                    reverse=reverse,
                    method=method,
                    return_last_state=True,
                )
                return jnp.moveaxis(out, -2, axis), last

            grads = jax.grad(functools.partial(loss, run), argnums=(0, 1, 2))(a, x, h0)
            want = jax.grad(functools.partial(loss, run_moved), argnums=(0, 1, 2))(a, x, h0)
            return run(a, x, h0), grads, want

        return run_all(one, methods=CORE_METHODS)

    for key, ((out, last), grads, want) in jax.jit(everything)(a, x, h0).items():
        reverse = key_reverse(key)
        expected = np.moveaxis(loop_reference(moved(a), moved(x), h0, reverse), -2, axis)
        np.testing.assert_allclose(out, expected, **F32_TOL, err_msg=key)
        np.testing.assert_array_equal(
            last, np.take(np.asarray(out), 0 if reverse else -1, axis=axis), err_msg=key
        )
        for g, g_want in zip(grads, want):
            np.testing.assert_allclose(g, g_want, atol=1e-4, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("axis", [-2, -3], ids=["axis-2", "axis-3"])
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_sequential_gradient_step_keeps_no_array_temporaries(axis, complex_valued, reverse):
    """A compiled forward+backward of the sequential method holds no (..., L, C) temporary: the
    loops update their buffers in place and the backward writes ``da`` over the states. A loop
    that XLA cannot update in place copies its buffer (at every iteration when the loop reads
    and writes one buffer: ~1000x the time), and zero-filled buffers are merged into one
    broadcast copied per loop; both show as array-sized temporaries. Both directions, real and
    complex, the time axis at -2 and at -3 (HGRU2D's column scans)."""
    shape = (2, 128, 8, 32) if axis == -3 else (2, 8, 128, 32)
    dtype = jnp.complex64 if complex_valued else jnp.float32
    a, x, g = (jnp.full(shape, 0.5, dtype) + i for i in range(3))

    def step(a, x, g):
        def run(a, x):
            return linear_recurrence(a, x, method="sequential", reverse=reverse, axis=axis)

        return jax.vjp(run, a, x)[1](g)

    compiled = jax.jit(step).lower(a, x, g).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * x.size * x.dtype.itemsize, temp


def test_time_axis_errors():
    a, x, _ = random_inputs((2, 5, 3))
    with pytest.raises(ValueError, match=r"axis 3 is out of range for x of shape \(2, 5, 3\)"):
        linear_recurrence(a, x, axis=3)
    with pytest.raises(ValueError, match=r"h0 must have shape \(5, 3\); got \(2, 3\)"):
        linear_recurrence(a, x, np.zeros((2, 3), np.float32), axis=0)


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize(
    "axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto_axes", "explicit_axes"]
)
@pytest.mark.slow
def test_batch_sharded_over_8_devices(axis_type):
    """Every method on a batch split over 8 devices: the loop's states, the unsharded gradient,
    and outputs that stay batch-sharded."""
    assert jax.device_count() == 8, "conftest.py sets 8 simulated CPU devices"
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(axis_type,))
    batch = NamedSharding(mesh, P("batch"))
    a, x, h0 = random_inputs((16, 11, 3), complex_valued=True, with_h0=True)

    def loss(run):
        return lambda a, x: jnp.sum(jnp.abs(run(a, x)) ** 2)

    def everything(a, x, h0):
        def one(method, reverse):
            run = functools.partial(linear_recurrence, reverse=reverse, method=method, chunk_size=4)
            # h0 given in one direction, zeros (h0=None) in the other.
            states = run(a, x, None if reverse else h0)
            return states, jax.grad(loss(run))(a, x)

        return run_all(one, methods=CORE_METHODS)

    expected_grads = jax.jit(
        lambda a, x: {
            r: jax.grad(loss(lambda a, x: scan_reference(a, x, jnp.zeros_like(h0), r)))(a, x)
            for r in (False, True)
        }
    )(a, x)
    with jax.set_mesh(mesh):
        sharded = jax.jit(everything)(*(jax.device_put(v, batch) for v in (a, x, h0)))
    for key, (states, grad) in sharded.items():
        reverse = key_reverse(key)
        for out in (states, grad):
            assert out.sharding.is_equivalent_to(batch, out.ndim), (key, out.sharding)
        np.testing.assert_allclose(
            states, loop_reference(a, x, None if reverse else h0, reverse), **F32_TOL, err_msg=key
        )
        np.testing.assert_allclose(grad, expected_grads[reverse], rtol=1e-5, atol=1e-4, err_msg=key)


# ------------------------------------------------------------------ errors


def test_errors_name_the_problem():
    a, x, _ = random_inputs((2, 5, 3))
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., length, channels\)"):
        linear_recurrence(a[0, 0], x[0, 0])
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 3\); got \(2, 4\)"):
        linear_recurrence(a, x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"unknown method 'parallel'.*'associative'"):
        linear_recurrence(a, x, method="parallel")
    for bad in (0, -3, 2.5):  # 0 and -3 ran one step per chunk without a word
        with pytest.raises(ValueError, match=rf"chunk_size must be a whole number >= 1; got {bad}"):
            linear_recurrence(a, x, method="chunked", chunk_size=bad)
    with pytest.raises(
        ValueError, match=r"a of shape \(2, 4, 3\) does not broadcast to x's shape \(2, 5, 3\)"
    ):
        linear_recurrence(a[:, :4], x)


@pytest.mark.parametrize("method", CORE_METHODS + ("pallas",))
def test_bad_decay_shapes_and_empty_sequences_name_the_argument(method):
    """Every method: a decay shape that does not broadcast to x's (it used to be a broadcasting
    error naming neither) and a time axis of length 0 (a slice_sizes TypeError, an IndexError
    for "pallas") are one-line errors naming the argument and its shape."""
    with pytest.raises(ValueError, match=r"a of shape \(2, 4, 3\) does not broadcast to x's"):
        linear_recurrence(jnp.ones((2, 4, 3)), jnp.ones((2, 5, 3)), method=method)
    with pytest.raises(ValueError, match=r"a of shape \(1, 2, 5, 3\) does not broadcast"):
        linear_recurrence(jnp.ones((1, 2, 5, 3)), jnp.ones((2, 5, 3)), method=method)
    with pytest.raises(
        ValueError, match=r"x has length 0 along the time axis -2 \(shape \(2, 0, 3\)\)"
    ):
        linear_recurrence(jnp.ones((2, 0, 3)), jnp.ones((2, 0, 3)), method=method)
    with pytest.raises(ValueError, match=r"x has length 0 along the time axis 0"):
        linear_recurrence(jnp.ones(3), jnp.ones((0, 2, 3)), method=method, axis=0)
    # What still broadcasts is still accepted: per-channel decays, a decay per batch row (both
    # in one compiled program).
    per_channel, per_row = jax.jit(
        lambda *decays: [linear_recurrence(a, jnp.ones((2, 5, 3)), method=method) for a in decays]
    )(jnp.full((3,), 0.5), jnp.full((2, 1, 3), 0.5))
    for out in (per_channel, per_row):
        np.testing.assert_allclose(out[:, 0], 1.0)


@pytest.mark.parametrize("shape", [(0, 7, 5), (3, 7, 0)])
def test_pallas_takes_an_empty_batch_or_no_channels(shape):
    """method='pallas' (auto's choice on TPU, and on GPU from L = 2048) crashed with a slice
    TypeError (no rows) or a ZeroDivisionError (no channels); the others return empty states."""
    a, x = jnp.full(shape, 0.5), jnp.ones(shape)
    h, last = linear_recurrence(a, x, method="pallas", return_last_state=True)
    assert h.shape == shape and last.shape == (shape[0], shape[2])
    grads = jax.grad(lambda a, x: linear_recurrence(a, x, method="pallas").sum(), (0, 1))(a, x)
    assert [g.shape for g in grads] == [shape, shape]


def test_an_eager_call_is_compiled_once_per_shape_and_setting(monkeypatch):
    """Called eagerly (no jit, grad or vmap around it), the recurrence runs a compiled copy of
    itself: its loops were traced and compiled anew at every call before (about 50 ms on CPU
    even for one step, so an eager ``step()`` loop crawled)."""
    from hgrn_jax.ops import recurrence

    traced = []
    scan = recurrence._scan
    monkeypatch.setattr(recurrence, "_scan", lambda *args: traced.append(1) or scan(*args))
    recurrence._compiled_linear_recurrence.clear_cache()
    a = jnp.full((3, 7, 5), 0.5)
    x = jnp.arange(3 * 7 * 5, dtype=jnp.float32).reshape(3, 7, 5)
    h0 = jnp.ones((3, 5))
    first = linear_recurrence(a, x, h0, return_last_state=True)
    for _ in range(2):
        again = linear_recurrence(a, x, h0, return_last_state=True)
    assert len(traced) == 1
    want = jax.jit(lambda a, x, h0: linear_recurrence(a, x, h0, return_last_state=True))(a, x, h0)
    for got, ref in zip((*first, *again), (*want, *want)):
        np.testing.assert_array_equal(got, ref)
    traced.clear()
    linear_recurrence(0.5, x, reverse=True)  # a Python decay and other settings: compiled anew
    assert len(traced) == 1
    with pytest.raises(ValueError, match=r"^h0 must have shape \(3, 5\); got \(5,\)$"):
        linear_recurrence(a, x, jnp.ones(5))  # the checks still speak as before


def test_an_eager_call_keeps_every_setting():
    """The compiled copy of an eager call is given the caller's settings: ``axis=`` (the time
    axis) and ``out_dtype=`` give what the same call under ``jax.jit`` gives, dtype included
    (a copy that dropped one ran along axis -2 or returned the inputs' dtype)."""
    a = jnp.full((4, 3, 2), 0.5)
    x = jnp.arange(24, dtype=jnp.float32).reshape(4, 3, 2)
    settings = dict(axis=0, reverse=True, out_dtype=jnp.bfloat16, return_last_state=True)
    got = linear_recurrence(a, x, **settings)
    want = jax.jit(lambda a, x: linear_recurrence(a, x, **settings))(a, x)
    assert got[0].dtype == jnp.bfloat16
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_an_eager_call_under_disable_jit_or_debug_nans_runs_op_by_op():
    """Under ``jax.disable_jit()`` the compiled copy ran the function eagerly, whose inputs were
    concrete again, so it called its copy without end (RecursionError); under
    ``jax_debug_nans`` the rerun of a call that made a NaN did the same, instead of raising
    FloatingPointError."""
    x = jnp.arange(10.0).reshape(2, 5, 1)
    want = np.cumsum(np.asarray(x), axis=1)
    with jax.disable_jit():
        np.testing.assert_array_equal(linear_recurrence(jnp.ones_like(x), x), want)
    bad = x.at[0, 2, 0].set(jnp.inf)  # 0 * inf at the next step: a NaN made inside the scan
    with jax.debug_nans(True), pytest.raises(FloatingPointError):
        linear_recurrence(jnp.zeros_like(x), bad)

"""The Pallas recurrence kernel (interpret mode on CPU) against a float64 NumPy loop, its
gradients through ``linear_recurrence``'s custom VJP, and its GPU/TPU lowerings."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lowered_text

from hgrn_jax.ops import linear_recurrence
from hgrn_jax.ops.pallas_recurrence import (
    StreamingOptions,
    pallas_linear_recurrence,
    pallas_recurrence,
    streaming_options,
)

# float32 accumulation over <= 40 steps with |a| <= 1 and O(1) inputs: rounding errors stay
# within a few ulps of the O(1..10) states, far below 1e-5.
F32_ATOL = 1e-5


def reference(a, x, h0, reverse):
    """float64 (complex128) loop; returns all states and the final state."""
    a, x = np.asarray(a, np.complex128), np.asarray(x, np.complex128)
    h = np.broadcast_to(np.asarray(h0, np.complex128), x.shape[:-2] + x.shape[-1:]).copy()
    out = np.zeros_like(x)
    length = x.shape[-2]
    for t in reversed(range(length)) if reverse else range(length):
        h = a[..., t, :] * h + x[..., t, :]
        out[..., t, :] = h
    return out, h


def compiled(fn, /, **options):
    """``fn`` with ``options`` bound, jitted: one compiled program instead of an eager dispatch
    of each layout operation around the kernels. A new function (and so a new trace) at each
    call, as ``streaming_options`` is read when tracing."""
    return jax.jit(functools.partial(fn, **options))


def make_inputs(shape, complex_valued, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.6, 1.0, shape)
    x = rng.normal(size=shape)
    h0 = rng.normal(size=shape[:-2] + shape[-1:])
    if complex_valued:
        a = a * np.exp(1j * rng.uniform(-1, 1, shape))
        x = x + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
        return a.astype(np.complex64), x.astype(np.complex64), h0.astype(np.complex64)
    return a.astype(np.float32), x.astype(np.float32), h0.astype(np.float32)


# L = 37 and C = 20 divide neither the time block (16) nor the channel tile (8), so both axes are
# padded and the last tile of each is partial; B = 2 gives two batch programs.
SHAPE = (2, 37, 20)
SCHEDULE_BLOCKS = {
    "tiled": dict(schedule="tiled", block_length=16, block_channels=8),
    "streaming": dict(schedule="streaming", block_channels=8),
}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["tiled", "streaming"])
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_matches_float64_loop_with_h0_and_padding(schedule, complex_valued, reverse):
    a, x, h0 = make_inputs(SHAPE, complex_valued)
    h, last = compiled(pallas_recurrence, reverse=reverse, **SCHEDULE_BLOCKS[schedule])(a, x, h0)
    want, want_last = reference(a, x, h0, reverse)
    assert h.shape == SHAPE and last.shape == (2, 20)
    assert h.dtype == a.dtype and last.dtype == a.dtype
    np.testing.assert_allclose(np.asarray(h), want, atol=F32_ATOL, rtol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(last), want_last, atol=F32_ATOL, rtol=F32_ATOL)


@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_linear_recurrence_method_pallas(complex_valued, reverse):
    """Default tiles, two leading axes, a broadcast decay and the last state. Eager (the other
    value tests compile): the kernel dispatched outside ``jax.jit``."""
    a, x, h0 = make_inputs((2, 3, 29, 5), complex_valued, seed=1)
    a = a[0, 0, 0]  # (C,): one decay per channel, broadcast over batch and time
    h, last = linear_recurrence(a, x, h0, reverse=reverse, method="pallas", return_last_state=True)
    want, want_last = reference(np.broadcast_to(a, x.shape), x, h0, reverse)
    np.testing.assert_allclose(np.asarray(h), want, atol=F32_ATOL, rtol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(last), want_last, atol=F32_ATOL, rtol=F32_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["tiled", "streaming"])
def test_bf16_inputs_accumulate_in_float32(schedule):
    a, x, _ = make_inputs(SHAPE, False, seed=2)
    a16, x16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    # The exact recurrence over the bf16-rounded inputs.
    want, _ = reference(np.asarray(a16, np.float64), np.asarray(x16, np.float64), 0.0, False)
    blocks = (
        dict(SCHEDULE_BLOCKS[schedule], block_length=32)
        if schedule == "tiled"
        else SCHEDULE_BLOCKS[schedule]
    )
    # States written in float32: only float32 rounding on top of the bf16 inputs, so the
    # accumulation did not happen in bf16 (which would be off by ~1e-2 here).
    h32, last = compiled(pallas_recurrence, out_dtype=jnp.float32, **blocks)(a16, x16)
    assert h32.dtype == jnp.float32 and last.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h32), want.real, atol=F32_ATOL, rtol=F32_ATOL)
    # States written in bf16 by default: one bf16 rounding of each state (relative 2^-8).
    h16, _ = compiled(pallas_recurrence, **blocks)(a16, x16)
    assert h16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(h16, np.float64), want.real, rtol=2**-8, atol=1e-6)


def scan_recurrence(a, x, h0, reverse):
    """Plain ``lax.scan``: JAX autodiff of it is the gradient reference."""

    def step(h, ax):
        h = ax[0] * h + ax[1]
        return h, h

    _, h = jax.lax.scan(step, h0, (jnp.moveaxis(a, -2, 0), jnp.moveaxis(x, -2, 0)), reverse=reverse)
    return jnp.moveaxis(h, 0, -2)


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradients_match_autodiff_of_scan(complex_valued, reverse):
    a, x, h0 = make_inputs((2, 19, 6), complex_valued, seed=3)
    w = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)

    def loss(fn, a, x, h0):
        h = fn(a, x, h0)
        return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[..., ::-1, :])

    pallas = functools.partial(linear_recurrence, reverse=reverse, method="pallas")
    scan = functools.partial(scan_recurrence, reverse=reverse)
    got = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2)))(a, x, h0)
    want = jax.jit(jax.grad(functools.partial(loss, scan), argnums=(0, 1, 2)))(a, x, h0)
    for g, w_ in zip(got, want):
        assert g.dtype == w_.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), atol=1e-4, rtol=1e-4)


# Chunk lengths for the streaming schedule's two-pass form: 10 does not divide L = 37 (a short
# last chunk), 1 is one step per chunk, 37 is one chunk (the one-pass form).
CHUNK_LENGTHS = [10, 1, 37]


@pytest.mark.slow
@pytest.mark.parametrize("chunk_length", CHUNK_LENGTHS)
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_streaming_time_chunks_match_references(chunk_length, complex_valued, reverse):
    """States against the float64 loop; the fused backward kernel's gradients (da, dx and dh0
    in one pass per chunk) against autodiff of ``lax.scan``."""
    check_streaming_states(complex_valued, reverse, chunk_length=chunk_length)
    check_streaming_gradients(complex_valued, reverse, chunk_length=chunk_length)


def check_streaming_states(complex_valued, reverse, **options):
    """The streaming schedule's states and final state with ``options`` against the float64
    loop at ``SHAPE``."""
    a, x, h0 = make_inputs(SHAPE, complex_valued, seed=5)
    with streaming_options(unroll=4, **options):
        run = compiled(pallas_recurrence, reverse=reverse, **SCHEDULE_BLOCKS["streaming"])
        h, last = run(a, x, h0)
    want, want_last = reference(a, x, h0, reverse)
    np.testing.assert_allclose(np.asarray(h), want, atol=F32_ATOL, rtol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(last), want_last, atol=F32_ATOL, rtol=F32_ATOL)


def streaming_gradient_case(complex_valued):
    """Inputs ``(2, 37, 6)`` of the streaming gradient checks and their loss ``loss(fn, a, x,
    h0)``, a fixed weighting of the real and imaginary parts of the states."""
    a, x, h0 = make_inputs((2, 37, 6), complex_valued, seed=6)
    w = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)

    def loss(fn, a, x, h0):
        h = fn(a, x, h0)
        return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[..., ::-1, :])

    return a, x, h0, loss


@functools.cache
def streaming_gradient_reference(complex_valued, reverse):
    """``(da, dx, dh0)`` of ``streaming_gradient_case``'s loss by JAX autodiff of ``lax.scan``,
    compiled, and computed once for all the chunkings that are checked against it."""
    a, x, h0, loss = streaming_gradient_case(complex_valued)
    scan = functools.partial(scan_recurrence, reverse=reverse)
    return jax.jit(jax.grad(functools.partial(loss, scan), argnums=(0, 1, 2)))(a, x, h0)


def check_streaming_gradients(complex_valued, reverse, **options):
    """The streaming schedule's gradients with ``options`` against JAX autodiff of
    ``lax.scan``, with channels (6) that do not fill the 8-channel block."""
    a, x, h0, loss = streaming_gradient_case(complex_valued)
    pallas = functools.partial(pallas_linear_recurrence, reverse=reverse, schedule="streaming")
    with streaming_options(unroll=4, block_channels=8, **options):
        got = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2)))(a, x, h0)
    want = streaming_gradient_reference(complex_valued, reverse)
    for name, g, w_ in zip(("da", "dx", "dh0"), got, want):
        assert g.dtype == w_.dtype and g.shape == w_.shape, name
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w_), atol=1e-4, rtol=1e-4, err_msg=name
        )


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_chain_in_kernel_matches_references(complex_valued, reverse):
    """Carries chained inside the state-writing kernels (``chain_in_kernel``, off by default):
    states with chunks of 10 steps (the last one short) and of 1 step, and gradients."""
    for chunk_length in (10, 1):
        check_streaming_states(
            complex_valued, reverse, chunk_length=chunk_length, chain_in_kernel=True
        )
    check_streaming_gradients(complex_valued, reverse, chunk_length=10, chain_in_kernel=True)


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
def test_loads_ahead_changes_the_order_not_the_arithmetic(complex_valued):
    """States and gradients with and without ``loads_ahead`` are equal to the last bit."""
    a, x, h0 = make_inputs(SHAPE, complex_valued, seed=12)
    results = []
    for loads_ahead in (False, True):
        options = dict(chunk_length=10, unroll=4, block_channels=8, loads_ahead=loads_ahead)
        with streaming_options(**options):
            fn = functools.partial(pallas_linear_recurrence, schedule="streaming")

            @jax.jit
            def states_and_gradients(a, x, h0):
                h, vjp = jax.vjp(fn, a, x, h0)
                return [h, *vjp(h)]

            results.append(states_and_gradients(a, x, h0))
    for name, before, after in zip(("h", "da", "dx", "dh0"), *results):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["tiled", "streaming"])
def test_bf16_gradients_accumulate_in_float32(schedule):
    """bf16 a and x go into the kernels as they are; the gradients come back in bf16 and
    equal the float64 gradients of the bf16-rounded inputs to bf16 precision (an accumulation
    in bf16 over 37 steps would be off by several bf16 ulps)."""
    a, x, _ = make_inputs(SHAPE, False, seed=8)
    a16, x16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    w = np.random.default_rng(9).normal(size=SHAPE)

    def loss(fn, a, x):
        return jnp.sum(fn(a, x).astype(jnp.float32) * w)

    pallas = functools.partial(linear_recurrence, method="pallas", out_dtype=jnp.float32)
    with streaming_options(chunk_length=10, block_channels=8):
        if schedule == "streaming":
            pallas = functools.partial(
                pallas_linear_recurrence, schedule="streaming", out_dtype=jnp.float32
            )
        da, dx = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1)))(a16, x16)
    assert da.dtype == dx.dtype == jnp.bfloat16
    with jax.enable_x64(True):
        exact = jax.jit(
            jax.grad(
                functools.partial(
                    loss,
                    lambda a, x: scan_recurrence(
                        a, x, jnp.zeros(x.shape[:1] + x.shape[2:], jnp.float64), False
                    ),
                ),
                argnums=(0, 1),
            )
        )(jnp.asarray(a16, jnp.float64), jnp.asarray(x16, jnp.float64))
    for got, want in zip((da, dx), exact):
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            np.asarray(want),
            rtol=2**-7,
            atol=2**-7 * np.abs(np.asarray(want)).max(),
        )


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["tiled", "streaming"])
def test_real_decay_with_complex_inputs_gets_a_real_gradient(schedule):
    """A real ``a`` in a complex recurrence: its cotangent is the real part (what JAX's
    real-to-complex conversion transposes to), with no complex-to-real cast warning."""
    _, x, h0 = make_inputs((2, 19, 6), True, seed=10)
    a = np.random.default_rng(11).uniform(0.6, 1.0, x.shape).astype(np.float32)

    def loss(fn, a, x, h0):
        return jnp.sum(jnp.abs(fn(a, x, h0)) ** 2)

    pallas = functools.partial(pallas_linear_recurrence, schedule=schedule)
    with streaming_options(chunk_length=7, block_channels=8), warnings.catch_warnings():
        warnings.simplefilter("error")
        got = jax.jit(jax.grad(functools.partial(loss, pallas), argnums=(0, 1, 2)))(a, x, h0)
    want = jax.jit(
        jax.grad(
            functools.partial(
                loss, lambda a, x, h0: scan_recurrence(a.astype(jnp.complex64), x, h0, False)
            ),
            argnums=(0, 1, 2),
        )
    )(a, x, h0)
    assert got[0].dtype == jnp.float32
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), atol=1e-4, rtol=1e-4)


def test_streaming_chunking_defaults():
    """Enough (row, channel, chunk) chains in flight, chunks of at least 128 steps, one pass
    when the sequence is short; an explicit chunk length wins."""
    options = StreamingOptions()
    assert options.chunking(8 * 512, 100) == (100, 1)
    assert options.chunking(8 * 512, 4096) == (128, 32)
    assert options.chunking(8 * 512, 16384) == (128, 128)
    assert options.chunking(8 * 512, 65536) == (512, 128)
    assert options.chunking(1 << 20, 65536) == (65536, 1)  # already enough chains
    assert StreamingOptions(chunk_length=1000).chunking(8, 4096) == (1000, 5)


def streaming_gradient(a, x):
    """The VJP of the streaming schedule, compiled (not interpreted): for lowering to Triton."""
    fn = functools.partial(pallas_linear_recurrence, schedule="streaming", interpret=False)
    return jax.vjp(fn, a, x)[1](x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
def test_lowers_for_tpu_and_gpu(dtype):
    """The tiled schedule lowers through Mosaic (TPU) and the streaming one through Triton (GPU),
    at channel counts and lengths that need padding."""
    spec = jax.ShapeDtypeStruct((2, 100, 300), dtype)
    tiled = functools.partial(pallas_recurrence, schedule="tiled", interpret=False)
    streaming = functools.partial(
        pallas_recurrence, schedule="streaming", interpret=False, reverse=True
    )
    assert "tpu_custom_call" in lowered_text(tiled, "tpu", spec, spec)
    assert "triton" in lowered_text(streaming, "cuda", spec, spec)


def test_streaming_chunks_and_fused_backward_lower_for_gpu():
    """The two-pass forward (summaries, then states) and the fused backward lower to Triton
    kernels: four named kernels in the gradient of one call."""
    spec = jax.ShapeDtypeStruct((2, 1000, 64), jnp.float32)

    with streaming_options(chunk_length=96):
        text = lowered_text(streaming_gradient, "cuda", spec, spec)
    for kernel in ("forward_summary", "forward", "backward_summary", "backward"):
        assert f"linear_recurrence_{kernel}" in text, kernel
    assert "stablehlo.concatenate" in text  # the carries' chain, by XLA between the kernels


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
def test_gradient_traces_inside_a_users_shard_map_on_gpu(backend, monkeypatch):
    """``linear_recurrence(method="pallas")`` differentiated inside ``shard_map`` over a batch
    axis, as traced on a GPU: every cotangent of the custom VJP must vary over the mesh axis as
    its primal does. The initial state made for ``h0=None`` used to be invariant while its
    cotangent varied (Triton); Mosaic GPU's kernels return invariant results, cast to vary."""
    from jax.sharding import PartitionSpec as P

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=auto)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    a, x = (jax.device_put(jnp.full((4, 256, 128), v), sharding) for v in (0.9, 1.0))

    def loss(a, x):
        per_shard = functools.partial(linear_recurrence, method="pallas")
        specs = (P("data"), P("data"))
        return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=P("data"))(a, x).sum()

    with streaming_options(backend=backend):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, x)
    assert [v.aval.shape for v in jaxpr.jaxpr.outvars] == [a.shape, x.shape]


def test_chain_in_kernel_lowers_with_no_chain_between_the_kernels():
    """With ``chain_in_kernel`` the gradient of one call lowers to the two summary kernels and
    the two chained kernels and nothing of the chain's (slices, pads, concatenations; about
    180 StableHLO operations at 11 chunks) between them."""
    spec = jax.ShapeDtypeStruct((2, 1000, 64), jnp.float32)

    with streaming_options(chunk_length=96, chain_in_kernel=True):
        text = lowered_text(streaming_gradient, "cuda", spec, spec)
    for kernel in ("forward_summary", "forward_chained", "backward_summary", "backward_chained"):
        assert f"linear_recurrence_{kernel}" in text, kernel
    assert text.count("stablehlo.custom_call") == 4
    for op in ("concatenate", "slice", "multiply"):
        assert f"stablehlo.{op}" not in text, op


def _store_then_load(module: str) -> int:
    """Reads (``get``) that follow a store in a Triton module's program order: each waits for
    the store before it (the arrays are not known to be distinct)."""
    count, after_store = 0, False
    for line in module.splitlines():
        if "tt.store" in line:
            after_store = True
        elif "tt.load" in line and '"get:"' in line:
            count += after_store
            after_store = False
    return count


@pytest.mark.parametrize("chain_in_kernel", [False, True])
def test_loads_ahead_puts_a_group_of_steps_loads_before_its_stores(chain_in_kernel):
    """In the Triton IR of the state-writing kernels, ``loads_ahead`` (the default) leaves one
    load-after-store per unrolled group of 8 steps where the loads-after-stores order has 8:
    7 fewer memory latencies per group (``benchmarks/kernel_sass.py`` shows the same in the
    compiled machine code)."""
    from benchmarks.kernel_sass import pallas_debug_output, printed_modules

    spec = jax.ShapeDtypeStruct((2, 1000, 64), jnp.float32)
    counts = {}
    for loads_ahead in (False, True):
        options = dict(chunk_length=96, loads_ahead=loads_ahead, chain_in_kernel=chain_in_kernel)
        with streaming_options(**options), pallas_debug_output() as printed:
            lowered_text(streaming_gradient, "cuda", spec, spec)
        modules = printed_modules(printed.getvalue())
        counts[loads_ahead] = {name: _store_then_load(text) for name, text in modules.items()}
    suffix = "_chained" if chain_in_kernel else ""
    for kernel in (f"linear_recurrence_forward{suffix}", f"linear_recurrence_backward{suffix}"):
        assert counts[False][kernel] - counts[True][kernel] == 7, (kernel, counts)
    assert StreamingOptions().loads_ahead


def test_bad_blocks_and_shapes_name_the_fix():
    a, x, h0 = make_inputs((1, 8, 4), False)
    with pytest.raises(ValueError, match="block_length must be a multiple of 8"):
        pallas_recurrence(a, x, block_length=12)
    with pytest.raises(ValueError, match=r"h0 must have shape \(1, 4\)"):
        pallas_recurrence(a, x, h0[:, :2])
    with pytest.raises(ValueError, match="unknown schedule"):
        pallas_recurrence(a, x, schedule="blocked")


# TPU interpret mode: the tiled (Mosaic) schedule run on CPU with the TPU's memories simulated.
# Default channel tiles (C = 20 padded to one 128-lane tile, as on a TPU), buffers the kernel
# reads before writing are NaN (so a carry read before it is set would show), and the parallel
# grid axes are visited in a random order (so a carry that leaked across batch rows or channel
# tiles would show). L = 37 with 16-step time blocks: three blocks, the last one ragged, so the
# carry crosses two grid steps of the sequential axis.
def tpu_interpret():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams(random_seed=0, uninitialized_memory="nan")


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_tpu_interpret_mode_matches_float64_loop(complex_valued, reverse):
    a, x, h0 = make_inputs(SHAPE, complex_valued, seed=8)
    run = compiled(
        pallas_recurrence,
        reverse=reverse,
        schedule="tiled",
        block_length=16,
        interpret=tpu_interpret(),
    )
    h, last = run(a, x, h0)
    want, want_last = reference(a, x, h0, reverse)
    assert h.dtype == a.dtype
    np.testing.assert_allclose(np.asarray(h), want, atol=F32_ATOL, rtol=F32_ATOL)
    np.testing.assert_allclose(np.asarray(last), want_last, atol=F32_ATOL, rtol=F32_ATOL)


def reference_gradients(a, x, h0, w, reverse):
    """float64 (complex128) gradients of ``sum(Re(h) w)`` by the backward loop of
    :mod:`hgrn_jax.ops.recurrence`'s docstring: d_t = g_t + a_{t+1} d_{t+1}, dx = d,
    da_t = d_t h_{t-1}, dh0 = a_0 d_0 (transposes: no conjugates)."""
    a, x, h0 = (np.asarray(v, np.complex128) for v in (a, x, h0))
    h, _ = reference(a, x, h0, reverse)
    steps = list(range(x.shape[-2]))
    order = steps if reverse else steps[::-1]  # against the forward direction
    d = np.zeros_like(x)
    flow = np.zeros_like(h0)
    for t in order:
        d[..., t, :] = w[..., t, :] + flow
        flow = a[..., t, :] * d[..., t, :]
    prev = (
        np.concatenate([h[..., 1:, :], h0[..., None, :]], -2)
        if reverse
        else np.concatenate([h0[..., None, :], h[..., :-1, :]], -2)
    )
    return d * prev, d, flow


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_tpu_interpret_mode_gradients_match_float64_loop(complex_valued, reverse):
    """Values and (da, dx, dh0) of ``pallas_linear_recurrence`` on the tiled schedule in TPU
    interpret mode: L = 300 is two 256-step time blocks, the second one ragged."""
    a, x, h0 = make_inputs((2, 300, 20), complex_valued, seed=9)
    w = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)
    fn = functools.partial(
        pallas_linear_recurrence, reverse=reverse, schedule="tiled", interpret=tpu_interpret()
    )

    @jax.jit  # one program: the interpreted kernels are not dispatched op by op
    def states_and_gradients(a, x, h0, w):
        h, vjp = jax.vjp(fn, a, x, h0)
        return h, vjp(w.astype(h.dtype))

    h, got = states_and_gradients(a, x, h0, w)
    np.testing.assert_allclose(np.asarray(h), reference(a, x, h0, reverse)[0], atol=1e-4, rtol=1e-4)
    want = reference_gradients(a, x, h0, w, reverse)
    for name, g, w_ in zip(("da", "dx", "dh0"), got, want):
        assert g.dtype == a.dtype and g.shape == w_.shape, name
        w_ = w_ if complex_valued else w_.real
        # 300 float32 steps with |a| < 1: the gradients sum up to ~1/(1 - |a|) ~ 10 terms of
        # O(1..10); 1e-4 is ~100 float32 ulps of them.
        np.testing.assert_allclose(np.asarray(g), w_, atol=1e-4, rtol=1e-4, err_msg=name)


def test_tpu_interpret_mode_runs_only_the_tiled_schedule():
    a, x, _ = make_inputs((1, 8, 4), False)
    with pytest.raises(ValueError, match="use schedule='tiled'"):
        pallas_recurrence(a, x, schedule="streaming", interpret=tpu_interpret())

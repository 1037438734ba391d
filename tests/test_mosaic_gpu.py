"""The Mosaic GPU back-end of the streaming kernels (``streaming_options(backend="mosaic_gpu")``,
:mod:`hgrn_jax.ops.mosaic_gpu_recurrence`).

On every JAX: lowered for an H200 on this CPU (Mosaic GPU's lowering infers and checks every
array's layout), its chunking and its errors. On JAX >= 0.11: run in Mosaic GPU's interpret mode,
which simulates shared memory, the TMA engine's copies and barriers, with its race detector on,
against float64 loops. The pinned jax 0.10.2 has no such mode, so ``make test`` skips those;
``make test-mosaic-gpu`` (part of CI) runs this file under jax 0.11.2, where a missing interpret
mode is an error, not a skip.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from lowering import lowered_text, mosaic_gpu_kernel_texts
from test_pallas import make_inputs, reference, reference_gradients

from hgrn_jax.ops import linear_recurrence
from hgrn_jax.ops.pallas_recurrence import (
    StreamingOptions,
    pallas_linear_recurrence,
    pallas_recurrence,
    streaming_options,
)

HAS_INTERPRET_MODE = hasattr(plgpu, "InterpretGPUParams")
if os.environ.get("HGRN_REQUIRE_INTERPRET_MODE") and not HAS_INTERPRET_MODE:
    raise RuntimeError(
        f"make test-mosaic-gpu needs Mosaic GPU's interpret mode (jax >= 0.11), not jax "
        f"{jax.__version__}: rebuild .venv-newer-jax (rm -r .venv-newer-jax)"
    )
needs_interpret_mode = pytest.mark.skipif(
    not HAS_INTERPRET_MODE,
    reason=f"Mosaic GPU interpret mode needs jax >= 0.11 (this is {jax.__version__}); "
    "make test-mosaic-gpu (CI) runs these under jax 0.11.2",
)


def mosaic_gpu(**overrides):
    return streaming_options(backend="mosaic_gpu", **overrides)


def gradient_of_linear_loss(fn, a, x, h0, w):
    def loss(a, x, h0):
        h = fn(a, x, h0)
        return jnp.sum(jnp.real(h) * w) + jnp.sum(jnp.imag(h) * w[..., ::-1, :])

    return jax.grad(loss, argnums=(0, 1, 2))


def custom_calls(text: str, target: str) -> int:
    return sum("stablehlo.custom_call @" + target in line for line in text.splitlines())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_forward_and_backward_lower_for_an_h200(dtype, reverse):
    """L = 1000 in chunks of 128: both summary kernels, the state kernel and the fused backward
    kernel, each one Mosaic GPU call (none of them Triton's); channels 300 are three tiles."""
    a = jnp.full((2, 1000, 300), 0.9, dtype)
    x = jnp.ones((2, 1000, 300), dtype)
    h0 = jnp.zeros((2, 300), dtype)
    fn = functools.partial(
        pallas_linear_recurrence, reverse=reverse, schedule="streaming", interpret=False
    )
    w = jnp.ones(x.shape, jnp.float32)
    with mosaic_gpu(chunk_length=128):
        text = lowered_text(gradient_of_linear_loss(fn, a, x, h0, w), "cuda", a, x, h0)
    assert custom_calls(text, "mosaic_gpu") == 4
    assert "triton" not in text
    with mosaic_gpu():  # (2 rows x 384 channels) is few chains: the default splits time too
        text = lowered_text(functools.partial(pallas_recurrence, **fn.keywords), "cuda", a, x)
    assert custom_calls(text, "mosaic_gpu") == 2


def test_one_chunk_is_one_kernel_each_way():
    a, x, h0 = (jnp.ones((8, 200, 512)), jnp.ones((8, 200, 512)), jnp.zeros((8, 512)))
    fn = functools.partial(pallas_linear_recurrence, schedule="streaming", interpret=False)
    with mosaic_gpu():  # 200 steps are under two of the shortest chunks (128 steps): one chunk
        text = lowered_text(gradient_of_linear_loss(fn, a, x, h0, x), "cuda", a, x, h0)
    assert custom_calls(text, "mosaic_gpu") == 2


@pytest.mark.parametrize(
    "batch, channels, width, calls",
    [(8, 32, 32, 4), (6, 50, 64, 4), (3, 32, 128, 4), (2, 300, 128, 4)],
    ids=["4 rows of 32", "2 rows of 64", "odd batch: 128", "3 tiles of 128"],
)
def test_narrow_channels_share_a_program_across_batch_rows(batch, channels, width, calls):
    """Fewer than 128 channels are not padded to 128 when the batch rows come in groups: a
    program carries 4 rows of 32 or 2 rows of 64 channels side by side (its 128 lanes)."""
    from hgrn_jax.ops.mosaic_gpu_recurrence import program_width

    assert program_width(channels, batch) == width
    a = jnp.full((batch, 512, channels), 0.9, jnp.complex64)
    h0 = jnp.zeros((batch, channels), jnp.complex64)
    fn = functools.partial(pallas_linear_recurrence, schedule="streaming", interpret=False)
    w = jnp.ones(a.shape, jnp.float32)
    with mosaic_gpu(chunk_length=128):
        text = lowered_text(gradient_of_linear_loss(fn, a, a, h0, w), "cuda", a, a, h0)
    assert custom_calls(text, "mosaic_gpu") == calls
    padded = -(-channels // width) * width  # the kernels' arrays: channels padded to the width
    assert f"x512x{padded}xf32>" in text
    if padded != 128:
        assert "x128xf32>" not in text


@pytest.mark.parametrize("auto_barriers", [False, True], ids=["ours", "mosaic_gpu's"])
def test_the_time_loop_has_no_barrier_per_step(auto_barriers):
    """Each lane touches only its own elements of the shared-memory blocks, so the kernels turn
    off Mosaic GPU's warpgroup barrier before and after every shared-memory store: their
    barriers (``bar.sync`` in the kernels' MLIR) are a fixed few per block, whatever its rows.
    With ``auto_barriers`` the count grows by two per store in a block: one per row of the
    forward kernel, two (``dx`` and ``da``) of the backward kernel."""
    a = jnp.full((8, 256, 128), 0.9)

    def loss(a, x):
        return jnp.sum(pallas_linear_recurrence(a, x, schedule="streaming", interpret=False))

    counts = {}
    for block_rows in (16, 32):
        options = dict(chunk_length=256, block_rows=block_rows, auto_barriers=auto_barriers)
        with mosaic_gpu(**options), mosaic_gpu_kernel_texts() as modules:
            lowered_text(jax.grad(loss, argnums=(0, 1)), "cuda", a, a)
        assert len(modules) == 2  # one chunk: the forward and the backward kernel
        counts[block_rows] = [module.count("bar.sync") for module in modules]
    forward, backward = (counts[32][k] - counts[16][k] for k in range(2))
    if auto_barriers:
        assert (forward, backward) == (2 * 16, 4 * 16)
    else:
        assert (forward, backward) == (0, 0) and max(counts[16]) <= 8


def test_chunks_are_whole_blocks():
    options = StreamingOptions(backend="mosaic_gpu", block_rows=16)
    for chains, length in [(4096, 4096), (4096, 1008), (1 << 20, 4096), (128, 48)]:
        chunk, chunks = options.chunking(chains, length)
        assert chunk % 16 == 0 and (chunks - 1) * chunk < length <= chunks * chunk
    # An asked-for chunk length is rounded up to whole blocks (Triton takes it as it is).
    assert StreamingOptions(backend="mosaic_gpu", chunk_length=20).chunking(1, 64) == (32, 2)
    assert StreamingOptions(chunk_length=20).chunking(1, 64) == (20, 4)


def test_bad_options_name_the_fix():
    a, x, _ = make_inputs((1, 32, 128), False)
    run = functools.partial(pallas_recurrence, a, x, schedule="streaming", interpret=False)
    with mosaic_gpu(), pytest.raises(ValueError, match="got 64 channels for a batch of 1"):
        run(block_channels=64)  # 2 batch rows of 64 channels make a program's 128 chains
    with mosaic_gpu(chain_in_kernel=True), pytest.raises(ValueError, match="Triton option"):
        run()
    with mosaic_gpu(block_rows=12), pytest.raises(ValueError, match="multiple of 8; got 12"):
        run()
    # Complex chunk summaries: (a, x) x 2 parts x 4 stages x 32 rows x 512 bytes = 256 KiB.
    c, y, _ = make_inputs((1, 256, 128), True)
    with (
        mosaic_gpu(block_rows=32, stages=4),
        pytest.raises(ValueError, match="summary kernel would use 257 KiB"),
    ):
        pallas_recurrence(c, y, schedule="streaming", interpret=False)
    with jax.enable_x64(True), mosaic_gpu():
        with pytest.raises(ValueError, match="float64 inputs need backend='triton'"):
            pallas_recurrence(
                a.astype(np.float64), x.astype(np.float64), schedule="streaming", interpret=False
            )


def test_a_jax_without_triton_falls_back_to_mosaic_gpu(monkeypatch):
    """JAX 0.11 deprecates Pallas's Triton back-end: a JAX without it runs the streaming kernels
    on Mosaic GPU, with a warning, rather than failing to import Triton inside the call."""
    from hgrn_jax.ops import pallas_recurrence as module

    monkeypatch.setattr(module, "_triton_available", lambda: False)
    a, x, _ = make_inputs((2, 256, 128), False)
    fn = functools.partial(pallas_recurrence, schedule="streaming", interpret=False)
    with pytest.warns(UserWarning, match="no Pallas Triton back-end"):
        text = lowered_text(fn, "cuda", a, x)
    assert custom_calls(text, "mosaic_gpu") >= 1 and "triton" not in text


def test_an_older_gpu_is_refused_by_name(monkeypatch):
    """Mosaic GPU compiles for sm_90 and later: on an A100 (8.0) the error says so before any
    lowering, and names the back-end that runs there."""
    import types

    a, x, _ = make_inputs((1, 32, 128), False)
    monkeypatch.setattr(
        jax, "devices", lambda *_: [types.SimpleNamespace(compute_capability="8.0")]
    )
    with mosaic_gpu(), pytest.raises(ValueError, match="this one has 8.0: use backend='triton'"):
        pallas_recurrence(a, x, schedule="streaming", interpret=False)


def test_interpret_mode_is_jax_0_11s():
    """On CPU the back-end runs in Mosaic GPU's interpret mode, which JAX 0.10 does not have:
    there the error says so instead of failing inside Pallas."""
    a, x, h0 = make_inputs((1, 16, 128), False)
    with mosaic_gpu():
        if not HAS_INTERPRET_MODE:
            with pytest.raises(ValueError, match="needs jax >= 0.11"):
                pallas_recurrence(a, x, h0, schedule="streaming", interpret=True)
            return
        h, _ = pallas_recurrence(a, x, h0, schedule="streaming", interpret=True)
    np.testing.assert_allclose(np.asarray(h), reference(a, x, h0, False)[0], atol=1e-5)


# Interpret mode, with the race detector. Shapes: L = 40 and 37 are padded to whole 16-row
# blocks (and C = 100, 130 to 128-channel tiles; C = 20 to 32 channels, 4 batch rows per
# program, in two programs; C = 50 to 64, 2 rows); chunk lengths 16-32 give several chunks, the
# last one short at L = 37; L = 64 in one chunk is four blocks through two stages, so every
# shared-memory slot is refilled and copied out again; L = 5 is one block, mostly padding; 8-row
# blocks in 4 stages walk 3 blocks per chunk (L = 17 padded to 24), so slots are not all used.
CASES = {
    "real-padded-reverse": ((1, 40, 100), False, True, dict(chunk_length=16)),
    "real-4-rows-of-32-reverse": ((8, 40, 20), False, True, dict(chunk_length=16)),
    "complex-2-rows-of-64": ((2, 48, 50), True, False, dict(chunk_length=16)),
    "complex-chunks": ((2, 48, 128), True, False, dict(chunk_length=16)),
    "complex-short-last-chunk-reverse": ((1, 37, 130), True, True, dict(chunk_length=32)),
    "real-slots-reused": ((1, 64, 128), False, False, dict(chunk_length=64)),
    "complex-5-steps-reverse": ((1, 5, 3), True, True, dict(block_rows=8)),
    "real-8-rows-4-stages": ((12, 17, 16), False, False, dict(block_rows=8, stages=4)),
}


def interpret_params():
    return plgpu.InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    return interpret_pallas_call.get_races().races_found


@needs_interpret_mode
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_interpret_mode_matches_float64_loops(case):
    """States, final state and (da, dx, dh0) against the float64 loops of ``test_pallas``, and
    no data race between the warpgroup and the TMA engine's copies in any of the 4 kernels."""
    shape, complex_valued, reverse, options = CASES[case]
    a, x, h0 = make_inputs(shape, complex_valued, seed=11)
    w = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
    with mosaic_gpu(**options):
        h, last = pallas_recurrence(
            a, x, h0, reverse=reverse, schedule="streaming", interpret=interpret_params()
        )
        assert not races_found()
        fn = functools.partial(
            pallas_linear_recurrence,
            reverse=reverse,
            schedule="streaming",
            interpret=interpret_params(),
        )
        _, vjp = jax.vjp(fn, a, x, h0)
        got = vjp(jnp.asarray(w, h.dtype))
        assert not races_found()
    want, want_last = reference(a, x, h0, reverse)
    # float32 accumulation over <= 64 steps with |a| <= 1: a few ulps of the O(1..10) states.
    np.testing.assert_allclose(np.asarray(h), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(last), want_last, atol=1e-5, rtol=1e-5)
    for name, g, w_ in zip(("da", "dx", "dh0"), got, reference_gradients(a, x, h0, w, reverse)):
        assert g.dtype == a.dtype and g.shape == w_.shape, name
        w_ = w_ if complex_valued else w_.real
        np.testing.assert_allclose(np.asarray(g), w_, atol=1e-4, rtol=1e-4, err_msg=name)


@needs_interpret_mode
@pytest.mark.slow
def test_interpret_mode_bf16_inputs_accumulate_in_float32():
    """bf16 decays and inputs read as bf16 (the shared-memory blocks are bf16) and accumulated
    in float32: states written in float32 carry float32 rounding on top of the bf16 inputs only.
    The gradient, with the states saved in bf16 (``out_dtype``) and da, dx written
    in bf16 from bf16 blocks, equals the float64 gradient of the bf16-rounded inputs to bf16
    precision: a state rounded once (2^-9 relative), da rounded once, well inside 2^-7."""
    a, x, h0 = make_inputs((1, 48, 128), False, seed=13)
    a16, x16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    a32, x32 = np.asarray(a16, np.float32), np.asarray(x16, np.float32)
    w = np.random.default_rng(15).normal(size=x.shape).astype(np.float32)
    fn = functools.partial(
        pallas_linear_recurrence,
        out_dtype=jnp.bfloat16,
        schedule="streaming",
        interpret=interpret_params(),
    )
    with mosaic_gpu(chunk_length=16):
        h, _ = pallas_recurrence(
            a16, x16, h0, out_dtype=jnp.float32, schedule="streaming", interpret=interpret_params()
        )
        h16, vjp = jax.vjp(fn, a16, x16, h0)
        da, dx, dh0 = vjp(jnp.asarray(w, jnp.bfloat16))
    assert h.dtype == jnp.float32 and h16.dtype == jnp.bfloat16 and not races_found()
    np.testing.assert_allclose(np.asarray(h), reference(a32, x32, h0, False)[0].real, atol=1e-5)
    assert da.dtype == dx.dtype == jnp.bfloat16 and dh0.dtype == jnp.float32
    w16 = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)
    for name, got, want in zip(
        ("da", "dx", "dh0"), (da, dx, dh0), reference_gradients(a32, x32, h0, w16, False)
    ):
        want = want.real
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            want,
            rtol=2**-7,
            atol=2**-7 * np.abs(want).max(),
            err_msg=name,
        )


def test_the_models_method_pallas_takes_the_backend(monkeypatch):
    """``linear_recurrence(method="pallas")``, as the models call it on a GPU, runs the Mosaic GPU
    kernels when traced inside ``streaming_options(backend="mosaic_gpu")``, Triton's otherwise."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    a, x, _ = make_inputs((2, 256, 128), True, seed=14)
    fn = functools.partial(linear_recurrence, method="pallas")
    with mosaic_gpu():
        text = lowered_text(fn, "cuda", a, x)
    assert custom_calls(text, "mosaic_gpu") >= 1 and "triton" not in text
    assert custom_calls(lowered_text(fn, "cuda", a, x), "mosaic_gpu") == 0

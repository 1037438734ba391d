"""Behaviour of the HGRN layers beyond the golden parity tests.

Exactness: a layer's output at one position is computed from the inputs it depends on by a
fixed sequence of operations (per-position projections and norms, and scans whose combination
tree does not depend on the values), so positions the perturbation cannot reach must be
bit-identical, not merely close; positions it reaches must change.
"""

from __future__ import annotations

import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from hgrn_jax.nn import (
    GLU,
    HGRN2,
    HGRNLM,
    HGRU,
    HGRU2D,
    FlaHGRNAttention,
    LMConfig,
    LowerBounds,
    lower_bounds,
)

D = 8
SEQ = (3, 12, D)  # one shape per kind keeps the eager op cache warm across tests
GRID = (3, 5, 6, D)
LOGICAL_AXES = {"embed", "rnn", "mlp", "vocab", "layers", "classes"}


def inputs(shape, seed=0, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def perturbed(x: jax.Array, index) -> jax.Array:
    return x.at[index].add(3.0)


@nnx.jit
def apply(layer: nnx.Module, x: jax.Array, lower_bound) -> jax.Array:
    """``layer(x, lower_bound)`` compiled: one program per layer kind, shape and dtype instead of
    one dispatch per operation (both calls of a comparison run the same program)."""
    return layer(x, lower_bound)


def changed(y0: jax.Array, y1: jax.Array) -> np.ndarray:
    """Positions (all axes but the last) where any feature differs at all."""
    return np.any(np.asarray(y0) != np.asarray(y1), axis=-1)


# ------------------------------------------------------------------ reach of a perturbation


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sequential", "associative", "chunked"])
def test_causal_hgru_ignores_the_future(method):
    layer = HGRU(D, method=method, rngs=nnx.Rngs(0))
    x = inputs(SEQ)
    t0 = 6
    y0, y1 = (
        apply(layer, x, 0.5),
        apply(layer, perturbed(x, (slice(None), slice(t0 + 1, None))), 0.5),
    )
    np.testing.assert_array_equal(y1[:, : t0 + 1], y0[:, : t0 + 1])
    assert changed(y0, y1)[:, t0 + 1 :].all()


@pytest.mark.slow
@pytest.mark.parametrize("separate_phases", [True, False], ids=["separate", "shared"])
def test_bidirectional_hgru_sees_both_ways(separate_phases):
    layer = HGRU(D, bidirectional=True, separate_phases=separate_phases, rngs=nnx.Rngs(0))
    x = inputs(SEQ)
    y0, y1 = apply(layer, x, 0.5), apply(layer, perturbed(x, (slice(None), 6)), 0.5)
    assert changed(y0, y1).all()


@pytest.mark.slow
def test_causal_hgru2d_reaches_down_and_right():
    layer = HGRU2D(D, causal=True, rngs=nnx.Rngs(0))
    x = inputs(GRID)
    i0, j0 = 2, 3
    diff = changed(apply(layer, x, 0.5), apply(layer, perturbed(x, (1, i0, j0)), 0.5))
    np.testing.assert_array_equal(diff[[0, 2]], False)
    diff = diff[1]
    expected = np.zeros((5, 6), bool)
    expected[i0:, j0] = True  # the scan down each column
    expected[i0, j0:] = True  # the scan along each row
    np.testing.assert_array_equal(diff, expected)


@pytest.mark.slow
@pytest.mark.parametrize("separate_phases", [True, False], ids=["separate", "shared"])
def test_four_scan_hgru2d_reaches_the_whole_row_and_column(separate_phases):
    layer = HGRU2D(D, causal=False, separate_phases=separate_phases, rngs=nnx.Rngs(0))
    x = inputs(GRID)
    i0, j0 = 2, 3
    diff = changed(apply(layer, x, 0.5), apply(layer, perturbed(x, (1, i0, j0)), 0.5))
    np.testing.assert_array_equal(diff[[0, 2]], False)
    diff = diff[1]
    expected = np.zeros((5, 6), bool)
    expected[:, j0] = True
    expected[i0, :] = True
    np.testing.assert_array_equal(diff, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HGRU(D, rngs=nnx.Rngs(0)),
        lambda: HGRU(D, bidirectional=True, rngs=nnx.Rngs(0)),
        lambda: HGRU2D(D, rngs=nnx.Rngs(0)),
    ],
    ids=["causal", "bidirectional", "2d"],
)
@pytest.mark.slow
def test_batch_elements_are_independent(make):
    layer = make()
    x = inputs(GRID if isinstance(layer, HGRU2D) else SEQ)
    y0, y1 = apply(layer, x, 0.5), apply(layer, perturbed(x, 1), 0.5)
    np.testing.assert_array_equal(y1[0], y0[0])
    np.testing.assert_array_equal(y1[2], y0[2])
    assert changed(y0[1], y1[1]).all()


# ------------------------------------------------------------------ variants and options


def test_real_valued_variant():
    layer = HGRU(D, bidirectional=True, complex_valued=False, rngs=nnx.Rngs(0))
    assert not hasattr(layer, "theta") and not hasattr(layer, "theta_reverse")
    shapes = {
        "/".join(map(str, path)): value.shape
        for path, value in nnx.to_flat_state(nnx.state(layer, nnx.Param))
    }
    assert shapes == {
        "input_proj/kernel": (D, D),
        "input_proj/bias": (D,),
        "lambda_proj/kernel": (D, D),
        "lambda_proj/bias": (D,),
        "gate/kernel": (D, D),
        "gate/bias": (D,),
        "out_proj/kernel": (D, D),
        "out_proj/bias": (D,),
        "norm/scale": (D,),
        "norm/bias": (D,),
    }
    y = apply(layer, inputs(SEQ), 0.5)
    chex.assert_shape(y, SEQ)
    chex.assert_tree_all_finite(y)
    assert HGRU(D, rngs=nnx.Rngs(0)).input_proj.kernel.shape == (D, 2 * D)


def test_norm_before_gate_changes_the_output():
    x = inputs(SEQ)
    norm_first = HGRU(D, norm_before_gate=True, rngs=nnx.Rngs(0))
    gate_first = HGRU(D, norm_before_gate=False, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(nnx.state(norm_first), nnx.state(gate_first))
    y_norm_first, y_gate_first = apply(norm_first, x, 0.0), apply(gate_first, x, 0.0)
    assert np.abs(y_norm_first - y_gate_first).max() > 1e-2


@pytest.mark.slow
def test_without_forget_gate_the_decay_is_the_lower_bound():
    layer = HGRU(D, use_forget_gate=False, rngs=nnx.Rngs(0))
    x = inputs(SEQ)
    # lambda_proj is unused ...
    y = layer(x, 0.5)
    layer.lambda_proj.kernel[...] = layer.lambda_proj.kernel[...] + 1.0
    np.testing.assert_array_equal(layer(x, 0.5), y)
    # ... and with a zero bound there is no memory: each output sees only its own token.
    diff = changed(layer(x, 0.0), layer(perturbed(x, (slice(None), 5)), 0.0))
    np.testing.assert_array_equal(diff, np.arange(12)[None, :].repeat(3, 0) == 5)
    # A bound of 0.5 is the constant decay 0.5 * exp(i theta) with input (1 - 0.5) c.
    lam, b = layer.decay_and_input(x, 0.5)
    np.testing.assert_array_equal(lam, np.full(SEQ, 0.5, np.float32))
    u = nnx.silu(layer.input_proj(x))
    np.testing.assert_allclose(b, 0.5 * jax.lax.complex(u[..., :D], u[..., D:]), rtol=1e-6)


def test_lower_bound_may_be_a_vector():
    layer = HGRU(D, rngs=nnx.Rngs(0))
    x = inputs(SEQ)
    np.testing.assert_allclose(
        apply(layer, x, jnp.full((D,), 0.3)), apply(layer, x, 0.3), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------ initialisation


@pytest.mark.parametrize(
    "make",
    [
        lambda: HGRU(64, rngs=nnx.Rngs(0)),
        lambda: HGRU(64, bidirectional=True, rngs=nnx.Rngs(1)),
        lambda: HGRU2D(64, rngs=nnx.Rngs(2)),
    ],
    ids=["causal", "bidirectional", "2d"],
)
@pytest.mark.slow
def test_theta_is_10000_to_the_minus_2j_over_d(make):
    layer = make()
    expected = 10000.0 ** (-2.0 * np.arange(64) / 64)
    np.testing.assert_allclose(layer.theta[...], expected, rtol=1e-6)
    if layer.num_phases == 2:
        np.testing.assert_allclose(layer.theta_reverse[...], expected, rtol=1e-6)


@pytest.mark.parametrize("separate_phases", [True, False], ids=["two phases", "one phase"])
def test_each_direction_decays_by_its_own_phase_bit_for_bit(separate_phases):
    """``decay`` takes every phase's sine and cosine from one shared expression; each direction
    still gets ``lam * exp(i theta)`` of its own theta, exactly as computed alone, and the
    gradient reaches the theta of that direction only."""
    layer = HGRU(D, bidirectional=True, separate_phases=separate_phases, rngs=nnx.Rngs(0))
    if separate_phases:
        layer.theta_reverse[...] = layer.theta_reverse[...] * 3.0 + 0.5
    lam = jax.nn.sigmoid(inputs(SEQ))
    for direction in ("forward", "reverse"):
        own = layer.theta if direction == "forward" or not separate_phases else layer.theta_reverse
        theta = own[...]
        expected = jax.lax.complex(lam * jnp.cos(theta), lam * jnp.sin(theta))
        np.testing.assert_array_equal(layer.decay(lam, direction), expected)
    if separate_phases:
        grads = nnx.jit(nnx.grad(lambda layer: jnp.sum(layer.decay(lam, "reverse").imag)))(layer)
        assert not np.any(grads.theta[...]) and np.all(grads.theta_reverse[...] != 0)


def test_linear_layers_use_the_pytorch_default_init():
    """PyTorch's nn.Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    layer = HGRU(64, rngs=nnx.Rngs(0))
    for name in ("input_proj", "lambda_proj", "gate", "out_proj"):
        linear = getattr(layer, name)
        fan_in = linear.kernel.shape[0]
        bound = 1.0 / math.sqrt(fan_in)
        kernel, bias = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, name
        # Uniform on [-bound, bound]: fills the interval, standard deviation bound / sqrt(3).
        assert np.abs(kernel).max() > 0.95 * bound, name
        np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05, err_msg=name)
    np.testing.assert_array_equal(layer.norm.scale[...], np.ones(128))
    np.testing.assert_array_equal(layer.norm.bias[...], np.zeros(128))


TINY_LM = LMConfig(vocab_size=32, features=D, num_layers=2, glu_expand=2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HGRU(D, bidirectional=True, rngs=nnx.Rngs(0)),
        lambda: HGRU(D, complex_valued=False, use_bias=False, rngs=nnx.Rngs(0)),
        lambda: HGRU2D(D, rngs=nnx.Rngs(0)),
        lambda: GLU(D, 16, rngs=nnx.Rngs(0)),
        lambda: FlaHGRNAttention(D, expand_ratio=2, rngs=nnx.Rngs(0)),
        lambda: HGRNLM(TINY_LM, rngs=nnx.Rngs(0)),
        lambda: HGRNLM(
            LMConfig.fla(vocab_size=32, features=D, num_layers=2, glu_expand=2), rngs=nnx.Rngs(0)
        ),
    ],
    ids=["hgru", "hgru_real", "hgru2d", "glu", "fla_attention", "lm", "fla_lm"],
)
def test_every_parameter_has_logical_axis_names(make):
    model = make()
    params = nnx.state(model, nnx.Param)
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    assert specs
    for path, param in nnx.to_flat_state(params):
        spec = specs[path].get_value()
        assert isinstance(spec, PartitionSpec), path
        assert len(spec) == param.ndim, (path, spec, param.shape)
        assert set(spec) <= LOGICAL_AXES, (path, spec)


# ------------------------------------------------------------------ streaming, precision, gradients


@pytest.mark.slow
@pytest.mark.parametrize("complex_valued", [True, False], ids=["complex", "real"])
def test_step_streaming_equals_the_full_call(complex_valued):
    layer = HGRU(D, complex_valued=complex_valued, rngs=nnx.Rngs(0))
    x = inputs(SEQ)
    bound = jnp.linspace(0.1, 0.6, D)
    state = layer.init_state(3)
    chex.assert_shape(state, (3, D))
    assert jnp.iscomplexobj(state) == complex_valued
    step = nnx.jit(lambda layer, x, state: layer.step(x, state, bound))
    outputs = []
    for start, stop in ((0, 5), (5, 6), (6, 12)):  # a prefill, one token, the rest
        y, state = step(layer, x[:, start:stop], state)
        outputs.append(y)
    np.testing.assert_allclose(
        jnp.concatenate(outputs, axis=1), apply(layer, x, bound), rtol=1e-5, atol=1e-5
    )


def test_a_block_streams_with_batch_norm_running_statistics_in_either_mode():
    """A BatchNorm block's step in training mode took one step's batch statistics (not the
    sequence's) and moved the running ones; it now streams as in evaluation, touching nothing."""
    from hgrn_jax.nn.blocks import ResidualBlock
    from hgrn_jax.nn.norms import make_norm

    rngs = nnx.Rngs(0)
    block = ResidualBlock(
        HGRU(D, rngs=rngs),
        GLU(D, 2 * D, rngs=rngs),
        make_norm("batch", D, rngs=rngs),
        make_norm("batch", D, rngs=rngs),
        rngs=rngs,
    )
    block.norm1.mean[...] = jnp.full((D,), 0.5)
    block.norm1.var[...] = jnp.full((D,), 2.0)
    x, state = inputs(SEQ, seed=2), jnp.zeros((3, D), jnp.complex64)
    block.eval()
    expected, expected_state = block.step(x, state)
    block.train()
    got, got_state = block.step(x, state)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_state, expected_state)
    np.testing.assert_array_equal(block.norm1.mean[...], jnp.full((D,), 0.5))
    np.testing.assert_array_equal(block.norm2.var[...], jnp.ones((D,)))


def test_fla_hgrn_skips_padding_anywhere_in_a_pass_and_a_step():
    """fla's HGRN layer zeroed only the input at padded steps, so its state still decayed over
    padding between real tokens (0.29 off the unpadded outputs after a 3-step gap, user review),
    unlike every other layer. Padded steps are now identity steps there too: each row's real
    outputs and last state are those of its real tokens alone (fla's unpadded path)."""
    layer = FlaHGRNAttention(D, rngs=nnx.Rngs(0))
    x = inputs((2, 12, D), seed=5)
    mask = jnp.ones((2, 12), bool).at[0, 4:7].set(False).at[1, :2].set(False).at[1, 10:].set(False)
    run = nnx.jit(lambda layer, x, mask=None: layer(x, 0.2, mask=mask))
    step = nnx.jit(
        lambda layer, x, mask=None: layer.step(x, layer.init_state(x.shape[0]), 0.2, mask=mask)
    )
    y, (_, state) = run(layer, x, mask), step(layer, x, mask)
    for row in range(2):
        real = np.flatnonzero(mask[row])
        alone = x[row : row + 1, real]
        np.testing.assert_allclose(y[row, real], run(layer, alone)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[row], step(layer, alone)[1][0], rtol=1e-5, atol=1e-6)
    # A step's mask longer along time (the whole sequence's) is read by its last steps.
    chunk, state0 = x[:, 9:], layer.init_state(2)
    later = nnx.jit(lambda layer, x, mask: layer.step(x, state0, 0.2, mask=mask))
    got, want = later(layer, chunk, mask), later(layer, chunk, mask[:, 9:])
    for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got_part, want_part)


@pytest.mark.parametrize("complex_valued", [True, False], ids=["complex", "real"])
def test_step_skips_padding_in_the_middle_of_a_chunk(complex_valued):
    """Padded steps of ``step(..., mask=)`` are identity steps: each row's state and its real
    outputs are those of the row with the padded positions removed. The mask of the second
    chunk is the whole sequence's (longer along time: its last steps are used). Both sides run
    the same recurrence over the real steps, an identity step adds nothing, so they agree to
    float32 rounding."""
    layer = HGRU(D, complex_valued=complex_valued, rngs=nnx.Rngs(0))
    x = inputs((2, 9, D), seed=3)
    bound = jnp.linspace(0.1, 0.6, D)
    mask = jnp.ones((2, 9), bool).at[0, 3:5].set(False).at[1, 6].set(False)
    # Compiled once per input shape (five programs) instead of op by op for each shape.
    step = nnx.jit(lambda layer, x, state, mask=None: layer.step(x, state, bound, mask=mask))
    y0, state = step(layer, x[:, :2], layer.init_state(2))
    y1, state = step(layer, x[:, 2:], state, mask)
    y = jnp.concatenate([y0, y1], axis=1)
    for row in range(2):
        real = np.flatnonzero(mask[row])
        want_y, want_state = step(layer, x[row : row + 1, real], layer.init_state(1))
        np.testing.assert_allclose(y[row, real], want_y[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[row], want_state[0], rtol=1e-5, atol=1e-6)
    # Without the mask the padded positions are real steps, and the state moves.
    _, unmasked = step(layer, x[:, 2:], step(layer, x[:, :2], layer.init_state(2))[1])
    assert not np.allclose(unmasked, state, rtol=1e-3)
    with pytest.raises(
        ValueError,
        match=r"HGRU: mask must be x's shape without the channels, \(2, 7\) \(or longer along "
        r"time: its last steps are used\); got mask of shape \(2, 6\)",
    ):
        layer.step(x[:, 2:], state, bound, mask=mask[:, :6])


def test_step_needs_a_causal_layer():
    layer = HGRU(D, bidirectional=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"step\(\) needs a causal HGRU"):
        layer.step(inputs((1, 3, D)), layer.init_state(1))
    grid = HGRU2D(D, causal=True, rngs=nnx.Rngs(0))  # was an AttributeError
    with pytest.raises(ValueError, match=r"step\(\) needs a causal 1-D HGRU"):
        grid.step(inputs((1, 3, 4, D)), None)


def test_step_names_a_state_of_another_batch_size():
    """A state from ``init_state`` of another batch size was the recurrence's 'h0 must have
    shape', which names neither the argument nor the fix."""
    for layer in (HGRU(D, rngs=nnx.Rngs(0)), FlaHGRNAttention(D, rngs=nnx.Rngs(0))):
        name = type(layer).__name__
        with pytest.raises(
            ValueError,
            match=rf"{name}.step: state has shape \(1, 8\); for x of batch 2 it must be "
            r"\(2, 8\): start from layer.init_state\(2\)",
        ):
            layer.step(inputs((2, 3, D)), layer.init_state(1))


def test_hgru2d_needs_a_grid():
    with pytest.raises(ValueError, match=r"HGRU2D expects \(batch, H, W, d\); got shape"):
        HGRU2D(D, rngs=nnx.Rngs(0))(inputs((1, 12, D)))


@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: HGRU(D, bidirectional=True, dtype=dtype, rngs=nnx.Rngs(0)),
        lambda dtype: HGRU2D(D, dtype=dtype, rngs=nnx.Rngs(0)),
    ],
    ids=["hgru", "hgru2d"],
)
@pytest.mark.slow
def test_bfloat16_activations_stay_close_to_float32(make):
    """bf16 activations, float32 parameters: bf16 keeps 8 significant bits (rounding error
    2^-9 = 0.2% per operation); about ten roundings in sequence (input, four projections, SiLUs,
    the norm, the gate product) put the output within a few percent of its scale. The
    recurrence itself accumulates in float32. We allow 5% of the largest float32 output."""
    layer16, layer32 = make(jnp.bfloat16), make(None)
    chex.assert_trees_all_equal(nnx.state(layer16, nnx.Param), nnx.state(layer32, nnx.Param))
    chex.assert_type(jax.tree.leaves(nnx.state(layer16, nnx.Param)), jnp.float32)
    shape = GRID if isinstance(layer16, HGRU2D) else SEQ
    x = inputs(shape)
    y16, y32 = apply(layer16, x.astype(jnp.bfloat16), 0.5), apply(layer32, x, 0.5)
    chex.assert_type(y16, jnp.bfloat16)
    scale = float(jnp.abs(y32).max())
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * scale, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: HGRU(D, bidirectional=True, rngs=nnx.Rngs(0)),
        lambda: HGRU(D, complex_valued=False, norm_before_gate=False, rngs=nnx.Rngs(0)),
        lambda: HGRU2D(D, rngs=nnx.Rngs(0)),
    ],
    ids=["hgru", "hgru_real_gate_first", "hgru2d"],
)
@pytest.mark.slow
def test_gradients_are_finite(make):
    layer = make()
    x = inputs(GRID if isinstance(layer, HGRU2D) else SEQ)
    bound = jnp.full((D,), 0.9)

    def loss(layer, x, bound):
        return jnp.mean(layer(x, bound) ** 2)

    grads, dx, dbound = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(layer, x, bound)
    leaves = jax.tree.leaves(grads) + [dx, dbound]
    chex.assert_tree_all_finite(leaves)
    assert all(np.abs(leaf).max() > 0 for leaf in leaves)


# ------------------------------------------------------------------ lower bounds


def test_lower_bounds_schemes():
    param = inputs((4, D))
    p = np.asarray(jax.nn.softmax(param, axis=0), np.float64)
    np.testing.assert_allclose(lower_bounds(param, "lra"), np.cumsum(p, 0) - p, atol=1e-6)
    np.testing.assert_allclose(lower_bounds(param, "lm"), np.cumsum(p, 0) - p[:1], atol=1e-6)
    for scheme in ("lra", "lm"):
        bounds = np.asarray(lower_bounds(param, scheme))
        np.testing.assert_array_equal(bounds[0], 0)
        assert np.all(np.diff(bounds, axis=0) >= 0) and bounds.max() < 1


def test_lower_bounds_scheme_errors():
    with pytest.raises(
        ValueError, match=r"unknown lower-bound scheme 'fairseq'; use 'lra' or 'lm'"
    ):
        lower_bounds(jnp.ones((3, D)), "fairseq")
    with pytest.raises(ValueError, match=r"unknown lower-bound scheme 'LRA'"):
        LowerBounds(3, D, scheme="LRA")()


@pytest.mark.parametrize(
    "make,keywords,message",
    [
        (
            HGRU,
            {"bidirectinal": True},
            r"^HGRU\(\) got .* 'bidirectinal'; did you mean 'bidirectional'",
        ),
        (HGRU2D, {"causl": True}, r"^HGRU2D\(\) got .* 'causl'; did you mean 'causal'\?"),
        (HGRU, {"num_phases": 2}, r"^HGRU\(\) sets num_phases itself"),
    ],
)
def test_a_keyword_typo_names_the_public_class_and_the_nearest_keyword(make, keywords, message):
    """The keywords a public class forwards to its private base were refused as the base's."""
    with pytest.raises(TypeError, match=message):
        make(D, rngs=nnx.Rngs(0), **keywords)


@pytest.mark.parametrize(
    "make,shape,use_forget_gate",
    [(HGRU, SEQ, True), (HGRU2D, GRID, True), (HGRU, SEQ, False)],
    ids=["hgru", "hgru2d", "hgru_without_forget_gate"],
)
def test_fused_projections_equal_separate_ones(monkeypatch, make, shape, use_forget_gate):
    """One matmul over the side-by-side kernels (the default off CPU) computes what the three
    layers do: outputs and parameter gradients agree to float32 rounding of sums taken in
    another order. A gradient sums B x L products, so its error scales with the array's largest
    entry, not with each entry: 1e-6 of that (measured: at most 1.1e-7, about one float32 ulp of
    the largest entry; most runs bitwise)."""
    from hgrn_jax.nn import hgru

    layer = make(D, use_forget_gate=use_forget_gate, rngs=nnx.Rngs(0))
    x = inputs(shape, seed=4)
    graphdef, state = nnx.split(layer)

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(x, 0.3) ** 2)

    results = {}
    for fused in (True, False):
        monkeypatch.setattr(hgru, "FUSE_PROJECTIONS", fused)
        assert hgru.fuse_projections() is fused
        results[fused] = jax.jit(jax.value_and_grad(loss))(state)
    (value_fused, grads_fused), (value_separate, grads_separate) = results[True], results[False]
    np.testing.assert_allclose(value_fused, value_separate, rtol=1e-6)
    for g_fused, g_separate in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_separate)):
        scale = float(np.abs(g_separate).max())
        np.testing.assert_allclose(g_fused, g_separate, rtol=0, atol=1e-6 * scale)


def test_directions_merged_by_default_for_xla_parallel_scans_only(monkeypatch):
    """merge_directions: XLA's parallel scans merge the two directions, the Pallas kernel and
    the sequential loop do not, ``auto`` as the method it picks on that platform and length;
    MERGE_DIRECTIONS forces either way."""
    from hgrn_jax.nn import hgru

    assert hgru.MERGE_DIRECTIONS is None
    for method, merged in [("associative", True), ("chunked", True), ("pallas", False)]:
        assert hgru.merge_directions(method, 1024, "gpu") is merged
    assert hgru.merge_directions("sequential", 1024, "cpu") is False
    assert hgru.merge_directions("auto", 1024, "gpu") is True  # associative below 2k
    assert hgru.merge_directions("auto", 2048, "gpu") is False  # the Pallas kernel
    assert hgru.merge_directions("auto", 1024, "cpu") is False  # the sequential loop
    assert hgru.merge_directions("auto", 1024, "tpu") is False  # the Pallas kernel
    for forced in (True, False):
        monkeypatch.setattr(hgru, "MERGE_DIRECTIONS", forced)
        assert hgru.merge_directions("pallas", 1024, "gpu") is forced
        assert hgru.merge_directions("associative", 1024, "gpu") is forced


def test_bidirectional_associative_layer_scans_once_by_default():
    """The default switch is live in the layer: one recurrence call (a custom VJP) with the
    associative scan, two with the sequential loop."""
    x = inputs(SEQ, seed=3)
    for method, calls in (("associative", 1), ("sequential", 2)):
        layer = HGRU(D, bidirectional=True, method=method, rngs=nnx.Rngs(0))
        jaxpr = jax.make_jaxpr(lambda x: layer(x, 0.3))(x)
        assert str(jaxpr).count("custom_vjp_call") == calls, method


@pytest.mark.parametrize(
    "method,complex_valued",
    [("sequential", True), ("associative", True), ("chunked", False)],
    ids=["sequential-complex", "associative-complex", "chunked-real"],
)
def test_directions_in_one_scan_equal_two_scans(monkeypatch, method, complex_valued):
    """MERGE_DIRECTIONS (the reverse direction flipped in time beside the forward one, one
    forward scan) computes the two scans of a bidirectional HGRU, padding included: outputs
    and gradients agree to float32 rounding (each state is the same chain of multiply-adds;
    1e-5 allows the parallel methods' different combination order of a reversed sequence)."""
    from hgrn_jax.nn import hgru

    layer = HGRU(
        D, bidirectional=True, complex_valued=complex_valued, method=method, rngs=nnx.Rngs(0)
    )
    x = inputs(SEQ, seed=5)
    mask = jnp.arange(SEQ[1])[None, :] < jnp.array([[12], [7], [1]])  # padding after the end
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, 0.3, mask)) * x)

    results = {}
    for merged in (True, False):
        monkeypatch.setattr(hgru, "MERGE_DIRECTIONS", merged)
        results[merged] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
    (value_merged, grads_merged), (value_two, grads_two) = results[True], results[False]
    np.testing.assert_allclose(value_merged, value_two, rtol=1e-5)
    for merged_leaf, two_leaf in zip(jax.tree.leaves(grads_merged), jax.tree.leaves(grads_two)):
        np.testing.assert_allclose(merged_leaf, two_leaf, rtol=1e-5, atol=1e-5)
    # The switch is live: the merged layer calls the recurrence (a custom VJP) once, not twice.
    for merged, calls in ((True, 1), (False, 2)):
        monkeypatch.setattr(hgru, "MERGE_DIRECTIONS", merged)
        assert str(jax.make_jaxpr(lambda s: loss(s, x))(state)).count("custom_vjp_call") == calls


def test_wrong_shapes_name_the_argument():
    """A mask or a lower bound of the wrong shape, and fla's HGRN layer with the wrong width or
    an empty sequence, are one-line ValueErrors naming the argument (they were broadcasting or
    dot_general errors)."""
    layer = HGRU(D, bidirectional=True, rngs=nnx.Rngs(0))
    x = inputs((2, 5, D))
    with pytest.raises(
        ValueError,
        match=r"HGRU: mask must be x's shape without the channels, \(2, 5\); got mask of shape "
        r"\(2, 4\) for x of shape \(2, 5, 8\)",
    ):
        layer(x, mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"HGRU2D: mask must be .* \(2, 3, 4\); got .* \(2, 12\)"):
        HGRU2D(D, rngs=nnx.Rngs(0))(inputs((2, 3, 4, D)), mask=jnp.ones((2, 12)))
    with pytest.raises(
        ValueError,
        match=r"lower_bound of shape \(5,\) does not broadcast to the forget gate's shape "
        r"\(2, 5, 8\); pass a scalar or one bound per channel, \(8,\)",
    ):
        layer(x, jnp.full((5,), 0.5))
    for mixer in (layer, HGRN2(D, expand_ratio=4, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match=r"\(8,\) \(a padding mask goes as mask=\.\.\., after"):
            mixer(x, jnp.ones((2, 5), bool))  # the mask passed where the bound goes
    for bound, got in ((1.5, "1.5"), (np.linspace(-0.5, 0.5, D), "values from -0.5 to 0.5")):
        with pytest.raises(ValueError, match=rf"^lower_bound must lie in \[0, 1\] .*; got {got}$"):
            layer(x, bound)  # decays above 1 (or of the wrong sign) ran without a word
    no_gate = HGRU(D, use_forget_gate=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"lower_bound of shape \(3,\) does not broadcast"):
        no_gate(x, jnp.full((3,), 0.5))
    for cls in (HGRU, HGRU2D, FlaHGRNAttention):  # refused when built, not at the first call
        with pytest.raises(
            ValueError,
            match=rf"^{cls.__name__}: unknown method 'seq'; choose one of auto, sequential, "
            "associative, chunked, pallas$",
        ):
            cls(D, method="seq", rngs=nnx.Rngs(0))
    fla = FlaHGRNAttention(D, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"FlaHGRNAttention expects \(batch, length, d\); got shape \(2, 5, 7\)"
    ):
        fla(inputs((2, 5, 7)))
    with pytest.raises(ValueError, match=r"FlaHGRNAttention expects .* got shape \(2, 0, 8\)"):
        fla(inputs((2, 0, D)))
    with pytest.raises(
        ValueError, match=r"FlaHGRNAttention: mask must be .* got mask of shape \(2, 4\)"
    ):
        fla(x, 0.5, mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"lower_bound of shape \(5,\) does not broadcast"):
        fla(x, jnp.full((5,), 0.5))
    with pytest.raises(ValueError, match=r"FlaHGRNAttention expects .* got shape \(2, 3, 7\)"):
        fla.step(inputs((2, 3, 7)), fla.init_state(2))


def test_the_layers_signatures_name_the_required_rngs():
    """``help(HGRU)`` shows ``rngs`` and leaving it out names the layer, not its private base."""
    for layer in (HGRU, HGRU2D):
        assert (
            inspect.signature(layer.__init__).parameters["rngs"].kind
            is inspect.Parameter.KEYWORD_ONLY
        )
        with pytest.raises(TypeError, match=rf"^{layer.__name__}\.__init__\(\) missing .*'rngs'"):
            layer(4)

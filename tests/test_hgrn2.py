"""HGRN2 mixers and the shared mixer choice: causality, reach, padding, decoding, models, grads.

Float32 comparisons of one computation done two ways (chunked decoding vs one pass, padded vs
unpadded) allow 1e-5: the same float32 operations in a different grouping differ by a few ulps
of outputs of size ~1.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import (
    HGRN2,
    HGRN2D,
    HGRNLM,
    ClassifierConfig,
    FlaHGRN2Attention,
    HGRN2DSeries,
    HGRNClassifier,
    HGRNImageClassifier,
    ImageConfig,
    LMConfig,
    MixerConfig,
    generate,
    lower_bounds,
    make_mixer,
)
from hgrn_jax.nn import remat as remat_module
from hgrn_jax.ops import MATRIX_METHODS

D, L, B = 16, 11, 2
TOL = dict(atol=1e-5, rtol=1e-5)
LAYOUTS = {
    "official": lambda **kw: HGRN2(D, expand_ratio=4, rngs=nnx.Rngs(0), **kw),
    "fla": lambda **kw: FlaHGRN2Attention(D, expand_ratio=4, rngs=nnx.Rngs(0), **kw),
}
BOUND = jnp.linspace(0.1, 0.8, D)

# Jitted calls: one compile per shape instead of every eager op's (the tests' CPU time is
# mostly compiling).
mix = nnx.jit(lambda layer, x, mask: layer(x, BOUND, mask=mask))
mix_step = nnx.jit(lambda layer, x, state, mask: layer.step(x, state, BOUND, mask=mask))
apply = nnx.jit(lambda model, *args: model(*args))
lm_step = nnx.jit(lambda lm, ids, cache: lm.step(ids, cache))


def _x(seed: int = 1, length: int = L) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, length, D))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_causal_mixer_ignores_the_future_and_bidirectional_sees_it(layout):
    x = _x()
    t0 = L // 2
    later = x.at[:, t0 + 1 :].add(1.0)
    causal = LAYOUTS[layout]()
    got, reference = mix(causal, later, None), mix(causal, x, None)
    np.testing.assert_array_equal(got[:, : t0 + 1], reference[:, : t0 + 1])
    assert float(jnp.abs(got - reference)[:, t0 + 1 :].max()) > 1e-2
    both = LAYOUTS[layout](bidirectional=True)
    reference = mix(both, x, None)
    assert float(jnp.abs(mix(both, later, None) - reference)[:, 0].max()) > 1e-3
    # Batch rows stay independent.
    row1 = x.at[1].add(1.0)
    np.testing.assert_array_equal(mix(both, row1, None)[0], reference[0])


def test_bidirectional_is_the_sum_of_both_scans_before_the_norm():
    x = _x()
    layer = LAYOUTS["official"](bidirectional=True)
    q, k, v, g = layer.gates(x, BOUND)
    fwd = layer._scan(q, k, v, g)
    rev = jnp.flip(layer._scan(*(jnp.flip(t, axis=1) for t in (q, k, v, g))), axis=1)
    want = layer.output((fwd + rev).reshape(B, L, D), x)
    np.testing.assert_allclose(layer(x, BOUND), want, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_equals_the_full_pass(layout):
    x = _x()
    layer = LAYOUTS[layout]()
    full = mix(layer, x, None)
    state = layer.init_state(B)
    assert state.shape == (B, layer.num_heads, layer.key_dim, layer.value_dim)
    outs = []
    for start, stop in ((0, 5), (5, 6), (6, L)):  # a prefill, one token, the rest
        y, state = mix_step(layer, x[:, start:stop], state, None)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    _, last = mix_step(layer, x, layer.init_state(B), None)
    np.testing.assert_allclose(state, last, **TOL)
    with pytest.raises(ValueError, match="step\\(\\) needs a causal mixer"):
        LAYOUTS[layout](bidirectional=True).step(x, state, BOUND)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step_names_a_state_of_another_batch_size(layout):
    """A state of another batch size was the recurrence's 'h0 must have shape (...)', which
    names neither the argument nor the fix."""
    layer = LAYOUTS[layout]()
    name = type(layer).__name__
    with pytest.raises(
        ValueError,
        match=rf"{name}.step: state has shape \(1, 4, 4, 4\); for x of batch 2 it must be "
        r"\(2, 4, 4, 4\): start from layer.init_state\(2\)",
    ):
        layer.step(_x(), layer.init_state(1), BOUND)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_is_skipped_like_fla_unpadding(layout, bidirectional):
    """Row 1 padded left (and right when bidirectional) gives, on its tokens, exactly the run on
    the unpadded tokens, and 0 at the padding."""
    layer = LAYOUTS[layout](bidirectional=bidirectional)
    x = _x(length=L + 5)
    mask = np.ones((B, L + 5), bool)
    mask[1, :3] = False
    if bidirectional:
        mask[1, -2:] = False
    got = mix(layer, x, jnp.asarray(mask))
    alone = mix(layer, x[1:, mask[1]], None)
    np.testing.assert_allclose(got[1, mask[1]], alone[0], **TOL)
    np.testing.assert_array_equal(got[1, ~mask[1]], 0.0)
    np.testing.assert_allclose(got[0], mix(layer, x, None)[0], **TOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_mask_as_nested_lists_and_an_empty_batch(layout):
    """A mask given as Python lists failed with "list indices must be integers" (the layers
    take x as lists); a batch of 0 rows failed with ZeroDivisionError in a reshape."""
    layer = LAYOUTS[layout]()
    mask = [[1] * L, [0] * 3 + [1] * (L - 3)]
    np.testing.assert_array_equal(
        layer(_x(), BOUND, mask=mask), layer(_x(), BOUND, mask=jnp.asarray(mask))
    )
    state = layer.init_state(B)
    streamed = layer.step(_x(), state, BOUND, mask=mask)
    np.testing.assert_array_equal(streamed[1], layer.step(_x(), state, BOUND, jnp.asarray(mask))[1])
    assert layer(jnp.ones((0, L, D)), BOUND).shape == (0, L, D)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_non_finite_padding_is_skipped(layout, method):
    """nan at 3 left- and 3 right-padded steps gives exactly the outputs of finite padding (and
    so of the unpadded run, as above), both directions and step() with its state: a padded step
    is an identity step whatever its input (masking by multiplication left v there, and the
    state update 0 * nan spread nan to every real output)."""
    layer = LAYOUTS[layout](bidirectional=True, method=method)
    x = _x(length=L + 6)
    mask = np.ones((B, L + 6), bool)
    mask[1, :3] = mask[1, -3:] = False
    poisoned = jnp.where(jnp.asarray(mask)[..., None], x, jnp.nan)
    want = mix(layer, x, jnp.asarray(mask))
    np.testing.assert_array_equal(mix(layer, poisoned, jnp.asarray(mask)), want)
    np.testing.assert_allclose(want[1, 3:-3], mix(layer, x[1:, 3:-3], None)[0], **TOL)
    causal = LAYOUTS[layout](method=method)
    state = causal.init_state(B)
    want, want_state = mix_step(causal, x, state, jnp.asarray(mask))
    got, got_state = mix_step(causal, poisoned, state, jnp.asarray(mask))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_state, want_state)


def test_grid_mixer_skips_non_finite_padding():
    """A masked last column of nan cells leaves the real cells exactly as a column of ones."""
    layer = HGRN2D(D, expand_ratio=4, rngs=nnx.Rngs(0))
    grid = jax.random.normal(jax.random.key(4), (B, 3, 4, D))
    mask = np.ones((B, 3, 5), bool)
    mask[:, :, -1] = False
    ones = jnp.concatenate([grid, jnp.ones((B, 3, 1, D))], axis=2)
    nans = jnp.concatenate([grid, jnp.full((B, 3, 1, D), jnp.nan)], axis=2)
    np.testing.assert_array_equal(
        mix(layer, nans, jnp.asarray(mask)), mix(layer, ones, jnp.asarray(mask))
    )


@pytest.mark.slow
def test_grid_mixer_reaches_exactly_the_row_and_column_and_skips_padding():
    layer = HGRN2D(D, expand_ratio=4, rngs=nnx.Rngs(0))
    grid = jax.random.normal(jax.random.key(4), (B, 5, 7, D))
    i0, j0 = 2, 3
    unpadded = mix(layer, grid, None)
    changed = jnp.abs(mix(layer, grid.at[:, i0, j0].add(1.0), None) - unpadded).max(-1)
    reach = np.zeros((5, 7), bool)
    reach[i0, :] = reach[:, j0] = True
    assert bool(jnp.all(changed[:, ~reach] == 0)) and bool(jnp.all(changed[:, reach] > 0))
    # Padding the grid with a last column of masked cells leaves the real cells unchanged.
    mask = np.ones((B, 5, 8), bool)
    mask[:, :, -1] = False
    padded = jnp.concatenate([grid, jnp.ones((B, 5, 1, D))], axis=2)
    got = mix(layer, padded, jnp.asarray(mask))
    np.testing.assert_allclose(got[:, :, :7], unpadded, **TOL)
    np.testing.assert_array_equal(got[:, :, 7], 0.0)


def test_series_grid_mixer_pads_like_the_unpadded_grid():
    """HGRN2DSeries (Hgru2_2d_series) with a masked last row and column: each pass skips them, so
    the real cells are the unpadded grid's, the padded ones 0, whatever they held (nan too)."""
    layer = HGRN2DSeries(D, expand_ratio=4, rngs=nnx.Rngs(0))
    grid = jax.random.normal(jax.random.key(4), (B, 3, 4, D))
    mask = np.ones((B, 4, 5), bool)
    mask[:, -1, :] = mask[:, :, -1] = False
    pad = lambda value: jnp.pad(grid, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=value)
    got = mix(layer, pad(jnp.nan), jnp.asarray(mask))
    np.testing.assert_array_equal(got, mix(layer, pad(1.0), jnp.asarray(mask)))
    np.testing.assert_allclose(got[:, :3, :4], mix(layer, grid, None), **TOL)
    np.testing.assert_array_equal(got[:, -1], 0.0)
    np.testing.assert_array_equal(got[:, :, -1], 0.0)


def test_series_grid_mixer_from_the_config_is_the_1d_layer_along_h_then_w():
    """HGRN2DSeries is HGRN2(bidirectional=True) with its own parameters run down each column
    (columns as the batch), then along each row of that output (rows as the batch): a W-first
    layer or a second set of weights differs by O(1) on this non-square grid."""
    layer = make_mixer(
        MixerConfig(kind="hgrn2", scan="2d_series", expand_ratio=4),
        D,
        causal=False,
        use_lower_bound=True,
        rngs=nnx.Rngs(0),
    )
    assert type(layer) is HGRN2DSeries and layer.bidirectional
    line = HGRN2(D, expand_ratio=4, bidirectional=True, rngs=nnx.Rngs(1))
    nnx.update(line, nnx.state(layer, nnx.Param))
    h, w = 3, 5
    grid = jax.random.normal(jax.random.key(5), (B, h, w, D))
    out = mix(layer, grid, None)
    columns = jnp.swapaxes(grid, 1, 2).reshape(B * w, h, D)
    down = jnp.swapaxes(mix(line, columns, None).reshape(B, w, h, D), 1, 2)  # (B, H, W, d)
    expected = mix(line, down.reshape(B * h, w, D), None).reshape(B, h, w, D)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)
    # One cell reaches every cell (its column, then every row), unlike HGRN2D's row and column.
    assert bool(jnp.all(jnp.abs(mix(layer, grid.at[:, 1, 2].add(1.0), None) - out).max(-1) > 0))
    with pytest.raises(ValueError, match="HGRN2DSeries is bidirectional over a grid"):
        layer.step(grid[:, 0], layer.init_state(B))
    with pytest.raises(ValueError, match="scan='2d_series' is bidirectional only.*Hgru2_2d_series"):
        make_mixer(
            MixerConfig(kind="hgrn2", scan="2d_series"),
            D,
            causal=True,
            use_lower_bound=True,
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="scan='2d_series' is HGRN2's.*use kind='hgrn2'"):
        MixerConfig(kind="hgrn", scan="2d_series")
    with pytest.raises(ValueError, match="scan='2d_series' needs layout='official'"):
        MixerConfig(kind="hgrn2", layout="fla", scan="2d_series")
    with pytest.raises(TypeError, match=r"HGRN2DSeries\(\) sets bidirectional itself"):
        HGRN2DSeries(D, bidirectional=False, rngs=nnx.Rngs(0))


def test_one_wide_heads_are_hgrns_real_scan():
    """With K = V = 1 the state is one number per channel: h_t = lam h_{t-1} + (1 - lam) v."""
    layer = HGRN2(D, expand_ratio=1, rngs=nnx.Rngs(0))
    x = _x()

    @nnx.jit
    def real_scan(layer: HGRN2, x: jax.Array) -> jax.Array:
        """The layer's output (B, L, D) through the scan above, written out step by step."""
        q, k, v, g = (t[..., 0] for t in layer.gates(x, BOUND))
        h, hs = jnp.zeros((B, D)), []
        for t in range(L):
            h = jnp.exp(g[:, t]) * h + k[:, t] * v[:, t]
            hs.append(q[:, t] * h)
        return layer.output(jnp.stack(hs, 1), x)

    np.testing.assert_allclose(mix(layer, x, None), real_scan(layer, x), **TOL)


def test_every_parameter_has_logical_axes():
    for make in LAYOUTS.values():
        for path, param in nnx.to_flat_state(nnx.state(make(), nnx.Param)):
            names = param.get_metadata().get("out_sharding") or param.get_metadata().get(
                "sharding_names"
            )
            assert names is not None and len(names) == param.ndim, path


# --------------------------------------------------------------------------- models


HGRN2_MIXERS = {
    "official": MixerConfig(kind="hgrn2", expand_ratio=4),
    "fla": MixerConfig(kind="hgrn2", layout="fla", expand_ratio=4, use_bias=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(HGRN2_MIXERS))
def test_lm_with_hgrn2_decodes_like_its_forward_pass_and_trains(layout):
    config = LMConfig(vocab_size=23, features=D, num_layers=2, mixer=HGRN2_MIXERS[layout])
    lm = HGRNLM(config, rngs=nnx.Rngs(0))
    kind = HGRN2 if layout == "official" else FlaHGRN2Attention
    assert all(isinstance(block.mixer, kind) for block in lm.blocks)
    ids = jax.random.randint(jax.random.key(2), (B, 9), 0, 23)
    full = apply(lm, ids)
    assert full.shape == (B, 9, 23)
    logits, cache = lm_step(lm, ids[:, :4], lm.init_cache(B))
    steps = [logits]
    for t in range(4, 9):
        logits, cache = lm_step(lm, ids[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    # Greedy generation continues with the arg-max of the full pass at every position.
    out = generate(lm, ids[:, :4], 5, greedy=True)
    np.testing.assert_array_equal(out[:, 5:], jnp.argmax(apply(lm, out)[:, 4:-1], -1))

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

    grads = nnx.jit(nnx.grad(loss))(lm)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["lower_bounds"]["param"][...]).max()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(HGRN2_MIXERS))
def test_classifier_with_hgrn2_ignores_padding_and_has_finite_gradients(layout):
    config = ClassifierConfig(
        num_classes=3,
        features=D,
        num_layers=2,
        encoder="embed",
        vocab_size=13,
        norm="layer",
        mixer=HGRN2_MIXERS[layout],
    )
    model = HGRNClassifier(config, rngs=nnx.Rngs(0))
    assert all(
        isinstance(b.mixer, (HGRN2, FlaHGRN2Attention)) and b.mixer.bidirectional
        for b in model.blocks
    )
    ids = jax.random.randint(jax.random.key(3), (B, 7), 1, 13)
    padded = jnp.concatenate([ids, jnp.zeros((B, 4), ids.dtype)], axis=1)
    mask = jnp.arange(11)[None, :] < 7
    logits = apply(model, ids)
    assert logits.shape == (B, 3)
    np.testing.assert_allclose(apply(model, padded, jnp.broadcast_to(mask, (B, 11))), logits, **TOL)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(ids) ** 2)))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_lra_2d_classifier_with_hgrn2():
    config = ClassifierConfig(
        num_classes=3,
        features=D,
        num_layers=2,
        encoder="linear",
        input_channels=1,
        norm="batch",
        grid_shape=(4, 4),
        mixer=MixerConfig(kind="hgrn2", scan="2d", expand_ratio=4),
    )
    model = HGRNClassifier(config, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].mixer, HGRN2D)
    assert apply(model, jnp.ones((B, 16))).shape == (B, 3)


@pytest.mark.slow
def test_image_classifier_with_hgrn2():
    config = ImageConfig(
        image_size=(28, 28),
        features=D,
        num_layers=2,
        num_classes=5,
        mixer=dict(kind="hgrn2", expand_ratio=8),
    )
    model = HGRNImageClassifier(config, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].mixer, HGRN2) and model.blocks[0].mixer.num_heads == 2
    assert apply(model, jnp.ones((B, 28, 28, 3))).shape == (B, 5)


# --------------------------------------------------------------------------- the mixer choice


def test_mixer_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown mixer kind 'hgrn3'"):
        MixerConfig(kind="hgrn3")
    with pytest.raises(ValueError, match="scan='2d' needs layout='official'"):
        MixerConfig(kind="hgrn2", layout="fla", scan="2d")
    with pytest.raises(ValueError, match="scan='2d' needs grid_shape.*takes mixer.scan='1d'"):
        ClassifierConfig(vocab_size=5, mixer={"kind": "hgrn2", "scan": "2d"})
    with pytest.raises(ValueError, match="expand_ratio is an HGRN2 / fla option"):
        MixerConfig(expand_ratio=4)
    # In the config, not when the model is built (an LMConfig took it).
    with pytest.raises(ValueError, match="MixerConfig: unknown method 'associative'; choose one"):
        LMConfig(vocab_size=5, mixer={"kind": "hgrn2", "method": "associative"})
    with pytest.raises(ValueError, match="features 16 must be a multiple of expand_ratio 5"):
        HGRN2(16, expand_ratio=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expand_ratio=128 \(the key width of a head\)"):
        FlaHGRN2Attention(32, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"^HGRN2D\(\) got .* 'expand_rato'; did you mean 'exp"):
        HGRN2D(16, expand_rato=2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"^HGRN2D\(\) sets bidirectional itself"):
        HGRN2D(16, bidirectional=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ClassifierConfig.mixer.expand is not a MixerConfig"):
        ClassifierConfig(vocab_size=5, mixer={"kind": "hgrn2", "expand": 4})
    with pytest.raises(ValueError, match="causal only"):
        HGRNClassifier(
            ClassifierConfig(
                vocab_size=5, features=8, num_layers=1, mixer=MixerConfig(layout="fla")
            ),
            rngs=nnx.Rngs(0),
        )


@pytest.mark.parametrize(
    "make, where",
    [
        (lambda m: LMConfig(vocab_size=5, features=16, num_layers=1, mixer=m), "LMConfig"),
        (lambda m: ClassifierConfig(vocab_size=5, features=16, mixer=m), "ClassifierConfig"),
        (lambda m: ImageConfig(features=16, mixer=m), "ImageConfig"),
    ],
)
def test_hgrn2_head_width_that_does_not_split_the_width_fails_in_the_config(make, where):
    fix = r"set mixer.expand_ratio to a divisor of 16, e.g. 2, 4, 8, 16"
    with pytest.raises(ValueError, match=rf"{where}: mixer.expand_ratio=5 .*{fix}"):
        make(MixerConfig(kind="hgrn2", expand_ratio=5))
    with pytest.raises(ValueError, match=rf"{where}: mixer.expand_ratio=128 .*{fix}"):
        make(MixerConfig(kind="hgrn2", layout="fla"))  # fla's default head width


@pytest.mark.parametrize(
    "option", ["complex_valued", "separate_phases", "use_forget_gate", "norm_before_gate"]
)
@pytest.mark.parametrize("kind", ["hgrn2", "attention"])
def test_hgrn_only_options_are_refused_by_other_kinds(option, kind):
    with pytest.raises(ValueError, match=rf"mixer.{option}=False is an HGRN option.*leave"):
        MixerConfig(kind=kind, **{option: False})
    with pytest.raises(ValueError, match=rf"ClassifierConfig.*mixer.{option}=False is an HGRN"):
        ClassifierConfig(vocab_size=5, mixer={"kind": kind, option: False})
    MixerConfig(kind=kind, **{option: MixerConfig.__dataclass_fields__[option].default})


def test_heads_are_set_by_expand_ratio_except_for_attention():
    with pytest.raises(ValueError, match="mixer.num_heads=4 is for kind='attention'.*expand_ratio"):
        MixerConfig(kind="hgrn2", expand_ratio=8, num_heads=4)
    with pytest.raises(ValueError, match="mixer.num_heads=2 is for kind='attention'"):
        LMConfig(mixer=MixerConfig(kind="hgrn2", layout="fla", num_heads=2))
    with pytest.raises(ValueError, match="mixer.expand_ratio=8 is an HGRN2 / fla option"):
        MixerConfig(kind="attention", expand_ratio=8)


def test_old_field_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"mixer=MixerConfig\(scan='2d'\)"):
        old = ClassifierConfig(encoder="linear", input_channels=1, mixer="2d", grid_shape=(4, 4))
    assert old.mixer == MixerConfig(scan="2d")
    # One warning per old field (pytest.warns re-emits those its match does not take).
    with (
        pytest.warns(DeprecationWarning, match=r"MixerConfig\(use_bias=...\)"),
        pytest.warns(DeprecationWarning, match=r"MixerConfig\(complex_valued=...\)"),
    ):
        old = ClassifierConfig(vocab_size=5, complex_valued=False, mixer_bias=False)
    assert (old.mixer.complex_valued, old.mixer.use_bias, old.complex_valued) == (
        False,
        False,
        None,
    )
    with pytest.warns(DeprecationWarning, match="use input_channels"):
        image = ImageConfig(in_channels=1)
    assert image.input_channels == 1 and image.in_channels is None
    with (
        pytest.warns(DeprecationWarning, match=r"MixerConfig\(norm_epsilon=...\)"),
        pytest.warns(DeprecationWarning, match=r"mixer=MixerConfig\(layout='fla'\)"),
        pytest.warns(DeprecationWarning, match="use glu_expand"),
    ):
        lm = LMConfig(features=8, glu_hidden=24, mixer="fla", mixer_norm_epsilon=1e-6)
    assert lm.glu_expand == 3 and lm.mixer.layout == "fla" and lm.mixer.norm_epsilon == 1e-6
    # dataclasses.replace keeps the folded mixer.
    assert dataclasses.replace(lm, features=16).mixer == lm.mixer


def test_remat_does_not_import_the_blocks():
    tree = ast.parse(inspect.getsource(remat_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not any(name and name.startswith("hgrn_jax.nn.blocks") for name in imported)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrong_shapes_name_the_argument(layout):
    """A wrong width, an empty sequence, a mask or a lower bound of the wrong shape are one-line
    ValueErrors naming the argument (they were dot_general / ZeroDivisionError / broadcasting
    errors)."""
    layer = LAYOUTS[layout]()
    name = type(layer).__name__
    with pytest.raises(
        ValueError,
        match=rf"{name} expects \(batch, length, d\); got shape \(2, 5, 7\) \(this layer has d = 16",
    ):
        layer(jnp.ones((2, 5, 7)))
    with pytest.raises(ValueError, match=rf"{name} expects .* got shape \(2, 0, 16\)"):
        layer(jnp.ones((2, 0, D)))
    with pytest.raises(
        ValueError,
        match=rf"{name}: mask must be x's shape without the channels, \(2, 5\); got mask of shape \(2, 4\)",
    ):
        layer(jnp.ones((2, 5, D)), BOUND, mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"lower_bound of shape \(5,\) does not broadcast"):
        layer(jnp.ones((2, 5, D)), jnp.full((5,), 0.5))
    state = layer.init_state(2)
    with pytest.raises(ValueError, match=rf"{name} expects .* got shape \(2, 3, 7\)"):
        layer.step(jnp.ones((2, 3, 7)), state, BOUND)
    with pytest.raises(ValueError, match=r"or longer along time.*got mask of shape \(2, 2\)"):
        layer.step(jnp.ones((2, 3, D)), state, BOUND, mask=jnp.ones((2, 2)))
    mix_step(layer, jnp.ones((2, 3, D)), state, jnp.ones((2, 7)))  # longer: accepted


def test_fla_hgrn2_heads_come_from_one_of_expand_ratio_and_num_heads():
    """num_heads=4 beside the default expand_ratio=128 built 2 heads of 128 at d=256 without a
    word (fla's rule: a given expand_ratio wins); num_heads with expand_ratio=None named an
    expand_ratio the user never passed (user review)."""
    from hgrn_jax.nn import FlaHGRN2Attention

    def heads(**kwargs):
        layer = FlaHGRN2Attention(256, **kwargs, rngs=nnx.Rngs(0))
        return layer.num_heads, layer.key_dim

    assert heads() == (2, 128)
    with pytest.raises(ValueError, match=r"^FlaHGRN2Attention: unknown method 'associative'"):
        heads(method="associative")  # HGRN2's matrix recurrence has no associative scan
    assert heads(num_heads=4, expand_ratio=None) == (4, 64)
    assert heads(num_heads=4, expand_ratio=64) == (4, 64)
    with pytest.raises(
        ValueError,
        match=r"^FlaHGRN2Attention: num_heads=4 disagrees with expand_ratio=128 \(the default is "
        r"128\), which gives features // expand_ratio = 2 heads; pass expand_ratio=None",
    ):
        heads(num_heads=4)
    with pytest.raises(
        ValueError, match=r"^FlaHGRN2Attention: num_heads=3 does not split features=256"
    ):
        heads(num_heads=3, expand_ratio=None)


def test_fla_lm_config_takes_the_mixer_s_expand_ratio():
    """LMConfig.fla(kind='hgrn2') had no way to set the head width but rebuilding its mixer:
    expand_ratio=... was an unexpected keyword, and fla's 128 does not split a small width."""
    from hgrn_jax.nn import HGRNLM, LMConfig

    config = LMConfig.fla(kind="hgrn2", expand_ratio=4, vocab_size=50, features=16, num_layers=1)
    assert config.mixer == MixerConfig(
        kind="hgrn2", layout="fla", use_bias=False, norm_epsilon=1e-5, expand_ratio=4
    )
    lm = HGRNLM(config, rngs=nnx.Rngs(0))
    assert lm(jnp.ones((2, 5), jnp.int32)).shape == (2, 5, 50)
    assert LMConfig.fla(kind="hgrn2", features=256).mixer.expand_ratio is None  # fla's 128


def test_hgrn2_with_an_empty_sequence_or_a_bad_grid_mask():
    with pytest.raises(ValueError, match=r"HGRN2 expects .* got shape \(2, 0, 8\)"):
        HGRN2(8, expand_ratio=4, rngs=nnx.Rngs(0))(jnp.ones((2, 0, 8)))
    grid = HGRN2D(8, expand_ratio=4, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"HGRN2D expects \(batch, H, W, d\); got shape \(2, 12, 8\)"
    ):
        grid(jnp.ones((2, 12, 8)))
    with pytest.raises(
        ValueError, match=r"HGRN2D: mask must be .* \(2, 3, 4\); got mask of shape \(2, 12\)"
    ):
        grid(jnp.ones((2, 3, 4, 8)), mask=jnp.ones((2, 12)))


@pytest.mark.parametrize(
    "bound",
    [0.0, np.linspace(0.0, 1.0, 8, dtype=np.float32)],
    ids=["zero", "per-channel-0-to-1"],
)
def test_hgrn2_log_decay_is_the_float64_formula_down_to_underflowing_gates(bound):
    """log lam = log(gamma + (1 - gamma) sigmoid(f)) and k = 1 - lam for forget logits f from
    -200 (sigmoid(f) is 0 in float32) to 30, against the formula in float64. lam in float32 is
    off by a few ulps (relative ~2e-7), so log lam is off by ~2e-7 absolute, and log_sigmoid's
    -200 by its own rounding (6e-8 relative): atol = rtol = 1e-6."""
    layer = HGRN2(8, expand_ratio=4, rngs=nnx.Rngs(0))
    logits = np.asarray([-200.0, -100.0, -88.0, -80.0, -30.0, -5.0, 0.0, 30.0], np.float32)
    kernel, bias = layer.in_proj.kernel, layer.in_proj.bias
    kernel[...] = kernel[...].at[:, 16:].set(0.0)
    bias[...] = bias[...].at[16:].set(logits)
    _, k, _, log_decay = layer.gates(jnp.ones((1, 1, 8)), bound)

    f = logits.astype(np.float64)
    gamma = np.asarray(bound, np.float64)
    lam = gamma + (1.0 - gamma) * np.exp(-np.logaddexp(0.0, -f))
    np.testing.assert_allclose(np.asarray(log_decay).reshape(8), np.log(lam), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(k).reshape(8), 1.0 - lam, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bound", ["zero", "schedule", "alternating-0-and-1"])
@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_hgrn2_with_underflowing_forget_gates_has_finite_outputs_and_gradients(method, bound):
    """Inputs scaled by 60 drive forget logits of channels 2 and 3 below -89, where float32's
    sigmoid is 0: outputs and the gradients to the inputs, the parameters and a traced bound
    stay finite. "schedule" is the bound of a model's first layer (lower_bounds' row 0, exactly
    0 and traced back to the bounds' parameter); "alternating-0-and-1" a traced bound of 0 on the
    even channels and 1 on the odd ones."""
    layer = HGRN2(8, expand_ratio=4, method=method, rngs=nnx.Rngs(0))
    x = 60.0 * jax.random.normal(jax.random.key(1), (2, 7, 8))
    forget_logits = jnp.split(layer.in_proj(x), 3, axis=-1)[2]
    assert bool(jnp.any(jax.nn.sigmoid(forget_logits) == 0.0))
    param = jnp.ones((2, 8))
    bounds = {
        "zero": lambda p: 0.0,
        "schedule": lambda p: lower_bounds(p)[0],
        "alternating-0-and-1": lambda p: (jnp.arange(8) % 2) * p[1],
    }[bound]

    def loss(layer, x, param):
        return jnp.sum(layer(x, bounds(param)) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))(layer, x, param)
    assert bool(jnp.isfinite(value))
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf))), leaf


def test_fla_log_bound_has_the_float64_formula_s_gradients_at_gamma_0_and_1():
    """fla's log-space bound ``logaddexp(log gamma, log1p(-gamma) + log f)`` (FlaHGRN2Attention,
    FlaHGRNAttention) gave nan gradients at gamma = 0 and 1, both legal bounds (-inf times a
    zero weight); the formula ``log(gamma + (1 - gamma) f)`` has finite ones there. Values and
    gradients against it in float64 at gamma 0, 0.3 and 1 (rtol 1e-12: the forms differ in a
    few roundings); the values at the edges are fla's exactly (log f and 0)."""
    from hgrn_jax.nn.lower_bounds import apply_log_lower_bound

    with jax.enable_x64(True):
        gamma = jnp.asarray([0.0, 0.3, 1.0, 0.0, 0.3, 1.0])
        log_forget = jnp.asarray([-0.1, -0.1, -0.1, -3.0, -3.0, -3.0])

        def formula(g, lf):
            return jnp.log(g + (1.0 - g) * jnp.exp(lf))

        for argnum in (0, 1):
            ours = jax.grad(lambda *a: jnp.sum(apply_log_lower_bound(a[1], a[0])), argnum)
            want = jax.grad(lambda *a: jnp.sum(formula(*a)), argnum)(gamma, log_forget)
            got = ours(gamma, log_forget)
            assert bool(jnp.all(jnp.isfinite(got))), (argnum, got)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        value = apply_log_lower_bound(log_forget, gamma)
        np.testing.assert_allclose(value, formula(gamma, log_forget), rtol=1e-12)
        np.testing.assert_array_equal(value[::3], log_forget[::3])
        np.testing.assert_array_equal(value[2::3], 0.0)
    # float32, a log forget gate far below the exp range: the value stays log f at gamma 0.
    far = apply_log_lower_bound(jnp.asarray([-200.0]), 0.0)
    np.testing.assert_array_equal(far, [-200.0])

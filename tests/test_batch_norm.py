"""BatchNorm's closed-form training gradient (hgrn_jax.ops.batch_norm, hgrn_jax.nn.BatchNorm)
and its running variance (PyTorch's unbiased one).

The forward must be nnx.BatchNorm's bit for bit (outputs and running mean; the running variance
too with ``unbiased_running_variance=False``); the running variance otherwise follows PyTorch's
update, computed in float64 (the tests at the end). The gradient
is compared with the float64 gradient of nnx.BatchNorm by autodiff. Float32 gets a relative
error budget of 2e-6: about 16 float32 epsilons (1.2e-7), for sums over a few hundred positions
that cancel; float32 autodiff lands at the same order (its error is printed in the assertion).
bfloat16 gets 2e-2, a few of its epsilons (7.8e-3): its inputs and gradients are rounded to 8 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import norms
from hgrn_jax.nn.norms import BatchNorm, make_norm
from hgrn_jax.ops.batch_norm import batch_norm_train

FEATURES = 16
SHAPE = (4, 37, FEATURES)


def _pair(dtype=None, cls=BatchNorm, groups=None, unbiased=None, **kwargs):
    """A BatchNorm of ``cls`` (with ``groups`` and ``unbiased_running_variance=unbiased`` when
    given) and an nnx.BatchNorm, both with the same non-trivial parameters."""
    kwargs = dict(momentum=0.9, use_fast_variance=False) | kwargs
    layers = []
    for layer_cls in (cls, nnx.BatchNorm):
        own = {}
        if layer_cls is not nnx.BatchNorm:
            own |= {} if groups is None else dict(groups=groups)
            own |= {} if unbiased is None else dict(unbiased_running_variance=unbiased)
        layer = layer_cls(FEATURES, dtype=dtype, rngs=nnx.Rngs(0), **own, **kwargs)
        param_dtype = layer.param_dtype
        layer.scale[...] = jnp.linspace(0.5, 2.0, FEATURES, dtype=param_dtype)
        layer.bias[...] = jnp.linspace(-1.0, 1.0, FEATURES, dtype=param_dtype)
        # The running statistics in the parameters' dtype too (float64 for the reference).
        layer.mean = nnx.BatchStat(jnp.full((FEATURES,), 0.25, param_dtype))
        layer.var = nnx.BatchStat(jnp.full((FEATURES,), 1.5, param_dtype))
        layers.append(layer)
    return layers


def _inputs(dtype=jnp.float32, masked=False):
    x = (jax.random.normal(jax.random.key(0), SHAPE) * 3.0 + 1.0).astype(dtype)
    mask = None
    if masked:
        rows = jax.random.bernoulli(jax.random.key(1), 0.7, SHAPE[:-1])
        mask = jnp.broadcast_to(rows[..., None], SHAPE)
    weights = jax.random.normal(jax.random.key(2), SHAPE)
    return x, mask, weights


def _loss(layer, x, mask, weights):
    return jnp.sum(jnp.sin(layer(x, mask=mask).astype(jnp.float32)) * weights)


def _gradients(layer, x, mask, weights):
    """d loss / d (x, scale, bias)."""
    grads_layer, grad_x = nnx.grad(_loss, argnums=(0, 1))(layer, x, mask, weights)
    return grad_x, grads_layer.scale[...], grads_layer.bias[...]


def _relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(value - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_forward_and_running_statistics_are_flax_s_bit_for_bit(masked, dtype):
    """Outputs and the running mean always; the running variance with
    ``unbiased_running_variance=False`` (Flax's biased one)."""
    ours, flax_layer = _pair(dtype, unbiased=False)
    x, mask, _ = _inputs(dtype or jnp.float32, masked)
    y, expected = ours(x, mask=mask), flax_layer(x, mask=mask)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
    np.testing.assert_array_equal(ours.mean[...], flax_layer.mean[...])
    np.testing.assert_array_equal(ours.var[...], flax_layer.var[...])
    # The default (PyTorch's running variance) changes neither the outputs nor the mean.
    unbiased, _ = _pair(dtype)
    np.testing.assert_array_equal(
        np.asarray(unbiased(x, mask=mask), np.float32), np.asarray(expected, np.float32)
    )
    np.testing.assert_array_equal(unbiased.mean[...], flax_layer.mean[...])
    # Evaluation uses the running statistics, through nnx.BatchNorm's own code.
    ours.eval()
    flax_layer.eval()
    np.testing.assert_array_equal(
        np.asarray(ours(x), np.float32), np.asarray(flax_layer(x), np.float32)
    )


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_gradients_match_float64_autodiff(masked):
    x, mask, weights = _inputs(masked=masked)
    ours, flax32 = _pair()
    got = _gradients(ours, x, mask, weights)
    autodiff32 = _gradients(flax32, x, mask, weights)
    with jax.enable_x64(True):
        _, flax64 = _pair(param_dtype=jnp.float64)
        reference = _gradients(flax64, x.astype(jnp.float64), mask, weights.astype(jnp.float64))
    for name, value, baseline, ref in zip(
        ("x", "scale", "bias"), got, autodiff32, reference, strict=True
    ):
        assert value.dtype == jnp.float32
        error, autodiff_error = _relative_error(value, ref), _relative_error(baseline, ref)
        assert error < 2e-6, f"d{name}: {error:.2e} (float32 autodiff: {autodiff_error:.2e})"


def test_padding_positions_do_not_move_the_statistics_and_get_the_direct_gradient():
    """With a mask, the statistics are those of the real positions alone; a padded position's
    gradient is ``scale * inv * dy``: it reaches the loss only through its own output."""
    x, mask, weights = _inputs(masked=True)
    ours, _ = _pair()
    ours(x, mask=mask)
    real = np.asarray(x)[np.asarray(mask)].reshape(-1, FEATURES)
    mean = np.asarray(ours.mean[...] - 0.9 * 0.25) / 0.1
    np.testing.assert_allclose(mean, real.mean(0), rtol=1e-5, atol=1e-6)
    dx = np.asarray(_gradients(ours, x, mask, weights)[0])
    var = real.var(0)
    y = np.asarray(ours(x, mask=mask))
    direct = np.cos(y) * np.asarray(weights) * np.linspace(0.5, 2.0, FEATURES) / np.sqrt(var + 1e-5)
    padded = ~np.asarray(mask)
    np.testing.assert_allclose(dx[padded], direct[padded], rtol=1e-4, atol=1e-6)


def test_bfloat16_gradients_are_within_its_rounding():
    x, mask, weights = _inputs(jnp.bfloat16)
    ours, _ = _pair(jnp.bfloat16)
    got = _gradients(ours, x, mask, weights)
    with jax.enable_x64(True):
        _, flax64 = _pair(param_dtype=jnp.float64)
        reference = _gradients(flax64, x.astype(jnp.float64), mask, weights.astype(jnp.float64))
    assert got[0].dtype == jnp.bfloat16
    for name, value, ref in zip(("x", "scale", "bias"), got, reference, strict=True):
        assert _relative_error(value, ref) < 2e-2, name


def test_the_statistics_cotangents_reach_x():
    """``batch_norm_train`` returns the statistics; a loss of them differentiates through them
    as autodiff of the plain formulas does (in float64)."""
    with jax.enable_x64(True):
        x, mask, weights = _inputs(jnp.float64, masked=True)
        scale = jnp.linspace(0.5, 2.0, FEATURES)
        bias = jnp.linspace(-1.0, 1.0, FEATURES)

        def plain(x, scale, bias):
            axes = (0, 1)
            mean = x.mean(axes, where=mask)
            var = jnp.square(x - mean).mean(axes, where=mask)
            return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

        def closed_form(x, scale, bias):
            return batch_norm_train(x, scale, bias, epsilon=1e-5, mask=mask)

        def loss(fn, *args):
            y, mean, var = fn(*args)
            return jnp.sum(jnp.sin(y) * weights) + jnp.sum(mean**2) + jnp.sum(jnp.cos(var))

        got = jax.grad(lambda *a: loss(closed_form, *a), argnums=(0, 1, 2))(x, scale, bias)
        want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, scale, bias)
        for value, reference in zip(got, want, strict=True):
            assert _relative_error(value, reference) < 1e-12


def test_the_gradient_under_remat_and_jit_is_the_same():
    x, _, weights = _inputs()
    ours, _ = _pair()
    graphdef, state = nnx.split(ours)

    def loss(state, x):
        layer = nnx.merge(graphdef, jax.tree.map(lambda v: v, state))  # Variables of this trace
        return jnp.sum(jnp.sin(layer(x)) * weights)

    plain = jax.jit(jax.grad(loss, argnums=1))(state, x)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=1))(state, x)
    np.testing.assert_allclose(remat, plain, rtol=1e-6, atol=1e-7)


def test_the_switch_and_the_other_uses_fall_back_to_nnx_s_gradient():
    """``CLOSED_FORM_BATCH_NORM_GRADIENT = False`` and a named replica axis (synchronised
    BatchNorm) take nnx.BatchNorm's own code: gradients equal to its autodiff bit for bit."""
    x, _, weights = _inputs()
    ours, flax_layer = _pair()
    expected = _gradients(flax_layer, x, None, weights)
    closed = _gradients(ours, x, None, weights)
    assert not np.array_equal(closed[0], expected[0])  # the closed form does round differently
    saved = norms.CLOSED_FORM_BATCH_NORM_GRADIENT
    try:
        norms.CLOSED_FORM_BATCH_NORM_GRADIENT = False
        for got, want in zip(_gradients(ours, x, None, weights), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        norms.CLOSED_FORM_BATCH_NORM_GRADIENT = saved
    synced = make_norm("sync_batch", FEATURES, axis_name="replicas", rngs=nnx.Rngs(0))
    assert isinstance(synced, BatchNorm) and not synced._closed_form_applies(x)
    assert make_norm("batch", FEATURES, rngs=nnx.Rngs(0))._closed_form_applies(x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=jnp.ones(3)), r"scale and bias must be \(16,\)"),
        (dict(mask=jnp.ones((4, 37), bool)), r"mask must have x's shape \(4, 37, 16\)"),
        (dict(x=jnp.ones(SHAPE, jnp.complex64)), "real inputs"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = dict(x=jnp.ones(SHAPE), scale=jnp.ones(FEATURES), bias=jnp.zeros(FEATURES))
    args |= {k: v for k, v in kwargs.items() if k != "mask"}
    with pytest.raises(ValueError, match=message):
        batch_norm_train(
            args["x"], args["scale"], args["bias"], epsilon=1e-5, mask=kwargs.get("mask")
        )


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_groups_normalise_each_slice_of_the_batch_as_one_device_would(masked):
    """``groups=2`` is two devices' unsynchronised BatchNorms (HGRN2's Pathfinder ran 8): each
    half of the batch gets the outputs and gradients of a BatchNorm over that half alone, bit
    for bit, and the running statistics are the first half's (DDP broadcasts rank 0's)."""
    x, mask, weights = _inputs(masked=masked)
    grouped, _ = _pair(groups=2)
    halves = [_pair()[0] for _ in range(2)]
    y = grouped(x, mask=mask)
    for k, layer in enumerate(halves):
        rows = slice(2 * k, 2 * k + 2)
        half_mask = None if mask is None else mask[rows]
        np.testing.assert_array_equal(y[rows], layer(x[rows], mask=half_mask))
    np.testing.assert_array_equal(grouped.mean[...], halves[0].mean[...])
    np.testing.assert_array_equal(grouped.var[...], halves[0].var[...])
    assert not np.allclose(halves[0].mean[...], halves[1].mean[...])

    grouped, _ = _pair(groups=2)
    grad_x, grad_scale, grad_bias = _gradients(grouped, x, mask, weights)
    for k in range(2):
        rows = slice(2 * k, 2 * k + 2)
        half_mask = None if mask is None else mask[rows]
        want = _gradients(_pair()[0], x[rows], half_mask, weights[rows])
        np.testing.assert_array_equal(grad_x[rows], want[0])
        if k == 0:
            scale_sum, bias_sum = want[1], want[2]
        else:
            scale_sum, bias_sum = scale_sum + want[1], bias_sum + want[2]
    np.testing.assert_allclose(grad_scale, scale_sum, rtol=1e-6)
    np.testing.assert_allclose(grad_bias, bias_sum, rtol=1e-6)
    # Evaluation: the running statistics, as without groups.
    grouped, plain = _pair(groups=2)[0], _pair()[0]
    grouped.eval()
    plain.eval()
    np.testing.assert_array_equal(grouped(x), plain(x))


def test_groups_are_checked():
    with pytest.raises(ValueError, match=r"BatchNorm\(groups=3\) normalises 3 equal slices of "):
        _pair(groups=3)[0](_inputs()[0])  # 4 rows
    with pytest.raises(ValueError, match=r"groups must be an integer >= 1"):
        _pair(groups=0)
    with pytest.raises(ValueError, match=r"unbiased_running_variance='no'\): give True"):
        BatchNorm(FEATURES, unbiased_running_variance="no", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"a synchronised one \(axis_name='data'\)"):
        BatchNorm(FEATURES, groups=2, axis_name="data", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"batch_norm_groups=2 is for norm='batch'"):
        make_norm("sync_batch", FEATURES, batch_norm_groups=2, rngs=nnx.Rngs(0))
    from hgrn_jax.nn import ClassifierConfig

    with pytest.raises(ValueError, match=r"ClassifierConfig\(batch_norm_groups=2\) is for"):
        ClassifierConfig(vocab_size=8, norm="layer", batch_norm_groups=2)
    # A run's batch that the groups do not divide stops before the workdir is touched.
    from experiments.configs.hgrn2 import pathfinder
    from hgrn_jax.training.config_checks import check_config_values

    config = pathfinder.get_config("tiny")  # batch 32
    config.model.batch_norm_groups = 3
    with pytest.raises(
        ValueError,
        match=r"^config\.model\.batch_norm_groups=3 does not divide config\.batch_size=32 into ",
    ):
        check_config_values(config)
    config.model.batch_norm_groups, config.optimizer.accumulate_steps = 32, 2
    with pytest.raises(ValueError, match=r"batch_size=32 \(micro-batches of 16\)"):
        check_config_values(config)


# The running variance is PyTorch's: running_var <- (1 - m) running_var + m * unbiased variance
# (m = PyTorch's momentum, Flax's 1 - momentum; n / (n - 1) over the n positions counted).
# Compared with that formula in float64 to rtol 2e-6, this file's float32 budget (16 float32
# epsilons): the float32 batch variance and the update round a few times (measured: at most
# 1.9e-7 over these cases). Flax's biased variance is off by 1 / (n - 1) >= 6.8e-3 of the batch
# term, 3e-3 of the running variance or more here.
RUNNING_VAR_RTOL = 2e-6
STEPS = 3


def _pytorch_running_variance(xs, masks, groups: int = 1, start: float = 1.5) -> list:
    """float64 numpy, one (FEATURES,) running variance after each step: PyTorch's update with
    momentum 0.1 (Flax's 0.9), each feature's unbiased variance over its real positions; with
    ``groups``, over the first of ``groups`` slices of the batch."""
    running, history = np.full(FEATURES, start), []
    for x, mask in zip(xs, masks, strict=True):
        x = np.asarray(x, np.float64)
        mask = np.ones(x.shape, bool) if mask is None else np.asarray(mask)
        x, mask = x[: len(x) // groups], mask[: len(x) // groups]
        for c in range(FEATURES):
            values = x[..., c][mask[..., c]]
            running[c] = 0.9 * running[c] + 0.1 * (
                values.var(ddof=1) if values.size > 1 else np.nan
            )
        history.append(running.copy())
    return history


def _steps_inputs(mask_kind: str) -> tuple[list, list]:
    """``STEPS`` batches of SHAPE and their masks: none, whole positions, or per feature."""
    xs, masks = [], []
    for step in range(STEPS):
        key = jax.random.key(100 + step)
        xs.append(jax.random.normal(key, SHAPE) * (3.0 + step) + 1.0)
        if mask_kind == "none":
            masks.append(None)
        elif mask_kind == "rows":
            rows = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7, SHAPE[:-1])
            masks.append(jnp.broadcast_to(rows[..., None], SHAPE))
        else:
            masks.append(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.6, SHAPE))
    return xs, masks


@pytest.mark.parametrize(
    "mask_kind, kwargs, switch",
    [
        ("none", {}, True),
        ("rows", {}, True),
        ("ragged", {}, True),
        ("ragged", dict(groups=2), True),
        ("rows", dict(groups=4), True),
        ("ragged", dict(use_fast_variance=True), True),
        ("ragged", {}, False),
    ],
    ids=[
        "unmasked",
        "rows-masked",
        "ragged-per-feature",
        "groups2-ragged",
        "groups4-rows",
        "fast-variance-fallback",
        "switch-off-fallback",
    ],
)
def test_running_variance_is_pytorch_s_unbiased_one(mask_kind, kwargs, switch, monkeypatch):
    """After one and after several training steps the running variance is PyTorch's
    (n / (n - 1), n counted from the mask per feature, the first slice's with groups) on the
    closed-form path and on nnx's code (fast variance, the switch off); where nnx's code runs,
    the outputs and the running mean are still nnx.BatchNorm's bit for bit."""
    monkeypatch.setattr(norms, "CLOSED_FORM_BATCH_NORM_GRADIENT", switch)
    groups = kwargs.pop("groups", None)
    ours, flax_layer = _pair(groups=groups, **kwargs)
    assert ours._closed_form_applies(jnp.ones(SHAPE)) == (switch and not kwargs)
    xs, masks = _steps_inputs(mask_kind)
    expected = _pytorch_running_variance(xs, masks, groups or 1)
    for step, (x, mask) in enumerate(zip(xs, masks, strict=True)):
        y = ours(x, mask=mask)
        np.testing.assert_allclose(
            ours.var[...], expected[step], rtol=RUNNING_VAR_RTOL, err_msg=f"step {step}"
        )
        if groups is None:
            np.testing.assert_array_equal(y, flax_layer(x, mask=mask))
            np.testing.assert_array_equal(ours.mean[...], flax_layer.mean[...])
    biased = _pair(groups=groups, unbiased=False, **kwargs)[0]
    for x, mask in zip(xs, masks, strict=True):
        biased(x, mask=mask)
    assert not np.allclose(biased.var[...], expected[-1], rtol=1e-3)  # Flax's convention


def test_synchronised_running_variance_counts_every_replica_s_positions():
    """``axis_name`` (sync_batch inside shard_map/pmap, here a named vmap of 2 replicas of 2
    rows): nnx's synchronised statistics and outputs, and PyTorch's SyncBatchNorm running
    variance, n the positions of all replicas (148, not each replica's 74)."""
    x = _steps_inputs("none")[0][0]
    replicas = x.reshape(2, SHAPE[0] // 2, *SHAPE[1:])

    def synchronised(layer):
        graphdef, state = nnx.split(layer)

        def step(state, x):
            layer = nnx.merge(graphdef, state)
            return layer(x), nnx.state(layer, nnx.BatchStat)

        return jax.vmap(step, in_axes=(None, 0), axis_name="replicas")(state, replicas)

    ours, flax_layer = _pair(axis_name="replicas")
    (y, stats), (want_y, want_stats) = synchronised(ours), synchronised(flax_layer)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(stats["mean"][...], want_stats["mean"][...])
    for replica in range(2):
        np.testing.assert_allclose(
            stats["var"][...][replica],
            _pytorch_running_variance([x], [None])[0],
            rtol=RUNNING_VAR_RTOL,
        )


def test_one_counted_position_keeps_the_biased_variance():
    """PyTorch refuses one value per channel in training; a mask's count is known only inside
    the trace, so a feature with one real position (or a batch of one position) keeps the
    biased variance, 0, rather than 0 / 0."""
    x, _, _ = _inputs()
    mask = np.ones(SHAPE, bool)
    mask[..., 0] = False
    mask[1, 5, 0] = True  # feature 0: one real position
    ours, _ = _pair()
    ours(x, mask=jnp.asarray(mask))
    assert float(ours.var[0]) == pytest.approx(0.9 * 1.5, rel=1e-7)
    np.testing.assert_allclose(
        ours.var[1:], _pytorch_running_variance([x], [mask])[0][1:], rtol=RUNNING_VAR_RTOL
    )
    single, _ = _pair()
    single(x[:1, :1])
    np.testing.assert_allclose(single.var[...], np.full(FEATURES, 0.9 * 1.5), rtol=1e-7)

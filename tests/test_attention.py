"""The attention mixer (the Transformer baseline): a float64 reference, padding, causality and
its place in the classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import (
    HGRNLM,
    ClassifierConfig,
    HGRNClassifier,
    LMConfig,
    MixerConfig,
    SoftmaxAttention,
)


def _reference(layer: SoftmaxAttention, x: np.ndarray, causal: bool) -> np.ndarray:
    """Multi-head attention in float64 NumPy from the layer's weights."""
    w, b = (np.asarray(p[...], np.float64) for p in (layer.qkv_proj.kernel, layer.qkv_proj.bias))
    wo, bo = (np.asarray(p[...], np.float64) for p in (layer.out_proj.kernel, layer.out_proj.bias))
    batch, length, d = x.shape
    heads, size = layer.num_heads, d // layer.num_heads
    qkv = (x.astype(np.float64) @ w + b).reshape(batch, length, 3, heads, size)
    q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # (B, heads, L, size)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(size)
    if causal:
        scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.moveaxis(weights @ v, 1, 2).reshape(batch, length, d)
    return y @ wo + bo


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_a_float64_reference(causal):
    layer = SoftmaxAttention(32, num_heads=4, causal=causal, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 9, 32)))
    got = np.asarray(layer(jnp.asarray(x)), np.float64)
    want = _reference(layer, x, causal)
    # float32 matmuls and softmax over 9 keys: a few float32 ulps of outputs of size ~1.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@nnx.jit
def _apply(module: nnx.Module, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``module(x)`` (with ``mask=mask`` when given) compiled whole, not run op by op."""
    return module(x) if mask is None else module(x, mask=mask)


def test_padding_is_never_attended_and_causal_outputs_ignore_the_future():
    layer = SoftmaxAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 7, 16))
    padded = jnp.concatenate([x, 100.0 * jnp.ones((1, 3, 16))], axis=1)
    mask = jnp.arange(10)[None] < 7
    np.testing.assert_allclose(
        _apply(layer, padded, mask)[:, :7], _apply(layer, x), rtol=1e-5, atol=1e-6
    )
    causal = SoftmaxAttention(16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
    changed = x.at[:, 5:].set(-3.0)
    np.testing.assert_allclose(
        _apply(causal, changed)[:, :5], _apply(causal, x)[:, :5], rtol=1e-6, atol=1e-6
    )


def test_the_classifier_takes_attention_as_its_mixer_and_errors_are_clear():
    config = ClassifierConfig(
        num_classes=3,
        features=32,
        num_layers=2,
        vocab_size=11,
        mixer=MixerConfig(kind="attention", num_heads=2),
        position_encoding=True,
        use_lower_bound=False,
    )
    model = HGRNClassifier(config, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].mixer, SoftmaxAttention)
    ids = jax.random.randint(jax.random.key(3), (2, 12), 0, 11)

    def loss(m: HGRNClassifier, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = m(ids)  # (2, 3)
        return jnp.sum(logits**2), logits

    # Logits and gradients in one compiled call (eagerly, op by op, they took ~7 CPU-s).
    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, ids)
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(jnp.abs(grads.blocks[0].mixer.qkv_proj.kernel[...]).sum()) > 0
    with pytest.raises(ValueError, match="num_heads=3 for d = 32"):
        SoftmaxAttention(32, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind='attention' is 1-D"):
        MixerConfig(kind="attention", scan="2d")
    with pytest.raises(ValueError, match="generation"):
        model.blocks[0].mixer.init_state(1)


def test_the_lm_with_attention_needs_its_positions_and_cannot_generate():
    """One layer of causal attention without positions sees its past as a set: swapping the
    first two tokens leaves every later logit unchanged (with more layers, the earlier positions'
    own outputs differ). With ``position_encoding`` the order shows."""

    def lm(position_encoding: bool) -> HGRNLM:
        config = LMConfig(
            vocab_size=13,
            features=16,
            num_layers=1,
            mixer=MixerConfig(kind="attention", num_heads=2),
            use_lower_bound=False,
            position_encoding=position_encoding,
        )
        return HGRNLM(config, rngs=nnx.Rngs(0))

    ids = jnp.asarray([[3, 7, 1, 4, 1, 5, 9, 2]])
    swapped = ids.at[:, :2].set(ids[:, 1::-1])
    plain, positioned = lm(False), lm(True)
    later = slice(2, None)
    np.testing.assert_allclose(
        _apply(plain, swapped)[:, later], _apply(plain, ids)[:, later], rtol=1e-5, atol=1e-5
    )
    moved = float(jnp.abs(_apply(positioned, swapped) - _apply(positioned, ids))[:, later].max())
    assert moved > 1e-2, moved
    # Causal still: a changed future leaves the past alone.
    changed = ids.at[:, 5:].set(0)
    np.testing.assert_allclose(
        _apply(positioned, changed)[:, :5], _apply(positioned, ids)[:, :5], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"position_encoding=True\) cannot generate"):
        positioned.step(ids, ())


def test_attention_refuses_lower_bounds_it_has_no_gate_for():
    """A model of attention mixers with use_lower_bound=True made lower-bound parameters that no
    layer read (attention drops its lower_bound argument): silently ignored, now refused."""
    mixer = MixerConfig(kind="attention", num_heads=2)
    for make in (
        lambda bounds: LMConfig(vocab_size=13, features=16, mixer=mixer, use_lower_bound=bounds),
        lambda bounds: ClassifierConfig(
            vocab_size=11, features=32, mixer=mixer, use_lower_bound=bounds
        ),
    ):
        with pytest.raises(
            ValueError, match=r"Config: use_lower_bound=True .* set use_lower_bound=False"
        ):
            make(True)
        make(False)

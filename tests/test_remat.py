"""Rematerialised residual blocks compute the same outputs, gradients and state updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import HGRNLM, LMConfig, MixerConfig
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.remat import set_remat


def grads_and_state(model, loss_fn, *inputs):
    """Gradients and the model's non-parameter state after one jitted training-style call
    (split, fresh Variables inside the trace, merge: the pattern of hgrn_jax.training)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, rest, *inputs):
        def loss(params):
            fresh = jax.tree.map(lambda v: v, (params, rest))
            m = nnx.merge(graphdef, *fresh)
            m.train()
            value = loss_fn(m, *inputs)
            return value, nnx.split(m, nnx.Param, ...)[2]

        return jax.grad(loss, has_aux=True)(params)

    return step(params, rest, *inputs)


def assert_trees_close(got, want):
    """Recomputed blocks are fused differently by XLA: float32 reassociation, a few ulps of the
    O(0.01..1) values; gradients that are mathematically zero (a bias just before BatchNorm)
    are rounding noise of ~1e-6, hence the absolute tolerance."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(g.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lm_gradients_unchanged(policy="nothing"):
    lm = HGRNLM(LMConfig(vocab_size=32, features=8, num_layers=2, glu_expand=2), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 32)

    def loss(m, ids):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])

    want = grads_and_state(lm, loss, ids)
    assert set_remat(lm, policy) == 2
    assert all(block.remat == policy for block in lm.blocks)
    assert_trees_close(grads_and_state(lm, loss, ids), want)


@pytest.mark.slow
def test_classifier_with_batchnorm_mask_and_dropout_unchanged():
    """The LRA classifier's blocks with BatchNorm statistics, a padding mask
    and dropout: same gradients, same updated statistics and RNG counters."""
    config = ClassifierConfig(
        num_classes=3,
        features=8,
        num_layers=2,
        encoder="linear",
        input_channels=1,
        mixer=MixerConfig(scan="1d"),
        norm="batch",
        dropout=0.1,
    )
    model = HGRNClassifier(config, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (3, 16))
    mask = jnp.ones((3, 16), bool).at[0, 11:].set(False)

    def loss(m, x, mask):
        return jnp.sum(m(x, mask) ** 2)

    want = grads_and_state(model, loss, x, mask)
    set_remat(model, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    assert_trees_close(grads_and_state(model, loss, x, mask), want)


def test_turning_off_and_bad_policy():
    config = LMConfig(vocab_size=16, features=4, num_layers=1, glu_expand=2)
    lm = nnx.eval_shape(lambda: HGRNLM(config, rngs=nnx.Rngs(0)))  # policies only: no weights
    set_remat(lm, "nothing")
    set_remat(lm, None)
    assert lm.blocks[0].remat is None
    with pytest.raises(ValueError, match="unknown remat policy 'all'; use one of"):
        set_remat(lm, "all")


def _jitted_grads(model, loss_fn, *inputs):
    """``nnx.grad(loss_fn)(model, *inputs)`` compiled whole with nnx.jit (op by op, the model's
    eager gradient took most of this file's time)."""
    return nnx.jit(nnx.grad(loss_fn))(model, *inputs)


def test_everything_policy_is_no_remat_for_complex_models():
    """remat="everything" on the default complex HGRU mixer: jax.checkpoint under
    everything_saveable raised "reduce_precision does not accept dtype complex64"; the policy
    now runs the block directly, so the gradients equal those without remat (LM and classifier,
    set through the config)."""
    ids = jnp.arange(8, dtype=jnp.int32).reshape(2, 4) % 10

    def lm_loss(m, ids):
        return m(ids).mean()

    def lm_grads(remat):
        lm = HGRNLM(
            LMConfig(vocab_size=10, features=8, num_layers=1, remat=remat), rngs=nnx.Rngs(0)
        )
        return _jitted_grads(lm, lm_loss, ids)

    want = lm_grads(None)
    assert_trees_close(lm_grads("everything"), want)
    lm = HGRNLM(LMConfig(vocab_size=10, features=8, num_layers=1), rngs=nnx.Rngs(0))
    set_remat(lm, jax.checkpoint_policies.everything_saveable)  # the callable, via set_remat
    assert_trees_close(_jitted_grads(lm, lm_loss, ids), want)

    x = jax.random.normal(jax.random.key(3), (2, 6))

    def classifier_grads(remat):
        config = ClassifierConfig(
            num_classes=3, features=8, num_layers=1, encoder="linear", input_channels=1, remat=remat
        )
        model = HGRNClassifier(config, rngs=nnx.Rngs(2))
        model.eval()
        return _jitted_grads(model, lambda m, x: jnp.sum(m(x) ** 2), x)

    assert_trees_close(classifier_grads("everything"), classifier_grads(None))

"""The recurrent state a mixer streams with: ``init_state``'s dtype is the one ``step``
returns for inputs of any dtype (a ``lax.scan`` carry), states of the wrong kind are refused,
and the LM, ``generate`` and the masks accept what the rest of the API accepts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import HGRN2, HGRNLM, HGRU, FlaHGRN2Attention, FlaHGRNAttention, LMConfig
from hgrn_jax.nn.generate import generate

D = 8


def _mixers(dtype=None, param_dtype=jnp.float32) -> dict[str, nnx.Module]:
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    return {
        "HGRU": HGRU(D, **common),
        "FlaHGRNAttention": FlaHGRNAttention(D, **common),
        "HGRN2": HGRN2(D, expand_ratio=2, **common),
        "FlaHGRN2Attention": FlaHGRN2Attention(D, expand_ratio=4, **common),
    }


@pytest.mark.parametrize("name", ["HGRU", "FlaHGRNAttention", "HGRN2", "FlaHGRN2Attention"])
def test_a_float32_layer_streams_float64_inputs_through_a_scan_carry(name):
    """Under x64, float64 activations (plain NumPy data) into a float32 layer: step returned a
    float64 (complex128) state where init_state gives float32 (complex64), and lax.scan
    refused the carry ("carry input and carry output must have equal types"). The state keeps
    init_state's dtype; the outputs still equal the full pass's (to the float32 rounding of
    the state between tokens: 1e-6 relative)."""
    with jax.enable_x64(True):
        layer = _mixers()[name]
        x = jax.random.normal(jax.random.key(1), (3, 6, D), jnp.float64)
        state = layer.init_state(3)
        assert layer.step(x[:, :1], state)[1].dtype == state.dtype == layer.state_dtype

        def body(carry, token):
            y, carry = layer.step(token[:, None], carry)
            return carry, y[:, 0]

        last, ys = jax.lax.scan(body, state, x.swapaxes(0, 1))
        assert last.dtype == state.dtype
        full = layer(x)
        np.testing.assert_allclose(ys.swapaxes(0, 1), full, rtol=1e-5, atol=1e-6)
        # A float64 state (the caller's choice) is carried in float64: the full pass exactly.
        wide = state.astype(jnp.promote_types(state.dtype, jnp.float64))
        y, after = layer.step(x, wide)
        assert after.dtype == wide.dtype
        np.testing.assert_allclose(y, full, rtol=1e-12, atol=1e-12)


def test_a_float64_layer_computes_float32_inputs_in_float64():
    """A float64 layer (dtype and param_dtype float64) fed float32 activations rounded its gate
    projections to float32 before the recurrence (1e-7 off the float64 result); they are
    computed as its projections are, in float64 (1e-15)."""
    with jax.enable_x64(True):
        for name, layer in _mixers(jnp.float64, jnp.float64).items():
            x = jax.random.normal(jax.random.key(2), (2, 5, D), jnp.float32)
            np.testing.assert_allclose(
                layer(x), layer(x.astype(jnp.float64)), rtol=1e-12, atol=1e-13, err_msg=name
            )


def test_a_float32_layer_computes_bfloat16_inputs_in_float32_to_its_end():
    """With ``dtype=None`` a layer computes in its inputs and parameters promoted (Flax's rule),
    but the recurrence's output was cast to the inputs' dtype before the norm: a float32 layer
    fed bfloat16 activations rounded it to bfloat16 there (3e-3 off the same values given in
    float32), a float64 layer (float64 parameters) fed float32 ones to float32 (7e-8). Now
    both equal the wider inputs' run bit for bit."""
    x = jax.random.normal(jax.random.key(3), (2, 5, D), jnp.float32).astype(jnp.bfloat16)
    for name, layer in _mixers().items():
        y = layer(x)
        assert y.dtype == jnp.float32, name
        np.testing.assert_array_equal(y, layer(x.astype(jnp.float32)), err_msg=name)
    with jax.enable_x64(True):
        x = x.astype(jnp.float32)
        for name, layer in _mixers(None, jnp.float64).items():
            y = layer(x)
            assert y.dtype == jnp.float64, name
            np.testing.assert_array_equal(y, layer(x.astype(jnp.float64)), err_msg=name)


@pytest.mark.parametrize("name", ["FlaHGRNAttention", "HGRN2", "FlaHGRN2Attention"])
def test_a_complex_state_in_a_real_mixer_is_refused(name):
    """An HGRU's complex state handed to a real mixer ran, its imaginary part dropped."""
    layer = _mixers()[name]
    x = jnp.ones((1, 2, D))
    state = layer.init_state(1)
    with pytest.raises(
        ValueError,
        match=rf"^{name}\.step: state has dtype complex64; this layer's state is real floating "
        r"\(float32\): start from layer\.init_state\(1\)",
    ):
        layer.step(x, state.astype(jnp.complex64))
    with pytest.raises(ValueError, match=rf"^{name}\.step: state has dtype int32"):
        layer.step(x, state.astype(jnp.int32))


@pytest.mark.parametrize("name", ["FlaHGRNAttention", "HGRN2", "FlaHGRN2Attention"])
def test_a_state_narrower_than_the_layer_s_is_refused(name):
    """A bfloat16 state (a cache cast down to save memory) was taken and a float32 one given
    back, so a lax.scan decoding loop failed on its carry with JAX's message naming no layer.
    (The complex HGRU refuses any real state: test_a_real_state_in_the_complex_hgru_is_refused.)"""
    layer = _mixers()[name]
    state = layer.init_state(1)
    with pytest.raises(
        ValueError,
        match=rf"^{name}\.step: state has dtype bfloat16, narrower than this layer's state "
        r"\(float32\).*start from layer\.init_state\(1\).*cast it with \.astype",
    ):
        layer.step(jnp.ones((1, 2, D)), state.astype(jnp.bfloat16))


def test_a_real_state_in_the_complex_hgru_is_refused():
    layer = HGRU(D, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"^HGRU\.step: state has dtype float32; this layer's state is complex"
    ):
        layer.step(jnp.ones((1, 2, D)), jnp.zeros((1, D), jnp.float32))


@pytest.mark.parametrize("batch", [-1, 2.5, None, True])
def test_init_state_names_a_bad_batch_size(batch):
    for name, layer in _mixers().items():
        with pytest.raises(
            ValueError, match=rf"^{name}\.init_state: batch_size must be a whole number >= 0"
        ):
            layer.init_state(batch)


def test_the_hgru_takes_a_mask_as_nested_lists():
    """HGRU's full pass called mask.astype: a list mask, which step and the other mixers
    take, was an AttributeError."""
    for bidirectional in (False, True):
        layer = HGRU(D, bidirectional=bidirectional, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(3), (2, 3, D))
        mask = [[1, 1, 0], [1, 1, 1]]
        np.testing.assert_array_equal(layer(x, 0.1, mask=mask), layer(x, 0.1, mask=jnp.array(mask)))


@pytest.fixture(scope="module")
def lm() -> HGRNLM:
    config = LMConfig(vocab_size=11, features=D, num_layers=2, glu_expand=2)
    return HGRNLM(config, rngs=nnx.Rngs(0))


def test_the_lm_returns_a_list_cache_for_a_list_cache(lm):
    """A list cache came back a tuple, which a lax.scan carry refuses."""
    ids = jnp.array([[1, 2, 3]])
    cache = list(lm.init_cache(1))
    logits, after = lm.step(ids, cache)
    assert isinstance(after, list) and len(after) == 2

    def body(carry, token):
        return lm.step(token[None, None], carry)[1], None

    last, _ = jax.lax.scan(body, cache, ids[0])
    assert isinstance(last, list)
    np.testing.assert_allclose(last[1], after[1], rtol=1e-6, atol=1e-7)
    assert isinstance(lm.step(ids, lm.init_cache(1))[1], tuple)


def test_generate_checks_its_options_whatever_it_generates(lm):
    """greedy="False" (truthy) decoded greedily; with max_new_tokens=0 a bad temperature, key
    or top_k passed unseen; a temperature given as text or per row was NumPy's error."""
    prompt = jnp.array([[1, 2]])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"^generate\(greedy='False'\): greedy must be True or"):
        generate(lm, prompt, 2, greedy="False", rng=key)
    for bad in ("hot", np.ones(1), -1.0, True):
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
            generate(lm, prompt, 2, rng=key, temperature=bad)
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
            generate(lm, prompt, 0, rng=key, temperature=bad)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, prompt, 0, rng=key, top_k=0)
    with pytest.raises(ValueError, match="rng"):
        generate(lm, prompt, 0, rng="not a key")
    np.testing.assert_array_equal(generate(lm, prompt, 0), prompt)  # no key needed for none
    np.testing.assert_array_equal(generate(lm, prompt, 0, greedy=True), prompt)


@pytest.mark.parametrize("cls", [HGRU, FlaHGRNAttention, HGRN2, FlaHGRN2Attention])
@pytest.mark.parametrize("rngs", [None, 0])
def test_rngs_that_is_no_nnx_rngs_is_named(cls, rngs):
    """``rngs=None`` or a seed failed inside Flax's initializers ("'NoneType' object has no
    attribute 'params'"), naming no layer."""
    with pytest.raises(
        ValueError, match=rf"^{cls.__name__}: rngs must be an nnx\.Rngs, e\.g\. rngs=nnx\.Rngs\(0\)"
    ):
        cls(D, rngs=rngs)

"""Out-of-range model settings stop at construction in one line naming the field and the fix.

Each case was accepted before and failed deep inside a layer or, worse, silently built another
model (a review reproduced them): ``dropout=1.5`` scaled activations by -2, ``glu_expand=0``
built a one-unit GLU, a negative norm epsilon gave NaN, ``bidirectional="no"`` (truthy) built
the bidirectional layer, an fla ``expand_ratio`` whose forget gate the lower bounds do not fit
failed at the first call.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.nn import (
    HGRN2,
    HGRNLM,
    HGRU,
    HGRU2D,
    ClassifierConfig,
    FlaHGRN2Attention,
    FlaHGRNAttention,
    ImageConfig,
    LMConfig,
    MixerConfig,
)

LM = dict(vocab_size=10, features=8, num_layers=2)
CLS = dict(vocab_size=10, features=8, num_layers=2, num_classes=2)

CASES = [
    (lambda: LMConfig(**LM, dropout=1.5), r"LMConfig(dropout=1.5): dropout must be a probability in [0, 1)"),
    (lambda: LMConfig(**LM, dropout=-0.1), r"LMConfig(dropout=-0.1): dropout must be a probability"),
    (lambda: LMConfig(**LM, glu_expand=0), r"LMConfig(glu_expand=0): glu_expand must be a finite number above 0"),
    (lambda: LMConfig(**LM, norm_epsilon=-1.0), r"LMConfig(norm_epsilon=-1.0): norm_epsilon must be"),
    (lambda: LMConfig(**dict(LM, features=-8)), r"LMConfig(features=-8): features must be a positive integer"),
    (lambda: LMConfig(**dict(LM, num_layers=0)), r"LMConfig(num_layers=0): num_layers must be a positive"),
    (lambda: LMConfig(**dict(LM, vocab_size=2.5)), r"LMConfig(vocab_size=2.5): vocab_size must be"),
    (lambda: LMConfig(**LM, remat="bogus"), r"LMConfig(remat='bogus'): unknown remat policy 'bogus'"),
    (lambda: LMConfig(**LM, lower_bound_dtype="flaot32"), r"LMConfig(lower_bound_dtype='flaot32'): use a float dtype"),
    (lambda: ClassifierConfig(**dict(CLS, num_classes=0)), r"ClassifierConfig(num_classes=0): num_classes must be"),
    (lambda: ClassifierConfig(**CLS, position_dropout=1.0), r"ClassifierConfig(position_dropout=1.0): position_dropout"),
    (lambda: ClassifierConfig(**dict(CLS, features=True)), r"ClassifierConfig(features=True): features must be"),
    (lambda: ImageConfig(patch_size=0), r"ImageConfig(patch_size=0): patch_size must be a positive integer"),
    (lambda: ImageConfig(image_size=(28,)), r"ImageConfig(image_size=(28,)): image_size must be (H, W)"),
    (lambda: ImageConfig(image_size=(28.5, 28)), r"ImageConfig(image_size=(28.5, 28)): image_size must be"),
    (lambda: MixerConfig(kind="hgrn2", expand_ratio=2.5), r"MixerConfig(expand_ratio=2.5): expand_ratio must be"),
    (lambda: MixerConfig(norm_epsilon=0.0), r"MixerConfig(norm_epsilon=0.0): norm_epsilon must be a finite"),
    (
        lambda: LMConfig.fla(kind="hgrn", expand_ratio=2, **LM),
        r"LMConfig: the lower bounds (one per channel of features=8) do not fit fla hgrn's forget "
        r"gate of width 16 (mixer.expand_ratio=2); set mixer.expand_ratio to 1, or use_lower_bound",
    ),
    (
        lambda: LMConfig.fla(kind="hgrn2", expand_ratio=3, **LM),
        r"fla hgrn2's forget gate of width 6 (mixer.expand_ratio=3); set mixer.expand_ratio to a "
        r"divisor of 8",
    ),
    (lambda: HGRU(8, bidirectional="no", rngs=nnx.Rngs(0)), r"HGRU(bidirectional='no'): bidirectional must be True or False"),
    (lambda: HGRU(8, use_bias=1, rngs=nnx.Rngs(0)), r"HGRU(use_bias=1): use_bias must be True or False"),
    (lambda: HGRU2D(8, causal="no", rngs=nnx.Rngs(0)), r"HGRU2D(causal='no'): causal must be True or False"),
    (lambda: HGRN2(8, expand_ratio=2.0, rngs=nnx.Rngs(0)), r"HGRN2(expand_ratio=2.0): expand_ratio must be a positive"),
    (lambda: HGRN2(8, expand_ratio=None, rngs=nnx.Rngs(0)), r"HGRN2(expand_ratio=None): expand_ratio must be"),
    (lambda: FlaHGRNAttention(8, expand_ratio=0, rngs=nnx.Rngs(0)), r"FlaHGRNAttention(expand_ratio=0): expand_ratio"),
    (
        lambda: FlaHGRN2Attention(8, expand_ratio=None, num_heads=2.0, rngs=nnx.Rngs(0)),
        r"FlaHGRN2Attention(num_heads=2.0): num_heads must be a positive integer",
    ),
]  # fmt: skip


@pytest.mark.parametrize("build, message", CASES)
def test_an_out_of_range_setting_is_named_in_one_line(build, message):
    with pytest.raises(ValueError) as caught:
        build()
    text = str(caught.value)
    assert message in text, text  # a literal fragment, not a pattern
    assert "\n" not in text


def test_the_accepted_spellings_still_build():
    """A square image size as one number, lists from a config file, NumPy integers, and fla
    expand ratios whose forget gates the bounds fit (or without bounds)."""
    assert ImageConfig(image_size=28, patch_size=14).image_size == (28, 28)
    assert ImageConfig(image_size=[28, np.int64(56)], patch_size=14).image_size == (28, 56)
    assert LMConfig(**dict(LM, features=np.int64(8))).features == 8
    assert LMConfig.fla(kind="hgrn2", expand_ratio=4, **LM).mixer.expand_ratio == 4
    assert LMConfig.fla(kind="hgrn", expand_ratio=2, use_lower_bound=False, **LM)
    assert LMConfig(**LM, remat="dots", lower_bound_dtype="bfloat16").remat == "dots"


def test_an_hgru_without_forget_gate_and_without_bounds_runs_as_no_recurrence():
    """``HGRU(use_forget_gate=False)(x, None)`` failed on ``jnp.asarray(None)``: None is no
    bound, so the decay is the bound 0 and each step sees only its own input."""
    layer = HGRU(8, use_forget_gate=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(layer(x, None)), np.asarray(layer(x, 0.0)))


def test_the_lm_config_of_an_fla_hgrn_model_builds_and_runs():
    model = HGRNLM(LMConfig.fla(kind="hgrn2", expand_ratio=4, **LM), rngs=nnx.Rngs(0))
    assert model(jnp.ones((1, 4), jnp.int32)).shape == (1, 4, 10)

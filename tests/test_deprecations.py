"""hgrn_jax's deprecated names: each still works, warns (an ``HGRNDeprecationWarning``, a
``DeprecationWarning`` naming the new spelling) and gives what the new spelling gives.

These are the only tests that use them: pyproject.toml makes an ``HGRNDeprecationWarning`` an
error everywhere else (``pytest.warns`` records the warning before that filter sees it), so a
test, experiment config or helper on an old spelling fails instead of adding warning noise.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import hgrn_jax.tasks
from hgrn_jax import sharding as sh
from hgrn_jax.deprecation import HGRNDeprecationWarning
from hgrn_jax.nn import (
    HGRNLM,
    ClassifierConfig,
    HGRNClassifier,
    HGRNImageClassifier,
    ImageConfig,
    LMConfig,
    MixerConfig,
)

# Deprecated flat model-config field -> (its MixerConfig field, a value other than the default).
FLAT_FIELDS = {
    "separate_phases": ("separate_phases", False),
    "complex_valued": ("complex_valued", False),
    "use_forget_gate": ("use_forget_gate", False),
    "norm_before_gate": ("norm_before_gate", False),
    "mixer_bias": ("use_bias", False),
    "method": ("method", "sequential"),
    "sequence_axis": ("sequence_axis", "model"),
}
LM_SIZES = dict(vocab_size=16, features=8, num_layers=1)
CLASSIFIER_SIZES = dict(num_classes=3, features=8, num_layers=1, vocab_size=16)
IMAGE_SIZES = dict(num_classes=3, image_size=(8, 8), patch_size=4, features=8, num_layers=1)


def _deprecated(make, match: str):
    """``make()`` under ``pytest.warns``: exactly one HGRNDeprecationWarning, matching ``match``."""
    with pytest.warns(DeprecationWarning, match=match) as caught:
        made = make()
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert issubclass(ours[0].category, HGRNDeprecationWarning)
    return made


def _flat_cases():
    # LMConfig never had separate_phases (causal: one direction).
    lm = [name for name in FLAT_FIELDS if name != "separate_phases"]
    cases = [("LMConfig", name) for name in lm]
    cases += [
        (where, name) for where in ("ClassifierConfig", "ImageConfig") for name in FLAT_FIELDS
    ]
    return cases


CONFIGS = {
    "LMConfig": (LMConfig, LM_SIZES),
    "ClassifierConfig": (ClassifierConfig, CLASSIFIER_SIZES),
    "ImageConfig": (ImageConfig, IMAGE_SIZES),
}


@pytest.mark.parametrize(("where", "old"), _flat_cases())
def test_flat_mixer_fields_fold_into_the_mixer(where, old):
    cls, sizes = CONFIGS[where]
    new, value = FLAT_FIELDS[old]
    got = _deprecated(
        lambda: cls(**sizes, **{old: value}),
        rf"^{where}\({old}=\.\.\.\) is deprecated; use {where}\(mixer=MixerConfig\({new}=",
    )
    want = cls(**sizes, mixer=MixerConfig(**{new: value}))
    assert got == want and hash(got) == hash(want)
    assert getattr(got, old) is None  # cleared: dataclasses.replace does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert dataclasses.replace(got, num_layers=2).mixer == got.mixer


@pytest.mark.parametrize(
    ("make", "match", "want"),
    [
        (
            lambda: LMConfig(**LM_SIZES, glu_hidden=24),
            r"^LMConfig\(glu_hidden=\.\.\.\) is deprecated; use glu_expand",
            lambda: LMConfig(**LM_SIZES, glu_expand=3),
        ),
        (
            lambda: LMConfig(**LM_SIZES, mixer="hgru"),
            r"^LMConfig\(mixer='hgru'\) is deprecated; use LMConfig\(mixer=MixerConfig\("
            r"layout='official'\)\)",
            lambda: LMConfig(**LM_SIZES, mixer=MixerConfig(layout="official")),
        ),
        (
            lambda: LMConfig(**LM_SIZES, mixer="fla"),
            r"^LMConfig\(mixer='fla'\) is deprecated; use LMConfig\(mixer=MixerConfig\("
            r"layout='fla'\)\)",
            lambda: LMConfig(**LM_SIZES, mixer=MixerConfig(layout="fla")),
        ),
        (
            lambda: LMConfig(**LM_SIZES, mixer_norm_epsilon=1e-6),
            r"^LMConfig\(mixer_norm_epsilon=\.\.\.\) is deprecated; use LMConfig\(mixer="
            r"MixerConfig\(norm_epsilon=",
            lambda: LMConfig(**LM_SIZES, mixer=MixerConfig(norm_epsilon=1e-6)),
        ),
        (
            lambda: ClassifierConfig(**CLASSIFIER_SIZES, mixer="1d"),
            r"^ClassifierConfig\(mixer='1d'\) is deprecated; use ClassifierConfig\(mixer="
            r"MixerConfig\(scan='1d'\)\)",
            lambda: ClassifierConfig(**CLASSIFIER_SIZES, mixer=MixerConfig(scan="1d")),
        ),
        (
            lambda: ClassifierConfig(**CLASSIFIER_SIZES, mixer="2d", grid_shape=(2, 3)),
            r"^ClassifierConfig\(mixer='2d'\) is deprecated; use ClassifierConfig\(mixer="
            r"MixerConfig\(scan='2d'\)\)",
            lambda: ClassifierConfig(
                **CLASSIFIER_SIZES, mixer=MixerConfig(scan="2d"), grid_shape=(2, 3)
            ),
        ),
        (
            lambda: ImageConfig(**IMAGE_SIZES, in_channels=1),
            r"^ImageConfig\(in_channels=\.\.\.\) is deprecated; use input_channels",
            lambda: ImageConfig(**IMAGE_SIZES, input_channels=1),
        ),
    ],
    ids=["glu_hidden", "lm_mixer_hgru", "lm_mixer_fla", "mixer_norm_epsilon", "1d", "2d", "image"],
)
def test_renamed_fields_give_the_new_config(make, match, want):
    got = _deprecated(make, match)
    assert got == want() and hash(got) == hash(want())


def _params(module: nnx.Module) -> dict:
    leaves, _ = jax.tree.flatten_with_path(nnx.state(module, nnx.Param))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.mark.parametrize(
    ("model", "make_old", "warnings", "new"),
    [
        (
            HGRNLM,
            lambda: LMConfig(**LM_SIZES, glu_hidden=24, mixer="fla", complex_valued=False),
            3,
            LMConfig(
                **LM_SIZES, glu_expand=3, mixer=MixerConfig(layout="fla", complex_valued=False)
            ),
        ),
        (
            HGRNClassifier,
            lambda: ClassifierConfig(
                **CLASSIFIER_SIZES, mixer="2d", grid_shape=(2, 3), separate_phases=False
            ),
            2,
            ClassifierConfig(
                **CLASSIFIER_SIZES,
                mixer=MixerConfig(scan="2d", separate_phases=False),
                grid_shape=(2, 3),
            ),
        ),
        (
            HGRNImageClassifier,
            lambda: ImageConfig(**IMAGE_SIZES, in_channels=1, mixer_bias=False),
            2,
            ImageConfig(**IMAGE_SIZES, input_channels=1, mixer=MixerConfig(use_bias=False)),
        ),
    ],
    ids=["lm", "classifier", "image"],
)
def test_old_spellings_build_the_same_parameters(model, make_old, warnings, new):
    """Several old spellings at once: one warning each, and a model with the same parameter
    tree, values included (same seed), as the new spelling's."""
    with pytest.warns(DeprecationWarning, match="is deprecated; use") as caught:
        old = make_old()
    assert len(caught) == warnings, [str(w.message) for w in caught]
    assert all(issubclass(w.category, HGRNDeprecationWarning) for w in caught)
    old_params = _params(model(old, rngs=nnx.Rngs(0)))
    new_params = _params(model(new, rngs=nnx.Rngs(0)))
    assert new_params and old_params.keys() == new_params.keys()
    for path, value in new_params.items():
        np.testing.assert_array_equal(old_params[path], value, err_msg=str(path))


def test_create_sharded_model_is_create_sharded():
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    factory = lambda: HGRNLM(LMConfig(**LM_SIZES), rngs=nnx.Rngs(0))
    old = _deprecated(
        lambda: sh.create_sharded_model(factory, mesh),
        r"^sharding\.create_sharded_model is deprecated; use sharding\.create_sharded",
    )
    new_params = _params(sh.create_sharded(factory, mesh))
    old_params = _params(old)
    assert new_params and old_params.keys() == new_params.keys()
    for path, value in new_params.items():
        np.testing.assert_array_equal(old_params[path], value, err_msg=str(path))


def test_training_tasks_module_is_hgrn_jax_tasks(monkeypatch):
    """The old module warns when imported (once: a fresh import here) and re-exports
    hgrn_jax.tasks's objects."""
    monkeypatch.delitem(sys.modules, "hgrn_jax.training.tasks", raising=False)
    old = _deprecated(
        lambda: importlib.import_module("hgrn_jax.training.tasks"),
        r"^hgrn_jax\.training\.tasks is deprecated; import hgrn_jax\.tasks instead",
    )
    for name in old.__all__:
        assert getattr(old, name) is getattr(hgrn_jax.tasks, name), name


def test_the_suite_errors_on_our_deprecations_only():
    """pyproject.toml's filter, as this suite runs: an HGRNDeprecationWarning outside
    ``pytest.warns`` is an error (whatever module it is attributed to: here this test's), a
    third party's DeprecationWarning is not. (A -W on the command line that turns every
    DeprecationWarning into an error or ignores them overrides it, and fails this test.)"""
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters in force
        with pytest.raises(HGRNDeprecationWarning, match="glu_hidden"):
            LMConfig(**LM_SIZES, glu_hidden=24)
        warnings.warn("some_library.f is deprecated; use g", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some_library.f is deprecated; use g"]

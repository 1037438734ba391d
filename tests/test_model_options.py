"""Model-level switches of issue 6: ``sequence_axis`` (sequence parallelism) and ``remat``.

The switches change how a model computes, never what: each test builds the same model (same
seed, so the same parameters) with and without the switch and compares. Tolerances are float32
rounding of a few re-ordered sums (the sharded scan combines shard carries in another order).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hgrn_jax import sharding
from hgrn_jax.nn import HGRNLM, ClassifierConfig, HGRNClassifier, LMConfig, MixerConfig


def _lm(**overrides) -> HGRNLM:
    config = LMConfig(vocab_size=32, features=8, num_layers=2, glu_expand=2, **overrides)
    return HGRNLM(config, rngs=nnx.Rngs(0))


def _lm_loss(model, ids):
    logp = jax.nn.log_softmax(model(ids[:, :-1]))
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()


SEQUENCE_PARALLEL_MIXERS = {
    "hgrn": {},
    "hgrn2": dict(kind="hgrn2", expand_ratio=4, method="sequential"),
    "hgrn2-fla": dict(kind="hgrn2", layout="fla", expand_ratio=4, method="sequential"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mixer", list(SEQUENCE_PARALLEL_MIXERS))
def test_lm_sequence_axis_splits_the_sequence_and_matches(mixer):
    """An LM of each mixer that splits (the config route: MixerConfig -> make_mixer) over 8
    devices, the length 32 split in 4 steps each, equals the unsplit LM: logits and gradients."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, 32)
    options = SEQUENCE_PARALLEL_MIXERS[mixer]
    plain = _lm(mixer=MixerConfig(**options)) if options else _lm()
    want_logits = nnx.jit(lambda m, ids: m(ids[:, :-1]))(plain, ids)
    want_grads = nnx.jit(nnx.grad(_lm_loss))(plain, ids)

    parallel = (
        _lm(mixer=MixerConfig(**options, sequence_axis="model"))
        if options
        else _lm(mixer=MixerConfig(sequence_axis="model"))
    )
    mesh = sharding.make_mesh(data=1, fsdp=1, model=8)
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, ids: m(ids[:, :-1]))(parallel, ids)
        grads = nnx.jit(nnx.grad(_lm_loss))(parallel, ids)
    np.testing.assert_allclose(logits, want_logits, atol=2e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_lm_sequence_axis_of_one_device_is_the_plain_model():
    """A run on one device (mesh model=1) with sequence parallelism set: XLA:CPU aborted the
    process compiling the gradient of the split path; one shard is now the plain recurrence."""
    ids = jax.random.randint(jax.random.key(1), (2, 33), 0, 32)
    want = nnx.jit(nnx.grad(_lm_loss))(_lm(), ids)
    mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        got = nnx.jit(nnx.grad(_lm_loss))(_lm(mixer=MixerConfig(sequence_axis="model")), ids)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def _fla_lm(sequence_axis=None) -> HGRNLM:
    """fla's HGRNForCausalLM layout (``LMConfig.fla``), the way fla checkpoints load
    (:func:`hgrn_jax.convert.from_fla_hgrn_lm`), with the sequential scan."""
    mixer = dataclasses.replace(
        LMConfig.fla().mixer, method="sequential", sequence_axis=sequence_axis
    )
    config = LMConfig.fla(vocab_size=32, features=8, num_layers=2, glu_expand=2, mixer=mixer)
    return HGRNLM(config, rngs=nnx.Rngs(0))


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.slow  # an LM and its gradient compiled split and unsplit: ~5-8 s each
# Ragged lengths on 2 and 4 shards (padded); the layer test (test_sequence_parallel) splits more.
@pytest.mark.parametrize("shards, length", [(2, 31), (4, 30)])
def test_fla_lm_sequence_axis_splits_the_sequence_and_matches(shards, length):
    """fla's HGRN LM (kind 'hgrn', layout 'fla'; the config route: MixerConfig -> make_mixer)
    with its sequence split over 2 and 4 devices, lengths they divide and lengths they do not
    (padded with identity steps at the end), equals the unsplit LM: logits and every parameter
    gradient within 1e-5 of the array's largest magnitude. The split scan only re-associates the
    float32 sums at the shard boundaries (``D_k * h + S_k`` instead of step by step), so both are
    roundings of one value (measured: at most 1.5e-7 of the scale on the logits, 8.5e-7 on the
    gradients). Decoding (``step()``, the whole sequence as one prefill) stays unsplit and gives
    the same logits (measured: identical)."""
    ids = jax.random.randint(jax.random.key(1), (2, length + 1), 0, 32)
    plain = _fla_lm()
    want_logits = nnx.jit(lambda m, ids: m(ids[:, :-1]))(plain, ids)
    want_grads = nnx.jit(nnx.grad(_lm_loss))(plain, ids)

    parallel = _fla_lm(sequence_axis="model")
    assert all(block.mixer.sequence_axis == "model" for block in parallel.blocks)
    mesh = sharding.make_mesh(data=1, fsdp=1, model=shards, devices=jax.devices()[:shards])
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, ids: m(ids[:, :-1]))(parallel, ids)
        grads = nnx.jit(nnx.grad(_lm_loss))(parallel, ids)
        jaxpr = jax.make_jaxpr(lambda ids: parallel(ids[:, :-1]))(ids)
        decoded, _ = nnx.jit(lambda m, ids: m.step(ids[:, :-1], m.init_cache(2)))(parallel, ids)
    assert "shard_map" in str(jaxpr), "the LM did not run the split recurrence"
    assert logits.shape == want_logits.shape
    assert _relative_error(logits, want_logits) < 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert _relative_error(got, want) < 1e-5
    assert _relative_error(decoded, want_logits) < 1e-5


def test_lm_sequence_axis_rejects_attention_naming_the_fix():
    with pytest.raises(ValueError, match=r"sequence_axis='model' .* needs a recurrent mixer.*"):
        LMConfig(mixer=MixerConfig(kind="attention", sequence_axis="model"))


@pytest.mark.slow
def test_classifier_remat_gives_the_same_gradients():
    def build(remat):
        config = ClassifierConfig(
            num_classes=3,
            features=8,
            num_layers=2,
            encoder="embed",
            vocab_size=11,
            norm="layer",
            remat=remat,
        )
        return HGRNClassifier(config, rngs=nnx.Rngs(4))

    ids = jax.random.randint(jax.random.key(5), (2, 12), 0, 11)
    mask = jnp.ones((2, 12), bool).at[1, 9:].set(False)

    def loss(model):
        return jnp.sum(model(ids, mask) ** 2)

    # Both compiled: the reference gradient run eagerly, op by op, took about 3.5 CPU-s more.
    want = nnx.jit(nnx.grad(loss))(build(None))
    got = nnx.jit(nnx.grad(loss))(build("nothing"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ options a mixer cannot honour

FLA_HGRN = dict(kind="hgrn", layout="fla")
# Each option fla's HGRN layer does not have, set to the value it would ignore.
FLA_IGNORED = dict(
    complex_valued=True,
    separate_phases=True,
    use_forget_gate=False,
    norm_before_gate=False,
    use_bias=True,
)


@pytest.mark.parametrize("option", list(FLA_IGNORED))
def test_fla_hgrn_refuses_the_options_it_does_not_have(option):
    """Each HGRU switch fla's HGRN layer cannot honour is a one-line error naming the option,
    its value, layout='fla' and the fix, from the MixerConfig, the LM config and fla's preset
    (they built a model without it and said nothing)."""
    value = FLA_IGNORED[option]
    pattern = rf"mixer\.{option}={value} is not an option of layout='fla'.*layout='official'"
    with pytest.raises(ValueError, match=pattern) as caught:
        MixerConfig(**FLA_HGRN, **{option: value})
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=rf"LMConfig: {pattern}"):
        LMConfig(mixer={**FLA_HGRN, option: value})
    with pytest.raises(ValueError, match=pattern):
        LMConfig.fla(mixer={**FLA_HGRN, "use_bias": False, option: value})


def test_fla_hgrn_accepts_what_it_does():
    """The values fla's layer computes anyway (real, no phases, forget gate, norm then gate, no
    biases) are accepted, and build the same model as leaving them unset."""
    does = dict(
        complex_valued=False,
        separate_phases=False,
        use_forget_gate=True,
        norm_before_gate=True,
        use_bias=False,
    )
    ids = jnp.arange(12).reshape(2, 6) % 32
    plain = _lm(mixer=MixerConfig(**FLA_HGRN))
    explicit = _lm(mixer=MixerConfig(**FLA_HGRN, **does))
    np.testing.assert_array_equal(explicit(ids), plain(ids))


def test_other_mixers_refuse_options_they_ignore():
    """fla's HGRN2 has no biases; attention has no recurrence method or inner norm. A causal or
    real-valued HGRU with separate_phases=True is accepted: there is no second phase to give."""
    with pytest.raises(ValueError, match=r"mixer.use_bias=True is not an option of layout='fla'"):
        MixerConfig(kind="hgrn2", layout="fla", use_bias=True)
    for name, value in (("method", "'sequential'"), ("norm_epsilon", "0.001")):
        with pytest.raises(ValueError, match=rf"mixer.{name}={value} is not an option of kind="):
            MixerConfig(kind="attention", **{name: eval(value)})
    MixerConfig(complex_valued=False, separate_phases=True)
    LMConfig(mixer=MixerConfig(separate_phases=True))
    ClassifierConfig(vocab_size=5, mixer=MixerConfig(separate_phases=True))
    MixerConfig(kind="attention", use_bias=False)


def test_runner_config_names_the_mixer_key_fla_does_not_have():
    """From the experiment runner, the same rule names config.model.mixer.<key> and its flag.
    The switches the config files carry at True (complex_valued, separate_phases), which fla's
    real HGRN never had, are dropped with a warning, so that runs saved with layout='fla' before
    the rule still resume and load; other options fla does not have are refused."""
    from experiments.configs.lm import wikitext103
    from hgrn_jax import tasks
    from hgrn_jax.tasks.model_settings import IgnoredSettingWarning
    from hgrn_jax.training.config_checks import check_config_values

    config = wikitext103.get_config("tiny")
    config.model.mixer.layout = "fla"
    expected = (
        r"^config\.model\.mixer\.complex_valued=True is not used by layout='fla' .*: the model "
        r"is built without it; set --config\.model\.mixer\.complex_valued=False to say so$"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_config_values(config)  # checks before a run touches its workdir, warns not
    with pytest.warns(IgnoredSettingWarning, match=expected) as caught:
        built = tasks.model_config(config)  # the build warns, once per setting
    carried = [n for n in ("complex_valued", "separate_phases") if config.model.mixer.get(n)]
    assert [str(w.message).split("=")[0] for w in caught] == [
        f"config.model.mixer.{name}" for name in carried
    ]
    assert built.mixer.layout == "fla" and built.mixer.complex_valued is None
    config.model.mixer.complex_valued = False
    assert tasks.model_config(config).mixer.complex_valued is False
    config.model.mixer.use_forget_gate = False
    with pytest.raises(ValueError, match=r"^config\.model\.mixer\.use_forget_gate=False is not"):
        tasks.model_config(config)


def test_runner_refuses_a_mixer_without_the_model_s_direction_before_any_warning():
    """fla's HGRN is causal only: a classifier (bidirectional) switched to layout='fla' stops in
    the runner's checks, before the workdir, with the flags to set, and is not first told to
    switch off complex_valued and separate_phases (the warnings of the settings fla drops)."""
    from experiments.configs.lra import listops
    from hgrn_jax.training.config_checks import check_config_values

    config = listops.get_config("tiny")
    config.model.mixer.layout = "fla"
    assert config.model.mixer.complex_valued is True  # a setting fla would drop, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError,
            match=r"^config\.model\.mixer: kind='hgrn', layout='fla' is causal only .*; use "
            r"--config\.model\.mixer\.layout=official or --config\.model\.mixer\.kind=hgrn2",
        ):
            check_config_values(config)


@pytest.mark.parametrize(
    "config_name, key, value, expected",
    [
        (
            "lra.listops",
            "model.mixer.expand_ratio",
            5,
            r"expand_ratio is an HGRN2 / fla option; HGRN official has none \(got 5\)",
        ),
        (
            "lm.wikitext103",
            "label_smoothing",
            0.1,
            r"^config\.label_smoothing=0\.1 is not read by task 'wikitext103'",
        ),
    ],
)
def test_model_config_rules_and_unread_settings_stop_a_run_before_it_writes(
    tmp_path, config_name, key, value, expected
):
    """A rule of the model's config class (an HGRN2 option on an HGRN mixer) and a setting the
    task does not read (label smoothing on the LM) stopped the run only once the task was built,
    after config.json was written (user review)."""
    import importlib

    from hgrn_jax.training.loop import train_and_evaluate

    config = importlib.import_module(f"experiments.configs.{config_name}").get_config("tiny")
    section, _, name = key.rpartition(".")
    target = config
    for part in filter(None, section.split(".")):
        target = target[part]
    target[name] = value
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_early_model_check_leaves_a_vocabulary_from_files_to_them():
    """A release LM's vocabulary size of 0 is the tokenizer's to say once the task reads its
    files: the check before the workdir (which builds the model's config class) let it be (it
    refused 'config.model.vocab_size=0 must be a whole number >= 1')."""
    from experiments.configs.lm import wikitext103
    from hgrn_jax.training.config_checks import check_config_values

    config = wikitext103.get_config("tiny")
    config.data.source, config.model.vocab_size = "release", 0
    config.data.wikitext_dir, config.data.tokenizer_path = "/nowhere", "/nowhere/tokenizer.json"
    check_config_values(config)  # no file is read here
    assert config.model.vocab_size == 0

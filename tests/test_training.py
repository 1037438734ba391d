"""The training runner: schedules, weight-decay masks, accumulation, checkpoints and resumption
(SIGKILL, SIGTERM, corrupt checkpoints), the NaN stop and config-flag errors.

Runs use ``tests/toy_task.py`` (a tiny classifier with BatchNorm and dropout on synthetic data);
subprocess runs go through ``python -m experiments.train`` on 8 simulated CPU devices.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType
from two_processes import cli_env, wait_until_gone

from hgrn_jax import sharding
from hgrn_jax.nn import HGRNLM, LMConfig
from hgrn_jax.training import optim
from hgrn_jax.training.checkpoint import CheckpointFallbackWarning, Checkpoints
from hgrn_jax.training.config_checks import check_run_lengths
from hgrn_jax.training.loop import NonFiniteLossError, Run, resolve_task, train_and_evaluate
from hgrn_jax.training.loss_scale import (
    LossScaleDroppedWarning,
    LossScaleStartWarning,
    dynamic_loss_scale,
)
from hgrn_jax.training.state import create_train_state, merge_model
from hgrn_jax.training.steps import make_train_step
from hgrn_jax.training.workdir import ConfigChangedError, ConfigChangeWarning

sys.path.insert(0, str(Path(__file__).parent))
from toy_task import ToyTask, toy_config
from toy_task import _examples as toy_examples

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "tests" / "toy_task.py"


# ----------------------------------------------------------------------------------------------
# Schedules, masks, optimizer options
# ----------------------------------------------------------------------------------------------


def _values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_lr():
    schedule = optim.cosine_with_warmup(1.0, warmup_steps=10, decay_steps=110, min_lr=0.1)
    got = _values(schedule, [0, 5, 10, 60, 110])
    # Half-way through the cosine the rate is the mean of lr and min_lr.
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)


def _hf_cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The multiplier of transformers.get_cosine_schedule_with_warmup (num_cycles=0.5), the
    reference LRA trainer's ``cosine_warmup``, in float64; written from its formula."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + np.cos(np.pi * 2.0 * 0.5 * progress)))


@pytest.mark.parametrize(
    "lr, warmup, decay, min_lr",
    [(3e-3, 30_000, 50_000, 0.0), (7.5e-4, 150_000, 500_000, 0.0), (1.0, 0, 100, 0.25)],
)
def test_cosine_schedule_is_the_reference_trainers_past_decay_steps_too(lr, warmup, decay, min_lr):
    """The LRA Image and Path-X configs run past decay_steps (90k steps on a 50k schedule, 1M
    on 500k): the reference's cosine is periodic there (0 at decay_steps, the peak again at
    progress 2, 0 at progress 3), where ours held min_lr. Steps: warmup's first, middle and
    last, the cosine's start, middle and end, and past it. min_lr > 0 scales the same cosine
    between lr and min_lr. Tolerance: the schedule runs in float32; progress has a relative
    rounding of a few 1.2e-7 and cos has slope <= pi/2 per unit of progress, so up to 3 units
    of progress stay within 1e-6 of lr."""
    schedule = optim.cosine_with_warmup(lr, warmup, decay, min_lr)
    span = decay - warmup
    steps = [0, warmup // 2, max(warmup - 1, 0), warmup, warmup + span // 2, decay]
    steps += [decay + span // 2, decay + span, decay + 3 * span // 2, decay + 2 * span - 1]
    expected = [min_lr + (lr - min_lr) * _hf_cosine_with_warmup(s, warmup, decay) for s in steps]
    np.testing.assert_allclose(_values(schedule, steps), expected, rtol=0, atol=1e-6 * lr)
    assert float(schedule(decay + span)) == pytest.approx(lr, rel=1e-6)  # the peak at progress 2
    if warmup:
        assert float(schedule(0)) == 0.0 and float(schedule(warmup)) == np.float32(lr)


def _paper_config(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"experiments.configs.{name}").get_config()


def test_a_cosine_run_past_decay_steps_is_warned_of_as_it_starts():
    """lra/image.py trains 90,000 steps on the paper's 50,000-step schedule: the rate reaches 0
    at 50,000 and rises again (the reference's periodic cosine), with nothing said. One line
    before anything is written (check_config_values), naming the key that ends the cosine
    with the run; an update at decay_steps itself is at min_lr and is no rise."""
    from hgrn_jax.training.config_checks import (
        RunLengthWarning,
        check_config_values,
        run_length_warnings,
    )

    image = _paper_config("lra.image")
    assert run_length_warnings(image) == [
        "config.num_train_steps=90000 runs past config.schedule.decay_steps=50000: the cosine "
        "learning rate reaches schedule.min_lr=0 at step 50000 and rises again after it, back "
        "at 0.003 at step 70000 (0 at the last step), as the reference LRA trainer's does; to "
        "end the cosine with the run, set --config.schedule.decay_steps=90000"
    ]
    for decay in (90_000, 89_999):  # the last update, step 89,999, at or before decay_steps
        image.schedule.decay_steps = decay
        assert run_length_warnings(image) == []
    tiny = importlib.import_module("experiments.configs.lra.listops").get_config("tiny")
    tiny.schedule.decay_steps = 150  # of 200 steps, warmup 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_config_values(tiny)
    ours = [str(w.message) for w in caught if w.category is RunLengthWarning]
    assert len(ours) == 1 and ours[0].startswith(
        "config.num_train_steps=200 runs past config.schedule.decay_steps=150: "
    )
    assert "rises again after it (0.000819 at the last step)" in ours[0]


def test_a_timm_cosine_epoch_that_is_not_the_datas_is_warned_of():
    """ImageNet's per-epoch schedule keeps its own epoch length (625 steps at batch 2048):
    after --config.batch_size=1024 the rate still changed every 625 steps, half an epoch,
    with nothing said. An ImageNet run cut inside its warmup names the last step's rate from
    warmup_lr, as the schedule gives it."""
    from hgrn_jax.training.config_checks import run_length_warnings
    from hgrn_jax.training.optim import make_schedule

    assert run_length_warnings(_paper_config("imagenet.tiny")) == []  # HGRN-Tiny, 224 x 224
    imagenet = importlib.import_module("experiments.configs.imagenet.tiny").get_config("tiny")
    assert run_length_warnings(imagenet) == []
    imagenet.batch_size = 16  # 320 // 16 = 20 steps an epoch; the schedule's are 10
    lines = run_length_warnings(imagenet)
    assert (
        "config.schedule.steps_per_epoch=10 is not an epoch of the data (config.data."
        "train_examples=320 // config.batch_size=16 = 20 steps): timm_cosine changes the learning "
        "rate every 10 steps; set --config.schedule.steps_per_epoch=20"
    ) in "".join(lines)
    imagenet = _paper_config("imagenet.small")
    imagenet.num_train_steps = 3 * 625
    warmup = run_length_warnings(imagenet)[0]
    last = float(make_schedule(imagenet.schedule, 2e-3)(3 * 625 - 1))
    assert last == pytest.approx(1e-6 + 1 * (2e-3 - 1e-6) / 10, rel=1e-6)  # epoch 2: timm's t=1
    assert warmup.startswith(
        "config.num_train_steps=1875 ends within config.schedule.warmup_steps=6250: the learning "
        f"rate never reaches its peak 0.002 (the last step's is {last / 2e-3:.2%} of it, {last:.3g})"
    ), warmup


def test_a_shortened_paper_run_is_warned_of_not_refused():
    """Shrinking a paper run kept its warmup and epochs without a word: ListOps at 20 steps kept
    5,000 warmup steps (the last update at 1.9e-6 of a 5e-4 peak) and its 50 epochs in
    config.json, and batch 64 alone trained 37,500 steps, 25 epochs of 96,000 examples, not 50.
    An eval_every beyond the run (750 > 20) is no warning: the loop evaluates after the last
    step."""
    from hgrn_jax.training.config_checks import run_length_warnings

    short = _paper_config("lra.listops")
    short.num_train_steps, short.batch_size = 20, 16
    lines = run_length_warnings(short)
    assert len(lines) == 2
    warmup, epochs = lines
    assert warmup == (
        "config.num_train_steps=20 ends within config.schedule.warmup_steps=5000: the learning "
        "rate never reaches its peak 0.0005 (the last step's is 0.38% of it, 1.9e-06); set "
        "--config.schedule.warmup_steps below the run's steps and "
        "--config.schedule.decay_steps=20"
    )
    assert epochs.startswith(
        "config.num_train_steps=20 is not config.epochs=50 over config.data.train_examples="
        "96000 at config.batch_size=16 (50 x 6000 = 300000 steps): the run trains 0.00333 epochs"
    )
    assert epochs.endswith(
        "or --config.epochs=0 (a run counted in steps) with --config.num_train_steps=20"
    )
    wide = _paper_config("lra.listops")
    wide.batch_size = 64
    assert run_length_warnings(wide) == [
        "config.num_train_steps=37500 is not config.epochs=50 over config.data.train_examples="
        "96000 at config.batch_size=64 (50 x 1500 = 75000 steps): the run trains 25 epochs and "
        "config.json records 50; set --config.num_train_steps=75000 (and "
        "--config.schedule.decay_steps, --config.eval_every to follow) for 50 epochs, or "
        "--config.epochs=25 with --config.num_train_steps=37500"
    ]
    wide.num_train_steps = wide.schedule.decay_steps = 75_000
    assert run_length_warnings(wide) == []
    wide.epochs = 0  # a run counted in steps: not checked
    wide.num_train_steps = 10
    assert run_length_warnings(wide) == [run_length_warnings(wide)[0]]
    assert run_length_warnings(wide)[0].startswith("config.num_train_steps=10 ends within")


def _deit_epoch_lrs(lr, warmup_epochs, epochs, warmup_lr, min_lr) -> list[float]:
    """The learning rate of each epoch of the reference ImageNet run, in float64: timm's
    CosineLRScheduler._get_lr (timm 0.4.12; cycle_limit 1, warmup_prefix False, t from 0), set
    for t = 0 when the scheduler is made and stepped with step(epoch) after each epoch, as
    OpenNLPLab/im's main.py does. Written from those sources, not from ours."""

    def get_lr(t):
        if t < warmup_epochs:
            return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
        i = t // epochs
        if i >= 1:  # past the one cycle
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * (t - epochs * i) / epochs))

    current, trained = get_lr(0), []
    for epoch in range(epochs + 3):
        trained.append(current)
        current = get_lr(epoch)  # lr_scheduler.step(epoch) at the end of the epoch
    return trained


def test_timm_cosine_schedule_is_deits_per_epoch():
    """The ImageNet config's schedule: timm's per-epoch cosine from warmup_lr 1e-6 over 10
    warmup epochs to min_lr 1e-5 at 300, counted from epoch 0, one epoch behind timm's t (DeiT
    steps it with the epoch just trained), constant within each epoch of 625 steps."""
    c = _paper_config("imagenet.tiny")
    per_epoch = c.schedule.steps_per_epoch
    assert (c.schedule.name, per_epoch) == ("timm_cosine", 1_281_167 // 2048)
    assert (c.schedule.warmup_steps, c.schedule.decay_steps) == (10 * 625, 300 * 625)
    schedule = optim.make_schedule(c.schedule, c.optimizer.learning_rate)
    expected = _deit_epoch_lrs(2e-3, 10, 300, 1e-6, 1e-5)
    epochs = [0, 1, 2, 5, 10, 11, 12, 150, 298, 299, 300, 301, 302]
    for inside in (0, 1, 312, per_epoch - 1):
        steps = [e * per_epoch + inside for e in epochs]
        got = _values(schedule, steps)
        np.testing.assert_allclose(got, [expected[e] for e in epochs], rtol=1e-6, atol=0)
    assert float(schedule(0)) == float(schedule(2 * per_epoch - 1)) == np.float32(1e-6)
    jitted = jax.jit(schedule)
    np.testing.assert_allclose(float(jitted(7 * per_epoch + 5)), expected[7], rtol=1e-6)
    # Without warmup, epoch 0 trains at the peak, as the scheduler made with warmup_t 0 does.
    plain = optim.timm_cosine(
        1.0, steps_per_epoch=3, warmup_epochs=0, epochs=4, warmup_lr=0.0, min_lr=0.0
    )
    np.testing.assert_allclose(
        _values(plain, range(0, 21, 3)), _deit_epoch_lrs(1.0, 0, 4, 0.0, 0.0)[:7], atol=1e-7
    )


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            dict(steps_per_epoch=0),
            r"config.schedule.steps_per_epoch=0 must be an integer >= 1 with "
            r"schedule.name='timm_cosine'; set --config.schedule.steps_per_epoch",
        ),
        (
            dict(warmup_steps=15),
            r"config.schedule.warmup_steps=15 must be a whole number of epochs of "
            r"schedule.steps_per_epoch=10 steps with schedule.name='timm_cosine'; set "
            r"--config.schedule.warmup_steps to a multiple of 10",
        ),
        (
            dict(decay_steps=0),
            r"config.schedule.decay_steps=0 must be a whole number of epochs .* \(at least one\)",
        ),
        (
            dict(warmup_lr=-1.0),
            r"config.schedule.warmup_lr=-1.0 must be a finite number >= 0",
        ),
        (
            dict(name="cosine"),
            r"config.schedule.warmup_lr=1e-06 does nothing with schedule.name='cosine' .*set "
            r"--config.schedule.warmup_lr=0 or --config.schedule.name=timm_cosine",
        ),
    ],
)
def test_timm_cosine_settings_are_checked_naming_the_key(settings, expected):
    config = toy_config()
    config.schedule.update(
        name="timm_cosine", steps_per_epoch=10, warmup_steps=10, decay_steps=120, warmup_lr=1e-6
    )
    optim.check_optimizer_config(config)
    config.schedule.update(settings)
    with pytest.raises(ValueError, match=expected):
        optim.check_optimizer_config(config)
    with pytest.raises(ValueError, match=expected):
        optim.make_optimizer(config, {"w": nnx.Param(jnp.ones((2, 2)))})


def test_inverse_sqrt_schedule_is_fairseqs():
    schedule = optim.inverse_sqrt(2.0, warmup_steps=4)
    got = _values(schedule, [0, 1, 4, 16, 64])
    np.testing.assert_allclose(got, [0.0, 0.5, 2.0, 1.0, 0.5], atol=1e-6)


def test_constant_schedule_and_unknown_name():
    np.testing.assert_allclose(
        _values(optim.constant(3e-4, warmup_steps=2), [0, 1, 2, 9]),
        [0.0, 1.5e-4, 3e-4, 3e-4],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="schedule.name"):
        optim.make_schedule({"name": "linear"}, 1.0)


def _tiny_lm_params():
    lm = nnx.eval_shape(
        lambda: HGRNLM(
            LMConfig(vocab_size=11, features=8, num_layers=2, glu_expand=2), rngs=nnx.Rngs(0)
        )
    )
    return nnx.split(lm, nnx.Param, ...)[1]


def _flat_mask(mask) -> dict[str, bool]:
    return {
        "/".join(optim._path_names(path)).removesuffix("/value"): bool(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(mask)
    }


def test_weight_decay_mask_excludes_biases_norms_and_1d_params():
    params = _tiny_lm_params()
    assert all(_flat_mask(optim.weight_decay_mask(params, "all")).values())
    mask = _flat_mask(optim.weight_decay_mask(params, "no_bias_norm"))
    decayed = {k for k, v in mask.items() if v}
    assert "embed/embedding" in decayed
    assert "blocks/0/mixer/input_proj/kernel" in decayed
    assert "blocks/1/mlp/down_proj/kernel" in decayed
    for kept in [
        "blocks/0/mixer/input_proj/bias",
        "blocks/0/mixer/theta",
        "blocks/0/norm1/scale",
        "final_norm/bias",
        "lower_bounds/param",
    ]:
        assert mask[kept] is False, kept
    with pytest.raises(ValueError, match="weight_decay_mask"):
        optim.weight_decay_mask(params, "none")


def _opt_config(**optimizer):
    config = toy_config()
    config.optimizer.update(optimizer)
    config.schedule.update(name="constant", warmup_steps=0)
    return config


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            dict(name="adam", weight_decay=0.1),
            r"config.optimizer.weight_decay=0.1 does nothing with optimizer.name='adam' .*"
            r"set --config.optimizer.name=adamw",
        ),
        (
            dict(name="sgd", b1=0.5),
            r"config.optimizer.b1=0.5 is an Adam setting that optimizer.name='sgd' ignores "
            r"\(its momentum is optimizer.momentum.*set --config.optimizer.b1=0.9",
        ),
        (
            dict(name="sgd", b1=0.9, b2=0.999, eps=1e-6),
            r"config.optimizer.eps=1e-06 is an Adam setting",
        ),
        (
            dict(schedule="inverse_sqrt", min_lr=1e-5),
            r"config.schedule.min_lr=1e-05 does nothing with schedule.name='inverse_sqrt' .*"
            r"set --config.schedule.min_lr=0 or --config.schedule.name=cosine",
        ),
    ],
)
def test_optimizer_settings_the_choice_ignores_stop_the_run(settings, expected):
    """Adam with a weight decay, sgd with Adam's betas or eps, and a min_lr of a schedule that
    does not decay to one trained without them, silently."""
    config = toy_config()
    settings = dict(settings)
    config.schedule.name = settings.pop("schedule", config.schedule.name)
    if "min_lr" in settings:
        config.schedule.min_lr = settings.pop("min_lr")
    config.optimizer.update({"b2": 0.999, **settings})  # the toy config's b2 is 0.99
    with pytest.raises(ValueError, match=expected):
        optim.check_optimizer_config(config)
    with pytest.raises(ValueError, match=expected):
        optim.make_optimizer(config, {"w": nnx.Param(jnp.ones((2, 2)))})


def test_optimizer_settings_at_their_defaults_pass_with_any_choice():
    for name in optim.OPTIMIZERS:
        config = toy_config()
        config.optimizer.update(name=name, b2=0.999, weight_decay=0.0)
        for schedule in optim.SCHEDULES:
            config.schedule.update(name=schedule, warmup_steps=2, decay_steps=12)
            if schedule == "timm_cosine":
                config.schedule.steps_per_epoch = 2  # it has no default
            optim.check_optimizer_config(config)


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("optimizer.name", "sgdd", "adamw, adam, sgd, lamb"),
        ("optimizer.weight_decay_mask", "no_bias", "all, no_bias_norm, timm"),
        ("schedule.name", "cosin", "cosine, inverse_sqrt, constant, timm_cosine"),
    ],
)
def test_an_unknown_optimizer_or_schedule_stops_the_run_before_writing(
    tmp_path, key, value, choices
):
    """An unknown optimizer.name failed only when the state was built, after the run had
    written config.json (a corrected rerun then listed every key as changed)."""
    config = toy_config()
    section, name = key.split(".")
    config[section][name] = value
    expected = re.escape(f"unknown config.{key} {value!r}; set --config.{key} to one of {choices}")
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run", task=ToyTask(toy_config()))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "key, value, need",
    [
        ("optimizer.learning_rate", -1.0, "a finite number > 0"),
        ("optimizer.learning_rate", 0.0, "a finite number > 0"),
        ("optimizer.learning_rate", float("nan"), "a finite number > 0"),
        ("optimizer.learning_rate", float("inf"), "a finite number > 0"),
        ("optimizer.weight_decay", -0.1, "a finite number >= 0"),
        ("schedule.min_lr", -1e-5, "a finite number >= 0"),
        ("schedule.min_lr", float("inf"), "a finite number >= 0"),
        ("schedule.warmup_steps", -5, "an integer >= 0"),
    ],
)
def test_bad_learning_rates_stop_the_run_naming_the_key_before_writing(tmp_path, key, value, need):
    """A learning rate <= 0 or not finite, a negative min_lr, weight decay or warmup trained
    silently (lr -1 gave a val loss of 4e10); they are ValueErrors naming the key, the value and
    the fix, raised by make_optimizer and by train_and_evaluate before the workdir is touched."""
    config = toy_config()
    section, name = key.split(".")
    config[section][name] = value
    expected = re.escape(f"config.{key}={value} must be {need}; set --config.{key}")
    with pytest.raises(ValueError, match=expected):
        optim.make_optimizer(config, {"w": nnx.Param(jnp.ones((2, 2)))})
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run", task=ToyTask(toy_config()))
    assert not (tmp_path / "run").exists()
    optim.check_optimizer_config(toy_config())  # the valid config passes


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("seed", -1, r"config\.seed=-1 must be a whole number >= 0; set --config\.seed"),
        ("model.features", 0, r"config\.model\.features=0 must be .*; set --config\.model"),
    ],
)
def test_bad_seed_or_model_size_stops_the_run_naming_the_key_before_writing(
    tmp_path, key, value, expected
):
    """A negative seed failed in numpy naming no key, after config.json and a checkpoint folder
    were written; a zero width was a ZeroDivisionError traceback (exit 1, the NaN code)."""
    config = toy_config()
    *section, name = key.split(".")
    (config[section[0]] if section else config)[name] = value
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run", task=ToyTask(toy_config()))
    assert not (tmp_path / "run").exists()


def test_a_registered_task_s_zero_depth_stops_before_the_workdir(tmp_path):
    """model.num_layers=0 trained and evaluated, then failed saving a zero-size array and left a
    checkpoints/N.orbax-checkpoint-tmp; num_classes=0 (when ListOps did not derive it) was
    caught only once config.json was written, which then refused the corrected rerun."""
    config = importlib.import_module("experiments.configs.lra.listops").get_config("tiny")
    for key, value in (("num_layers", 0), ("num_classes", -1)):
        bad = config.copy_and_resolve_references()
        bad.model[key] = value
        with pytest.raises(ValueError, match=rf"config\.model\.{key}={value} must be a whole"):
            train_and_evaluate(bad, tmp_path / "run")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"mesh.data": 3}, r"config\.mesh \(data=3, fsdp=1, model=1\) needs 3 devices but"),
        ({"mesh.data": 2, "mesh.fsdp": 2}, r"needs 4 devices but this run has 8 devices"),
        ({"mesh.data": 0}, r"config\.mesh\.data=0 must be a whole number >= 1, or -1"),
        ({"mesh.model": -2}, r"config\.mesh\.model=-2 must be a whole number >= 1, or -1"),
        ({"mesh.fsdp": -1}, r"at most one axis may be -1"),
        ({"batch_size": 12}, r"config\.batch_size=12 does not split over the mesh's 8 batch"),
        (
            {"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2, "batch_size": 6},
            r"config\.batch_size=6 does not split over the mesh's 4 batch shards "
            r"\(config\.mesh\.data x fsdp = 2 x 2\); set --config\.batch_size to a multiple of 4",
        ),
        ({"eval_batch_size": 12}, r"config\.eval_batch_size=12 does not split .* multiple of 8"),
        ({"eval_batch_size": -8}, r"config\.eval_batch_size=-8 must be a whole number >= 0"),
        ({"optimizer.accumulate_steps": 3}, r"accumulate_steps=3 does not divide .*=32"),
        ({"optimizer.accumulate_steps": -2}, r"accumulate_steps=-2 must be a whole number"),
        (
            {"optimizer.accumulate_steps": 8},
            r"accumulate_steps=8 makes micro-batches of 4 rows \(config\.batch_size=32\), which "
            r"do not split over the mesh's 8 batch shards .*a divisor of 4 \(the rows of one",
        ),
        ({"model.mixer.sequence_axis": "seq"}, r"sequence_axis='seq' is not a mesh axis"),
        (
            {"model.mixer.sequence_axis": "model", "model.mixer.kind": "attention"},
            r"sequence_axis='model' needs a recurrent mixer: HGRN .* or HGRN2 .*; set "
            r"--config\.model\.mixer\.kind=hgrn or hgrn2, or leave --config\.model\.mixer\."
            r"sequence_axis unset",
        ),
        ({"dtype": "bf16"}, r"config\.dtype='bf16' is not an activation dtype; set --config"),
        ({"data.workers": -2}, r"config\.data\.workers=-2 must be a whole number >= 0, or -1"),
    ],
)
def test_bad_mesh_or_batch_sizes_stop_the_run_naming_the_key_before_writing(
    tmp_path, changes, expected
):
    """A mesh that did not fit the devices, a batch size that did not split over the data x
    fsdp shards, an unknown dtype or a sequence axis that was no mesh axis stopped the run only
    after config.json was written (the sequence axis at the first step, in jax's words); an
    eval batch size that did not split, at the first evaluation, after eval_every steps. Each
    is now a ValueError naming the key before the workdir is touched."""
    config = importlib.import_module("experiments.configs.lra.listops").get_config("tiny")
    config = config.copy_and_resolve_references()
    for key, value in changes.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mesh_check_resolves_sizes_and_counts_processes():
    """-1 takes the devices the other axes leave; a pod's processes must each feed their own
    rows, so data x fsdp must be a multiple of the process count."""
    from hgrn_jax.training.config_checks import check_mesh_and_batches

    config = toy_config()
    config.mesh.update(data=-1, fsdp=2, model=2)
    assert check_mesh_and_batches(config, num_devices=8, num_processes=2) == (2, 2, 2)
    config.mesh.update(data=2, fsdp=1, model=4)
    with pytest.raises(ValueError, match=r"2 batch shards .* over the 4 processes"):
        check_mesh_and_batches(config, num_devices=8, num_processes=4)


def test_mesh_check_takes_sequence_axis_for_hgrn_and_hgrn2_not_attention():
    """HGRN (both layouts: fla's HGRN splits its sequence too) and HGRN2 (both layouts);
    attention may not, and the error names the fix."""
    from hgrn_jax.training.config_checks import check_mesh_and_batches

    config = toy_config()
    config.mesh.update(data=4, fsdp=1, model=2)
    for kind in ("hgrn", "hgrn2"):
        for layout in ("official", "fla"):
            mixer = dict(kind=kind, layout=layout, sequence_axis="model")
            config.model.mixer = ml_collections.ConfigDict(mixer)
            assert check_mesh_and_batches(config, num_devices=8, num_processes=1) == (4, 1, 2)
    config.model.mixer = ml_collections.ConfigDict(dict(kind="attention", sequence_axis="model"))
    with pytest.raises(
        ValueError,
        match=r"needs a recurrent mixer: HGRN \(kind 'hgrn', either layout\) or HGRN2 .* not "
        r"kind 'attention' .*set --config\.model\.mixer\.kind=hgrn or hgrn2",
    ):
        check_mesh_and_batches(config, num_devices=8, num_processes=1)


def test_a_sequence_split_over_data_is_warned_of_when_the_batch_spans_fsdp():
    """With the batch over data x fsdp, a time axis split over data made XLA gather whole
    activations (28 "Involuntary full rematerialization" in the tiny LM's step on the
    2 x 2 x 2 mesh; none with sequence_axis fsdp or model, or with fsdp = 1)."""
    from hgrn_jax.training.config_checks import sharding_warnings

    config = toy_config()
    config.model.mixer = ml_collections.ConfigDict(dict(kind="hgrn", sequence_axis="data"))
    (line,) = sharding_warnings(config, 2)
    assert line.startswith("config.model.mixer.sequence_axis='data' with config.mesh.fsdp=2:")
    assert line.endswith(
        "set --config.model.mixer.sequence_axis=fsdp (it spans hosts too) "
        "or model, or --config.mesh.fsdp=1"
    )
    assert sharding_warnings(config, 1) == []
    for axis in ("fsdp", "model"):
        config.model.mixer.sequence_axis = axis
        assert sharding_warnings(config, 2) == []


def test_adamw_decays_only_masked_parameters():
    params = {"kernel": nnx.Param(jnp.ones((2, 2))), "bias": nnx.Param(jnp.ones((2,)))}
    tx, _ = optim.make_optimizer(
        _opt_config(learning_rate=0.1, weight_decay=0.5, weight_decay_mask="no_bias_norm"), params
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"][...], 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["bias"][...], 1.0, rtol=0)


def test_gradient_clipping_bounds_the_update():
    params = {"w": jnp.zeros((4,))}
    tx, _ = optim.make_optimizer(
        _opt_config(
            name="sgd",
            momentum=0.0,
            learning_rate=1.0,
            weight_decay=0.0,
            grad_clip_norm=2.0,
            b2=0.999,  # Adam's default (sgd refuses another)
        ),
        params,
    )
    updates, _ = tx.update({"w": jnp.full((4,), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 2.0, rtol=1e-6)


def _gradient_tree():
    keys = jax.random.split(jax.random.key(3), 4)
    return {
        "kernel": jax.random.normal(keys[0], (5, 7)),
        "bias": jax.random.normal(keys[1], (7,)) * 1e-3,
        "scale": jax.random.normal(keys[2], ()) * 10.0,
        "half": jax.random.normal(keys[3], (3, 2)).astype(jnp.bfloat16),
    }


def _norm_on(devices: int, fn, *args):
    """``fn(*args)`` and its jaxpr, under a mesh of ``devices`` devices (``jax.set_mesh``; JAX
    0.11 cannot run an array computation under a mesh of abstract devices)."""
    mesh = jax.make_mesh(
        (devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices]
    )
    with jax.set_mesh(mesh):
        return fn(*args), str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("devices", [1, 2], ids=["one device", "a mesh of two"])
def test_global_norm_is_the_norm_of_all_leaves_to_float32_rounding(devices):
    """Summed in float32, bfloat16 leaves included: the float64 norm to within float32 rounding
    of a few dozen additions (2e-7 relative). One device: one reduction over the concatenated
    leaves. A mesh of several devices: a reduction per leaf, so that no sharded leaf is
    gathered."""
    tree = _gradient_tree()
    exact = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    norm, jaxpr = _norm_on(devices, optim.global_norm, tree)
    assert norm.dtype == jnp.float32
    assert abs(float(norm) - exact) / exact < 2e-7
    if devices == 1:
        assert "concatenate" in jaxpr and jaxpr.count("reduce_sum") == 1
    else:
        assert "concatenate" not in jaxpr and jaxpr.count("reduce_sum") == len(tree)
    assert float(_norm_on(devices, optim.global_norm, {"only": jnp.full((4,), 2.0)})[0]) == 4.0


def test_clipping_keeps_optax_s_state_and_scaling():
    """Our clip_by_global_norm has optax's (empty) state, so checkpoints of runs with gradient
    clipping keep their structure, and scales the same way (to float32 rounding)."""
    grads = jax.tree.map(lambda x: x.astype(jnp.float32) * 100.0, _gradient_tree())
    ours, theirs = optim.clip_by_global_norm(1.5), optax.clip_by_global_norm(1.5)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    clipped, _ = ours.update(grads, ours.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    small = jax.tree.map(lambda x: x * 1e-4, grads)  # under the threshold: unchanged
    unchanged, _ = ours.update(small, ours.init(small))
    for got, want in zip(jax.tree.leaves(unchanged), jax.tree.leaves(small), strict=True):
        np.testing.assert_array_equal(got, want)


class _LinearTask:
    """Weighted least squares on fixed data: no BatchNorm or dropout, so accumulation is exact."""

    name, metric = "linear", "accuracy"

    def build_model(self, rngs):
        return nnx.Linear(3, 2, rngs=rngs)

    def loss_fn(self, model, batch, *, train):
        err = model(batch["x"]) - batch["y"]
        loss_sum = jnp.sum(jnp.sum(err**2, axis=-1) * batch["weight"])
        weight = jnp.sum(batch["weight"])
        return loss_sum / jnp.maximum(weight, 1.0), {"loss_sum": loss_sum, "weight": weight}


# Micro-batch j of 4 takes rows j, j+4, j+8, j+12 (steps._micro_batches). "unequal" gives them
# weights 4, 2, 0, 4: averaging their means equally reports a loss of 3.03 instead of 4.42.
# "zero" is a batch of weight 0: no loss, no gradient and no division by 0.
_ROW_WEIGHTS = {
    "uniform": np.ones(16, np.float32),
    "unequal": np.float32([1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]),
    "zero": np.zeros(16, np.float32),
}


@pytest.mark.parametrize("weights", sorted(_ROW_WEIGHTS))
def test_gradient_accumulation_matches_one_big_batch(weights):
    """One plain SGD step (no momentum: the update is lr times the gradient, so a gradient of
    the wrong scale moves the parameters by as much) with 4 micro-batches equals one with the
    whole batch: parameters, loss and gradient norm, for any row weights. So do both under
    float16's dynamic loss scaling (the gradient of loss * 2^15, unscaled by the optimizer)."""
    mesh = sharding.make_mesh(-1, 1, 1)
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(1.0, 1.0, size=(16, 3)).astype(np.float32),
        "y": rng.normal(size=(16, 2)).astype(np.float32),
        "weight": _ROW_WEIGHTS[weights],
    }
    params, metrics = [], []
    for k, make_tx in itertools.product(
        (1, 4), (lambda p: optax.sgd(0.1), lambda p: dynamic_loss_scale(optax.sgd(0.1)))
    ):
        task = _LinearTask()
        graphdef, tx, state, _ = create_train_state(task.build_model, make_tx, 0, mesh)
        step = jax.jit(
            make_train_step(graphdef, tx, task.loss_fn, optim.constant(0.1), accumulate_steps=k)
        )
        with jax.set_mesh(mesh):
            state, out = step(state, sharding.shard_batch(batch, mesh))
        params.append(jax.device_get(state.params))
        metrics.append(jax.device_get(out))
    # Both add the same 16 float32 row terms in another order: measured 3e-8 apart in the
    # parameters and 1e-7 (relative) in the loss and gradient norm; the tolerances leave 50x
    # for other summation orders. Equal micro-batch weights ("unequal": parameters 0.13 apart)
    # or a gradient 4x too large (0.96 apart) are far outside.
    for other_params, other_metrics in zip(params[1:], metrics[1:]):
        for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(other_params), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-6)
        for key in ("loss", "grad_norm", "loss_sum", "weight"):
            np.testing.assert_allclose(other_metrics[key], metrics[0][key], rtol=2e-6, atol=1e-6)


def test_create_train_state_inside_a_set_mesh_is_create_train_state_outside():
    """Under ``jax.set_mesh`` the train state comes out with the shardings and values it has
    with no mesh set (the same initialisation, so equal exactly)."""
    mesh = sharding.make_mesh(2, 2, 2)
    config = LMConfig(vocab_size=8, features=4, num_layers=1)

    def build(rngs: nnx.Rngs) -> HGRNLM:
        return HGRNLM(config, rngs=rngs)

    outside = create_train_state(build, lambda p: optax.adam(0.1), 0, mesh)
    with jax.set_mesh(mesh):
        inside = create_train_state(build, lambda p: optax.adam(0.1), 0, mesh)
    assert inside[0] == outside[0]
    leaves = jax.tree.leaves(outside[2])
    assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves)  # really sharded
    for x, y in zip(jax.tree.leaves(inside[2]), leaves, strict=True):
        assert x.sharding == y.sharding
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    tree = {"w": jnp.arange(3.0)}
    for mode, best in (("max", 2), ("min", 3)):
        checkpoints = Checkpoints(
            tmp_path / mode, keep=2, best_metric="val_accuracy", best_mode=mode
        )
        for step, value in zip(range(1, 6), [0.5, 0.9, 0.1, None, 0.3]):
            metrics = None if value is None else {"val_accuracy": value}
            checkpoints.save(step, jax.tree.map(lambda x: x * step, tree), {"step": step}, metrics)
        checkpoints.wait()
        assert checkpoints.all_steps() == sorted({best, 4, 5})
        assert checkpoints.best_step() == best
        restored, meta = checkpoints.restore(best, jax.eval_shape(lambda: tree))
        np.testing.assert_array_equal(restored["w"], np.arange(3.0) * best)
        assert meta == {"step": best}
        checkpoints.close()


def test_a_nan_evaluation_is_never_the_best_checkpoint(tmp_path):
    """A NaN at the first evaluation (a diverged evaluation) stayed the best: no comparison
    with NaN is true, so max() kept it, and Orbax's BestN kept it over the good ones. It now
    ranks last in either mode; an all-NaN run's best is its latest."""
    tree = {"w": jnp.arange(3.0)}
    nan = float("nan")
    for mode, values, best in (
        ("max", [nan, 0.4, 0.9, 0.1], 3),
        ("min", [nan, 3.0, 2.0, 5.0], 3),
        ("max", [nan, nan], 2),
    ):
        for keep in (len(values), 1):  # every checkpoint kept, or the latest and the best
            folder = tmp_path / f"{mode}{len(values)}-{keep}"
            checkpoints = Checkpoints(folder, keep=keep, best_metric="val_accuracy", best_mode=mode)
            for step, value in enumerate(values, 1):
                checkpoints.save(step, tree, {"step": step}, {"val_accuracy": value})
            checkpoints.wait()
            assert checkpoints.best_step() == best, (mode, values, keep)
            kept = range(1, len(values) + 1) if keep > 1 else {best, len(values)}
            assert checkpoints.all_steps() == sorted(kept), (mode, values, keep)
            checkpoints.close()


def test_a_nan_validation_metric_is_warned_of_and_not_taken_as_the_best(tmp_path, monkeypatch):
    """A NaN evaluation at step 6 of a run (finite training loss) ended without a word, and
    step 6 could be taken as the best checkpoint: it is warned of and ranked last."""
    from hgrn_jax.training.loop import NonFiniteValidationWarning

    real = Run.evaluate

    def evaluate(self, state, split):
        result = real(self, state, split)
        if split == "val" and int(jax.device_get(state.step)) == 6:
            result = dict(result, accuracy=float("nan"))
        return result

    monkeypatch.setattr(Run, "evaluate", evaluate)
    config = toy_config()
    with pytest.warns(NonFiniteValidationWarning, match=r"^step 6: the validation accuracy is nan"):
        results = train_and_evaluate(config, tmp_path, task=ToyTask(config))
    assert results["best_step"] == 12


@pytest.mark.slow
def test_evaluation_is_exact_whatever_the_eval_batch_size(tmp_path):
    """20 examples in batches of 8 or 24 (padded, masked rows) give the numbers of one
    unpadded pass over the split."""
    results = []
    for batch_size in (8, 24):
        config = toy_config()
        config.batch_size = batch_size
        run = Run(config, tmp_path / str(batch_size), ToyTask(config))
        results.append(run.evaluate(run.state, "val"))
    model = merge_model(run.graphdef, run.state.params, run.state.model_state)
    model.eval()
    examples = toy_examples(1, 20)
    logits = model(jnp.asarray(examples["inputs"]))
    correct = np.asarray(jnp.argmax(logits, -1)) == examples["labels"]
    accuracy = 100.0 * correct.sum() / correct.size
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, examples["labels"]).mean())
    for result in results:
        assert result["accuracy"] == accuracy
        assert result["loss"] == pytest.approx(loss, rel=1e-6)


def test_tasks_by_module_path_and_a_clear_error_for_a_wrong_one():
    config = toy_config()
    assert isinstance(resolve_task(config), ToyTask)  # config.task = "toy_task:make_task"
    config.task = "toy_task:no_such_factory"
    with pytest.raises(ValueError, match="cannot import 'no_such_factory' from 'toy_task'"):
        resolve_task(config)


def _user_module(monkeypatch, **members) -> str:
    """A module ``user_tasks`` holding ``members``, importable for ``config.task``."""
    module = types.ModuleType("user_tasks")
    module.__dict__.update(members)
    monkeypatch.setitem(sys.modules, "user_tasks", module)
    return "user_tasks"


class _NoEvalTask:
    """Everything of a task but ``eval_batches``."""

    name, metric = "no_eval", "accuracy"

    def __init__(self, config):
        self.toy = ToyTask(config)
        self.build_model, self.train_batches = self.toy.build_model, self.toy.train_batches
        self.loss_fn = self.toy.loss_fn


class _F1Task(ToyTask):
    metric = "f1"


@pytest.mark.parametrize(
    "member, expected",
    [
        (_NoEvalTask, r"'user_tasks:factory' gave a _NoEvalTask without eval_batches; a task"),
        (lambda config: None, r"gave a NoneType without build_model, .*, name, metric"),
        (_F1Task, r"gave a task whose metric is 'f1'; set its metric to 'accuracy' or 'perp"),
        (42, r"'user_tasks:factory' is an int that cannot be called with the config alone"),
        (lambda: ToyTask(toy_config()), r"is a function that cannot be called with the config"),
    ],
)
def test_a_module_factory_that_is_no_task_factory_stops_at_once(
    monkeypatch, tmp_path, member, expected
):
    """A factory's object without a Task member failed with an AttributeError only once the
    model was built (or, for eval_batches, compiled); a metric other than accuracy/perplexity
    after the first eval_every steps; a factory that could not be called with the config
    (a Dataset, a task class) in a TypeError traceback. Each is now one ValueError naming
    config.task and the protocol, before a step."""
    config = toy_config()
    config.task = _user_module(monkeypatch, factory=member) + ":factory"
    with pytest.raises(ValueError, match=expected):
        resolve_task(config)
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("no_such_package.tasks:make_task", r"cannot import 'make_task' .*folder on PYTHONPATH"),
        ("partiy", r"unknown config\.task 'partiy'; set --config\.task to one of listops, .*"),
    ],
)
def test_a_task_that_cannot_be_found_stops_before_the_workdir(tmp_path, name, expected):
    """config.json was written before the import failed or the name was looked up."""
    config = toy_config()
    config.task = name
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _worked_example_config(monkeypatch):
    """The tiny ListOps config on docs/tasks.md's parity module, imported as parity_example
    (outside the package), as ``config.task="parity_example:DATASET"``."""
    doc = (REPO / "docs" / "tasks.md").read_text()
    code = re.search(r"```python\n# hgrn_jax/tasks/parity.py\n(.*?)```", doc, re.S).group(1)
    module = types.ModuleType("parity_example")
    monkeypatch.setitem(sys.modules, "parity_example", module)
    exec(compile(code, "docs/tasks.md", "exec"), module.__dict__)
    config = importlib.import_module("experiments.configs.lra.listops").get_config("tiny")
    config = config.copy_and_resolve_references()
    config.task = "parity_example:DATASET"
    config.data.source, config.model.vocab_size, config.model.num_classes = "synthetic", 0, 2
    return config


def test_the_worked_example_of_docs_tasks_md_loads_as_module_dataset(monkeypatch, tmp_path):
    """docs/tasks.md's parity module, kept outside the package, trains through
    config.task="module:DATASET" (calling its Dataset was a TypeError traceback)."""
    config = _worked_example_config(monkeypatch)
    task = resolve_task(config)
    assert task.name == "parity" and task.config.model.vocab_size == 3
    batch = next(task.eval_batches("val"))
    assert np.array_equal(batch["labels"], (batch["inputs"] == 2).sum(axis=1) % 2)


@pytest.mark.slow  # two runs and an evaluation: 6.5 s on 2 loaded cores
def test_the_own_task_example_of_docs_tasks_md_trains_resumes_and_evaluates(monkeypatch, tmp_path):
    """docs/tasks.md's task without a Dataset (``my_parity_task``, its config included) as a
    user runs it: trained, resumed for more steps, then its best checkpoint evaluated from
    Python as the doc's "From Python" says, through ``tasks.get_task`` (which refused a
    ``module:factory`` task) and ``load_trained_model``, giving results.json's test accuracy."""
    from hgrn_jax import tasks
    from hgrn_jax.training import load_trained_model

    doc = (REPO / "docs" / "tasks.md").read_text()
    code = re.search(r"```python\n(# my_parity_task\.py: .*?)```", doc, re.S).group(1)
    module = types.ModuleType("my_parity_task")
    monkeypatch.setitem(sys.modules, "my_parity_task", module)
    exec(compile(code, "docs/tasks.md", "exec"), module.__dict__)
    config = module.get_config()
    config.batch_size, config.data.seq_len, config.model.num_layers = 8, 16, 1
    config.num_train_steps = config.eval_every = config.checkpoint_every = 2
    config.schedule.warmup_steps, config.schedule.decay_steps, config.epochs = 1, 4, 0
    train_and_evaluate(config, tmp_path / "run")
    config.num_train_steps = 4
    with pytest.warns(ConfigChangeWarning, match="num_train_steps: 2 -> 4"):
        result = train_and_evaluate(config, tmp_path / "run")
    assert result["steps"] == 4
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    model, saved = load_trained_model(tmp_path / "run")
    task = tasks.get_task(saved)
    sums = [task.loss_fn(model, batch, train=False)[1] for batch in task.eval_batches("test")]
    accuracy = 100 * sum(s["correct"] for s in sums) / sum(s["weight"] for s in sums)
    assert float(accuracy) == pytest.approx(report["test"])


def test_a_module_dataset_tasks_model_rules_are_checked_before_the_workdir_is_written(
    monkeypatch, tmp_path
):
    """A ``module:DATASET`` task gets the registry's early checks: a mixer option its model
    cannot take stopped the run only after config.json was written (found by a user review)."""
    config = _worked_example_config(monkeypatch)
    with config.unlocked():
        config.model.mixer.expand_ratio = 5
    with pytest.raises(ValueError, match="expand_ratio"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_data_source_named_is_the_one_the_task_reads(monkeypatch):
    """A factory's task (which reads what it reads) was said to read the ``data.source`` its
    config carried over (``task myparity: data source 'generated'``); it names none now, unless
    it has a ``data_source`` of its own. A ``module:DATASET`` and the registry's tasks read
    ``data.source``."""
    from hgrn_jax.training.task_choice import data_source

    config = _listops_tiny()  # data.source "generated"
    assert data_source(config, None) == "generated"
    config.task = _user_module(monkeypatch, factory=ToyTask) + ":factory"
    assert data_source(config, ToyTask(toy_config())) is None
    named = types.SimpleNamespace(data_source="my_files")
    assert data_source(config, named) == "my_files"
    module = types.ModuleType("dataset_module")
    module.DATASET = importlib.import_module("hgrn_jax.tasks.registry").DATASETS["listops"]
    monkeypatch.setitem(sys.modules, "dataset_module", module)
    config.task, config.data.source = "dataset_module:DATASET", "synthetic"
    assert data_source(config, None) == "synthetic"


class _LossFnTask(ToyTask):
    """The toy task with its loss_fn's output passed through ``self.change``."""

    def __init__(self, config, change):
        super().__init__(config)
        self.change = change

    def loss_fn(self, model, batch, *, train: bool):
        return self.change(*super().loss_fn(model, batch, train=train))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda loss, sums: loss, r"loss_fn returned an array of shape \(\) and dtype float32;"),
        (lambda loss, sums: (loss * jnp.ones(8), sums), r"as its loss an array of shape \(8,\)"),
        (lambda loss, sums: (loss, [sums]), r"loss_fn returned as its sums a list;"),
        (lambda loss, sums: (loss, {**sums, "correct": jnp.ones(3)}), r"sums\['correct'\] an"),
        (
            lambda loss, sums: (loss, {"loss_sum": sums["loss_sum"], "weight": sums["weight"]}),
            r"returned sums without 'correct'; return \(mean loss: a float scalar, sums: a dict "
            r"of scalars with 'loss_sum', 'weight', 'correct'\)",
        ),
    ],
)
def test_a_loss_fn_of_the_wrong_structure_stops_at_the_first_step(tmp_path, change, expected):
    """A bare loss or a per-example loss was a TypeError traceback from jax (exit 1, the NaN
    code); missing 'weight' a bare KeyError, missing 'correct' one after eval_every steps."""
    config = toy_config()
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path, task=_LossFnTask(config, change))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


BROKEN_LOSS = """\
import jax.numpy as jnp
from toy_task import ToyTask


class BrokenLoss(ToyTask):
    def loss_fn(self, model, batch, *, train):
        logits = model(batch["inputs"])
        jnp.take_along_axis(logits, batch["labels"], axis=-1)  # labels (B,), logits (B, C)
        return super().loss_fn(model, batch, train=train)


def make_task(config):
    return BrokenLoss(config)
"""


def test_a_value_error_in_the_user_s_task_module_names_its_line(monkeypatch, tmp_path):
    """The runner prints a ValueError as one line; one raised by JAX under a user's loss_fn
    named no file (``indices and arr must have the same number of dimensions; 2 vs. 1``). The
    line now ends with the innermost frame of the user's code; a ValueError of the package's
    own (the loss's structure check) gets none."""
    from experiments import cli

    (tmp_path / "tasks").mkdir()
    module = tmp_path / "tasks" / "broken_loss.py"
    module.write_text(BROKEN_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path / "tasks"))
    config = toy_config()
    config.task = "broken_loss:make_task"
    with pytest.raises(ValueError, match="same number of dimensions") as caught:
        train_and_evaluate(config, tmp_path / "run")
    # As experiments.train catches it: without this test's own frame.
    error = caught.value.with_traceback(caught.value.__traceback__.tb_next)
    line = next(i for i, text in enumerate(BROKEN_LOSS.splitlines(), 1) if "take_along" in text)
    assert cli.where_raised(error) == f" (raised in {module}:{line} in loss_fn)"

    config = toy_config()
    task = _LossFnTask(config, lambda loss, sums: loss)
    with pytest.raises(ValueError, match="loss_fn returned an array") as caught:
        train_and_evaluate(config, tmp_path / "run2", task=task)
    assert cli.where_raised(caught.value.with_traceback(caught.value.__traceback__.tb_next)) == ""


@pytest.mark.slow  # experiments.train in a subprocess: 5-12 s
def test_the_runner_s_one_line_error_names_the_user_s_line(tmp_path):
    """What experiments.train prints for the ValueError of the test above."""
    (tmp_path / "broken_loss.py").write_text(BROKEN_LOSS)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run(
        _train_command(tmp_path / "run", "--config.task=broken_loss:make_task"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next(i for i, text in enumerate(BROKEN_LOSS.splitlines(), 1) if "take_along" in text)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(
        f"dimensions; 1 vs. 2 (raised in {tmp_path / 'broken_loss.py'}:{line} in loss_fn) "
        "(rerun with --traceback for details)"
    )


class _ShortBatchTask(ToyTask):
    """Yields one row too few from step ``short_from`` on."""

    short_from = 0

    def train_batches(self, start_step, process_index=0, process_count=1):
        for step, batch in enumerate(
            super().train_batches(start_step, process_index, process_count)
        ):
            short = start_step + step >= self.short_from
            yield {k: v[:-1] for k, v in batch.items()} if short else batch


@pytest.mark.parametrize("short_from", [0, 4])
def test_training_batches_of_the_wrong_size_stop_the_run(tmp_path, short_from):
    """Batches of 7 rows for batch_size 8 trained silently on 7."""
    config = toy_config()
    task = _ShortBatchTask(config)
    task.short_from = short_from
    expected = (
        r"the train_batches of task 'toy' \(config\.batch_size=8 over 1 process\) yielded "
        r"batch\['inputs'\] with 7 rows, not 8; yield 8 rows per array"
    )
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path, task=task)


class _EvalBatchTask(ToyTask):
    """Changes evaluation batch ``bad_index`` of every split with ``change``."""

    bad_index = 0
    change = staticmethod(lambda batch: batch)

    def eval_batches(self, split, process_index=0, process_count=1):
        for index, batch in enumerate(super().eval_batches(split, process_index, process_count)):
            yield self.change(dict(batch)) if index == self.bad_index else batch


EVAL_BATCH_FAULTS = {
    # 7 rows cannot split over the 8 batch shards of the 8 simulated devices.
    "rows that do not split": (
        lambda b: {k: v[:7] for k, v in b.items()},
        r"yielded batch {i} whose \['inputs'\] has shape \(7, 8\): 7 rows per process x 1 "
        r"process do not split over the mesh's 8 batch shards.*; yield a multiple of 8 rows",
    ),
    # A weight of 1 row broadcast over the batch: every row weighted like the first.
    "arrays that disagree in rows": (
        lambda b: {**b, "weight": b["weight"][:1]},
        r"yielded batch {i} whose \['weight'\] has shape \(1,\), 1 rows where "
        r"\['inputs'\] has 8; give every array of a batch the same rows",
    ),
    "a key the train batches lack": (
        lambda b: {**b, "extra": b["labels"]},
        r"yielded batch {i} with \['extra'\], which the train batches do not have \(they "
        r"have \['inputs'\], \['labels'\], \['scale'\], \['weight'\]\); yield the arrays",
    ),
    # Allowed until loss_fn reads it (ImageNet's eval batches lack the train-only soft targets):
    # caught at the first evaluation, where it was a KeyError traceback from inside jax.
    "a key of the train batches missing": (
        lambda b: {k: v for k, v in b.items() if k != "scale"},
        r"yielded batch {i} without \['scale'\], which the train batches have and loss_fn "
        r"reads; yield it in evaluation batches too",
    ),
    # Longer sequences: the model mean-pools, so they evaluated another input size silently.
    "another shape than the train batches'": (
        lambda b: {**b, "inputs": np.concatenate([b["inputs"], b["inputs"]], axis=1)},
        r"yielded batch {i} whose \['inputs'\] has shape \(8, 16\); the train batches' is "
        r"\(8, 8\) \(rows, 8\): yield the same shape after the batch axis",
    ),
}


@pytest.mark.parametrize("fault", list(EVAL_BATCH_FAULTS))
@pytest.mark.parametrize("bad_index", [0, 2])
def test_evaluation_batches_of_the_wrong_layout_stop_the_run(tmp_path, fault, bad_index):
    """A user task's evaluation batch that does not split over the mesh (was a shard_batch
    error naming neither the task, the split nor the batch, at the first evaluation), whose
    arrays disagree in rows (a broadcast weight evaluated silently), or whose keys or shapes
    differ from the train batches' (evaluated silently, or a KeyError traceback) stops the run
    with one line naming the task, the split, the batch, the array and its shape: the first
    batch before training (preflight), a later one at the evaluation that reads it."""
    config = toy_config()
    config.num_train_steps = 2
    config.eval_every = 2
    task = _EvalBatchTask(config)
    task.bad_index = bad_index
    change, expected = EVAL_BATCH_FAULTS[fault]
    task.change = change
    pattern = r"the 'val' eval_batches of task 'toy' " + expected.format(i=bad_index)
    with pytest.raises(ValueError, match=pattern) as caught:
        train_and_evaluate(config, tmp_path, task=task)
    assert "\n" not in str(caught.value)
    metrics = tmp_path / "metrics.jsonl"
    trained = metrics.exists() and '"loss"' in metrics.read_text()
    # A bad first batch stops the run before training (but a missing key only where it is read).
    assert trained == (bad_index > 0 or fault == "a key of the train batches missing")


class _FiniteTask(ToyTask):
    """Training batches for ``length`` steps only."""

    length = 0

    def train_batches(self, start_step, process_index=0, process_count=1):
        batches = super().train_batches(start_step, process_index, process_count)
        return itertools.islice(batches, self.length)


@pytest.mark.parametrize("length", [0, 3])
def test_training_batches_that_end_stop_the_run_naming_the_protocol(tmp_path, length):
    """A train_batches iterator that ran out was a bare StopIteration traceback (exit code 1,
    the NaN code)."""
    config = toy_config()
    task = _FiniteTask(config)
    task.length = length
    expected = rf"the train_batches of task 'toy' .* ended after {length} batches; yield one"
    with pytest.raises(ValueError, match=expected):
        train_and_evaluate(config, tmp_path, task=task)


# ----------------------------------------------------------------------------------------------
# Runs in this process: NaN stop, corrupt checkpoint fallback
# ----------------------------------------------------------------------------------------------


def _checkpoint_params(workdir: Path, step: int) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def test_nan_loss_stops_with_the_step_and_writes_no_nan_checkpoint(tmp_path):
    config = toy_config()
    config.data.nan_at_step = 7
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) <= 7
    for step in steps:
        assert all(np.isfinite(x).all() for x in _checkpoint_params(tmp_path, step))
    assert not (tmp_path / "results.json").exists()
    # The stop is recorded: the report said only "stopped" (and a NaN step is never logged).
    from experiments import runs

    (unfinished,) = runs.find_unfinished([tmp_path])
    assert re.fullmatch(r"stopped at \S+: NonFiniteLossError: .*at step 7.*", unfinished.state)


def test_a_nan_loss_before_any_update_blames_the_task_not_the_learning_rate(tmp_path):
    """At step 0 no update has been made: the loss of the initial parameters is NaN, so the
    task's loss_fn or its data give it. The message said to lower the learning rate."""
    config = toy_config()
    config.data.nan_at_step = 0
    with pytest.raises(NonFiniteLossError) as raised:
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    assert str(raised.value) == (
        "the training loss or gradient was NaN/inf at step 0, before any update; stopping (no "
        "checkpoint was saved before it). The task's loss_fn or its data give it (a NaN or inf "
        "in the inputs, a log of 0, a division by 0), not the learning rate"
    )


def test_time_budget_ends_the_run_like_its_last_step_and_a_rerun_trains_no_more(tmp_path):
    config = toy_config()
    config.data.sleep_per_step = 0.2
    config.max_train_time_s = 1.0  # the first step's compilation counts too
    results = train_and_evaluate(config, tmp_path, task=ToyTask(config))
    done = results["steps"]
    assert 1 <= done < config.num_train_steps and results["stopped_by"] == "time budget"
    assert results["wall_time_s"] >= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    # The step that noticed was evaluated and checkpointed as a last step would be.
    assert val[-1]["step"] == done and (tmp_path / "checkpoints" / str(done)).is_dir()
    assert all(r["wall_time_s"] > 0 for r in records if r["split"] in ("train", "val"))
    assert [r["step"] for r in records if r["split"] == "test"] == [done]
    assert json.loads((tmp_path / "results.json").read_text())["stopped_by"] == "time budget"
    # The same command again: the budget is spent, so no step is trained; the test is redone.
    again = train_and_evaluate(config, tmp_path, task=ToyTask(config))
    assert again["steps"] == done and again["test"] == results["test"]
    assert again["best_val"] == results["best_val"]
    assert _logged_steps(tmp_path)["train"] == [r["step"] for r in records if r["split"] == "train"]
    assert _logged_steps(tmp_path)["test"] == [done]  # tested again in place
    assert not list(tmp_path.glob("results-step*"))
    with pytest.raises(ValueError, match=r"config.max_train_time_s=-1.0 must be 0"):
        config.max_train_time_s = -1.0
        check_run_lengths(config)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.dropout", 1.5, r"config\.model\.dropout=1\.5 must be a dropout rate in \[0, 1\)"),
        ("model.dropout", -0.1, r"config\.model\.dropout=-0\.1 must be a dropout rate"),
        ("keep_checkpoints", 0, r"config\.keep_checkpoints=0 must be at least 1"),
        ("keep_checkpoints", -1, r"config\.keep_checkpoints=-1 must be at least 1"),
    ],
)
def test_out_of_range_dropout_and_kept_checkpoints_are_refused(key, value, message):
    """A dropout rate of 1.5 or -0.1 trained (the first to 11.7% validation accuracy against
    19.5%), and keep_checkpoints 0 or -1 quietly meant 1 (a user's review)."""
    from hgrn_jax.training.config_checks import check_config_values

    config = toy_config()
    config.model.dropout = 0.0
    check_config_values(config)
    section, name = (config.model, "dropout") if key == "model.dropout" else (config, key)
    section[name] = value
    with pytest.raises(ValueError, match=message):
        check_config_values(config)


def test_a_first_ctrl_c_asks_for_a_stop_and_a_second_or_a_late_one_interrupts(capfd):
    """A Ctrl-C used to raise KeyboardInterrupt wherever training was, losing the steps since
    the last checkpoint. The first one in the training loop now asks for a stop after the
    step, as SIGTERM does, and says so at once; the second, or one before or after the loop
    (nothing to save yet, or nothing left), interrupts."""
    from hgrn_jax.training import preemption

    assert threading.current_thread() is threading.main_thread()  # handlers need it
    before = signal.getsignal(signal.SIGINT)
    with preemption.StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # start-up: data preparation, compilation
        assert not stop.requested
        stop.training(True)
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        assert capfd.readouterr().err == (
            "\ninterrupted (SIGINT): stopping after this step and saving a checkpoint; press "
            "Ctrl-C again to stop at once (the last complete checkpoint is kept)\n"
        )
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with preemption.StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"  # also before the loop
        stop.training(True)
        stop.training(False)
        signal.raise_signal(signal.SIGTERM)  # noted only: the preemption's grace period runs
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. `train ... &` in a shell script
    try:
        with preemption.StopSignals() as stop:
            stop.training(True)
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert str(preemption.Preempted(4, "w", signal_name="SIGINT")) == (
        "interrupted (SIGINT): saved a checkpoint at step 4 in w; run the same command again to "
        "resume"
    )


INTERRUPTED_AT_ONCE = """
import sys
from hgrn_jax.training import loop

def interrupted(config, workdir, on_checked=None):
    raise KeyboardInterrupt  # a second Ctrl-C, or one during the test evaluation

loop.train_and_evaluate = interrupted
sys.argv = ["train", f"--config={sys.argv[1]}", f"--workdir={sys.argv[2]}"]
from experiments import train
train.run()
"""


@pytest.mark.slow  # experiments.train imported in a subprocess: 5-12 s
def test_a_run_interrupted_at_once_says_so_in_one_line_and_ends_by_sigint(tmp_path):
    """Ended by SIGINT after Python's clean-up (not sys.exit), so that the shell loop or script
    running it stops too; no traceback."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_AT_ONCE)
    proc = subprocess.run(
        [sys.executable, str(script), str(TOY_CONFIG), str(tmp_path / "run")],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert proc.stderr.strip() == (
        "interrupted (SIGINT): stopped at once; the last complete checkpoint is kept, and "
        "running the same command again resumes from it"
    )


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_config_loads_stops_in_one_line(tmp_path, signal_name):
    """Before the run installs its handlers (the config file loading, JAX importing: the first
    seconds), a Ctrl-C printed a KeyboardInterrupt traceback and a SIGTERM ended the process
    without a word. Both now print one line and end by their signal. The config file here
    signals its own process while it loads."""
    config_file = tmp_path / "signalling_config.py"
    config_file.write_text(
        f"import os, signal, time\nos.kill(os.getpid(), signal.{signal_name})\ntime.sleep(30)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--config={config_file}", "--workdir=run"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    name = "interrupted" if signal_name == "SIGINT" else "terminated"
    assert proc.returncode == -getattr(signal, signal_name), proc.stderr
    assert proc.stderr.strip() == (
        f"{name} ({signal_name}): stopped at once; the last complete checkpoint is kept, and "
        "running the same command again resumes from it"
    )
    assert not (tmp_path / "run").exists()


def test_preemption_message_says_how_to_resume_a_run_started_with_restart(tmp_path, monkeypatch):
    """Under --config.resume=restart the message said "run the same command again to resume",
    which moved the run aside and started again at step 0 (a requeued job started over at
    every preemption). It now says --config.resume=auto, and that command resumes."""
    from hgrn_jax.training import preemption
    from hgrn_jax.training.workdir import ConfigChangeWarning

    assert str(preemption.Preempted(4, "w")).endswith("run the same command again to resume")
    real = preemption.stop_requests
    monkeypatch.setattr(preemption, "stop_requests", lambda done, p, o: real(done, done == 4, o))
    config = toy_config()
    config.resume = "restart"
    with pytest.raises(preemption.Preempted) as preempted:
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    message = str(preempted.value)
    assert message.startswith(f"preempted (SIGTERM): saved a checkpoint at step 4 in {tmp_path}")
    assert "run the command again with --config.resume=auto" in message
    assert "--config.resume=restart, would move this run aside and start again at step 0" in message
    assert "run the same command again to resume" not in message
    monkeypatch.setattr(preemption, "stop_requests", real)
    config.resume = "auto"  # what the message says: resumes at step 4, nothing moved aside
    with pytest.warns(ConfigChangeWarning, match="resume: 'restart' -> 'auto'"):
        assert train_and_evaluate(config, tmp_path, task=ToyTask(config))["steps"] == 12
    assert _logged_steps(tmp_path)["train"] == [2, 4, 6, 8, 10, 12]
    assert not list(tmp_path.glob("previous-*"))


def _train_records(workdir: Path) -> list[dict]:
    """The train records of ``workdir``'s metrics.jsonl without their timings."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    timings = ("steps_per_sec", "wall_time_s")
    return [
        {k: v for k, v in r.items() if k not in timings} for r in records if r["split"] == "train"
    ]


def test_a_train_record_is_the_steps_mean_loss_and_their_pooled_accuracy():
    """A record's loss is the mean of its steps' losses, its accuracy the steps' correct rows
    over their weighted rows (not each step's accuracy averaged), its rate and gradient norm
    the last step's. (The resume test below compares a run with itself: it cannot see a wrong
    formula.)"""
    from hgrn_jax.training.train_window import TrainWindow

    window = TrainWindow()
    for loss, lr, correct, weight in ((1.0, 0.1, 3, 4), (3.0, 0.2, 1, 1)):
        step = dict(loss=loss, lr=lr, grad_norm=10 * lr, correct=correct, weight=weight)
        window.add({k: np.float32(v) for k, v in step.items()})
    record = window.record(with_accuracy=True)
    assert record == pytest.approx(dict(loss=2.0, lr=0.2, grad_norm=2.0, accuracy=80.0))
    assert window.steps == []


def test_a_train_record_after_a_resume_averages_the_steps_before_the_stop(tmp_path, monkeypatch):
    """A record averages the steps since the one before (log_every=2: steps 3 and 4 for the
    record at 4). A run preempted at step 3 resumed with step 3 forgotten: its record at 4 was
    step 4's loss and accuracy alone. The checkpoint now keeps the window (step 3's float32
    loss and counts), and every train record equals the uninterrupted run's, bit for bit."""
    from hgrn_jax.training import preemption

    config = toy_config()
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_and_evaluate(config, reference, task=ToyTask(config))
    real = preemption.stop_requests
    monkeypatch.setattr(preemption, "stop_requests", lambda done, p, o: real(done, done == 3, o))
    with pytest.raises(preemption.Preempted, match="saved a checkpoint at step 3"):
        train_and_evaluate(config, run, task=ToyTask(config))
    meta = json.loads((run / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert [sorted(m) for m in meta["train_window"]["steps"]] == [["correct", "loss", "weight"]]
    monkeypatch.setattr(preemption, "stop_requests", real)
    train_and_evaluate(config, run, task=ToyTask(config))
    expected = _train_records(reference)
    assert [r["step"] for r in expected] == [2, 4, 6, 8, 10, 12]
    assert _train_records(run) == expected


def test_a_malformed_train_window_in_a_checkpoint_is_named():
    from hgrn_jax.training.integrity import CheckpointError
    from hgrn_jax.training.train_window import TrainWindow

    assert TrainWindow.from_meta({"step": 3}, "ckpt/3").steps == []
    with pytest.raises(CheckpointError, match=r"^ckpt/3: its meta's 'train_window' is malformed"):
        TrainWindow.from_meta({"train_window": {"steps": [{"loss": 1.0}]}}, "ckpt/3")


def test_training_wall_time_starts_once_the_input_is_open(tmp_path, monkeypatch):
    """Opening the data (tokenising a set afresh, or reading one an earlier run prepared) is
    not training time: a 1000 s open leaves the budget and the records' wall times alone."""
    from hgrn_jax.training import loop

    real_time, offset = time.time, [0.0]
    monkeypatch.setattr(loop.time, "time", lambda: real_time() + offset[0])
    real_open = loop.preflight.open_splits

    def slow_open(*args, **kwargs):
        opened = real_open(*args, **kwargs)
        offset[0] += 1000.0
        return opened

    monkeypatch.setattr(loop.preflight, "open_splits", slow_open)
    config = toy_config()
    config.max_train_time_s = 900.0
    results = train_and_evaluate(config, tmp_path, task=ToyTask(config))
    assert results["steps"] == config.num_train_steps
    assert results.get("stopped_by") != "time budget"
    assert 0 < results["wall_time_s"] < 900
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["wall_time_s"] < 900 for r in records if r["split"] in ("train", "val"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """A complete toy run in this process (8 devices, as the subprocess runs use)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    config = toy_config()
    return workdir, train_and_evaluate(config, workdir, task=ToyTask(config))


def _truncate_checkpoint(workdir: Path, step: int) -> None:
    """Cut every data file of checkpoint ``step`` to a third, as a crash mid-write would."""
    for path in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    reference, reference_results = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _truncate_checkpoint(run, 12)
    config = toy_config()
    with pytest.warns(CheckpointFallbackWarning, match="step 12.*falling back"):
        results = train_and_evaluate(config, run, task=ToyTask(config))
    # Training resumed at step 9, redid steps 10-12 and reached the same parameters.
    _assert_same_final_params(run, reference)
    assert results["test"] == reference_results["test"]
    assert results["best_val"] == reference_results["best_val"]
    # Records of the lost steps were replaced, not duplicated; the record at 10 averages steps
    # 9 (kept in checkpoint 9) and 10, as the reference's does.
    assert _logged_steps(run) == _logged_steps(reference)
    assert _train_records(run) == _train_records(reference)


def test_a_float16_run_checkpoints_its_loss_scale_and_resumes_to_the_same_parameters(tmp_path):
    """config.dtype=float16 wraps the optimizer in dynamic loss scaling (test_loss_scale.py),
    whose state, the scale and the count of finite steps, is checkpointed with the optimizer's:
    a run that falls back from a corrupt last checkpoint to step 9 resumes the count there and
    ends with the uninterrupted run's parameters and count."""
    config = toy_config()
    config.dtype = "float16"
    reference, run = tmp_path / "reference", tmp_path / "run"
    train_and_evaluate(config, reference, task=ToyTask(config))
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_scale"] for r in records if r["split"] == "train"] == [2.0**15] * 6
    shutil.copytree(reference, run)
    _truncate_checkpoint(run, 12)
    with pytest.warns(CheckpointFallbackWarning, match="step 12.*falling back"):
        train_and_evaluate(config, run, task=ToyTask(config))
    _assert_same_final_params(run, reference)
    for workdir in (reference, run):
        state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "12" / "state")
        loss_scale = state["opt_state"]  # LossScaleState, restored as a dict
        assert (float(loss_scale["scale"]), int(loss_scale["good_steps"])) == (2.0**15, 12)


def test_float32_and_float16_checkpoints_cross_only_when_forced_keeping_the_optimizer(tmp_path):
    """A float16 run's optimizer state holds its loss scale, so crossing into or out of float16
    is a structural change (refused under resume=auto, naming the key). Forced, or on a float16
    run's checkpoint from before loss scaling, the checkpoint's parameters and optimizer state
    resume and the scale starts again, with a warning; the run then counts its finite steps
    from there (6 of the 12). Forced back to float32, the scale is dropped, with a warning, and
    Adam's state carries on."""
    config = toy_config()
    config.num_train_steps, config.schedule.decay_steps = 6, 6
    train_and_evaluate(config, tmp_path, task=ToyTask(config))
    config.num_train_steps, config.schedule.decay_steps, config.dtype = 12, 12, "float16"
    with pytest.raises(ConfigChangedError, match=r"dtype: 'float32' -> 'float16'"):
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    config.resume = "force"
    with (
        pytest.warns(LossScaleStartWarning, match=r"step 6 holds no float16 loss scale.*32768"),
        pytest.warns(ConfigChangeWarning, match=r"resume=force\): dtype: 'float32' -> 'float16'"),
    ):
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "12" / "state")
    loss_scale = state["opt_state"]
    assert (float(loss_scale["scale"]), int(loss_scale["good_steps"])) == (2.0**15, 6)
    assert int(loss_scale["inner"][0]["count"]) == 12  # Adam's, carried over from step 6

    config.num_train_steps, config.schedule.decay_steps, config.dtype = 18, 18, "float32"
    with (
        pytest.warns(LossScaleDroppedWarning, match=r"step 12 is a float16 run's.*\(32768\)"),
        pytest.warns(ConfigChangeWarning, match=r"dtype: 'float16' -> 'float32'"),
    ):
        train_and_evaluate(config, tmp_path, task=ToyTask(config))
    state = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "18" / "state")
    assert int(state["opt_state"][0]["count"]) == 18


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_run_writes_the_contract_files(uninterrupted):
    workdir, returned = uninterrupted
    results = json.loads((workdir / "results.json").read_text())
    assert results == pytest.approx(returned)
    assert {
        "task",
        "metric",
        "best_val",
        "test",
        "paper",
        "steps",
        "wall_time_s",
        "num_params",
        "devices",
        "process_count",
    } <= set(results)
    assert results["steps"] == 12 and results["devices"] == 8 and results["process_count"] == 1
    assert results["paper"] == 50.0 and results["metric"] == "accuracy"
    assert results["data_source"] is None  # a factory's task: it names none
    assert results["model_class"] == "toy_task.ToyModel"  # the report's own-model test
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_train_steps"] == 12 and config["optimizer"]["name"] == "adamw"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if r["split"] == "val"] == [6, 12]
    assert {"loss", "lr", "steps_per_sec", "accuracy"} <= set(records[0])
    assert records[-1]["split"] == "test" and records[-1]["accuracy"] == results["test"]
    assert any((workdir / "tensorboard").iterdir())
    # The latest 2 checkpoints and the best validation one are kept.
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-2:] == [9, 12] and results["best_step"] in kept


def _logged_steps(workdir: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["split"], []).append(record["step"])
    return steps


def _assert_same_final_params(workdir: Path, reference: Path) -> None:
    for a, b in zip(
        _checkpoint_params(reference, 12), _checkpoint_params(workdir, 12), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Subprocess runs of `python -m experiments.train`
# ----------------------------------------------------------------------------------------------


def _train_command(workdir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={TOY_CONFIG}",
        f"--workdir={workdir}",
        *overrides,
    ]


SLOW = ("--config.data.sleep_per_step=0.25",)


def _run(workdir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _train_command(workdir, *overrides),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _start_and_wait_for_new_checkpoint(workdir: Path) -> subprocess.Popen:
    """Start a slow run (in a process group of its own, as a terminal would) and return once it
    has written a checkpoint that was not there before."""
    folder = workdir / "checkpoints"
    before = set(folder.iterdir()) if folder.is_dir() else set()
    proc = subprocess.Popen(
        _train_command(workdir, *SLOW),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not any(
        p.name.isdigit() for p in (set(folder.iterdir()) if folder.is_dir() else set()) - before
    ):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a new checkpoint:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared within 240 s")
        time.sleep(0.05)
    return proc


@pytest.mark.slow  # three runs through the command line: over 15 s
def test_sigterm_and_ctrl_c_then_rerun_give_bitwise_the_uninterrupted_parameters(
    tmp_path, uninterrupted
):
    """Preempted (SIGTERM), then interrupted (Ctrl-C), then rerun: the parameters, test result
    and logged steps of the uninterrupted run. (SIGKILL at ten moments: tests/test_kill_resume.py.)"""
    # 1. SIGTERM (preemption) once it has checkpointed: it finishes the step, saves, and exits
    #    cleanly saying where it stopped.
    proc = _start_and_wait_for_new_checkpoint(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    match = re.search(r"preempted \(SIGTERM\): saved a checkpoint at step (\d+)", stderr)
    assert match, stderr[-3000:]
    step = int(match.group(1))
    assert 0 < step < 12 and (tmp_path / "checkpoints" / str(step)).is_dir()
    assert not (tmp_path / "results.json").exists()
    # 2. The same command resumes; Ctrl-C at a terminal (SIGINT to the process group) once it
    #    has checkpointed again: it says at once that it will save, finishes the step, saves,
    #    and ends by SIGINT (so that a shell loop running it stops too), without a traceback.
    proc = _start_and_wait_for_new_checkpoint(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert f"resuming from step {step}" in stderr, stderr[-3000:]
    assert proc.returncode == -signal.SIGINT, stderr[-3000:]
    assert (
        "interrupted (SIGINT): stopping after this step and saving a checkpoint; press " in stderr
    )
    match = re.search(r"interrupted \(SIGINT\): saved a checkpoint at step (\d+) in ", stderr)
    assert match and "Traceback" not in stderr, stderr[-3000:]
    assert int(match.group(1)) > step
    step = int(match.group(1))
    assert step < 12 and (tmp_path / "checkpoints" / str(step)).is_dir()
    # 3. The same command again continues from that step and finishes.
    resumed = _run(tmp_path)
    assert f"resuming from step {step}" in resumed.stderr
    _assert_same_final_params(tmp_path, uninterrupted[0])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"] == uninterrupted[1]["test"]
    assert _logged_steps(tmp_path) == _logged_steps(uninterrupted[0])
    # events.jsonl holds the run's history: each start, each stop with its reason, the end.
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("reason", "")[:21]) for e in events] == [
        ("started", ""),
        ("stopped", "preempted (SIGTERM): "),
        ("started", ""),
        ("stopped", "interrupted (SIGINT):"),
        ("started", ""),
        ("finished", ""),
    ]


@pytest.mark.slow  # two runs of the toy task through the command line: ~15 s
def test_a_hung_input_stops_a_one_process_run_which_then_resumes(tmp_path):
    """A one-process run whose input never delivers a batch (read in the training process,
    which waits for a hung child process) used to wait forever: the step watchdog ran only in
    pods. It now ends the run after ``HGRN_STEP_TIMEOUT_S`` naming the input and the step, kills
    the hung child process, and keeps the checkpoints, from which the next run finishes. (No
    restart: the input has no worker processes, this process itself is stuck.)"""
    workdir, pid_file = tmp_path / "run", tmp_path / "worker.pid"
    hung = subprocess.run(
        _train_command(
            workdir, "--config.data.hang_at_step=7", f"--config.data.hang_pid_file={pid_file}"
        ),
        cwd=REPO,
        env={**cli_env(), "HGRN_STEP_TIMEOUT_S": "3"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert hung.returncode == 3, hung.stderr[-3000:]
    assert (
        "error: the input pipeline delivered no batch for step 7 in 3 s (a hung input worker "
        "process, or a data folder that stopped answering); stopping. Raise HGRN_STEP_TIMEOUT_S "
        "if a batch can take this long. The last complete checkpoint is kept: run the same "
        "command again to resume." in hung.stderr
    ), hung.stderr[-3000:]
    assert wait_until_gone(int(pid_file.read_text())), "the hung child process outlived the run"
    assert (workdir / "checkpoints" / "6").is_dir()
    resumed = _run(workdir, "--config.data.hang_at_step=-1")
    assert "resuming from step 6" in resumed.stderr
    assert json.loads((workdir / "results.json").read_text())["steps"] == 12


GRAIN_WORKER = ("--config.data.grain=True", "--config.data.workers=1")


def _hung_worker_run(
    workdir: Path, pid_file: Path, timeout_s: int, *overrides: str
) -> subprocess.CompletedProcess:
    """The toy task with one grain input worker, which hangs building the batch of step 7."""
    return subprocess.run(
        _train_command(
            workdir,
            *GRAIN_WORKER,
            "--config.data.hang_at_step=7",
            f"--config.data.hang_pid_file={pid_file}",
            *overrides,
        ),
        cwd=REPO,
        env={**cli_env(), "HGRN_STEP_TIMEOUT_S": str(timeout_s)},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow  # a toy run in this process and one with a worker process: ~25 s
def test_a_hung_input_worker_is_restarted_and_the_run_ends_as_an_undisturbed_one(tmp_path):
    """A one-process run whose input worker hangs (the batch of step 7) used to end after
    ``HGRN_STEP_TIMEOUT_S``. The watchdog now warns, kills the worker, the pipeline starts a new
    one at the same step, and the run ends with the parameters, results and logged steps of an
    undisturbed run (read in process: the same batches), exit 0. The limit leaves the new
    worker time to start (its start-up counts; 8 s was too little on a loaded 2-core machine)."""
    config = toy_config()
    config.data.grain = True
    reference = tmp_path / "reference"
    expected = train_and_evaluate(config, reference, task=ToyTask(config))
    workdir, pid_file = tmp_path / "run", tmp_path / "hung.pids"
    run = _hung_worker_run(workdir, pid_file, 15)  # room for a loaded machine
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        "warning: the input pipeline delivered no batch for step 7 in 15 s; killing its worker "
        "processes and starting new ones at step 7 (the batches are the same)\n" in run.stderr
    ), run.stderr[-3000:]
    assert "InputWorkerRestarted" not in run.stderr and "Traceback" not in run.stderr
    hung = pid_file.read_text().split()
    assert len(hung) == 1 and wait_until_gone(int(hung[0]))
    _assert_same_final_params(workdir, reference)
    results = json.loads((workdir / "results.json").read_text())
    assert (results["test"], results["best_val"]) == (expected["test"], expected["best_val"])
    assert _logged_steps(workdir) == _logged_steps(reference)


@pytest.mark.slow  # a toy run through the command line, two workers hanging 3 s each: ~15 s
def test_an_input_worker_that_hangs_again_after_its_restart_stops_the_run(tmp_path):
    """The restarted worker hangs too (before delivering a batch): the run ends (exit 3) saying
    that a restart was tried, the hung workers killed, the checkpoints kept."""
    workdir, pid_file = tmp_path / "run", tmp_path / "hung.pids"
    run = _hung_worker_run(workdir, pid_file, 3, "--config.data.hang_times=-1")
    assert run.returncode == 3, run.stderr[-3000:]
    assert (
        "warning: the input pipeline delivered no batch for step 7 in 3 s; killing its worker "
        "processes and starting new ones at step 7 (the batches are the same)\nerror: the input "
        "pipeline delivered no batch for step 7 in 3 s, again after its worker processes were "
        "killed and restarted at that step (a data folder that stopped answering, or a batch "
        "that hangs every worker); stopping. Raise HGRN_STEP_TIMEOUT_S if a batch can take "
        "this long. The last complete checkpoint is kept: run the same command again to "
        "resume.\n" in run.stderr
    ), run.stderr[-3000:]
    hung = pid_file.read_text().split()  # the second, unless its start took over 3 s
    assert 1 <= len(hung) <= 2 and all(wait_until_gone(int(pid)) for pid in hung)
    assert (workdir / "checkpoints" / "6").is_dir()


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--config.num_trainsteps=5",
            r"unknown config key --config\.num_trainsteps: config has no 'num_trainsteps'; did "
            r"you mean 'num_train_steps'",
        ),
        (
            "--config.modle.dim=8",
            r"^error: unknown config key --config\.modle\.dim: config has no 'modle'; did you "
            r"mean 'model'\?\n$",
        ),
        (
            "--config.model.dim=8",
            r"^error: unknown config key --config\.model\.dim: config\.model has no 'dim'; its "
            r"keys are dropout, features\n$",  # the toy task's model
        ),
        (
            "--config.optimizer.lr=5",
            r"unknown config key --config\.optimizer\.lr: config\.optimizer has no 'lr'; its keys "
            r"are .*learning_rate",
        ),
        (
            "--config.batch_size=abc",
            r"--config.batch_size=abc: --config.batch_size must be a whole number",
        ),
        ("--config.epochs=3", r"--config.epochs=3 does not change the run: .*num_train_steps"),
    ],
)
@pytest.mark.slow
def test_bad_config_override_fails_at_once_naming_the_key(tmp_path, override, expected):
    proc = _run(tmp_path, override, check=False)
    assert proc.returncode == 2
    assert re.search(expected, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_an_unknown_config_key_is_named_with_its_section_s_close_keys_or_all_of_them():
    """The first missing part of --config.<key>, its section, and the keys close to it
    (difflib), or all of the section's when none is close; a key below a value says so."""
    from experiments import cli

    config = ml_collections.ConfigDict(
        {"model": {"features": 8, "mixer": {"kind": "hgrn"}}, "num_train_steps": 2}
    )
    assert cli.unknown_key(config, "model.mixer.kind") is None
    assert cli.unknown_key(config, "modle.dim") == (
        "unknown config key --config.modle.dim: config has no 'modle'; did you mean 'model'?"
    )
    assert cli.unknown_key(config, "model.dim") == (
        "unknown config key --config.model.dim: config.model has no 'dim'; its keys are "
        "features, mixer"
    )
    assert cli.unknown_key(config, "model.mixer.kindd") == (
        "unknown config key --config.model.mixer.kindd: config.model.mixer has no 'kindd'; did "
        "you mean 'kind'?"
    )
    assert cli.unknown_key(config, "num_train_steps.x") == (
        "unknown config key --config.num_train_steps.x: config.num_train_steps is a value (2), "
        "not a section; set --config.num_train_steps=VALUE"
    )


def test_an_epochs_override_alone_is_refused():
    """The config files derive num_train_steps from epochs as they load and the runner counts
    num_train_steps: --config.epochs=3 alone trained the file's steps without a word."""
    from experiments import cli

    message = cli.unread_override({"epochs": 3, "batch_size": 16})
    assert message is not None and message.startswith("--config.epochs=3 does not change")
    assert "set --config.num_train_steps" in message and "\n" not in message
    assert cli.unread_override({"epochs": 3, "num_train_steps": 300}) is None
    assert cli.unread_override({"batch_size": 16}) is None


def _listops_tiny() -> ml_collections.ConfigDict:
    return importlib.import_module("experiments.configs.lra.listops").get_config("tiny")


def test_the_quoted_paper_number_is_the_one_of_the_run_s_task_and_model(tmp_path):
    """results.json quoted the config file's paper number whatever the run was: a config file
    copied from listops.py with its task set to a factory task, or with an HGRN2 mixer, quoted
    HGRN's ListOps 59.95 (only --config.task had been caught). The number is now the papers'
    for the run's own task and mixer kind, or none, each change with a one-line note."""
    from experiments import cli

    copy = tmp_path / "my_config.py"
    copy.write_text(
        "from experiments.configs.lra import listops\n\n\n"
        "def get_config(preset=None):\n"
        "    c = listops.get_config('tiny')\n"
        "    c.task = 'myparity:make_task'\n"
        "    return c\n"
    )
    config = cli._parse_config_file(str(copy))
    note = cli.quote_the_runs_paper_number(config, {})
    assert config.paper.value == 0.0 and note == (
        "note: results.json quotes no paper number: no paper reports the hgrn model on task "
        "'myparity:make_task' (config.paper.value=59.95 is another run's); set "
        "--config.paper.value to quote one"
    )

    config = _listops_tiny()
    config.model.mixer.kind = "hgrn2"
    note = cli.quote_the_runs_paper_number(config, {"model.mixer.kind": "hgrn2"})
    assert config.paper.value == 60.52  # HGRN2's ListOps (experiments/configs/hgrn2/lra.py)
    assert note == (
        "note: results.json quotes 60.52, the paper's number for the hgrn2 model on task "
        "'listops', not config.paper.value=59.95 (another run's)"
    )

    config = _listops_tiny()
    config.task = "text"  # --config.task=text over listops.py: HGRN's Text
    assert cli.quote_the_runs_paper_number(config, {"task": "text"}) is not None
    assert config.paper.value == 88.14

    config = _listops_tiny()
    config.model.mixer.kind = "attention"  # the baseline: no paper reports it
    assert cli.quote_the_runs_paper_number(config, {}) is not None
    assert config.paper.value == 0.0

    config = _listops_tiny()
    config.task, config.paper.value = "text", 70.0  # the user gives the number: kept
    assert cli.quote_the_runs_paper_number(config, {"task": "text", "paper.value": 70.0}) is None
    assert config.paper.value == 70.0 and (config.paper.task, config.paper.mixer) == (
        "text",
        "hgrn",
    )

    config = toy_config()  # the user's own task and number, marked as no other run's: kept
    assert cli.quote_the_runs_paper_number(config, {}) is None and config.paper.value == 50.0

    config = _listops_tiny()
    config.model.features = 64  # another width: LRA's numbers do not depend on it
    assert cli.quote_the_runs_paper_number(config, {}) is None and config.paper.value == 59.95


def test_results_quote_no_paper_number_marked_as_another_run_s():
    """``train_and_evaluate`` called from Python (no command line to re-quote the number) with
    ListOps's config turned to the user's task wrote ListOps's 59.95 into results.json. A number
    whose marks (``paper.task``, ``paper.mixer``) name another run is not quoted."""
    from hgrn_jax.training.task_choice import quoted_paper_number

    config = _listops_tiny()
    assert quoted_paper_number(config) == 59.95
    config.task = "majority"
    assert quoted_paper_number(config) is None
    config = _listops_tiny()
    config.model.mixer.kind = "hgrn2"
    assert quoted_paper_number(config) is None
    assert quoted_paper_number(toy_config()) == 50.0  # the user's, unmarked: quoted
    config = toy_config()
    config.paper.value = 0.0  # not known
    assert quoted_paper_number(config) is None


@pytest.mark.parametrize(
    "module",
    ["lra.listops", "lra.pathx", "imagenet.tiny", "imagenet.small", "lm.wikitext103"]
    + [f"hgrn2.{task}" for task in ("listops", "image", "pathx", "wikitext103")],
)
def test_every_shipped_preset_quotes_its_own_paper_number(module):
    """The configs' own numbers agree with the rule, so that a run of a shipped preset gets no
    note (the ImageNet tiny presets, d 32, had quoted the d 192 and d 384 models' numbers)."""
    from experiments import cli

    config_module = importlib.import_module(f"experiments.configs.{module}")
    for preset in (None, "tiny", "transformer", "tiny_transformer"):
        try:
            config = config_module.get_config(preset)
        except ValueError:  # no such preset for this file
            continue
        if module == "lm.wikitext103" and config.data.source == "release":
            config.data.tokenizer_path = "/data/gpt2"  # the paper's setting runs with its BPE
        value = config.paper.value
        assert cli.quote_the_runs_paper_number(config, {}) is None, (module, preset)
        assert config.paper.value == value


def test_a_wikitext_run_quotes_the_paper_s_perplexity_only_in_the_paper_s_setting():
    """The byte-level tiny LM (2 layers, d 32) ended with ``test perplexity 18.47 (paper
    24.82)``: the paper's number is the GPT-2 BPE perplexity of the 6-layer d 512 model, and a
    per-byte perplexity is not comparable (user review). The runner now quotes it by the
    report's rule (:data:`experiments.papers.PAPER_LM`), and a run without a paper number ends
    its last line without ``(paper none)``."""
    from experiments import cli

    wikitext = importlib.import_module("experiments.configs.lm.wikitext103")
    config = wikitext.get_config("tiny")
    assert config.paper.value == 0.0 and cli.quote_the_runs_paper_number(config, {}) is None

    config = wikitext.get_config()
    config.data.tokenizer_path = "/data/gpt2"
    assert cli.quote_the_runs_paper_number(config, {}) is None and config.paper.value == 24.82
    config.data.source = "synthetic"  # a byte corpus under the paper's model
    note = cli.quote_the_runs_paper_number(config, {})
    assert (config.paper.value, config.paper.val_value, config.paper.num_params) == (0, 0, 0)
    assert note == (
        "note: results.json quotes no paper number: no paper reports the hgrn model on task "
        "'wikitext103' with 6 layers, d 512, bytes vocabulary (per-byte perplexity: not "
        "comparable) (config.paper.value=24.82 is another run's); set --config.paper.value to "
        "quote one"
    )
    config = wikitext.get_config()
    config.data.tokenizer_path, config.model.num_layers = "/data/gpt2", 2  # another size
    assert cli.quote_the_runs_paper_number(config, {}) is not None and config.paper.value == 0

    results = dict(
        task="wikitext103", metric="perplexity", best_val=18.46, test=18.47, steps=120,
        wall_time_s=3.0, paper=None,
    )  # fmt: skip
    assert cli.final_line(results) == (
        "wikitext103: best val perplexity 18.4600, test perplexity 18.4700, 120 steps, 3.0 s"
    )
    results["paper"] = 24.82
    assert "test perplexity 18.4700 (paper 24.82), 120 steps" in cli.final_line(results)


def test_the_paper_number_note_comes_only_after_the_config_s_checks(tmp_path, monkeypatch):
    """``--config.task=text`` over listops.py:tiny printed ``note: results.json quotes 88.14``
    and then ``error: data.source 'generated' is not available for task 'text'`` (user
    review): the note (``on_checked``) comes once the config has passed the checks, before
    the workdir is touched. It names a ``module:DATASET`` task as the run's log does."""
    from experiments import cli

    calls = []
    config = _listops_tiny()
    config.task = "text"
    with pytest.raises(ValueError, match="data.source 'generated' is not available"):
        train_and_evaluate(config, tmp_path / "run", on_checked=lambda: calls.append(1))
    assert calls == []

    class Checked(Exception):
        pass

    def on_checked():
        raise Checked

    with pytest.raises(Checked):
        train_and_evaluate(_listops_tiny(), tmp_path / "run", on_checked=on_checked)
    assert not (tmp_path / "run").exists()

    config = _worked_example_config(monkeypatch)
    note = cli.quote_the_runs_paper_number(config, {})
    assert note is not None and "on task 'parity' (config.paper.value=59.95" in note


def test_one_line_joins_a_heading_to_its_list_with_a_space():
    """A message that lists items under a heading ending in a colon was joined as 'in FILE:;
    FILE:5: ...' (user review)."""
    from experiments import cli

    assert cli.one_line("2 bad example(s) in f:\n  f:5: a\n  f:7: b\nfix the data") == (
        "2 bad example(s) in f: f:5: a; f:7: b; fix the data"
    )
    assert cli.one_line("first\n\n  second  ") == "first; second"


WARN_AFTER_RUN = """
import warnings
from absl import app
from experiments import {tool}
from hgrn_jax.training.workdir import ConfigChangeWarning

app.run = lambda *args, **kwargs: None
{tool}.run()  # installs the one-line format, then (here) runs nothing
warnings.warn("resuming with new run settings: a: 1 -> 2\\nsecond", ConfigChangeWarning)
"""


@pytest.mark.parametrize("tool", ["train", "generate"])
def test_the_command_line_tools_show_each_warning_on_one_line(tool):
    """experiments.train and generate (prepare, report and launch as they start too) show a
    warning as one line, ``warning: <Category>: <message>``, not Python's ``file:line:
    Category: message`` followed by the source line; a message of several lines is joined by
    "; ". (In a process of its own: experiments.train and prepare define the same flags.)"""
    from experiments import cli

    shown = subprocess.run(
        [sys.executable, "-c", WARN_AFTER_RUN.format(tool=tool)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stderr == (
        "warning: ConfigChangeWarning: resuming with new run settings: a: 1 -> 2; second\n"
    )
    with warnings.catch_warnings():  # restores Python's showwarning and formatwarning
        cli.show_warnings_on_one_line()
        formatted = warnings.formatwarning("text", UserWarning, "file.py", 3)
    assert formatted == "warning: UserWarning: text\n"
    assert cli.warning_line("x", UserWarning) == "warning: UserWarning: x"


UNGUARDED_SCRIPT = """
import sys
from experiments.configs.lra import listops
from hgrn_jax.training.loop import train_and_evaluate

config = listops.get_config("tiny")
config.data.workers = 1
config.data.cache_dir = sys.argv[2]
config.num_train_steps = 2
train_and_evaluate(config, sys.argv[1])  # at top level: no `if __name__ == "__main__":`
"""


@pytest.mark.slow  # a training process and a grain worker, each importing JAX: ~10 s
def test_an_unguarded_script_s_workers_say_to_guard_it(tmp_path):
    """A script calling train_and_evaluate at top level runs again in each data worker (they
    import it). There the call stops at once with a RuntimeError naming the fix; it used to
    report the workdir as in use by another run and advise deleting the live run's lock. The
    training process then stops as well, naming the worker's exit (no restart: a worker that
    exits by itself would do so again)."""
    script = tmp_path / "train_script.py"
    script.write_text(UNGUARDED_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "cache")],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=150)  # a hang fails here
    finally:
        # Its worker, if left. The group is empty once both ended (the resource tracker, which
        # used to linger in it a moment longer, runs in a session of its own).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode != 0
    assert re.search(
        r"InputWorkerLost: an input worker process ended \(exit code 1\) before delivering the "
        r"batch of step 0; its own error is printed above",
        stderr,
    ), stderr
    lines = stderr.splitlines()
    error = next((line for line in lines if re.match(r"[\w.]*Error: ", line)), "".join(lines))
    assert re.search(
        r"RuntimeError: train_and_evaluate was called while a worker process that "
        r"multiprocessing started \(.+\) imports the main script: .*put the call under "
        r"`if __name__ == '__main__':`, or set config.data.workers=0",
        error,
    ), error


def test_a_finished_run_trained_further_keeps_its_results_and_test_record(tmp_path, capsys):
    """Raising num_train_steps of a finished run continues it; the run deleted its test record
    from metrics.jsonl (rewinding drops the test records: they are written again at the end)
    and overwrote its results.json, so the score at the old end was lost. Both are kept now:
    results-step12.json and the step-12 test record; a plain rerun of a finished run still
    rewrites its last test record instead of adding one."""
    config = toy_config()
    first = train_and_evaluate(config, tmp_path, task=ToyTask(config))
    first_text = (tmp_path / "results.json").read_text()
    config.num_train_steps = config.schedule.decay_steps = 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigChangeWarning)
        second = train_and_evaluate(config, tmp_path, task=ToyTask(config))
        assert second["steps"] == 18 and first["steps"] == 12
        assert (tmp_path / "results-step12.json").read_text() == first_text
        assert "earlier end is kept as results-step12.json" in capsys.readouterr().err
        train_and_evaluate(config, tmp_path, task=ToyTask(config))  # finished: tested again
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tests = [(r["step"], r["accuracy"]) for r in records if r["split"] == "test"]
    assert tests == [(12, first["test"]), (18, second["test"])]
    assert sorted(p.name for p in tmp_path.glob("results*.json")) == [
        "results-step12.json",
        "results.json",
    ]


def test_the_model_class_is_named_by_module_and_qualified_name():
    """results.json's and the start records' ``model_class`` (the report sets only the
    package's classes beside the papers' rows), read off the GraphDef without building the
    model; None, not an error at the end of a run, where Flax's GraphDef says it otherwise."""
    from hgrn_jax.nn import ClassifierConfig, HGRNClassifier
    from hgrn_jax.training.state import model_class_name

    config = ClassifierConfig(num_classes=2, vocab_size=3, features=8, num_layers=1)
    graphdef, _ = nnx.split(HGRNClassifier(config, rngs=nnx.Rngs(0)))
    assert model_class_name(graphdef) == "hgrn_jax.nn.classifier.HGRNClassifier"
    from toy_task import ToyModel

    graphdef, _ = nnx.split(ToyModel(8, 0.0, rngs=nnx.Rngs(0)))
    assert model_class_name(graphdef) == "toy_task.ToyModel"
    assert model_class_name(object()) is None

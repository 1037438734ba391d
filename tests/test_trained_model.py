"""A run folder back as a model: ``load_trained_model`` (parameters and BatchNorm statistics bit
for bit as the runner restores them, the run's test accuracy reproduced, its errors).

A tiny ListOps run (a classifier with BatchNorm) is made once per module on the suite's 8
simulated CPU devices, so its checkpoints are sharded over the mesh and loaded as plain
one-device arrays.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hgrn_jax.training import load_trained_model
from hgrn_jax.training.loop import Run, resolve_task, train_and_evaluate
from hgrn_jax.training.trained import best_step

REPO = Path(__file__).resolve().parents[1]


def _config(name: str, cache_dir: Path, **changes):
    config = importlib.import_module(f"experiments.configs.{name}").get_config("tiny")
    config.data.cache_dir = str(cache_dir)
    config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 2, 2
    config.log_every = 2
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def listops_run(tmp_path_factory) -> Path:
    """A 4-step ListOps run (checkpoints 2 and 4, each after an evaluation)."""
    folder = tmp_path_factory.mktemp("listops")
    config = _config("lra.listops", folder / "cache")
    train_and_evaluate(config, folder / "run")
    return folder / "run"


def _runner_state(run: Path, tmp_path: Path, step: int):
    """``(Run, state)``: the runner's own restore of checkpoint ``step`` (from a copy)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    runner = Run(ml_collections.ConfigDict(json.loads((run / "config.json").read_text())), copy)
    state, _ = runner.restore(step)
    return runner, state


def _plain(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as NumPy arrays (typed PRNG keys as their raw data)."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # end-to-end: a training run
def test_best_listops_checkpoint_loads_bit_for_bit_and_reproduces_the_test_accuracy(
    listops_run, tmp_path
):
    """Parameters and BatchNorm statistics equal the runner's restore of the best step, and the
    loaded model's correct predictions over the test split are the run's test accuracy exactly
    (a count of correct examples over a count of examples: no rounding to allow for)."""
    results = json.loads((listops_run / "results.json").read_text())
    assert best_step(listops_run) == results["best_step"] != 4, "best should not be latest here"
    before = _folder_digest(listops_run)
    model, config = load_trained_model(listops_run, "best")
    assert _folder_digest(listops_run) == before  # the run folder is only read
    assert config.task == "listops" and config.model.vocab_size == 18
    runner, state = _runner_state(listops_run, tmp_path, results["best_step"])
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(state.params))
    for got, want in zip(_plain(params), _plain(state.params), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_plain(model_state), _plain(state.model_state), strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(params))  # not sharded

    task = resolve_task(config)
    correct = weight = 0.0
    for batch in task.eval_batches("test"):
        logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["mask"]))  # eval mode
        hits = np.asarray(jnp.argmax(logits, -1)) == batch["labels"]
        correct += float(np.sum(hits * batch["weight"]))
        weight += float(np.sum(batch["weight"]))
    assert 100.0 * correct / weight == results["test"]


@pytest.mark.slow  # end-to-end: a training run
def test_latest_and_a_step_number_load_those_checkpoints(listops_run, tmp_path):
    runner, state = _runner_state(listops_run, tmp_path, 2)
    for choice in (2, "2"):
        model, _ = load_trained_model(listops_run, choice)
        params = nnx.state(model, nnx.Param)
        for got, want in zip(_plain(params), _plain(state.params), strict=True):
            np.testing.assert_array_equal(got, want)
    latest, _ = load_trained_model(listops_run, "latest")
    restored_4, _ = runner.restore(4)
    for got, want in zip(
        _plain(nnx.state(latest, nnx.Param)), _plain(restored_4.params), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # end-to-end: a training run
def test_load_errors_name_the_path_and_the_fix(listops_run, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf"{tmp_path}/config\.json not found: .* not a run"
    ):
        load_trained_model(tmp_path)
    with pytest.raises(
        ValueError, match=r"no checkpoint at step 3; pass one of the steps there: 2, 4"
    ):
        load_trained_model(listops_run, 3)
    with pytest.raises(ValueError, match=r"checkpoint='worst' is not 'best', 'latest' or a step"):
        load_trained_model(listops_run, "worst")

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(listops_run / "config.json", fresh / "config.json")
    with pytest.raises(FileNotFoundError, match=r"checkpoints holds no checkpoint yet"):
        load_trained_model(fresh)

    copy = tmp_path / "damaged"
    shutil.copytree(listops_run, copy)
    before = _folder_digest(listops_run)
    data = sorted((copy / "checkpoints" / "4" / "state").rglob("d/*"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {copy}/checkpoints/4 is damaged \(.*fails "
        r"its SHA-256 checksum.*\); load another step \(2\)",
    ):
        load_trained_model(copy, 4)
    assert (copy / "checkpoints" / "4").is_dir()  # not moved aside
    assert not (copy / "checkpoints.damaged").exists()
    assert _folder_digest(listops_run) == before

    for step in (2, 4):  # no validation metric: as checkpoints saved between evaluations
        (copy / "checkpoints" / str(step) / "metrics" / "metrics").unlink()
    with pytest.raises(
        ValueError,
        match=r"no checkpoint with a validation metric yet \(steps "
        r"2, 4\); pass checkpoint='latest'",
    ):
        load_trained_model(copy, "best")

    config = json.loads((listops_run / "config.json").read_text())
    config["task"] = "no_such_module_of_mine:make_task"
    (fresh / "config.json").write_text(json.dumps(config))
    (fresh / "checkpoints").symlink_to(listops_run / "checkpoints")
    with pytest.raises(
        ValueError,
        match=rf"{fresh}/config\.json: config\.task="
        r"'no_such_module_of_mine:make_task': cannot import",
    ):
        load_trained_model(fresh, "latest")

"""Each paper config's tiny preset trains end to end on its real-data fixture.

Through ``train_and_evaluate`` (jitted steps on the 8 simulated devices, evaluation, checkpoint,
``results.json``): ListOps on a release-layout TSV, Text on mock IMDB, Image on mock CIFAR-10 (RGB
with crop and flip, and the grey variant) and Path-X on 128 x 128 PNGs in the ``pathfinder128``
layout. Retrieval,
Pathfinder, WikiText-103 and ImageNet (whose ``small`` tiny preset is ``tiny``'s) train end to end
in ``test_data_release.py`` / ``test_data_tfds.py``; the grey CIFAR variant's normalisation is
checked there too.
"""

from __future__ import annotations

import json

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hgrn_jax import tasks
from hgrn_jax.tasks import image as image_task
from hgrn_jax.tasks import listops as listops_task
from hgrn_jax.tasks import pathfinder as pathfinder_task
from hgrn_jax.tasks import text as text_task


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=16):
        yield


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_listops_release(tmp_path):
    release = tmp_path / "lra_release"
    fx.write_listops(release / "lra_release", rows=16)  # the archive's nested layout
    config = fx.tiny_config(
        "lra.listops", source="release", lra_dir=str(release), cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(tasks.get_task(config), listops_task.ListOpsRelease)
    fx.train_briefly(config, tmp_path / "run")


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_text_on_mock_imdb(tmp_path, mock):
    config = fx.tfds_config("lra.text", tmp_path, seq_len=64)
    assert isinstance(tasks.get_task(config), text_task.ImdbTfds)
    fx.train_briefly(config, tmp_path / "run")


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_image_on_mock_cifar10(tmp_path, mock):
    config = fx.cifar_config(tmp_path)
    assert isinstance(tasks.get_task(config), image_task.Cifar10Tfds)
    fx.train_briefly(config, tmp_path / "run", steps=2)


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_grayscale_image_on_mock_cifar10(tmp_path, mock):
    """LRA's grey variant (``data.grayscale=True``, ``model.input_channels=1``): one channel in
    the batches and in the model's pixel encoder, finite training and evaluation losses."""
    config = fx.cifar_config(tmp_path, grayscale=True)
    config.model.input_channels = 1
    task = tasks.get_task(config)
    assert isinstance(task, image_task.Cifar10Tfds)
    batch = next(task.train_batches(0))
    assert batch["inputs"].shape == (4, 32 * 32, 1) and batch["inputs"].dtype == np.float32
    fx.train_briefly(config, tmp_path / "run", steps=2)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_losses = [r["loss"] for r in logged if r["split"] == "train"]
    assert train_losses and np.all(np.isfinite(train_losses))
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["model"]["input_channels"] == 1 and written["data"]["grayscale"] is True


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_pathx_on_pathfinder128_pngs(tmp_path):
    fx.write_pathfinder(tmp_path, 128, count=16)
    config = fx.pathfinder_config(tmp_path, task="lra.pathx", resolution=128)
    config.model.features = 8  # 16,384 pixels a row: keep the run a few seconds long
    assert isinstance(tasks.get_task(config), pathfinder_task.PathfinderRelease)
    fx.train_briefly(config, tmp_path / "run", steps=2)


def test_imagenet_small_tiny_preset_is_the_trained_one():
    """``imagenet/small.py:tiny`` is the preset that trains on mock data in test_data_tfds."""
    from experiments.configs.imagenet import small, tiny

    small_tiny, tiny_tiny = small.get_config("tiny").to_dict(), tiny.get_config("tiny").to_dict()
    assert small_tiny == tiny_tiny  # the paper's numbers too: none at the tiny width

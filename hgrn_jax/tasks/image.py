"""LRA Image: CIFAR-10 as a sequence of 32 x 32 pixels (RGB, or grey with ``data.grayscale``).

=============  ===============================================  ============
source         data                                             reads
=============  ===============================================  ============
``tfds``       tfds ``cifar10`` in ``data.tfds_dir``            ``tfds_dir``
``synthetic``  generated images labelled by their bright        (none)
               quadrant (``data.image_size``, default 8)
=============  ===============================================  ============

``data.image_size``, ``model.grid_shape``, ``data.seq_len``, ``model.input_channels`` and
``model.num_classes`` follow from the source where the config leaves them at 0.
"""

from __future__ import annotations

import numpy as np

from hgrn_jax.data import cifar, loader, synthetic, tfds_io
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import PixelTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.settings import skip_bad_rows

SYNTHETIC_CLASSES = 4  # one per quadrant


class ImageTask(PixelTask):
    model_kind = models.CLASSIFIER


class Cifar10Tfds(ImageTask):
    """CIFAR-10 images (32 x 32): normalised pixels, crop + flip when training."""

    reads = frozenset({"tfds_dir"})
    native_size = 32
    images = "CIFAR-10's images (32 x 32)"
    num_classes = cifar.NUM_CLASSES

    @classmethod
    def input_channels(cls, config) -> int:
        return 1 if config.data.get("grayscale", False) else 3

    @property
    def grayscale(self) -> bool:
        return bool(self.config.data.get("grayscale", False))

    def _check_source(self) -> None:
        tfds_io.iterate(cifar.NAME, "train", self.config.data.tfds_dir)

    def _load(self, split):
        data = self.config.data
        return cifar.load_split(
            split,
            tfds_dir=data.tfds_dir,
            cache_dir=data.cache_dir,
            skip_bad_rows=skip_bad_rows(self.config),
        )

    def _batch(self, examples, rows):
        return {
            "inputs": cifar.normalise(examples["pixels"][rows], self.grayscale),
            "labels": np.asarray(examples["labels"][rows]),
        }

    def _train_batch(self, examples, rows, step, process_index, process_count):
        seed, size = self.config.seed, self.config.batch_size
        local = loader.process_slice(size, process_index, process_count)
        pixels = np.asarray(examples["pixels"][rows])
        if self.config.data.get("augment", True):
            params = cifar.crop_flip_params(loader.batch_rng(seed, step), size)
            pixels = cifar.crop_flip(pixels, *(p[local] for p in params))
        return {
            "inputs": cifar.normalise(pixels, self.grayscale),
            "labels": np.asarray(examples["labels"][rows]),
            "weight": np.ones(len(rows), np.float32),
        }


class ImageSynthetic(ImageTask):
    """Generated images: a bright quadrant (one of 4 classes) on noise."""

    stand_in_size = 8
    num_classes = SYNTHETIC_CLASSES

    @classmethod
    def input_channels(cls, config) -> int:
        return int(config.model.get("input_channels") or 3)

    def _load(self, split):
        images, labels = synthetic.bright_quadrant_images(
            self._split_size(split),
            size=self.config.data.image_size,
            channels=self.config.model.input_channels,
            seed=self._split_seed(split),
        )
        return {"pixels": np.round(images * 255).astype(np.uint8), "labels": labels}


DATASET = Dataset(
    "image", models.CLASSIFIER, sources={"tfds": Cifar10Tfds, "synthetic": ImageSynthetic}
)

"""LRA Pathfinder (32 x 32) and Path-X (128 x 128): are two dots joined by a path (2 classes)?

=============  ===============================================================  ============
source         data                                                             reads
=============  ===============================================================  ============
``release``    ``pathfinder{32,128}/curv_contour_length_14`` PNGs of the release  ``lra_dir``
               (prepared tfds data when in ``data.tfds_dir``)                   ``tfds_dir``
``prepared``   the tfds dataset ``lra_pathfinder`` (``res32`` / ``res128``)     ``tfds_dir``
``synthetic``  generated grey images with a path of ``data.path_length``        (none)
               (``data.image_size``, default 12)
=============  ===============================================================  ============

Pixels are ``x / 127.5 - 1``, grey (``model.input_channels`` 1). ``data.image_size``,
``model.grid_shape`` and ``data.seq_len`` follow from the source where the config leaves them at
0 (or ``()``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from hgrn_jax.data import pathfinder, synthetic
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import PixelTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.prepared_tfds import PreparedTfds, ReleaseOrPrepared, TfdsRelease
from hgrn_jax.tasks.settings import skip_bad_rows


class PathfinderTask(PixelTask):
    model_kind = models.CLASSIFIER
    num_classes = pathfinder.NUM_CLASSES
    channels = 1


class PathfinderRelease(PathfinderTask):
    """The release's pathfinder32 PNGs, split 80/10/10 as the reference."""

    reads = frozenset({"lra_dir", "tfds_dir"})
    native_size: ClassVar[int] = 32
    images = "the release's pathfinder32 images"

    @property
    def resolution(self) -> int:
        return self.native_size

    def _check_source(self) -> None:
        pathfinder.find_root(self.config.data.lra_dir, self.resolution)

    def _load(self, split):
        data = self.config.data
        return pathfinder.load_split(
            split,
            lra_dir=data.lra_dir,
            cache_dir=data.cache_dir,
            resolution=self.resolution,
            skip_bad_rows=skip_bad_rows(self.config),
        )


class PathXRelease(PathfinderRelease):
    """The release's pathfinder128 PNGs (Path-X), split 80/10/10 as the reference."""

    native_size = 128
    images = "the release's pathfinder128 images (Path-X)"


def _tfds(config_file: str, resolution: int) -> TfdsRelease:
    return TfdsRelease(
        "pathfinder", "lra_dir", lambda config: {"resolution": resolution}, config_file
    )


class PathfinderPrepared(PreparedTfds, PathfinderRelease):
    """The tfds dataset ``lra_pathfinder/res32``."""

    tfds_release = _tfds("experiments/configs/lra/pathfinder.py", 32)
    reads = frozenset({"tfds_dir", "lra_dir"})


class PathXPrepared(PathfinderPrepared):
    """The tfds dataset ``lra_pathfinder/res128``."""

    tfds_release = _tfds("experiments/configs/lra/pathx.py", 128)
    native_size = 128
    images = PathXRelease.images


class PathfinderSynthetic(PathfinderTask):
    """Generated grey images with or without a path joining two dots."""

    stand_in_size = 12

    def _load(self, split):
        data = self.config.data
        images, labels = synthetic.path_images(
            self._split_size(split),
            size=data.image_size,
            path_length=data.path_length,
            seed=self._split_seed(split),
        )
        return {"pixels": np.round(images * 255).astype(np.uint8), "labels": labels}


PATHFINDER = Dataset(
    "pathfinder",
    models.CLASSIFIER,
    sources={
        "release": ReleaseOrPrepared(PathfinderRelease, PathfinderPrepared),
        "prepared": PathfinderPrepared,
        "synthetic": PathfinderSynthetic,
    },
    tfds=PathfinderPrepared.tfds_release,
)
PATHX = Dataset(
    "pathx",
    models.CLASSIFIER,
    sources={
        "release": ReleaseOrPrepared(PathXRelease, PathXPrepared),
        "prepared": PathXPrepared,
        "synthetic": PathfinderSynthetic,
    },
    tfds=PathXPrepared.tfds_release,
)

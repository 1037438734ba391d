"""ImageNet-1k classification with DeiT's training recipe (images (B, H, W, 3), 1000 classes).

=============  ====================================================  =========================
source         data                                                  reads
=============  ====================================================  =========================
``tfds``       tfds ``imagenet2012`` (array_record) in ``tfds_dir``  ``tfds_dir``, ``manual_dir``
               (prepared by ``python -m hgrn_jax.data.imagenet``)
``synthetic``  generated colour images, one colour per class         (none)
=============  ====================================================  =========================

``model.image_size`` and ``data.seq_len`` (patches per image) follow from ``data.image_size``;
``model.num_classes`` 0 takes the source's (1000; 10 for the stand-in).

``data.repeated_augmentation`` k (the configs' 3, DeiT's ``RASampler``; 1: off) reads each
image of an epoch's order k times in a row, each copy with its own augmentations, for the same
``n // batch_size`` steps an epoch: about ``n / k`` distinct images an epoch
(:func:`hgrn_jax.data.loader.train_rows`).
"""

from __future__ import annotations

import numbers
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hgrn_jax.data import grain_pipeline, imagenet, loader, synthetic
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import ArrayTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.losses import soft_target_loss
from hgrn_jax.tasks.model_settings import mode
from hgrn_jax.tasks.settings import settle, skip_bad_rows

SYNTHETIC_CLASSES = 10


class ImageNetTask(ArrayTask):
    """Images normalised with the ImageNet statistics (DeiT's input normalisation)."""

    model_kind = models.IMAGE

    @classmethod
    def classes(cls, config) -> int:
        return imagenet.NUM_CLASSES

    @classmethod
    def derive(cls, config):
        config = super().derive(config)
        size = int(config.data.image_size)
        settle(config, "model.image_size", (size, size), f"data.image_size {size}")
        patch = int(config.model.get("patch_size", 14))
        settle(
            config,
            "data.seq_len",
            (size // patch) ** 2,
            f"{size} x {size} images in patches of {patch}",
        )
        classes = cls.classes(config)
        settle(config, "model.num_classes", classes, f"the {classes} classes of the data")
        repeats = config.data.get("repeated_augmentation", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
            raise ValueError(
                f"config.data.repeated_augmentation={repeats!r} must be a whole number >= 1; "
                "set --config.data.repeated_augmentation (3: DeiT's repeated augmentation, 1: off)"
            )
        return config

    def train_repeats(self) -> int:
        return int(self.config.data.get("repeated_augmentation", 1))

    def _forward(self, model, batch):
        return model(batch["images"])


class ImageNetSynthetic(ImageNetTask):
    """Generated colour images of ``data.image_size``."""

    @classmethod
    def classes(cls, config) -> int:
        return int(config.model.num_classes) or SYNTHETIC_CLASSES  # the stand-in draws any

    def _load(self, split):
        images, labels = synthetic.colour_images(
            self._split_size(split),
            size=self.config.data.image_size,
            num_classes=self.config.model.num_classes,
            seed=self._split_seed(split),
        )
        return {"pixels": np.round(images * 255).astype(np.uint8), "labels": labels}

    def _batch(self, examples, rows):
        images = examples["pixels"][rows].astype(np.float32) / 255.0
        return {
            "images": (images - imagenet.MEAN) / imagenet.STD,
            "labels": examples["labels"][rows],
        }


class ImageNetTfds(ImageNetTask):
    """ImageNet-1k from tfds's array_record source: DeiT's training pipeline, centre-crop eval.

    Training batches come from the grain pipeline: ``data.workers`` > 0 builds the batches of
    upcoming steps in that many grain worker processes (each opens the data source itself; a
    batch is a pure function of its step, so the result is the same as in-process); 0 works in
    this process on a thread pool; -1 (the configs' default) = one worker per CPU.
    """

    reads = frozenset({"tfds_dir", "manual_dir"})
    in_process_threads: int = 0
    """Threads decoding a batch's images when ``data.workers`` is 0 (0: one per CPU); a worker
    process decodes on one thread (the workers share the cores)."""

    def _check_source(self) -> None:
        self._source("train", reopen=True)

    def _source(self, split: str, reopen: bool = False):
        return imagenet.open_source(split, self.config.data.tfds_dir, reopen=reopen)

    def _spec(self, process_index: int = 0, process_count: int = 1) -> imagenet.BatchSpec:
        c = self.config
        aug = c.data.augment
        return imagenet.BatchSpec(
            tfds_dir=c.data.tfds_dir,
            image_size=int(c.data.image_size),
            seed=int(c.seed),
            batch_size=int(c.batch_size),
            process_index=process_index,
            process_count=process_count,
            num_classes=int(c.model.num_classes),
            mixup=float(aug.mixup),
            cutmix=float(aug.cutmix),
            switch_prob=float(aug.mixup_switch_prob),
            label_smoothing=float(c.label_smoothing),
            random_erasing=float(aug.random_erasing),
            randaugment=str(aug.randaugment or ""),
            skip_bad_rows=skip_bad_rows(c),
            mixup_group_size=int(aug.get("mixup_group_size", imagenet.MIXUP_GROUP_SIZE)),
        )

    def _threads(self) -> ThreadPoolExecutor:
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="imagenet")
        return self._pool

    def _load(self, split):
        return {"index": np.arange(len(self._source(split)))}

    def _batch(self, examples, rows):  # evaluation batches (val / test)
        return imagenet.eval_batch(self._spec(), self._eval_split, rows, self._threads())

    def eval_batches(self, split, process_index=0, process_count=1):
        self._eval_split = split
        for batch in super().eval_batches(split, process_index, process_count):
            batch["weight"] = batch["weight"] * batch.pop("readable")
            yield batch

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> grain_pipeline.TrainIterator:
        spec = self._spec(process_index, process_count)
        loader.process_slice(spec.batch_size, process_index, process_count)  # validates
        spec.mixup_group()  # validates before any worker starts
        workers = self.worker_count()
        # In the training process, the images of a batch are spread over threads; a worker
        # process works on one image at a time (the workers share the cores).
        threads = 1 if workers else self.in_process_threads or os.cpu_count() or 1
        source = imagenet.TrainBatches(spec, self.num_examples("train"), threads=threads)
        return grain_pipeline.train_loader(
            source,
            seed=spec.seed,
            batch_size=spec.batch_size,
            process_index=process_index,
            process_count=process_count,
            worker_count=workers,
            batch_transform=source,
            repeats=self.train_repeats(),
        ).iterator(start_step)

    def loss_fn(self, model, batch, *, train):
        if "targets" not in batch:  # evaluation: hard labels
            return super().loss_fn(model, batch, train=train)
        logits = self._forward(mode(model, train), batch)
        return soft_target_loss(logits, batch["targets"], batch["labels"], batch["weight"])


DATASET = Dataset(
    "imagenet", models.IMAGE, sources={"tfds": ImageNetTfds, "synthetic": ImageNetSynthetic}
)

"""ImageNet-1k (tfds ``imagenet2012``): DeiT's training augmentations and centre-crop evaluation.

Preparation (once, from the two archives in ``data.manual_dir``) writes tfds's ``array_record``
format, whose random access lets each process read exactly the records of its shard:

    python -m hgrn_jax.data.imagenet --manual_dir=DIR_WITH_TARS --tfds_dir=TFDS_DIR

Per example (PIL, the library timm's DeiT pipeline uses, bicubic resampling):
- train: random resized crop (scale 0.08-1, aspect 3/4-4/3, timm's 10 tries then a centre
  crop), horizontal flip (p 0.5), RandAugment (``randaugment``, :mod:`hgrn_jax.data.randaugment`),
  normalisation with the ImageNet statistics, random erasing (p ``random_erasing``, per-pixel
  normal noise, area 2%-1/3, log-aspect in log(0.3)-log(3.3));
- eval: resize the short side to ``image_size / 0.875`` (256), centre crop ``image_size``.
Per group of ``mixup_group_size`` rows of the global batch (default 128, DeiT's per-GPU batch;
numpy): Mixup (alpha ``mixup``) or CutMix (alpha ``cutmix``), one chosen per group with
probability ``mixup_switch_prob`` for CutMix, pairing each image with the group reversed; soft
targets with label smoothing folded in (timm's ``Mixup`` in batch mode, which mixes each GPU's
batch). The groups and their random draws depend on the global batch only, so a run's batches
are the same on any number of hosts.
Colour jitter is not applied: timm turns it off when RandAugment is on (DeiT's setting).
"""

from __future__ import annotations

import dataclasses
import math
import tarfile
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data import loader, randaugment, tfds_io
from hgrn_jax.data.errors import BadDataError, BadDataReport, DatasetMissingError

NAME = "imagenet2012"
NUM_CLASSES = 1000
TFDS_SPLITS = {"train": "train", "val": "validation", "test": "validation"}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CROP_PCT = 0.875
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


# ----------------------------------------------------------------------------- per image


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): a random area/aspect crop resized bicubically."""
    h, w = image.shape[:2]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return _resize(image[top : top + ch, left : left + cw], size, size)
    # Fallback: the central crop of the whole image clamped to the aspect range.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(image[top : top + ch, left : left + cw], size, size)


def centre_crop(image: np.ndarray, size: int, crop_pct: float = CROP_PCT) -> np.ndarray:
    """Resize the short side to ``size / crop_pct`` (bicubic), then the central size x size,
    as torchvision's ``Resize(short)`` and ``CenterCrop(size)`` in DeiT's evaluation: the long
    side ``int(short * long / short_side)`` (truncated), the crop's offsets
    ``int(round((side - size) / 2))`` (Python's round: half to even)."""
    h, w = image.shape[:2]
    short = int(math.floor(size / crop_pct))
    if h <= w:
        nh, nw = short, int(short * w / h)
    else:
        nw, nh = short, int(short * h / w)
    resized = _resize(image, nw, nh)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return resized[top : top + size, left : left + size]


def random_erase(
    image: np.ndarray,
    rng: np.random.Generator,
    probability: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> np.ndarray:
    """timm's RandomErasing(mode="pixel", max_count=1) on a normalised float image (H, W, C)."""
    if rng.random() >= probability:
        return image
    h, w, c = image.shape
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(*log_ratio))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            top = int(rng.integers(0, h - eh + 1))
            left = int(rng.integers(0, w - ew + 1))
            image = image.copy()
            image[top : top + eh, left : left + ew] = rng.standard_normal((eh, ew, c))
            return image
    return image


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 normalised with the ImageNet mean and std."""
    out = images.astype(np.float32)
    out /= 255.0  # in place: the same float32 operations as (x / 255 - MEAN) / STD, half the time
    out -= MEAN
    out /= STD
    return out


def train_image(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    random_erasing: float,
    policy: randaugment.Policy | None = None,
) -> np.ndarray:
    """One training image: crop, flip, RandAugment, normalise, erase -> float32 (size, size, 3)."""
    out = random_resized_crop(_as_rgb(image), size, rng)
    if rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, ::-1])
    if policy is not None:
        out = randaugment.rand_augment(out, policy, rng)
    return random_erase(normalise(out), rng, random_erasing)


def eval_image(image: np.ndarray, size: int) -> np.ndarray:
    return normalise(centre_crop(_as_rgb(image), size))


# ----------------------------------------------------------------------------- per batch


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off, np.float32)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def mixup_cutmix(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float,
    label_smoothing: float,
) -> tuple[np.ndarray, np.ndarray]:
    """timm's batch-mode Mixup/CutMix: images (B, H, W, C) float32, labels (B,) int.

    Returns mixed images and soft targets (B, num_classes). Each image is mixed with its mirror in
    the batch (``images[::-1]``) with weight ``lam`` ~ Beta(alpha, alpha); CutMix pastes a box of
    area ``1 - lam`` and corrects ``lam`` to the pasted area.
    """
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return images, targets
    lam = float(rng.beta(alpha, alpha))
    if use_cutmix:
        mixed = images.copy()
        _, h, w, _ = images.shape
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        mixed[:, y0:y1, x0:x1] = images[::-1, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        mixed = lam * images + (1.0 - lam) * images[::-1]
    mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed.astype(np.float32, copy=False), mixed_targets.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- reading


class ImageNetSource:
    """Random access to prepared ImageNet records: ``len`` and ``read(rows)``."""

    def __init__(self, split: str, tfds_dir: str):
        self.split = TFDS_SPLITS[split]
        command = (
            "python -m hgrn_jax.data.imagenet --manual_dir=MANUAL_DIR "
            f"--tfds_dir={tfds_dir or 'TFDS_DIR'}"
        )
        self.source = tfds_io.data_source(NAME, self.split, tfds_dir, command)

    def __len__(self) -> int:
        return len(self.source)

    def read_one(self, row: int, report: BadDataReport) -> tuple[np.ndarray, int] | None:
        """(image uint8 (H, W, 3), label) of a record; None (and a report entry) if bad."""
        where = f"tfds {NAME} {self.split} record {int(row)}"
        try:
            record: dict[str, Any] = self.source[int(row)]
            image = np.asarray(record["image"])
            label = int(record["label"])
        except Exception as error:  # a corrupt record: any decoder error
            report.add(where, 0, f"unreadable record ({type(error).__name__}: {error})")
            return None
        if image.size == 0 or image.ndim not in (2, 3):
            report.add(where, 0, f"empty or malformed image of shape {image.shape}")
            return None
        if not 0 <= label < NUM_CLASSES:
            report.add(where, 0, f"label {label} not in 0..{NUM_CLASSES - 1}")
            return None
        return image, label

    def read(
        self, rows: Sequence[int], report: BadDataReport
    ) -> list[tuple[np.ndarray, int] | None]:
        return [self.read_one(row, report) for row in rows]


# ----------------------------------------------------------------------------- batches


# DeiT's per-GPU batch (1,024 over 8 GPUs; the paper's run had 1,024 on each of 2): the
# reference mixes each GPU's batch with its mirror.
MIXUP_GROUP_SIZE = 128
_MIXUP_STREAM = 1 << 20  # batch_rng streams of the mixing groups (0 is the per-image seeds')


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """Everything a (possibly separate worker) process needs to build one process-local batch."""

    tfds_dir: str
    image_size: int
    seed: int = 0
    batch_size: int = 1
    process_index: int = 0
    process_count: int = 1
    num_classes: int = NUM_CLASSES
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    random_erasing: float = 0.25
    randaugment: str = "rand-m9-mstd0.5-inc1"
    skip_bad_rows: bool = False
    mixup_group_size: int = MIXUP_GROUP_SIZE

    def mixup_group(self) -> int:
        """Rows of the global batch mixed together (at most the batch; must divide each
        process's share so that no group straddles two processes)."""
        group = min(self.mixup_group_size, self.batch_size)
        local = self.batch_size // self.process_count
        if group <= 0 or local % group:
            raise ValueError(
                f"data.augment.mixup_group_size {self.mixup_group_size} must divide the "
                f"per-process batch ({local} = batch_size {self.batch_size} / "
                f"{self.process_count} processes); set --config.data.augment.mixup_group_size "
                f"to a divisor of {local}"
            )
        return group


_OPEN_SOURCES: dict[tuple[str, str], ImageNetSource] = {}


def open_source(split: str, tfds_dir: str, *, reopen: bool = False) -> ImageNetSource:
    """The (per-process cached) source of a split. ``reopen`` drops a cached one and opens the
    split anew: a task checks its data at creation, so data removed or replaced since (or a
    source opened under ``tfds.testing.mock_data``) is never served from the cache."""
    key = (split, tfds_dir)
    if reopen:
        _OPEN_SOURCES.pop(key, None)
    if key not in _OPEN_SOURCES:
        _OPEN_SOURCES[key] = ImageNetSource(split, tfds_dir)
    return _OPEN_SOURCES[key]


def read_transformed(
    split: str, rows: np.ndarray, spec: BatchSpec, transform, pool: Executor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``rows`` and ``transform(i, image)`` them, on ``pool`` threads when given.

    Returns images (R, S, S, 3) float32, labels (R,) int32 and readable (R,) bool; bad records
    are zeros and are reported (fatal unless ``spec.skip_bad_rows``).
    """
    size = spec.image_size
    images = np.zeros((len(rows), size, size, 3), np.float32)
    labels = np.zeros(len(rows), np.int32)
    valid = np.zeros(len(rows), bool)
    report = BadDataReport(f"tfds {NAME} {TFDS_SPLITS[split]}")
    source = open_source(split, spec.tfds_dir)

    def work(i: int) -> None:
        record = source.read_one(rows[i], report)
        if record is not None:
            images[i] = transform(i, record[0])
            labels[i], valid[i] = record[1], True

    list(pool.map(work, range(len(rows))) if pool else map(work, range(len(rows))))
    report.finish(spec.skip_bad_rows)
    return images, labels, valid


_THREAD_POOLS: dict[int, ThreadPoolExecutor] = {}


def thread_pool(threads: int) -> ThreadPoolExecutor | None:
    """This process's pool of ``threads`` threads (PIL releases the GIL while decoding and
    resampling), or None for ``threads`` <= 1: work in the calling thread."""
    if threads <= 1:
        return None
    if threads not in _THREAD_POOLS:
        _THREAD_POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="imagenet")
    return _THREAD_POOLS[threads]


@dataclasses.dataclass(frozen=True)
class TrainBatches:
    """The training split as the grain pipeline's source and batch transform
    (:mod:`hgrn_jax.data.grain_pipeline`): ``len`` records; ``read(rows)`` passes the record
    indices on and ``(batch, step)`` reads, decodes and augments them (:func:`train_batch`; one
    image is one unit of work). Picklable: each worker process opens the split itself.
    ``threads`` > 1 spreads the images of a batch over that many threads of the process."""

    spec: BatchSpec
    num_examples: int
    threads: int = 1

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return f"ImageNet {NAME} train ({self.num_examples} records)"

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"rows": np.asarray(rows)}

    def __call__(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        return train_batch(self.spec, batch["rows"], step, thread_pool(self.threads))


def stand_in_for_bad_rows(
    images: np.ndarray, labels: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A mixing group's images (G, S, S, 3) and labels (G,) with each bad row (``valid`` false)
    replaced by its mirror partner's, the row :func:`mixup_cutmix` mixes it with: mixing then
    blends the partner with itself, where the bad row's zero image and label 0 leaked into it (a
    target with mass on class 0). Rows whose partner is bad too keep their zeros; a group with
    no bad row is returned as it is (the same arrays)."""
    stand_in = ~valid & valid[::-1]
    if not stand_in.any():
        return images, labels
    images, labels = images.copy(), labels.copy()
    images[stand_in] = images[::-1][stand_in]
    labels[stand_in] = labels[::-1][stand_in]
    return images, labels


def train_batch(
    spec: BatchSpec, rows: np.ndarray, step: int, pool: Executor | None = None
) -> dict[str, np.ndarray]:
    """The process-local training batch of ``step`` from the records ``rows`` (B/P,) (this
    process's share of the global batch, :func:`hgrn_jax.data.loader.train_rows`): a pure
    function of (spec, rows, step).

    Keys: ``images`` (B/P, S, S, 3) float32, ``labels`` (B/P,) int32, ``targets`` (B/P, 1000)
    float32 (Mixup/CutMix and label smoothing), ``weight`` (B/P,) float32 (0 for bad records,
    skipped with ``spec.skip_bad_rows``: label 0, and image and target those of the row they
    are mixed with, so that they change no other row: :func:`stand_in_for_bad_rows`).
    """
    local = loader.process_slice(spec.batch_size, spec.process_index, spec.process_count)
    rng = loader.batch_rng(spec.seed, step)
    seeds = rng.integers(0, 2**63 - 1, spec.batch_size)[local]
    policy = randaugment.Policy.parse(spec.randaugment) if spec.randaugment else None
    images, labels, valid = read_transformed(
        "train",
        rows,
        spec,
        lambda i, image: train_image(
            image, spec.image_size, np.random.default_rng(seeds[i]), spec.random_erasing, policy
        ),
        pool,
    )
    # Mixup/CutMix within fixed groups of the global batch, each with its own draws: the same
    # global batch whatever the number of processes (timm mixes each GPU's batch instead).
    group = spec.mixup_group()
    targets = np.zeros((len(labels), spec.num_classes), np.float32)
    for start in range(0, len(labels), group):
        members = slice(start, start + group)
        group_index = (local.start + start) // group
        group_rng = loader.batch_rng(spec.seed, step, _MIXUP_STREAM + group_index)
        group_images, group_labels = stand_in_for_bad_rows(
            images[members], labels[members], valid[members]
        )
        images[members], targets[members] = mixup_cutmix(
            group_images,
            group_labels,
            group_rng,
            num_classes=spec.num_classes,
            mixup_alpha=spec.mixup,
            cutmix_alpha=spec.cutmix,
            switch_prob=spec.switch_prob,
            label_smoothing=spec.label_smoothing,
        )
    return {
        "images": images,
        "labels": labels,
        "targets": targets,
        "weight": valid.astype(np.float32),
    }


def eval_batch(
    spec: BatchSpec, split: str, rows: np.ndarray, pool: Executor | None = None
) -> dict[str, np.ndarray]:
    """Centre-cropped ``images``, ``labels`` and ``readable`` of ``rows`` of val / test."""
    images, labels, valid = read_transformed(
        split, rows, spec, lambda i, image: eval_image(image, spec.image_size), pool
    )
    return {"images": images, "labels": labels, "readable": valid}


# ----------------------------------------------------------------------------- preparation


def prepare(tfds_dir: str, manual_dir: str) -> None:
    """Build tfds ``imagenet2012`` in the array_record format from the archives in manual_dir.

    A dataset already prepared there in another format (tfds's default tfrecord, which has no
    random access) is an error naming the folder, and is left as it is; so is a truncated archive
    (an interrupted download)."""
    import tensorflow_datasets as tfds

    missing = [a for a in ARCHIVES if not (Path(manual_dir) / a).is_file()]
    if missing:
        raise DatasetMissingError(
            f"{', '.join(missing)} not in --manual_dir={manual_dir!r}: download the ILSVRC2012 "
            "training and validation archives (image-net.org, after registering) into that "
            "folder"
        )
    try:
        builder = tfds.builder(NAME, data_dir=tfds_dir or None, file_format="array_record")
    except ValueError as error:
        if "File format is already set" not in str(error):
            raise
        folder = Path(tfds_dir or Path.home() / "tensorflow_datasets") / NAME
        raise ValueError(
            f"{folder} already holds {NAME} in another format than array_record (tfds's default "
            "tfrecord, which cannot be read by index): prepare into another folder "
            "(--tfds_dir=NEW_DIR) and train with --config.data.tfds_dir=NEW_DIR"
        ) from None
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as error:  # tfds removes its unfinished folder first
        # A truncated archive: tarfile's error, or TensorFlow's reading past the end of it.
        if not isinstance(error, tarfile.TarError) and type(error).__name__ not in (
            "OutOfRangeError",
            "DataLossError",
        ):
            raise
        raise BadDataError(
            f"{' or '.join(ARCHIVES)} in --manual_dir={manual_dir!r} is truncated or not a tar "
            f"archive ({type(error).__name__}: {error}): download it again and compare its MD5 "
            "with image-net.org's"
        ) from None


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; a missing archive or an unusable ``--tfds_dir`` is one ``error:`` line
    (exit code 2)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hgrn_jax.data.imagenet", description=prepare.__doc__
    )
    parser.add_argument("--manual_dir", required=True)
    parser.add_argument("--tfds_dir", required=True)
    args = parser.parse_args(argv)
    try:
        prepare(args.tfds_dir, args.manual_dir)
    except (OSError, ValueError) as error:
        parser.exit(2, f"error: {type(error).__name__}: {' '.join(str(error).split())}\n")
    print(
        f"imagenet2012 prepared in {args.tfds_dir}; train with "
        f"--config.data.tfds_dir={args.tfds_dir}"
    )


if __name__ == "__main__":
    main()

"""LRA Image: CIFAR-10 (tfds ``cifar10``) as pixel sequences, 10 classes.

Splits as the S4-derived LRA code: the 50,000 training images are split 90/10 into train
(45,000) and val (5,000) by a permutation with seed 42 (numpy's generator; the reference used
torch's, so the exact membership differs); test is the 10,000 test images.

The paper's input is RGB, normalised per channel with the CIFAR-10 statistics, with random crop
(4-pixel symmetric padding, the reference's ``RandomCrop(32, padding=4,
padding_mode="symmetric")``) and horizontal flip during training. ``grayscale=True`` gives the
standard LRA variant: torchvision's ``Grayscale`` (PIL's ``convert("L")``, ITU-R 601 luma in
integers, rounded to uint8), normalised with mean 122.6 / 255 and std 61.0 / 255 (one channel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgrn_jax.data import loader, tfds_io
from hgrn_jax.data.errors import BadDataReport

NAME = "cifar10"
NUM_CLASSES = 10
SPLIT_SEED = 42
VAL_FRACTION = 0.1
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.247, 0.243, 0.261], np.float32)
GRAY_MEAN, GRAY_STD = 122.6 / 255.0, 61.0 / 255.0
LUMA_16 = np.array([19595, 38470, 7471], np.uint32)  # PIL: 0.299, 0.587, 0.114 in 1 / 2**16
PAD = 4
KEYS = ("pixels", "labels")


def _read(tfds_split: str, tfds_dir: str, report: BadDataReport) -> tuple[np.ndarray, np.ndarray]:
    raw = tfds_io.read_all(NAME, tfds_split, tfds_dir, ("image", "label"))
    labels = np.asarray(raw["label"], np.int64)
    keep = tfds_io.check_labels(labels, NUM_CLASSES, NAME, tfds_split, report)
    for i, image in enumerate(raw["image"]):
        if image.shape != (32, 32, 3):
            report.add(
                f"tfds {NAME} {tfds_split} example {i}",
                0,
                f"image of shape {image.shape}, expected (32, 32, 3)",
            )
            keep[i] = False
    images = [im for im, k in zip(raw["image"], keep) if k]
    pixels = np.stack(images).astype(np.uint8) if images else np.zeros((0, 32, 32, 3), np.uint8)
    return pixels, labels[keep].astype(np.int32)


def _build(folder: Path, tfds_dir: str, skip_bad_rows: bool) -> None:
    report = BadDataReport(f"tfds {NAME}")
    train_pixels, train_labels = _read("train", tfds_dir, report)
    test_pixels, test_labels = _read("test", tfds_dir, report)
    report.finish(skip_bad_rows)
    n = len(train_labels)
    num_val = int(n * VAL_FRACTION)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    splits = {"train": order[: n - num_val], "val": order[n - num_val :]}
    for split, rows in splits.items():
        loader.save_arrays(
            folder,
            split,
            {"pixels": train_pixels[np.sort(rows)], "labels": train_labels[np.sort(rows)]},
        )
    loader.save_arrays(folder, "test", {"pixels": test_pixels, "labels": test_labels})


def load_split(
    split: str, *, tfds_dir: str, cache_dir: str, skip_bad_rows: bool = False
) -> dict[str, np.ndarray]:
    """``pixels`` (N, 32, 32, 3) uint8 and ``labels`` (N,) int32 in 0..9 of train | val | test."""
    key = {
        "dataset": NAME,
        "files": tfds_io.fingerprint(NAME, tfds_dir),
        "split_seed": SPLIT_SEED,
        "val_fraction": VAL_FRACTION,
        "skip_bad_rows": skip_bad_rows,
    }
    folder = loader.prepared(
        cache_dir, "cifar10", key, lambda f: _build(f, tfds_dir, skip_bad_rows)
    )
    return loader.load_arrays(folder, split, KEYS)


def crop_flip_params(
    rng: np.random.Generator, count: int, pad: int = PAD
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: crop offsets dy, dx in [0, 2 * pad] and a flip flag (p = 0.5)."""
    dy, dx = rng.integers(0, 2 * pad + 1, (2, count))
    return dy, dx, rng.random(count) < 0.5


def crop_flip(
    pixels: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int = PAD
) -> np.ndarray:
    """Crop (B, H, W, C) images from their symmetrically padded version (edge pixels repeated,
    numpy's and torchvision's ``"symmetric"``) at (dy, dx), then flip.

    The paper's augmentation (torchvision ``RandomCrop(32, padding=4, padding_mode="symmetric")``
    + ``RandomHorizontalFlip``).
    """
    b, h, w, _ = pixels.shape
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    ys = dy[:, None] + np.arange(h)[None]
    xs = dx[:, None] + np.arange(w)[None]
    xs = np.where(flip[:, None], xs[:, ::-1], xs)
    return padded[np.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]


def grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint8 (...) grey, as PIL's ``convert("L")`` (torchvision's
    ``Grayscale``): ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``."""
    weighted = pixels.astype(np.uint32) @ LUMA_16
    return ((weighted + (1 << 15)) >> 16).astype(np.uint8)


def normalise(pixels: np.ndarray, grayscale: bool = False) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, H * W, C) in raster order; C = 1 if grayscale else 3."""
    if grayscale:
        x = grey(pixels)[..., None].astype(np.float32) / 255.0
        x = (x - GRAY_MEAN) / GRAY_STD
    else:
        x = pixels.astype(np.float32) / 255.0
        x = (x - MEAN) / STD
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)

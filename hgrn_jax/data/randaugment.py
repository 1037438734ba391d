"""RandAugment as DeiT uses it (timm's ``rand-m9-mstd0.5-inc1``), on PIL's image operations.

A policy string ``rand-m<M>-n<N>-mstd<S>-inc<0|1>`` (any order after ``rand``; defaults N 2,
S 0, inc 0): per image, N operations are drawn without replacement from the 15 below, each applied
with probability 0.5 at a magnitude drawn from Normal(M, S) clipped to [0, 10] (``/ 10`` scales
it). With ``inc1`` the posterize / solarize / enhance operations grow stronger with the magnitude
(timm's "increasing" set). Geometric operations fill with the ImageNet mean colour and resample
bilinearly or bicubically at random. All randomness comes from the numpy generator passed in.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

FILL = (124, 116, 104)  # round(255 * ImageNet mean)
NAMES = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class Policy:
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> Policy:
        parts = spec.split("-")
        if not parts or parts[0] != "rand":
            raise ValueError(
                f"RandAugment policy {spec!r} must start with 'rand-' (e.g. rand-m9-mstd0.5-inc1)"
            )
        fields = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n)([0-9.]+)", part)
            if not match:
                raise ValueError(
                    f"unknown RandAugment option {part!r} in {spec!r}; use m, n, mstd, inc"
                )
            key, value = match.groups()
            name = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "inc": "increasing"}[
                key
            ]
            fields[name] = (
                bool(int(value)) if key == "inc" else (int(value) if key == "n" else float(value))
            )
        return cls(**fields)


def _sign(rng: np.random.Generator, value: float) -> float:
    return -value if rng.random() < 0.5 else value


def _apply(name: str, image, level: float, rng: np.random.Generator, increasing: bool):
    from PIL import Image, ImageEnhance, ImageOps

    resample = Image.BILINEAR if rng.random() < 0.5 else Image.BICUBIC
    w, h = image.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(_sign(rng, 30.0 * level), resample=resample, fillcolor=FILL)
    if name == "Posterize":
        bits = 4 - int(4 * level) if increasing else int(4 * level) + 4
        if bits >= 8:
            return image
        if bits <= 0:  # 0 bits keep nothing (older PIL's posterize(0); PIL 13 refuses it)
            return Image.new(image.mode, image.size, 0)
        return ImageOps.posterize(image, bits)
    if name == "Solarize":
        threshold = 256 - int(256 * level) if increasing else int(256 * level)
        return ImageOps.solarize(image, min(max(threshold, 0), 256))
    if name == "SolarizeAdd":
        pixels = np.asarray(image, np.int16)
        added = np.where(pixels < 128, np.minimum(pixels + int(110 * level), 255), pixels)
        return Image.fromarray(added.astype(np.uint8))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.0 + _sign(rng, 0.9 * level) if increasing else 1.8 * level + 0.1
        return getattr(ImageEnhance, name)(image).enhance(max(factor, 0.0))
    if name in ("ShearX", "ShearY"):
        shear = _sign(rng, 0.3 * level)
        matrix = (1, shear, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, shear, 1, 0)
        return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)
    if name in ("TranslateXRel", "TranslateYRel"):
        shift = _sign(rng, 0.45 * level)
        matrix = (
            (1, 0, shift * w, 0, 1, 0) if name == "TranslateXRel" else (1, 0, 0, 0, 1, shift * h)
        )
        return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def rand_augment(image: np.ndarray, policy: Policy, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3) after ``policy.num_ops`` random operations."""
    from PIL import Image

    pil = Image.fromarray(image)
    for index in rng.choice(len(NAMES), policy.num_ops, replace=False):
        if rng.random() >= policy.prob:
            continue
        magnitude = policy.magnitude
        if policy.magnitude_std > 0:
            magnitude = rng.normal(magnitude, policy.magnitude_std)
        level = min(max(magnitude, 0.0), 10.0) / 10.0
        pil = _apply(NAMES[int(index)], pil, level, rng, policy.increasing)
    return np.asarray(pil.convert("RGB"), np.uint8)

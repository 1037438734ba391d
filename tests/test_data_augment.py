"""RandAugment (DeiT's rand-m9-mstd0.5-inc1) on PIL operations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hgrn_jax.data import randaugment
from hgrn_jax.data.randaugment import Policy


def test_policy_parsing():
    assert Policy.parse("rand-m9-mstd0.5-inc1") == Policy(
        magnitude=9.0, num_ops=2, magnitude_std=0.5, increasing=True
    )
    assert Policy.parse("rand-n3-m5") == Policy(magnitude=5.0, num_ops=3)
    with pytest.raises(ValueError, match="must start with 'rand-'"):
        Policy.parse("auto-m9")
    with pytest.raises(ValueError, match="unknown RandAugment option 'x7'"):
        Policy.parse("rand-m9-x7")


def apply(name, image, level, increasing=True, seed=0):
    out = randaugment._apply(
        name, Image.fromarray(image), level, np.random.default_rng(seed), increasing
    )
    return np.asarray(out.convert("RGB"))


def test_operations_do_what_their_names_say():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply("Invert", image, 0.9), 255 - image)
    posterized = apply("Posterize", image, 0.9)  # increasing: 4 - int(3.6) = 1 bit
    assert set(np.unique(posterized)) <= {0, 128}
    assert not apply("Posterize", image, 1.0).any()  # 0 bits
    solarized = apply("Solarize", image, 0.5)  # increasing: threshold 128
    np.testing.assert_array_equal(solarized, np.where(image >= 128, 255 - image, image))
    added = apply("SolarizeAdd", image, 0.5)  # +55 below 128
    np.testing.assert_array_equal(
        added, np.where(image < 128, np.minimum(image.astype(int) + 55, 255), image)
    )
    np.testing.assert_array_equal(apply("Brightness", image, 0.0), image)  # factor 1
    shifted = apply("TranslateXRel", np.full((16, 16, 3), 7, np.uint8), 1.0)
    filled = (shifted == np.array(randaugment.FILL, np.uint8)).all(-1)
    assert filled.any(0).sum() == 7  # int(0.45 * 16) columns of the mean colour
    for name in randaugment.NAMES:
        assert apply(name, image, 0.9).shape == (16, 16, 3)


def test_rand_augment_is_a_function_of_the_generator():
    image = np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    policy = Policy.parse("rand-m9-mstd0.5-inc1")
    outs = [
        randaugment.rand_augment(image, policy, np.random.default_rng(seed))
        for seed in (5, 5, 6, 7, 8, 9)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, image) for o in outs[2:])

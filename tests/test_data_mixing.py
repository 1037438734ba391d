"""ImageNet's Mixup/CutMix with bad records skipped (``data.skip_bad_rows=True``): a skipped
record (weight 0) changes no other row. It used to be a zero image with label 0 that was mixed
into its mirror partner (weight 1): a blank blended into the partner's image and mass on class 0
in its target (e.g. {class 0: 0.271, class 14: 0.729})."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hgrn_jax.data import errors, imagenet, loader

BATCH, GROUP, SIZE, SMOOTHING = 8, 4, 8, 0.1
MIXING = {
    "mixup": dict(mixup=0.8, cutmix=0.0),
    "cutmix": dict(mixup=0.0, cutmix=1.0),
    "either": dict(mixup=0.8, cutmix=1.0, switch_prob=0.5),
}


class _Corrupt(dict):
    def __getitem__(self, key):
        raise ValueError("corrupt JPEG")


def _records(bad: tuple[int, ...] = ()) -> list:
    """Record i: a random image of its own size, label 10 + i (never 0); ``bad`` ones corrupt."""
    rng = np.random.default_rng(7)
    records = [
        {"image": rng.integers(0, 256, (12 + i, 16 - i, 3), dtype=np.uint8), "label": 10 + i}
        for i in range(BATCH)
    ]
    return [_Corrupt() if i in bad else r for i, r in enumerate(records)]


def _batch(monkeypatch, tmp_path, records, step=3, **spec) -> dict[str, np.ndarray]:
    """The training batch of ``step`` over ``records`` (rows 0..7), read from a stand-in source."""
    source = object.__new__(imagenet.ImageNetSource)
    source.split, source.source = "train", records
    monkeypatch.setitem(imagenet._OPEN_SOURCES, ("train", str(tmp_path)), source)
    spec = imagenet.BatchSpec(
        tfds_dir=str(tmp_path),
        image_size=SIZE,
        seed=5,
        batch_size=BATCH,
        mixup_group_size=GROUP,
        label_smoothing=SMOOTHING,
        **spec,
    )
    return imagenet.train_batch(spec, np.arange(BATCH), step)


def _mixed_as_before(monkeypatch, tmp_path, records, step=3, replace=None, **mixing):
    """The batch computed as the code before the fix did: the unmixed batch (mixing off), then
    each group mixed by ``mixup_cutmix`` with its own draws; ``replace`` {row: row} first gives
    rows another row's image and label (the designed stand-in for a bad row)."""
    with warnings.catch_warnings():  # the bad records, told by the batch under test
        warnings.simplefilter("ignore", errors.SkippedExamplesWarning)
        plain = _batch(
            monkeypatch, tmp_path, records, step, mixup=0.0, cutmix=0.0, skip_bad_rows=True
        )
    images, labels = plain["images"].copy(), plain["labels"].copy()
    for row, partner in (replace or {}).items():
        images[row], labels[row] = images[partner], labels[partner]
    out_images = np.zeros_like(images)
    targets = np.zeros((BATCH, imagenet.NUM_CLASSES), np.float32)
    for group_index, start in enumerate(range(0, BATCH, GROUP)):
        members = slice(start, start + GROUP)
        out_images[members], targets[members] = imagenet.mixup_cutmix(
            images[members],
            labels[members],
            loader.batch_rng(5, step, imagenet._MIXUP_STREAM + group_index),
            num_classes=imagenet.NUM_CLASSES,
            mixup_alpha=mixing.get("mixup", 0.8),
            cutmix_alpha=mixing.get("cutmix", 1.0),
            switch_prob=mixing.get("switch_prob", 0.5),
            label_smoothing=SMOOTHING,
        )
    return out_images, targets, plain


@pytest.mark.parametrize("mixing", list(MIXING))
def test_batches_without_bad_rows_are_unchanged_bit_for_bit(monkeypatch, tmp_path, mixing):
    """Passes on the code before too: a batch without bad rows is the one it made."""
    for step in (0, 3):
        for skip in (False, True):
            batch = _batch(
                monkeypatch, tmp_path, _records(), step, skip_bad_rows=skip, **MIXING[mixing]
            )
            images, targets, plain = _mixed_as_before(
                monkeypatch, tmp_path, _records(), step, **MIXING[mixing]
            )
            assert batch["images"].tobytes() == images.tobytes()
            assert batch["targets"].tobytes() == targets.tobytes()
            assert batch["labels"].tobytes() == plain["labels"].tobytes()
            assert batch["weight"].tolist() == [1.0] * BATCH


def test_stand_ins_replace_only_bad_rows_with_a_good_partner():
    images = np.arange(GROUP, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3))
    labels = np.arange(10, 10 + GROUP)
    kept = imagenet.stand_in_for_bad_rows(images, labels, np.ones(GROUP, bool))
    assert kept[0] is images and kept[1] is labels  # no bad row: the same arrays
    valid = np.array([False, True, False, False])  # 0's partner 3 is bad too; 1's is 2 (bad)
    new_images, new_labels = imagenet.stand_in_for_bad_rows(images, labels, valid)
    assert new_labels.tolist() == [10, 11, 11, 13]
    assert new_images[:, 0, 0, 0].tolist() == [0, 1, 1, 3]
    assert labels.tolist() == [10, 11, 12, 13] and images[2, 0, 0, 0] == 2  # inputs kept


@pytest.mark.parametrize("mixing", list(MIXING))
@pytest.mark.parametrize("step", [0, 1, 3])
def test_a_skipped_record_leaks_into_no_other_row(monkeypatch, tmp_path, mixing, step):
    """Row 1 is corrupt; its mirror in its group of 4 is row 2. Fails on the code before: row
    2's target had mass on class 0 and its image a blank blended in (Mixup; CutMix pasted a
    blank box into it whenever the box was not empty)."""
    with pytest.warns(errors.SkippedExamplesWarning, match="record 1: unreadable record"):
        batch = _batch(
            monkeypatch, tmp_path, _records(bad=(1,)), step, skip_bad_rows=True, **MIXING[mixing]
        )
    images, targets, plain = _mixed_as_before(
        monkeypatch, tmp_path, _records(bad=(1,)), step, replace={1: 2}, **MIXING[mixing]
    )
    good = plain["images"]
    assert batch["weight"].tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    assert batch["labels"].tolist() == [10, 0, 12, 13, 14, 15, 16, 17]
    # The partner: what the design gives (the bad row replaced by it), bit for bit ...
    assert batch["images"][2].tobytes() == images[2].tobytes()
    assert batch["targets"][2].tobytes() == targets[2].tobytes()
    # ... that is its own image and its own smoothed label: no blank blended in, no class 0.
    np.testing.assert_allclose(batch["images"][2], good[2], rtol=1e-6, atol=1e-6)
    off = SMOOTHING / imagenet.NUM_CLASSES
    np.testing.assert_allclose(batch["targets"][2, 0], off, rtol=1e-5)
    np.testing.assert_allclose(batch["targets"][2, 12], 1 - SMOOTHING + off, rtol=1e-5)
    # Every other good row is the batch without the bad record, bit for bit.
    whole, whole_targets, _ = _mixed_as_before(
        monkeypatch, tmp_path, _records(), step, **MIXING[mixing]
    )
    for row in (0, 3, 4, 5, 6, 7):
        assert batch["images"][row].tobytes() == whole[row].tobytes(), row
        assert batch["targets"][row].tobytes() == whole_targets[row].tobytes(), row
    assert np.isfinite(batch["images"]).all() and np.allclose(batch["targets"].sum(1), 1)


def test_a_bad_pair_stays_between_themselves(monkeypatch, tmp_path):
    """Rows 1 and 2 (mirrors) both corrupt, and row 4 of the other group: the good rows are those
    of a batch without them (row 7, row 4's partner, as designed)."""
    bad = (1, 2, 4)
    with pytest.warns(errors.SkippedExamplesWarning):
        batch = _batch(monkeypatch, tmp_path, _records(bad=bad), skip_bad_rows=True)
    whole, whole_targets, _ = _mixed_as_before(monkeypatch, tmp_path, _records())
    images, targets, _ = _mixed_as_before(monkeypatch, tmp_path, _records(bad=bad), replace={4: 7})
    assert batch["weight"].tolist() == [1, 0, 0, 1, 0, 1, 1, 1]
    for row in (0, 3, 5, 6):
        assert batch["images"][row].tobytes() == whole[row].tobytes(), row
        assert batch["targets"][row].tobytes() == whole_targets[row].tobytes(), row
    assert batch["images"][7].tobytes() == images[7].tobytes()
    assert batch["targets"][7].tobytes() == targets[7].tobytes()
    assert batch["targets"][7, 0] < 1e-3 and batch["targets"][7].argmax() == 17


def test_bad_rows_still_stop_the_run_unless_skipped(monkeypatch, tmp_path):
    with pytest.raises(errors.BadDataError, match="record 1: unreadable record"):
        _batch(monkeypatch, tmp_path, _records(bad=(1,)))

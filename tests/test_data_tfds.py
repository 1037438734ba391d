"""tfds pipelines on ``tfds.testing.mock_data``: IMDB, CIFAR-10, ImageNet-1k."""

from __future__ import annotations

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_fixtures import assert_batch_lists_equal, cifar_config, imagenet_config, take
from data_fixtures import tfds_config as config_of

from hgrn_jax import tasks
from hgrn_jax.data import cifar, errors, imagenet, loader
from hgrn_jax.tasks import image as image_task
from hgrn_jax.tasks import imagenet as imagenet_task
from hgrn_jax.tasks import text as text_task

MOCK_EXAMPLES = 20


def eval_coverage(task, split, processes=2) -> int:
    """Weighted rows over all processes (each example must count once)."""
    return int(
        sum(
            b["weight"].sum()
            for p in range(processes)
            for b in task.eval_batches(split, p, processes)
        )
    )


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        yield


# ----------------------------------------------------------------------------- IMDB


@pytest.mark.slow
def test_imdb_bytes_labels_and_splits(tmp_path, mock):
    task = tasks.get_task(config_of("lra.text", tmp_path, seq_len=64))
    assert isinstance(task, text_task.ImdbTfds)
    assert [task.num_examples(s) for s in ("train", "val", "test")] == [MOCK_EXAMPLES] * 3
    val, test = task.examples("val"), task.examples("test")
    np.testing.assert_array_equal(val["inputs"], test["inputs"])  # IMDB test serves as val
    train = task.examples("train")
    assert train["inputs"].shape == (MOCK_EXAMPLES, 64) and train["inputs"].dtype == np.uint8
    assert set(np.unique(train["labels"])) <= {0, 1}
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["mask"].sum(1), (batch["inputs"] > 0).sum(1))
    assert eval_coverage(task, "val") == MOCK_EXAMPLES


def test_imdb_empty_review_is_reported(tmp_path):
    def fake(self, split, **kwargs):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(
            {"text": [b"good film", b"  ", b"bad"], "label": np.array([1, 0, 0], np.int64)}
        )

    with tfds.testing.mock_data(as_dataset_fn=fake):
        task = tasks.get_task(config_of("lra.text", tmp_path, seq_len=16))
        with pytest.raises(errors.BadDataError, match=r"imdb_reviews train example 1: empty"):
            task.examples("train")


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_splits_pixels_and_normalisation(tmp_path, mock):
    task = tasks.get_task(cifar_config(tmp_path))
    assert isinstance(task, image_task.Cifar10Tfds)
    sizes = [task.num_examples(s) for s in ("train", "val", "test")]
    assert sizes == [18, 2, MOCK_EXAMPLES]  # 90 / 10 of train, all of test
    train = task.examples("train")
    assert train["pixels"].shape == (18, 32, 32, 3) and train["pixels"].dtype == np.uint8
    assert train["labels"].min() >= 0 and train["labels"].max() < 10
    batch = next(task.eval_batches("test", 0, 1))
    expected = (task.examples("test")["pixels"][:4] / 255.0 - cifar.MEAN) / cifar.STD
    np.testing.assert_allclose(batch["inputs"], expected.reshape(4, 1024, 3), atol=1e-5)
    assert eval_coverage(task, "test") == MOCK_EXAMPLES


def test_cifar_grayscale_option(tmp_path, mock):
    """The grey variant is the reference's ``Grayscale()`` then ``ToTensor()`` and
    ``Normalize(122.6 / 255, 61.0 / 255)`` (OpenNLPLab/lra dd871ef6,
    ``src/dataloaders/datasets.py`` ``CIFAR10.setup``); torchvision's ``Grayscale`` on a PIL
    image is ``image.convert("L")``, which PIL computes here."""
    from PIL import Image

    config = cifar_config(tmp_path, grayscale=True)
    with pytest.raises(ValueError, match="input_channels=1"):
        tasks.get_task(config)
    config.model.input_channels = 1
    task = tasks.get_task(config)
    batch = next(task.eval_batches("val", 0, 1))
    grey = np.asarray(Image.fromarray(task.examples("val")["pixels"][0]).convert("L"))
    expected = (grey.astype(np.float32) / 255 - np.float32(122.6 / 255)) / np.float32(61.0 / 255)
    assert batch["inputs"].shape == (4, 1024, 1)
    np.testing.assert_array_equal(batch["inputs"][0, :, 0], expected.ravel())


def test_grey_is_pils_integer_luma():
    """PIL's ``convert("L")`` (the reference's ``torchvision.transforms.Grayscale``, OpenNLPLab/lra
    dd871ef6 ``src/dataloaders/datasets.py`` ``CIFAR10.setup``) rounds the luma to an integer:
    (1, 0, 0) is grey 0 (a float luma gives 0.299), (0, 1, 1) is 1 (0.701), (3, 0, 0) is 1
    (0.897), (0, 0, 255) is 29 (29.07); PIL itself agrees on 4096 random colours."""
    from PIL import Image

    colours = np.array([[1, 0, 0], [0, 1, 1], [3, 0, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(cifar.grey(colours), [0, 1, 1, 29])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        cifar.grey(image), np.asarray(Image.fromarray(image).convert("L"))
    )
    normalised = cifar.normalise(colours.reshape(1, 2, 2, 3), grayscale=True)
    grey = np.array([0, 1, 1, 29], np.float32) / 255
    np.testing.assert_array_equal(
        normalised.ravel(), (grey - np.float32(122.6 / 255)) / np.float32(61.0 / 255)
    )


def test_crop_and_flip():
    """The reference pads symmetrically (OpenNLPLab/lra dd871ef6, ``src/dataloaders/datasets.py``
    ``CIFAR10.setup``: ``RandomCrop(32, padding=4, padding_mode="symmetric")``; torchvision pads a
    PIL image with ``np.pad(..., "symmetric")``): the 4 padded columns left of columns 0..3 are
    columns 3, 2, 1, 0, and likewise for rows, so no crop holds a zero pixel."""
    pixels = np.arange(2 * 6 * 6 * 1, dtype=np.uint8).reshape(2, 6, 6, 1) + 1
    centred = cifar.crop_flip(pixels, np.array([4, 4]), np.array([4, 4]), np.array([False, True]))
    np.testing.assert_array_equal(centred[0], pixels[0])
    np.testing.assert_array_equal(centred[1], pixels[1, :, ::-1])
    corner = cifar.crop_flip(pixels, np.array([0, 8]), np.array([0, 8]), np.array([False, False]))
    top_left = [3, 2, 1, 0, 0, 1]  # the image rows / columns at padded positions 0..5
    bottom_right = [4, 5, 5, 4, 3, 2]  # ... at padded positions 8..13
    np.testing.assert_array_equal(corner[0, :, :, 0], pixels[0, top_left][:, top_left, 0])
    np.testing.assert_array_equal(corner[1, :, :, 0], pixels[1, bottom_right][:, bottom_right, 0])


def test_cifar_augmented_batches_resume_and_ignore_the_process_count(tmp_path, mock):
    task = tasks.get_task(cifar_config(tmp_path))
    uninterrupted = take(task.train_batches(0, 0, 1), 6)
    assert_batch_lists_equal(uninterrupted[4:], take(task.train_batches(4, 0, 1), 2))
    halves = [take(task.train_batches(0, p, 2), 6) for p in (0, 1)]
    for whole, a, b in zip(uninterrupted, *halves):
        np.testing.assert_array_equal(whole["inputs"], np.concatenate([a["inputs"], b["inputs"]]))
    config = cifar_config(tmp_path, augment=False)
    plain = next(tasks.get_task(config).train_batches(0, 0, 1))
    assert not np.array_equal(plain["inputs"], uninterrupted[0]["inputs"])
    np.testing.assert_array_equal(plain["labels"], uninterrupted[0]["labels"])


def test_cifar_label_out_of_range_is_reported(tmp_path):
    def fake(self, split, **kwargs):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices(
            {"image": np.zeros((3, 32, 32, 3), np.uint8), "label": np.array([0, 12, 3])}
        )

    with tfds.testing.mock_data(as_dataset_fn=fake):
        config = cifar_config(tmp_path)
        with pytest.raises(errors.BadDataError, match=r"cifar10 train example 1: label 12 not"):
            tasks.get_task(config).examples("train")
        config.data.skip_bad_rows = True
        with pytest.warns(UserWarning, match="2 bad example"):  # one in train, one in test
            assert tasks.get_task(config).num_examples("test") == 2


def test_missing_tfds_data_names_the_fix(tmp_path):
    config = config_of(
        "lra.image", tmp_path, image_size=32, seq_len=1024, tfds_dir=str(tmp_path / "tfds")
    )
    with pytest.raises(
        tasks.DataUnavailableError,
        match=r"'cifar10' is not prepared .*download_and_prepare.*tfds_dir",
    ):
        tasks.get_task(config)
    with pytest.raises(errors.DatasetMissingError, match="ILSVRC2012_img_train.tar"):
        imagenet.prepare(str(tmp_path / "tfds"), str(tmp_path))
    with pytest.raises(
        tasks.DataUnavailableError,
        match=r"'imagenet2012' is not prepared .*: prepare it with `python -m "
        rf"hgrn_jax.data.imagenet --manual_dir=MANUAL_DIR --tfds_dir={tmp_path / 'tfds'}`",
    ):
        tasks.get_task(imagenet_config(tmp_path, tfds_dir=str(tmp_path / "tfds")))


# ----------------------------------------------------------------------------- ImageNet


def test_imagenet_batches_shapes_targets_and_resume(tmp_path, mock):
    task = tasks.get_task(imagenet_config(tmp_path))
    assert isinstance(task, imagenet_task.ImageNetTfds)
    size = task.config.data.image_size
    batches = take(task.train_batches(0, 0, 1), 3)
    batch = batches[0]
    assert batch["images"].shape == (4, size, size, 3) and batch["images"].dtype == np.float32
    assert batch["targets"].shape == (4, 1000) and batch["targets"].dtype == np.float32
    np.testing.assert_allclose(batch["targets"].sum(1), 1.0, rtol=1e-5)
    assert batch["labels"].min() >= 0 and batch["labels"].max() < 1000
    assert_batch_lists_equal(batches[2:], take(task.train_batches(2, 0, 1), 1))
    assert eval_coverage(task, "val") == MOCK_EXAMPLES
    eval_batch = next(task.eval_batches("val", 0, 1))
    assert "targets" not in eval_batch and eval_batch["images"].shape == (4, size, size, 3)


def test_imagenet_repeated_augmentation_copies_differ_and_resume(tmp_path, mock):
    """data.repeated_augmentation 3 (the configs', DeiT's RASampler): each record three times
    in a row, each copy with its own crop, flip, RandAugment and erasing; resuming at an epoch
    boundary is exact; 0 is refused naming the key."""
    config = imagenet_config(tmp_path)
    assert config.data.repeated_augmentation == 3
    config.data.augment.mixup = config.data.augment.cutmix = 0.0  # the copies themselves
    task = tasks.get_task(config)
    per_epoch = MOCK_EXAMPLES // config.batch_size
    batches = take(task.train_batches(0, 0, 1), per_epoch + 2)
    rows = loader.train_rows(config.seed, 0, MOCK_EXAMPLES, config.batch_size, repeats=3)
    assert rows[0] == rows[1] == rows[2] != rows[3]
    first = batches[0]
    assert first["labels"][0] == first["labels"][1] == first["labels"][2]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(first["images"][a], first["images"][b]), (a, b)
    assert_batch_lists_equal(batches[per_epoch:], take(task.train_batches(per_epoch, 0, 1), 2))
    config.data.repeated_augmentation = 0
    with pytest.raises(ValueError, match=r"config.data.repeated_augmentation=0 must be a whole"):
        tasks.get_task(config)


def test_imagenet_mixup_groups_ignore_the_process_count(tmp_path, mock):
    """Mixup/CutMix mix within groups of the global batch with per-group draws: two processes'
    halves are exactly the one-process batch; a group that would straddle processes is an
    error naming the setting."""
    config = imagenet_config(tmp_path)
    config.data.augment.mixup_group_size = 2
    task = tasks.get_task(config)
    whole = take(task.train_batches(0, 0, 1), 2)
    halves = [take(task.train_batches(0, p, 2), 2) for p in (0, 1)]
    for batch, a, b in zip(whole, *halves):
        for key in ("images", "targets", "labels"):
            np.testing.assert_array_equal(batch[key], np.concatenate([a[key], b[key]]))
    # Each group's targets are a mix of that group's own labels only.
    targets, labels = whole[0]["targets"], whole[0]["labels"]
    for group in (slice(0, 2), slice(2, 4)):
        mass = targets[group].sum(0)
        assert mass[np.unique(labels[group])].sum() > 2 * (1 - 0.1) - 1e-5
    config.data.augment.mixup_group_size = 4
    with pytest.raises(ValueError, match="mixup_group_size 4 must divide the per-process batch"):
        next(tasks.get_task(config).train_batches(0, 0, 2))


def test_imagenet_image_transforms():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert imagenet.random_resized_crop(image, 16, rng).shape == (16, 16, 3)
    assert imagenet.centre_crop(image, 16).shape == (16, 16, 3)
    # torchvision's Resize(18) then CenterCrop(16), as DeiT evaluates: 300 x 459 -> 18 x 27
    # (int(18 * 459 / 300) = int(27.54), not round's 28), left offset round(5.5) = 6 (not 5).
    from PIL import Image

    wide = rng.integers(0, 256, (300, 459, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(wide).resize((27, 18), Image.BICUBIC))
    np.testing.assert_array_equal(imagenet.centre_crop(wide, 16), resized[1:17, 6:22])
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    resized = np.asarray(Image.fromarray(tall).resize((18, 27), Image.BICUBIC))
    np.testing.assert_array_equal(imagenet.centre_crop(tall, 16), resized[6:22, 1:17])
    flat = np.full((300, 200, 3), 128, np.uint8)
    np.testing.assert_allclose(
        imagenet.eval_image(flat, 224),
        np.broadcast_to((128 / 255 - imagenet.MEAN) / imagenet.STD, (224, 224, 3)),
        atol=1e-5,
    )
    erased = imagenet.random_erase(np.zeros((32, 32, 3), np.float32), rng, probability=1.0)
    changed = (erased != 0).any(-1).mean()
    assert 0.01 < changed < 0.4  # area 2% .. 1/3


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    mixed, targets = imagenet.mixup_cutmix(
        images,
        labels,
        np.random.default_rng(1),
        num_classes=5,
        mixup_alpha=0.8,
        cutmix_alpha=0.0,
        switch_prob=0.5,
        label_smoothing=0.0,
    )
    lam = targets[0, 0]
    np.testing.assert_allclose(targets[0, 3], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
    mixed, targets = imagenet.mixup_cutmix(
        images,
        labels,
        np.random.default_rng(2),
        num_classes=5,
        mixup_alpha=0.0,
        cutmix_alpha=1.0,
        switch_prob=0.5,
        label_smoothing=0.1,
    )
    pasted = (mixed[0] != images[0]).any(-1).mean()
    np.testing.assert_allclose(targets[0, 0] - 0.02, 0.9 * (1 - pasted), rtol=1e-5)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)


def test_imagenet_bad_records_are_reported():
    class Broken(dict):
        def __getitem__(self, key):
            raise ValueError("corrupt JPEG")

    source = object.__new__(imagenet.ImageNetSource)
    source.split = "train"
    source.source = [
        {"image": np.zeros((4, 4, 3), np.uint8), "label": 7},
        {"image": np.zeros((0, 4, 3), np.uint8), "label": 1},
        {"image": np.zeros((4, 4, 3), np.uint8), "label": 1000},
        Broken(),
    ]
    report = errors.BadDataReport("imagenet")
    records = source.read([0, 1, 2, 3], report)
    assert records[0][1] == 7 and records[1:] == [None, None, None]
    message = report.message()
    assert "record 1: empty or malformed image" in message
    assert "record 2: label 1000 not in 0..999" in message
    assert "record 3: unreadable record (ValueError: corrupt JPEG)" in message


# ----------------------------------------------------------------------------- real ImageNet files


@pytest.mark.slow
def test_imagenet_prepared_from_archives_and_built_in_worker_processes(tmp_path):
    """The prepare command on archives in the real layout, then reading without any mock; the
    worker-process loader yields exactly the in-process batches."""
    fx.write_imagenet_archives(tmp_path / "manual")
    imagenet.main(["--manual_dir", str(tmp_path / "manual"), "--tfds_dir", str(tmp_path / "t")])
    config = imagenet_config(tmp_path, tfds_dir=str(tmp_path / "t"))
    config.batch_size = 4
    task = tasks.get_task(config)
    assert [task.num_examples(s) for s in ("train", "val")] == [8, 6]
    train_labels = sorted(task._source("train").read_one(i, None)[1] for i in range(8))
    assert train_labels == [0] * 4 + [1] * 4  # the synsets' indices in tfds's label list
    assert eval_coverage(task, "val") == 6
    in_process = take(task.train_batches(1, 1, 2), 3)
    config.data.workers = 2
    assert_batch_lists_equal(in_process, take(tasks.get_task(config).train_batches(1, 1, 2), 3))


def imagenet_prepare_error(capsys, manual, tfds_dir) -> str:
    """The one ``error:`` line of ``python -m hgrn_jax.data.imagenet`` (exit code 2)."""
    capsys.readouterr()  # tfds's progress bars so far
    with pytest.raises(SystemExit) as info:
        imagenet.main(["--manual_dir", str(manual), "--tfds_dir", str(tfds_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_imagenet_prepare_without_whole_archives_is_one_line(tmp_path, capsys):
    """Missing archives, or a truncated one (an interrupted download): one ``error:`` line
    naming --manual_dir, and nothing prepared."""
    manual, tfds_dir = tmp_path / "manual", tmp_path / "t"
    assert imagenet_prepare_error(capsys, manual, tfds_dir) == (
        "error: DatasetMissingError: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not in "
        f"--manual_dir='{manual}': download the ILSVRC2012 training and validation archives "
        "(image-net.org, after registering) into that folder"
    )
    fx.write_imagenet_archives(manual, per_class=1, num_val=1)
    train_tar = manual / imagenet.ARCHIVES[0]
    train_tar.write_bytes(train_tar.read_bytes()[: train_tar.stat().st_size // 2])
    assert imagenet_prepare_error(capsys, manual, tfds_dir) == (
        "error: BadDataError: ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar in "
        f"--manual_dir='{manual}' is truncated or not a tar archive (ReadError: unexpected end "
        "of data): download it again and compare its MD5 with image-net.org's"
    )
    assert not list(tfds_dir.rglob("*.array_record*"))
    # The validation archive cut short: TensorFlow's reader fails past its end (a traceback).
    fx.write_imagenet_archives(manual, per_class=1, num_val=1)
    val_tar = manual / imagenet.ARCHIVES[1]
    val_tar.write_bytes(val_tar.read_bytes()[:700])  # into its first image
    line = imagenet_prepare_error(capsys, manual, tfds_dir)
    assert line.startswith(
        "error: BadDataError: ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar in "
        f"--manual_dir='{manual}' is truncated or not a tar archive ("
    ), line


def test_imagenet_prepare_over_tfrecord_data_is_one_line_and_keeps_them(tmp_path, capsys):
    """imagenet2012 prepared in tfds's default tfrecord format (no random access) in --tfds_dir:
    one ``error:`` line naming the folder and the fix; the tfrecord data are left as they were."""
    manual, tfds_dir = tmp_path / "manual", tmp_path / "t"
    fx.write_imagenet_archives(manual, per_class=1, num_val=1)
    tfds.builder(imagenet.NAME, data_dir=str(tfds_dir)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    before = sorted((p.name, p.stat().st_size) for p in tfds_dir.rglob("*") if p.is_file())
    line = imagenet_prepare_error(capsys, manual, tfds_dir)
    assert line.startswith(f"error: ValueError: {tfds_dir / imagenet.NAME} already holds ")
    assert line.endswith(
        "prepare into another folder (--tfds_dir=NEW_DIR) and train with "
        "--config.data.tfds_dir=NEW_DIR"
    )
    assert sorted((p.name, p.stat().st_size) for p in tfds_dir.rglob("*") if p.is_file()) == before


@pytest.mark.slow
def test_imagenet_soft_target_loss_equals_label_smoothing_without_mixing(tmp_path, mock):
    from flax import nnx

    task = tasks.get_task(imagenet_config(tmp_path))
    batch = next(task.eval_batches("val", 0, 1))
    batch["weight"][-1] = 0.0
    soft = dict(batch, targets=imagenet.smooth_one_hot(batch["labels"], 1000, 0.1))
    model = task.build_model(nnx.Rngs(0))
    loss, sums = task.loss_fn(model, soft, train=False)
    hard_loss, hard_sums = tasks.classification_loss(
        model(batch["images"]), batch["labels"], batch["weight"], label_smoothing=0.1
    )
    np.testing.assert_allclose(float(loss), float(hard_loss), rtol=1e-5)
    for key in ("loss_sum", "weight", "correct"):
        np.testing.assert_allclose(float(sums[key]), float(hard_sums[key]), rtol=1e-5)
    assert float(sums["weight"]) == 3.0


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_imagenet_trains_end_to_end_on_mock_data(tmp_path, mock):
    """Mixup/CutMix soft targets through the training loop's jitted step and evaluation."""
    fx.train_briefly(imagenet_config(tmp_path), tmp_path / "run", steps=2)

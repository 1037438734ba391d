"""LRA Image (CIFAR-10 RGB, docs/design.md 3.4): 2-D HGRN, 6 layers, d 512, BN, 32 x 32 pixels; 88.69%.

The paper's run reads RGB pixels (not the usual grey sequence) with crop and flip augmentation.
CIFAR-10 (tfds ``cifar10`` in ``data.tfds_dir``) is read by ``hgrn_jax.tasks``;
``tiny`` uses generated 8 x 8 images whose label is the bright quadrant.
"""

from experiments.configs import common

PATH = "experiments/configs/lra/image.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "image",
        scan="2d",
        layers=6,
        features=512,
        glu_expand=1,
        norm="batch",
        batch_size=50,
        learning_rate=3e-3,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=30_000,
        decay_steps=50_000,
        epochs=100,
        paper_accuracy=88.69,
        position_encoding=True,
    )
    c.model.encoder = "linear"
    c.model.input_channels = 3
    c.model.grid_shape = (32, 32)
    c.data.source = "tfds"
    c.data.seq_len = 32 * 32
    c.data.image_size = 32
    c.data.augment = True  # random crop (4-pixel symmetric padding) + flip, as the paper
    c.data.grayscale = False  # True: LRA's grey variant (set model.input_channels=1)
    c.data.train_examples = 45_000
    c.data.val_examples = 1_000
    c.data.test_examples = 1_000
    return common.finish(c, preset, {"tiny": _tiny}, PATH)


def _tiny(c):
    c.model.num_layers = 2
    c.model.features = 32
    # Derived from the source (0 / ()): 8 x 8 images of 4 classes here, CIFAR-10's 32 x 32 and
    # 10 classes with --config.data.source=tfds.
    c.model.num_classes = 0
    c.model.grid_shape = ()
    c.data.source = "synthetic"
    c.data.image_size = 0
    c.data.seq_len = 0
    c.data.augment = False
    c.data.train_examples = 2_000
    c.data.val_examples = 256
    c.data.test_examples = 256
    common.tiny_schedule(c, steps=120, batch_size=32, learning_rate=3e-3)

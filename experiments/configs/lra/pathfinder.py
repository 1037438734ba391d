"""LRA Pathfinder (docs/design.md 3.4): 2-D HGRN, 6 layers, d 128, BN, 32 x 32 grey pixels; 92.92%.

No position encoding (as the paper's run). The release's ``pathfinder32`` images (in
``data.lra_dir``) are read by ``hgrn_jax.tasks``; ``tiny`` uses generated 12 x 12
path images.
"""

from experiments.configs import common

PATH = "experiments/configs/lra/pathfinder.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "pathfinder",
        scan="2d",
        layers=6,
        features=128,
        glu_expand=1,
        norm="batch",
        batch_size=128,
        learning_rate=2e-3,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=50_000,
        decay_steps=500_000,
        epochs=200,
        paper_accuracy=92.92,
        position_encoding=False,
    )
    return common.finish(_pathfinder_data(c, size=32), preset, {"tiny": tiny}, PATH)


def _pathfinder_data(c, size: int):
    c.model.num_classes = 2
    c.model.encoder = "linear"
    c.model.input_channels = 1
    c.model.grid_shape = (size, size)
    c.data.source = "release"
    c.data.seq_len = size * size
    c.data.image_size = size
    c.data.path_length = size * 3 // 4  # generated stand-in (source="synthetic") only
    c.data.train_examples = 160_000
    c.data.val_examples = 1_000
    c.data.test_examples = 1_000
    return c


def tiny(c):
    """Shared with Path-X: a 2-layer d-32 model on generated 12 x 12 path images."""
    c.model.num_layers = 2
    c.model.features = 32
    # Derived from the source (0 / ()): 12 x 12 generated images here, the release's 32 x 32
    # (Path-X: 128 x 128) with --config.data.source=release.
    c.model.grid_shape = ()
    c.data.source = "synthetic"
    c.data.image_size = 0
    c.data.seq_len = 0
    c.data.path_length = 8
    c.data.train_examples = 2_000
    c.data.val_examples = 256
    c.data.test_examples = 256
    common.tiny_schedule(c, steps=100, batch_size=32, learning_rate=3e-3)

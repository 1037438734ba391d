"""LRA Path-X (docs/design.md 3.4): 2-D HGRN, 6 layers, d 64, sync BN, 128 x 128 grey pixels; 97.50%.

No position encoding. The release's ``pathfinder128`` images (in ``data.lra_dir``) are read by
``hgrn_jax.tasks``; ``tiny`` uses generated 12 x 12 path images (as Pathfinder's).
"""

from experiments.configs import common
from experiments.configs.lra import pathfinder

PATH = "experiments/configs/lra/pathx.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "pathx",
        scan="2d",
        layers=6,
        features=64,
        glu_expand=1,
        norm="sync_batch",
        batch_size=16,
        learning_rate=7.5e-4,
        weight_decay=0.0,
        dropout=0.0,
        warmup_steps=150_000,
        decay_steps=500_000,
        epochs=100,
        paper_accuracy=97.50,
        position_encoding=False,
    )
    c = pathfinder._pathfinder_data(c, size=128)
    return common.finish(c, preset, {"tiny": pathfinder.tiny}, PATH)

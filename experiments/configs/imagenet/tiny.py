"""ImageNet-1k, HGRN-Tiny (docs/design.md 3.4): d 192 x 12 layers, 6.11M parameters; 74.40% top-1.

DeiT's recipe as the paper's run used it (OpenNLPLab/HGRN's script_im.sh): 300 epochs, batch 2048,
AdamW lr 2e-3 wd 0.05 (timm's rule: not on biases and norm scales), timm's per-epoch cosine from
1e-6 over 10 warmup epochs down to 1e-5, label smoothing 0.1, grad clip 5, repeated
augmentation 3, float32, and the augmentations in ``data.augment`` (applied by the real
pipeline, ``hgrn_jax.data.imagenet``); docs/design.md 3.4.
The ``tiny`` preset trains a 2-layer model on generated 28 x 28 colour images (4 patches of 14).
"""

from experiments.configs import common

PATH = "experiments/configs/imagenet/tiny.py"


def get_config(preset: str | None = None):
    c = common.imagenet_config(features=192, paper_top1=74.40, paper_params=6_107_560)
    return common.finish(c, preset, {"tiny": common.imagenet_tiny}, PATH)

"""ImageNet-1k, HGRN-Small (docs/design.md 3.4): d 384 x 12 layers, 23.72M parameters; 80.09% top-1.

DeiT's recipe as :mod:`experiments.configs.imagenet.tiny`; ``tiny`` is the same generated-data
preset.
"""

from experiments.configs import common

PATH = "experiments/configs/imagenet/small.py"


def get_config(preset: str | None = None):
    c = common.imagenet_config(features=384, paper_top1=80.09, paper_params=23_715_688)
    return common.finish(c, preset, {"tiny": common.imagenet_tiny}, PATH)

"""The model families of the tasks: a config dataclass and a module class each."""

from __future__ import annotations

from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.image import HGRNImageClassifier, ImageConfig
from hgrn_jax.nn.lm import HGRNLM, LMConfig
from hgrn_jax.tasks.model_settings import ModelKind

CLASSIFIER = ModelKind(ClassifierConfig, HGRNClassifier, causal=False)
"""LRA: token or pixel sequences (1-D or 2-D mixers), one label per sequence."""
IMAGE = ModelKind(ImageConfig, HGRNImageClassifier, causal=False)
"""ImageNet: patches of images (B, H, W, 3)."""
LM = ModelKind(LMConfig, HGRNLM, causal=True)
"""Language modelling: next-token logits."""

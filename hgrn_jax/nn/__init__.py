"""Flax NNX modules of HGRN and HGRN2: token mixers, channel mixers, lower bounds, blocks, models."""

from hgrn_jax.nn.attention import SoftmaxAttention
from hgrn_jax.nn.blocks import ResidualBlock
from hgrn_jax.nn.checks import checked_token_ids
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.embeddings import sinusoidal_positions
from hgrn_jax.nn.fla_hgrn import FlaHGRNAttention
from hgrn_jax.nn.generate import generate, sample_token
from hgrn_jax.nn.glu import GLU
from hgrn_jax.nn.hgrn2 import HGRN2, HGRN2D, FlaHGRN2Attention, HGRN2DSeries
from hgrn_jax.nn.hgru import HGRU, HGRU2D
from hgrn_jax.nn.image import HGRNImageClassifier, ImageConfig
from hgrn_jax.nn.lm import HGRNLM, LMConfig
from hgrn_jax.nn.lower_bounds import LowerBounds, lower_bounds
from hgrn_jax.nn.mixers import MixerConfig, make_mixer
from hgrn_jax.nn.norms import BatchNorm, ScaleFreeRMSNorm, make_norm

__all__ = [
    "BatchNorm",
    "checked_token_ids",
    "ClassifierConfig",
    "HGRNClassifier",
    "HGRNImageClassifier",
    "ImageConfig",
    "generate",
    "sample_token",
    "sinusoidal_positions",
    "FlaHGRNAttention",
    "FlaHGRN2Attention",
    "GLU",
    "HGRN2",
    "HGRN2D",
    "HGRN2DSeries",
    "HGRNLM",
    "HGRU",
    "HGRU2D",
    "LMConfig",
    "LowerBounds",
    "MixerConfig",
    "make_mixer",
    "ResidualBlock",
    "ScaleFreeRMSNorm",
    "SoftmaxAttention",
    "lower_bounds",
    "make_norm",
]

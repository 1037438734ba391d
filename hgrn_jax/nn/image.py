"""The ImageNet classifier: patch embedding, bidirectional HGRU over raster order, mean pool, head.

Layout of the paper's ``hgrn1d_vit_tiny`` / ``_small`` (OpenNLPLab/im): non-overlapping 14 x 14
patches projected linearly to d (a convolution with kernel = stride = 14), no class token, no
position embedding; 12 pre-norm blocks of a bidirectional HGRU with separate phases (``BiHgru1d``)
and a SiLU GLU of hidden 2d with biases, each with two LayerNorms; the LRA lower-bound scheme;
mean over patches, a parameter-free RMS norm and a linear head. That layout gives exactly the
paper's 6,107,560 (Tiny) and 23,715,688 (Small) parameters.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.deprecation import HGRNDeprecationWarning
from hgrn_jax.nn.blocks import check_stack_config, residual_stack
from hgrn_jax.nn.checks import check_config_values
from hgrn_jax.nn.initializers import dense
from hgrn_jax.nn.lower_bounds import LowerBounds
from hgrn_jax.nn.mixers import LEGACY_MIXER_FIELDS, MixerConfig, fold_legacy_fields
from hgrn_jax.nn.norms import make_norm


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Everything that defines an :class:`HGRNImageClassifier`; presets :meth:`tiny`, :meth:`small`.

    ``image_size``: ``(H, W)``, or one int for a square image; a multiple of ``patch_size``.
    ``mixer``: the token mixer (:class:`~hgrn_jax.nn.MixerConfig` or a dict of its fields; 1-D,
    run in both directions over the patches in raster order). ``glu_expand``: GLU hidden width
    ``round(glu_expand * features)``. ``head_norm_epsilon``: the reference divides by
    ``rms + 1e-8``; ``rsqrt(mean(x^2) + 1e-16)`` is the same to float32 rounding whenever the rms
    is far above 1e-8. ``remat`` as in :class:`~hgrn_jax.nn.ClassifierConfig`.

    Deprecated (a DeprecationWarning): ``in_channels`` (now ``input_channels``, as in
    :class:`~hgrn_jax.nn.ClassifierConfig`) and the flat mixer fields ``separate_phases``,
    ``complex_valued``, ``use_forget_gate``, ``norm_before_gate``, ``mixer_bias``, ``method``,
    ``sequence_axis`` (now in ``mixer``).
    """

    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)  # an int is read as (n, n)
    patch_size: int = 14
    input_channels: int = 3
    features: int = 192
    num_layers: int = 12
    glu_expand: float = 2
    glu_activation: str = "silu"
    glu_bias: bool = True
    mixer: MixerConfig = MixerConfig()
    use_lower_bound: bool = True
    norm: str = "layer"
    norm_epsilon: float = 1e-5
    head_norm_epsilon: float = 1e-16
    dropout: float = 0.0
    remat: str | None = None
    # Deprecated aliases (None: not given).
    in_channels: int | None = None
    separate_phases: bool | None = None
    complex_valued: bool | None = None
    use_forget_gate: bool | None = None
    norm_before_gate: bool | None = None
    mixer_bias: bool | None = None
    method: str | None = None
    sequence_axis: str | None = None

    def __post_init__(self):
        size = self.image_size
        try:  # 28 stands for (28, 28); lists from a config file become a hashable tuple
            size = (operator.index(size),) * 2 if not hasattr(size, "__len__") else size
            size = tuple(operator.index(n) for n in size)
        except TypeError:
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(
                f"ImageConfig(image_size={self.image_size!r}): image_size must be (H, W) of "
                "positive integers, or one for a square image"
            )
        object.__setattr__(self, "image_size", size)
        if self.in_channels is not None:
            warnings.warn(
                "ImageConfig(in_channels=...) is deprecated; use input_channels "
                "(the name ClassifierConfig uses)",
                HGRNDeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "input_channels", self.in_channels)
            object.__setattr__(self, "in_channels", None)
        object.__setattr__(self, "mixer", MixerConfig.coerce(self.mixer, "ImageConfig"))
        object.__setattr__(
            self, "mixer", fold_legacy_fields(self, LEGACY_MIXER_FIELDS, "ImageConfig")
        )
        check_stack_config(self)
        check_config_values(
            self,
            counts=("num_classes", "patch_size", "input_channels"),
            positives=("head_norm_epsilon",),
        )
        self.mixer.check_model(self.features, self.use_lower_bound, "ImageConfig")
        if self.mixer.scan != "1d":
            raise ValueError(
                "ImageConfig scans the patches in raster order: mixer scan must "
                f"be '1d'; got {self.mixer.scan!r}"
            )
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @classmethod
    def tiny(cls, **overrides) -> ImageConfig:
        """HGRN-Tiny: d 192 x 12 layers, 6,107,560 parameters."""
        return cls(**{"features": 192, "num_layers": 12, **overrides})

    @classmethod
    def small(cls, **overrides) -> ImageConfig:
        """HGRN-Small: d 384 x 12 layers, 23,715,688 parameters."""
        return cls(**{"features": 384, "num_layers": 12, **overrides})


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p) * (W/p), p * p * C): raster order of patches, each patch
    flattened row by row with channels last (the reference's ``b (h w) (p1 p2 c)``)."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class HGRNImageClassifier(nnx.Module):
    """``model(images) -> logits (B, num_classes)`` for images (B, H, W, C) (channels last)."""

    def __init__(
        self,
        config: ImageConfig,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        c, d = config, config.features
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        patch_dim = c.patch_size * c.patch_size * c.input_channels
        self.patch_embed = dense(patch_dim, d, (None, "embed"), **common)
        self.lower_bounds = LowerBounds(
            c.num_layers, d, scheme="lra", enabled=c.use_lower_bound, param_dtype=param_dtype
        )
        self.blocks = residual_stack(c, causal=False, **common)
        self.head_norm = make_norm("scale_free_rms", d, epsilon=c.head_norm_epsilon, **common)
        self.head = dense(d, c.num_classes, ("embed", "classes"), **common)

    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        expected = (*c.image_size, c.input_channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            channels_first = images.ndim == 4 and images.shape[1] == expected[2]
            fix = (
                "transpose NCHW images with x.transpose(0, 2, 3, 1)"
                if channels_first
                else "resize them, or build the model with ImageConfig(image_size=..., "
                "input_channels=...) of theirs"
            )
            raise ValueError(
                f"images must be (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) channels-last; got {images.shape} ({fix})"
            )
        x = self.patch_embed(patchify(images.astype(self.dtype or jnp.float32), c.patch_size))
        bounds = self.lower_bounds()
        for k, block in enumerate(self.blocks):
            x = block(x, bounds[k])
        pooled = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=1).astype(x.dtype)
        return self.head(self.head_norm(pooled))

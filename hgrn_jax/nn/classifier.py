"""The Long Range Arena classifier: encoder, pre-norm HGRU + GLU stack, masked mean pool, head.

One class covers the six LRA tasks of the paper (docs/design.md 3.3-3.4): token embedding (ListOps,
Text, Retrieval) or linear pixel encoder (Image, Pathfinder, Path-X), optional fixed sinusoidal
positions with their own dropout, a bidirectional token mixer (a 1-D or 2-D four-scan HGRU, or
HGRN2: :class:`~hgrn_jax.nn.MixerConfig`), Layer- or BatchNorm, mean pooling over valid positions and a linear head; ``dual=True`` is the Retrieval
model that encodes two documents with one encoder and classifies ``[u, v, u - v, u * v]``.

Padding. ``mask`` (B, L) marks real tokens with 1. Padded steps become identity steps of every
scan (decay 1, input 0), so a state passes through padding unchanged and a reverse scan starts
at the last real token with a zero state: the real positions see exactly the unpadded sequence,
wherever the padding sits. BatchNorm computes its training statistics over real positions only,
and the pool averages real positions only. Extra padding therefore leaves the logits unchanged
in eval and in train mode (up to float32 rounding; dropout aside). The reference code masks only
the pool, so its reverse scans see the padding; on unpadded inputs both compute the same thing.

Synchronised BatchNorm: under ``jax.jit`` over a global batch, ``"batch"`` statistics are global
already. Inside ``shard_map``, ``norm="sync_batch"`` with ``axis_name`` averages the replicas'
statistics (Flax's ``pmean``); with padding, each replica's masked mean gets equal weight, which
is the global masked mean only when the replicas hold equally many real tokens.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.deprecation import HGRNDeprecationWarning
from hgrn_jax.nn.blocks import check_stack_config, residual_stack
from hgrn_jax.nn.checks import check_config_values, check_length, check_token_ids
from hgrn_jax.nn.embeddings import Embed, sinusoidal_positions
from hgrn_jax.nn.initializers import dense, logical
from hgrn_jax.nn.lower_bounds import LowerBounds
from hgrn_jax.nn.mixers import LEGACY_MIXER_FIELDS, MixerConfig, fold_legacy_fields
from hgrn_jax.nn.norms import apply_norm, make_norm

POSITION_DROPOUT = 0.1
"""ClassifierConfig's default ``position_dropout``, which a model without positions accepts."""


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything that defines an :class:`HGRNClassifier` (docs/design.md 3.4 has each task's values).

    encoder: ``"embed"`` for token ids (needs ``vocab_size``) or ``"linear"`` for float inputs
      with ``input_channels`` channels.
    mixer: the token mixer (:class:`~hgrn_jax.nn.MixerConfig`, or its fields as a dict), run in
      both directions. ``MixerConfig(scan="2d")`` (or HGRN2's ``"2d_series"``) scans the
      ``grid_shape`` = (H, W) grid (inputs in raster order, L = H * W);
      ``MixerConfig(kind="hgrn2", expand_ratio=...)`` is HGRN2. A 1-D mixer does not read
      ``grid_shape`` (it scans the same inputs in raster order; the image tasks fill it in
      whatever the scan, so it is not refused).
    use_lower_bound: the per-layer forget-gate lower bounds (off: the paper's ablation).
    norm: ``"layer"``, ``"batch"`` or ``"sync_batch"`` (``axis_name`` names the replica axis
      inside ``shard_map``, and only there; under ``jax.jit`` over a global batch, BatchNorm is
      already global; another norm refuses it). ``batch_norm_groups`` > 1 (``norm="batch"``
      only): each of that many equal slices of the batch is normalised by its own statistics in
      training, as an unsynchronised BatchNorm on that many data-parallel GPUs
      (:class:`~hgrn_jax.nn.norms.BatchNorm`'s ``groups``; HGRN2's Pathfinder: 8).
    glu_expand: GLU hidden width = ``round(glu_expand * features)``.
    dropout: residual dropout; ``position_dropout`` follows the position encoding (without one,
      a value other than its default or 0 is refused).
    dual: the Retrieval model (two documents, one encoder, ``[u, v, u - v, u * v]`` head).
    remat: a :mod:`hgrn_jax.nn.remat` policy name per block (None: off).

    Deprecated (a DeprecationWarning; they move into ``mixer``): ``mixer="1d" | "2d"`` (now
    ``MixerConfig(scan=...)``), ``separate_phases``, ``complex_valued``, ``use_forget_gate``,
    ``norm_before_gate``, ``mixer_bias`` (``use_bias``), ``method``, ``sequence_axis``.
    """

    num_classes: int = 10
    features: int = 128
    num_layers: int = 6
    glu_expand: float = 1
    glu_activation: str = "silu"
    glu_bias: bool = True
    encoder: Literal["embed", "linear"] = "embed"
    vocab_size: int | None = None
    input_channels: int | None = None
    mixer: MixerConfig = MixerConfig()
    grid_shape: tuple[int, int] | None = None
    use_lower_bound: bool = True
    norm: Literal["layer", "batch", "sync_batch"] = "batch"
    norm_epsilon: float = 1e-5
    batch_norm_groups: int = 1
    axis_name: str | None = None
    dropout: float = 0.0
    position_encoding: bool = False
    position_dropout: float = POSITION_DROPOUT
    pooling: Literal["mean"] = "mean"
    dual: bool = False
    remat: str | None = None
    # Deprecated aliases of MixerConfig fields (None: not given).
    separate_phases: bool | None = None
    complex_valued: bool | None = None
    use_forget_gate: bool | None = None
    norm_before_gate: bool | None = None
    mixer_bias: bool | None = None
    method: str | None = None
    sequence_axis: str | None = None

    def __post_init__(self):
        if self.grid_shape is not None:  # lists (from a config file) -> a hashable tuple
            object.__setattr__(self, "grid_shape", tuple(int(n) for n in self.grid_shape))
        mixer = self.mixer
        if isinstance(mixer, str):
            if mixer not in ("1d", "2d"):
                raise ValueError(f"unknown mixer {mixer!r}; use MixerConfig(scan='1d' | '2d')")
            warnings.warn(
                f"ClassifierConfig(mixer={mixer!r}) is deprecated; use "
                f"ClassifierConfig(mixer=MixerConfig(scan={mixer!r}))",
                HGRNDeprecationWarning,
                stacklevel=3,
            )
            mixer = MixerConfig(scan=mixer)
        object.__setattr__(self, "mixer", MixerConfig.coerce(mixer, "ClassifierConfig"))
        object.__setattr__(
            self, "mixer", fold_legacy_fields(self, LEGACY_MIXER_FIELDS, "ClassifierConfig")
        )
        check_stack_config(self)
        check_config_values(
            self,
            counts=("num_classes", "vocab_size", "input_channels", "batch_norm_groups"),
            rates=("position_dropout",),
        )
        if self.batch_norm_groups != 1 and self.norm != "batch":
            raise ValueError(
                f"ClassifierConfig(batch_norm_groups={self.batch_norm_groups}) is for "
                f"norm='batch'; norm={self.norm!r} has no batch groups: set batch_norm_groups=1"
            )
        if self.grid_shape is not None and not all(n >= 1 for n in self.grid_shape):
            raise ValueError(
                f"ClassifierConfig(grid_shape={self.grid_shape}): grid_shape must be (H, W) of "
                "positive integers"
            )
        self.mixer.check_model(self.features, self.use_lower_bound, "ClassifierConfig")
        if self.encoder == "embed" and not self.vocab_size:
            raise ValueError("encoder='embed' needs vocab_size (the number of token ids)")
        if self.encoder == "linear" and not self.input_channels:
            raise ValueError("encoder='linear' needs input_channels (e.g. 1 for grey, 3 for RGB)")
        if self.encoder not in ("embed", "linear"):
            raise ValueError(f"unknown encoder {self.encoder!r}; use 'embed' or 'linear'")
        if self.mixer.grid and (self.grid_shape is None or len(self.grid_shape) != 2):
            raise ValueError(
                f"mixer scan={self.mixer.scan!r} needs grid_shape=(H, W), e.g. (32, 32) for "
                "LRA Image; a 1-D "
                "task (no grid: ListOps, Text, Retrieval) takes mixer.scan='1d'"
            )
        if self.norm not in ("layer", "batch", "sync_batch"):
            raise ValueError(f"unknown norm {self.norm!r}; use 'layer', 'batch' or 'sync_batch'")
        if self.pooling != "mean":
            raise ValueError(f"unknown pooling {self.pooling!r}; only 'mean' is implemented")
        if self.axis_name is not None and self.norm != "sync_batch":
            raise ValueError(
                f"ClassifierConfig: axis_name={self.axis_name!r} is read only by "
                f"norm='sync_batch' (the replica axis of its statistics); norm={self.norm!r} "
                "ignores it: leave axis_name unset or set norm='sync_batch'"
            )
        if not self.position_encoding and self.position_dropout not in (POSITION_DROPOUT, 0.0):
            raise ValueError(
                f"ClassifierConfig: position_dropout={self.position_dropout} follows the "
                "position encoding, which is off (position_encoding=False); set "
                "position_encoding=True or leave position_dropout at its default"
            )


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of (B, ..., d) over every axis but the first and last, counting only ``mask`` (B, ...)
    positions (accumulated in float32). Returns (B, d) in ``x``'s dtype."""
    axes = tuple(range(1, x.ndim - 1))
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if mask is None:
        return jnp.mean(x32, axis=axes).astype(x.dtype)
    valid = mask[..., None]
    total = jnp.sum(jnp.where(valid, x32, 0.0), axis=axes)
    count = jnp.maximum(jnp.sum(valid, axis=axes), 1).astype(x32.dtype)
    return (total / count).astype(x.dtype)


class HGRNClassifier(nnx.Module):
    """LRA classifier: ``model(inputs, mask=None) -> logits (B, num_classes)``.

    inputs: token ids (B, L) int for ``encoder="embed"``; floats (B, L, C) (or (B, L) when C = 1)
    for ``encoder="linear"``. With a 2-D mixer, L = H * W in raster order. mask: (B, L), 1 (or
    True) for real tokens, 0 for padding; None means no padding.

    Retrieval (``dual=True``): ``model(inputs, mask, inputs2, mask2)`` with the two documents of
    each pair, both (B, L); they pass through one encoder as a batch of 2B (so BatchNorm sees
    both), each is pooled, and the head classifies ``[u, v, u - v, u * v]``. The batch of 2B
    interleaves the pairs (documents 1 and 2 of pair 0, then of pair 1, ...), so that the device
    holding a pair's rows holds both its pooled vectors. (With all first documents before all
    second ones, XLA gathered the pooled vectors whole on a 2 x 2 x 2 mesh: "Involuntary full
    rematerialization".)

    Train/eval: ``model.train()`` / ``model.eval()`` switch dropout and BatchNorm statistics.
    """

    def __init__(
        self,
        config: ClassifierConfig,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        c, d = config, config.features
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if c.encoder == "embed":
            self.encoder = Embed(
                c.vocab_size,
                d,
                embedding_init=logical(nnx.initializers.normal(1.0), ("vocab", "embed")),
                **common,
            )
        else:
            self.encoder = dense(c.input_channels, d, (None, "embed"), **common)
        self.position_dropout = nnx.Dropout(
            c.position_dropout if c.position_encoding else 0.0, rngs=rngs
        )
        self.lower_bounds = LowerBounds(
            c.num_layers, d, scheme="lra", enabled=c.use_lower_bound, param_dtype=param_dtype
        )
        self.blocks = residual_stack(c, causal=False, axis_name=c.axis_name, **common)
        self.final_norm = make_norm(
            c.norm,
            d,
            epsilon=c.norm_epsilon,
            axis_name=c.axis_name,
            batch_norm_groups=c.batch_norm_groups,
            **common,
        )
        if c.dual:
            self.pair_proj = dense(4 * d, d, ("mlp", "embed"), **common)
        self.head = dense(d, c.num_classes, ("embed", "classes"), **common)

    def _check_inputs(
        self, inputs: jax.Array, mask: jax.Array | None, name: str
    ) -> tuple[jax.Array, jax.Array | None]:
        c = self.config
        if c.encoder == "embed":
            if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
                raise ValueError(
                    f"{name}: encoder='embed' takes integer token ids "
                    f"(batch, length); got {inputs.dtype} {inputs.shape}"
                )
            check_length(inputs.shape, "token ids (batch, length)", name)
            check_token_ids(inputs, c.vocab_size, name)
        else:
            if inputs.ndim == 2 and c.input_channels == 1:
                inputs = inputs[..., None]
            if inputs.ndim != 3 or inputs.shape[-1] != c.input_channels:
                raise ValueError(
                    f"{name}: encoder='linear' takes floats (batch, length, "
                    f"{c.input_channels}); got shape {inputs.shape}"
                )
            check_length(inputs.shape, f"floats (batch, length, {c.input_channels})", name)
        if c.mixer.grid and inputs.shape[1] != c.grid_shape[0] * c.grid_shape[1]:
            raise ValueError(
                f"{name}: length {inputs.shape[1]} is not H * W for grid_shape "
                f"{c.grid_shape}; pass inputs in raster order of that grid"
            )
        if mask is not None:
            if mask.shape != inputs.shape[:2]:
                raise ValueError(
                    f"{name}: mask must be (batch, length) = {inputs.shape[:2]}; got {mask.shape}"
                )
            mask = mask.astype(bool)
        return inputs, mask

    def encode(self, inputs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Pooled features (B, d) of one batch of sequences (see the class docstring)."""
        c = self.config
        inputs, mask = self._check_inputs(inputs, mask, "inputs")
        if c.encoder == "linear":
            inputs = inputs.astype(self.dtype or jnp.float32)
        x = self.encoder(inputs)
        if c.position_encoding:
            x = x + sinusoidal_positions(x.shape[1], c.features, x.dtype)
            x = self.position_dropout(x)
        if c.mixer.grid:
            grid = (x.shape[0], *c.grid_shape)
            x = x.reshape(*grid, c.features)
            mask = None if mask is None else mask.reshape(grid)
        bounds = self.lower_bounds()
        for k, block in enumerate(self.blocks):
            x = block(x, bounds[k], mask=mask)
        x = apply_norm(self.final_norm, x, mask)
        return masked_mean(x, mask)

    def __call__(
        self,
        inputs: jax.Array,
        mask: jax.Array | None = None,
        inputs2: jax.Array | None = None,
        mask2: jax.Array | None = None,
    ) -> jax.Array:
        if not self.config.dual:
            if inputs2 is not None:
                raise ValueError("inputs2 is only for the Retrieval model; set dual=True")
            return self.head(self.encode(inputs, mask))
        if inputs2 is None:
            raise ValueError(
                "the dual (Retrieval) model needs both documents: "
                "model(inputs, mask, inputs2, mask2)"
            )
        if inputs.shape != inputs2.shape:
            raise ValueError(
                f"both documents must have the same shape (pad them to one length); "
                f"got {inputs.shape} and {inputs2.shape}"
            )
        if (mask is None) != (mask2 is None):
            ones = jnp.ones(inputs.shape[:2], bool)
            mask = ones if mask is None else mask
            mask2 = ones if mask2 is None else mask2
        both, both_mask = _interleave(inputs, inputs2), None
        if mask is not None:
            both_mask = _interleave(mask, mask2)
        pooled = self.encode(both, both_mask)
        pairs = pooled.reshape(inputs.shape[0], 2, pooled.shape[-1])
        u, v = pairs[:, 0], pairs[:, 1]
        features = jnp.concatenate([u, v, u - v, u * v], axis=-1)
        return self.head(nnx.gelu(self.pair_proj(features), approximate=False))


def _interleave(first: jax.Array, second: jax.Array) -> jax.Array:
    """(B, ...) and (B, ...) -> (2B, ...) with rows first[0], second[0], first[1], ...: a
    pair's rows stay side by side, on the device that holds the pair."""
    return jnp.stack([first, second], axis=1).reshape(2 * first.shape[0], *first.shape[1:])

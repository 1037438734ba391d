"""HGRN causal language model with constant-cost recurrent decoding.

One class covers the paper's WikiText-103 model (complex HGRU mixers, LayerNorm, bilinear GLU,
embedding scaled by sqrt(d) and tied to the output), its HGRN2 version (``MixerConfig(kind=
"hgrn2")``) and fla's ``HGRNForCausalLM`` / ``HGRN2ForCausalLM`` (RMSNorm, SwiGLU, untied head):
see :class:`LMConfig` and its presets. The recurrent cache holds one state per layer: (B, d) for
HGRU mixers, (B, H, K, V) for HGRN2.
"""

from __future__ import annotations

import dataclasses
import math
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
from hgrn_jax.nn.norms import make_norm

Cache = tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Everything that defines an :class:`HGRNLM`. Defaults are the paper's WikiText-103 model.

    ``mixer``: the token mixer (:class:`~hgrn_jax.nn.MixerConfig` or a dict of its fields), run
    causally; ``MixerConfig(kind="hgrn2", ...)`` gives the HGRN2 LM. ``glu_expand``: GLU hidden
    width ``round(glu_expand * features)``. ``remat``: a :mod:`hgrn_jax.nn.remat` policy name per
    block (None: off). ``position_encoding``: add sinusoidal positions to the (scaled) token
    embeddings, for the attention mixer (the Transformer baseline; HGRU mixers know the order from
    their recurrence); such a model has no :meth:`HGRNLM.step`, whose cache holds no position.
    ``lower_bound_dtype``: the dtype the bounds are computed in (None: the activations'); with
    ``use_lower_bound=False`` the bounds are zeros of that dtype, which no layer is changed by.

    Deprecated (a DeprecationWarning): ``glu_hidden`` (now ``glu_expand = glu_hidden /
    features``, the name the classifiers use), ``mixer="hgru" | "fla"`` (now
    ``MixerConfig(layout="official" | "fla")``), ``mixer_norm_epsilon`` (now
    ``MixerConfig.norm_epsilon``) and the flat mixer fields ``complex_valued``,
    ``use_forget_gate``, ``norm_before_gate``, ``mixer_bias``, ``method``, ``sequence_axis``.
    """

    vocab_size: int = 50264
    features: int = 512
    num_layers: int = 6
    glu_expand: float = 2
    glu_activation: str = "none"
    glu_bias: bool = True
    mixer: MixerConfig = MixerConfig()
    norm: Literal["layer", "rms"] = "layer"
    norm_epsilon: float = 1e-5
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    use_lower_bound: bool = True
    lower_bound_dtype: str | None = None
    position_encoding: bool = False
    dropout: float = 0.0
    remat: str | None = None
    # Deprecated aliases (None: not given).
    glu_hidden: int | None = None
    complex_valued: bool | None = None
    use_forget_gate: bool | None = None
    norm_before_gate: bool | None = None
    mixer_bias: bool | None = None
    mixer_norm_epsilon: float | None = None
    method: str | None = None
    sequence_axis: str | None = None

    def __post_init__(self):
        if self.glu_hidden is not None:
            warnings.warn(
                "LMConfig(glu_hidden=...) is deprecated; use glu_expand = hidden / "
                "features (the name ClassifierConfig and ImageConfig use)",
                HGRNDeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "glu_expand", self.glu_hidden / self.features)
            object.__setattr__(self, "glu_hidden", None)
        mixer = self.mixer
        if isinstance(mixer, str):
            layouts = {"hgru": "official", "fla": "fla"}
            if mixer not in layouts:
                raise ValueError(
                    f"unknown mixer {mixer!r}; use MixerConfig(layout='official' | 'fla')"
                )
            warnings.warn(
                f"LMConfig(mixer={mixer!r}) is deprecated; use LMConfig(mixer="
                f"MixerConfig(layout={layouts[mixer]!r}))",
                HGRNDeprecationWarning,
                stacklevel=3,
            )
            mixer = MixerConfig(layout=layouts[mixer])
        object.__setattr__(self, "mixer", MixerConfig.coerce(mixer, "LMConfig"))
        object.__setattr__(
            self,
            "mixer",
            fold_legacy_fields(
                self, {**LEGACY_MIXER_FIELDS, "mixer_norm_epsilon": "norm_epsilon"}, "LMConfig"
            ),
        )
        if self.mixer.scan != "1d":
            raise ValueError(f"the LM is 1-D: mixer scan must be '1d'; got {self.mixer.scan!r}")
        check_stack_config(self)
        check_config_values(self, counts=("vocab_size",))
        if self.lower_bound_dtype is not None:
            try:
                floating = jnp.issubdtype(jnp.dtype(self.lower_bound_dtype), jnp.floating)
            except TypeError:
                floating = False
            if not floating:
                raise ValueError(
                    f"LMConfig(lower_bound_dtype={self.lower_bound_dtype!r}): use a float dtype "
                    "such as 'float32', or None for the activations' dtype"
                )
        self.mixer.check_model(self.features, self.use_lower_bound, "LMConfig")

    @classmethod
    def fla(cls, kind: str = "hgrn", expand_ratio: int | None = None, **overrides) -> LMConfig:
        """fla's ``HGRNForCausalLM`` (``kind="hgrn"``) or ``HGRN2ForCausalLM`` (``"hgrn2"``)
        layout: RMSNorm, SwiGLU, untied head, float32 lower bounds; the fla mixers have no
        biases. fla's HGRN mixer norm uses ``norm_eps`` (1e-6); HGRN2's always 1e-5.
        ``expand_ratio``: the mixer's (HGRN2's head width, 128 when None as in fla; fla HGRN's
        width multiplier, 1); ``overrides``: other :class:`LMConfig` fields."""
        if kind == "hgrn":
            mixer = MixerConfig(
                kind="hgrn",
                layout="fla",
                complex_valued=False,
                use_bias=False,
                norm_epsilon=1e-6,
                expand_ratio=expand_ratio,
            )
        elif kind == "hgrn2":
            mixer = MixerConfig(
                kind="hgrn2",
                layout="fla",
                use_bias=False,
                norm_epsilon=1e-5,
                expand_ratio=expand_ratio,
            )
        else:
            raise ValueError(f"unknown kind {kind!r}; use 'hgrn' or 'hgrn2'")
        base = dict(
            mixer=mixer,
            glu_activation="silu",
            glu_bias=False,
            norm="rms",
            norm_epsilon=1e-6,
            scale_embeddings=False,
            tie_embeddings=False,
            lower_bound_dtype="float32",
        )
        base.update(overrides)
        return cls(**base)


class HGRNLM(nnx.Module):
    """Causal HGRN language model: ``lm(ids) -> logits``.

    ids (B, T) int -> logits (B, T, vocab). For generation, ``lm.init_cache(B)`` gives one
    recurrent state per layer and ``lm.step(ids, cache)`` consumes any number of new tokens (a
    prefill or one token), returning their logits and the new cache: the cost of a token does not
    depend on how long the context is.
    """

    def __init__(
        self,
        config: LMConfig,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        c = config
        d = c.features
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = Embed(
            c.vocab_size,
            d,
            embedding_init=logical(nnx.initializers.normal(d**-0.5), ("vocab", "embed")),
            **common,
        )
        self.lower_bounds = LowerBounds(
            c.num_layers,
            d,
            scheme="lm",
            enabled=c.use_lower_bound,
            dtype=c.lower_bound_dtype,
            param_dtype=param_dtype,
        )
        self.blocks = residual_stack(c, causal=True, **common)
        self.final_norm = make_norm(c.norm, d, epsilon=c.norm_epsilon, **common)
        self.embed_dropout = nnx.Dropout(c.dropout, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head = dense(d, c.vocab_size, ("embed", "vocab"), use_bias=False, **common)

    def _embed(self, ids: jax.Array) -> jax.Array:
        ids = jnp.asarray(ids)  # NumPy arrays and nested lists of ids too
        if ids.ndim != 2:
            hint = " (one token per row: pass ids[:, None])" if ids.ndim == 1 else ""
            raise ValueError(
                f"ids: expected token ids (batch, length); got shape {ids.shape}{hint}"
            )
        check_length(ids.shape, "token ids (batch, length)", "ids")
        check_token_ids(ids, self.config.vocab_size, "ids")
        x = self.embed(ids)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.features)
        if self.config.position_encoding:
            x = x + sinusoidal_positions(ids.shape[1], self.config.features, x.dtype)
        return self.embed_dropout(x)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            return self.embed.attend(x)
        return self.lm_head(x)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self._embed(ids)
        bounds = self.lower_bounds()
        for k, block in enumerate(self.blocks):
            x = block(x, bounds[k])
        return self._logits(x)

    def _check_cache(self, cache: Cache, batch_size: int) -> None:
        """ValueError naming the layer and the fix unless ``cache`` holds one state per layer of
        the shape :meth:`init_cache` ``(batch_size)`` gives (shapes only: free under jit)."""
        layers = len(self.blocks)
        fix = "pass lm.init_cache(batch_size) (or the cache the previous step returned)"
        if not isinstance(cache, (tuple, list)):
            raise ValueError(
                f"cache must be a tuple of {layers} per-layer states; got "
                f"{type(cache).__name__}: {fix}"
            )
        if len(cache) != layers:
            raise ValueError(f"cache has {len(cache)} layers; the model has {layers}: {fix}")
        for k, (block, state) in enumerate(zip(self.blocks, cache)):
            want = block.mixer.state_shape(batch_size)
            if tuple(jnp.shape(state)) != want:
                raise ValueError(
                    f"cache[{k}] has shape {tuple(jnp.shape(state))}; layer {k} keeps a state of "
                    f"shape {want} for ids of batch {batch_size}: start from "
                    f"lm.init_cache({batch_size})"
                )

    def init_cache(self, batch_size: int) -> Cache:
        """Zero recurrent states, one (B, state width) array per layer."""
        return tuple(block.mixer.init_state(batch_size) for block in self.blocks)

    def step(
        self, ids: jax.Array, cache: Cache, mask: jax.Array | None = None
    ) -> tuple[jax.Array, Cache]:
        """Logits (B, T, vocab) of ``ids`` (B, T) continuing from ``cache``, and the new cache.

        ``cache``: :meth:`init_cache` ``(B)`` or the cache of the previous step, one state per
        layer ((B, d) or (B, H, K, V)); another structure or batch size is a ValueError naming it.

        ``mask`` (B, T) with 1 for real tokens and 0 for padding (or longer along time: its last
        T steps are used; None: no padding) goes to every layer. The logits at padded positions
        are not meaningful. For a left-padded prefill from :meth:`init_cache` (each row's real
        tokens at its end) the returned cache, and the logits at real positions, are those of
        the row without its padding (to float32 rounding). Every mixer (HGRU, HGRN2 and fla's
        HGRN layout) makes padded steps identity steps wherever they sit, so a padded step
        leaves the cache as it was.
        """
        if self.config.position_encoding:
            raise ValueError(
                "LMConfig(position_encoding=True) cannot generate: step() continues from a "
                "recurrent cache, which holds no position; use a recurrent mixer without positions"
            )
        x = self._embed(ids)
        self._check_cache(cache, x.shape[0])
        if mask is not None:
            mask = jnp.asarray(mask)  # NumPy arrays and nested lists too
        bounds = self.lower_bounds()
        new_cache = []
        for k, block in enumerate(self.blocks):
            x, state = block.step(x, cache[k], bounds[k], mask)
            new_cache.append(state)
        # The cache's own type (a list given, a list returned), as a lax.scan carry must be.
        return self._logits(x), new_cache if isinstance(cache, list) else tuple(new_cache)

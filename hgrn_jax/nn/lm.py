"""HGRN causal language model with constant-cost recurrent decoding.

One class covers the paper's WikiText-103 model (complex HGRU mixers, LayerNorm, bilinear GLU,
embedding scaled by sqrt(d) and tied to the output) and fla's ``HGRNForCausalLM`` (real mixers,
RMSNorm, SwiGLU, untied head): see :class:`LMConfig` and its presets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.blocks import ResidualBlock
from hgrn_jax.nn.checks import check_length, check_token_ids
from hgrn_jax.nn.fla_hgrn import FlaHGRNAttention
from hgrn_jax.nn.glu import GLU
from hgrn_jax.nn.hgru import HGRU
from hgrn_jax.nn.initializers import dense, logical
from hgrn_jax.nn.lower_bounds import LowerBounds
from hgrn_jax.nn.norms import make_norm

Cache = tuple[jax.Array, ...]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Everything that defines an :class:`HGRNLM`. Defaults are the paper's WikiText-103 model.

    ``remat``: a :mod:`hgrn_jax.nn.remat` policy name per block (None: off). ``sequence_axis``: a
    mesh axis to split the sequence over (:mod:`hgrn_jax.ops.sequence_parallel`; hgru mixers).
    """

    vocab_size: int = 50264
    features: int = 512
    num_layers: int = 6
    glu_hidden: int = 1024
    glu_activation: str = "none"
    glu_bias: bool = True
    mixer: Literal["hgru", "fla"] = "hgru"
    complex_valued: bool = True
    use_forget_gate: bool = True
    norm_before_gate: bool = True
    mixer_bias: bool = True
    mixer_norm_epsilon: float = 1e-5
    norm: Literal["layer", "rms"] = "layer"
    norm_epsilon: float = 1e-5
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    use_lower_bound: bool = True
    lower_bound_dtype: str | None = None
    dropout: float = 0.0
    method: str = "auto"
    remat: str | None = None
    sequence_axis: str | None = None

    @classmethod
    def fla(cls, **overrides) -> "LMConfig":
        """fla's ``HGRNForCausalLM`` layout (real mixers, RMSNorm, SwiGLU, untied head)."""
        base = dict(mixer="fla", complex_valued=False, glu_activation="silu", glu_bias=False,
                    mixer_bias=False, norm="rms", norm_epsilon=1e-6, mixer_norm_epsilon=1e-6,
                    scale_embeddings=False, tie_embeddings=False, lower_bound_dtype="float32")
        base.update(overrides)
        return cls(**base)


class HGRNLM(nnx.Module):
    """Causal HGRN language model: ``lm(ids) -> logits``.

    ids (B, T) int -> logits (B, T, vocab). For generation, ``lm.init_cache(B)`` gives one
    recurrent state per layer and ``lm.step(ids, cache)`` consumes any number of new tokens (a
    prefill or one token), returning their logits and the new cache: the cost of a token does not
    depend on how long the context is.
    """

    def __init__(self, config: LMConfig, *, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        c = config
        d = c.features
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(c.vocab_size, d,
                               embedding_init=logical(nnx.initializers.normal(d ** -0.5),
                                                      ("vocab", "embed")),
                               **common)
        self.lower_bounds = LowerBounds(c.num_layers, d, scheme="lm", enabled=c.use_lower_bound,
                                        dtype=c.lower_bound_dtype, param_dtype=param_dtype)
        blocks = []
        for k in range(c.num_layers):
            blocks.append(ResidualBlock(
                self._mixer(k, common),
                GLU(d, c.glu_hidden, act=c.glu_activation, use_bias=c.glu_bias, **common),
                make_norm(c.norm, d, epsilon=c.norm_epsilon, **common),
                make_norm(c.norm, d, epsilon=c.norm_epsilon, **common),
                dropout=c.dropout, remat=c.remat, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.final_norm = make_norm(c.norm, d, epsilon=c.norm_epsilon, **common)
        self.embed_dropout = nnx.Dropout(c.dropout, rngs=rngs)
        if not c.tie_embeddings:
            self.lm_head = dense(d, c.vocab_size, ("embed", "vocab"), use_bias=False, **common)

    def _mixer(self, layer: int, common: dict) -> nnx.Module:
        c = self.config
        if c.mixer == "fla":
            if c.sequence_axis is not None:
                raise ValueError("sequence_axis (sequence parallelism) needs mixer='hgru'")
            # fla's first layer ignores its (zero) bound; log(0) would also poison gradients.
            return FlaHGRNAttention(c.features, use_lower_bound=c.use_lower_bound and layer > 0,
                                    norm_epsilon=c.mixer_norm_epsilon, method=c.method, **common)
        if c.mixer == "hgru":
            return HGRU(c.features, bidirectional=False, complex_valued=c.complex_valued,
                        use_forget_gate=c.use_forget_gate, norm_before_gate=c.norm_before_gate,
                        use_bias=c.mixer_bias, norm_epsilon=c.mixer_norm_epsilon,
                        method=c.method, sequence_axis=c.sequence_axis, **common)
        raise ValueError(f"unknown mixer {c.mixer!r}; use 'hgru' or 'fla'")

    def _embed(self, ids: jax.Array) -> jax.Array:
        if ids.ndim != 2:
            raise ValueError(f"ids: expected token ids (batch, length); got shape {ids.shape}")
        check_length(ids.shape, "token ids (batch, length)", "ids")
        check_token_ids(ids, self.config.vocab_size, "ids")
        x = self.embed(ids)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.features)
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

    def init_cache(self, batch_size: int) -> Cache:
        """Zero recurrent states, one (B, state width) array per layer."""
        return tuple(block.mixer.init_state(batch_size) for block in self.blocks)

    def step(self, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Logits (B, T, vocab) of ``ids`` (B, T) continuing from ``cache``, and the new cache."""
        if len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers; the model has {len(self.blocks)}")
        x = self._embed(ids)
        bounds = self.lower_bounds()
        new_cache = []
        for k, block in enumerate(self.blocks):
            x, state = block.step(x, cache[k], bounds[k])
            new_cache.append(state)
        return self._logits(x), tuple(new_cache)

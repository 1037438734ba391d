"""Multi-head softmax attention as a token mixer: the Transformer baseline of the experiments.

``MixerConfig(kind="attention")`` puts it where a model's HGRU would be, so a "same-size
Transformer" differs from the HGRN model in the token mixer only (same width, depth, norms, GLU,
encoder, pooling and head). Attention has no order of its own: give the model its sinusoidal
positions (``ClassifierConfig(position_encoding=True)``, ``LMConfig(position_encoding=True)``).

    q, k, v = split(qkv_proj(x))                       (B, L, heads, d / heads) each
    y = out_proj(softmax(q k^T / sqrt(d / heads) + mask) v)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.initializers import dense


def default_num_heads(features: int) -> int:
    """Heads of 64 channels, as the benchmarks' Transformer (at least 1; d must divide)."""
    return max(features // 64, 1)


class SoftmaxAttention(nnx.Module):
    """``(B, L, d) -> (B, L, d)``, causal or bidirectional; the mixer call of the HGRN layers
    (``layer(x, lower_bound, mask=...)``; the lower bound is ignored).

    Args:
      features: model width d, a multiple of ``num_heads``.
      num_heads: attention heads (None: :func:`default_num_heads`).
      causal: each position attends to itself and earlier ones only.
      use_bias: biases on the two projections.
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int | None = None,
        causal: bool = False,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_heads = num_heads or default_num_heads(features)
        if num_heads < 1 or features % num_heads:
            raise ValueError(
                f"attention needs a number of heads that divides the width; got num_heads="
                f"{num_heads} for d = {features}"
            )
        self.features, self.num_heads, self.causal = features, num_heads, causal
        common = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.qkv_proj = dense(features, 3 * features, ("embed", "rnn"), **common)
        self.out_proj = dense(features, features, ("rnn", "embed"), **common)

    def __call__(
        self, x: jax.Array, lower_bound: jax.Array | float = 0.0, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x`` (B, L, d), ``mask`` (B, L) with 1 for real tokens (None: no padding): padded
        positions are never attended to -> (B, L, d)."""
        del lower_bound
        if x.ndim != 3 or x.shape[-1] != self.features:
            raise ValueError(
                f"SoftmaxAttention expects (batch, length, d) with d = {self.features}; got "
                f"shape {tuple(x.shape)}"
            )
        batch, length, _ = x.shape
        head = self.features // self.num_heads
        qkv = self.qkv_proj(x).reshape(batch, length, 3, self.num_heads, head)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        key_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=key_mask, is_causal=self.causal)
        return self.out_proj(y.reshape(batch, length, self.features))

    def step(self, x: jax.Array, state: jax.Array, lower_bound=0.0):
        raise ValueError(_NO_STATE)

    def state_shape(self, batch_size: int) -> tuple[int, ...]:
        raise ValueError(_NO_STATE)

    def init_state(self, batch_size: int) -> jax.Array:
        raise ValueError(_NO_STATE)


_NO_STATE = (
    "attention has no recurrent state to stream: generation (step) needs a recurrent mixer "
    "(kind='hgrn' or 'hgrn2')"
)

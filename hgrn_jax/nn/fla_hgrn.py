"""The real-valued HGRN token mixer of the fla library (``fla.layers.HGRNAttention``).

Per channel, with gamma the layer's lower bound::

    f   = log sigmoid(f_proj x)                                   (log-space forget gate)
    f   = logaddexp(log gamma, log1p(-gamma) + f)   when the bound is used (lam = gamma + (1-gamma) sigmoid)
    i   = silu(i_proj x) * (1 - exp f)      (times the attention mask, 0 = padding)
    h_t = exp(f_t) * h_{t-1} + i_t
    y   = o_proj( RMSNorm(h) * g_norm * silu(g_proj x) )

No biases, no phase. ``use_lower_bound=False`` reproduces fla's first layer (``layer_idx == 0``),
which ignores its bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.initializers import axes_metadata, dense
from hgrn_jax.ops import linear_recurrence


class FlaHGRNAttention(nnx.Module):
    """fla's HGRN mixer: ``layer(x, lower_bound=None, mask=None)`` on (B, T, d) inputs.

    ``mask`` (B, T) marks real tokens with 1 and padding with 0; padded steps get no input.
    """

    def __init__(
        self,
        features: int,
        *,
        expand_ratio: int = 1,
        use_lower_bound: bool = True,
        norm_epsilon: float = 1e-5,
        method: str = "auto",
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        width = features * expand_ratio
        self.features, self.width = features, width
        self.use_lower_bound = use_lower_bound
        self.norm_epsilon = norm_epsilon
        self.method = method
        self.dtype = dtype
        common = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.i_proj = dense(features, width, ("embed", "rnn"), **common)
        self.f_proj = dense(features, width, ("embed", "rnn"), **common)
        self.g_proj = dense(features, width, ("embed", "rnn"), **common)
        self.o_proj = dense(width, features, ("rnn", "embed"), **common)
        self.g_norm = nnx.RMSNorm(
            width,
            epsilon=norm_epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_metadata=axes_metadata(("rnn",)),
            rngs=rngs,
        )

    def decay_and_input(
        self, x: jax.Array, lower_bound: jax.Array | float | None, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """``exp(f)`` and the gated input ``i`` (B, T, width) in the accumulation dtype."""
        acc = jnp.promote_types(x.dtype, jnp.float32)
        f = jax.nn.log_sigmoid(self.f_proj(x).astype(acc))
        if self.use_lower_bound and lower_bound is not None:
            # fla computes log(gamma) and log1p(-gamma) in the bound's own dtype, then promotes.
            gamma = jnp.asarray(lower_bound)
            f = jnp.logaddexp(jnp.log(gamma).astype(acc), jnp.log1p(-gamma).astype(acc) + f)
        a = jnp.exp(f)
        i = nnx.silu(self.i_proj(x).astype(acc)) * (1.0 - a)
        if mask is not None:
            i = i * mask[..., -i.shape[-2] :, None].astype(acc)
        return a, i

    def output(self, h: jax.Array, x: jax.Array) -> jax.Array:
        h = h.astype(self.dtype or x.dtype)
        return self.o_proj(self.g_norm(h) * nnx.silu(self.g_proj(x)))

    def __call__(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        a, i = self.decay_and_input(x, lower_bound, mask)
        return self.output(linear_recurrence(a, i, method=self.method), x)

    def step(
        self,
        x: jax.Array,
        state: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Streaming: ``x`` (B, T, d) from ``state`` (B, width); returns outputs and the last state."""
        a, i = self.decay_and_input(x, lower_bound, mask)
        h, last = linear_recurrence(a, i, state, method=self.method, return_last_state=True)
        return self.output(h, x), last

    def init_state(self, batch_size: int) -> jax.Array:
        return jnp.zeros(
            (batch_size, self.width), jnp.promote_types(self.dtype or jnp.float32, jnp.float32)
        )

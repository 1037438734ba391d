"""Gated linear unit channel mixer: ``W3(act(W1 x) * W2 x)``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.checks import check_activations, check_width
from hgrn_jax.nn.initializers import dense

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    "none": None,
    "silu": nnx.silu,
    "swish": nnx.silu,
    "gelu": nnx.gelu,
    "relu": nnx.relu,
    "sigmoid": nnx.sigmoid,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array] | None:
    """The activation called ``name`` (``"none"`` gives None, the identity)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def glu_width(glu_expand: float, features: int) -> int:
    """The GLU hidden width of a model: ``round(glu_expand * features)``, at least 1."""
    return max(int(round(glu_expand * features)), 1)


class GLU(nnx.Module):
    """``out_proj(act(gate_proj x) * up_proj x)``: (..., d) -> (..., d) through ``hidden`` units.

    ``act="none"`` is the bilinear GLU of the paper's WikiText-103 model; fla's MLP is ``"silu"``.
    """

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        act: str = "silu",
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        check_width(features, "GLU")
        check_width(hidden, "GLU", "hidden")
        self.features = features
        self.act = activation(act)
        self.gate_proj = dense(features, hidden, ("embed", "mlp"), **common)
        self.up_proj = dense(features, hidden, ("embed", "mlp"), **common)
        self.down_proj = dense(hidden, features, ("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` (..., d) -> (..., d)."""
        check_activations(x, self.features, "(..., d)", "GLU")
        gate = self.gate_proj(x)
        if self.act is not None:
            gate = self.act(gate)
        return self.down_proj(gate * self.up_proj(x))

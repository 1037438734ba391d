"""The pre-norm residual block shared by every HGRN model."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from hgrn_jax.nn.norms import apply_norm
from hgrn_jax.nn.remat import RematModule, with_remat


class ResidualBlock(RematModule):
    """``x + drop(mixer(norm1(x), bound, mask))`` then ``x + drop(mlp(norm2(x)))``.

    ``mixer`` is an HGRU-style token mixer called as ``mixer(x, lower_bound)`` (or with
    ``mask=`` when a padding mask is given) and ``mlp`` a channel mixer (``GLU``). The reference
    LRA stack writes these as two separate residual blocks with their own norms, which is the
    same computation. With a mask, BatchNorm statistics count real positions only.

    ``remat``: None, or a policy of :mod:`hgrn_jax.nn.remat` (``"nothing"``, ``"dots"``, ...)
    under which ``__call__`` is recomputed in the backward pass.
    """

    def __init__(
        self,
        mixer: nnx.Module,
        mlp: nnx.Module,
        norm1: nnx.Module,
        norm2: nnx.Module,
        *,
        dropout: float = 0.0,
        remat: Any = None,
        rngs: nnx.Rngs,
    ):
        self.mixer, self.mlp = mixer, mlp
        self.remat = remat
        self.norm1, self.norm2 = norm1, norm2
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    @with_remat
    def __call__(
        self, x: jax.Array, lower_bound: Any = 0.0, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x`` (B, ..., d), ``mask`` (B, ...) or None -> (B, ..., d)."""
        normed = apply_norm(self.norm1, x, mask)
        mixed = (
            self.mixer(normed, lower_bound)
            if mask is None
            else self.mixer(normed, lower_bound, mask=mask)
        )
        x = x + self.dropout(mixed)
        return x + self.dropout(self.mlp(apply_norm(self.norm2, x, mask)))

    def step(
        self, x: jax.Array, state: jax.Array, lower_bound: Any = 0.0
    ) -> tuple[jax.Array, jax.Array]:
        """Causal streaming through the block; ``state`` is the mixer's recurrent state."""
        y, state = self.mixer.step(self.norm1(x), state, lower_bound)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.norm2(x))), state

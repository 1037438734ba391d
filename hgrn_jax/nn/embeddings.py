"""Token embeddings, and fixed sinusoidal position encodings (the LRA classifiers' absolute
positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from jax.sharding import PartitionSpec


class Embed(nnx.Embed):
    """``nnx.Embed`` that casts the rows it looks up, and reads the whole table on a mesh.

    Rows are gathered from the table in its parameter dtype and cast to ``dtype`` afterwards
    (``nnx.Embed`` casts the table first): the same values, but the table's gradient, a
    scatter-add of every position's cotangent into its token's row, then adds in the
    parameter dtype. Added in bfloat16, a frequent token's row loses most of a long sum (9-17%
    relative error over an LRA batch of 8 x 1024 tokens; 0.5% for the other weights).

    On a mesh of several devices the table's rows (``vocab``) and columns (``embed``) may be
    split over ``model`` and ``fsdp``. Rows gathered from it come out with their feature axis
    split over ``fsdp``, which XLA cannot move onto the batch axis (the ids' and the rest of the
    model's) without all-gathering the (batch, length, features) activations ("Involuntary full
    rematerialization" on a 2 x 2 x 2 mesh). The table is all-gathered first instead, as
    ``fsdp`` does for every weight it applies: the outputs are then split as the ids are, and
    the only collectives are the table's. The values are ``nnx.Embed``'s."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """(...) integer ids -> (..., features)."""
        if out_sharding is not None or self.num_embeddings == 1:
            return super().__call__(inputs, out_sharding)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        table = self.embedding[...]
        if jax.sharding.get_abstract_mesh().size > 1:
            table = jax.lax.with_sharding_constraint(table, PartitionSpec())
        dtype = flax_dtypes.canonicalize_dtype(table, dtype=self.dtype, inexact=False)
        return jnp.take(table, inputs, axis=0).astype(dtype)


def sinusoidal_positions(length: int, features: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The Transformer's fixed encoding, (length, features).

    ``pe[t, 2j] = sin(t / 10000^(2j/d))`` and ``pe[t, 2j+1] = cos(t / 10000^(2j/d))``; an odd
    ``features`` drops the last cosine column.
    """
    positions = jnp.arange(length, dtype=jnp.float32)[:, None]
    frequencies = 10000.0 ** (-jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    angles = positions * frequencies  # (length, ceil(d/2))
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(length, -1)
    return pe[:, :features].astype(dtype)

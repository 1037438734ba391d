"""Fixed sinusoidal position encodings (the LRA classifiers' absolute positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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

"""hgrn_jax: HGRN (hierarchically gated linear RNN) in JAX and Flax NNX."""

__version__ = "0.1.0"

"""hgrn_jax: HGRN (hierarchically gated linear RNN) in JAX and Flax NNX."""

__version__ = "0.1.0"


class HGRNDeprecationWarning(DeprecationWarning):
    """The DeprecationWarning of hgrn_jax's own deprecated names (a subclass, so that the test
    suite can turn exactly these into errors whatever module the warning is attributed to; a
    ``DeprecationWarning`` filter catches them as before)."""

"""The warning category of hgrn_jax's deprecated names (the lowest layer: any module may warn)."""


class HGRNDeprecationWarning(DeprecationWarning):
    """The DeprecationWarning of hgrn_jax's own deprecated names (a subclass, so that the test
    suite can turn exactly these into errors whatever module the warning is attributed to; a
    ``DeprecationWarning`` filter catches them as before)."""

"""The pre-norm residual block shared by every HGRN model."""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.checks import check_activations, check_config_values
from hgrn_jax.nn.glu import GLU, glu_width
from hgrn_jax.nn.mixers import MixerConfig, make_mixer
from hgrn_jax.nn.norms import apply_norm, inference_norm, make_norm
from hgrn_jax.nn.remat import RematModule, resolve_policy, with_remat


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
        check_activations(
            x, getattr(self.mixer, "features", None), "(batch, ..., d)", "ResidualBlock"
        )
        normed = apply_norm(self.norm1, x, mask)
        mixed = (
            self.mixer(normed, lower_bound)
            if mask is None
            else self.mixer(normed, lower_bound, mask=mask)
        )
        x = x + self.dropout(mixed)
        return x + self.dropout(self.mlp(apply_norm(self.norm2, x, mask)))

    def step(
        self, x: jax.Array, state: jax.Array, lower_bound: Any = 0.0, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Causal streaming through the block: ``x`` (B, T, d) -> (B, T, d) and the mixer's new
        recurrent ``state``. ``mask`` (B, T), or longer along time (its last T steps are used),
        goes to the mixer's ``step`` when given: padded positions leave the state as the mixer
        defines (see its ``step``) and their outputs are not meaningful. A BatchNorm uses its
        running statistics here in either mode (:func:`~hgrn_jax.nn.norms.inference_norm`)."""
        check_activations(
            x, getattr(self.mixer, "features", None), "(batch, T, d)", "ResidualBlock.step"
        )
        normed = inference_norm(self.norm1, x)
        y, state = (
            self.mixer.step(normed, state, lower_bound)
            if mask is None
            else self.mixer.step(normed, state, lower_bound, mask=mask)
        )
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(inference_norm(self.norm2, x))), state


class StackConfig(Protocol):
    """The fields of a model config that :func:`residual_stack` reads (every model config has
    them: :class:`~hgrn_jax.nn.ClassifierConfig`, :class:`~hgrn_jax.nn.ImageConfig`,
    :class:`~hgrn_jax.nn.LMConfig`)."""

    features: int
    num_layers: int
    mixer: MixerConfig
    use_lower_bound: bool
    glu_expand: float
    glu_activation: str
    glu_bias: bool
    norm: str
    norm_epsilon: float
    dropout: float
    remat: str | None


def check_stack_config(config: StackConfig) -> None:
    """Raise a one-line ValueError naming the field for a :class:`StackConfig` value out of
    range (a model config's ``__post_init__`` calls it): ``features`` and ``num_layers``
    positive integers, ``dropout`` in [0, 1), ``glu_expand`` and ``norm_epsilon`` above 0,
    ``remat`` a known policy."""
    check_config_values(
        config,
        counts=("features", "num_layers"),
        rates=("dropout",),
        positives=("glu_expand", "norm_epsilon"),
    )
    if config.remat is not None:
        try:
            resolve_policy(config.remat)
        except ValueError as error:
            raise ValueError(f"{type(config).__name__}(remat={config.remat!r}): {error}") from None


def residual_stack(
    config: StackConfig,
    *,
    causal: bool,
    axis_name: str | None = None,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.List:
    """``config.num_layers`` :class:`ResidualBlock` s of width ``config.features``: the mixer of
    ``config.mixer`` (``causal`` or bidirectional), a GLU and two ``config.norm`` norms each.

    Layer 0 gets no lower bound: its bound is exactly 0 in both schemes, and the fla layouts would
    take ``log(0)`` (fla's first layer ignores its bound too). ``axis_name`` is the replica axis of
    ``norm="sync_batch"``.
    """
    c, d = config, config.features
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def norm() -> nnx.Module:
        groups = getattr(c, "batch_norm_groups", 1)
        return make_norm(
            c.norm,
            d,
            epsilon=c.norm_epsilon,
            axis_name=axis_name,
            batch_norm_groups=groups,
            **common,
        )

    # Built in this order (mixer, GLU, norms, block) so that seeded initialisations stay as they were.
    return nnx.List(
        [
            ResidualBlock(
                make_mixer(
                    c.mixer, d, causal=causal, use_lower_bound=c.use_lower_bound and k > 0, **common
                ),
                GLU(
                    d,
                    glu_width(c.glu_expand, d),
                    act=c.glu_activation,
                    use_bias=c.glu_bias,
                    **common,
                ),
                norm(),
                norm(),
                dropout=c.dropout,
                remat=c.remat,
                rngs=rngs,
            )
            for k in range(c.num_layers)
        ]
    )

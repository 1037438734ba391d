"""The real-valued HGRN token mixer of the fla library (``fla.layers.HGRNAttention``).

Per channel, with gamma the layer's lower bound::

    f   = log sigmoid(f_proj x)                                   (log-space forget gate)
    f   = logaddexp(log gamma, log1p(-gamma) + f)   when the bound is used (lam = gamma + (1-gamma) sigmoid)
    i   = silu(i_proj x) * (1 - exp f)
    h_t = exp(f_t) * h_{t-1} + i_t
    y   = o_proj( RMSNorm(h) * g_norm * silu(g_proj x) )

No biases, no phase. ``use_lower_bound=False`` reproduces fla's first layer (``layer_idx == 0``),
which ignores its bound.

A padding mask (0 = padding) makes padded steps identity steps (decay 1, input 0), as in every
layer here: real positions and the last state see exactly the unpadded sequence, as fla's
unpadded (variable-length) path does. fla's padded path only zeroes the input there, so its state
still decays over padding between real tokens; with left padding (generation's) the two agree.

Sequence parallelism (``sequence_axis``, a mesh axis): the full-sequence scan of ``__call__``
runs split over that axis of the mesh set by ``jax.set_mesh``
(:func:`~hgrn_jax.ops.sequence_parallel.padded_sharded_linear_recurrence`, as HGRU's), a length
the axis size does not divide padded with identity steps at the end; :meth:`step` (decoding, a
prompt's prefill) stays unsharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.checks import (
    check_counts,
    check_flags,
    check_layer_input,
    check_mask,
    check_method,
    check_rngs,
    check_state,
    check_width,
)
from hgrn_jax.nn.initializers import dense
from hgrn_jax.nn.lower_bounds import apply_log_lower_bound
from hgrn_jax.nn.norms import make_norm
from hgrn_jax.nn.recurrent_state import (
    carried,
    compute_dtype,
    gate_dtype,
    layer_state_dtype,
    zero_state,
)
from hgrn_jax.ops import METHODS, linear_recurrence
from hgrn_jax.ops.sequence_parallel import padded_sharded_linear_recurrence


class FlaHGRNAttention(nnx.Module):
    """fla's HGRN mixer: ``layer(x, lower_bound=None, mask=None)`` on (B, T, d) inputs.

    ``mask`` (B, T) marks real tokens with 1 and padding with 0; padded steps are identity steps
    (decay 1, no input), wherever the padding sits. Outputs at padded steps are not zeros (the
    HGRN2 layers' are): they are fla's, the norm, gate and projection of the state carried
    through the padding; leave them out of pooling and losses (the models here do).
    ``sequence_axis``: a mesh axis to split the sequence over in ``__call__`` (see the module
    docstring); None: unsplit.
    """

    def __init__(
        self,
        features: int,
        *,
        expand_ratio: int = 1,
        use_lower_bound: bool = True,
        norm_epsilon: float = 1e-5,
        method: str = "auto",
        sequence_axis: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_width(features, type(self).__name__)
        check_rngs(rngs, type(self).__name__)
        check_counts(type(self).__name__, expand_ratio=expand_ratio)
        check_flags(type(self).__name__, use_lower_bound=use_lower_bound)
        width = features * expand_ratio
        self.features, self.width = features, width
        self.use_lower_bound = use_lower_bound
        self.norm_epsilon = norm_epsilon
        check_method(method, METHODS, type(self).__name__)
        self.method = method
        self.sequence_axis = sequence_axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        common = dict(use_bias=False, **layer)
        self.i_proj = dense(features, width, ("embed", "rnn"), **common)
        self.f_proj = dense(features, width, ("embed", "rnn"), **common)
        self.g_proj = dense(features, width, ("embed", "rnn"), **common)
        self.o_proj = dense(width, features, ("rnn", "embed"), **common)
        self.g_norm = make_norm("rms", width, epsilon=norm_epsilon, axis="rnn", **layer)

    def decay_and_input(
        self, x: jax.Array, lower_bound: jax.Array | float | None, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """``exp(f)`` and the gated input ``i`` (B, T, width) in the accumulation dtype."""
        acc = gate_dtype(x.dtype, self.dtype, self.param_dtype)
        f = jax.nn.log_sigmoid(self.f_proj(x).astype(acc))
        if self.use_lower_bound:
            f = apply_log_lower_bound(f, lower_bound)
        a = jnp.exp(f)
        i = nnx.silu(self.i_proj(x).astype(acc)) * (1.0 - a)
        if mask is not None:  # padded steps are identity steps: decay 1, no input
            real = jnp.asarray(mask)[..., -i.shape[-2] :, None].astype(bool)
            a, i = jnp.where(real, a, 1.0), jnp.where(real, i, 0.0)
        return a, i

    def check_input(self, x: jax.Array, mask: jax.Array | None, *, streaming: bool = False) -> None:
        """ValueError naming the expected shape for an ``x`` that is not (B, T, d) with T >= 1,
        or a ``mask`` that is not (B, T) (in :meth:`step` it may be longer along time)."""
        check_layer_input(x, self.features, "(batch, length, d)", type(self).__name__)
        check_mask(mask, x.shape, type(self).__name__, streaming=streaming)

    def output(self, h: jax.Array, x: jax.Array) -> jax.Array:
        h = h.astype(compute_dtype(x.dtype, self.dtype, self.param_dtype))
        return self.o_proj(self.g_norm(h) * nnx.silu(self.g_proj(x)))

    def __call__(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (B, T, d), ``lower_bound`` a scalar or (width,), ``mask`` (B, T) -> (B, T, d)."""
        self.check_input(x, mask)
        a, i = self.decay_and_input(x, lower_bound, mask)
        if self.sequence_axis is None:
            h = linear_recurrence(a, i, method=self.method)
        else:
            h = padded_sharded_linear_recurrence(
                a, i, axis_name=self.sequence_axis, method=self.method
            )
        return self.output(h, x)

    def step(
        self,
        x: jax.Array,
        state: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Streaming: ``x`` (B, T, d) from ``state`` (B, width); returns outputs and the last state.
        ``mask`` (B, T) or longer along time (its last T steps are used)."""
        self.check_input(x, mask, streaming=True)
        check_state(state, self.state_shape(x.shape[0]), self.state_dtype, type(self).__name__)
        a, i = self.decay_and_input(x, lower_bound, mask)
        h, last = linear_recurrence(a, i, state, method=self.method, return_last_state=True)
        return self.output(h, x), carried(last, state, self.state_dtype)

    def state_shape(self, batch_size: int) -> tuple[int, ...]:
        """The recurrent state's shape (B, width)."""
        return (batch_size, self.width)

    @property
    def state_dtype(self) -> jnp.dtype:
        """float32 (float64 for a float64 layer)."""
        return layer_state_dtype(self.dtype, self.param_dtype)

    def init_state(self, batch_size: int) -> jax.Array:
        """The zero recurrent state (B, width) for :meth:`step`, in :attr:`state_dtype`, which
        :meth:`step` returns (for inputs of any dtype: the state is a ``lax.scan`` carry)."""
        return zero_state(self.state_shape(batch_size), self.state_dtype, type(self).__name__)

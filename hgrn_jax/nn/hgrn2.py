"""HGRN2 token mixers: HGRN's gated recurrence with a matrix state per head (state expansion).

Per head, with key width K, value width V and the layer's lower bound gamma on the key channels::

    S_t = diag(lambda_t) S_{t-1} + k_t v_t^T         S: (K, V), S_{-1} = 0
    o_t = c * q_t^T S_t                              o: (V,)
    k_t = 1 - lambda_t,  lambda_t = gamma + (1 - gamma) sigmoid(f_t)

(docs/design.md and tests/golden/README.md, "HGRN2 cases"). The output gate plays the query, one
minus the forget gate the key, the input the value. Channels are split into heads in contiguous
blocks (head-major): channel ``c`` of q, k and lambda is head ``c // K``, key index ``c % K``.

Two layouts of the same recurrence (and two 2-D forms of :class:`HGRN2`, :class:`HGRN2D` and
:class:`HGRN2DSeries`):

- :class:`HGRN2` is hgru2-pytorch's ``Hgru2_1d`` / ``BiHgru2_1d``: one fused input projection
  d -> 3d in blocks ``[u | output gate | forget gate]``, value ``silu(u)``, query
  ``sigmoid(output gate)``, ``c = 1``, LayerNorm over the d outputs, biases, ``out_proj``;
  ``K = V = expand_ratio`` and d / expand_ratio heads.
- :class:`FlaHGRN2Attention` is fla's ``HGRN2Attention``: ``q_proj`` / ``f_proj`` / ``i_proj`` /
  ``o_proj`` without biases, query ``silu(q_proj x)``, plain value ``i_proj x``, the lower bound
  applied in log space (``logaddexp(log gamma, log1p(-gamma) + log sigmoid f)``) and only when
  ``use_lower_bound`` (fla: ``layer_idx > 0``), ``c = 1 / sqrt(K)``, RMSNorm over the head outputs
  with eps 1e-5 (fla never passes its ``norm_eps`` to that norm), ``o_proj``.

Bidirectional mixers run a second scan over the reversed sequence with the same q, k, v and
lambda, and add the two outputs before the norm: because the readout is linear in the state this
is the same as summing the two scans' states (what ``BiHgru2_1d`` does, and how HGRU's
bidirectional mixers combine directions), and the norm then sees the combined context. Both
scans include the current token, so it is counted twice, as in the reference.

Padding (``mask`` (B, L), 1 = token): a padded step has query, key and value 0 and decay 1, i.e.
it is skipped, and its output is 0, whatever the input there (NaN and inf included). With left padding (and for holes, by the same argument) this is exactly
fla's unpadding, where each row's tokens form one sequence from a zero state and padded positions
output 0; a reverse scan likewise starts at the last real token from a zero state.

Sequence parallelism (``sequence_axis``, a mesh axis): the full-sequence scans along time (along
H, each column, for :class:`HGRN2D`) run split over that axis of the mesh set by
``jax.set_mesh`` (:func:`hgrn_jax.ops.sequence_parallel.sharded_matrix_recurrence`). A length the
axis size does not divide is padded at the end with identity steps (k = 0, g = 0) whose outputs
are cut off: a forward scan reaches them after every real step, and so does the reverse scan,
which runs forward over the flipped sequence. ``step()`` decoding stays unsharded.

Recurrent decoding: ``init_state(B)`` gives the zero state (B, H, K, V) (key index first; fla's
cache stores the transpose (B, H, V, K)) and ``step(x, state, lower_bound)`` continues a causal
mixer over any number of tokens, equal to the full pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.checks import (
    check_counts,
    check_flags,
    check_keywords,
    check_layer_input,
    check_mask,
    check_method,
    check_rngs,
    check_state,
    check_width,
)
from hgrn_jax.nn.initializers import dense
from hgrn_jax.nn.lower_bounds import apply_log_lower_bound, bounded_decay_and_log
from hgrn_jax.nn.norms import make_norm
from hgrn_jax.nn.recurrent_state import (
    carried,
    compute_dtype,
    gate_dtype,
    layer_state_dtype,
    zero_state,
)
from hgrn_jax.ops import MATRIX_METHODS, matrix_recurrence
from hgrn_jax.ops.sequence_parallel import (
    cut_time,
    mesh_axis_size,
    pad_time,
    sharded_matrix_recurrence,
)


def _heads(x: jax.Array, width: int) -> jax.Array:
    """(..., H * width) -> (..., H, width): contiguous, head-major channel blocks."""
    return x.reshape(x.shape[:-1] + (x.shape[-1] // width, width))


def _valid(mask: jax.Array, length: int) -> jax.Array:
    """The last ``length`` steps of ``mask`` (B, T) as booleans (B, length, 1, 1)."""
    return jnp.asarray(mask)[..., -length:].astype(bool)[..., None, None]


class _MatrixMixer(nnx.Module):
    """The recurrence, its directions, padding and streaming; subclasses make q, k, v, log lambda."""

    features: int
    num_heads: int
    key_dim: int
    value_dim: int
    scale: float
    bidirectional: bool
    method: str
    sequence_axis: str | None
    dtype: jnp.dtype | None
    param_dtype: jnp.dtype

    def gates(self, x: jax.Array, lower_bound) -> tuple[jax.Array, ...]:
        """``q, k, log_decay`` (B, L, H, K) and ``v`` (B, L, H, V) in the accumulation dtype."""
        raise NotImplementedError

    def output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """Norm and output projection of the head outputs ``o`` (B, L, H * V)."""
        raise NotImplementedError

    def check_input(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        layout: str = "(batch, length, d)",
        *,
        streaming: bool = False,
    ) -> None:
        """ValueError naming the expected shape for an ``x`` of the wrong rank or width or with
        an empty axis, or a ``mask`` that is not ``x``'s shape without the channels (in
        :meth:`step` it may be longer along time)."""
        name = type(self).__name__
        check_layer_input(x, self.features, layout, name)
        check_mask(mask, x.shape, name, streaming=streaming)

    def _inputs(self, x, lower_bound, mask):
        q, k, v, g = self.gates(x, lower_bound)
        if mask is None:
            return q, k, v, g
        # Selected, not multiplied: a padded step is an identity step (state unchanged, output
        # 0) whatever its input, a non-finite one included (0 * nan is nan).
        valid = _valid(mask, x.shape[-2])
        return tuple(jnp.where(valid, t, 0.0) for t in (q, k, v, g))

    def _scan(self, q, k, v, g, h0=None, return_last_state=False):
        return matrix_recurrence(
            q,
            k,
            v,
            g,
            h0,
            scale=self.scale,
            method=self.method,
            return_last_state=return_last_state,
        )

    def _sequence_scan(self, q, k, v, g) -> jax.Array:
        """:meth:`_scan` over a whole sequence (time at axis -3), split over mesh axis
        ``sequence_axis`` when it is set. A length the axis size does not divide is padded with
        identity steps at the end, and their outputs cut off."""
        if self.sequence_axis is None:
            return self._scan(q, k, v, g)
        length = q.shape[-3]
        shards = mesh_axis_size(self.sequence_axis)
        q, k, v, g = pad_time((q, k, v, g), (0.0,) * 4, shards, time_axis=-3)
        o = sharded_matrix_recurrence(
            q, k, v, g, axis_name=self.sequence_axis, scale=self.scale, method=self.method
        )
        return cut_time(o, length, self.sequence_axis, time_axis=-3)

    def _finish(self, o: jax.Array, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        heads_joined = o.reshape(o.shape[:-2] + (o.shape[-2] * o.shape[-1],))  # (.., H * V)
        y = self.output(
            heads_joined.astype(compute_dtype(x.dtype, self.dtype, self.param_dtype)), x
        )
        if mask is None:
            return y
        return jnp.where(_valid(mask, x.shape[-2])[..., 0], y, jnp.zeros_like(y))

    def __call__(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (B, L, d), ``lower_bound`` a scalar or (H * K,), ``mask`` (B, L) with 1 for real
        tokens (None: no padding) -> (B, L, d). Wrong shapes are a ValueError naming them."""
        self.check_input(x, mask)
        return self._mix(x, lower_bound, mask, self._sequence_scan)

    def _mix(self, x, lower_bound, mask, scan) -> jax.Array:
        """The layer over lines ``x`` (B, L, d) with ``mask`` (B, L) or None, each direction's
        recurrence run by ``scan`` (:meth:`_sequence_scan` or :meth:`_scan`) -> (B, L, d)."""
        q, k, v, g = self._inputs(x, lower_bound, mask)
        o = scan(q, k, v, g)
        if self.bidirectional:
            flip = lambda t: jnp.flip(t, axis=-3)
            o = o + flip(scan(flip(q), flip(k), flip(v), flip(g)))
        return self._finish(o, x, mask)

    def step(
        self,
        x: jax.Array,
        state: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Causal streaming: ``x`` (B, T, d) continuing from ``state`` (B, H, K, V). Returns the
        outputs (B, T, d) and the state after the last token (padded steps leave it unchanged).
        ``mask`` (B, T) or longer along time (its last T steps are used)."""
        if self.bidirectional:
            raise ValueError("step() needs a causal mixer (bidirectional=False)")
        self.check_input(x, mask, streaming=True)
        check_state(state, self.state_shape(x.shape[0]), self.state_dtype, type(self).__name__)
        q, k, v, g = self._inputs(x, lower_bound, mask)
        o, last = self._scan(q, k, v, g, h0=state, return_last_state=True)
        return self._finish(o, x, mask), carried(last, state, self.state_dtype)

    def state_shape(self, batch_size: int) -> tuple[int, ...]:
        """The recurrent state's shape (B, H, K, V)."""
        return (batch_size, self.num_heads, self.key_dim, self.value_dim)

    @property
    def state_dtype(self) -> jnp.dtype:
        """float32 (float64 for a float64 layer)."""
        return layer_state_dtype(self.dtype, self.param_dtype)

    def init_state(self, batch_size: int) -> jax.Array:
        """The zero recurrent state (B, H, K, V) for :meth:`step`, in :attr:`state_dtype`,
        which :meth:`step` returns (for inputs of any dtype: the state is a ``lax.scan``
        carry)."""
        return zero_state(self.state_shape(batch_size), self.state_dtype, type(self).__name__)


class HGRN2(_MatrixMixer):
    """hgru2-pytorch's HGRN2 layer (``Hgru2_1d``; ``BiHgru2_1d`` with ``bidirectional=True``).

    Args:
      features: model width d, a multiple of ``expand_ratio``.
      expand_ratio: the head width K = V; d / expand_ratio heads, each with a K x K state.
      bidirectional: add a reverse scan (see the module docstring).
      use_bias: biases on ``in_proj`` and ``out_proj`` (the LayerNorm always has one).
      method: the :func:`hgrn_jax.ops.matrix_recurrence` method.
      sequence_axis: a mesh axis to split the sequence over (see the module docstring).

    Call ``layer(x, lower_bound)`` with ``x`` (B, L, d) and ``lower_bound`` a scalar or (d,) acting
    on the forget-gate (key) channels; returns (B, L, d).
    """

    def __init__(
        self,
        features: int,
        *,
        expand_ratio: int = 2,
        bidirectional: bool = False,
        use_bias: bool = True,
        norm_epsilon: float = 1e-5,
        method: str = "auto",
        sequence_axis: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_width(features, "HGRN2")
        check_rngs(rngs, "HGRN2")
        check_counts("HGRN2", none_passes=False, expand_ratio=expand_ratio)
        check_flags("HGRN2", bidirectional=bidirectional, use_bias=use_bias)
        if features % expand_ratio:
            raise ValueError(
                f"HGRN2: features {features} must be a multiple of expand_ratio "
                f"{expand_ratio} (the head width)"
            )
        self.features = features
        self.num_heads = features // expand_ratio
        self.key_dim = self.value_dim = expand_ratio
        self.scale = 1.0
        self.bidirectional = bidirectional
        check_method(method, MATRIX_METHODS, type(self).__name__)
        self.method = method
        self.sequence_axis = sequence_axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        common = dict(use_bias=use_bias, **layer)
        self.in_proj = dense(features, 3 * features, ("embed", "rnn"), **common)
        self.out_proj = dense(features, features, ("rnn", "embed"), **common)
        self.norm = make_norm("layer", features, epsilon=norm_epsilon, axis="rnn", **layer)

    def gates(self, x, lower_bound):
        acc = gate_dtype(x.dtype, self.dtype, self.param_dtype)
        u, a, f = jnp.split(self.in_proj(x).astype(acc), 3, axis=-1)
        lam, log_lam = bounded_decay_and_log(f, lower_bound)
        return (
            _heads(nnx.sigmoid(a), self.key_dim),
            _heads(1.0 - lam, self.key_dim),
            _heads(nnx.silu(u), self.value_dim),
            _heads(log_lam, self.key_dim),
        )

    def output(self, o, x):
        return self.out_proj(self.norm(o))


class FlaHGRN2Attention(_MatrixMixer):
    """fla's ``HGRN2Attention``: ``layer(x, lower_bound=None, mask=None)`` on (B, T, d) inputs.

    Args:
      features: model width d (fla's ``hidden_size``).
      expand_ratio: the key width K per head (fla's ``expand_ratio``); H = d // K heads, value
        width V = d // H. With ``expand_ratio=None``, ``num_heads`` gives K = d // num_heads; both
        given must agree (fla lets ``expand_ratio``, 128 by default, override ``num_heads``
        silently; here that is an error).
      use_lower_bound: apply the lower bound (fla: ``layer_idx > 0``; its first layer ignores it).
      norm_epsilon: eps of the output RMSNorm; fla's layer always uses 1e-5.
      bidirectional: add a reverse scan (not in fla; see the module docstring).
      sequence_axis: a mesh axis to split the sequence over (see the module docstring).
    """

    def __init__(
        self,
        features: int,
        *,
        expand_ratio: int | None = 128,
        num_heads: int | None = None,
        use_lower_bound: bool = True,
        bidirectional: bool = False,
        norm_epsilon: float = 1e-5,
        method: str = "auto",
        sequence_axis: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_width(features, "FlaHGRN2Attention")
        check_rngs(rngs, "FlaHGRN2Attention")
        check_counts("FlaHGRN2Attention", expand_ratio=expand_ratio, num_heads=num_heads)
        check_flags(
            "FlaHGRN2Attention", use_lower_bound=use_lower_bound, bidirectional=bidirectional
        )
        if expand_ratio is None:
            if not num_heads:
                raise ValueError("FlaHGRN2Attention needs expand_ratio or num_heads")
            if num_heads < 1 or features % num_heads:
                raise ValueError(
                    f"FlaHGRN2Attention: num_heads={num_heads} does not split features="
                    f"{features}; pass a num_heads that divides {features}"
                )
            expand_ratio = features // num_heads
        elif num_heads is not None and features // expand_ratio != num_heads:
            # fla lets a given expand_ratio (its default too) override num_heads silently.
            raise ValueError(
                f"FlaHGRN2Attention: num_heads={num_heads} disagrees with expand_ratio="
                f"{expand_ratio} (the default is 128), which gives features // expand_ratio = "
                f"{features // expand_ratio} heads; pass expand_ratio=None to take num_heads, "
                "or only one of the two"
            )
        heads = features // expand_ratio if expand_ratio else 0
        if heads < 1 or features % heads:
            raise ValueError(
                f"FlaHGRN2Attention: expand_ratio={expand_ratio} (the key width of a head) gives "
                f"features // expand_ratio = {heads} heads, which do not split features="
                f"{features}; pass an expand_ratio that divides {features}"
            )
        self.features = features
        self.num_heads, self.key_dim, self.value_dim = heads, expand_ratio, features // heads
        self.scale = expand_ratio**-0.5
        self.use_lower_bound = use_lower_bound
        self.bidirectional = bidirectional
        check_method(method, MATRIX_METHODS, type(self).__name__)
        self.method = method
        self.sequence_axis = sequence_axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        forget_dim = heads * expand_ratio
        layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        common = dict(use_bias=False, **layer)
        self.q_proj = dense(features, forget_dim, ("embed", "rnn"), **common)
        self.f_proj = dense(features, forget_dim, ("embed", "rnn"), **common)
        self.i_proj = dense(features, features, ("embed", "rnn"), **common)
        self.o_proj = dense(features, features, ("rnn", "embed"), **common)
        self.g_norm = make_norm("rms", features, epsilon=norm_epsilon, axis="rnn", **layer)

    def gates(self, x, lower_bound):
        acc = gate_dtype(x.dtype, self.dtype, self.param_dtype)
        g = jax.nn.log_sigmoid(self.f_proj(x).astype(acc))
        if self.use_lower_bound:
            g = apply_log_lower_bound(g, lower_bound)
        k = 1.0 - jnp.exp(g)
        q = nnx.silu(self.q_proj(x).astype(acc))
        v = self.i_proj(x).astype(acc)
        return (
            _heads(q, self.key_dim),
            _heads(k, self.key_dim),
            _heads(v, self.value_dim),
            _heads(g, self.key_dim),
        )

    def output(self, o, x):
        return self.o_proj(self.g_norm(o))


class _GridHGRN2(HGRN2):
    """An :class:`HGRN2` over (B, H, W, d) grids, always bidirectional, without ``step()``."""

    def __init__(self, features: int, **kwargs):
        layer = type(self).__name__
        check_keywords(kwargs, HGRN2.__init__, layer, fixed=("bidirectional",))
        super().__init__(features, bidirectional=True, **kwargs)

    def step(self, *args, **kwargs):
        raise ValueError(
            f"{type(self).__name__} is bidirectional over a grid; step() needs a causal 1-D mixer"
        )


class HGRN2D(_GridHGRN2):
    """hgru2-pytorch's ``Hgru2_2d_parallel`` over (B, H, W, d) grids (the LRA Image and
    Pathfinder layer of the HGRN2 runs): the parameters, gates and readout of :class:`HGRN2`,
    with four scans sharing q, k, v and lambda (down and up each column, right and left along
    each row) whose outputs are summed before the norm, as the reference sums their states.
    Always bidirectional; ``mask`` (B, H, W) skips padded cells and zeroes their outputs.
    """

    def __call__(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (B, H, W, d), ``lower_bound`` a scalar or (d,) -> (B, H, W, d)."""
        self.check_input(x, mask, "(batch, H, W, d)")
        q, k, v, g = self._inputs(x, lower_bound, mask)  # (B, H, W, heads, K or V)
        flip = lambda t: jnp.flip(t, axis=-3)
        o = 0.0
        for axis in (1, 2):  # H (each column), then W (each row): time is axis -3 of the scan
            lines = [jnp.moveaxis(t, axis, -3) for t in (q, k, v, g)]
            scan = self._sequence_scan if axis == 1 else self._scan  # sequence_axis splits H
            both = scan(*lines) + flip(scan(*map(flip, lines)))
            o = o + jnp.moveaxis(both, -3, axis)
        return self._finish(o, x, mask)


class HGRN2DSeries(_GridHGRN2):
    """hgru2-pytorch's ``Hgru2_2d_series`` over (B, H, W, d) grids (the LRA Path-X layer of the
    HGRN2 runs, ``use_series=True``): the whole bidirectional :class:`HGRN2` layer (gates, forward
    and reverse scans, norm, ``out_proj``) run down each column (along H), then the same layer,
    with the same parameters and lower bound, along each row (along W) of the first pass's output.
    Unlike :class:`HGRN2D`, whose four scans share one set of gates and one norm, the second pass
    reads the first one's projected output, so every cell sees the whole grid.

    The reference's ``compute`` is ``BiHgru2_1d``'s ``forward_lesshead`` line for line, so each
    pass is this class's 1-D bidirectional forward. Lower bound: a scalar or (d,), as for
    :class:`HGRN2` (None or 0: none). The reference's default (python ``0``) builds
    ``zeros_like(x)`` of shape (H, W, B, d), which broadcasts against the first pass's
    (H, W * B, d) gates only when W = 1, or B = 1 and H is W or 1, and even then the result has an
    extra leading axis, (H, max(H, W), W * B, d), that the second pass cannot take: it runs on no
    grid. (d,) bounds, as HGRN's LRA models give each layer (the first one's all zero), work
    there. Always bidirectional. ``mask`` (B, H, W) (Path-X's
    images have none): each pass skips padded cells and zeroes their outputs, as :class:`HGRN2`
    does along a line. ``sequence_axis`` splits the first pass's scans along H.
    """

    def __call__(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x`` (B, H, W, d), ``lower_bound`` a scalar or (d,), ``mask`` (B, H, W) with 1 for
        real cells or None -> (B, H, W, d)."""
        self.check_input(x, mask, "(batch, H, W, d)")
        b, h, w, d = x.shape
        cols = lambda t: jnp.swapaxes(t, 1, 2).reshape((b * w, h) + t.shape[3:])  # (B W, H, ..)
        col_mask = None if mask is None else cols(jnp.asarray(mask))
        y = self._mix(cols(x), lower_bound, col_mask, self._sequence_scan)
        y = jnp.swapaxes(y.reshape(b, w, h, d), 1, 2)  # back to (B, H, W, d)
        row_mask = None if mask is None else jnp.asarray(mask).reshape(b * h, w)
        y = self._mix(y.reshape(b * h, w, d), lower_bound, row_mask, self._scan)
        return y.reshape(b, h, w, d)


__all__ = ["HGRN2", "HGRN2D", "HGRN2DSeries", "FlaHGRN2Attention"]

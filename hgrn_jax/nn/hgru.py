"""HGRU token mixers: the gated complex linear recurrence of HGRN, in 1-D and 2-D.

The maths (docs/design.md section 3.1), per channel k < d, with gamma the layer's lower bound::

    u   = silu(input_proj(x))                      (B, ..., 2d): [real block | imaginary block]
    lam = gamma + (1 - gamma) * sigmoid(lambda_proj(x))
    h_t = lam_t * exp(i theta) * h_{t-1} + (1 - lam_t) * (u_re + i u_im)_t
    y   = out_proj( LayerNorm([Re h | Im h]) * silu(gate(x)) )

Our ``input_proj`` emits the real parts first and the imaginary parts second; the reference
interleaves them (even rows real, odd rows imaginary) and :mod:`hgrn_jax.convert` permutes its
rows. ``HGRU`` scans a (B, L, d) sequence causally or in both directions; ``HGRU2D`` scans a
(B, H, W, d) grid along rows and columns. Scans in several directions share ``lam`` and the input
and are summed before the norm, as in the reference.
"""

from __future__ import annotations

import itertools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from hgrn_jax.nn.checks import (
    check_flags,
    check_keywords,
    check_layer_input,
    check_mask,
    check_method,
    check_rngs,
    check_state,
    check_width,
)
from hgrn_jax.nn.initializers import axes_metadata, dense, logical, phase_init
from hgrn_jax.nn.linear import Linear
from hgrn_jax.nn.lower_bounds import apply_lower_bound, check_lower_bound
from hgrn_jax.nn.recurrent_state import (
    carried,
    compute_dtype,
    gate_dtype,
    layer_state_dtype,
    zero_state,
)
from hgrn_jax.ops import METHODS, default_method, linear_recurrence
from hgrn_jax.ops.sequence_parallel import padded_sharded_linear_recurrence

Direction = Literal["forward", "reverse"]

# None: fuse the input projections except on CPU (see _HGRUBase.projections); True / False force it.
FUSE_PROJECTIONS: bool | None = None

# Whether a bidirectional HGRU runs its two scans as one forward scan over both directions, the
# reverse direction's inputs flipped in time (HGRU._both_directions).
# None: where the scan is one of XLA's parallel scans (merge_directions); True / False force it.
MERGE_DIRECTIONS: bool | None = None


def merge_directions(method: str, length: int, platform: str | None = None) -> bool:
    """Whether a bidirectional HGRU of ``length`` steps scans both directions in one call
    (``MERGE_DIRECTIONS``; None decides by the method ``method`` resolves to on ``platform``).

    Merged for ``"associative"`` and ``"chunked"`` (what ``method="auto"`` picks on a GPU below
    2k steps): the flips fuse into the scan's first level, and half the scan calls launch fewer
    kernels and move fewer bytes. The LRA Text classifier's training step at L = 1k, compiled
    for an H200 (``benchmarks/gpu_compile.py``): 587 -> 535 kernels and 16.5 -> 15.8 GiB with
    the associative scan (619 -> 547 and 18.6 -> 17.8 GiB chunked); on CPU the associative
    step took 311 -> 264 ms (``train_throughput.py``). Not merged for ``"pallas"``: XLA cannot
    fuse the flips into a custom call, so they stay copies (476 -> 484 kernels, 12.5 -> 14.5
    GiB). Not for ``"sequential"``: no change on CPU (247 / 243 ms). The merged scan is the
    same recurrence per channel; the parallel methods combine a reversed sequence in another
    order, so results agree to float32 rounding.
    """
    if MERGE_DIRECTIONS is not None:
        return MERGE_DIRECTIONS
    resolved = default_method(length, platform) if method == "auto" else method
    return resolved in ("associative", "chunked")


def fuse_projections() -> bool:
    """Whether :meth:`_HGRUBase.projections` runs as one matmul (``FUSE_PROJECTIONS``)."""
    if FUSE_PROJECTIONS is None:
        return jax.default_backend() != "cpu"
    return FUSE_PROJECTIONS


def _fused_dense(layers: list[Linear], x: jax.Array) -> list[jax.Array]:
    """``[layer(x) for layer in layers]`` by one matmul over the kernels side by side (the
    layers share ``x``, dtype, precision and whether they have biases)."""
    first = layers[0]
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1)
    bias = None
    if first.bias is not None:
        bias = jnp.concatenate([layer.bias[...] for layer in layers])
    y = first.project(x, kernel, bias)
    ends = list(itertools.accumulate(layer.out_features for layer in layers))
    return [y[..., start:end] for start, end in zip([0] + ends[:-1], ends)]


FIXED = ("num_phases",)  # set by HGRU and HGRU2D from their own arguments


class _HGRUBase(nnx.Module):
    """Projections, gates, norm and output shared by the 1-D and 2-D mixers; the arguments are
    listed under :class:`HGRU` (``num_phases``: 1 for a shared theta, 2 for separate forward /
    reverse thetas, ``theta`` and ``theta_reverse``)."""

    def __init__(
        self,
        features: int,
        *,
        num_phases: int = 1,
        complex_valued: bool = True,
        norm_before_gate: bool = True,
        use_forget_gate: bool = True,
        use_bias: bool = True,
        norm_epsilon: float = 1e-5,
        method: str = "auto",
        sequence_axis: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_width(features, type(self).__name__)
        check_rngs(rngs, type(self).__name__)
        check_flags(
            type(self).__name__,
            complex_valued=complex_valued,
            norm_before_gate=norm_before_gate,
            use_forget_gate=use_forget_gate,
            use_bias=use_bias,
        )
        self.features = features
        self.complex_valued = complex_valued
        self.norm_before_gate = norm_before_gate
        self.use_forget_gate = use_forget_gate
        check_method(method, METHODS, type(self).__name__)
        self.method = method
        self.sequence_axis = sequence_axis
        self.dtype = dtype
        self.param_dtype = param_dtype
        width = 2 * features if complex_valued else features
        common = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
        self.input_proj = dense(features, width, ("embed", "rnn"), **common)
        self.lambda_proj = dense(features, features, ("embed", "rnn"), **common)
        self.gate = dense(features, width, ("embed", "rnn"), **common)
        self.out_proj = dense(width, features, ("rnn", "embed"), **common)
        self.norm = nnx.LayerNorm(
            width,
            epsilon=norm_epsilon,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_metadata=axes_metadata(("rnn",)),
            bias_metadata=axes_metadata(("rnn",)),
            rngs=rngs,
        )
        if complex_valued:
            init = logical(phase_init(features), ("rnn",))
            self.theta = nnx.Param(init(rngs.params(), (features,), param_dtype))
            if num_phases == 2:
                self.theta_reverse = nnx.Param(init(rngs.params(), (features,), param_dtype))
            elif num_phases != 1:
                raise ValueError(f"num_phases must be 1 or 2; got {num_phases}")
        self.num_phases = num_phases

    def check_input(
        self,
        x: jax.Array,
        layout: str,
        mask: jax.Array | None = None,
        *,
        streaming: bool = False,
    ) -> None:
        """ValueError naming the expected shape for a wrong rank, width or an empty axis, or a
        ``mask`` that is not ``x``'s shape without the channels (in ``step``, ``streaming``, it
        may be longer along time); ``layout`` is e.g. ``"(batch, length, d)"``."""
        name = type(self).__name__
        check_layer_input(x, self.features, layout, name)
        check_mask(mask, x.shape, name, streaming=streaming)

    def projections(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """``input_proj(x)``, ``lambda_proj(x)`` (None without the forget gate) and ``gate(x)``,
        (..., 2d or d), (..., d), (..., 2d or d).

        Off CPU they are one matmul over the kernels side by side (``fuse_projections``): ``x``
        is read once and the weight gradient is one matmul. The parameters stay three
        ``nnx.Linear`` layers either way (checkpoints and :mod:`hgrn_jax.convert` name them),
        and each output column is the same dot product, in the layer's dtype and precision. On
        CPU the fused matmul gave no consistent gain (``benchmarks/train_throughput.py
        --variants``, 2-D LRA classifier at L = 1k: four runs, fused 0.97-1.66x the separate
        step time), so CPU keeps the three layers: the original, bit-identical computation.
        """
        layers = [self.input_proj, self.gate]
        if self.use_forget_gate:
            layers.insert(1, self.lambda_proj)
        if fuse_projections():
            outputs = _fused_dense(layers, x)
        else:
            outputs = [layer(x) for layer in layers]
        if self.use_forget_gate:
            return outputs[0], outputs[1], outputs[2]
        return outputs[0], None, outputs[1]

    def decay_and_input(
        self,
        x: jax.Array,
        lower_bound: jax.Array | float,
        projected: tuple[jax.Array, jax.Array | None, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """The real decay ``lam`` (..., d) and the gated input ``(1 - lam) * c``, both in the
        accumulation dtype (float32, or float64 for float64 inputs).

        ``c`` is complex (..., d) for the complex recurrence, real otherwise. Without the forget
        gate (the ablation), ``lam`` is the lower bound alone and the input gate stays ``1 - lam``.
        ``projected``: :meth:`projections` of ``x`` when the caller has them already.
        """
        acc = gate_dtype(x.dtype, self.dtype, self.param_dtype)
        u, mu, _ = self.projections(x) if projected is None else projected
        u = nnx.silu(u).astype(acc)
        if self.complex_valued:
            d = self.features
            c = jax.lax.complex(u[..., :d], u[..., d:])
        else:
            c = u
        if self.use_forget_gate:
            lam = apply_lower_bound(nnx.sigmoid(mu.astype(acc)), lower_bound)
        else:
            shape = x.shape[:-1] + (self.features,)
            check_lower_bound(lower_bound, shape)
            bound = 0.0 if lower_bound is None else lower_bound  # None: no bound, as above
            lam = jnp.broadcast_to(jnp.asarray(bound, acc), shape)
        return lam, (1.0 - lam) * c

    @staticmethod
    def identity_at_padding(
        a: jax.Array, b: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Decay 1 and input 0 where ``mask`` (B, ...) is False, so a state passes through padding
        unchanged and a reverse scan starts at the last real token with the state it would have
        without the padding. ``mask`` is ``a``'s shape without the channels (the layers' calls
        check it: :meth:`check_input`)."""
        if mask is None:
            return a, b
        valid = jnp.asarray(mask).astype(bool)[..., None]  # NumPy arrays and lists too
        return jnp.where(valid, a, jnp.ones_like(a)), jnp.where(valid, b, jnp.zeros_like(b))

    def decay(self, lam: jax.Array, direction: Direction) -> jax.Array:
        """``lam * exp(i theta)`` with the phase of that scan direction (``lam`` when real)."""
        if not self.complex_valued:
            return lam
        cos, sin = self.rotations(lam.dtype)
        phase = 0 if direction == "forward" or self.num_phases == 1 else 1
        return jax.lax.complex(lam * cos[phase], lam * sin[phase])

    def rotations(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """``cos(theta)`` and ``sin(theta)`` of every phase, each (num_phases, d), in ``dtype``.

        Every phase's sine and cosine come from one expression, whichever direction asks: the
        compiler merges the repeats, and a GPU computes them in one small kernel per layer, not
        two per direction (the LRA classifier's training step at L = 1k compiled for an H200:
        16 fewer launches)."""
        thetas = [self.theta] if self.num_phases == 1 else [self.theta, self.theta_reverse]
        theta = jnp.stack([t[...] for t in thetas]).astype(dtype)
        rotation = jnp.stack([jnp.cos(theta), jnp.sin(theta)])
        return rotation[0], rotation[1]

    def scan(
        self,
        a: jax.Array,
        b: jax.Array,
        direction: Direction,
        axis: int = -2,
        h0=None,
        return_last_state: bool = False,
    ):
        """One recurrence along ``axis`` of (..., d) arrays (in place along it: no transposes
        for the default CPU method, see ``linear_recurrence(axis=...)``)."""
        sharded = self.sequence_axis is not None and axis % a.ndim == 1 and not return_last_state
        if sharded:
            return jnp.moveaxis(self._sharded_scan(a, b, axis, direction, h0), -2, axis)
        return linear_recurrence(
            a,
            b,
            h0,
            reverse=direction == "reverse",
            method=self.method,
            return_last_state=return_last_state,
            axis=axis,
        )

    def _sharded_scan(
        self, a: jax.Array, b: jax.Array, axis: int, direction: Direction, h0=None
    ) -> jax.Array:
        """The scan along ``axis`` split over mesh axis ``sequence_axis``; returns the states
        with that axis moved to -2. The length is padded to a multiple of the mesh axis's size
        with identity steps at the end (a forward scan never sees them; a reverse one starts
        from its initial state through them unchanged), and the padding sliced off."""
        a, b = jnp.moveaxis(a, axis, -2), jnp.moveaxis(b, axis, -2)
        return padded_sharded_linear_recurrence(
            a,
            b,
            h0,
            axis_name=self.sequence_axis,
            reverse=direction == "reverse",
            method=self.method,
        )

    def output(self, h: jax.Array, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        """Norm, output gate and projection of the summed states ``h`` (..., d); ``gate`` is
        ``self.gate(x)`` when the caller has it already (from :meth:`projections`)."""
        feats = jnp.concatenate([h.real, h.imag], axis=-1) if self.complex_valued else h
        feats = feats.astype(compute_dtype(x.dtype, self.dtype, self.param_dtype))
        gate = nnx.silu(self.gate(x) if gate is None else gate)
        if self.norm_before_gate:
            y = self.norm(feats) * gate
        else:
            y = self.norm(feats * gate)
        return self.out_proj(y)


class HGRU(_HGRUBase):
    """1-D HGRU over (B, L, d) sequences.

    ``bidirectional=False`` is the causal mixer (the reference ``Hgru1d(causal=True)``).
    ``bidirectional=True`` adds a reverse scan over the same decays and inputs; with
    ``separate_phases=True`` the reverse scan has its own theta (``BiHgru1d``, the paper's LRA and
    ImageNet runs), otherwise both share one (``Hgru1d(causal=False)``).

    Call ``layer(x, lower_bound, mask=None)`` with ``x`` (B, L, d) and ``lower_bound`` a scalar
    or (d,) in [0, 1] (the least decay; 0: none); returns (B, L, d). ``step`` / ``init_state``
    stream a causal layer (docs/library.md).

    Args:
      features: model width d.
      rngs: the ``nnx.Rngs`` to initialise from (required).
      bidirectional: add a reverse scan (above); False is causal.
      separate_phases: a bidirectional layer's reverse scan has its own theta (above).
      complex_valued: the paper's complex recurrence (True) or the real-valued ablation.
      norm_before_gate: the reference code's order (True) or the paper's text (gate, then norm).
      use_forget_gate: False gives the ablation without a data-dependent forget gate: lam is
        the lower bound alone (see :meth:`decay_and_input`).
      use_bias: biases on the four projections (the LayerNorm always has one).
      norm_epsilon: epsilon of the LayerNorm over the 2d state features.
      method: the :func:`hgrn_jax.ops.linear_recurrence` method (``"auto"``: the fastest
        measured for the platform and length).
      sequence_axis: a mesh axis to split the sequence over (sequence parallelism, see
        :mod:`hgrn_jax.ops.sequence_parallel`): scans along array axis 1 (time for ``HGRU``, rows
        for ``HGRU2D``) then run sharded over that axis of the mesh set by ``jax.set_mesh``. A
        length that is not a multiple of the axis size is padded with identity steps (decay 1,
        input 0) at the end, which leave every real step's state exact in both directions.
        ``step()`` decoding stays unsharded.
      dtype: the activations' dtype (None: the inputs' promoted with the parameters'); the scan
        accumulates in float32 (complex64) or wider whatever it is.
      param_dtype: the parameters' dtype.

    Under your own ``jax.checkpoint``/``nnx.remat``, a policy that saves the scans' complex
    intermediates (``everything_saveable``, ``save_anything_except_these_names``) fails with
    ``reduce_precision does not accept dtype complex64`` (a JAX bug): use the default policy,
    ``dots_saveable`` or ``nothing_saveable``, ``complex_valued=False``, or
    :class:`~hgrn_jax.nn.ResidualBlock`'s ``remat`` (:mod:`hgrn_jax.nn.remat`).
    """

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        bidirectional: bool = False,
        separate_phases: bool = True,
        **kwargs,
    ):
        check_flags(
            type(self).__name__, bidirectional=bidirectional, separate_phases=separate_phases
        )
        num_phases = 2 if bidirectional and separate_phases else 1
        own = ("bidirectional", "separate_phases")
        check_keywords(kwargs, _HGRUBase.__init__, type(self).__name__, own=own, fixed=FIXED)
        super().__init__(features, num_phases=num_phases, rngs=rngs, **kwargs)
        self.bidirectional = bidirectional

    def __call__(
        self, x: jax.Array, lower_bound: jax.Array | float = 0.0, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x`` (B, L, d), ``mask`` (B, L) with 1 for real tokens (None: no padding) -> (B, L, d).

        Padded steps are identity steps of every scan: real positions see exactly the unpadded
        sequence, wherever the padding sits. Outputs at padded steps are not zeros (the HGRN2
        layers' are) but the readout of the state carried there: leave them out of pooling and
        losses (the classifiers and the LM do)."""
        self.check_input(x, "(batch, length, d)", mask)
        projected = self.projections(x)
        lam, b = self.decay_and_input(x, lower_bound, projected)
        if (
            self.bidirectional
            and self.sequence_axis is None
            and merge_directions(self.method, x.shape[-2])
        ):
            return self.output(self._both_directions(lam, b, mask), x, gate=projected[2])
        directions: tuple[Direction, ...] = (
            ("forward", "reverse") if self.bidirectional else ("forward",)
        )
        h = 0.0
        for direction in directions:
            a, b_dir = self.identity_at_padding(self.decay(lam, direction), b, mask)
            h = h + self.scan(a, b_dir, direction)
        return self.output(h, x, gate=projected[2])

    def _both_directions(self, lam: jax.Array, b: jax.Array, mask: jax.Array | None) -> jax.Array:
        """The forward plus the reverse scan of (B, L, d) decays and inputs as one forward scan,
        the reverse direction's decays and inputs flipped in time, its states flipped back
        (:func:`merge_directions`).

        Without a mesh of several devices (``jax.set_mesh``) the directions sit side by side on
        the channel axis, (B, L, 2d): XLA fuses that concatenation into the scan. On a mesh the
        channels may be sharded (tensor parallelism), and concatenating them would move them
        between devices (a 2 x 1 x 4 mesh: 14 -> 32 collective permutes in a layer's gradient),
        so the directions are stacked on a new leading axis, (2, B, L, d), which no sharding
        touches (the stack costs a copy: 539 kernels and 16.6 GiB in the LRA step above,
        against 535 and 15.8 side by side)."""
        forward = self.identity_at_padding(self.decay(lam, "forward"), b, mask)
        backward = self.identity_at_padding(self.decay(lam, "reverse"), b, mask)
        pairs = [(f, jnp.flip(r, axis=-2)) for f, r in zip(forward, backward, strict=True)]
        if jax.sharding.get_abstract_mesh().size > 1:
            a, x = (jnp.stack(pair) for pair in pairs)
            h = linear_recurrence(a, x, method=self.method)
            return h[0] + jnp.flip(h[1], axis=-2)
        a, x = (jnp.concatenate(pair, axis=-1) for pair in pairs)
        h = linear_recurrence(a, x, method=self.method)
        return h[..., : self.features] + jnp.flip(h[..., self.features :], axis=-2)

    def step(
        self,
        x: jax.Array,
        state: jax.Array,
        lower_bound: jax.Array | float = 0.0,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Causal streaming: ``x`` (B, T, d) continuing from ``state`` (B, d) (complex when the
        recurrence is). Returns the outputs (B, T, d) and the state (B, d) after the last token.

        ``mask`` (B, T) with 1 for real tokens, or longer along time (its last T steps are
        used); None: no padding. Padded steps are identity steps, as in :meth:`__call__`: the
        state passes through them unchanged, wherever they sit, and their outputs are not
        meaningful."""
        if self.bidirectional:
            raise ValueError("step() needs a causal HGRU (bidirectional=False)")
        self.check_input(x, "(batch, length, d)", mask, streaming=True)
        check_state(state, self.state_shape(x.shape[0]), self.state_dtype, type(self).__name__)
        if mask is not None:
            mask = jnp.asarray(mask)[..., -x.shape[-2] :]
        projected = self.projections(x)
        lam, b = self.decay_and_input(x, lower_bound, projected)
        a, b = self.identity_at_padding(self.decay(lam, "forward"), b, mask)
        h, last = self.scan(a, b, "forward", h0=state, return_last_state=True)
        return self.output(h, x, gate=projected[2]), carried(last, state, self.state_dtype)

    @property
    def state_dtype(self) -> jnp.dtype:
        """complex64 or float32 (complex128 or float64 for a float64 layer)."""
        return layer_state_dtype(self.dtype, self.param_dtype, self.complex_valued)

    def init_state(self, batch_size: int) -> jax.Array:
        """The zero recurrent state (B, d) for :meth:`step`, in :attr:`state_dtype`, which
        :meth:`step` returns (for inputs of any dtype: the state is a ``lax.scan`` carry)."""
        return zero_state(self.state_shape(batch_size), self.state_dtype, type(self).__name__)

    def state_shape(self, batch_size: int) -> tuple[int, ...]:
        """The recurrent state's shape (B, d)."""
        return (batch_size, self.features)


class HGRU2D(_HGRUBase):
    """2-D HGRU over (B, H, W, d) grids.

    ``causal=True``: a forward scan down the rows (along H, each column separately) plus a forward
    scan along each row (along W); the reference ``Hgru2d(causal=True)``. ``causal=False``: the
    four scans (H and W, each both ways); with ``separate_phases`` the forward scans use ``theta``
    and the reverse scans ``theta_reverse`` (``BiHgru2d``, the paper's LRA runs), otherwise all four
    share ``theta`` (``Hgru2d(causal=False)``).

    Call ``layer(x, lower_bound, mask=None)``; returns (B, H, W, d). The other keyword
    arguments are :class:`HGRU`'s, with the same meanings (``rngs``, ``complex_valued``,
    ``use_bias``, ``method``, ``dtype``, ...: ``help(HGRU)``).
    """

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        causal: bool = False,
        separate_phases: bool = True,
        **kwargs,
    ):
        check_flags(type(self).__name__, causal=causal, separate_phases=separate_phases)
        num_phases = 2 if not causal and separate_phases else 1
        own = ("causal", "separate_phases")
        check_keywords(kwargs, _HGRUBase.__init__, type(self).__name__, own=own, fixed=FIXED)
        super().__init__(features, num_phases=num_phases, rngs=rngs, **kwargs)
        self.causal = causal

    def __call__(
        self, x: jax.Array, lower_bound: jax.Array | float = 0.0, mask: jax.Array | None = None
    ) -> jax.Array:
        """``x`` (B, H, W, d), ``mask`` (B, H, W) with 1 for real cells -> (B, H, W, d).

        Padded cells are identity steps of every scan, and their outputs are not zeros, as in
        :meth:`HGRU.__call__`."""
        self.check_input(x, "(batch, H, W, d)", mask)
        projected = self.projections(x)
        lam, b = self.decay_and_input(x, lower_bound, projected)
        directions: tuple[Direction, ...] = ("forward",) if self.causal else ("forward", "reverse")
        h = 0.0
        for direction in directions:
            a, b_dir = self.identity_at_padding(self.decay(lam, direction), b, mask)
            for axis in (1, 2):
                h = h + self.scan(a, b_dir, direction, axis=axis)
        return self.output(h, x, gate=projected[2])

    def step(self, *args, **kwargs):
        """Not available: a grid has no single order to stream in (nor has HGRN2D one)."""
        raise ValueError("HGRU2D scans a grid along H and W; step() needs a causal 1-D HGRU")

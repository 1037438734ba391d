"""The matrix-state gated recurrence behind HGRN2 (a gated linear attention).

Each head carries a ``K x V`` state. With ``g_t = log(lambda_t) <= 0`` the log forget gate of the
key channels, per head::

    S_t = diag(exp(g_t)) @ S_{t-1} + outer(k_t, v_t)        S: (K, V), S_{-1} = h0 (zeros)
    o_t = scale * q_t @ S_t                                 o: (V,)

Arrays are ``(..., L, H, K)`` for ``q``, ``k`` and ``log_decay``, ``(..., L, H, V)`` for ``v``:
any leading (batch) axes, then time, heads and the head width. States are ``(..., H, K, V)``
(key index first; fla's cache stores the transpose ``(..., H, V, K)``). Whatever the input
precision, states accumulate in float32 or wider; outputs come back in the inputs' dtype unless
``out_dtype`` says otherwise.

Three forward methods compute the same thing; all of them split time into chunks of
``chunk_size`` steps and also return the state entering each chunk (the "boundary states",
``(N, chunks + 1, K, V)`` with the last state at the end):

``"sequential"``
    a ``lax.scan`` over time (nested: chunks outside, steps inside), one rank-1 update per step.
    The loops read ``exp(g)`` computed before them and hold each ``(K, V)`` matrix transposed,
    ``(V, K)``, when ``K >= V`` (:func:`_layout`).
``"chunked"``
    the matmul form. Inside a chunk, with ``b_i = g_0 + ... + g_i`` (per key channel)::

        o_i = scale * [ (q_i * exp(b_i)) @ S_in + sum_{j<=i} (q_i * exp(b_i - b_j)) . k_j  v_j ]

    The products ``exp(b_i - b_j)`` are never formed as ``exp(b_i) * exp(-b_j)`` (which overflows
    once a chunk's decays sum below -88 in float32). The chunk is cut into sub-chunks of
    ``_SUB_CHUNK`` steps: for a query in sub-chunk ``I`` and a key in an earlier sub-chunk,
    ``exp(b_i - b_j) = exp(b_i - r_I) * exp(r_I - b_j)`` with ``r_I`` the cumulative decay at the
    end of sub-chunk ``I - 1``, so both factors lie in ``[0, 1]`` and each is at least the product
    (neither underflows before the product does); pairs inside one sub-chunk use the exact
    pairwise ``exp(b_i - b_j)``, masked to ``j <= i`` before the exponential. The chunk's states
    are passed on by a scan over chunks: ``S_out = exp(b_end) * S_in + (k * exp(b_end - b)) @ v``.
    Precision: ``b`` is rounded once (``|b| * 2^-24`` in float32), so each factor
    ``exp(b_i - b_j)`` is exact to that relative error: ~1e-5 when a chunk's decays sum to -200;
    a smaller ``chunk_size`` tightens it. The other methods multiply step by step.
    The causal mask selects (never multiplies by 0), so a nan or inf input reaches no earlier
    output: the outputs from its step on are nan, in its chunk (the other methods give inf
    where the state holds one).
``"pallas"``
    one Pallas kernel (Triton on GPU; the Pallas interpreter elsewhere), one program per
    (batch row and head, block of 32 value channels): the state stays in registers while the
    program walks time, reading every input once and writing every output once, and stores the
    state at each chunk boundary. (Inputs reach it in the accumulation dtype: 16-bit inputs are
    converted by XLA first.) On an H200 it was 2.3-5x slower than ``"chunked"`` (one program per
    (row and head, value block) is few programs, each stepping through time), so ``"auto"``
    does not pick it (:func:`default_matrix_method`).

All methods share one custom VJP, which keeps only the inputs and the boundary states: the
adjoint state ``D`` (``dL/dS``) is carried from the last chunk back, and the states inside a
chunk are recomputed (from the chunk's entering state, or by scanning again), so no
``(N, L, K, V)`` tensor of per-step states is ever stored. The backward arithmetic takes the forward's form: ``"sequential"`` scans the
steps (:func:`_sequential_backward`: the states forward again for ``dq``, the adjoint back for
``dk`` and ``dv``, ``dg`` from the formula below); ``"chunked"`` and ``"pallas"`` use the matmul
form, inside a chunk::

    dq_i = scale * [ exp(b_i) * (S_in @ do_i) + sum_{j<=i} (do_i . v_j) exp(b_i - b_j) k_j ]
    dk_j = scale * sum_{i>=j} (do_i . v_j) exp(b_i - b_j) q_i + exp(b_end - b_j) * (D_out @ v_j)
    dv_j = scale * sum_{i>=j} A_ij do_i + (k_j * exp(b_end - b_j)) @ D_out
    dg_s = sum_{t>=s in chunk} (q_t dq_t - k_t dk_t) + sum_v (D_out * S_out)
    D_in = exp(b_end) * D_out + scale * (q * exp(b))^T @ do          (dh0 = D_in of chunk 0)

where ``A`` is the forward's intra-chunk score matrix. ``dg`` sums over at most one chunk, so
nothing cancels over long sequences. Within a step it does cancel where decays are strong: the
``q dq`` and ``k dk`` terms are O(1) while ``dg`` is O(exp(g)), so its float32 error relative to
the largest ``dg`` grows from ~5e-7 for ``g`` in [-0.5, 0] to ~2e-5 in [-8, -4] and ~1e-2 in
[-20, -10] (measured against a float64 scan; fla's chunked kernels take the same form).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from hgrn_jax.ops.common import (
    accumulation_dtype,
    check_chunk_size,
    compiled_copy,
    matrix_inputs_dtype,
    outside_transforms,
    resolve_out_dtype,
)

MatrixMethod = Literal["auto", "sequential", "chunked", "pallas"]
MATRIX_METHODS: tuple[str, ...] = ("sequential", "chunked", "pallas")

DEFAULT_CHUNK_SIZE = 64
_SUB_CHUNK = 16
_PALLAS_VALUE_BLOCK = 32


def default_matrix_method(length: int, platform: str | None = None) -> str:
    """The method ``method="auto"`` picks for :func:`matrix_recurrence`.

    CPU: ``"sequential"`` at every length. Measured by ``benchmarks/matrix_recurrence.py``
    (``benchmarks/results/matrix_recurrence_cpu.json``; B=2, H=4, K=V=32, L=256 to 4096, and
    B=1, H=2, K=V=128): the scan is the fastest forward and, with its step-by-step backward, the
    fastest forward+backward at every size, several times faster than ``"chunked"``. Rechecked
    after the scan's 2026-12-02 speed-up (``--sequential-before``,
    ``matrix_recurrence_sequential_cpu.json``; B=2, H=4, K=V=32 and 64 at L=1k and 4k, K=16 < V=64):
    ``"chunked"`` 2.3-6.5x slower forward and 2.9-5.3x forward+backward, no crossover with the
    length. A CPU does one step's ``K*V`` rank-1 update at full speed; the chunked form adds
    ``~C/2 + 16`` extra multiply-adds and ``~C/16 + 19`` ``exp`` per step and key channel (the
    decay factors of :func:`_decays`; XLA's cost analysis at L=1k, C=64: 23x the scan's ``exp``,
    ``_decays`` alone taking 3.5x the whole scan's forward), which costs more than the loop
    iterations it saves; smaller chunks cost more (C=16: 1.7x C=64's forward, 2.7x its
    forward+backward).
    ``"pallas"`` runs in the Pallas interpreter on CPU (a correctness path).

    GPU: ``"chunked"``. Measured on an H200 by ``benchmarks/matrix_recurrence.py``
    (``benchmarks/results/matrix_recurrence_gpu.json``, float32, H=4, K=V=64): at
    (B, L) = (8, 1024) the chunked form takes 0.39 ms forward and 1.10 ms forward+backward
    against the Pallas kernel's 2.02 and 2.58 ms, at (8, 4096) 1.61 and 4.03 ms against 7.99 and
    9.59 ms; the scan is 20-50x slower still (a launch per step). The chunked form's work is
    large matmuls; the kernel moves the fewest bytes but walks time one rank-1 update per step
    (not profiled further). Both agree with the scan on the device (the same largest
    difference: their backward is the same chunked one).

    TPU: ``"chunked"`` (not measured): its matmuls suit the MXU, the Pallas kernel is written
    for Triton's register model, and the scan pays a loop iteration per step.
    """
    del length  # no measured crossover with the length yet
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "sequential"
    return "chunked"


def _check_shapes(q, k, v, log_decay, h0) -> tuple[int, ...]:
    if q.ndim < 3:
        raise ValueError(f"q must be (..., length, heads, key_dim); got shape {q.shape}")
    if q.shape[-3] == 0:
        raise ValueError(
            f"q has length 0 along the time axis -3 (shape {q.shape}); the recurrence needs at "
            "least one step: skip the call for an empty sequence"
        )
    if k.shape != q.shape or log_decay.shape != q.shape:
        raise ValueError(
            f"q, k and log_decay must share one shape (..., length, heads, key_dim); got "
            f"q {q.shape}, k {k.shape}, log_decay {log_decay.shape}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must be (..., length, heads, value_dim) with q's leading axes {q.shape[:-1]}; "
            f"got {v.shape}"
        )
    state_shape = q.shape[:-3] + q.shape[-2:] + v.shape[-1:]
    if h0 is not None and h0.shape != state_shape:
        raise ValueError(
            f"h0 must have shape {state_shape} (..., heads, key_dim, value_dim); got {h0.shape}"
        )
    return state_shape


def matrix_recurrence(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    h0: jax.Array | None = None,
    *,
    scale: float = 1.0,
    method: MatrixMethod = "auto",
    return_last_state: bool = False,
    out_dtype: jnp.dtype | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Outputs of the HGRN2 recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``.

    Args:
      q: queries ``(..., L, H, K)`` (HGRN2's output gate); ``L >= 1`` (an empty sequence is a
        ``ValueError``, as in :func:`~hgrn_jax.ops.linear_recurrence`).
      k: keys ``(..., L, H, K)`` (HGRN2's ``1 - lambda``).
      v: values ``(..., L, H, V)`` (HGRN2's input).
      log_decay: log forget gates ``(..., L, H, K)``, ``<= 0`` and not nan (the chunked form
        relies on it for its stability); very negative values and ``-inf`` are fine: below
        the log of the smallest subnormal (-104 in float32) a decay is 0, as ``exp`` makes it.
      h0: initial state ``(..., H, K, V)``; zeros when omitted. A complex one, or one wider
        than the states' accumulation dtype (float64 with float32 inputs), promotes the
        computation and the outputs to its dtype.
      scale: the constant ``c`` in ``o_t = c * q_t S_t`` (1 for hgru2-pytorch, ``1/sqrt(K)`` for
        fla); a number or a scalar array (differentiable).
      method: ``"sequential"``, ``"chunked"``, ``"pallas"`` (see the module docstring) or
        ``"auto"`` (:func:`default_matrix_method`).
      return_last_state: also return the state after the last step, ``(..., H, K, V)``.
      out_dtype: dtype of ``o``; the promoted input dtype by default (complex inputs need a
        complex one: a real one is a ``ValueError``, not a dropped imaginary part).
      chunk_size: steps per chunk: the interval of the boundary states kept for the backward
        pass (memory ``(..., H, L / chunk_size, K, V)``) and the chunked method's block. A
        multiple of 16 or at most 16.

    Returns:
      ``o`` of shape ``(..., L, H, V)``, and the last state (float32 or wider) when
      ``return_last_state``.
    """
    q, k, v, log_decay = (jnp.asarray(t) for t in (q, k, v, log_decay))
    h0 = None if h0 is None else jnp.asarray(h0)
    state_shape = _check_shapes(q, k, v, log_decay, h0)
    dtype = matrix_inputs_dtype(jnp.result_type(q, k, v, log_decay), h0)
    out_dtype = resolve_out_dtype(dtype, out_dtype)
    acc = accumulation_dtype(dtype)
    if method == "auto":
        method = default_matrix_method(q.shape[-3])
    if method not in MATRIX_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {('auto',) + MATRIX_METHODS}")
    if method == "pallas" and jnp.issubdtype(acc, jnp.complexfloating):
        raise ValueError(
            f"method='pallas' runs real states only; these are {jnp.dtype(acc)} (complex inputs "
            "or h0): use method='sequential' or 'chunked'"
        )
    check_chunk_size(chunk_size)
    if chunk_size > _SUB_CHUNK and chunk_size % _SUB_CHUNK:
        raise ValueError(
            f"chunk_size must be a multiple of {_SUB_CHUNK} or at most "
            f"{_SUB_CHUNK}; got {chunk_size}"
        )
    if outside_transforms(q, k, v, log_decay, h0, scale):  # checked above, as in the caller's
        return _compiled_matrix_recurrence(
            q,
            k,
            v,
            log_decay,
            h0,
            scale=scale,
            method=method,
            return_last_state=return_last_state,
            out_dtype=out_dtype,
            chunk_size=chunk_size,
        )

    batch_shape = q.shape[:-3]
    length, heads, key_dim = q.shape[-3:]
    value_dim = v.shape[-1]
    if 0 in batch_shape + (heads, key_dim, value_dim):  # nothing to carry: no rows to reshape
        o = jnp.zeros(batch_shape + (length, heads, value_dim), out_dtype)
        last = jnp.zeros(state_shape, acc) if h0 is None else h0.astype(acc)
        return (o, last) if return_last_state else o
    if chunk_size <= _SUB_CHUNK or length <= _SUB_CHUNK:
        chunk = min(chunk_size, length)
    else:  # a short sequence is one chunk, padded to whole sub-chunks
        chunk = min(chunk_size, -(-length // _SUB_CHUNK) * _SUB_CHUNK)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    def rows(t):
        """(..., L, H, W) -> (N, L_padded, W): one row per (batch, head); padded steps are
        identities (k = 0, decay 1) and are dropped afterwards."""
        t = jnp.moveaxis(t.astype(acc), -2, -3).reshape((-1, length, t.shape[-1]))
        return jnp.pad(t, ((0, 0), (0, pad), (0, 0))) if pad else t

    h0 = jnp.zeros(state_shape, acc) if h0 is None else jnp.asarray(h0).astype(acc)
    h0 = h0.reshape((-1, key_dim, value_dim))
    # The core runs unscaled; scaling its output outside lets autodiff carry ``scale`` (which
    # may be traced) into every gradient.
    o, last = _matrix_recurrence(*(rows(t) for t in (q, k, v, log_decay)), h0, 1.0, method, chunk)
    o = o[:, :length].reshape(batch_shape + (heads, length, value_dim))
    o = (jnp.moveaxis(o, -3, -2) * jnp.asarray(scale, acc)).astype(out_dtype)
    last = last.reshape(state_shape)
    return (o, last) if return_last_state else o


# An eager call's compiled copy (see common.outside_transforms); under it the inputs are tracers.
_compiled_matrix_recurrence = compiled_copy(
    matrix_recurrence, ("method", "return_last_state", "out_dtype", "chunk_size")
)


# --- the differentiable core on rows: q, k, g (N, T, K), v (N, T, V), h0 (N, K, V), T = chunks * C


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _matrix_recurrence(q, k, v, g, h0, scale, method, chunk):
    o, bounds = _forward(q, k, v, g, h0, scale, method, chunk)
    return o, bounds[:, -1]


def _forward(q, k, v, g, h0, scale, method, chunk):
    """``o`` (N, T, V) and the boundary states (N, chunks + 1, K, V)."""
    if method == "sequential":
        return _sequential(q, k, v, g, h0, scale, chunk)
    if method == "chunked":
        return _chunked(q, k, v, g, h0, scale, chunk)
    return _pallas_with_chunked_jvp(q, k, v, g, h0, scale, chunk)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _pallas_with_chunked_jvp(q, k, v, g, h0, scale, chunk):
    """:func:`_pallas`, whose tangents are the chunked form's (the same function): JAX cannot
    linearize a ``pallas_call``, and second derivatives differentiate the boundary states the
    backward pass keeps (``jax.hessian`` failed with "Linearization failed")."""
    return _pallas(q, k, v, g, h0, scale, chunk)


@_pallas_with_chunked_jvp.defjvp
def _pallas_jvp(scale, chunk, primals, tangents):
    _, tangents_out = jax.jvp(lambda *a: _chunked(*a, scale, chunk), primals, tangents)
    return _pallas(*primals, scale, chunk), tangents_out


def _matrix_recurrence_fwd(q, k, v, g, h0, scale, method, chunk):
    o, bounds = _forward(q, k, v, g, h0, scale, method, chunk)
    return (o, bounds[:, -1]), (q, k, v, g, bounds)


def _matrix_recurrence_bwd(scale, method, chunk, residuals, cotangents):
    q, k, v, g, bounds = residuals
    do, dlast = (jnp.asarray(c, q.dtype) for c in cotangents)
    backward = _sequential_backward if method == "sequential" else _chunked_backward
    return backward(q, k, v, g, bounds, do, dlast, scale, chunk)


_matrix_recurrence.defvjp(_matrix_recurrence_fwd, _matrix_recurrence_bwd)


def _time_major_chunks(t: jax.Array, chunk: int) -> jax.Array:
    """(N, T, W) -> (chunks, C, N, W)."""
    return jnp.moveaxis(t.reshape((t.shape[0], t.shape[1] // chunk, chunk, t.shape[-1])), 0, 2)


def _from_time_major_chunks(t: jax.Array) -> jax.Array:
    """(chunks, C, N, W) -> (N, T, W)."""
    return jnp.moveaxis(t, 2, 0).reshape((t.shape[2], -1, t.shape[-1]))


class _Layout(NamedTuple):
    """How the sequential loops hold a ``(K, V)`` matrix (a state or an adjoint) per row.

    ``transposed``: as ``(V, K)``, the key axis contiguous, so that each step's per-key decay
    broadcasts along the contiguous axis. Measured on CPU (L=1k, N=8, in turn in one process):
    at K=V=32 the update alone takes 0.56 us per step transposed against 2.4 us, the forward
    loop 1.8 against 3.7 us; at K=V=64 and 128 (a state beyond L1) the two are as fast; but at
    K=16 < V=64 transposed was 1.8x slower forward (a short contiguous axis). So a row is
    transposed only when ``K >= V``. Totals against the loops before 2026-12-02:
    benchmarks/README.md.
    """

    transposed: bool

    @property
    def matrix(self) -> str:
        """einsum subscripts of the loops' (N, ·, ·) matrices."""
        return "nvk" if self.transposed else "nkv"

    def swap(self, m: jax.Array) -> jax.Array:
        """(..., K, V) <-> this layout."""
        return jnp.swapaxes(m, -1, -2) if self.transposed else m

    def decay(self, decay_t: jax.Array, m: jax.Array) -> jax.Array:
        """``diag(decay_t) @ m``: ``decay_t`` (N, K)."""
        return decay_t[:, None, :] * m if self.transposed else decay_t[..., None] * m

    def outer(self, key: jax.Array, value: jax.Array) -> jax.Array:
        """``outer(key, value)`` (N, K) x (N, V) in this layout."""
        if self.transposed:
            return value[..., None] * key[:, None, :]
        return key[..., None] * value[:, None, :]


def _layout(key_dim: int, value_dim: int) -> _Layout:
    return _Layout(transposed=key_dim >= value_dim)


def _sequential(q, k, v, g, h0, scale, chunk):
    """Scan over chunks, and over the steps of each chunk inside.

    The loops read ``exp(g)`` computed before them (no ``exp`` of their own per step) and hold
    the state in :func:`_layout`'s layout.
    """
    layout = _layout(k.shape[-1], v.shape[-1])
    readout = f"nk,{layout.matrix}->nv"

    def step(state, inputs):
        q_t, k_t, v_t, decay_t = inputs
        state = layout.decay(decay_t, state) + layout.outer(k_t, v_t)
        return state, scale * jnp.einsum(readout, q_t, state)

    def chunk_step(state, inputs):
        last, o = jax.lax.scan(step, state, inputs)
        return last, (o, state)

    last, (o, entering) = jax.lax.scan(
        chunk_step,
        layout.swap(h0),
        tuple(_time_major_chunks(t, chunk) for t in (q, k, v, jnp.exp(g))),
    )
    bounds = jnp.concatenate([jnp.moveaxis(entering, 0, 1), last[:, None]], axis=1)
    return _from_time_major_chunks(o), layout.swap(bounds)


def _sequential_backward(q, k, v, g, bounds, do, dlast, scale, chunk):
    """The gradients by two scans over time that store no states: forward from ``h0``
    recomputing ``S_t`` for ``dq_t = scale * S_t do_t``, then backward from ``dlast`` with the
    adjoint ``D`` (``dL/dS_t``)::

        D += scale * q_t do_t^T;  dk_t = D v_t;  dv_t = D^T k_t;  D = exp(g_t) * D

    (``dh0``: the final ``D``). ``dg`` comes from the chunk-local sums of the module docstring,
    with the boundary states and the adjoints at the chunk ends. Both loops hold their
    matrices in :func:`_layout`'s layout, as :func:`_sequential` does.
    """
    layout = _layout(k.shape[-1], v.shape[-1])
    m = layout.matrix
    decay = jnp.exp(g)
    q_c, k_c, v_c, a_c, do_c = (_time_major_chunks(t, chunk) for t in (q, k, v, decay, do))
    bounds = layout.swap(bounds)  # (N, chunks + 1, ·, ·)

    def forward(state, inputs):
        k_t, v_t, decay_t, do_t = inputs
        state = layout.decay(decay_t, state) + layout.outer(k_t, v_t)
        return state, scale * jnp.einsum(f"{m},nv->nk", state, do_t)

    def forward_chunk(state, inputs):
        return jax.lax.scan(forward, state, inputs)

    _, dq = jax.lax.scan(forward_chunk, bounds[:, 0], (k_c, v_c, a_c, do_c))

    def backward(adjoint, inputs):
        # ``adjoint`` enters as ``D_{t+1}`` before the decay of step t+1, leaves as ``D_t`` with
        # step t's own output term added, which the dots then read.
        q_t, k_t, v_t, next_decay_t, do_t = inputs
        adjoint = layout.decay(next_decay_t, adjoint) + scale * layout.outer(q_t, do_t)
        dk_t = jnp.einsum(f"nv,{m}->nk", v_t, adjoint)
        dv_t = jnp.einsum(f"nk,{m}->nv", k_t, adjoint)
        return adjoint, (dk_t, dv_t)

    def backward_chunk(adjoint, inputs):
        first_decay, *steps = inputs
        at_start, grads = jax.lax.scan(backward, adjoint, tuple(steps), reverse=True)
        return layout.decay(first_decay, at_start), (grads, adjoint)

    # Each step's iteration applies the next step's decay (1 for a chunk's last step; a chunk's
    # first step's decay is applied after its loop), so that, as in the forward loops, the
    # dots read the matrix just written in place: measured 1.9x faster on CPU at K=V=32 than
    # adding the output term first and decaying after the dots (5.1 -> 2.9 us per step), where
    # XLA keeps the sum in a buffer of its own.
    next_decay = jnp.concatenate([a_c[:, 1:], jnp.ones_like(a_c[:, :1])], axis=1)
    dh0, ((dk, dv), adjoint_out) = jax.lax.scan(
        backward_chunk,
        layout.swap(dlast),
        (a_c[:, 0], q_c, k_c, v_c, next_decay, do_c),
        reverse=True,
    )
    from_cumulative = q_c * dq - k_c * dk  # (chunks, C, N, K)
    leaving = jnp.moveaxis(bounds[:, 1:], 1, 0)  # (chunks, N, ·, ·)
    value_axis = -2 if layout.transposed else -1
    at_end = jnp.sum(adjoint_out * leaving, axis=value_axis)  # (chunks, N, K)
    dg = jnp.flip(jnp.cumsum(jnp.flip(from_cumulative, 1), axis=1), 1) + at_end[:, None]
    grads = tuple(_from_time_major_chunks(t) for t in (dq, dk, dv, dg))
    return grads + (layout.swap(dh0),)


class _Decays(NamedTuple):
    """Decay factors of chunks, from the within-chunk cumulative log decays ``b`` (..., C, K).

    With ``c`` the sub-chunk length, ``I`` a sub-chunk and ``r_I`` the value of ``b`` just
    before it (0 for the first): ``within`` ``exp(b_i - r_I)`` (..., I, c, K); ``cross``
    ``exp(r_I - b_j)`` for keys ``j`` before sub-chunk ``I``, else 0 (..., I, C, K); ``pairs``
    ``exp(b_i - b_j)`` for ``j <= i`` in one sub-chunk, else 0 (..., I, c, c, K); ``from_start``
    ``exp(b_i)``, ``to_end`` ``exp(b_end - b_j)`` (..., C, K); ``total`` ``exp(b_end)`` (..., K).
    Every factor is ``exp`` of a number ``<= 0``. ``before`` (I, C, 1) and ``causal`` (c, c, 1)
    say where ``cross`` and ``pairs`` are not structural zeros: products with them are selected
    by these masks rather than multiplied by 0, so that a non-finite key or value never reaches
    an earlier step (``0 * nan`` is nan).
    """

    within: jax.Array
    cross: jax.Array
    pairs: jax.Array
    from_start: jax.Array
    to_end: jax.Array
    total: jax.Array
    before: jax.Array
    causal: jax.Array


def _decays(g: jax.Array) -> _Decays:
    chunk = g.shape[-2]
    sub = min(chunk, _SUB_CHUNK)
    num_sub = chunk // sub
    # Below this exp(g) rounds to 0 anyway; bounding g keeps the cumulative sums b finite and
    # their differences meaningful (a decay of -1e6 left errors of order 1 in b_i - b_j, and
    # finfo.min summed to -inf, then nan).
    b = jnp.cumsum(jnp.maximum(g, _exp_underflow(g.dtype)), axis=-2)
    b_sub = _split(b, num_sub)
    ref = jnp.concatenate([jnp.zeros_like(b[..., :1, :]), b[..., sub - 1 : -1 : sub, :]], axis=-2)
    key_pos = jnp.arange(chunk)
    before = (key_pos[None, :] < sub * jnp.arange(num_sub)[:, None])[..., None]  # (I, C, 1)
    cross = jnp.where(before, ref[..., :, None, :] - b[..., None, :, :], -jnp.inf)
    causal = (key_pos[:sub, None] >= key_pos[None, :sub])[..., None]  # (c, c, 1)
    pairs = jnp.where(causal, b_sub[..., :, None, :] - b_sub[..., None, :, :], -jnp.inf)
    end = b[..., -1:, :]
    return _Decays(
        within=jnp.exp(b_sub - ref[..., None, :]),
        cross=jnp.exp(cross),
        pairs=jnp.exp(pairs),
        from_start=jnp.exp(b),
        to_end=jnp.exp(end - b),
        total=jnp.exp(end[..., 0, :]),
        before=before,
        causal=causal,
    )


def _exp_underflow(dtype: jnp.dtype) -> float:
    """A log value ``x`` with ``exp(x) == 0`` in ``dtype``: below its smallest subnormal's log
    (-104.3 for float32, -745.1 for float64)."""
    return math.log(float(jnp.finfo(dtype).smallest_subnormal)) - 1.0


def _earlier_keys(y: jax.Array, d: _Decays) -> jax.Array:
    """``y_j exp(r_I - b_j)`` for keys ``j`` before sub-chunk ``I``, else 0: (..., I, C, K)."""
    return jnp.where(d.before, y[..., None, :, :] * d.cross, 0.0)


def _split(x: jax.Array, num_sub: int) -> jax.Array:
    """(..., C, W) -> (..., I, c, W)."""
    return x.reshape(x.shape[:-2] + (num_sub, x.shape[-2] // num_sub, x.shape[-1]))


def _diagonal_blocks(m: jax.Array, num_sub: int) -> jax.Array:
    """The ``(c, c)`` diagonal blocks of ``m`` (..., C, C): (..., I, c, c)."""
    sub = m.shape[-1] // num_sub
    blocks = m.reshape(m.shape[:-2] + (num_sub, sub, num_sub, sub))
    return jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)


def _scores(x, y, d: _Decays) -> jax.Array:
    """``A_ij = sum_k x_ik y_jk exp(b_ik - b_jk)`` for ``j <= i``, else 0: (..., C, C)."""
    num_sub, sub = d.within.shape[-3:-1]
    x_sub, y_sub = _split(x, num_sub), _split(y, num_sub)
    earlier = jnp.einsum("...Iik,...Ijk->...Iij", x_sub * d.within, _earlier_keys(y, d))
    # Three-operand products as broadcast-multiply-sum: 3x faster than einsum's pairwise
    # contraction on CPU (measured), and the same on accelerators once fused.
    diagonal = jnp.sum(
        jnp.where(d.causal, x_sub[..., :, None, :] * y_sub[..., None, :, :] * d.pairs, 0.0),
        axis=-1,
    )
    placed = jnp.einsum("...Iij,IJ->...IiJj", diagonal, jnp.eye(num_sub, dtype=x.dtype))
    shape = earlier.shape[:-3] + (num_sub * sub, num_sub * sub)
    return earlier.reshape(shape) + placed.reshape(shape)


def _weighted_keys(m, y, d: _Decays) -> jax.Array:
    """``X_ik = sum_{j<=i} m_ij y_jk exp(b_ik - b_jk)`` (..., C, K); ``m`` (..., C, C) is read
    on and below the diagonal only, and must be finite above it."""
    num_sub = d.within.shape[-3]
    m_sub = _split(m, num_sub)
    earlier = d.within * jnp.einsum("...Iij,...Ijk->...Iik", m_sub, _earlier_keys(y, d))
    pairs = _diagonal_blocks(m, num_sub)[..., None] * _split(y, num_sub)[..., None, :, :]
    diagonal = jnp.sum(jnp.where(d.causal, pairs * d.pairs, 0.0), axis=-2)
    return (earlier + diagonal).reshape(y.shape)


def _weighted_queries(m, w, d: _Decays) -> jax.Array:
    """``Z_jk = sum_{i>=j} m_ij w_ik exp(b_ik - b_jk)`` (..., C, K); ``m`` (..., C, C) is read
    on and below the diagonal only, and must be finite above it."""
    num_sub = d.within.shape[-3]
    m_sub = _split(m, num_sub)
    w_sub = _split(w, num_sub)
    earlier = jnp.einsum("...Iij,...Iik->...Ijk", m_sub, w_sub * d.within)
    earlier = jnp.sum(jnp.where(d.before, earlier * d.cross, 0.0), axis=-3)
    pairs = _diagonal_blocks(m, num_sub)[..., None] * w_sub[..., :, None, :]
    diagonal = jnp.sum(jnp.where(d.causal, pairs * d.pairs, 0.0), axis=-3)
    return earlier + diagonal.reshape(w.shape)


def _by_chunk(t: jax.Array, chunk: int) -> jax.Array:
    """(N, T, W) -> (N, chunks, C, W)."""
    return t.reshape((t.shape[0], t.shape[1] // chunk, chunk, t.shape[-1]))


def _chunked(q, k, v, g, h0, scale, chunk):
    """The matmul form (module docstring): intra-chunk scores, then a scan over chunk states."""
    qc, kc, vc, gc = (_by_chunk(t, chunk) for t in (q, k, v, g))
    d = _decays(gc)
    # The score matmul multiplies a later value by a score of 0, so a non-finite value would
    # reach the earlier outputs (0 * nan = nan): it reads the finite values only, and the
    # outputs from the first non-finite one's step on (in its value channel) are nan.
    bad = ~jnp.isfinite(vc)
    intra = jnp.einsum("ncij,ncjv->nciv", _scores(qc, kc, d), jnp.where(bad, 0.0, vc))
    steps = jnp.arange(chunk)[:, None]
    first_bad = jnp.min(jnp.where(bad, steps, chunk), axis=-2, keepdims=True)
    intra = jnp.where(steps >= first_bad, jnp.nan, intra)
    local = jnp.einsum("ncjk,ncjv->nckv", kc * d.to_end, vc)

    def pass_on(state, inputs):
        total, local_state = inputs
        return total[..., None] * state + local_state, state

    last, entering = jax.lax.scan(
        pass_on, h0, (jnp.moveaxis(d.total, 1, 0), jnp.moveaxis(local, 1, 0))
    )
    entering = jnp.moveaxis(entering, 0, 1)
    inter = jnp.einsum("ncik,nckv->nciv", qc * d.from_start, entering)
    o = (scale * (intra + inter)).reshape(q.shape[:2] + v.shape[-1:])
    return o, jnp.concatenate([entering, last[:, None]], axis=1)


def _chunked_backward(q, k, v, g, bounds, do, dlast, scale, chunk):
    """Gradients ``(dq, dk, dv, dg, dh0)`` from the inputs and the boundary states only."""
    qc, kc, vc, gc, doc = (_by_chunk(t, chunk) for t in (q, k, v, g, do))
    d = _decays(gc)
    entering, leaving = bounds[:, :-1], bounds[:, 1:]
    from_outputs = scale * jnp.einsum("ncik,nciv->nckv", qc * d.from_start, doc)

    def pass_back(adjoint, inputs):
        total, from_outputs_c = inputs
        return total[..., None] * adjoint + from_outputs_c, adjoint

    dh0, adjoint_out = jax.lax.scan(
        pass_back,
        dlast,
        (jnp.moveaxis(d.total, 1, 0), jnp.moveaxis(from_outputs, 1, 0)),
        reverse=True,
    )
    adjoint_out = jnp.moveaxis(adjoint_out, 0, 1)  # dL/dS at each chunk's end (N, chunks, K, V)

    scores = _scores(qc, kc, d)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    products = jnp.where(causal, jnp.einsum("nciv,ncjv->ncij", doc, vc), 0.0)
    dq = scale * (
        d.from_start * jnp.einsum("nckv,nciv->ncik", entering, doc)
        + _weighted_keys(products, kc, d)
    )
    dk = scale * _weighted_queries(products, qc, d) + d.to_end * jnp.einsum(
        "nckv,ncjv->ncjk", adjoint_out, vc
    )
    dv = scale * jnp.einsum("ncij,nciv->ncjv", scores, doc) + jnp.einsum(
        "ncjk,nckv->ncjv", kc * d.to_end, adjoint_out
    )
    from_cumulative = qc * dq - kc * dk
    dg = (
        jnp.flip(jnp.cumsum(jnp.flip(from_cumulative, -2), axis=-2), -2)
        + jnp.sum(adjoint_out * leaving, axis=-1)[:, :, None, :]
    )
    return tuple(t.reshape(t.shape[:1] + (-1,) + t.shape[-1:]) for t in (dq, dk, dv, dg)) + (dh0,)


# --- Pallas


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pallas_kernel(
    q_ref, k_ref, g_ref, v_ref, h0_ref, o_ref, bounds_ref, *, chunk, num_chunks, key_dim, scale, acc
):
    """One (row, value block): ``q, k, g`` refs (K, T) read a column per step, ``v``/``o``
    (T, BV) a row per step; the state (K, BV) is the loop carry, stored at chunk boundaries into
    ``bounds`` ((chunks + 1) * K, BV)."""
    from jax.experimental import pallas as pl

    def column(ref, t):
        return ref[:, pl.ds(t, 1)].astype(acc)

    def chunk_body(c, state):
        bounds_ref[pl.ds(pl.multiple_of(c * key_dim, key_dim), key_dim), :] = state

        def step(i, state):
            t = c * chunk + i
            v_t = v_ref[pl.ds(t, 1), :].astype(acc)
            state = jnp.exp(column(g_ref, t)) * state + column(k_ref, t) * v_t
            o_t = scale * jnp.sum(column(q_ref, t) * state, axis=0, keepdims=True)
            o_ref[pl.ds(t, 1), :] = o_t.astype(o_ref.dtype)
            return state

        return jax.lax.fori_loop(0, chunk, step, state)

    state = jax.lax.fori_loop(0, num_chunks, chunk_body, h0_ref[...].astype(acc))
    bounds_ref[pl.ds(num_chunks * key_dim, key_dim), :] = state


def _pallas(q, k, v, g, h0, scale, chunk, *, interpret: bool | None = None):
    """The Pallas kernel on rows; key and value widths padded to powers of two (Triton blocks)."""
    from jax.experimental import pallas as pl  # on use: importing hgrn_jax.ops skips Pallas
    from jax.experimental.pallas import triton as pltriton

    rows, length, key_dim = q.shape
    value_dim = v.shape[-1]
    acc = q.dtype
    num_chunks = length // chunk
    k_pad = _next_power_of_two(key_dim) - key_dim
    block = min(_PALLAS_VALUE_BLOCK, _next_power_of_two(value_dim))
    value_padded = -(-value_dim // block) * block
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret

    def keys(t):  # (N, T, K) -> (N, K_pad, T)
        return jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, k_pad), (0, 0)))

    v_p = jnp.pad(v, ((0, 0), (0, 0), (0, value_padded - value_dim)))
    h0_p = jnp.pad(h0, ((0, 0), (0, k_pad), (0, value_padded - value_dim)))
    key_padded = key_dim + k_pad
    column_spec = pl.BlockSpec((pl.squeezed, key_padded, length), lambda n, j: (n, 0, 0))
    row_spec = pl.BlockSpec((pl.squeezed, length, block), lambda n, j: (n, 0, j))
    state_spec = pl.BlockSpec((pl.squeezed, key_padded, block), lambda n, j: (n, 0, j))
    bounds_spec = pl.BlockSpec(
        (pl.squeezed, (num_chunks + 1) * key_padded, block), lambda n, j: (n, 0, j)
    )
    o, bounds = pl.pallas_call(
        functools.partial(
            _pallas_kernel,
            chunk=chunk,
            num_chunks=num_chunks,
            key_dim=key_padded,
            scale=scale,
            acc=acc,
        ),
        grid=(rows, value_padded // block),
        in_specs=[column_spec, column_spec, column_spec, row_spec, state_spec],
        out_specs=[row_spec, bounds_spec],
        out_shape=[
            jax.ShapeDtypeStruct((rows, length, value_padded), acc),
            jax.ShapeDtypeStruct((rows, (num_chunks + 1) * key_padded, value_padded), acc),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="matrix_recurrence_forward",
    )(keys(q), keys(k), keys(g), v_p, h0_p)
    bounds = bounds.reshape(rows, num_chunks + 1, key_padded, value_padded)
    return o[..., :value_dim], bounds[:, :, :key_dim, :value_dim]

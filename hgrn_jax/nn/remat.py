"""Rematerialisation (activation recomputation) of residual blocks.

A block's forward pass is recomputed during the backward pass instead of keeping its
intermediate activations, so training memory per block drops from every intermediate (the
projections, gates, the complex states of each scan and their residuals) to what the policy
saves. Policies, by name:

``"nothing"`` (:func:`jax.checkpoint_policies.nothing_saveable`)
    keep only each block's input (B, L, d); recompute the rest. The smallest memory: about one
    (B, L, d) array per block plus one block's intermediates at a time, for about one extra
    forward pass of compute.
``"dots"`` (:func:`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`)
    also keep the outputs of the matrix multiplications (the projections) and recompute only the
    elementwise work and the scans: less recomputation, more memory.
``"everything"`` (:func:`jax.checkpoint_policies.everything_saveable`)
    keep everything: the same memory as no remat (for comparisons). This policy (the name or
    the callable) runs the block directly, with no :func:`jax.checkpoint` at all: saving
    everything is exactly no remat, and ``jax.checkpoint`` under ``everything_saveable`` fails
    on the complex intermediates of the HGRU scans (``reduce_precision does not accept dtype
    complex64``, a JAX bug).

Usage: ``ResidualBlock(..., remat="nothing")``, or switch a built model with
``set_remat(model, "nothing")`` (every :class:`RematModule` inside it, such as each
:class:`~hgrn_jax.nn.ResidualBlock`); ``set_remat(model, None)`` turns it off. Modules opt in by
subclassing :class:`RematModule` and decorating their ``__call__`` with :func:`with_remat`, so
this module needs no import of the blocks (the dependency runs blocks -> remat only).

On CPU, XLA's ``cse_barrier_expander`` pass strips the optimisation barriers that keep the
recomputation apart, CSE merges it back into the forward pass, and remat saves nothing; run
with ``XLA_FLAGS=--xla_disable_hlo_passes=cse_barrier_expander`` to get the GPU/TPU behaviour
(``benchmarks/memory.py`` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Policy = Callable[..., bool]

POLICIES: dict[str, Policy] = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def resolve_policy(policy: str | Policy) -> Policy:
    """A policy name from :data:`POLICIES`, or a ``jax.checkpoint_policies`` callable as is."""
    if callable(policy):
        return policy
    if policy not in POLICIES:
        raise ValueError(
            f"unknown remat policy {policy!r}; use one of {sorted(POLICIES)}, "
            "a jax.checkpoint_policies callable, or None for no remat"
        )
    return POLICIES[policy]


def remat_block(
    block_call: Callable[..., Any], policy: str | Policy = "nothing"
) -> Callable[..., Any]:
    """``block_call(module, *args, **kwargs)`` recomputed in the backward pass under ``policy``.

    ``block_call`` is an unbound call (e.g. ``ResidualBlock.__call__``); keyword arguments are
    passed through as traced pytrees (arrays, None). The ``"everything"`` policy returns
    ``block_call`` itself: saving everything is no remat, and ``jax.checkpoint`` under
    ``everything_saveable`` rejects complex intermediates (a JAX bug).
    """
    resolved = resolve_policy(policy)
    if resolved is jax.checkpoint_policies.everything_saveable:
        return block_call

    def call(module: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        inner = nnx.remat(lambda m, a, kw: block_call(m, *a, **kw), policy=resolved)
        return inner(module, args, kwargs)

    return call


class RematModule(nnx.Module):
    """A module whose :func:`with_remat`-decorated call is recomputed under ``self.remat``."""

    remat: str | Policy | None = None


def with_remat(call: Callable[..., Any]) -> Callable[..., Any]:
    """Run the method ``call`` under :func:`remat_block` when ``self.remat`` is set."""

    @functools.wraps(call)
    def dispatch(self, *args, **kwargs):
        if getattr(self, "remat", None) is None:
            return call(self, *args, **kwargs)
        return remat_block(call, self.remat)(self, *args, **kwargs)

    return dispatch


def set_remat(model: nnx.Module, policy: str | Policy | None) -> int:
    """Set ``policy`` (None: off) on every :class:`RematModule` (residual block) of ``model``;
    returns how many."""
    if policy is not None:
        resolve_policy(policy)
    count = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, RematModule):
            module.remat = policy
            count += 1
    return count

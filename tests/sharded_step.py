"""One sharded optimizer step the way the runner builds it, for the sharding tests (JAX is
imported on use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    from flax import nnx


def sharded_train_step(
    factory: Callable, loss_fn: Callable, batch: dict, mesh
) -> tuple[nnx.GraphDef, nnx.State, jax.Array]:
    """One optimizer step on ``mesh`` the way the runner does it; returns the new state.

    ``batch`` holds this process's rows of the global batch.
    """
    import jax
    from flax import nnx

    from hgrn_jax import sharding as sh

    model, optimizer = sh.create_sharded(factory, mesh)
    model.train()
    graphdef, state = nnx.split((model, optimizer))
    state_sh = sh.state_shardings(state, mesh)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    jitted = jax.jit(
        step,
        in_shardings=(state_sh, sh.batch_sharding(mesh)),
        out_shardings=(state_sh, sh.replicated(mesh)),
        donate_argnums=0,
    )
    new_state, loss = jitted(state, sh.shard_batch(batch, mesh))
    return graphdef, new_state, loss

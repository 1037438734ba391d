"""One process of the multi-host test: an LM training step on a (2, 2, 2) mesh over all devices.

Run as ``python tests/multihost_worker.py --out F`` with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set, as a cluster launcher would: each process gets
``8 / N`` simulated CPU devices, joins the coordinator through
:func:`hgrn_jax.sharding.maybe_initialize_distributed` with the gloo CPU collectives, feeds only
its own rows of the global batch (after checking :mod:`hgrn_jax.training.agreement`'s
all-process flags), and process 0 writes the loss and every updated state leaf to
``F`` (.npz). ``tests/test_multihost.py`` imports
:func:`train_step_outputs` to compute the same step in one process.
"""

from __future__ import annotations

import argparse
import os

TOTAL_DEVICES = 8


def _configure_jax(num_processes: int) -> None:
    """Must run before JAX creates its backend."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", TOTAL_DEVICES // num_processes)
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def train_step_outputs() -> dict:
    """Loss and every leaf of the (model, optimizer) state after one adamw step, as numpy arrays
    gathered from all processes; the same on every process."""
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from sharded_step import sharded_train_step

    from hgrn_jax import sharding as sh
    from hgrn_jax.nn import HGRNLM, LMConfig

    config = LMConfig(vocab_size=32, features=8, num_layers=2, glu_hidden=16)
    global_batch, length = 8, 6

    def factory():
        model = HGRNLM(config, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)

    def loss_fn(model, batch):
        logits = model(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (global_batch, length + 1))
    rows = global_batch // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    local = {"inputs": ids[mine, :-1].astype(np.int32), "targets": ids[mine, 1:].astype(np.int32)}
    mesh = sh.make_mesh(data=2, fsdp=2, model=2)
    _, new_state, loss = sharded_train_step(factory, loss_fn, local, mesh)

    arrays = nnx.state(new_state, nnx.Param, nnx.optimizer.OptState)
    outputs = {"loss": np.asarray(multihost_utils.process_allgather(loss, tiled=True))}
    for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
        outputs[jax.tree_util.keystr(path)] = np.asarray(
            multihost_utils.process_allgather(leaf, tiled=True)
        )
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    _configure_jax(num_processes)
    import jax
    import numpy as np

    from hgrn_jax import sharding as sh

    assert sh.maybe_initialize_distributed()  # reads the JAX_* variables
    assert jax.process_count() == num_processes and jax.device_count() == TOTAL_DEVICES
    # The stop decisions of the training loop: a flag raised on one process only is seen by all.
    from hgrn_jax.training import agreement

    last = jax.process_index() == num_processes - 1
    assert agreement.any_process_each((last, False, True)) == (True, False, True)
    assert agreement.any_process(last) and not agreement.any_process(False)
    outputs = train_step_outputs()
    if jax.process_index() == 0:
        np.savez(args.out, **outputs)


if __name__ == "__main__":
    main()

"""One process of the cross-process sequence-parallelism test (run by experiments.launch, 2 x 2).

Mesh ``("seq", "batch")`` = (2, 2) over the 4 devices of 2 processes, built so that ``seq`` spans
the processes: the sequence's first half lives on process 0 and its second half on process 1, so
the carries of :func:`~hgrn_jax.ops.sequence_parallel.sharded_linear_recurrence` cross processes
(gloo). Every process also computes the unsharded references on its own.

1. The recurrence in float64 (complex128 decays): values, final state and gradients against
   ``linear_recurrence`` on the whole sequence.
2. HGRN2's :func:`~hgrn_jax.ops.sequence_parallel.sharded_matrix_recurrence` in float64:
   outputs, final state and the gradients of q, k, v, log decays, h0 and scale against
   ``matrix_recurrence`` on the whole sequence (its carried states cross processes too).
3. Tiny LMs (HGRN official, HGRN2 official, fla's HGRN) with ``sequence_axis="seq"`` train 4
   AdamW steps each; their losses against the same LMs without sequence parallelism on one device.

Process 0 writes ``--out`` (JSON): the maximum errors and the loss curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hgrn_jax import sharding  # noqa: E402
from hgrn_jax.nn import HGRNLM, LMConfig, MixerConfig  # noqa: E402
from hgrn_jax.ops.matrix_recurrence import matrix_recurrence  # noqa: E402
from hgrn_jax.ops.recurrence import linear_recurrence  # noqa: E402
from hgrn_jax.ops.sequence_parallel import (  # noqa: E402
    sharded_linear_recurrence,
    sharded_matrix_recurrence,
)


def global_array(value: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
    return jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda index: value[index]
    )


def replicate(value: jax.Array, mesh: Mesh) -> jax.Array:
    """A process-local array (the same on every process) as a replicated global array."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = global_array(np.asarray(jax.random.key_data(value)), mesh, P())
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    return global_array(np.asarray(value), mesh, P())


def gathered(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def max_rel(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def recurrence_errors(mesh: Mesh) -> dict[str, float]:
    rng = np.random.default_rng(0)
    shape = (2, 8, 3)  # (batch, L, C): L split 2 ways over "seq", batch 2 ways over "batch"
    a = rng.uniform(0.5, 0.99, shape) * np.exp(1j * rng.uniform(-1, 1, shape))
    x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    h0 = rng.normal(size=shape[:1] + shape[2:]) + 0j
    w = rng.normal(size=shape)

    def loss(fn, a, x, h0):
        h, last = fn(a, x, h0)
        return jnp.sum(jnp.real(h) * w + jnp.imag(h)) + jnp.sum(jnp.abs(last))

    kwargs = dict(method="sequential", return_last_state=True)
    unsharded = functools.partial(linear_recurrence, **kwargs)
    sharded = functools.partial(sharded_linear_recurrence, axis_name="seq", mesh=mesh, **kwargs)
    want_h, want_last = unsharded(a, x, h0)
    want_grads = jax.grad(functools.partial(loss, unsharded), argnums=(0, 1, 2))(a, x, h0)
    with jax.set_mesh(mesh):
        ga, gx = (global_array(v, mesh, P("batch", "seq")) for v in (a, x))
        gh0 = global_array(h0, mesh, P("batch"))
        h, last = jax.jit(sharded)(ga, gx, gh0)
        grads = jax.jit(jax.grad(functools.partial(loss, sharded), argnums=(0, 1, 2)))(ga, gx, gh0)
    errors = {"h": max_rel(gathered(h), want_h), "last_state": max_rel(gathered(last), want_last)}
    for name, got, want in zip(("grad_a", "grad_x", "grad_h0"), grads, want_grads):
        errors[name] = max_rel(gathered(got), want)
    return errors


def matrix_recurrence_errors(mesh: Mesh) -> dict[str, float]:
    rng = np.random.default_rng(2)
    B, L, H, K, V = 2, 8, 3, 2, 4  # L split 2 ways over "seq", batch 2 ways over "batch"
    q, k = rng.normal(size=(B, L, H, K)), rng.normal(size=(B, L, H, K))
    v = rng.normal(size=(B, L, H, V))
    log_decay = -rng.uniform(0.01, 1.0, (B, L, H, K))
    h0 = rng.normal(size=(B, H, K, V))
    scale = np.asarray(0.7)
    w, w_last = rng.normal(size=v.shape), rng.normal(size=h0.shape)

    def loss(fn, *args):
        o, last = fn(*args[:5], scale=args[5])
        return jnp.sum(o * w) + jnp.sum(last * w_last)

    kwargs = dict(method="sequential", return_last_state=True)
    unsharded = functools.partial(matrix_recurrence, **kwargs)
    sharded = functools.partial(sharded_matrix_recurrence, axis_name="seq", mesh=mesh, **kwargs)
    args = (q, k, v, log_decay, h0, scale)
    want_o, want_last = unsharded(*args[:5], scale=scale)
    argnums = tuple(range(len(args)))
    want_grads = jax.grad(functools.partial(loss, unsharded), argnums=argnums)(*args)
    with jax.set_mesh(mesh):
        specs = (*[P("batch", "seq")] * 4, P("batch"), P())  # q, k, v, log_decay, h0, scale
        g_args = tuple(global_array(t, mesh, spec) for t, spec in zip(args, specs, strict=True))
        o, last = jax.jit(lambda *a: sharded(*a[:5], scale=a[5]))(*g_args)
        grads = jax.jit(jax.grad(functools.partial(loss, sharded), argnums=argnums))(*g_args)
    errors = {"o": max_rel(gathered(o), want_o), "last_state": max_rel(gathered(last), want_last)}
    names = ("grad_q", "grad_k", "grad_v", "grad_log_decay", "grad_h0", "grad_scale")
    for name, got, want in zip(names, grads, want_grads, strict=True):
        errors[name] = max_rel(gathered(got), want)
    return errors


# The LMs of check 3: mixer fields of each (method and sequence axis are set per run).
LM_MIXERS = {
    "hgrn": MixerConfig(kind="hgrn", layout="official"),
    "hgrn2": MixerConfig(kind="hgrn2", layout="official"),
    "fla_hgrn": MixerConfig(kind="hgrn", layout="fla", complex_valued=False),
}


def tiny_lm(mixer: MixerConfig, sequence_axis: str | None) -> HGRNLM:
    mixer = dataclasses.replace(mixer, method="sequential", sequence_axis=sequence_axis)
    config = LMConfig(vocab_size=32, features=8, num_layers=1, glu_expand=2, mixer=mixer)
    return HGRNLM(config, rngs=nnx.Rngs(0))


def splits_sequence(mesh: Mesh, mixer: MixerConfig) -> bool:
    """Whether the LM with ``sequence_axis="seq"`` runs its recurrence in a ``shard_map`` over
    the mesh (a mixer that ignored the axis would pass the loss comparison trivially)."""
    graph, state = nnx.split(tiny_lm(mixer, "seq"))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graph, s)(ids))(
            state, np.zeros((4, 16), np.int32)
        )
    return "shard_map" in str(jaxpr)


def lm_losses(mesh: Mesh | None, mixer: MixerConfig, steps: int = 4) -> list[float]:
    """Training losses of a tiny LM (float32) with ``mixer``, sequence-parallel over "seq" when
    ``mesh``."""
    model = tiny_lm(mixer, "seq" if mesh is not None else None)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    ids = np.random.default_rng(1).integers(0, 32, (4, 17)).astype(np.int32)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss_fn(model, inputs, targets):
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
        optimizer.update(model, grads)
        return loss

    losses = []
    if mesh is None:
        for _ in range(steps):
            losses.append(float(step(model, optimizer, inputs, targets)))
        return losses
    with jax.set_mesh(mesh):
        gi, gt = (global_array(v, mesh, P("batch", "seq")) for v in (inputs, targets))
        state = nnx.state((model, optimizer))
        replicated = jax.tree.map(lambda v: replicate(v, mesh), state)
        nnx.update((model, optimizer), replicated)
        for _ in range(steps):
            losses.append(float(gathered(step(model, optimizer, gi, gt))))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert sharding.maybe_initialize_distributed()
    assert jax.process_count() == 2 and jax.local_device_count() == 2
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    mesh = Mesh(devices.reshape(2, 2), ("seq", "batch"), axis_types=(AxisType.Auto,) * 2)
    seq_processes = [{d.process_index for d in row} for row in mesh.devices]
    assert seq_processes == [{0}, {1}], seq_processes  # "seq" crosses the process boundary
    with jax.default_device(jax.local_devices()[0]):
        references = {name: lm_losses(None, mixer) for name, mixer in LM_MIXERS.items()}
    result = {
        "errors": recurrence_errors(mesh),
        "matrix_errors": matrix_recurrence_errors(mesh),
        "lm": {
            name: {
                "sharded": lm_losses(mesh, mixer),
                "reference": references[name],
                "splits_sequence": splits_sequence(mesh, mixer),
            }
            for name, mixer in LM_MIXERS.items()
        },
    }
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

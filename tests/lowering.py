"""Lowering a function for another platform than this machine's (a GPU or a TPU), for tests that
read the lowered program on CPU."""

from __future__ import annotations

import contextlib

import jax

# Triton's lowering asks which GPU it compiles for. JAX 0.10 falls back to compute capability 9.0
# when the process has no GPU; JAX 0.11 needs an abstract GPU device in the context.
LOWERING_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")


def lowered_text(fn, platform: str, *args) -> str:
    """``fn`` traced afresh (a traced function keeps the options it was traced with) and lowered
    for ``platform`` ("cuda", "rocm", "tpu"), as StableHLO text."""
    fresh = jax.jit(lambda *a: fn(*a))
    if platform in ("cuda", "rocm"):
        mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=LOWERING_GPU)
        context = jax.sharding.use_abstract_mesh(mesh)
    else:
        context = contextlib.nullcontext()
    with context:
        return fresh.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@contextlib.contextmanager
def mosaic_gpu_kernel_texts():
    """Collects, while lowering inside, each Mosaic GPU kernel's MLIR module as text, just
    before Mosaic GPU serializes it into its custom call (the serialized form is bytecode in a
    versioned dialect, unreadable without Mosaic GPU's own passes)."""
    from jax.experimental.mosaic.gpu import core

    texts: list[str] = []
    serialize = core._run_serde_pass

    def record(module, *args, **kwargs):
        if kwargs.get("serialize"):
            texts.append(str(module))
        return serialize(module, *args, **kwargs)

    core._run_serde_pass = record
    try:
        yield texts
    finally:
        core._run_serde_pass = serialize

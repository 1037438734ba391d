"""Lowering a function for another platform than this machine's (a GPU or a TPU), for tests that
read the lowered program on CPU."""

from __future__ import annotations

import contextlib
import re

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


def mosaic_gpu_modules(text: str) -> list[str]:
    """The Mosaic GPU kernels' own MLIR modules in lowered StableHLO ``text``, one per custom
    call, as text (each is serialized MLIR bytecode in an escaped string attribute)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    def unescape(match: re.Match) -> bytes:
        code = match.group(1)
        return bytes([int(code, 16)]) if len(code) == 2 else _ESCAPES.get(code, code)

    modules = []
    for attribute in re.finditer(r'module = "((?:[^"\\]|\\.)*)"', text):
        raw = re.sub(rb"\\([0-9A-Fa-f]{2}|.)", unescape, attribute.group(1).encode("latin1"))
        context = mlir.make_ir_context()
        context.allow_unregistered_dialects = True  # the stable_mosaic_gpu dialect
        with context:
            modules.append(str(ir.Module.parse(raw)))
    return modules


_ESCAPES = {b"n": b"\n", b"t": b"\t"}

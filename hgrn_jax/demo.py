"""A short forward/backward demo of an HGRN language model on random tokens.

``python -m hgrn_jax.demo`` prints the model's shapes, the per-layer lower bounds and the time of a
jitted training step. (The experiment runner's ListOps demo replaces this as ``make demo``.)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn import HGRNLM, LMConfig


def main() -> None:
    config = LMConfig(vocab_size=256, features=64, num_layers=4, glu_expand=2)
    model = HGRNLM(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (4, 512), 0, config.vocab_size)
    num_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"HGRN LM: {config.num_layers} layers, d={config.features}, {num_params:,} parameters")
    print(f"input ids {ids.shape} {ids.dtype} on {jax.devices()[0].platform}")

    @nnx.jit
    def loss_and_grad(model, ids):
        def loss_fn(model):
            logits = model(ids[:, :-1])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
        return nnx.value_and_grad(loss_fn)(model)

    start = time.perf_counter()
    loss, grads = loss_and_grad(model, ids)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(5):
        loss, grads = loss_and_grad(model, ids)
    jax.block_until_ready(grads)
    step_ms = (time.perf_counter() - start) / 5 * 1e3
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads))))
    print(f"logits {model(ids).shape}; loss {float(loss):.4f} (log V = {np.log(256):.4f}); "
          f"grad norm {grad_norm:.3f}")
    print(f"forward+backward: {step_ms:.1f} ms per step after {compile_s:.1f} s compile")
    np.set_printoptions(precision=3, suppress=True)
    print("per-layer lower bounds (mean over channels), increasing with depth:")
    print(np.asarray(model.lower_bounds()).mean(axis=1))


if __name__ == "__main__":
    main()

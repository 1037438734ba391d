"""Comparisons shared by the golden parity tests (tests/test_golden.py, tests/test_golden_hgrn2.py).

Tolerances (tests/golden/README.md): in float64 the port and the reference compute the same
operations, so they agree to rounding (~1e-14; ``F64`` allows 1e-9). In float32 the reference's
own float32 run stays within 8e-6 of the float64 goldens, so ``F32`` (atol 5e-5 / rtol 1e-5)
leaves about 6x margin. fla computes its LMs' lower bounds (and their logs) in float32 even in a
float64 model; softmax and log differ by an ulp between libraries and log(gamma) magnifies that,
so the fla LMs get ``FLA_LM_F64`` (1e-6) in float64, and their bounds ``FLA_BOUNDS`` (float32
rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

F32 = dict(atol=5e-5, rtol=1e-5)
F64 = dict(atol=1e-9, rtol=0)
FLA_LM_F64 = dict(atol=1e-6, rtol=0)
FLA_BOUNDS = dict(atol=3e-7, rtol=0)
PRECISIONS = {"float32": (jnp.float32, F32), "float64": (jnp.float64, F64)}


def to_batch_major(x: np.ndarray) -> np.ndarray:
    """The reference's time-major (L, B, d) or (H, W, B, d) -> our (B, L, d) or (B, H, W, d)."""
    return x.transpose(1, 0, 2) if x.ndim == 3 else x.transpose(2, 0, 1, 3)


def to_time_major(y: np.ndarray) -> np.ndarray:
    """Our (B, L, d) or (B, H, W, d) -> the reference's (L, B, d) or (H, W, B, d)."""
    return y.transpose(1, 0, 2) if y.ndim == 3 else y.transpose(1, 2, 0, 3)


def check_fla_mixer(
    convert_layer: Callable, case, dtype, tol: dict, state_layout: Callable = np.asarray
):
    """An fla mixer converted by ``convert_layer(constructor, params, dtype=)`` against its golden
    ``case``: the output, the masked output, the last state of a streamed pass (through
    ``state_layout`` into fla's layout) and layer 0 (which ignores its bound).

    Returns the masked output and the mask, for checks of one layout only."""
    constructor = case.meta["constructor"]
    layer = convert_layer(constructor, case.params, dtype=dtype)
    x = jnp.asarray(case.arrays["input"], dtype)
    bound = jnp.asarray(case.arrays["lower_bound"], dtype)
    mask = jnp.asarray(case.arrays["attention_mask"], dtype)
    np.testing.assert_allclose(layer(x, bound), case.arrays["output"], **tol)
    masked = layer(x, bound, mask=mask)
    np.testing.assert_allclose(masked, case.arrays["output/masked"], **tol)
    _, last = layer.step(x, layer.init_state(x.shape[0]), bound)
    np.testing.assert_allclose(state_layout(last), case.arrays["output/final_state"], **tol)
    first_layer = convert_layer(dict(constructor, layer_idx=0), case.params, dtype=dtype)
    np.testing.assert_allclose(first_layer(x, bound), case.arrays["output/layer_idx0"], **tol)
    return masked, mask


def check_fla_lm(lm, case, tol: dict, state_layout: Callable = np.asarray) -> None:
    """A converted fla LM against its golden ``case``: the logits of a full pass, the lower
    bounds, a prefill then token-by-token decoding, and each layer's recurrent state at the end
    (through ``state_layout`` into fla's layout)."""
    ids = jnp.asarray(case.arrays["input"])
    np.testing.assert_allclose(lm(ids), case.arrays["output"], **tol)
    np.testing.assert_allclose(
        lm.lower_bounds(), case.arrays["output/lower_bounds_used"], **FLA_BOUNDS
    )

    prefill = case.meta["prefill_len"]
    step = jax.jit(lambda m, ids, cache: m.step(ids, cache))
    logits, cache = step(lm, ids[:, :prefill], lm.init_cache(ids.shape[0]))
    np.testing.assert_allclose(logits, case.arrays["output"][:, :prefill], **tol)
    decoded = []
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(lm, ids[:, t : t + 1], cache)
        decoded.append(logits)
    np.testing.assert_allclose(
        jnp.concatenate(decoded, axis=1), case.arrays["output/decode_logits"], **tol
    )
    for k, state in enumerate(cache):
        np.testing.assert_allclose(
            state_layout(state), case.arrays[f"output/recurrent_state/{k}"], **tol
        )

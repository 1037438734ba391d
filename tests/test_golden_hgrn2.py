"""HGRN2 parity with hgru2-pytorch and fla through hgrn_jax.convert (tests/golden, "HGRN2 cases").

Every shape, head count and constructor argument comes from the files. The official layer is
time-major; the test transposes its input to our batch-major API and the output back. fla's states
are (B, H, V, K); ours are (B, H, K, V), so the test transposes ours.

Tolerances (tests/golden/README.md, "Suggested comparison (HGRN2)"; tests/golden_helpers.py): in
float64 the port and the reference agree to rounding (we allow 1e-9), except the fla LM, whose
lower bounds and their logs fla computes in float32 (1e-6). In float32, fla's own float32 run
passes atol 5e-5 / rtol 1e-5 with at least 7x margin. The bidirectional and 2-D official cases
(measured: 4e-15 in float64; 1.8e-6 in float32, as the reference's own float32 rebuild, with
outputs up to 6.6) hold the same tolerances with margins of about 2e5 and 25x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_helpers import FLA_LM_F64, check_fla_lm, check_fla_mixer, to_batch_major, to_time_major

from hgrn_jax import convert
from hgrn_jax.nn import HGRN2, HGRN2D


def _fla_layout(state) -> np.ndarray:
    """Our (..., H, K, V) state as fla's cache stores it, (..., H, V, K)."""
    return np.swapaxes(np.asarray(state), -1, -2)


# Case -> (the layer the converter must build from the case's class, whether it scans both ways).
OFFICIAL_HGRN2 = {
    "official_hgrn2_1d": (HGRN2, False),  # Hgru2_1d
    "official_hgrn2_bi1d": (
        HGRN2,
        True,
    ),  # BiHgru2_1d (made by tests/golden/generate_hgrn2_bi2d.py)
    "official_hgrn2_2d": (HGRN2D, True),  # Hgru2_2d_parallel (the same generator)
}


@pytest.mark.parametrize("name", list(OFFICIAL_HGRN2))
def test_official_hgrn2(golden, golden_precision, name):
    """hgru2-pytorch's causal, bidirectional and 2-D (four-scan) layers, through the converter."""
    dtype, tol = golden_precision
    case = golden(name)
    constructor = case.meta["constructor"]
    layer = convert.from_hgru2_pytorch(
        case.meta["source"]["class"], constructor, case.params, dtype=dtype
    )
    kind, bidirectional = OFFICIAL_HGRN2[name]
    assert type(layer) is kind and layer.bidirectional == bidirectional
    derived = case.meta["derived"]
    assert (layer.num_heads, layer.key_dim, layer.value_dim) == (
        derived["num_heads"],
        derived["head_k_dim"],
        derived["head_v_dim"],
    )
    x = jnp.asarray(to_batch_major(case.arrays["input"]), dtype)
    bound = jnp.asarray(case.arrays["lower_bound"], dtype)
    out = jax.jit(lambda m, x, b: m(x, b))(layer, x, bound)
    assert out.dtype == dtype
    np.testing.assert_allclose(to_time_major(np.asarray(out)), case.arrays["output"], **tol)
    np.testing.assert_allclose(
        to_time_major(np.asarray(layer(x))), case.arrays["output/lb0"], **tol
    )


def test_fla_hgrn2_attention(golden, golden_precision):
    dtype, tol = golden_precision
    case = golden("fla_hgrn2_attention")
    masked, mask = check_fla_mixer(
        convert.from_fla_hgrn2_attention, case, dtype, tol, state_layout=_fla_layout
    )
    assert np.all(np.asarray(masked)[np.asarray(mask) == 0] == 0)  # padding outputs exactly 0


def test_fla_hgrn2_lm(golden, golden_precision):
    dtype, tol = golden_precision
    if dtype == jnp.float64:
        tol = FLA_LM_F64  # fla's float32 lower bounds (tests/golden_helpers.py)
    case = golden("fla_hgrn2_lm")
    lm = convert.from_fla_hgrn2_lm(
        case.meta["constructor"]["HGRN2Config"], case.params, dtype=dtype
    )
    check_fla_lm(lm, case, tol, state_layout=_fla_layout)


# ----------------------------------------------------------------- converter errors


def test_hgru2_converter_errors(golden):
    case = golden("official_hgrn2_1d")
    cls, ctor, params = case.meta["source"]["class"], case.meta["constructor"], dict(case.params)
    missing = {k: v for k, v in params.items() if k != "norm.bias"}
    with pytest.raises(convert.ConversionError, match=r"missing parameter\(s\): norm.bias"):
        convert.from_hgru2_pytorch(cls, ctor, missing)
    with pytest.raises(convert.ConversionError, match=r"unexpected parameter\(s\): .*in_proj.bias"):
        convert.from_hgru2_pytorch(cls, dict(ctor, bias=False), params)
    wrong = dict(params, **{"in_proj.weight": params["in_proj.weight"][:-1]})
    with pytest.raises(convert.ConversionError, match=r"in_proj.weight has shape"):
        convert.from_hgru2_pytorch(cls, ctor, wrong)
    with pytest.raises(convert.ConversionError, match="unknown hgru2-pytorch class 'Hgru2_2d'"):
        convert.from_hgru2_pytorch("Hgru2_2d", ctor, params)
    with pytest.raises(convert.ConversionError, match="uv_act_fun='relu' is not supported"):
        convert.from_hgru2_pytorch(cls, dict(ctor, uv_act_fun="relu"), params)
    with pytest.raises(convert.ConversionError, match="expand_ratio=16 is not supported"):
        convert.from_hgru2_pytorch(cls, dict(ctor, expand_ratio=16), params)
    with pytest.raises(
        convert.ConversionError, match=r"unknown constructor argument\(s\) 'causal'"
    ):
        convert.from_hgru2_pytorch(cls, dict(ctor, causal=False), params)


def test_fla_hgrn2_converter_errors(golden):
    case = golden("fla_hgrn2_attention")
    ctor, params = case.meta["constructor"], dict(case.params)
    with pytest.raises(convert.ConversionError, match="use_short_conv=True is not supported"):
        convert.from_fla_hgrn2_attention(dict(ctor, use_short_conv=True), params)
    with pytest.raises(convert.ConversionError, match=r"unexpected parameter\(s\): g_proj.weight"):
        convert.from_fla_hgrn2_attention(
            ctor, dict(params, **{"g_proj.weight": params["q_proj.weight"]})
        )
    # A different head split changes q_proj / f_proj widths only when H * K != d; K must divide d.
    with pytest.raises(convert.ConversionError, match="not a multiple of expand_ratio"):
        convert.from_fla_hgrn2_attention(dict(ctor, expand_ratio=ctor["hidden_size"] + 1), params)

    lm_case = golden("fla_hgrn2_lm")
    lm_ctor, lm_params = lm_case.meta["constructor"]["HGRN2Config"], dict(lm_case.params)
    bad = dict(lm_params)
    bad["model.layers.1.attn.q_proj.weight"] = bad["model.layers.1.attn.q_proj.weight"][:-1]
    with pytest.raises(convert.ConversionError, match=r"model.layers.1.attn.q_proj.weight"):
        convert.from_fla_hgrn2_lm(lm_ctor, bad)
    with pytest.raises(convert.ConversionError, match=r"missing parameter\(s\): lm_head.weight"):
        convert.from_fla_hgrn2_lm(
            lm_ctor, {k: v for k, v in lm_params.items() if k != "lm_head.weight"}
        )

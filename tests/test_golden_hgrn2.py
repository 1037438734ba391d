"""HGRN2 parity with hgru2-pytorch and fla through hgrn_jax.convert (tests/golden, "HGRN2 cases").

Every shape, head count and constructor argument comes from the files. The official layer is
time-major; the test transposes its input to our batch-major API and the output back. fla's states
are (B, H, V, K); ours are (B, H, K, V), so the test transposes ours.

Tolerances (tests/golden/README.md, "Suggested comparison (HGRN2)"; tests/golden_helpers.py): in
float64 the port and the reference agree to rounding (we allow 1e-9), except the fla LM, whose
lower bounds and their logs fla computes in float32 (1e-6). In float32, fla's own float32 run
passes atol 5e-5 / rtol 1e-5 with at least 7x margin. The bidirectional and 2-D official cases
(measured: 4e-15 in float64; 1.8e-6 in float32, as the reference's own float32 rebuild, with
outputs up to 6.6) hold the same tolerances with margins of about 2e5 and 25x. The series case
(``Hgru2_2d_series``: two passes of the layer, the second reading the first's output) measured
4.9e-15 in float64 (8e-16 of the largest output, 5.7) and 1.6e-6 in float32 (2.9e-7 of it, as
the reference's own float32 rebuild, 1.7e-6): margins of about 2e5 and 34x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden_helpers import FLA_LM_F64, check_fla_lm, check_fla_mixer, to_batch_major, to_time_major

from hgrn_jax import convert
from hgrn_jax.nn import HGRN2, HGRN2D, FlaHGRN2Attention, HGRN2DSeries


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
    "official_hgrn2_2d_series": (HGRN2DSeries, True),  # Hgru2_2d_series (the same generator)
}


@pytest.mark.parametrize("name", list(OFFICIAL_HGRN2))
def test_official_hgrn2(golden, golden_precision, name):
    """hgru2-pytorch's causal, bidirectional and 2-D (four-scan and series) layers, through the
    converter."""
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
    # A different head split changes q_proj / f_proj widths only when H * K != d; the
    # H = d // K heads must split d.
    d = ctor["hidden_size"]
    with pytest.raises(
        convert.ConversionError,
        match=rf"^HGRN2Attention: expand_ratio={d + 1} \(the key width of a head\) gives "
        rf"hidden_size // expand_ratio = 0 heads, which do not split hidden_size={d}",
    ):
        convert.from_fla_hgrn2_attention(dict(ctor, expand_ratio=d + 1), params)
    with pytest.raises(
        convert.ConversionError, match=r"^HGRN2Attention: num_heads=5 does not split hidden_size="
    ):
        convert.from_fla_hgrn2_attention(dict(ctor, expand_ratio=None, num_heads=5), params)

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


def test_hgrn2_head_width_must_be_given_and_consistent(golden):
    """No parameter shape reveals HGRN2's head width: a constructor without ``expand_ratio``
    loaded with a default (2 for hgru2-pytorch, fla's 128) and a wrong one gave relative errors
    of ~0.5 without a word. It is now required, and an fla config whose ``num_heads`` (saved
    beside it) disagrees with it is refused."""
    case = golden("official_hgrn2_1d")
    cls, ctor = case.meta["source"]["class"], case.meta["constructor"]
    without = {k: v for k, v in ctor.items() if k != "expand_ratio"}
    with pytest.raises(
        convert.ConversionError,
        match=r"^Hgru2_1d: constructor needs 'expand_ratio' \(the head width\): no parameter",
    ):
        convert.from_hgru2_pytorch(cls, without, case.params)

    fla = golden("fla_hgrn2_attention")
    fla_ctor = {k: v for k, v in fla.meta["constructor"].items() if k != "expand_ratio"}
    with pytest.raises(convert.ConversionError, match=r"^HGRN2Attention: needs 'expand_ratio'"):
        convert.from_fla_hgrn2_attention(fla_ctor, fla.params)

    lm = golden("fla_hgrn2_lm")
    kwargs = lm.meta["constructor"]["HGRN2Config"]
    d, k = kwargs["hidden_size"], kwargs["expand_ratio"]
    saved = dict(kwargs, num_heads=d // k)  # as HGRN2Config stores it in config.json
    assert convert.fla_hgrn2_lm_config(saved) == convert.fla_hgrn2_lm_config(kwargs)
    with pytest.raises(
        convert.ConversionError,
        match=rf"^HGRN2Config: num_heads={d // k} disagrees with expand_ratio={k // 2} ",
    ):
        convert.from_fla_hgrn2_lm(dict(saved, expand_ratio=k // 2), lm.params)
    with pytest.raises(convert.ConversionError, match=r"^HGRN2Config: needs 'expand_ratio'"):
        convert.from_fla_hgrn2_lm(
            {n: v for n, v in kwargs.items() if n != "expand_ratio"}, lm.params
        )


def test_fla_hgrn2_converters_refuse_unknown_keywords(golden):
    """``HGRN2Attention(layer_index=1)`` or an ``HGRN2Config`` key fla does not take loaded
    silently with the default in force."""
    case = golden("fla_hgrn2_attention")
    ctor = {k: v for k, v in case.meta["constructor"].items() if k != "layer_idx"}
    with pytest.raises(
        convert.ConversionError,
        match=r"^HGRN2Attention: unknown constructor argument\(s\) 'layer_index'; "
        r"did you mean 'layer_idx'\?",
    ):
        convert.from_fla_hgrn2_attention(dict(ctor, layer_index=1), case.params)
    lm = golden("fla_hgrn2_lm")
    kwargs = dict(lm.meta["constructor"]["HGRN2Config"], num_head=2)
    with pytest.raises(
        convert.ConversionError,
        match=r"^HGRN2Config: unknown config key\(s\) 'num_head'; did you mean 'num_heads'\?",
    ):
        convert.fla_hgrn2_lm_config(kwargs)


def test_fla_hgrn2_key_width_need_not_divide_the_width():
    """fla builds H = d // K heads of value width d // H, so d = 96 with K = 64 is one head of
    key width 64 and value width 96 (q_proj and f_proj (64, 96)). The converter refused it
    (it asked K to divide d) although fla and our layer both build it; it now loads it, and the
    loaded layer is our layer exactly."""
    d, k = 96, 64
    ours = FlaHGRN2Attention(d, expand_ratio=k, rngs=nnx.Rngs(3))
    assert (ours.num_heads, ours.key_dim, ours.value_dim) == (1, k, d)
    torch_names = {"q_proj": ours.q_proj, "f_proj": ours.f_proj, "i_proj": ours.i_proj}
    torch_names["o_proj"] = ours.o_proj
    state = {f"{n}.weight": np.asarray(m.kernel[...]).T for n, m in torch_names.items()}
    state["g_norm.weight"] = np.asarray(ours.g_norm.scale[...])
    loaded = convert.from_fla_hgrn2_attention(
        {"hidden_size": d, "expand_ratio": k, "layer_idx": 1}, state
    )
    assert (loaded.num_heads, loaded.key_dim, loaded.value_dim) == (1, k, d)
    x = jax.random.normal(jax.random.key(0), (2, 9, d))
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(ours(x)))

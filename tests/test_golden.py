"""Parity with the reference PyTorch code through hgrn_jax.convert (tests/golden).

Every shape and constructor argument comes from the files. The reference layers are time-major;
the tests transpose the inputs to our batch-major API and the outputs back.

Tolerances: in float64 the port and the reference compute the same operations, so they agree to
rounding (~1e-14; we allow 1e-9). The fla LM computes its lower bounds in float32 even in a
float64 model; we do the same, but softmax and log differ by an ulp between libraries, and
log(gamma) magnifies that, so 1e-6 (the golden README's figure). In float32 the original code's
own float32 run stays within 8e-6 of the float64 goldens, so atol 5e-5 / rtol 1e-5 leaves
about 6x margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hgrn_jax import convert
from hgrn_jax.nn import lower_bounds

OFFICIAL_CASES = [
    "official_hgru1d_causal",
    "official_hgru1d_causal_nobias_lbvec",
    "official_hgru1d_noncausal",
    "official_bihgru1d",
    "official_hgru2d_causal",
    "official_hgru2d_noncausal",
    "official_bihgru2d",
]
F32 = dict(atol=5e-5, rtol=1e-5)
F64 = dict(atol=1e-9, rtol=0)
PRECISIONS = {"float32": (jnp.float32, F32), "float64": (jnp.float64, F64)}


@pytest.fixture(params=sorted(PRECISIONS))
def precision(request):
    dtype, tol = PRECISIONS[request.param]
    with jax.enable_x64(dtype == jnp.float64):
        yield dtype, tol


def _to_batch_major(x: np.ndarray) -> np.ndarray:
    return x.transpose(1, 0, 2) if x.ndim == 3 else x.transpose(2, 0, 1, 3)


def _to_time_major(y: np.ndarray) -> np.ndarray:
    return y.transpose(1, 0, 2) if y.ndim == 3 else y.transpose(1, 2, 0, 3)


@pytest.mark.parametrize("case_name", OFFICIAL_CASES)
def test_official_hgru(golden, case_name, precision):
    dtype, tol = precision
    case = golden(case_name)
    module = convert.from_hgru_pytorch(
        case.meta["source"]["class"], case.meta["constructor"], case.params, dtype=dtype
    )
    x = jnp.asarray(_to_batch_major(case.arrays["input"]), dtype)
    bound = jnp.asarray(case.arrays["lower_bound"], dtype)
    out = _to_time_major(np.asarray(jax.jit(lambda m, x, b: m(x, b))(module, x, bound)))
    out_lb0 = _to_time_major(np.asarray(module(x)))
    np.testing.assert_allclose(out, case.arrays["output"], **tol)
    np.testing.assert_allclose(out_lb0, case.arrays["output/lb0"], **tol)
    assert out.dtype == dtype


def test_official_lower_bounds(golden, precision):
    dtype, tol = precision
    case = golden("official_lower_bounds")
    param = jnp.asarray(case.arrays["param/lower_bounds"], dtype)
    np.testing.assert_allclose(lower_bounds(param, "lra"), case.arrays["output/lra_im"], **tol)
    np.testing.assert_allclose(lower_bounds(param, "lra"), case.arrays["output"], **tol)
    np.testing.assert_allclose(lower_bounds(param, "lm"), case.arrays["output/fairseq_lm"], **tol)
    # fla's bounds are float32 values: compare to float32 rounding.
    fla = lower_bounds(param.astype(jnp.float32), "lm")
    np.testing.assert_allclose(fla, case.arrays["output/fla"], atol=3e-7, rtol=0)


def test_fla_attention(golden, precision):
    dtype, tol = precision
    case = golden("fla_hgrn_attention")
    constructor = case.meta["constructor"]
    module = convert.from_fla_hgrn_attention(constructor, case.params, dtype=dtype)
    x = jnp.asarray(case.arrays["input"], dtype)
    bound = jnp.asarray(case.arrays["lower_bound"], dtype)
    mask = jnp.asarray(case.arrays["attention_mask"], dtype)
    np.testing.assert_allclose(module(x, bound), case.arrays["output"], **tol)
    np.testing.assert_allclose(module(x, bound, mask=mask), case.arrays["output/masked"], **tol)
    _, last = module.step(x, module.init_state(x.shape[0]), bound)
    np.testing.assert_allclose(last, case.arrays["output/final_state"], **tol)
    first_layer = convert.from_fla_hgrn_attention(
        dict(constructor, layer_idx=0), case.params, dtype=dtype
    )
    np.testing.assert_allclose(first_layer(x, bound), case.arrays["output/layer_idx0"], **tol)


def test_fla_lm(golden, precision):
    dtype, tol = precision
    if dtype == jnp.float64:
        tol = dict(atol=1e-6, rtol=0)  # float32 lower bounds inside fla; see the module docstring
    case = golden("fla_hgrn_lm")
    lm = convert.from_fla_hgrn_lm(case.meta["constructor"]["HGRNConfig"], case.params, dtype=dtype)
    ids = jnp.asarray(case.arrays["input"])
    np.testing.assert_allclose(lm(ids), case.arrays["output"], **tol)
    np.testing.assert_allclose(
        lm.lower_bounds(), case.arrays["output/lower_bounds_used"], atol=3e-7, rtol=0
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
        np.testing.assert_allclose(state, case.arrays[f"output/recurrent_state/{k}"], **tol)


# ----------------------------------------------------------------- converter errors


def _hgru_case(golden):
    case = golden("official_hgru1d_causal")
    return case.meta["source"]["class"], case.meta["constructor"], dict(case.params)


def test_converter_rejects_missing_parameter(golden):
    cls, ctor, params = _hgru_case(golden)
    del params["lambda_proj.weight"]
    with pytest.raises(
        convert.ConversionError, match=r"missing parameter\(s\): lambda_proj.weight"
    ):
        convert.from_hgru_pytorch(cls, ctor, params)


def test_converter_rejects_extra_parameter(golden):
    cls, ctor, params = _hgru_case(golden)
    params["theta_reverse"] = params["theta"]
    with pytest.raises(convert.ConversionError, match=r"unexpected parameter\(s\): theta_reverse"):
        convert.from_hgru_pytorch(cls, ctor, params)


def test_converter_rejects_wrong_shape(golden):
    cls, ctor, params = _hgru_case(golden)
    params["gate.weight"] = params["gate.weight"][:, :-1]
    with pytest.raises(convert.ConversionError, match=r"gate.weight has shape"):
        convert.from_hgru_pytorch(cls, ctor, params)


def test_converter_rejects_bias_mismatch(golden):
    cls, ctor, params = _hgru_case(golden)
    with pytest.raises(
        convert.ConversionError, match=r"unexpected parameter\(s\): .*input_proj.bias"
    ):
        convert.from_hgru_pytorch(cls, dict(ctor, bias=False), params)


def test_converter_rejects_unknown_class_and_options(golden):
    _, ctor, params = _hgru_case(golden)
    with pytest.raises(convert.ConversionError, match="unknown hgru-pytorch class 'Hgru3d'"):
        convert.from_hgru_pytorch("Hgru3d", ctor, params)
    with pytest.raises(convert.ConversionError, match="act_fun='relu' is not supported"):
        convert.from_hgru_pytorch("Hgru1d", dict(ctor, act_fun="relu"), params)


def test_fla_lm_converter_names_bad_layer_parameter(golden):
    case = golden("fla_hgrn_lm")
    params = dict(case.params)
    params["model.layers.1.attn.f_proj.weight"] = params["model.layers.1.attn.f_proj.weight"][:-1]
    with pytest.raises(convert.ConversionError, match=r"model.layers.1.attn.f_proj.weight"):
        convert.from_fla_hgrn_lm(case.meta["constructor"]["HGRNConfig"], params)

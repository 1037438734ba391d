"""Parity with the reference PyTorch code through hgrn_jax.convert (tests/golden).

Every shape and constructor argument comes from the files. The reference layers are time-major;
the tests transpose the inputs to our batch-major API and the outputs back.

Tolerances: tests/golden_helpers.py (float64 1e-9, the fla LM 1e-6; float32 atol 5e-5 / rtol
1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_helpers import (
    FLA_BOUNDS,
    FLA_LM_F64,
    check_fla_lm,
    check_fla_mixer,
    to_batch_major,
    to_time_major,
)

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


@pytest.mark.parametrize("case_name", OFFICIAL_CASES)
def test_official_hgru(golden, case_name, golden_precision):
    dtype, tol = golden_precision
    case = golden(case_name)
    module = convert.from_hgru_pytorch(
        case.meta["source"]["class"], case.meta["constructor"], case.params, dtype=dtype
    )
    x = jnp.asarray(to_batch_major(case.arrays["input"]), dtype)
    bound = jnp.asarray(case.arrays["lower_bound"], dtype)
    out = to_time_major(np.asarray(jax.jit(lambda m, x, b: m(x, b))(module, x, bound)))
    out_lb0 = to_time_major(np.asarray(module(x)))
    np.testing.assert_allclose(out, case.arrays["output"], **tol)
    np.testing.assert_allclose(out_lb0, case.arrays["output/lb0"], **tol)
    assert out.dtype == dtype


def test_official_lower_bounds(golden, golden_precision):
    dtype, tol = golden_precision
    case = golden("official_lower_bounds")
    param = jnp.asarray(case.arrays["param/lower_bounds"], dtype)
    np.testing.assert_allclose(lower_bounds(param, "lra"), case.arrays["output/lra_im"], **tol)
    np.testing.assert_allclose(lower_bounds(param, "lra"), case.arrays["output"], **tol)
    np.testing.assert_allclose(lower_bounds(param, "lm"), case.arrays["output/fairseq_lm"], **tol)
    # fla's bounds are float32 values: compare to float32 rounding.
    fla = lower_bounds(param.astype(jnp.float32), "lm")
    np.testing.assert_allclose(fla, case.arrays["output/fla"], **FLA_BOUNDS)


def test_fla_attention(golden, golden_precision):
    dtype, tol = golden_precision
    check_fla_mixer(convert.from_fla_hgrn_attention, golden("fla_hgrn_attention"), dtype, tol)


def test_fla_lm(golden, golden_precision):
    dtype, tol = golden_precision
    if dtype == jnp.float64:
        tol = FLA_LM_F64  # float32 lower bounds inside fla (tests/golden_helpers.py)
    case = golden("fla_hgrn_lm")
    lm = convert.from_fla_hgrn_lm(case.meta["constructor"]["HGRNConfig"], case.params, dtype=dtype)
    check_fla_lm(lm, case, tol)


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


def test_converter_names_the_converted_and_the_expected_shape(golden):
    """A (in, out) weight where the reference has (out, in): the message shows both shapes."""
    cls, ctor, params = _hgru_case(golden)
    params["gate.weight"] = params["gate.weight"].T  # (16, 32) for (32, 16)
    with pytest.raises(
        convert.ConversionError,
        match=r"gate.weight has shape \(16, 32\), which converts to gate.kernel of shape "
        r"\(32, 16\), but the module .* has gate.kernel \(16, 32\)",
    ):
        convert.from_hgru_pytorch(cls, ctor, params)


def test_converter_rejects_a_phase_of_another_layout(golden):
    cls, ctor, params = _hgru_case(golden)
    params["theta"] = params["theta"].reshape(4, 4)
    with pytest.raises(convert.ConversionError, match=r"theta has shape \(4, 4\); expected"):
        convert.from_hgru_pytorch(cls, ctor, params)


@pytest.mark.parametrize(
    "case_name", ["official_hgru1d_causal", "official_hgru2d_causal"], ids=["1d", "2d"]
)
def test_layers_are_causal_when_the_constructor_leaves_causal_out(golden, case_name):
    """hgru-pytorch's Hgru1d and Hgru2d are causal by default: a constructor without ``causal``
    loads the causal layer (it had loaded the bidirectional one) and reproduces the reference."""
    case = golden(case_name)
    ctor = {k: v for k, v in case.meta["constructor"].items() if k != "causal"}
    module = convert.from_hgru_pytorch(case.meta["source"]["class"], ctor, case.params)
    x = jnp.asarray(to_batch_major(case.arrays["input"]), jnp.float32)
    out = to_time_major(np.asarray(module(x, jnp.asarray(case.arrays["lower_bound"]))))
    np.testing.assert_allclose(out, case.arrays["output"], atol=5e-5, rtol=1e-5)


def test_converter_rejects_a_constructor_argument_the_reference_does_not_take(golden):
    cls, ctor, params = _hgru_case(golden)
    with pytest.raises(
        convert.ConversionError, match=r"Hgru1d: unknown constructor argument\(s\) 'casual'"
    ):
        convert.from_hgru_pytorch(cls, dict(ctor, casual=False), params)
    bi = golden("official_bihgru1d")
    with pytest.raises(convert.ConversionError, match=r"unknown .* 'causal'; .* BiHgru1d takes"):
        convert.from_hgru_pytorch("BiHgru1d", dict(bi.meta["constructor"], causal=True), bi.params)


def test_fla_lm_converter_names_bad_layer_parameter(golden):
    case = golden("fla_hgrn_lm")
    params = dict(case.params)
    params["model.layers.1.attn.f_proj.weight"] = params["model.layers.1.attn.f_proj.weight"][:-1]
    with pytest.raises(convert.ConversionError, match=r"model.layers.1.attn.f_proj.weight"):
        convert.from_fla_hgrn_lm(case.meta["constructor"]["HGRNConfig"], params)


@pytest.mark.parametrize("act", ["gelu", "relu", None])
def test_fla_lm_converter_refuses_an_activation_fla_does_not_build(golden, act):
    """fla's GatedMLP takes hidden_act='swish' only; 'gelu' loaded and built another model
    (logits 1.8 off the golden) without a word, None failed later naming no key."""
    case = golden("fla_hgrn_lm")
    config = dict(case.meta["constructor"]["HGRNConfig"], hidden_act=act)
    with pytest.raises(
        convert.ConversionError, match=rf"^HGRNConfig: hidden_act={act!r} is not supported"
    ):
        convert.from_fla_hgrn_lm(config, case.params)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_eps": None}, r"norm_eps=None is not a number > 0"),  # was a bare TypeError
        ({"intermediate_size": 64.5}, r"intermediate_size=64\.5 is not an integer"),  # was 64
        ({"hidden_size": np.float32(16.5)}, r"hidden_size=np\.float32\(16\.5\) is not an"),
    ],
)
def test_fla_lm_converter_names_malformed_numbers(golden, change, message):
    case = golden("fla_hgrn_lm")
    config = dict(case.meta["constructor"]["HGRNConfig"], **change)
    with pytest.raises(convert.ConversionError, match=rf"^HGRNConfig: {message}"):
        convert.from_fla_hgrn_lm(config, case.params)


def test_a_weight_that_is_no_real_array_is_named(golden):
    """A complex weight lost its imaginary part with only numpy's ComplexWarning; a ragged
    nested list was numpy's "inhomogeneous shape" error naming no key."""
    case = golden("fla_hgrn_attention")
    ctor, params = case.meta["constructor"], dict(case.params)
    name = "i_proj.weight"
    weight = np.asarray(params[name])
    with pytest.raises(convert.ConversionError, match=rf"^parameter {name} is complex"):
        convert.from_fla_hgrn_attention(ctor, dict(params, **{name: weight * (1 + 1j)}))
    ragged = [list(weight[0]), list(weight[1][:-1])]
    with pytest.raises(convert.ConversionError, match=rf"^parameter {name} is not an array"):
        convert.from_fla_hgrn_attention(ctor, dict(params, **{name: ragged}))


def test_fla_converters_refuse_unknown_keywords_naming_the_closest(golden):
    """A misspelt fla keyword was ignored: ``layer_index=1`` loaded layer 0's behaviour (the
    lower bound dropped, relative error 0.36 against the golden) without a word; a config key
    ``use_shortconv`` or ``use_lower_bounds`` likewise. A real config.json, with the keys
    transformers adds, still loads."""
    case = golden("fla_hgrn_attention")
    ctor = {k: v for k, v in case.meta["constructor"].items() if k != "layer_idx"}
    with pytest.raises(
        convert.ConversionError,
        match=r"^HGRNAttention: unknown constructor argument\(s\) 'layer_index'; "
        r"did you mean 'layer_idx'\? fla's HGRNAttention takes mode, hidden_size",
    ):
        convert.from_fla_hgrn_attention(dict(ctor, layer_index=1), case.params)

    lm_case = golden("fla_hgrn_lm")
    kwargs = lm_case.meta["constructor"]["HGRNConfig"]
    config_json = dict(
        kwargs,
        model_type="hgrn",
        architectures=["HGRNForCausalLM"],
        transformers_version="4.45.0",
        torch_dtype="float32",
        _name_or_path="hgrn-tiny",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        max_position_embeddings=2048,
        initializer_range=0.02,
    )
    assert convert.fla_lm_config(config_json) == convert.fla_lm_config(kwargs)
    for key, close in [
        ("use_lower_bounds", "use_lower_bound"),
        ("use_shortconv", "use_short_conv"),
    ]:
        with pytest.raises(
            convert.ConversionError,
            match=rf"^HGRNConfig: unknown config key\(s\) '{key}'; did you mean '{close}'\?",
        ):
            convert.from_fla_hgrn_lm(dict(config_json, **{key: True}), lm_case.params)


def test_missing_and_unexpected_parameters_are_both_listed(golden):
    """Only the missing ones were named; the unexpected ones beside them show the cause. BiHgru1d
    weights loaded as Hgru1d said only 'missing parameter(s): theta'."""
    cls, ctor, params = _hgru_case(golden)
    params["lambda_proj.weights"] = params.pop("lambda_proj.weight")
    with pytest.raises(
        convert.ConversionError,
        match=r"^state_dict is missing parameter\(s\): lambda_proj.weight and has unexpected "
        r"parameter\(s\): lambda_proj.weights$",
    ):
        convert.from_hgru_pytorch(cls, ctor, params)

    bi = golden("official_bihgru1d")
    with pytest.raises(
        convert.ConversionError,
        match=r"missing parameter\(s\): theta and has unexpected parameter\(s\): theta_forward, "
        r"theta_reverse$",
    ):
        convert.from_hgru_pytorch("Hgru1d", {"embed_dim": 16}, bi.params)

    lm_case = golden("fla_hgrn_lm")
    renamed = {k.replace(".attn.", ".mixer."): v for k, v in lm_case.params.items()}
    with pytest.raises(convert.ConversionError) as error:
        convert.from_fla_hgrn_lm(lm_case.meta["constructor"]["HGRNConfig"], renamed)
    message = str(error.value)
    # 2 layers x 5 mixer weights on each side, listed up to 8.
    assert message.count(", ... (2 more)") == 2 and "model.layers.0.mixer.f_proj.weight" in message
    assert "\n" not in message


def test_a_prefixed_state_dict_gets_the_prefix_to_strip(golden):
    """A DDP ``module.`` prefix, or one layer's weights inside a whole model's, made every name
    'missing' and never showed the given ones: the message names the prefix, and stripping it
    as it says loads the layer."""
    cls, ctor, params = _hgru_case(golden)
    with pytest.raises(
        convert.ConversionError, match=r"its names carry the prefix 'module\.': strip it"
    ):
        convert.from_hgru_pytorch(cls, ctor, {f"module.{k}": v for k, v in params.items()})

    lm_case = golden("fla_hgrn_lm")
    lm_kwargs = lm_case.meta["constructor"]["HGRNConfig"]
    layer_ctor = {"hidden_size": lm_kwargs["hidden_size"], "layer_idx": 1, "norm_eps": 1e-6}
    with pytest.raises(
        convert.ConversionError, match=r"prefix 'model\.layers\.0\.attn\.'"
    ) as error:
        convert.from_fla_hgrn_attention(layer_ctor, lm_case.params)
    prefix = "model.layers.1.attn."
    assert "k.removeprefix" in str(error.value)
    layer = convert.from_fla_hgrn_attention(
        layer_ctor,
        {k.removeprefix(prefix): v for k, v in lm_case.params.items() if k.startswith(prefix)},
    )
    np.testing.assert_array_equal(
        layer.f_proj.kernel[...], lm_case.params[prefix + "f_proj.weight"].T.astype(np.float32)
    )


def test_a_path_a_none_or_a_tree_s_names_are_named_as_such(golden, tmp_path):
    """A file's path passed as the state_dict was read as its characters ("unexpected
    parameter(s): ., /, 1, _, a, ..."), a constructor of None was a TypeError, a misspelt
    dtype numpy's TypeError, and names under a tree's ``param/`` got no prefix hint."""
    cls, ctor, params = _hgru_case(golden)
    path = tmp_path / "weights.npz"
    np.savez(path, **params)
    for state_dict in (str(path), path):
        with pytest.raises(
            convert.ConversionError,
            match=r"^state_dict is a (str|PosixPath), not a mapping of parameter name to array; "
            r"load the file first \(np\.load",
        ):
            convert.from_hgru_pytorch(cls, ctor, state_dict)
    with pytest.raises(convert.ConversionError, match=r"constructor arguments are a NoneType"):
        convert.from_hgru_pytorch(cls, None, params)
    with pytest.raises(convert.ConversionError, match=r"^dtype 'float33' is not a dtype"):
        convert.from_hgru_pytorch(cls, ctor, params, dtype="float33")
    with pytest.raises(convert.ConversionError, match=r"carry the prefix 'param/': strip it"):
        convert.from_hgru_pytorch(cls, ctor, {f"param/{k}": v for k, v in params.items()})
    lm_case = golden("fla_hgrn_lm")
    with pytest.raises(convert.ConversionError, match=r"^state_dict is a str"):
        convert.from_fla_hgrn_lm(lm_case.meta["constructor"]["HGRNConfig"], str(path))


def test_the_transpose_hint_only_for_a_weight_whose_transpose_fits(golden):
    """A phase of the wrong width got 'PyTorch Linear weights are (out, in)', which cannot be
    its cause; a transposed Linear weight still gets it."""
    cls, ctor, params = _hgru_case(golden)
    narrow = dict(params, theta=params["theta"][..., :8])
    with pytest.raises(convert.ConversionError) as error:
        convert.from_hgru_pytorch(cls, ctor, narrow)
    assert "check the width arguments" in str(error.value)
    assert "Linear" not in str(error.value) and "transposed" not in str(error.value)
    transposed = dict(params, **{"gate.weight": params["gate.weight"].T})
    with pytest.raises(convert.ConversionError, match=r"it looks transposed: .* \(out, in\)"):
        convert.from_hgru_pytorch(cls, ctor, transposed)


def test_a_flag_that_is_not_a_boolean_is_named(golden):
    """``causal="False"`` and ``tie_word_embeddings="false"`` were read with ``bool()``: a
    non-empty string is True, so the converted layer silently ran the other way."""
    cls, ctor, params = _hgru_case(golden)
    with pytest.raises(
        convert.ConversionError, match=r"^Hgru1d: causal='False' is not a boolean \(True or"
    ):
        convert.from_hgru_pytorch(cls, dict(ctor, causal="False"), params)
    assert convert.from_hgru_pytorch(cls, dict(ctor, causal=0), params).bidirectional
    config = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, tie_word_embeddings="false")
    with pytest.raises(convert.ConversionError, match=r"tie_word_embeddings='false' is not a"):
        convert.fla_lm_config(config)


def test_a_width_that_is_not_an_integer_is_named(golden):
    """``embed_dim="sixteen"`` was a bare 'invalid literal for int() with base 10'."""
    cls, ctor, params = _hgru_case(golden)
    with pytest.raises(
        convert.ConversionError, match=r"^Hgru1d: embed_dim='sixteen' is not an integer$"
    ):
        convert.from_hgru_pytorch(cls, dict(ctor, embed_dim="sixteen"), params)
    case = golden("fla_hgrn_attention")
    with pytest.raises(
        convert.ConversionError, match=r"^HGRNAttention: hidden_size=32.5 is not an integer$"
    ):
        convert.from_fla_hgrn_attention(
            dict(case.meta["constructor"], hidden_size=32.5), case.params
        )

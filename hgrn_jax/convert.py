"""Load weights trained with the reference PyTorch code into our Flax NNX modules.

Sources:

- ``hgru-pytorch`` (the layers behind the paper's numbers): :func:`from_hgru_pytorch` for
  ``Hgru1d``, ``BiHgru1d``, ``Hgru2d`` and ``BiHgru2d``.
- ``flash-linear-attention`` (fla): :func:`from_fla_hgrn_attention` for ``HGRNAttention`` and
  :func:`from_fla_hgrn_lm` for ``HGRNForCausalLM``.
- HGRN2: :func:`from_hgru2_pytorch` for hgru2-pytorch's ``Hgru2_1d`` / ``BiHgru2_1d``,
  :func:`from_fla_hgrn2_attention` for fla's ``HGRN2Attention`` and :func:`from_fla_hgrn2_lm` for
  ``HGRN2ForCausalLM``. Recurrent states are (B, H, K, V), key index first; fla's cache stores
  (B, H, V, K): transpose the last two axes to compare.

``state_dict`` arguments map the reference's parameter names to arrays (NumPy, or anything
``np.asarray`` accepts, e.g. ``{k: v.numpy() for k, v in module.state_dict().items()}``).
PyTorch's ``Linear.weight`` is (out, in); our kernels are (in, out). The reference layers are
time-major; ours are batch-major: transpose inputs with ``x.transpose(1, 0, 2)`` (1-D) or
``x.transpose(2, 0, 1, 3)`` (2-D grids (H, W, B, d) -> (B, H, W, d)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.fla_hgrn import FlaHGRNAttention
from hgrn_jax.nn.hgrn2 import HGRN2, HGRN2D, FlaHGRN2Attention
from hgrn_jax.nn.hgru import HGRU, HGRU2D
from hgrn_jax.nn.lm import HGRNLM, LMConfig
from hgrn_jax.nn.mixers import MixerConfig

Transform = Callable[[np.ndarray], np.ndarray]
# Our parameter path (tuple of attribute names / indices) -> (reference name, transform).
Mapping_ = dict[tuple[Any, ...], tuple[str, Transform]]

HGRU_CLASSES = ("Hgru1d", "BiHgru1d", "Hgru2d", "BiHgru2d")
HGRU2_CLASSES = ("Hgru2_1d", "BiHgru2_1d", "Hgru2_2d_parallel")
# The keyword arguments of each reference class's constructor (hgru-pytorch, hgru2-pytorch).
# ``Hgru2_2d_parallel`` also takes and ignores any other keyword (``**kwargs``): None.
_HGRU2_ARGUMENTS = ("embed_dim", "expand_ratio", "act_fun", "uv_act_fun", "use_norm", "bias")
CONSTRUCTOR_ARGUMENTS: dict[str, tuple[str, ...] | None] = {
    "Hgru1d": ("embed_dim", "act_fun", "causal", "use_triton", "bias"),
    "BiHgru1d": ("embed_dim", "act_fun", "use_triton"),
    "Hgru2d": ("embed_dim", "act_fun", "causal", "use_triton"),
    "BiHgru2d": ("embed_dim", "act_fun", "causal", "use_triton"),
    # chunk_size: accepted and ignored, as this converter always has.
    "Hgru2_1d": _HGRU2_ARGUMENTS + ("norm_type", "use_fla", "chunk_size"),
    "BiHgru2_1d": _HGRU2_ARGUMENTS + ("norm_type", "chunk_size"),
    "Hgru2_2d_parallel": None,
}


class ConversionError(ValueError):
    """A state dict or constructor that does not fit the module it should load into."""


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def _theta(w: np.ndarray) -> np.ndarray:
    """hgru-pytorch's phase, (1, 1, d) (or already (d,)), as (d,)."""
    if w.ndim != 1 and w.shape[:-1] != (1, 1):
        raise ValueError(f"has shape {w.shape}; expected (1, 1, d), as hgru-pytorch stores it")
    return w.reshape(-1)


def _deinterleave(w: np.ndarray) -> np.ndarray:
    """Rows (2k, 2k+1) = (Re, Im) of channel k  ->  [all Re rows | all Im rows]."""
    return np.concatenate([w[0::2], w[1::2]], axis=0)


def _linear(ours: tuple, theirs: str, *, bias: bool, rows: Transform = _identity) -> Mapping_:
    mapping: Mapping_ = {ours + ("kernel",): (f"{theirs}.weight", lambda w: rows(w).T)}
    if bias:
        mapping[ours + ("bias",)] = (f"{theirs}.bias", rows)
    return mapping


def _load(
    module: nnx.Module,
    mapping: Mapping_,
    state_dict: Mapping[str, Any],
    dtype: jnp.dtype,
    *,
    aliases: Mapping[str, str] | None = None,
) -> nnx.Module:
    """Copy ``state_dict`` into ``module``'s parameters through ``mapping``, checking every name
    and shape. ``aliases`` names extra entries that must equal another entry (tied weights)."""
    aliases = dict(aliases or {})
    expected = {theirs for theirs, _ in mapping.values()}
    given = set(state_dict)
    missing = sorted(expected - given)
    unexpected = sorted(given - expected - set(aliases))
    if missing:
        raise ConversionError(f"state_dict is missing parameter(s): {', '.join(missing)}")
    if unexpected:
        raise ConversionError(
            f"state_dict has unexpected parameter(s): {', '.join(unexpected)} "
            f"(expected exactly: {', '.join(sorted(expected))})"
        )
    for alias, target in aliases.items():
        if alias in state_dict and not np.array_equal(
            np.asarray(state_dict[alias]), np.asarray(state_dict[target])
        ):
            raise ConversionError(f"{alias} should be tied to {target} but differs from it")

    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    for path, (theirs, transform) in mapping.items():
        if path not in flat:
            raise AssertionError(
                f"converter bug: module has no parameter {'.'.join(map(str, path))}"
            )
        given = np.asarray(state_dict[theirs])
        try:
            value = transform(given)
        except ValueError as error:
            raise ConversionError(f"parameter {theirs} {error}") from None
        variable = flat[path]
        if value.shape != variable.shape:
            ours = ".".join(map(str, path))
            raise ConversionError(
                f"parameter {theirs} has shape {given.shape}, which converts to {ours} of shape "
                f"{value.shape}, but the module built from the constructor has {ours} "
                f"{variable.shape} (PyTorch Linear weights are (out, in), our kernels (in, out); "
                "check the width arguments)"
            )
        variable.set_value(jnp.asarray(value, dtype))
    unset = sorted(".".join(map(str, p)) for p in flat if p not in mapping)
    if unset:
        raise AssertionError(f"converter bug: parameters left at their initial values: {unset}")
    return module


def _require(constructor: Mapping[str, Any], key: str, allowed: tuple, what: str) -> None:
    if key in constructor and constructor[key] not in allowed:
        raise ConversionError(
            f"{what}: {key}={constructor[key]!r} is not supported "
            f"(supported: {', '.join(map(repr, allowed))})"
        )


def _features(constructor: Mapping[str, Any], key: str, what: str) -> int:
    if key not in constructor:
        raise ConversionError(f"{what}: constructor needs {key!r}")
    return int(constructor[key])


def _check_class(
    class_name: str, classes: tuple[str, ...], library: str, constructor: Mapping[str, Any]
) -> None:
    """A known class, called with keywords its reference constructor takes: a misspelt one
    (``casual``) would otherwise leave its default in force without a word."""
    if class_name not in classes:
        raise ConversionError(
            f"unknown {library} class {class_name!r}; expected one of {', '.join(classes)}"
        )
    accepted = CONSTRUCTOR_ARGUMENTS[class_name]
    unknown = sorted(set(constructor) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ConversionError(
            f"{class_name}: unknown constructor argument(s) {', '.join(map(repr, unknown))}; "
            f"{library}'s {class_name} takes {', '.join(accepted)}"
        )


def _layer_norm(ours: tuple, theirs: str) -> Mapping_:
    """A PyTorch LayerNorm (``weight``, ``bias``) into an ``nnx.LayerNorm`` (scale, bias)."""
    return {
        ours + ("scale",): (f"{theirs}.weight", _identity),
        ours + ("bias",): (f"{theirs}.bias", _identity),
    }


def _check_fla_layer(constructor: Mapping[str, Any], what: str) -> None:
    """The fla options we do not implement: short convolutions, a norm without weights."""
    _require(constructor, "use_short_conv", (False,), what)
    _require(constructor, "elementwise_affine", (True,), what)


def _fla_uses_lower_bound(constructor: Mapping[str, Any]) -> bool:
    """fla's layer 0 (and a layer without ``layer_idx``) ignores its lower bound."""
    layer_idx = constructor.get("layer_idx")
    return layer_idx is not None and int(layer_idx) > 0


def _fla_mixer_mapping(projections: tuple[str, ...]) -> Callable[[tuple, str], Mapping_]:
    """The mapping of an fla mixer with bias-free ``projections`` and an RMSNorm ``g_norm``,
    at our path ``ours`` and their name prefix ``prefix``."""

    def mapping(ours: tuple, prefix: str) -> Mapping_:
        result: Mapping_ = {}
        for name in projections:
            result |= _linear(ours + (name,), prefix + name, bias=False)
        result[ours + ("g_norm", "scale")] = (prefix + "g_norm.weight", _identity)
        return result

    return mapping


_fla_attention_mapping = _fla_mixer_mapping(("i_proj", "f_proj", "g_proj", "o_proj"))
_fla_hgrn2_attention_mapping = _fla_mixer_mapping(("q_proj", "f_proj", "i_proj", "o_proj"))


def _config_mapping(config: Mapping[str, Any] | Any, what: str) -> Mapping[str, Any]:
    """An fla model config as a mapping: a dict of its keyword arguments as given, or a
    transformers config object (``model.config``) through its ``to_dict()``."""
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ConversionError(
        f"{what}: config must be a dict of the {what} keyword arguments or a transformers "
        f"config object (its to_dict() is read); got {type(config).__name__}"
    )


def _fla_lm_settings(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The :meth:`LMConfig.fla` arguments that fla's ``HGRNConfig`` and ``HGRN2Config`` share."""
    d = _features(config, "hidden_size", what)
    return dict(
        vocab_size=_features(config, "vocab_size", what),
        features=d,
        num_layers=_features(config, "num_hidden_layers", what),
        glu_expand=_fla_glu_expand(config, d),
        glu_activation=str(config.get("hidden_act", "swish")),
        use_lower_bound=bool(config.get("use_lower_bound", True)),
        norm_epsilon=float(config.get("norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def from_hgru_pytorch(
    class_name: str,
    constructor: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    dtype: jnp.dtype = jnp.float32,
) -> HGRU | HGRU2D:
    """An :class:`HGRU` / :class:`HGRU2D` holding the weights of an hgru-pytorch layer.

    Args:
      class_name: ``"Hgru1d"``, ``"BiHgru1d"``, ``"Hgru2d"`` or ``"BiHgru2d"``.
      constructor: the reference constructor's keyword arguments (``embed_dim``, ``act_fun``,
        ``causal``, ``bias``; ``use_triton`` is ignored), with the reference's defaults:
        ``Hgru1d`` and ``Hgru2d`` are causal unless ``causal=False``. A keyword the reference
        class does not take is an error.
      state_dict: reference parameter name -> array.
      dtype: parameter dtype (float64 needs ``jax_enable_x64``).

    Returns:
      A module called as ``module(x, lower_bound)`` with batch-major ``x``: (B, L, d) for the 1-D
      classes, (B, H, W, d) for the 2-D ones.
    """
    _check_class(class_name, HGRU_CLASSES, "hgru-pytorch", constructor)
    d = _features(constructor, "embed_dim", class_name)
    _require(constructor, "act_fun", ("silu", "swish"), class_name)
    causal = bool(constructor.get("causal", True))  # the reference's default
    bias = bool(constructor.get("bias", True)) if class_name == "Hgru1d" else True
    rngs = nnx.Rngs(0)
    common = dict(use_bias=bias, param_dtype=dtype, rngs=rngs)
    if class_name == "Hgru1d":
        module = HGRU(d, bidirectional=not causal, separate_phases=False, **common)
    elif class_name == "BiHgru1d":
        module = HGRU(d, bidirectional=True, separate_phases=True, **common)
    elif class_name == "Hgru2d":
        module = HGRU2D(d, causal=causal, separate_phases=False, **common)
    else:  # BiHgru2d ignores its causal argument.
        module = HGRU2D(d, causal=False, separate_phases=True, **common)
    mapping: Mapping_ = {}
    mapping |= _linear(("input_proj",), "input_proj", bias=bias, rows=_deinterleave)
    for name in ("lambda_proj", "gate", "out_proj"):
        mapping |= _linear((name,), name, bias=bias)
    mapping |= _layer_norm(("norm",), "norm")
    if class_name.startswith("Bi"):
        mapping[("theta",)] = ("theta_forward", _theta)
        mapping[("theta_reverse",)] = ("theta_reverse", _theta)
    else:
        mapping[("theta",)] = ("theta", _theta)
    return _load(module, mapping, state_dict, dtype)


def from_fla_hgrn_attention(
    constructor: Mapping[str, Any], state_dict: Mapping[str, Any], dtype: jnp.dtype = jnp.float32
) -> FlaHGRNAttention:
    """A :class:`FlaHGRNAttention` holding the weights of fla's ``HGRNAttention``.

    ``constructor`` holds ``hidden_size``, ``expand_ratio``, ``norm_eps`` and ``layer_idx``
    (layer 0 ignores its lower bound, as in fla). Short convolutions are not supported. The
    module is called as ``module(x, lower_bound=None, mask=None)`` on (B, T, d) inputs.
    """
    what = "HGRNAttention"
    d = _features(constructor, "hidden_size", what)
    _check_fla_layer(constructor, what)
    module = FlaHGRNAttention(
        d,
        expand_ratio=int(constructor.get("expand_ratio", 1)),
        use_lower_bound=_fla_uses_lower_bound(constructor),
        norm_epsilon=float(constructor.get("norm_eps", 1e-5)),
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    return _load(module, _fla_attention_mapping((), ""), state_dict, dtype)


def _fla_glu_expand(config: Mapping[str, Any], d: int) -> float:
    """GLU hidden / d of an fla config: ``intermediate_size``, or fla's default of 2/3 of
    ``hidden_ratio * d`` rounded up to a multiple of 256 (``hidden_ratio`` None or absent: 4, as
    fla's ``GatedMLP``)."""
    hidden = config.get("intermediate_size")
    if hidden is None:
        ratio = config.get("hidden_ratio")
        hidden = int(d * (4 if ratio is None else ratio) * 2 / 3)
        hidden = 256 * ((hidden + 255) // 256)
    return int(hidden) / d


def fla_lm_config(config: Mapping[str, Any] | Any) -> LMConfig:
    """The :class:`LMConfig` of an fla ``HGRNConfig``, given as its keyword arguments or as the
    config object itself (``model.config``)."""
    what = "HGRNConfig"
    config = _config_mapping(config, what)
    _check_fla_layer(config, what)
    _require(config, "expand_ratio", (1, None), what)
    _require(config, "attn", (None,), what)  # hybrid softmax-attention layers
    settings = _fla_lm_settings(config, what)
    mixer = MixerConfig(
        kind="hgrn",
        layout="fla",
        complex_valued=False,
        use_bias=False,
        norm_epsilon=settings["norm_epsilon"],  # fla's HGRN mixer norm uses norm_eps
    )
    return LMConfig.fla(mixer=mixer, **settings)


def from_fla_hgrn_lm(
    config: Mapping[str, Any] | Any, state_dict: Mapping[str, Any], dtype: jnp.dtype = jnp.float32
) -> HGRNLM:
    """An :class:`HGRNLM` holding the weights of fla's ``HGRNForCausalLM``.

    ``config`` is the ``HGRNConfig`` keyword arguments or the config object (``model.config``).
    The result is called as ``lm(ids)`` (ids (B, T) -> logits (B, T, V)) and decodes with
    ``lm.init_cache(B)`` / ``lm.step``.
    """
    return _load_fla_lm(fla_lm_config(config), _fla_attention_mapping, state_dict, dtype)


def _load_fla_lm(
    lm_config: LMConfig,
    attention_mapping: Callable[[tuple, str], Mapping_],
    state_dict: Mapping[str, Any],
    dtype: jnp.dtype,
) -> HGRNLM:
    """fla's ``*ForCausalLM`` layout (shared by HGRN and HGRN2) loaded into an :class:`HGRNLM`."""
    module = HGRNLM(lm_config, param_dtype=dtype, rngs=nnx.Rngs(0))
    mapping: Mapping_ = {("embed", "embedding"): ("model.embeddings.weight", _identity)}
    if lm_config.use_lower_bound:
        mapping[("lower_bounds", "param")] = ("model.lower_bounds", _identity)
    for k in range(lm_config.num_layers):
        theirs, ours = f"model.layers.{k}.", ("blocks", k)
        mapping[ours + ("norm1", "scale")] = (theirs + "attn_norm.weight", _identity)
        mapping[ours + ("norm2", "scale")] = (theirs + "mlp_norm.weight", _identity)
        mapping |= attention_mapping(ours + ("mixer",), theirs + "attn.")
        for name in ("gate_proj", "up_proj", "down_proj"):
            mapping |= _linear(ours + ("mlp", name), theirs + f"mlp.{name}", bias=False)
    mapping[("final_norm", "scale")] = ("model.norm.weight", _identity)
    aliases = {}
    if lm_config.tie_embeddings:
        aliases["lm_head.weight"] = "model.embeddings.weight"
    else:
        mapping[("lm_head", "kernel")] = ("lm_head.weight", _transpose)
    return _load(module, mapping, state_dict, dtype, aliases=aliases)


# ----------------------------------------------------------------------------------- HGRN2


def from_hgru2_pytorch(
    class_name: str,
    constructor: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    dtype: jnp.dtype = jnp.float32,
) -> HGRN2 | HGRN2D:
    """An :class:`HGRN2` (:class:`HGRN2D` for grids) holding the weights of an hgru2-pytorch layer.

    Args:
      class_name: ``"Hgru2_1d"`` (causal), ``"BiHgru2_1d"`` (forward + reverse scans) or
        ``"Hgru2_2d_parallel"`` (four scans over a grid).
      constructor: the reference constructor's keyword arguments (``embed_dim``,
        ``expand_ratio``, ``act_fun``, ``uv_act_fun``, ``use_norm``, ``bias``, ``norm_type``,
        ``use_fla``; ``chunk_size`` is ignored).
      state_dict: reference parameter name -> array.
      dtype: parameter dtype (float64 needs ``jax_enable_x64``).

    Returns:
      A module called as ``module(x, lower_bound)`` with batch-major ``x`` (B, L, d) (the
      reference is time-major: ``x.transpose(1, 0, 2)``), or (B, H, W, d) for the 2-D class
      (the reference's (H, W, B, d): ``x.transpose(2, 0, 1, 3)``), and ``lower_bound`` (d,) or a
      scalar.

    For the 1-D classes only ``expand_ratio < 16`` is supported: there the reference runs an
    exact scan. From 16 on it runs Triton kernels, never checked against ours: chunked ones that
    clamp the per-step log forget gate at -3 and need the length to be a multiple of the chunk
    (``Hgru2_1d``, and ``BiHgru2_1d`` in training), or, for ``BiHgru2_1d`` in eval, a recurrent
    one in float32. ``Hgru2_2d_parallel`` runs the exact scan at every ``expand_ratio``.
    """
    _check_class(class_name, HGRU2_CLASSES, "hgru2-pytorch", constructor)
    d = _features(constructor, "embed_dim", class_name)
    expand_ratio = int(constructor.get("expand_ratio", 2))
    _require(constructor, "act_fun", ("silu", "swish"), class_name)
    _require(constructor, "uv_act_fun", ("sigmoid",), class_name)
    _require(constructor, "use_norm", (True,), class_name)
    _require(constructor, "norm_type", ("layernorm",), class_name)
    _require(constructor, "use_fla", (False,), class_name)
    if expand_ratio < 1 or (expand_ratio >= 16 and class_name != "Hgru2_2d_parallel"):
        raise ConversionError(
            f"{class_name}: expand_ratio={expand_ratio} is not supported (supported: 1 to 15, "
            "where the reference runs its exact scan; from 16 on it runs chunked Triton kernels "
            "that clamp log forget gates at -3)"
        )
    if d % expand_ratio:
        raise ConversionError(
            f"{class_name}: embed_dim={d} is not a multiple of expand_ratio={expand_ratio}"
        )
    bias = bool(constructor.get("bias", True))
    common = dict(expand_ratio=expand_ratio, use_bias=bias, param_dtype=dtype, rngs=nnx.Rngs(0))
    if class_name == "Hgru2_2d_parallel":
        module = HGRN2D(d, **common)
    else:
        module = HGRN2(d, bidirectional=class_name == "BiHgru2_1d", **common)
    mapping: Mapping_ = {}
    for name in ("in_proj", "out_proj"):
        mapping |= _linear((name,), name, bias=bias)
    mapping |= _layer_norm(("norm",), "norm")
    return _load(module, mapping, state_dict, dtype)


def _fla_hgrn2_heads(config: Mapping[str, Any], d: int, what: str) -> int:
    """fla's key width K: ``expand_ratio`` when given (it wins), else ``d // num_heads``."""
    expand_ratio, num_heads = config.get("expand_ratio", 128), config.get("num_heads")
    if expand_ratio is None:
        if not num_heads:
            raise ConversionError(f"{what}: one of expand_ratio or num_heads must be given")
        expand_ratio = d // int(num_heads)
    expand_ratio = int(expand_ratio)
    if expand_ratio < 1 or d % expand_ratio:
        raise ConversionError(
            f"{what}: hidden_size={d} is not a multiple of "
            f"expand_ratio={expand_ratio} (the key width of a head)"
        )
    return expand_ratio


def from_fla_hgrn2_attention(
    constructor: Mapping[str, Any], state_dict: Mapping[str, Any], dtype: jnp.dtype = jnp.float32
) -> FlaHGRN2Attention:
    """A :class:`FlaHGRN2Attention` holding the weights of fla's ``HGRN2Attention``.

    ``constructor`` holds ``hidden_size``, ``expand_ratio`` or ``num_heads``, and ``layer_idx``
    (layer 0 ignores its lower bound, as in fla); ``norm_eps`` is accepted and, as in fla, not
    used (the output norm's eps is 1e-5); ``mode`` only picks fla's kernel. Short convolutions are
    not supported. The module is called as ``module(x, lower_bound=None, mask=None)`` on (B, T, d)
    inputs; its recurrent state is (B, H, K, V), the transpose of fla's cache entry.
    """
    what = "HGRN2Attention"
    d = _features(constructor, "hidden_size", what)
    _check_fla_layer(constructor, what)
    module = FlaHGRN2Attention(
        d,
        expand_ratio=_fla_hgrn2_heads(constructor, d, what),
        use_lower_bound=_fla_uses_lower_bound(constructor),
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    return _load(module, _fla_hgrn2_attention_mapping((), ""), state_dict, dtype)


def fla_hgrn2_lm_config(config: Mapping[str, Any] | Any) -> LMConfig:
    """The :class:`LMConfig` of an fla ``HGRN2Config``, given as its keyword arguments or as the
    config object itself (``model.config``)."""
    what = "HGRN2Config"
    config = _config_mapping(config, what)
    _check_fla_layer(config, what)
    _require(config, "attn", (None,), what)  # hybrid softmax-attention layers
    _require(config, "attnres_block_size", (None,), what)
    _require(config, "use_l2warp", (False,), what)
    expand_ratio = _fla_hgrn2_heads(config, _features(config, "hidden_size", what), what)
    settings = _fla_lm_settings(config, what)
    mixer = MixerConfig(
        kind="hgrn2", layout="fla", expand_ratio=expand_ratio, use_bias=False, norm_epsilon=1e-5
    )
    return LMConfig.fla(kind="hgrn2", mixer=mixer, **settings)


def from_fla_hgrn2_lm(
    config: Mapping[str, Any] | Any, state_dict: Mapping[str, Any], dtype: jnp.dtype = jnp.float32
) -> HGRNLM:
    """An :class:`HGRNLM` with HGRN2 mixers holding the weights of fla's ``HGRN2ForCausalLM``.

    ``config`` is the ``HGRN2Config`` keyword arguments or the config object (``model.config``).
    The result is called as ``lm(ids)`` (ids (B, T) -> logits (B, T, V)) and decodes with
    ``lm.init_cache(B)`` / ``lm.step(ids, cache)``; each layer's cache entry is (B, H, K, V),
    the transpose of fla's.
    """
    return _load_fla_lm(
        fla_hgrn2_lm_config(config), _fla_hgrn2_attention_mapping, state_dict, dtype
    )

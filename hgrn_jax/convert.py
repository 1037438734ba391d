"""Load weights trained with the reference PyTorch code into our Flax NNX modules.

Sources:

- ``hgru-pytorch`` (the layers behind the paper's numbers): :func:`from_hgru_pytorch` for
  ``Hgru1d``, ``BiHgru1d``, ``Hgru2d`` and ``BiHgru2d``.
- ``flash-linear-attention`` (fla): :func:`from_fla_hgrn_attention` for ``HGRNAttention`` and
  :func:`from_fla_hgrn_lm` for ``HGRNForCausalLM``.
- HGRN2: :func:`from_hgru2_pytorch` for hgru2-pytorch's ``Hgru2_1d`` / ``BiHgru2_1d`` and the
  2-D ``Hgru2_2d_parallel`` / ``Hgru2_2d_series``,
  :func:`from_fla_hgrn2_attention` for fla's ``HGRN2Attention`` and :func:`from_fla_hgrn2_lm` for
  ``HGRN2ForCausalLM``. Recurrent states are (B, H, K, V), key index first; fla's cache stores
  (B, H, V, K): transpose the last two axes to compare.

These are single layers, plus fla's whole LMs. The paper's own models (the LRA classifiers, the
ImageNet model, the fairseq WikiText-103 LM) have no converter: their checkpoints' layers can be
loaded one by one with :func:`from_hgru_pytorch`, but nothing here builds the surrounding model.

Every route refuses what it cannot honour, with a one-line :class:`ConversionError`: a constructor
argument or config key the reference class does not take (naming the closest valid one), a
setting it takes that this port does not implement, a missing or extra parameter (both listed,
with a hint when a prefix such as ``module.`` hides the names), a wrongly shaped one.

``state_dict`` arguments map the reference's parameter names to arrays (NumPy, or anything
``np.asarray`` accepts, e.g. ``{k: v.numpy() for k, v in module.state_dict().items()}``).
PyTorch's ``Linear.weight`` is (out, in); our kernels are (in, out). The reference layers are
time-major; ours are batch-major: transpose inputs with ``x.transpose(1, 0, 2)`` (1-D) or
``x.transpose(2, 0, 1, 3)`` (2-D grids (H, W, B, d) -> (B, H, W, d)).

Every route's ``dtype`` is the parameters' dtype (``param_dtype``); the module it builds
computes in the inputs' dtype promoted with it, with the default scan method. For bfloat16
activations over float32 parameters (or another ``method``), build the layer you want with the
same shapes and copy the weights in: ``nnx.update(mine, nnx.state(converted, nnx.Param))``
(docs/library.md, "Reference weights in a layer of your own").
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.fla_hgrn import FlaHGRNAttention
from hgrn_jax.nn.hgrn2 import HGRN2, HGRN2D, FlaHGRN2Attention, HGRN2DSeries
from hgrn_jax.nn.hgru import HGRU, HGRU2D
from hgrn_jax.nn.lm import HGRNLM, LMConfig
from hgrn_jax.nn.mixers import MixerConfig

Transform = Callable[[np.ndarray], np.ndarray]
# Our parameter path (tuple of attribute names / indices) -> (reference name, transform).
Mapping_ = dict[tuple[Any, ...], tuple[str, Transform]]

HGRU_CLASSES = ("Hgru1d", "BiHgru1d", "Hgru2d", "BiHgru2d")
HGRU2_CLASSES = ("Hgru2_1d", "BiHgru2_1d", "Hgru2_2d_parallel", "Hgru2_2d_series")
# The keyword arguments of each reference class's constructor (hgru-pytorch, hgru2-pytorch).
# ``Hgru2_2d_parallel`` and ``Hgru2_2d_series`` also take and ignore any other keyword
# (``**kwargs``): None.
_HGRU2_ARGUMENTS = ("embed_dim", "expand_ratio", "act_fun", "uv_act_fun", "use_norm", "bias")
# The keyword arguments of fla's layers (flash-linear-attention) that both share.
_FLA_LAYER_ARGUMENTS = (
    "mode",
    "hidden_size",
    "expand_ratio",
    "use_short_conv",
    "conv_size",
    "conv_bias",
    "share_conv_kernel",  # older fla; used only with short convolutions
    "elementwise_affine",
    "norm_eps",
    "layer_idx",
)
CONSTRUCTOR_ARGUMENTS: dict[str, tuple[str, ...] | None] = {
    "Hgru1d": ("embed_dim", "act_fun", "causal", "use_triton", "bias"),
    "BiHgru1d": ("embed_dim", "act_fun", "use_triton"),
    "Hgru2d": ("embed_dim", "act_fun", "causal", "use_triton"),
    "BiHgru2d": ("embed_dim", "act_fun", "causal", "use_triton"),
    # chunk_size: accepted and ignored, as this converter always has.
    "Hgru2_1d": _HGRU2_ARGUMENTS + ("norm_type", "use_fla", "chunk_size"),
    "BiHgru2_1d": _HGRU2_ARGUMENTS + ("norm_type", "chunk_size"),
    "Hgru2_2d_parallel": None,
    "Hgru2_2d_series": None,
    # fla's layers (flash-linear-attention): HGRNAttention, HGRN2Attention.
    "HGRNAttention": _FLA_LAYER_ARGUMENTS,
    "HGRN2Attention": _FLA_LAYER_ARGUMENTS + ("num_heads",),
}
# The keys of fla's model configs (their constructors' keyword arguments).
_FLA_CONFIG_KEYS = (
    "attn_mode",
    "hidden_size",
    "num_hidden_layers",
    "expand_ratio",
    "use_short_conv",
    "conv_size",
    "share_conv_kernel",  # older fla; used only with short convolutions
    "use_lower_bound",
    "max_position_embeddings",
    "hidden_ratio",
    "intermediate_size",
    "hidden_act",
    "elementwise_affine",
    "norm_eps",
    "attn",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "initializer_range",
    "fuse_norm",
    "fuse_swiglu",
    "fuse_cross_entropy",
    "fuse_linear_cross_entropy",
    "use_l2warp",
    "vocab_size",
)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "HGRNConfig": _FLA_CONFIG_KEYS,
    "HGRN2Config": _FLA_CONFIG_KEYS + ("num_heads", "attnres_block_size"),
}
# Keys that transformers' PretrainedConfig adds to every model config (to_dict(), config.json),
# across its versions: bookkeeping, generation defaults and task heads, none of which changes
# what an fla LM computes from its weights. Any other key is refused.
TRANSFORMERS_CONFIG_KEYS = (
    "model_type",
    "transformers_version",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "_attn_implementation_autoset",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "task_specific_params",
    "problem_type",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
)
# How many names an error message lists before it counts the rest.
_LISTED_NAMES = 8


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
    problems = []
    if missing:
        problems.append(f"is missing parameter(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"has unexpected parameter(s): {_listed(unexpected)}")
    if problems:
        hint = _prefix_hint(expected, given) if missing else ""
        raise ConversionError(f"state_dict {' and '.join(problems)}{hint}")
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
        given = _weight(state_dict[theirs], theirs)
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
                f"{variable.shape} ({_shape_hint(given, transform, variable.shape)})"
            )
        variable.set_value(jnp.asarray(value, dtype))
    unset = sorted(".".join(map(str, p)) for p in flat if p not in mapping)
    if unset:
        raise AssertionError(f"converter bug: parameters left at their initial values: {unset}")
    return module


def _weight(value: Any, name: str) -> np.ndarray:
    """``state_dict[name]`` as a real NumPy array; a ConversionError naming ``name`` for a
    ragged nested list (numpy's error named no key) or complex values (cast to the real
    parameters, their imaginary parts dropped with only numpy's ComplexWarning)."""
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise ConversionError(f"parameter {name} is not an array ({error})") from None
    if not (np.issubdtype(array.dtype, np.number) or array.dtype.name == "bfloat16"):
        raise ConversionError(f"parameter {name} has dtype {array.dtype}, not numbers")
    if np.iscomplexobj(array):
        raise ConversionError(
            f"parameter {name} is complex ({array.dtype}); the reference's parameters are real"
        )
    return array


def _listed(names: Sequence[str]) -> str:
    """``names`` joined: the first few, then how many more."""
    rest = len(names) - _LISTED_NAMES
    return ", ".join(names[:_LISTED_NAMES]) + (f", ... ({rest} more)" if rest > 0 else "")


def _prefix_hint(expected: set[str], given: set[str]) -> str:
    """A hint naming a prefix (``module.`` from DDP, ``model.layers.0.attn.`` from a whole
    model) which, stripped from the given names that carry it, would supply every expected
    name; "" when there is none. The prefix is not stripped here: the caller says which keys."""
    counts: dict[str, int] = {}
    for name in given:
        for i, char in enumerate(name):  # "module." (DDP), "param/" (an npz of a tree)
            if char in "./" and name[i + 1 :] in expected:
                counts[name[: i + 1]] = counts.get(name[: i + 1], 0) + 1
    for prefix, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count >= len(expected) and expected <= {
            name.removeprefix(prefix) for name in given if name.startswith(prefix)
        }:
            return (
                f"; its names carry the prefix {prefix!r}: strip it, e.g. "
                f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items() "
                f"if k.startswith({prefix!r})}}"
            )
    return ""


def _shape_hint(given: np.ndarray, transform: Transform, shape: tuple[int, ...]) -> str:
    """Why a parameter of the wrong shape may not fit: a 2-D weight whose transpose would fit
    was probably given (in, out); anything else points at the width arguments."""
    if given.ndim == 2:
        try:
            transposed = transform(given.T).shape == shape
        except ValueError:
            transposed = False
        if transposed:
            return (
                "it looks transposed: pass PyTorch Linear weights as state_dict() holds them, "
                "(out, in); the converter makes our (in, out) kernels"
            )
    return "check the width arguments of the constructor or config"


def _integer(value: Any, key: str, what: str) -> int:
    """``value`` (an int, an integral float or a numeric string) as an int."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    fractional = isinstance(value, (float, np.floating)) and number != value  # np.float32(16.5)
    if number is None or isinstance(value, (bool, np.bool_)) or fractional:
        raise ConversionError(f"{what}: {key}={value!r} is not an integer")
    return number


def _positive_number(config: Mapping[str, Any], key: str, default: float, what: str) -> float:
    """``config[key]`` (``default`` when absent) as a float > 0; a ConversionError naming the
    key otherwise (``norm_eps=None`` was a bare TypeError)."""
    value = config.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number > 0:
        raise ConversionError(f"{what}: {key}={value!r} is not a number > 0")
    return number


def _flag(constructor: Mapping[str, Any], key: str, default: bool, what: str) -> bool:
    """``constructor[key]`` as a bool (``default`` when absent): True, False, 1 or 0; anything
    else (the string ``"False"``, which ``bool`` reads as True) is an error."""
    value = constructor.get(key, default)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConversionError(f"{what}: {key}={value!r} is not a boolean (True or False)")


def _refuse_unknown(
    given: Iterable[str],
    accepted: Sequence[str],
    what: str,
    owner: str,
    kind: str = "constructor argument",
    ignored: Sequence[str] = (),
) -> None:
    """Refuse keys outside ``accepted`` and ``ignored``, naming the closest accepted ones: a
    misspelt keyword (``casual``, ``layer_index``) would otherwise leave its default in force
    without a word."""
    unknown = sorted(set(given) - set(accepted) - set(ignored))
    if not unknown:
        return
    guesses = [(name, difflib.get_close_matches(name, accepted, n=1)) for name in unknown]
    guesses = [
        f"{close[0]!r} for {name!r}" if len(unknown) > 1 else repr(close[0])
        for name, close in guesses
        if close
    ]
    hint = f" did you mean {', '.join(guesses)}?" if guesses else ""
    raise ConversionError(
        f"{what}: unknown {kind}(s) {', '.join(map(repr, unknown))};{hint} "
        f"{owner} takes {', '.join(accepted)}"
    )


def _require(constructor: Mapping[str, Any], key: str, allowed: tuple, what: str) -> None:
    if key in constructor and constructor[key] not in allowed:
        raise ConversionError(
            f"{what}: {key}={constructor[key]!r} is not supported "
            f"(supported: {', '.join(map(repr, allowed))})"
        )


def _features(constructor: Mapping[str, Any], key: str, what: str, why: str = "") -> int:
    if key not in constructor:
        raise ConversionError(f"{what}: constructor needs {key!r}{why}")
    return _integer(constructor[key], key, what)


_NO_CONSTRUCTOR = object()


def _check_arguments(state_dict: Any, dtype: Any, constructor: Any = _NO_CONSTRUCTOR) -> None:
    """ConversionError for a ``state_dict`` that is no mapping (a file's path was read as its
    characters, the parameter names), a ``constructor`` that is no mapping (None was a
    TypeError) and a ``dtype`` that is none (numpy's TypeError named no argument)."""
    if not isinstance(state_dict, Mapping):
        raise ConversionError(
            f"state_dict is a {type(state_dict).__name__}, not a mapping of parameter name to "
            "array; load the file first (np.load, torch.load, safetensors' load_file) and pass "
            "what it holds"
        )
    if constructor is not _NO_CONSTRUCTOR and not isinstance(constructor, Mapping):
        raise ConversionError(
            f"the constructor arguments are a {type(constructor).__name__}, not a mapping of "
            "keyword to value; pass e.g. {'embed_dim': 512}"
        )
    try:
        jnp.dtype(dtype)
    except TypeError:
        raise ConversionError(
            f"dtype {dtype!r} is not a dtype; pass e.g. jnp.float32 or 'bfloat16'"
        ) from None


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
    if accepted is not None:
        _refuse_unknown(constructor, accepted, class_name, f"{library}'s {class_name}")


def _check_fla_config(config: Mapping[str, Any], what: str) -> None:
    """An fla model config (``HGRNConfig`` / ``HGRN2Config``) with no key fla's class does not
    take, besides the bookkeeping keys transformers adds to every config."""
    _refuse_unknown(
        config,
        CONFIG_KEYS[what],
        what,
        f"fla's {what}",
        kind="config key",
        ignored=TRANSFORMERS_CONFIG_KEYS,
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


def _fla_uses_lower_bound(constructor: Mapping[str, Any], what: str) -> bool:
    """fla's layer 0 (and a layer without ``layer_idx``) ignores its lower bound."""
    layer_idx = constructor.get("layer_idx")
    return layer_idx is not None and _integer(layer_idx, "layer_idx", what) > 0


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


def _fla_hidden_act(config: Mapping[str, Any], what: str) -> str:
    """fla's GLU activation: its GatedMLP takes ``swish`` alone (``silu`` is the same
    function); any other ``hidden_act`` loaded without a word and built another model (gelu:
    logits 1.8 off)."""
    act = config.get("hidden_act", "swish")
    if act not in ("swish", "silu"):
        raise ConversionError(
            f"{what}: hidden_act={act!r} is not supported (fla's GatedMLP takes 'swish' only); "
            "give the fla model's config"
        )
    return str(act)


def _fla_lm_settings(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The :meth:`LMConfig.fla` arguments that fla's ``HGRNConfig`` and ``HGRN2Config`` share."""
    d = _features(config, "hidden_size", what)
    return dict(
        vocab_size=_features(config, "vocab_size", what),
        features=d,
        num_layers=_features(config, "num_hidden_layers", what),
        glu_expand=_fla_glu_expand(config, d, what),
        glu_activation=_fla_hidden_act(config, what),
        use_lower_bound=_flag(config, "use_lower_bound", True, what),
        norm_epsilon=_positive_number(config, "norm_eps", 1e-6, what),
        tie_embeddings=_flag(config, "tie_word_embeddings", False, what),
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
      state_dict: reference parameter name -> array: ``input_proj``, ``lambda_proj``, ``gate``
        and ``out_proj`` (``.weight`` and, with biases, ``.bias``), ``norm.weight``,
        ``norm.bias``, and the phase ``theta`` (1, 1, d), or ``theta_forward`` and
        ``theta_reverse`` for the ``Bi`` classes.
      dtype: parameter dtype (float64 needs ``jax_enable_x64``); not the activations' (see the
        module docstring).

    Returns:
      A module called as ``module(x, lower_bound)`` with batch-major ``x``: (B, L, d) for the 1-D
      classes, (B, H, W, d) for the 2-D ones.
    """
    _check_arguments(state_dict, dtype, constructor)
    _check_class(class_name, HGRU_CLASSES, "hgru-pytorch", constructor)
    d = _features(constructor, "embed_dim", class_name)
    _require(constructor, "act_fun", ("silu", "swish"), class_name)
    causal = _flag(constructor, "causal", True, class_name)  # the reference's default
    bias = _flag(constructor, "bias", True, class_name) if class_name == "Hgru1d" else True
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

    ``constructor`` holds the layer's keyword arguments: ``hidden_size``, ``expand_ratio`` (1
    when absent, as in fla; the projections' shapes reveal a wrong one), ``norm_eps``,
    ``layer_idx`` (layer 0 ignores its lower bound, as in fla), ``elementwise_affine``, and
    ``mode``, ``conv_size``, ``conv_bias``, which change nothing here. Any other key is an error;
    so are short convolutions (``use_short_conv=True``) and ``elementwise_affine=False``. The
    state dict holds ``i_proj.weight``, ``f_proj.weight``, ``g_proj.weight`` (each (e·d, d)),
    ``o_proj.weight`` (d, e·d) and ``g_norm.weight`` (e·d), e = ``expand_ratio``. The module is
    called as ``module(x, lower_bound=None, mask=None)`` on (B, T, d) inputs.
    """
    _check_arguments(state_dict, dtype, constructor)
    what = "HGRNAttention"
    _refuse_unknown(constructor, CONSTRUCTOR_ARGUMENTS[what], what, f"fla's {what}")
    d = _features(constructor, "hidden_size", what)
    _check_fla_layer(constructor, what)
    module = FlaHGRNAttention(
        d,
        expand_ratio=_integer(constructor.get("expand_ratio", 1), "expand_ratio", what),
        use_lower_bound=_fla_uses_lower_bound(constructor, what),
        norm_epsilon=_positive_number(constructor, "norm_eps", 1e-5, what),
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    return _load(module, _fla_attention_mapping((), ""), state_dict, dtype)


def _fla_glu_expand(config: Mapping[str, Any], d: int, what: str) -> float:
    """GLU hidden / d of an fla config: ``intermediate_size``, or fla's default of 2/3 of
    ``hidden_ratio * d`` rounded up to a multiple of 256 (``hidden_ratio`` None or absent: 4, as
    fla's ``GatedMLP``)."""
    hidden = config.get("intermediate_size")
    if hidden is None:
        ratio = config.get("hidden_ratio")
        ratio = 4.0 if ratio is None else _positive_number(config, "hidden_ratio", 4.0, what)
        hidden = int(d * ratio * 2 / 3)
        hidden = 256 * ((hidden + 255) // 256)
    return _integer(hidden, "intermediate_size", what) / d


def fla_lm_config(config: Mapping[str, Any] | Any) -> LMConfig:
    """The :class:`LMConfig` of an fla ``HGRNConfig``, given as its keyword arguments, its
    ``config.json`` as a dict, or the config object itself (``model.config``). A key that
    ``HGRNConfig`` does not take is an error (the keys transformers adds to every config,
    :data:`TRANSFORMERS_CONFIG_KEYS`, are ignored), and so is a setting this port does not
    implement: short convolutions, ``elementwise_affine=False``, ``expand_ratio`` other than 1,
    hybrid attention layers (``attn``)."""
    what = "HGRNConfig"
    config = _config_mapping(config, what)
    _check_fla_config(config, what)
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

    ``config`` is the ``HGRNConfig`` keyword arguments or the config object (``model.config``),
    checked by :func:`fla_lm_config`. ``state_dict`` holds, for L = ``num_hidden_layers``:
    ``model.embeddings.weight`` (V, d); ``model.lower_bounds`` (L, d) when
    ``use_lower_bound``; per layer k, ``model.layers.<k>.attn_norm.weight``,
    ``.attn.{i,f,g,o}_proj.weight``, ``.attn.g_norm.weight``, ``.mlp_norm.weight`` and
    ``.mlp.{gate,up,down}_proj.weight``; ``model.norm.weight``; ``lm_head.weight`` (V, d),
    which may be absent or equal to the embeddings when ``tie_word_embeddings``. The result is
    called as ``lm(ids)`` (ids (B, T) -> logits (B, T, V)) and decodes with
    ``lm.init_cache(B)`` / ``lm.step``.
    """
    _check_arguments(state_dict, dtype)
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
) -> HGRN2 | HGRN2D | HGRN2DSeries:
    """An :class:`HGRN2` (:class:`HGRN2D` or :class:`HGRN2DSeries` for grids) holding the weights
    of an hgru2-pytorch layer.

    Args:
      class_name: ``"Hgru2_1d"`` (causal), ``"BiHgru2_1d"`` (forward + reverse scans),
        ``"Hgru2_2d_parallel"`` (four scans over a grid) or ``"Hgru2_2d_series"`` (the
        bidirectional layer along H, then again along W on its output).
      constructor: the reference constructor's keyword arguments (``embed_dim``,
        ``expand_ratio``, ``act_fun``, ``uv_act_fun``, ``use_norm``, ``bias``, ``norm_type``,
        ``use_fla``; ``chunk_size`` is ignored). ``expand_ratio`` (the head width) is required
        and must be the PyTorch model's: no parameter shape reveals it, and another value loads
        without error into a layer that computes something else. A keyword the reference class
        does not take is an error (the 2-D classes take any, as the reference does).
      state_dict: reference parameter name -> array: ``in_proj.weight`` (3d, d),
        ``out_proj.weight`` (d, d), ``norm.weight`` and ``norm.bias`` (d), and with ``bias``
        ``in_proj.bias`` (3d) and ``out_proj.bias`` (d).
      dtype: parameter dtype (float64 needs ``jax_enable_x64``); not the activations' (see the
        module docstring).

    Returns:
      A module called as ``module(x, lower_bound)`` with batch-major ``x`` (B, L, d) (the
      reference is time-major: ``x.transpose(1, 0, 2)``), or (B, H, W, d) for the 2-D classes
      (the reference's (H, W, B, d): ``x.transpose(2, 0, 1, 3)``), and ``lower_bound`` (d,) or a
      scalar. (``Hgru2_2d_series``'s own default bound, python 0, fails to broadcast in the
      reference for most grids; ours is 0 everywhere, as a zero (d,) tensor gives there.)

    For the 1-D classes only ``expand_ratio < 16`` is supported: there the reference runs an
    exact scan. From 16 on it runs Triton kernels, never checked against ours: chunked ones that
    clamp the per-step log forget gate at -3 and need the length to be a multiple of the chunk
    (``Hgru2_1d``, and ``BiHgru2_1d`` in training), or, for ``BiHgru2_1d`` in eval, a recurrent
    one in float32. The 2-D classes run the exact scan at every ``expand_ratio``.
    """
    _check_arguments(state_dict, dtype, constructor)
    _check_class(class_name, HGRU2_CLASSES, "hgru2-pytorch", constructor)
    d = _features(constructor, "embed_dim", class_name)
    expand_ratio = _features(
        constructor,
        "expand_ratio",
        class_name,
        " (the head width): no parameter shape reveals it, so give the value the PyTorch model "
        "was built with",
    )
    _require(constructor, "act_fun", ("silu", "swish"), class_name)
    _require(constructor, "uv_act_fun", ("sigmoid",), class_name)
    _require(constructor, "use_norm", (True,), class_name)
    _require(constructor, "norm_type", ("layernorm",), class_name)
    _require(constructor, "use_fla", (False,), class_name)
    if expand_ratio < 1 or (expand_ratio >= 16 and not class_name.startswith("Hgru2_2d")):
        raise ConversionError(
            f"{class_name}: expand_ratio={expand_ratio} is not supported (supported: 1 to 15, "
            "where the reference runs its exact scan; from 16 on it runs chunked Triton kernels "
            "that clamp log forget gates at -3)"
        )
    if d % expand_ratio:
        raise ConversionError(
            f"{class_name}: embed_dim={d} is not a multiple of expand_ratio={expand_ratio}"
        )
    bias = _flag(constructor, "bias", True, class_name)
    common = dict(expand_ratio=expand_ratio, use_bias=bias, param_dtype=dtype, rngs=nnx.Rngs(0))
    if class_name == "Hgru2_2d_parallel":
        module = HGRN2D(d, **common)
    elif class_name == "Hgru2_2d_series":
        module = HGRN2DSeries(d, **common)
    else:
        module = HGRN2(d, bidirectional=class_name == "BiHgru2_1d", **common)
    mapping: Mapping_ = {}
    for name in ("in_proj", "out_proj"):
        mapping |= _linear((name,), name, bias=bias)
    mapping |= _layer_norm(("norm",), "norm")
    return _load(module, mapping, state_dict, dtype)


def _fla_hgrn2_heads(config: Mapping[str, Any], d: int, what: str) -> int:
    """fla's key width K: ``expand_ratio`` when not None (it wins), else ``d // num_heads``.

    fla builds H = d // K heads of value width d // H, so K need not divide d (d = 96, K = 64
    is one head), but H must. No parameter shape reveals K (``q_proj`` and ``f_proj`` are
    (d, d) whenever K divides d), so ``expand_ratio`` must be given rather than left at fla's
    default of 128, and a ``num_heads`` other than ``d // K`` (a saved config holds both) is
    refused."""
    if "expand_ratio" not in config:
        raise ConversionError(
            f"{what}: needs 'expand_ratio' (the key width of a head; fla's default is 128, None "
            "takes hidden_size // num_heads): no parameter shape reveals it, so give the value "
            "the fla model was built with"
        )
    expand_ratio, num_heads = config["expand_ratio"], config.get("num_heads")
    heads = None if num_heads is None else _integer(num_heads, "num_heads", what)
    if expand_ratio is None:
        if heads is None or heads < 1:
            raise ConversionError(f"{what}: one of expand_ratio or num_heads must be given")
        if d % heads:
            raise ConversionError(
                f"{what}: num_heads={heads} does not split hidden_size={d}: give the fla "
                "model's num_heads"
            )
        expand_ratio = d // heads
    expand_ratio = _integer(expand_ratio, "expand_ratio", what)
    heads_of_width = d // expand_ratio if expand_ratio >= 1 else 0
    if heads_of_width < 1 or d % heads_of_width:
        raise ConversionError(
            f"{what}: expand_ratio={expand_ratio} (the key width of a head) gives "
            f"hidden_size // expand_ratio = {heads_of_width} heads, which do not split "
            f"hidden_size={d}: give the fla model's expand_ratio"
        )
    if heads is not None and heads != d // expand_ratio:
        raise ConversionError(
            f"{what}: num_heads={heads} disagrees with expand_ratio={expand_ratio} "
            f"(hidden_size={d} // {expand_ratio} = {d // expand_ratio} heads; fla builds its "
            "layers from expand_ratio): give the fla model's values"
        )
    return expand_ratio


def from_fla_hgrn2_attention(
    constructor: Mapping[str, Any], state_dict: Mapping[str, Any], dtype: jnp.dtype = jnp.float32
) -> FlaHGRN2Attention:
    """A :class:`FlaHGRN2Attention` holding the weights of fla's ``HGRN2Attention``.

    ``constructor`` holds ``hidden_size``, ``expand_ratio`` (required: the key width of a head,
    which no parameter shape reveals; it must be the fla model's, or None with ``num_heads``),
    and ``layer_idx`` (layer 0 ignores its lower bound, as in fla); ``norm_eps`` is accepted
    and, as in fla, not used (the output norm's eps is 1e-5); ``mode``, ``conv_size`` and
    ``conv_bias`` change nothing here. Any other key is an error; so are short convolutions and
    ``elementwise_affine=False``. The state dict holds ``q_proj.weight`` and ``f_proj.weight``
    (H·K, d), ``i_proj.weight`` (d, d), ``o_proj.weight`` (d, d) and ``g_norm.weight`` (d). The
    module is called as ``module(x, lower_bound=None, mask=None)`` on (B, T, d)
    inputs; its recurrent state is (B, H, K, V), the transpose of fla's cache entry.
    """
    _check_arguments(state_dict, dtype, constructor)
    what = "HGRN2Attention"
    _refuse_unknown(constructor, CONSTRUCTOR_ARGUMENTS[what], what, f"fla's {what}")
    d = _features(constructor, "hidden_size", what)
    _check_fla_layer(constructor, what)
    module = FlaHGRN2Attention(
        d,
        expand_ratio=_fla_hgrn2_heads(constructor, d, what),
        use_lower_bound=_fla_uses_lower_bound(constructor, what),
        param_dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    return _load(module, _fla_hgrn2_attention_mapping((), ""), state_dict, dtype)


def fla_hgrn2_lm_config(config: Mapping[str, Any] | Any) -> LMConfig:
    """The :class:`LMConfig` of an fla ``HGRN2Config``, given as its keyword arguments, its
    ``config.json`` as a dict, or the config object itself (``model.config``). ``expand_ratio``
    is required and must be the model's (see :func:`from_fla_hgrn2_attention`). Unknown keys
    and unimplemented settings are refused as in :func:`fla_lm_config`."""
    what = "HGRN2Config"
    config = _config_mapping(config, what)
    _check_fla_config(config, what)
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

    ``config`` is the ``HGRN2Config`` keyword arguments or the config object (``model.config``),
    checked by :func:`fla_hgrn2_lm_config`. ``state_dict`` has the names of
    :func:`from_fla_hgrn_lm`'s, with each layer's mixer ``.attn.{q,f,i,o}_proj.weight`` and
    ``.attn.g_norm.weight``. The result is called as ``lm(ids)`` (ids (B, T) -> logits
    (B, T, V)) and decodes with ``lm.init_cache(B)`` / ``lm.step(ids, cache)``; each layer's
    cache entry is (B, H, K, V), the transpose of fla's.
    """
    _check_arguments(state_dict, dtype)
    return _load_fla_lm(
        fla_hgrn2_lm_config(config), _fla_hgrn2_attention_mapping, state_dict, dtype
    )

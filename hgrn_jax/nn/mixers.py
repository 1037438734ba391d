"""One token-mixer choice for every model: :class:`MixerConfig` and :func:`make_mixer`.

:class:`~hgrn_jax.nn.ClassifierConfig`, :class:`~hgrn_jax.nn.ImageConfig` and
:class:`~hgrn_jax.nn.LMConfig` each hold one ``mixer: MixerConfig``; the model decides only the
direction (the LM is causal, the classifiers bidirectional). In experiment configs the mixer is a
nested dict, e.g. ``--config.model.mixer.kind=hgrn2 --config.model.mixer.expand_ratio=8``.

Which module each choice builds:

==========  ==========  =========  ==========================================================
kind        layout      scan       module
==========  ==========  =========  ==========================================================
``hgrn``    official    1d         :class:`~hgrn_jax.nn.HGRU` (hgru-pytorch ``Hgru1d``/``BiHgru1d``)
``hgrn``    official    2d         :class:`~hgrn_jax.nn.HGRU2D` (``Hgru2d``/``BiHgru2d``)
``hgrn2``   official    2d         :class:`~hgrn_jax.nn.HGRN2D` (``Hgru2_2d_parallel``, bidir.)
``hgrn2``   official    2d_series  :class:`~hgrn_jax.nn.HGRN2DSeries` (``Hgru2_2d_series``, bidir.)
``hgrn``    fla         1d         :class:`~hgrn_jax.nn.FlaHGRNAttention` (causal only)
``hgrn2``   official    1d         :class:`~hgrn_jax.nn.HGRN2` (``Hgru2_1d``/``BiHgru2_1d``)
``hgrn2``   fla         1d         :class:`~hgrn_jax.nn.FlaHGRN2Attention` (fla ``HGRN2Attention``)
attention   official    1d         :class:`~hgrn_jax.nn.SoftmaxAttention` (Transformer baseline)
==========  ==========  =========  ==========================================================
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
from flax import nnx

from hgrn_jax.deprecation import HGRNDeprecationWarning
from hgrn_jax.nn.attention import SoftmaxAttention
from hgrn_jax.nn.checks import check_config_values, check_method
from hgrn_jax.nn.fla_hgrn import FlaHGRNAttention
from hgrn_jax.nn.hgrn2 import HGRN2, HGRN2D, FlaHGRN2Attention, HGRN2DSeries
from hgrn_jax.nn.hgru import HGRU, HGRU2D
from hgrn_jax.ops import MATRIX_METHODS, METHODS

KINDS = ("hgrn", "hgrn2", "attention")
# HGRN official's switches (the paper's ablations). None (their default) is the layer's own
# behaviour; check_options says which other values each kind and layout accepts.
HGRU_OPTIONS = ("complex_valued", "separate_phases", "use_forget_gate", "norm_before_gate")
# What fla's HGRN layer does in place of each HGRU option (the one value it accepts besides None).
FLA_HGRN_DOES = {
    "complex_valued": (False, "it is real-valued"),
    "separate_phases": (False, "it has no phases"),
    "use_forget_gate": (True, "its forget gate is always data-dependent"),
    "norm_before_gate": (True, "it normalises, then gates"),
}
LAYOUTS = ("official", "fla")
SCANS = ("1d", "2d", "2d_series")


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """The token mixer of a model.

    kind: ``"hgrn"`` (HGRN's elementwise recurrence), ``"hgrn2"`` (matrix state per head) or
      ``"attention"`` (multi-head softmax attention: the same model as a Transformer baseline;
      official layout, 1-D; give the classifier or LM ``position_encoding=True``).
    layout: ``"official"`` (the authors' hgru-pytorch / hgru2-pytorch layers) or ``"fla"`` (the
      flash-linear-attention layers): parameter names, activations, scale and norm differ.
    scan: ``"1d"`` over the sequence or ``"2d"`` over an (H, W) grid (official layouts only;
      HGRN2's four scans sharing one set of gates), or ``"2d_series"`` (HGRN2 only: the whole
      bidirectional layer along H, then again, same weights, along W on its output; hgru2-pytorch's
      ``Hgru2_2d_series``, the Path-X layer). :attr:`grid` says whether a scan is 2-D.
    expand_ratio: HGRN2's head width K (d / K heads with K x V states); fla HGRN's width
      multiplier. None: hgrn 1, hgrn2 official 2 (hgru2-pytorch's default), hgrn2 fla 128 (fla's).
    complex_valued, separate_phases, use_forget_gate, norm_before_gate: HGRN official's options
      (the paper's ablations; None: True). ``separate_phases`` gives the reverse scan of a
      bidirectional complex HGRU its own phase (a causal or real-valued HGRU has no second one).
      fla's HGRN refuses the values it cannot honour (it is real-valued, without phases, with a
      data-dependent forget gate, norm before gate: it accepts False, False, True, True);
      hgrn2 and attention have none of them and accept only None (or True, the value HGRN
      configs carry, e.g. the experiment configs switched to hgrn2).
    use_bias: biases on the projections of the official layouts and attention (None: True);
      fla's layers have none and refuse True.
    norm_epsilon: the mixer's inner norm (fla HGRN2's is always 1e-5; fla HGRN's is its norm_eps);
      attention has none and refuses values other than 1e-5.
    method: the recurrence method (:func:`~hgrn_jax.ops.linear_recurrence` or
      :func:`~hgrn_jax.ops.matrix_recurrence`); attention has no recurrence and refuses values
      other than ``"auto"``.
    sequence_axis: a mesh axis to split the sequence over (sequence parallelism,
      :mod:`hgrn_jax.ops.sequence_parallel`): HGRN and HGRN2, both layouts (the 2-D mixers
      split the rows). Not attention.
    num_heads: attention heads (None: one per 64 channels); the other kinds refuse it (HGRN2's
      heads are features // expand_ratio).
    """

    kind: Literal["hgrn", "hgrn2", "attention"] = "hgrn"
    layout: Literal["official", "fla"] = "official"
    scan: Literal["1d", "2d", "2d_series"] = "1d"
    expand_ratio: int | None = None
    complex_valued: bool | None = None
    separate_phases: bool | None = None
    use_forget_gate: bool | None = None
    norm_before_gate: bool | None = None
    use_bias: bool | None = None
    norm_epsilon: float = 1e-5
    method: str = "auto"
    sequence_axis: str | None = None
    num_heads: int | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("layout", self.layout, LAYOUTS),
            ("scan", self.scan, SCANS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"unknown mixer {name} {value!r}; use one of {', '.join(map(repr, allowed))}"
                )
        if self.kind == "attention" and (self.layout, self.scan) != ("official", "1d"):
            raise ValueError(
                "kind='attention' is 1-D with the official layout (a 2-D task's grid is its "
                f"sequence in raster order); got layout={self.layout!r}, scan={self.scan!r}"
            )
        if self.grid and self.layout != "official":
            raise ValueError(
                f"scan={self.scan!r} needs layout='official'; got kind={self.kind!r}, "
                f"layout={self.layout!r} (fla's mixers are 1-D)"
            )
        if self.scan == "2d_series" and self.kind != "hgrn2":
            raise ValueError(
                f"scan='2d_series' is HGRN2's (hgru2-pytorch's Hgru2_2d_series); got kind="
                f"{self.kind!r}: use kind='hgrn2', or scan='2d' for HGRN's 2-D scan"
            )
        if self.sequence_axis is not None and self.kind == "attention":
            raise ValueError(
                f"sequence_axis={self.sequence_axis!r} (sequence parallelism) needs a recurrent "
                "mixer: hgrn (kind='hgrn', either layout) or hgrn2 (kind='hgrn2'); got kind="
                f"{self.kind!r}, layout={self.layout!r}: change the mixer or leave sequence_axis "
                "unset"
            )
        check_options(vars(self))
        if self.kind != "attention":  # refused now, not when the model is built
            check_method(
                self.method, MATRIX_METHODS if self.kind == "hgrn2" else METHODS, "MixerConfig"
            )
        if self.num_heads is not None and self.kind != "attention":
            raise ValueError(
                f"mixer.num_heads={self.num_heads} is for kind='attention'; kind={self.kind!r} "
                "takes its heads from mixer.expand_ratio (the head width, heads = features // "
                "expand_ratio): set expand_ratio and leave num_heads unset"
            )
        if self.kind == "attention" and self.expand_ratio is not None:
            raise ValueError(
                f"mixer.expand_ratio={self.expand_ratio} is an HGRN2 / fla option; "
                "kind='attention' has none: set mixer.num_heads instead"
            )
        check_config_values(self, counts=("expand_ratio", "num_heads"), positives=("norm_epsilon",))
        if (self.kind, self.layout) == ("hgrn", "official") and self.expand_ratio not in (None, 1):
            raise ValueError(
                "expand_ratio is an HGRN2 / fla option; HGRN official has none "
                f"(got {self.expand_ratio})"
            )

    @property
    def grid(self) -> bool:
        """Whether the mixer scans an (H, W) grid (``scan`` ``"2d"`` or ``"2d_series"``)."""
        return self.scan != "1d"

    def check_width(self, features: int, where: str) -> None:
        """Raise if this mixer cannot run at width ``features`` (its heads must split it)."""
        k = self.resolved_expand_ratio
        if self.kind == "hgrn2" and self.layout == "official":
            fits = features % k == 0
        elif self.kind == "hgrn2":  # fla: H = d // K heads of value width d // H
            fits = features >= k and features % (features // k) == 0
        else:
            return
        if not fits:
            divisors = [n for n in range(1, features + 1) if features % n == 0][-4:]
            raise ValueError(
                f"{where}: mixer.expand_ratio={k} (HGRN2's head width; heads = features // "
                f"expand_ratio) does not split features={features}; set mixer.expand_ratio to a "
                f"divisor of {features}, e.g. {', '.join(map(str, divisors))}"
            )

    def resolved(self, name: str) -> bool:
        """An HGRU option or ``use_bias`` with None (the layer's own) filled in: True."""
        value = getattr(self, name)
        return True if value is None else value

    def check_model(self, features: int, use_lower_bound: bool, where: str) -> None:
        """Raise if a model (``where``, e.g. ``"LMConfig"``) of width ``features`` with
        ``use_lower_bound`` cannot run this mixer as set: heads that do not split the width
        (:meth:`check_width`), or lower bounds on attention, which has no forget gate to bound
        (the model made bound parameters that nothing read)."""
        self.check_width(features, where)
        if use_lower_bound and self.layout == "fla":
            k = self.resolved_expand_ratio
            forget = features * k if self.kind == "hgrn" else (features // k) * k
            if forget != features:
                fix = "1" if self.kind == "hgrn" else f"a divisor of {features}"
                raise ValueError(
                    f"{where}: the lower bounds (one per channel of features={features}) do not "
                    f"fit fla {self.kind}'s forget gate of width {forget} (mixer.expand_ratio="
                    f"{k}); set mixer.expand_ratio to {fix}, or use_lower_bound=False"
                )
        if self.kind == "attention" and use_lower_bound:
            raise ValueError(
                f"{where}: use_lower_bound=True bounds the forget gates of a recurrent mixer; "
                "kind='attention' has none: set use_lower_bound=False"
            )

    @property
    def resolved_expand_ratio(self) -> int:
        """``expand_ratio`` with the kind's default filled in."""
        if self.expand_ratio is not None:
            return self.expand_ratio
        if self.kind == "hgrn2":
            return 2 if self.layout == "official" else 128
        return 1

    @classmethod
    def coerce(cls, value: MixerConfig | Mapping[str, Any] | None, where: str) -> MixerConfig:
        """A MixerConfig from itself, None (the default) or a dict (experiment configs)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"{where}.mixer.{unknown[0]} is not a MixerConfig field; valid "
                    f"fields: {', '.join(sorted(known))}"
                )
            try:
                return cls(**value)
            except ValueError as error:  # name the model config the dict came from
                raise ValueError(f"{where}: {error}") from None
        raise TypeError(f"{where}.mixer must be a MixerConfig or a dict; got {value!r}")


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MixerConfig)}


def _fix(key: str, name: str, value: Any) -> str:
    """How a user gives ``key.name`` the value ``value`` (None's equal): a flag for
    experiment-config keys (which hold a value), else leaving it unset."""
    if key.startswith("config."):
        return f"set --{key}.{name}={value}"
    return f"leave {key}.{name} unset (or {value!r})"


def check_options(options: Mapping[str, Any], key: str = "mixer") -> None:
    """Raise a one-line ValueError naming ``<key>.<option>``, its value and the fix for an option
    the mixer of ``options`` (MixerConfig fields; absent ones at their defaults) would not honour:
    an HGRU switch of another kind, one fla's HGRN does not have, ``use_bias=True`` on an fla
    layer, the recurrence options of attention. (``separate_phases=True`` on a real-valued or
    causal HGRU is accepted: there is no second phase to give, and nothing asked for is missing.)

    The one home of these rules: :class:`MixerConfig` checks itself with ``key="mixer"``, and the
    experiment runner checks ``config.model.mixer`` before building the model
    (``key="config.model.mixer"``), so its errors name its keys.
    """
    values = {**_FIELD_DEFAULTS, **options}
    kind, layout = values["kind"], values["layout"]

    def refuse(name: str, what: str, fix: str) -> None:
        raise ValueError(f"{key}.{name}={values[name]!r} {what}; {fix}")

    for name in HGRU_OPTIONS:
        value = values[name]
        if value is None:
            continue
        if kind != "hgrn" and value is not True:
            refuse(
                name,
                f"is an HGRN option (kind='hgrn', the paper's ablations); kind={kind!r} has none",
                f"{_fix(key, name, True)} or use kind='hgrn'",
            )
        if (kind, layout) == ("hgrn", "fla") and value != FLA_HGRN_DOES[name][0]:
            does, why = FLA_HGRN_DOES[name]
            refuse(
                name,
                f"is not an option of layout='fla' (fla's HGRNAttention: {why})",
                f"{_fix(key, name, does)} or use layout='official'",
            )
    if layout == "fla" and values["use_bias"]:
        refuse(
            "use_bias",
            f"is not an option of layout='fla' (fla's {kind} layers have no biases)",
            f"{_fix(key, 'use_bias', False)} or use layout='official'",
        )
    if kind == "attention":
        for name in ("method", "norm_epsilon"):
            if values[name] != _FIELD_DEFAULTS[name]:
                refuse(
                    name,
                    "is not an option of kind='attention' (it has no recurrence and no inner norm)",
                    f"{_fix(key, name, _FIELD_DEFAULTS[name])} or use a recurrent kind",
                )


def check_direction(options: Mapping[str, Any], *, causal: bool, key: str = "") -> None:
    """Raise a one-line ValueError when the mixer of ``options`` (MixerConfig fields; absent
    ones at their defaults) has no ``causal`` (forward only, LMs) or bidirectional (classifiers)
    form: fla's HGRN is causal only, HGRN2's 2-D scan bidirectional only. ``key`` (e.g.
    ``"config.model.mixer"``) prefixes the message, so that the experiment runner can check a
    config before it builds the model (and before it warns about settings the model drops)."""
    values = {**_FIELD_DEFAULTS, **options}
    kind, layout, scan = values["kind"], values["layout"], values.get("scan")
    where = f"{key}: " if key else ""

    def use(name: str, value: str) -> str:  # a flag for experiment-config keys
        return f"--{key}.{name}={value}" if key.startswith("config.") else f"{name}={value!r}"

    if (kind, layout) == ("hgrn", "fla") and not causal:
        raise ValueError(
            f"{where}kind='hgrn', layout='fla' is causal only (fla's HGRNAttention); "
            f"use {use('layout', 'official')} or {use('kind', 'hgrn2')} for a bidirectional "
            "mixer"
        )
    if (kind, layout) == ("hgrn2", "official") and scan in ("2d", "2d_series") and causal:
        reference = "Hgru2_2d_parallel" if scan == "2d" else "Hgru2_2d_series"
        raise ValueError(
            f"{where}kind='hgrn2' with scan={scan!r} is bidirectional only "
            f"(hgru2-pytorch's {reference}); use {use('scan', '1d')} for a causal mixer"
        )


def make_mixer(
    config: MixerConfig,
    features: int,
    *,
    causal: bool,
    use_lower_bound: bool,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The token mixer of ``config`` at width ``features``.

    ``causal``: a forward scan only (LMs) or both directions (classifiers). ``use_lower_bound``:
    whether this layer applies its bound; the fla layouts compute ``log(gamma)``, so they must skip
    a bound that is exactly 0 (the first layer, as fla does).
    """
    check_options(vars(config))
    if config.kind == "attention":
        return SoftmaxAttention(
            features,
            num_heads=config.num_heads,
            causal=causal,
            use_bias=config.resolved("use_bias"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    common = dict(method=config.method, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    key = (config.kind, config.layout)
    if key == ("hgrn", "official"):
        options = dict(
            **{name: config.resolved(name) for name in HGRU_OPTIONS},
            use_bias=config.resolved("use_bias"),
            norm_epsilon=config.norm_epsilon,
            sequence_axis=config.sequence_axis,
            **common,
        )
        if config.scan == "2d":
            return HGRU2D(features, causal=causal, **options)
        return HGRU(features, bidirectional=not causal, **options)
    if key == ("hgrn", "fla"):
        check_direction(vars(config), causal=causal)
        return FlaHGRNAttention(
            features,
            expand_ratio=config.resolved_expand_ratio,
            use_lower_bound=use_lower_bound,
            norm_epsilon=config.norm_epsilon,
            sequence_axis=config.sequence_axis,
            **common,
        )
    if key == ("hgrn2", "official"):
        options = dict(
            expand_ratio=config.resolved_expand_ratio,
            use_bias=config.resolved("use_bias"),
            norm_epsilon=config.norm_epsilon,
            sequence_axis=config.sequence_axis,
            **common,
        )
        if config.grid:
            check_direction(vars(config), causal=causal)
            layer = HGRN2D if config.scan == "2d" else HGRN2DSeries
            return layer(features, **options)
        return HGRN2(features, bidirectional=not causal, **options)
    return FlaHGRN2Attention(
        features,
        expand_ratio=config.resolved_expand_ratio,
        use_lower_bound=use_lower_bound,
        bidirectional=not causal,
        norm_epsilon=config.norm_epsilon,
        sequence_axis=config.sequence_axis,
        **common,
    )


# Deprecated flat model-config fields -> their MixerConfig field.
LEGACY_MIXER_FIELDS = {
    "separate_phases": "separate_phases",
    "complex_valued": "complex_valued",
    "use_forget_gate": "use_forget_gate",
    "norm_before_gate": "norm_before_gate",
    "mixer_bias": "use_bias",
    "method": "method",
    "sequence_axis": "sequence_axis",
}


def fold_legacy_fields(config: Any, renames: Mapping[str, str], where: str) -> MixerConfig:
    """``config.mixer`` updated with deprecated flat fields of a model config (then cleared).

    ``renames`` maps each old model-config field to its :class:`MixerConfig` field. Each one that
    is set (not None) warns once with the new spelling.
    """
    mixer = config.mixer
    updates = {}
    for old, new in renames.items():
        value = getattr(config, old, None)  # not every model has every old field
        if value is None:
            continue
        warnings.warn(
            f"{where}({old}=...) is deprecated; use {where}(mixer=MixerConfig({new}="
            f"...)) (in experiment configs: model.mixer.{new})",
            HGRNDeprecationWarning,
            stacklevel=4,
        )
        updates[new] = value
        object.__setattr__(config, old, None)
    return dataclasses.replace(mixer, **updates) if updates else mixer


__all__ = ["MixerConfig", "make_mixer", "check_options", "KINDS", "LAYOUTS", "SCANS"]

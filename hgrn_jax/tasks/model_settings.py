"""``config.model`` checked and built: model families, sizes, mixer options, the activation
dtype, and the train/eval view of a built model."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.nn.mixers import check_direction, check_options
from hgrn_jax.tasks.settings import plain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A model family: its config dataclass and module class (``config_cls(**config.model)``)."""

    config_cls: type
    model_cls: type
    causal: bool | None = None
    """Whether the model's mixers scan forward only (LMs) or both ways (classifiers): the
    runner then refuses a mixer without that direction before it builds the model; None (a
    family of the user's own): not checked before the build."""


MODEL_SIZES = (
    "features",
    "num_layers",
    "num_classes",
    "vocab_size",
    "input_channels",
    "patch_size",
    "image_size",
    "grid_shape",
    "mixer.expand_ratio",
    "mixer.num_heads",
)
"""``config.model`` keys that are sizes: whole numbers >= 1 (``image_size``, ``grid_shape``: each
entry); None where the model has no such setting."""
SIZES_FROM_THE_DATA = ("num_classes", "vocab_size", "input_channels", "image_size", "grid_shape")
"""The sizes that 0 (or ``()``) leaves to the data (:meth:`ArrayTask.derive`)."""


def _whole_positive(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def check_model_sizes(model: Any, unset_allowed: Collection[str] = SIZES_FROM_THE_DATA) -> None:
    """Raise ValueError naming ``config.model.<key>`` when a size of :data:`MODEL_SIZES` is not
    a whole number >= 1 or ``glu_expand`` is not a finite number > 0 (a width or depth of 0
    divided by zero or built a model that could not be saved). Keys ``model`` lacks, and None,
    are not checked; the keys in ``unset_allowed`` may also be 0 or ``()`` (before the data
    fill them in, or where the model does not use them)."""
    model = plain(model) if model is not None else {}
    for key in MODEL_SIZES:
        value: Any = model
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is None or (key in unset_allowed and value in (0, (), "")):
            continue
        entries = value if isinstance(value, tuple) else (value,)
        if not entries or not all(_whole_positive(n) for n in entries):
            what = "whole numbers >= 1" if isinstance(value, tuple) else "a whole number >= 1"
            derived = " (or 0: from the data)" if key in unset_allowed else ""
            raise ValueError(
                f"config.model.{key}={value} must be {what}; set --config.model.{key}{derived}"
            )
    glu = model.get("glu_expand") if isinstance(model, Mapping) else None
    if glu is not None:
        try:
            ok = not isinstance(glu, bool) and math.isfinite(float(glu)) and float(glu) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"config.model.glu_expand={glu} must be a finite number > 0 (the GLU's width "
                "over features); set --config.model.glu_expand"
            )


def unused_sizes(kind: ModelKind) -> list[str]:
    """The sizes of :data:`SIZES_FROM_THE_DATA` that may stay 0 once the data filled theirs in:
    the fields of ``kind`` whose default is None, which a model may not use (e.g. the
    classifier's ``vocab_size`` with a linear encoder; its config class checks the one in use)."""
    optional = {f.name for f in dataclasses.fields(kind.config_cls) if f.default is None}
    return [key for key in SIZES_FROM_THE_DATA if key in optional]


def model_config(config, kind: ModelKind) -> Any:
    """``kind.config_cls`` from ``config.model``; an unknown field, or a size below 1
    (:func:`check_model_sizes`), names the key."""
    fields = plain(config.model)
    known = {f.name for f in dataclasses.fields(kind.config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"config.model.{unknown[0]} is not a field of "
            f"{kind.config_cls.__name__}; valid fields: {', '.join(sorted(known))}"
        )
    check_model_sizes(fields, unset_allowed=unused_sizes(kind))
    return kind.config_cls(**check_mixer_options(fields, causal=kind.causal))


class IgnoredSettingWarning(UserWarning):
    """A config value the model does not use, accepted for runs saved before it was refused."""


CARRIED_SWITCHES = ("complex_valued", "separate_phases")
"""HGRN switches the experiment configs carry at True (``common.hgrn_mixer``), which fla's
real, phaseless HGRN layer does not have."""


def check_mixer_options(model: Any, causal: bool | None = None, warn: bool = True) -> Any:
    """``model`` (``config.model`` as plain values) ready for its config class, after raising a
    ValueError naming ``config.model.mixer.<key>`` and its flag for a mixer option the model
    would not honour (:func:`hgrn_jax.nn.mixers.check_options`, the rule the model configs
    apply, with the runner's key names) or, given ``causal`` (the model's direction), a mixer
    without that direction (:func:`hgrn_jax.nn.mixers.check_direction`). The errors come
    before any warning, so that a config that fails is not first told to change settings.

    One exception keeps the runs saved before the rule loadable and resumable: with
    ``layout='fla'``, the switches the config files carry at True (:data:`CARRIED_SWITCHES`) are
    dropped with an :class:`IgnoredSettingWarning` rather than refused (the layer never had
    them); ``warn=False`` drops them silently (a check that precedes the model's build, which
    warns once). Set to True in a MixerConfig, they are refused."""
    model = plain(model) if model is not None else {}
    mixer = model.get("mixer") if isinstance(model, Mapping) else None
    if not isinstance(mixer, Mapping):
        return model
    mixer = dict(mixer)
    dropped = []
    if (mixer.get("kind", "hgrn"), mixer.get("layout", "official")) == ("hgrn", "fla"):
        dropped = [name for name in CARRIED_SWITCHES if mixer.get(name) is True]
        mixer.update(dict.fromkeys(dropped))
    check_options(mixer, key="config.model.mixer")
    if causal is not None:
        check_direction(mixer, causal=causal, key="config.model.mixer")
    for name in dropped if warn else ():
        warnings.warn(
            f"config.model.mixer.{name}=True is not used by layout='fla' (fla's HGRN is "
            f"real-valued, without phases): the model is built without it; set "
            f"--config.model.mixer.{name}=False to say so",
            IgnoredSettingWarning,
            stacklevel=2,
        )
    return {**model, "mixer": mixer}


def model_field_defaults(kind: ModelKind) -> dict[str, Any]:
    """What the ``model`` keys absent from a config stand for: ``{"model": {field: default}}``
    of ``kind.config_cls`` (a dataclass default as its dict of fields, as a config holds it).
    Fields without a default are left out."""
    defaults: dict[str, Any] = {}
    for field in dataclasses.fields(kind.config_cls):
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        defaults[field.name] = (
            dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        )
    return {"model": defaults}


def activation_dtype(name: str) -> jnp.dtype:
    """The activation dtype ``config.dtype`` names; ValueError naming the key otherwise."""
    if name not in DTYPES:
        raise ValueError(
            f"config.dtype={name!r} is not an activation dtype; set --config.dtype to one of "
            f"{', '.join(DTYPES)}"
        )
    return DTYPES[name]


def build_model(config, kind: ModelKind, rngs: nnx.Rngs) -> nnx.Module:
    """The model of ``config`` (activations in ``config.dtype``, float32 parameters)."""
    return kind.model_cls(
        model_config(config, kind),
        dtype=activation_dtype(config.dtype),
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def mode(model: nnx.Module, train: bool) -> nnx.Module:
    """A view of ``model`` with dropout and BatchNorm statistics set for training or eval."""
    return nnx.view(
        model, deterministic=not train, use_running_average=not train, raise_if_not_found=False
    )

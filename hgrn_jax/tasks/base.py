"""What the dataset modules share: the array-backed task, batch layouts, derived settings, the
prepared-tfds mixin and the registry entry (:class:`Dataset`).

A dataset module (``hgrn_jax/tasks/<dataset>.py``) defines one :class:`ArrayTask` subclass per
data source and a :class:`Dataset` whose ``sources`` table maps ``config.data.source`` to them.
Every source class states which data folders it ``reads``; a folder set in the config that the
chosen source does not read is an error, never silently ignored. Settings that follow from the
data (image size, grid shape, sequence length, classes, vocabulary) are filled in by
:meth:`ArrayTask.derive` where the config leaves them at 0 (or ``()``), and checked where it
sets them.

Training batches are a pure function of ``(config.seed, step)``: epoch ``e`` visits the
training set in the order ``np.random.default_rng((seed, e)).permutation(n)``, step ``s`` takes
rows ``[k * B, (k + 1) * B)`` of its epoch's order (``B`` = global batch, ``e, k = divmod(s, n //
B)``, the last partial batch of an epoch dropped) and process ``p`` of ``P`` gets rows ``[p * B /
P, (p + 1) * B / P)`` of that. They are read by the grain pipeline
(:mod:`hgrn_jax.data.grain_pipeline`; ``data.workers`` worker processes, default 0: in the
training process), whose iterator state is saved with each checkpoint. Evaluation batches walk
the split in order in the training process (deterministic, sharded by process), every example
exactly once over all processes, the last batch padded with rows of ``weight`` 0.

Batch keys: ``inputs`` (B, L) int32 token ids or (B, L, C) float32 pixels, ``mask`` (B, L) bool
(token tasks), ``inputs2``/``mask2`` (Retrieval's second document), ``images`` (B, H, W, 3)
float32 (ImageNet), ``ids`` (B, T + 1) int32 (LM), ``labels`` (B,) int32, ``weight`` (B,) float32.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.data import grain_pipeline, loader
from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.nn.mixers import check_direction, check_options
from hgrn_jax.tasks.losses import classification_loss
from hgrn_jax.tasks.protocol import Batch

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
EVAL_SPLITS = ("val", "test")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FOLDER_KEYS = ("lra_dir", "tfds_dir", "manual_dir", "wikitext_dir", "tokenizer_path")
"""Data settings that point at files: each source reads some of them and rejects the others."""


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A model family: its config dataclass and module class (``config_cls(**config.model)``)."""

    config_cls: type
    model_cls: type
    causal: bool | None = None
    """Whether the model's mixers scan forward only (LMs) or both ways (classifiers): the
    runner then refuses a mixer without that direction before it builds the model; None (a
    family of the user's own): not checked before the build."""


def plain(value: Any) -> Any:
    """ConfigDict/list values as plain Python (lists become tuples, for frozen dataclasses)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


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


# ----------------------------------------------------------------------------- settings


def copy_config(config):
    """An independent copy (the task fills in derived settings without touching the caller's)."""
    if hasattr(config, "copy_and_resolve_references"):
        return config.copy_and_resolve_references()
    return copy.deepcopy(config)


def settle(config, key: str, value: Any, why: str) -> None:
    """Set ``config.<key>`` (e.g. ``"model.grid_shape"``) to the derived ``value`` when it is
    unset (0 or empty); an explicit value that disagrees is an error saying ``why``."""
    section, name = key.split(".")
    current = config[section].get(name)
    if current in (None, 0, "", (), []):
        config[section][name] = value
        return
    if plain(current) != plain(value):
        raise ValueError(
            f"config.{key}={plain(current)} disagrees with {why}: set "
            f"--config.{key}={plain(value)}, or 0 to derive it"
        )


def check_vocab_size(config, size: int, what: str) -> None:
    """Token ids of the data run up to ``size - 1``: the embedding needs that many rows (a
    ``model.vocab_size`` of 0 becomes ``size``)."""
    if not config.model.vocab_size:
        config.model.vocab_size = int(size)
    elif size > config.model.vocab_size:
        raise ValueError(
            f"config.model.vocab_size {config.model.vocab_size} is smaller than "
            f"{what} vocabulary ({size} ids); set --config.model.vocab_size={size}"
        )


def check_labels(
    labels: Any,
    num_classes: int,
    where: str,
    ndim: int = 1,
    refuses_classes: Callable[[int], str] | None = None,
) -> None:
    """ValueError naming ``where`` when class labels are not integers, have other than ``ndim``
    dimensions ((N,): one class per example), or leave ``[0, num_classes)``: the loss compared
    (B,) predictions with (B, 1) labels as a (B, B) table (an accuracy of 3125%), and a label
    truncated from a float, or outside the classes (an all-zero one-hot target, a loss of 0),
    trained on without a word. ``refuses_classes(n)`` names what refuses
    ``config.model.num_classes=n`` (a dataset's ``derive`` that settles the classes; "" when
    nothing does): a label too large then points at the data rather than at the setting."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{where} has labels of dtype {labels.dtype} (shape {labels.shape}); class labels "
            "are whole numbers 0 to config.model.num_classes - 1: return them from _load as an "
            "integer array (e.g. np.int32)"
        )
    if labels.ndim != ndim:
        want = (
            "(N,), one class per example (e.g. labels.reshape(-1) for (N, 1))"
            if ndim == 1
            else f"of {ndim} dimensions (the task's label_ndim)"
        )
        raise ValueError(
            f"{where} has labels of shape {labels.shape}; the task's loss takes labels of shape "
            f"{want}: return them so from _load"
        )
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(
            f"{where} has a negative class label ({low}); labels run from 0 to "
            "config.model.num_classes - 1: fix the data"
        )
    if high >= num_classes:
        refuser = refuses_classes(high + 1) if refuses_classes is not None else ""
        if refuser:
            raise ValueError(
                f"{where} has class label {high}, outside the {num_classes} classes that "
                f"{refuser} settles as config.model.num_classes (labels 0 to {num_classes - 1}); "
                f"fix the labels of the data, or the classes {refuser} settles"
            )
        raise ValueError(
            f"{where} has class label {high}, outside config.model.num_classes={num_classes} "
            f"(labels 0 to {num_classes - 1}); set --config.model.num_classes={high + 1}"
        )


def check_token_column(column: Any, name: str, where: str) -> None:
    """ValueError naming ``where`` and ``name`` unless ``column`` (an array, or an array-like
    read lazily: judged by its first row) holds integer token ids (N, L): float ids were
    truncated to integers without a word."""
    if isinstance(column, np.ndarray):
        dtype, shape = column.dtype, column.shape
    elif len(column):
        first = np.asarray(column[np.arange(1)])
        dtype, shape = first.dtype, (len(column), *first.shape[1:])
    else:
        return
    if len(shape) != 2 or not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"{where}: {name!r} must be integer token ids (examples, length); got {dtype} "
            f"{shape}: return them from _load as an integer array (e.g. np.int32)"
        )


def skip_bad_rows(config) -> bool:
    return bool(config.data.get("skip_bad_rows", False))


def token_batch(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids (B, L) and the padding mask (B, L) of ``lengths`` (B,)."""
    ids = ids.astype(np.int32)
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids, mask


# ----------------------------------------------------------------------------- the array task


class ArrayTask:
    """A task whose splits are arrays (or array-likes) with a common leading dimension.

    Subclasses give ``_load`` (a split's examples), ``_batch`` (model inputs of some rows) and
    ``_forward`` (model outputs of a batch), and may check their data in ``_check_source``.
    """

    metric: ClassVar[str] = "accuracy"
    reads: ClassVar[frozenset[str]] = frozenset()
    """The :data:`FOLDER_KEYS` this source reads."""
    model_kind: ClassVar[ModelKind]
    stand_in: ClassVar[str] = "synthetic"
    """The source that needs no download (named in missing-data errors)."""
    columns: ClassVar[tuple[str, ...]] = ()
    """The arrays of ``_load``'s examples that ``_batch`` reads (checked as a split loads)."""
    token_columns: ClassVar[tuple[str, ...]] = ()
    """The columns holding token ids (N, L), checked to be integers as a split loads."""
    label_ndim: ClassVar[int] = 1
    """The dimensions of the ``labels`` column: 1, (N,), for the loss's one class per example;
    a task whose ``loss_fn`` reads more (e.g. a class per token, (N, L)) sets its own."""
    label_smoothing: ClassVar[bool] = True
    """Whether the loss reads ``config.label_smoothing`` (a task whose loss does not refuses a
    value other than 0)."""

    def __init__(self, config, name: str):
        if not hasattr(self, "model_kind"):
            raise ValueError(
                f"{type(self).__name__} (a source of task {name!r}) sets no model_kind; set it "
                "to a model family of hgrn_jax.tasks.models (CLASSIFIER, IMAGE or LM)"
            )
        self.name = name
        self._examples: dict[str, dict[str, np.ndarray]] = {}
        self._check_unread_settings(config)
        check_model_sizes(config.get("model", None))  # before deriving divides by them
        self.config = self.derive(config)
        try:
            self._check_source()
        except DatasetMissingError as error:
            hint = f"--config.data.source={self.stand_in}"
            if hint in str(error):
                raise
            raise DatasetMissingError(
                f"{error} (or train on the generated stand-in with {hint})"
            ) from error

    @classmethod
    def derive(cls, config):
        """A copy of ``config`` with the settings that follow from this source filled in."""
        return copy_config(config)

    @classmethod
    def _check_unread_settings(cls, config) -> None:
        smoothing = config.get("label_smoothing", 0.0)
        if smoothing and not cls.label_smoothing:
            raise ValueError(
                f"config.label_smoothing={smoothing} is not read by task {config.task!r} (its "
                "loss has no label smoothing); set --config.label_smoothing=0"
            )
        source = config.data.source
        for key in FOLDER_KEYS:
            value = config.data.get(key, "")
            if value and key not in cls.reads:
                readers = ", ".join(f"--config.data.{k}" for k in FOLDER_KEYS if k in cls.reads)
                raise ValueError(
                    f"config.data.{key}={value!r} is not read by data.source={source!r}"
                    + (f" (it reads {readers})" if readers else " (it reads no data folder)")
                    + f"; remove --config.data.{key}, or choose the source that reads it"
                )

    # -- what subclasses provide

    def _check_source(self) -> None:
        """Raise :class:`DatasetMissingError` early when the configured data cannot be read."""

    def _load(self, split: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _batch(self, examples: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        raise NotImplementedError

    def _forward(self, model: nnx.Module, batch: dict) -> jax.Array:
        raise NotImplementedError

    # -- the Task protocol

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        if "vocab_size" in self.config.model and not self.config.model.vocab_size:
            self.examples("train")  # reading the data settles the vocabulary size
        return build_model(self.config, self.model_kind, rngs)

    def train_batches(
        self, start_step: int, process_index: int = 0, process_count: int = 1
    ) -> grain_pipeline.TrainIterator:
        """Process-local training batches for steps start_step, start_step + 1, ... (endless),
        read by the grain pipeline (:mod:`hgrn_jax.data.grain_pipeline`) in
        ``data.workers`` worker processes; the iterator's ``get_state()`` is checkpointed."""
        batch_size = self.config.batch_size
        loader.process_slice(batch_size, process_index, process_count)  # fail before loading
        examples = self.examples("train")
        n = self.num_examples("train")
        if n < batch_size:
            raise ValueError(
                f"the {self.name} training split has {n} examples, fewer than "
                f"batch_size {batch_size}; lower --config.batch_size"
            )
        source = _TrainRows(
            self,
            grain_pipeline.ArraySource(examples, name=f"{self.name} {type(self).__name__} train"),
            process_index,
            process_count,
        )
        return grain_pipeline.train_loader(
            source,
            seed=int(self.config.seed),
            batch_size=int(batch_size),
            process_index=process_index,
            process_count=process_count,
            worker_count=self.worker_count(),
            batch_transform=source,
        ).iterator(start_step)

    def worker_count(self) -> int:
        """Input worker processes: ``data.workers`` (-1: one per CPU; default 0, in process)."""
        return grain_pipeline.resolve_worker_count(self.config.data.get("workers", 0))

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the task for its batch functions: not its data (they receive
        # the rows they need) nor thread pools.
        state = dict(self.__dict__)
        state["_examples"] = {}
        state.pop("_pool", None)
        return state

    def _train_batch(self, examples, rows, step, process_index, process_count) -> Batch:
        batch = self._batch(examples, rows)
        batch["weight"] = np.ones(len(rows), np.float32)
        return batch

    def eval_batches(
        self, split: str, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """Process-local batches covering ``split`` once; padding rows have weight 0."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; use 'val' or 'test'")
        batch_size = self.config.eval_batch_size or self.config.batch_size
        loader.process_slice(batch_size, process_index, process_count, "eval_batch_size")
        examples = self.examples(split)
        n = self.num_examples(split)
        for rows, valid in loader.eval_rows(
            n, batch_size, process_index, process_count, "eval_batch_size"
        ):
            batch = self._batch(examples, rows)
            batch["weight"] = valid.astype(np.float32)
            yield self._check_batch_labels(batch, examples, f"the {self.name} {split} split")

    def loss_fn(
        self, model: nnx.Module, batch: dict, *, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = self._forward(mode(model, train), batch)
        return classification_loss(
            logits, batch["labels"], batch["weight"], self.config.get("label_smoothing", 0.0)
        )

    # -- examples

    def examples(self, split: str) -> dict[str, np.ndarray]:
        """The (cached) examples of ``split`` in ``train | val | test``."""
        if split not in SPLIT_INDEX:
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        if split not in self._examples:
            examples = self._load(split)
            missing = [
                c for c in self.columns if isinstance(examples, Mapping) and c not in examples
            ]
            if missing:
                raise ValueError(
                    f"{type(self).__name__}._load({split!r}) returned no {', '.join(missing)}; "
                    f"its batches read {', '.join(self.columns)} (docs/tasks.md)"
                )
            where = f"the {self.name} {split} split"
            for name in self.token_columns if isinstance(examples, Mapping) else ():
                check_token_column(examples[name], name, where)
            labels = examples.get("labels") if isinstance(examples, Mapping) else None
            if isinstance(labels, np.ndarray) and self.model_classes:  # in memory or mapped
                self._check_labels(labels, where)
            self._examples[split] = examples
        return self._examples[split]

    @property
    def model_classes(self) -> int:
        """The model's classes (``config.model.num_classes``); 0 for a model without."""
        return int(self.config.model.get("num_classes", 0) or 0)

    def _check_batch_labels(self, batch: Batch, examples: Mapping[str, Any], where: str) -> Batch:
        """``batch``, after checking its labels (:func:`check_labels`) when its split's are
        read lazily (prepared tfds records): a split in memory or mapped was checked whole as
        it loaded (:meth:`examples`)."""
        lazy = not isinstance(examples.get("labels"), np.ndarray)
        if lazy and "labels" in batch and self.model_classes:
            self._check_labels(batch["labels"], where)
        return batch

    def _check_labels(self, labels: Any, where: str) -> None:
        check_labels(labels, self.model_classes, where, self.label_ndim, self._refuses_classes)

    def _refuses_classes(self, num_classes: int) -> str:
        """This source's ``derive`` where it refuses ``config.model.num_classes=num_classes``
        (it settles the classes itself), else ""."""
        config = copy_config(self.config)
        config.model.num_classes = num_classes
        try:
            type(self).derive(config)
        except ValueError:
            return f"{type(self).__name__}.derive"
        return ""

    def num_examples(self, split: str) -> int:
        return len(next(iter(self.examples(split).values())))

    def steps_per_epoch(self) -> int:
        return self.num_examples("train") // self.config.batch_size

    # -- helpers for generated data

    def _split_seed(self, split: str) -> tuple[int, int]:
        return (int(self.config.data.generator_seed), SPLIT_INDEX[split])

    def _split_size(self, split: str) -> int:
        return int(self.config.data[f"{split}_examples"])


class _TrainRows:
    """The training split as the grain pipeline's source and batch transform: ``read(rows)``
    passes the row numbers on and ``(batch, step)`` builds the task's training batch from the
    split's arrays at those rows (each column indexed once, as for evaluation). Picklable for
    worker processes: memory-mapped arrays travel as their file names (:class:`ArraySource`),
    the task without its data (:meth:`ArrayTask.__getstate__`)."""

    def __init__(
        self,
        task: ArrayTask,
        arrays: grain_pipeline.ArraySource,
        process_index: int,
        process_count: int,
    ):
        self.task, self.arrays = task, arrays
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return len(self.arrays)

    def __repr__(self) -> str:  # what a saved iterator state is checked against
        return repr(self.arrays)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"rows": rows}

    def __call__(self, batch: dict[str, np.ndarray], step: int) -> Batch:
        built = self.task._train_batch(
            self.arrays.arrays, batch["rows"], step, self.process_index, self.process_count
        )
        return self.task._check_batch_labels(
            built, self.arrays.arrays, f"the {self.task.name} training batch of step {step}"
        )


# ----------------------------------------------------------------------------- batch layouts


class TokenTask(ArrayTask):
    """Token ids (B, L) with a padding mask, one label per sequence (ListOps, Text)."""

    columns = ("inputs", "lengths", "labels")
    token_columns = ("inputs",)

    def _batch(self, examples, rows):
        ids, mask = token_batch(examples["inputs"][rows], examples["lengths"][rows])
        return {"inputs": ids, "mask": mask, "labels": np.asarray(examples["labels"][rows])}

    def _forward(self, model, batch):
        return model(batch["inputs"], batch["mask"])


class PairTask(ArrayTask):
    """Two documents per example and a binary label (Retrieval)."""

    columns = ("inputs", "lengths", "inputs2", "lengths2", "labels")
    token_columns = ("inputs", "inputs2")

    def _batch(self, examples, rows):
        ids, mask = token_batch(examples["inputs"][rows], examples["lengths"][rows])
        ids2, mask2 = token_batch(examples["inputs2"][rows], examples["lengths2"][rows])
        return {
            "inputs": ids,
            "mask": mask,
            "inputs2": ids2,
            "mask2": mask2,
            "labels": np.asarray(examples["labels"][rows]),
        }

    def _forward(self, model, batch):
        return model(batch["inputs"], batch["mask"], batch["inputs2"], batch["mask2"])


class PixelTask(ArrayTask):
    """Pixels in raster order (B, H * W, C) scaled to [-1, 1] (Image, Pathfinder, Path-X).

    ``native_size`` is the source's image side (0: ``data.image_size``, or ``stand_in_size``
    when that is 0 too); ``model.grid_shape`` and ``data.seq_len`` follow from it.
    """

    columns = ("pixels", "labels")
    native_size: ClassVar[int] = 0
    stand_in_size: ClassVar[int] = 0
    channels: ClassVar[int] = 1
    images: ClassVar[str] = "these images"
    """The images in error messages ("the release's pathfinder32 images")."""

    @classmethod
    def image_size(cls, config) -> int:
        return cls.native_size or int(config.data.image_size) or cls.stand_in_size

    @classmethod
    def derive(cls, config):
        config = super().derive(config)
        size = cls.image_size(config)
        if config.data.image_size and int(config.data.image_size) != size:
            raise ValueError(
                f"data.image_size must be {size} for {cls.images}; got "
                f"{config.data.image_size} (or 0: the source's size)"
            )
        config.data.image_size = size
        settle(
            config,
            "model.grid_shape",
            (size, size),
            f"data.image_size {size} (the grid is image_size x image_size)",
        )
        settle(config, "data.seq_len", size * size, f"the {size} x {size} grid")
        settle(config, "model.input_channels", cls.input_channels(config), "the images' channels")
        return config

    @classmethod
    def input_channels(cls, config) -> int:
        return cls.channels

    def _batch(self, examples, rows):
        pixels = np.asarray(examples["pixels"][rows])
        b, h, w, c = pixels.shape
        inputs = pixels.reshape(b, h * w, c).astype(np.float32) / 127.5 - 1.0
        return {"inputs": inputs, "labels": np.asarray(examples["labels"][rows])}

    def _forward(self, model, batch):
        return model(batch["inputs"])


# ----------------------------------------------------------------------------- prepared tfds data


@dataclasses.dataclass(frozen=True)
class TfdsRelease:
    """How a dataset's release is prepared once as tfds data (:mod:`hgrn_jax.data.tfds_builders`).

    ``options(config)`` gives the builder config's settings (``seq_len``, ``resolution`` or
    ``tokenizer_path``); ``manual_dir_key`` names the data setting of the release folder;
    ``config_file`` is the experiment config named in the prepare command of error messages.
    """

    dataset: str
    manual_dir_key: str
    options: Callable[[Any], dict[str, Any]]
    config_file: str

    def manual_dir(self, config) -> str:
        return str(config.data.get(self.manual_dir_key, ""))

    def builder(self, config):
        from hgrn_jax.data import tfds_builders

        if not config.data.tfds_dir:
            raise ValueError(
                "set --config.data.tfds_dir=FOLDER: the tfds data folder to "
                "prepare into and read from"
            )
        options = self.options(config)
        source = tfds_builders.source_config(
            self.dataset, skip_bad_rows=skip_bad_rows(config), **options
        )
        return tfds_builders.builder(
            self.dataset,
            config.data.tfds_dir,
            source,
            tokenizer_path=options.get("tokenizer_path", ""),
        )

    def is_prepared(self, config) -> bool:
        return bool(config.data.tfds_dir) and self.builder(config).is_prepared()

    def command(self, config) -> str:
        """The command preparing ``config``'s dataset (the paper config's file; its flags)."""
        if self.manual_dir_key == "wikitext_dir":
            folder = (
                f"--config.data.wikitext_dir=WIKI_DIR --config.data.tokenizer_path="
                f"{config.data.tokenizer_path or 'TOKENIZER'}"
            )
        else:
            folder = "--config.data.lra_dir=LRA_DIR"
        return (
            f"python -m experiments.prepare --config={self.config_file} {folder} "
            f"--config.data.tfds_dir={config.data.tfds_dir or 'TFDS_DIR'}"
        )

    def _missing(self, config, reason: str) -> DatasetMissingError:
        from hgrn_jax.data import tfds_builders

        layout = tfds_builders.layout(self.dataset)
        return DatasetMissingError(
            f"{config.task}: {reason}. Prepare it once from the manual folder with the training "
            f"run's config flags:\n  {self.command(config)}\n{layout}(see docs/data.md)"
        )

    def open_split(self, config, split: str):
        """The prepared ``split`` as columns (``column[rows]`` reads just those records)."""
        from hgrn_jax.data import tfds_builders

        if not config.data.tfds_dir:
            raise self._missing(config, "data.tfds_dir is empty")
        b = self.builder(config)
        try:
            return tfds_builders.open_split(b, split)
        except DatasetMissingError as error:
            raise self._missing(config, str(error)) from error

    def metadata(self, config) -> dict[str, Any]:
        from hgrn_jax.data import tfds_builders

        return tfds_builders.metadata(self.builder(config))

    def check_unchanged(self, config) -> None:
        """ValueError (naming the file and the fix) when the release files in the release
        folder are not those the prepared data were built from, as ``experiments.prepare``
        refuses them (:func:`~hgrn_jax.data.tfds_builders.check_sources_unchanged`: names and
        sizes); nothing to check without the release files (hosts that read the prepared data
        only)."""
        from hgrn_jax.data import tfds_builders

        folder = self.manual_dir(config)
        if not folder:
            return
        try:
            tfds_builders.check_sources_unchanged(self.builder(config), folder)
        except DatasetMissingError:  # not all there: the prepared data need none of them
            return

    def prepare(self, config) -> None:
        """Build the tfds data from the release folder (once: prepared data are reused)."""
        from hgrn_jax.data import tfds_builders

        options = self.options(config)
        tfds_builders.check_sources(
            self.dataset,
            self.manual_dir(config),
            resolution=options.get("resolution", 0),
            tokenizer_path=options.get("tokenizer_path", ""),
        )
        tfds_builders.prepare(self.builder(config), self.manual_dir(config))


class PreparedTfds:
    """Mixin for a source class: examples come from the prepared tfds data of ``tfds_release``,
    checked at creation (present; the model's vocabulary holds the prepared ids)."""

    tfds_release: ClassVar[TfdsRelease]
    reads: ClassVar[frozenset[str]] = frozenset(
        {"tfds_dir", "lra_dir", "wikitext_dir", "tokenizer_path"}
    )
    config: Any
    _examples: dict

    def _check_source(self) -> None:
        self._examples["train"] = self._load("train")
        self.tfds_release.check_unchanged(self.config)
        vocab_size = self.tfds_release.metadata(self.config).get("vocab_size")
        if vocab_size is not None:
            check_vocab_size(self.config, int(vocab_size), "the prepared data's")

    def _load(self, split):
        return self.tfds_release.open_split(self.config, split)


@dataclasses.dataclass(frozen=True)
class ReleaseOrPrepared:
    """The ``release`` source of a dataset with a tfds builder: its prepared tfds data when they
    are in ``data.tfds_dir``, else the release files (``.npy`` caches in ``data.cache_dir``).

    With neither a prepared dataset nor a release folder, the prepared reader (whose error names
    the layout and the prepare command); an empty ``data.tfds_dir`` always means the files.
    """

    files: type[ArrayTask]
    prepared: type[ArrayTask]

    @property
    def reads(self) -> frozenset[str]:
        return self.files.reads | self.prepared.reads

    def pick(self, config) -> type[ArrayTask]:
        if not config.data.tfds_dir:
            return self.files
        release: TfdsRelease = self.prepared.tfds_release
        folder = release.manual_dir(config)
        if release.is_prepared(config) or not folder:
            return self.prepared
        logging.info(
            "%s: no prepared tfds data in data.tfds_dir=%s; reading the release files in %s",
            config.task,
            config.data.tfds_dir,
            folder,
        )
        return self.files

    def __call__(self, config, name: str) -> ArrayTask:
        return self.pick(config)(config, name)

    def _check_unread_settings(self, config) -> None:
        self.pick(config)._check_unread_settings(config)

    def derive(self, config):
        return self.files.derive(config)


# ----------------------------------------------------------------------------- registry entry


SourceFactory = Callable[[Any, str], ArrayTask]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One row of the registry: a dataset's name (``config.task``), model family and sources.

    ``sources`` maps each ``config.data.source`` value to the task class reading it (or a
    :class:`ReleaseOrPrepared`); ``tfds`` says how its release is prepared as tfds data, if it
    can be.
    """

    name: str
    model: ModelKind
    sources: Mapping[str, Any]
    tfds: TfdsRelease | None = None

    def source(self, config) -> Any:
        source = config.data.source
        if source not in self.sources:
            raise ValueError(
                f"data.source {source!r} is not available for task {self.name!r}; "
                f"choose one of {', '.join(self.sources)}"
            )
        return self.sources[source]

    def task(self, config) -> ArrayTask:
        return self.source(config)(config, self.name)

    def derive(self, config):
        """``config`` with the derived settings of its source filled in (no data read)."""
        return self.source(config).derive(config)

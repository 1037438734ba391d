"""The array-backed task (:class:`ArrayTask`) and its batch layouts (:class:`TokenTask`,
:class:`PairTask`, :class:`PixelTask`): what the dataset modules' source classes subclass.

A dataset module (``hgrn_jax/tasks/<dataset>.py``) defines one :class:`ArrayTask` subclass per
data source and a :class:`~hgrn_jax.tasks.dataset_entry.Dataset` whose ``sources`` table maps
``config.data.source`` to them.
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
float32 (ImageNet), ``ids`` (B, T + 1) int32 and ``num_targets`` (B,) int32 (LM: the scored
targets of each row), ``labels`` (B,) int32, ``weight`` (B,) float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from hgrn_jax.data import grain_pipeline, loader, wikitext
from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.tasks.data_checks import check_labels, check_same_length, check_token_column
from hgrn_jax.tasks.losses import classification_loss
from hgrn_jax.tasks.model_settings import ModelKind, build_model, check_model_sizes, mode
from hgrn_jax.tasks.protocol import Batch
from hgrn_jax.tasks.settings import copy_config, settle

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
EVAL_SPLITS = ("val", "test")
FOLDER_KEYS = ("lra_dir", "tfds_dir", "manual_dir", "wikitext_dir", "tokenizer_path")
"""Data settings that point at files: each source reads some of them and rejects the others."""
CHOICE_KEYS = {"wikitext_release": wikitext.DEFAULT_RELEASE}
"""Data settings (and their defaults) that some sources read: another value is an error for the
others, as an unread folder is."""


def token_batch(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids (B, L) and the padding mask (B, L) of ``lengths`` (B,)."""
    ids = ids.astype(np.int32)
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids, mask


class ArrayTask:
    """A task whose splits are arrays (or array-likes) with a common leading dimension.

    Subclasses give ``_load`` (a split's examples), ``_batch`` (model inputs of some rows) and
    ``_forward`` (model outputs of a batch), and may check their data in ``_check_source``.
    """

    metric: ClassVar[str] = "accuracy"
    reads: ClassVar[frozenset[str]] = frozenset()
    """The :data:`FOLDER_KEYS` and :data:`CHOICE_KEYS` this source reads."""
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
    num_classes: ClassVar[int] = 0
    """The classes of the source's labels, settled as ``model.num_classes`` (:meth:`derive`),
    so that a config of another task's count is refused; 0 where the config gives them."""
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
        config = copy_config(config)
        if cls.num_classes:
            why = f"the {cls.num_classes} classes of the data"
            settle(config, "model.num_classes", cls.num_classes, why)
        return config

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
        for key, default in CHOICE_KEYS.items():
            value = config.data.get(key, default)
            if value != default and key not in cls.reads:
                raise ValueError(
                    f"config.data.{key}={value!r} is not read by task {config.task!r} with "
                    f"data.source={source!r}; remove --config.data.{key} (its default is "
                    f"{default!r}), or choose a source that reads it"
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

    @property
    def data_source(self) -> str:
        """The ``config.data.source`` this task reads, which the start-up line and results.json
        name, also where a factory of the user's own returns the task (a package task's data
        wrapped around a model of one's own: generated data were reported as real)."""
        return str(self.config.data.source)

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
            repeats=self.train_repeats(),
        ).iterator(start_step)

    def train_repeats(self) -> int:
        """Times each example of an epoch's order is read in a row (repeated augmentation,
        :func:`hgrn_jax.data.loader.train_rows`): 1, each once; ImageNet's reads its config."""
        return 1

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
            if isinstance(examples, Mapping):
                check_same_length(examples, f"{where} ({type(self).__name__}._load({split!r}))")
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

"""Tasks: data, model and loss of each experiment, behind one interface (the runner contract).

``get_task(config)`` returns a :class:`Task` for ``config.task`` in ``listops | text | retrieval |
image | pathfinder | pathx | imagenet | wikitext103``. A task

- builds its model from ``config.model`` (the fields of ``ClassifierConfig``, ``ImageConfig`` or
  ``LMConfig``) with activations in ``config.dtype`` and float32 parameters;
- yields numpy batches. Training batches are a pure function of ``(config.seed, step)``: epoch
  ``e`` visits the training set in the order ``np.random.default_rng((seed, e)).permutation(n)``,
  step ``s`` takes rows ``[k * B, (k + 1) * B)`` of its epoch's order (``B`` = global batch,
  ``e, k = divmod(s, n // B)``, the last partial batch of an epoch dropped) and process ``p`` of
  ``P`` gets rows ``[p * B / P, (p + 1) * B / P)`` of that. Evaluation batches walk the split in
  order, every example exactly once over all processes, the last batch padded with rows of
  ``weight`` 0;
- computes the loss and metric sums (``loss_sum``, ``weight``, and ``correct`` for accuracy
  tasks) so the loop can evaluate exactly by summing over batches.

Batch keys: ``inputs`` (B, L) int32 token ids or (B, L, C) float32 pixels, ``mask`` (B, L) bool
(token tasks), ``inputs2``/``mask2`` (Retrieval's second document), ``images`` (B, H, W, 3)
float32 (ImageNet), ``ids`` (B, T + 1) int32 (LM), ``labels`` (B,) int32, ``weight`` (B,) float32.

Data: ListOps reads the LRA release's TSV files (``data.source="release"``, ``data.lra_dir``) or
generates a set of the same specification (``"generated"``, cached in ``data.cache_dir``). Every
task also runs on the small generated stand-ins of :mod:`hgrn_jax.data.synthetic`
(``"synthetic"``). The real readers for IMDB, AAN, CIFAR-10, Pathfinder, ImageNet and WikiText-103
are subclasses in :mod:`hgrn_jax.training.real_data`, which :func:`get_task` consults
first; the classes here raise a clear error naming the alternative for those sources.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hgrn_jax.data import listops, loader, synthetic
from hgrn_jax.nn.classifier import ClassifierConfig, HGRNClassifier
from hgrn_jax.nn.image import HGRNImageClassifier, ImageConfig
from hgrn_jax.nn.lm import HGRNLM, LMConfig

Batch = dict[str, np.ndarray]

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
TASKS = LRA_TASKS + ("imagenet", "wikitext103")
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
EVAL_SPLITS = ("val", "test")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# DeiT's input normalisation (the ImageNet statistics).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataUnavailableError(FileNotFoundError):
    """The configured data source cannot be read (yet); the message says what to do."""


# ----------------------------------------------------------------------------- models


def _plain(value: Any) -> Any:
    """ConfigDict/list values as plain Python (lists become tuples, for frozen dataclasses)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _model_classes(task: str) -> tuple[type, type]:
    if task in LRA_TASKS:
        return ClassifierConfig, HGRNClassifier
    if task == "imagenet":
        return ImageConfig, HGRNImageClassifier
    if task == "wikitext103":
        return LMConfig, HGRNLM
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def model_config(config) -> Any:
    """The model dataclass (``ClassifierConfig`` / ``ImageConfig`` / ``LMConfig``) of a config."""
    config_cls, _ = _model_classes(config.task)
    fields = _plain(config.model)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model.{unknown[0]} is not a field of {config_cls.__name__}; "
                         f"valid fields: {', '.join(sorted(known))}")
    return config_cls(**fields)


def activation_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown config.dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(config, rngs: nnx.Rngs) -> nnx.Module:
    """The model of ``config`` (activations in ``config.dtype``, float32 parameters)."""
    _, model_cls = _model_classes(config.task)
    return model_cls(model_config(config), dtype=activation_dtype(config.dtype),
                     param_dtype=jnp.float32, rngs=rngs)


def _mode(model: nnx.Module, train: bool) -> nnx.Module:
    """A view of ``model`` with dropout and BatchNorm statistics set for training or eval."""
    return nnx.view(model, deterministic=not train, use_running_average=not train,
                    raise_if_not_found=False)


# ----------------------------------------------------------------------------- losses


def classification_loss(logits: jax.Array, labels: jax.Array, weight: jax.Array,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of logits (B, K) against labels (B,), and metric sums.

    With label smoothing s the target is ``(1 - s) * one_hot + s / K``. ``correct`` counts
    weighted rows whose arg-max is the label.
    """
    logits = logits.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    per_row = -jnp.sum(targets * log_probs, axis=-1)
    loss_sum = jnp.sum(per_row * weight)
    weight_sum = jnp.sum(weight)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight)
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
    return loss, {"loss_sum": loss_sum, "weight": weight_sum, "correct": correct}


def next_token_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean next-token cross-entropy; logits (B, T, V), targets (B, T), weight (B, T).

    ``weight`` in the sums counts tokens; perplexity = exp(loss_sum / weight).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weight = weight.astype(jnp.float32)
    loss_sum = jnp.sum(nll * weight)
    weight_sum = jnp.sum(weight)
    return loss_sum / jnp.maximum(weight_sum, 1.0), {"loss_sum": loss_sum, "weight": weight_sum}


# ----------------------------------------------------------------------------- base task


class Task:
    """Batches, model and loss of one experiment (see the module docstring)."""

    metric = "accuracy"
    sources: tuple[str, ...] = ("synthetic",)

    def __init__(self, config):
        self.config = config
        self.name: str = config.task
        self._examples: dict[str, dict[str, np.ndarray]] = {}
        source = config.data.source
        if source not in self.sources:
            raise ValueError(f"data.source {source!r} is not available for task {self.name!r}; "
                             f"choose one of {', '.join(self.sources)}")
        self._check_source()

    # -- what subclasses provide

    def _check_source(self) -> None:
        """Raise :class:`DataUnavailableError` early when the configured data cannot be read."""

    def _load(self, split: str) -> dict[str, np.ndarray]:
        """All examples of a split: arrays with a common leading dimension N."""
        raise NotImplementedError

    def _batch(self, examples: dict[str, np.ndarray], rows: np.ndarray) -> Batch:
        """The model-ready batch of the examples at ``rows``."""
        raise NotImplementedError

    def _forward(self, model: nnx.Module, batch: dict) -> jax.Array:
        raise NotImplementedError

    # -- the interface

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.config, rngs)

    def examples(self, split: str) -> dict[str, np.ndarray]:
        """The (cached) examples of ``split`` in ``train | val | test``."""
        if split not in SPLIT_INDEX:
            raise ValueError(f"unknown split {split!r}; use train, val or test")
        if split not in self._examples:
            self._examples[split] = self._load(split)
        return self._examples[split]

    def num_examples(self, split: str) -> int:
        return len(next(iter(self.examples(split).values())))

    def steps_per_epoch(self) -> int:
        return self.num_examples("train") // self.config.batch_size

    def train_batches(self, start_step: int, process_index: int = 0, process_count: int = 1
                      ) -> Iterator[Batch]:
        """Process-local training batches for steps start_step, start_step + 1, ... (endless)."""
        batch_size = self.config.batch_size
        loader.process_slice(batch_size, process_index, process_count)  # fail before loading
        examples = self.examples("train")
        n = self.num_examples("train")
        if n < batch_size:
            raise ValueError(f"the {self.name} training split has {n} examples, fewer than "
                             f"batch_size {batch_size}; lower --config.batch_size")
        for step in itertools.count(start_step):
            rows = loader.train_rows(self.config.seed, step, n, batch_size, process_index,
                                     process_count)
            batch = self._batch(examples, rows)
            batch["weight"] = np.ones(len(rows), np.float32)
            yield batch

    def eval_batches(self, split: str, process_index: int = 0, process_count: int = 1
                     ) -> Iterator[Batch]:
        """Process-local batches covering ``split`` once; padding rows have weight 0."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"unknown evaluation split {split!r}; use 'val' or 'test'")
        batch_size = self.config.eval_batch_size or self.config.batch_size
        loader.process_slice(batch_size, process_index, process_count, "eval_batch_size")
        examples = self.examples(split)
        n = self.num_examples(split)
        for rows, valid in loader.eval_rows(n, batch_size, process_index, process_count,
                                            "eval_batch_size"):
            batch = self._batch(examples, rows)
            batch["weight"] = valid.astype(np.float32)
            yield batch

    def loss_fn(self, model: nnx.Module, batch: dict, *, train: bool
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = self._forward(_mode(model, train), batch)
        return classification_loss(logits, batch["labels"], batch["weight"],
                                   self.config.get("label_smoothing", 0.0))

    # -- helpers

    def _split_seed(self, split: str) -> tuple[int, int]:
        return (int(self.config.data.generator_seed), SPLIT_INDEX[split])

    def _split_size(self, split: str) -> int:
        return int(self.config.data[f"{split}_examples"])

    def _unavailable(self, what: str) -> DataUnavailableError:
        return DataUnavailableError(
            f"task {self.name!r} with data.source={self.config.data.source!r} needs {what}; "
            "its reader is in hgrn_jax.training.real_data. Or run the generated stand-in with "
            "--config.data.source=synthetic (or the :tiny preset).")


def check_vocab_size(config, size: int, what: str) -> None:
    """Token ids of the data run up to ``size - 1``: the embedding needs that many rows."""
    if size > config.model.vocab_size:
        raise ValueError(f"config.model.vocab_size {config.model.vocab_size} is smaller than "
                         f"{what} vocabulary ({size} ids); set --config.model.vocab_size={size}")


def _token_batch(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = ids.astype(np.int32)
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    return ids, mask


# ----------------------------------------------------------------------------- LRA tasks


class TokenClassificationTask(Task):
    """ListOps and Text: token ids (B, L) with a padding mask, one label per sequence."""

    def __init__(self, config):
        self.sources = ("release", "generated") if config.task == "listops" else ("tfds",
                                                                                   "synthetic")
        super().__init__(config)

    def _check_source(self) -> None:
        data = self.config.data
        if self.name == "listops" and data.source == "release" and not data.lra_dir:
            raise DataUnavailableError(
                "ListOps with data.source='release' reads basic_{train,val,test}.tsv from the LRA "
                "release: set --config.data.lra_dir=FOLDER (lra_release/listops-1000 or its "
                "parent), or generate a set of the same specification with "
                "--config.data.source=generated")
        if self.name == "text" and data.source == "tfds":
            raise self._unavailable("the IMDB reviews (tfds 'imdb_reviews' in data.tfds_dir)")

    def _load(self, split: str) -> dict[str, np.ndarray]:
        data = self.config.data
        if self.name == "listops":
            if data.source == "release":
                folder = listops.find_release_file(data.lra_dir, split)
            else:
                spec = listops.ListOpsSpec(
                    min_length=data.min_length, max_length=data.max_length,
                    max_depth=data.max_depth, max_args=data.max_args,
                    num_train=data.train_examples, num_val=data.val_examples,
                    num_test=data.test_examples)
                folder = listops.ensure_generated(data.cache_dir, spec, int(data.generator_seed))
            folder = folder if folder.is_dir() else folder.parent
            tokenizer = listops.fit_file(folder / listops.split_filename("train"), data.seq_len)
            check_vocab_size(self.config, tokenizer.vocab_size, "the ListOps training file's")
            encoded = listops.load_split(folder, split, data.seq_len, tokenizer)
            encoded["inputs"] = encoded["inputs"].astype(tokenizer.vocabulary.dtype)
            return encoded
        docs, lengths, labels = synthetic.keyword_documents(
            self._split_size(split), max_bytes=data.seq_len, seed=self._split_seed(split))
        check_vocab_size(self.config, 256, "the generated documents' byte")
        return {"inputs": docs, "lengths": lengths, "labels": labels}

    def _batch(self, examples, rows):
        ids, mask = _token_batch(examples["inputs"][rows], examples["lengths"][rows])
        return {"inputs": ids, "mask": mask, "labels": examples["labels"][rows]}

    def _forward(self, model, batch):
        return model(batch["inputs"], batch["mask"])


class RetrievalTask(Task):
    """Retrieval: two documents per example, a binary label (do they match)."""

    sources = ("release", "synthetic")

    def _check_source(self) -> None:
        if self.config.data.source == "release":
            raise self._unavailable("the AAN pairs (tsv_data/new_aan_pairs.*.tsv in data.lra_dir)")

    def _load(self, split):
        data = self.config.data
        docs1, docs2, labels = synthetic.pattern_pair_documents(
            self._split_size(split), length=data.seq_len, seed=self._split_seed(split))
        check_vocab_size(self.config, 256, "the generated documents' byte")
        n, length = docs1.shape
        lengths = np.full(n, length, np.int32)
        return {"inputs": docs1, "lengths": lengths, "inputs2": docs2, "lengths2": lengths,
                "labels": labels}

    def _batch(self, examples, rows):
        ids, mask = _token_batch(examples["inputs"][rows], examples["lengths"][rows])
        ids2, mask2 = _token_batch(examples["inputs2"][rows], examples["lengths2"][rows])
        return {"inputs": ids, "mask": mask, "inputs2": ids2, "mask2": mask2,
                "labels": examples["labels"][rows]}

    def _forward(self, model, batch):
        return model(batch["inputs"], batch["mask"], batch["inputs2"], batch["mask2"])


class PixelTask(Task):
    """Image, Pathfinder, Path-X: pixels in raster order (B, H * W, C) scaled to [-1, 1]."""

    def __init__(self, config):
        self.sources = ("tfds", "synthetic") if config.task == "image" else ("release",
                                                                             "synthetic")
        super().__init__(config)
        size = config.data.image_size
        if tuple(config.model.grid_shape) != (size, size):
            raise ValueError(f"config.model.grid_shape {tuple(config.model.grid_shape)} must be "
                             f"(data.image_size, data.image_size) = ({size}, {size})")

    def _check_source(self) -> None:
        source = self.config.data.source
        if self.name == "image" and source == "tfds":
            raise self._unavailable("CIFAR-10 (tfds 'cifar10' in data.tfds_dir)")
        if source == "release":
            folder = "pathfinder32" if self.name == "pathfinder" else "pathfinder128"
            raise self._unavailable(f"the LRA release's {folder} images (in data.lra_dir)")

    def _load(self, split):
        data, model = self.config.data, self.config.model
        n, seed = self._split_size(split), self._split_seed(split)
        if self.name == "image":
            images, labels = synthetic.bright_quadrant_images(
                n, size=data.image_size, channels=model.input_channels, seed=seed)
        else:
            images, labels = synthetic.path_images(n, size=data.image_size,
                                                   path_length=data.path_length, seed=seed)
            if model.input_channels != 1:
                raise ValueError("Pathfinder images are grey: set config.model.input_channels=1")
        return {"pixels": np.round(images * 255).astype(np.uint8), "labels": labels}

    def _batch(self, examples, rows):
        pixels = examples["pixels"][rows]
        b, h, w, c = pixels.shape
        inputs = pixels.reshape(b, h * w, c).astype(np.float32) / 127.5 - 1.0
        return {"inputs": inputs, "labels": examples["labels"][rows]}

    def _forward(self, model, batch):
        return model(batch["inputs"])


# ----------------------------------------------------------------------------- ImageNet, LM


class ImageNetTask(Task):
    """ImageNet-1k classification: images (B, H, W, 3) normalised with the ImageNet statistics."""

    sources = ("tfds", "synthetic")

    def _check_source(self) -> None:
        if self.config.data.source == "tfds":
            raise self._unavailable("ImageNet-1k (tfds 'imagenet2012' in data.tfds_dir, built "
                                    "from the tar files in data.manual_dir)")

    def _load(self, split):
        data, model = self.config.data, self.config.model
        images, labels = synthetic.colour_images(
            self._split_size(split), size=data.image_size, num_classes=model.num_classes,
            seed=self._split_seed(split))
        return {"pixels": np.round(images * 255).astype(np.uint8), "labels": labels}

    def _batch(self, examples, rows):
        images = examples["pixels"][rows].astype(np.float32) / 255.0
        return {"images": (images - IMAGENET_MEAN) / IMAGENET_STD,
                "labels": examples["labels"][rows]}

    def _forward(self, model, batch):
        return model(batch["images"])


class LanguageModelTask(Task):
    """Next-token prediction on consecutive windows of ``seq_len + 1`` tokens ("ids")."""

    metric = "perplexity"
    sources = ("release", "synthetic")

    def _check_source(self) -> None:
        if self.config.data.source == "release":
            raise self._unavailable("WikiText-103 (wiki.*.tokens in data.wikitext_dir) and the "
                                    "GPT-2 BPE files (data.tokenizer_path)")

    def _load(self, split):
        data = self.config.data
        size = data.train_bytes if split == "train" else data.eval_bytes
        corpus = synthetic.arithmetic_corpus(int(size), seed=self._split_seed(split))
        if corpus.max() >= self.config.model.vocab_size:
            raise ValueError(f"config.model.vocab_size {self.config.model.vocab_size} is too "
                             "small for a byte corpus; use 256")
        t = int(data.seq_len)
        num = (len(corpus) - 1) // t
        if num < 1:
            raise ValueError(f"the {split} corpus ({len(corpus)} tokens) is shorter than "
                             f"data.seq_len + 1 = {t + 1}")
        windows = np.lib.stride_tricks.sliding_window_view(corpus, t + 1)[::t][:num]
        return {"ids": np.ascontiguousarray(windows)}

    def _batch(self, examples, rows):
        return {"ids": examples["ids"][rows].astype(np.int32)}

    def loss_fn(self, model, batch, *, train):
        ids = batch["ids"]
        logits = _mode(model, train)(ids[:, :-1])
        weight = jnp.broadcast_to(batch["weight"][:, None], ids[:, 1:].shape)
        return next_token_loss(logits, ids[:, 1:], weight)


_TASK_CLASSES = {
    "listops": TokenClassificationTask, "text": TokenClassificationTask,
    "retrieval": RetrievalTask, "image": PixelTask, "pathfinder": PixelTask, "pathx": PixelTask,
    "imagenet": ImageNetTask, "wikitext103": LanguageModelTask,
}


def get_task(config) -> Task:
    """The :class:`Task` of ``config.task``; errors name the config key to fix."""
    if config.task not in _TASK_CLASSES:
        raise ValueError(f"unknown config.task {config.task!r}; choose one of {', '.join(TASKS)}")
    from hgrn_jax.training import real_data  # the real datasets' readers

    return (real_data.task_class(config) or _TASK_CLASSES[config.task])(config)

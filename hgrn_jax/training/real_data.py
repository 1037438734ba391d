"""Tasks on the real datasets: the readers of :mod:`hgrn_jax.data` behind the Task API.

:func:`task_class` picks, from ``config.task`` and ``config.data.source``, a subclass of the task
in :mod:`hgrn_jax.training.tasks` whose data come from the LRA release, tfds or WikiText-103
instead of the generated stand-ins; batches, order, resumption and metrics stay the base task's.
Sources: ListOps ``release`` (nested release folders, bad rows counted), Text ``tfds`` (IMDB),
Retrieval ``release`` (AAN), Image ``tfds`` (CIFAR-10, crop + flip), Pathfinder / Path-X
``release``, ImageNet ``tfds`` (DeiT augmentations), WikiText-103 ``release``.
``data.skip_bad_rows`` (default False) lets a run skip malformed rows instead of failing.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from hgrn_jax.data import loader
from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.training import tasks as base

Batch = dict[str, np.ndarray]


def _skip(config) -> bool:
    return bool(config.data.get("skip_bad_rows", False))


@contextlib.contextmanager
def _missing_is_unavailable():
    """A missing dataset at task creation: the tasks' error, naming the stand-in as well."""
    try:
        yield
    except DatasetMissingError as error:
        raise base.DataUnavailableError(
            f"{error} (or train on the generated stand-in with --config.data.source=synthetic)"
        ) from error


class ListOpsReleaseTask(base.TokenClassificationTask):
    """ListOps from the release, found in nested folders; bad rows reported (or skipped)."""

    # _check_source: the base task's (data.lra_dir must be set); files are looked up on load.

    def _load(self, split):
        from hgrn_jax.data import listops_release

        data = self.config.data
        options = dict(lra_dir=data.lra_dir, seq_len=data.seq_len,
                       skip_bad_rows=_skip(self.config), cache_dir=data.cache_dir)
        vocab = listops_release.vocabulary(**options)
        base.check_vocab_size(self.config, len(vocab), "the ListOps training file's")
        return listops_release.load_split(split, **options)


class ImdbTask(base.TokenClassificationTask):
    """LRA Text on IMDB reviews (tfds ``imdb_reviews``): character ids, 4,096 per review."""

    def _check_source(self) -> None:
        from hgrn_jax.data import text, tfds_io

        with _missing_is_unavailable():
            tfds_io.iterate(text.NAME, "train", self.config.data.tfds_dir)

    def _load(self, split):
        from hgrn_jax.data import text

        data = self.config.data
        options = dict(tfds_dir=data.tfds_dir, cache_dir=data.cache_dir, seq_len=data.seq_len,
                       skip_bad_rows=_skip(self.config))
        vocab = text.vocabulary(**options)
        base.check_vocab_size(self.config, len(vocab), "the IMDB training reviews' character")
        return text.load_split(split, **options)


class AanTask(base.RetrievalTask):
    """LRA Retrieval on the AAN pairs of the release: character ids, 4,000 per document."""

    def _check_source(self) -> None:
        from hgrn_jax.data import retrieval

        with _missing_is_unavailable():
            for split in ("train", "val", "test"):
                retrieval.find_file(self.config.data.lra_dir, split)

    def _load(self, split):
        from hgrn_jax.data import retrieval

        data = self.config.data
        options = dict(lra_dir=data.lra_dir, cache_dir=data.cache_dir, seq_len=data.seq_len,
                       skip_bad_rows=_skip(self.config))
        vocab = retrieval.vocabulary(**options)
        base.check_vocab_size(self.config, len(vocab), "the AAN training documents' character")
        return retrieval.load_split(split, **options)


class PathfinderTask(base.PixelTask):
    """Pathfinder (32 x 32) / Path-X (128 x 128) PNGs of the release; ``x / 127.5 - 1``."""

    @property
    def resolution(self) -> int:
        return 32 if self.name == "pathfinder" else 128

    def _check_source(self) -> None:
        from hgrn_jax.data import pathfinder

        self._check_image_config()
        with _missing_is_unavailable():
            pathfinder.find_root(self.config.data.lra_dir, self.resolution)

    def _check_image_config(self) -> None:
        if self.config.data.image_size != self.resolution:
            raise ValueError(f"data.image_size must be {self.resolution} for the release's "
                             f"{self.name} images; got {self.config.data.image_size}")
        if self.config.model.input_channels != 1:
            raise ValueError("Pathfinder images are grey: set config.model.input_channels=1")

    def _load(self, split):
        from hgrn_jax.data import pathfinder

        data = self.config.data
        return pathfinder.load_split(split, lra_dir=data.lra_dir, cache_dir=data.cache_dir,
                                     resolution=self.resolution,
                                     skip_bad_rows=_skip(self.config))


class CifarTask(base.PixelTask):
    """LRA Image on CIFAR-10: RGB (or grey) normalised pixels, crop + flip when training."""

    def _check_source(self) -> None:
        from hgrn_jax.data import cifar, tfds_io

        channels = 1 if self.grayscale else 3
        if self.config.model.input_channels != channels:
            raise ValueError(f"data.grayscale={self.grayscale} gives {channels} channel(s): set "
                             f"config.model.input_channels={channels}")
        if self.config.data.image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32 x 32: set data.image_size=32 (got "
                             f"{self.config.data.image_size})")
        with _missing_is_unavailable():
            tfds_io.iterate(cifar.NAME, "train", self.config.data.tfds_dir)

    @property
    def grayscale(self) -> bool:
        return bool(self.config.data.get("grayscale", False))

    def _load(self, split):
        from hgrn_jax.data import cifar

        data = self.config.data
        return cifar.load_split(split, tfds_dir=data.tfds_dir, cache_dir=data.cache_dir,
                                skip_bad_rows=_skip(self.config))

    def _batch(self, examples, rows):
        from hgrn_jax.data import cifar

        return {"inputs": cifar.normalise(examples["pixels"][rows], self.grayscale),
                "labels": np.asarray(examples["labels"][rows])}

    def train_batches(self, start_step: int, process_index: int = 0, process_count: int = 1
                      ) -> Iterator[Batch]:
        from hgrn_jax.data import cifar

        seed, size = self.config.seed, self.config.batch_size
        local = loader.process_slice(size, process_index, process_count)
        examples = self.examples("train")
        n = self.num_examples("train")
        for step in itertools.count(start_step):
            rows = loader.train_rows(seed, step, n, size, process_index, process_count)
            pixels = np.asarray(examples["pixels"][rows])
            if self.config.data.get("augment", True):
                params = cifar.crop_flip_params(loader.batch_rng(seed, step), size)
                pixels = cifar.crop_flip(pixels, *(p[local] for p in params))
            yield {"inputs": cifar.normalise(pixels, self.grayscale),
                   "labels": np.asarray(examples["labels"][rows]),
                   "weight": np.ones(len(rows), np.float32)}


class ImageNetTfdsTask(base.ImageNetTask):
    """ImageNet-1k from tfds's array_record source: DeiT's training pipeline, centre-crop eval.

    ``data.workers`` > 0 builds training batches of upcoming steps in that many worker processes
    (each opens the data source itself; a batch is a pure function of its step, so the result
    is the same as in-process); 0 works in this process on a thread pool; -1 = one worker per CPU.
    """

    def _check_source(self) -> None:
        if self.config.model.num_classes != 1000:
            raise ValueError("ImageNet-1k has 1000 classes: set config.model.num_classes=1000 "
                             f"(got {self.config.model.num_classes})")
        with _missing_is_unavailable():
            self._source("train", reopen=True)

    def _source(self, split: str, reopen: bool = False):
        from hgrn_jax.data import imagenet

        return imagenet.open_source(split, self.config.data.tfds_dir, reopen=reopen)

    def _spec(self, process_index: int = 0, process_count: int = 1):
        from hgrn_jax.data import imagenet

        c = self.config
        aug = c.data.augment
        return imagenet.BatchSpec(
            tfds_dir=c.data.tfds_dir, image_size=int(c.data.image_size), seed=int(c.seed),
            batch_size=int(c.batch_size), process_index=process_index,
            process_count=process_count, num_classes=int(c.model.num_classes),
            mixup=float(aug.mixup), cutmix=float(aug.cutmix),
            switch_prob=float(aug.mixup_switch_prob), label_smoothing=float(c.label_smoothing),
            random_erasing=float(aug.random_erasing), randaugment=str(aug.randaugment or ""),
            skip_bad_rows=_skip(c),
            mixup_group_size=int(aug.get("mixup_group_size", imagenet.MIXUP_GROUP_SIZE)))

    def _threads(self) -> ThreadPoolExecutor:
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="imagenet")
        return self._pool

    def _load(self, split):
        return {"index": np.arange(len(self._source(split)))}

    def _batch(self, examples, rows):  # evaluation batches (val / test)
        from hgrn_jax.data import imagenet

        return imagenet.eval_batch(self._spec(), self._eval_split, rows, self._threads())

    def eval_batches(self, split, process_index=0, process_count=1):
        self._eval_split = split
        for batch in super().eval_batches(split, process_index, process_count):
            batch["weight"] = batch["weight"] * batch.pop("readable")
            yield batch

    def train_batches(self, start_step: int, process_index: int = 0, process_count: int = 1
                      ) -> Iterator[Batch]:
        from hgrn_jax.data import imagenet

        spec = self._spec(process_index, process_count)
        loader.process_slice(spec.batch_size, process_index, process_count)  # validates
        n = self.num_examples("train")
        workers = int(self.config.data.get("workers", 0))
        workers = os.cpu_count() or 1 if workers < 0 else workers
        if workers == 0:
            for step in itertools.count(start_step):
                yield imagenet.train_batch(spec, n, step, self._threads())
            return
        context = multiprocessing.get_context("spawn")  # never fork a process running JAX
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            steps = itertools.count(start_step)
            pending = collections.deque()
            while True:
                while len(pending) < 2 * workers:
                    pending.append(pool.submit(imagenet.train_batch, spec, n, next(steps)))
                yield pending.popleft().result()

    def loss_fn(self, model, batch, *, train):
        if "targets" not in batch:
            return super().loss_fn(model, batch, train=train)
        logits = self._forward(base._mode(model, train), batch).astype(jnp.float32)
        weight = batch["weight"].astype(jnp.float32)
        per_row = -jnp.sum(batch["targets"] * jax.nn.log_softmax(logits), axis=-1)
        loss_sum = jnp.sum(per_row * weight)
        weight_sum = jnp.sum(weight)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weight)
        return loss_sum / jnp.maximum(weight_sum, 1.0), {"loss_sum": loss_sum,
                                                         "weight": weight_sum,
                                                         "correct": correct}


class WikiTextTask(base.LanguageModelTask):
    """WikiText-103 in blocks of ``seq_len + 1`` tokens (GPT-2 BPE or bytes)."""

    def _check_source(self) -> None:
        from hgrn_jax.data import wikitext

        data = self.config.data
        with _missing_is_unavailable():
            for split in ("train", "val", "test"):
                wikitext.find_file(data.wikitext_dir, split)
            tokenizer = wikitext.LineTokenizer(data.tokenizer_path)
        if tokenizer.vocab_size > self.config.model.vocab_size:
            raise ValueError(f"config.model.vocab_size {self.config.model.vocab_size} is smaller "
                             f"than the tokenizer's vocabulary ({tokenizer.vocab_size}); set "
                             f"--config.model.vocab_size={tokenizer.vocab_size} or larger")

    def _load(self, split):
        from hgrn_jax.data import wikitext

        data = self.config.data
        tokens, _ = wikitext.load_tokens(split, wikitext_dir=data.wikitext_dir,
                                         tokenizer_path=data.tokenizer_path,
                                         cache_dir=data.cache_dir)
        return {"ids": wikitext.blocks(tokens, int(data.seq_len))}


_REAL = {
    ("listops", "release"): ListOpsReleaseTask,
    ("text", "tfds"): ImdbTask,
    ("retrieval", "release"): AanTask,
    ("image", "tfds"): CifarTask,
    ("pathfinder", "release"): PathfinderTask,
    ("pathx", "release"): PathfinderTask,
    ("imagenet", "tfds"): ImageNetTfdsTask,
    ("wikitext103", "release"): WikiTextTask,
}


def task_class(config) -> type[base.Task] | None:
    """The real-data task of ``(config.task, config.data.source)``, or None (not real data).

    Release datasets prepared as tfds data in ``data.tfds_dir`` are read from there
    (:mod:`hgrn_jax.training.real_data_tfds`)."""
    from hgrn_jax.training import real_data_tfds

    return (real_data_tfds.prepared_task_class(config)
            or _REAL.get((config.task, config.data.source)))

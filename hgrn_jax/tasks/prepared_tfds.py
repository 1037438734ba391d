"""Datasets prepared once as tfds data: how a release is prepared and read (:class:`TfdsRelease`),
the mixin of a source reading it (:class:`PreparedTfds`), and the ``release`` source that reads
the prepared data when they exist and the release files otherwise (:class:`ReleaseOrPrepared`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.tasks.array_task import ArrayTask
from hgrn_jax.tasks.settings import check_vocab_size, skip_bad_rows


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
        """The command preparing ``config``'s dataset: the paper config's file with the flags
        of the run's folders and of the settings that pick the prepared variant."""
        if self.manual_dir_key == "wikitext_dir":
            folder = (
                f"--config.data.wikitext_dir=WIKI_DIR --config.data.tokenizer_path="
                f"{config.data.tokenizer_path or 'TOKENIZER'}"
            )
        else:
            folder = "--config.data.lra_dir=LRA_DIR"
        # The settings that pick the prepared variant, as the run has them (its preset's
        # sequence length, say), so that the command prepares the variant the run reads.
        variant = [
            f"--config.data.{key}={value}"
            for key, value in self.options(config).items()
            if key in config.data and key != "tokenizer_path"
        ]
        if skip_bad_rows(config):
            variant.append("--config.data.skip_bad_rows=True")
        return " ".join(
            [
                f"python -m experiments.prepare --config={self.config_file} {folder}",
                *variant,
                f"--config.data.tfds_dir={config.data.tfds_dir or 'TFDS_DIR'}",
            ]
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
            **{k: v for k, v in options.items() if k == "wikitext_release"},
        )
        from hgrn_jax.data.loader import naming_the_cache_dir

        with naming_the_cache_dir(config.data.tfds_dir, "tfds_dir"):
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

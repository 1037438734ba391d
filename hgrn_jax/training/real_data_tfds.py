"""Tasks reading the LRA release and WikiText-103 from prepared tfds data (``data.tfds_dir``).

With ``data.source="release"``, ListOps, Retrieval, Pathfinder, Path-X and WikiText-103 read
the tfds datasets of :mod:`hgrn_jax.data.tfds_builders` when they are prepared in
``data.tfds_dir`` (``python -m hgrn_jax.data.prepare ... --config.data.tfds_dir=DIR``), and the
release files through the ``.npy`` caches of ``data.cache_dir`` otherwise (see
:func:`prepared_task_class`). The tasks here differ from the release tasks only in ``_load``:
columns whose ``column[rows]`` reads just those records, so each process reads only its rows;
batches, order, resumption and metrics are the base tasks'.
"""

from __future__ import annotations

import logging

from hgrn_jax.training import real_data
from hgrn_jax.training import tasks as base


class _PreparedTfds:
    """Mixin: examples come from the prepared tfds dataset of the config, checked at creation
    (present; the model's vocabulary holds the prepared ids)."""

    config: object
    _examples: dict

    def _check_source(self) -> None:
        from hgrn_jax.data import tfds_builders

        with real_data._missing_is_unavailable():
            self._examples["train"] = self._load("train")
        vocab_size = tfds_builders.metadata(self.config).get("vocab_size")
        if vocab_size is not None:
            base.check_vocab_size(self.config, int(vocab_size), "the prepared data's")

    def _load(self, split):
        from hgrn_jax.data import tfds_builders

        return tfds_builders.open_split(self.config, split)


class ListOpsTfdsTask(_PreparedTfds, base.TokenClassificationTask):
    """ListOps from tfds ``lra_listops`` (the release's TSVs, tokenised when prepared)."""


class AanTfdsTask(_PreparedTfds, base.RetrievalTask):
    """Retrieval from tfds ``lra_retrieval`` (the AAN pairs as character ids)."""


class PathfinderTfdsTask(_PreparedTfds, real_data.PathfinderTask):
    """Pathfinder / Path-X from tfds ``lra_pathfinder`` (``res32`` / ``res128``)."""

    def _check_source(self) -> None:
        self._check_image_config()
        super()._check_source()


class WikiTextTfdsTask(_PreparedTfds, base.LanguageModelTask):
    """WikiText-103 blocks from tfds ``wikitext103`` (``{gpt2,bytes}_block<seq_len>``)."""


_PREPARED = {"listops": ListOpsTfdsTask, "retrieval": AanTfdsTask,
             "pathfinder": PathfinderTfdsTask, "pathx": PathfinderTfdsTask,
             "wikitext103": WikiTextTfdsTask}


def prepared_task_class(config) -> type[base.Task] | None:
    """The tfds task of a ``release`` config, or None to read the release files instead.

    Prepared tfds data in ``data.tfds_dir`` win; without them the release files are read
    (``.npy`` caches) when their folder is set; with neither, the tfds task, whose error names
    the layout and the prepare command. An empty ``data.tfds_dir`` always means the release
    files.
    """
    if config.data.source != "release" or config.task not in _PREPARED:
        return None
    if not config.data.tfds_dir:
        return None
    from hgrn_jax.data import tfds_builders

    source_dir = tfds_builders.manual_dir(config)
    if tfds_builders.is_prepared(config) or not source_dir:
        return _PREPARED[config.task]
    logging.info("%s: no prepared tfds data in data.tfds_dir=%s; reading the release files in %s",
                 config.task, config.data.tfds_dir, source_dir)
    return None

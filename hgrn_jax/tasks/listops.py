"""LRA ListOps: nested list operations as token ids, 10 classes.

=============  ====================================================================  ==========
source         data                                                                  reads
=============  ====================================================================  ==========
``release``    ``listops-1000/basic_{train,val,test}.tsv`` of the LRA release        ``lra_dir``
               (prepared tfds data when in ``data.tfds_dir``)                        ``tfds_dir``
``prepared``   the tfds dataset ``lra_listops`` prepared from the release            ``tfds_dir``
``generated``  a set of the release's specification, generated into ``cache_dir``   (none)
=============  ====================================================================  ==========

Every source is read by :func:`hgrn_jax.data.listops_release.load_split` (generated sets are
written in the release's layout), tokenised as the reference does; ``model.vocab_size`` 0 takes
the training file's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from hgrn_jax.data import listops as listops_data
from hgrn_jax.data import listops_release
from hgrn_jax.data.errors import DatasetMissingError
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import TokenTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.prepared_tfds import PreparedTfds, ReleaseOrPrepared, TfdsRelease
from hgrn_jax.tasks.settings import check_vocab_size, skip_bad_rows


class ListOpsTask(TokenTask):
    """ListOps read from a folder in the release's layout."""

    model_kind = models.CLASSIFIER
    stand_in = "generated"
    num_classes = listops_data.NUM_CLASSES

    def _folder(self) -> str:
        raise NotImplementedError

    def _options(self) -> dict:
        data = self.config.data
        return dict(
            lra_dir=self._folder(),
            seq_len=data.seq_len,
            skip_bad_rows=skip_bad_rows(self.config),
            cache_dir=self._cache_dir(),
        )

    def _cache_dir(self) -> str:
        return str(self.config.data.cache_dir)

    def _load(self, split):
        options = self._options()
        vocab = listops_release.vocabulary(**options)
        check_vocab_size(self.config, len(vocab), "the ListOps training file's")
        return listops_release.load_split(split, **options)


class ListOpsRelease(ListOpsTask):
    """The LRA release's files (found in nested folders; bad rows reported or skipped)."""

    reads = frozenset({"lra_dir", "tfds_dir"})

    def _folder(self) -> str:
        return str(self.config.data.lra_dir)

    def _check_source(self) -> None:
        if not self.config.data.lra_dir:
            raise DatasetMissingError(
                "ListOps with data.source='release' reads basic_{train,val,test}.tsv from the "
                "LRA release: set --config.data.lra_dir=FOLDER (lra_release/listops-1000 or its "
                "parent), or generate a set of the same specification with "
                "--config.data.source=generated"
            )
        # All three, so that a missing test file stops before the training file is tokenised
        # (25-40 s of the real one), not after.
        for split in ("train", "val", "test"):
            listops_release.find_file(str(self.config.data.lra_dir), split)


class ListOpsGenerated(ListOpsTask):
    """A generated set of the ``data`` specification, written once into ``data.cache_dir``;
    its tokenised arrays are prepared there too on first use, so later runs and resumptions
    open the full set in about a second instead of re-reading and tokenising 96k sequences
    (25-40 s)."""

    def _folder(self) -> str:
        data = self.config.data
        spec = listops_data.ListOpsSpec(
            min_length=data.min_length,
            max_length=data.max_length,
            max_depth=data.max_depth,
            max_args=data.max_args,
            num_train=data.train_examples,
            num_val=data.val_examples,
            num_test=data.test_examples,
        )
        return str(
            Path(listops_data.ensure_generated(data.cache_dir, spec, int(data.generator_seed)))
        )


TFDS = TfdsRelease(
    "listops",
    "lra_dir",
    lambda config: {"seq_len": int(config.data.seq_len)},
    "experiments/configs/lra/listops.py",
)


class ListOpsPrepared(PreparedTfds, ListOpsTask):
    """The tfds dataset ``lra_listops`` (the release's TSVs, tokenised when prepared)."""

    tfds_release = TFDS
    reads = frozenset({"tfds_dir", "lra_dir"})


DATASET = Dataset(
    "listops",
    models.CLASSIFIER,
    sources={
        "release": ReleaseOrPrepared(ListOpsRelease, ListOpsPrepared),
        "prepared": ListOpsPrepared,
        "generated": ListOpsGenerated,
    },
    tfds=TFDS,
)

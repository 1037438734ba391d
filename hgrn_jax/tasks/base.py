"""The names a dataset module imports, kept importable from here for task modules written
against this module (it once held them all). Each lives in a module of one purpose:

- :mod:`hgrn_jax.tasks.array_task`: :class:`ArrayTask` and its batch layouts
  :class:`TokenTask`, :class:`PairTask` and :class:`PixelTask`;
- :mod:`hgrn_jax.tasks.dataset_entry`: :class:`Dataset`, the registry's entry;
- :mod:`hgrn_jax.tasks.prepared_tfds`: :class:`TfdsRelease`, :class:`PreparedTfds` and
  :class:`ReleaseOrPrepared`;
- :mod:`hgrn_jax.tasks.model_settings`: :class:`ModelKind` and :func:`mode`;
- :mod:`hgrn_jax.tasks.settings`: :func:`settle`, :func:`check_vocab_size` and
  :func:`skip_bad_rows`.

New code imports them from those modules (docs/tasks.md).
"""

from hgrn_jax.tasks.array_task import ArrayTask, PairTask, PixelTask, TokenTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.model_settings import ModelKind, mode
from hgrn_jax.tasks.prepared_tfds import PreparedTfds, ReleaseOrPrepared, TfdsRelease
from hgrn_jax.tasks.settings import check_vocab_size, settle, skip_bad_rows

__all__ = [
    "ArrayTask",
    "Dataset",
    "ModelKind",
    "PairTask",
    "PixelTask",
    "PreparedTfds",
    "ReleaseOrPrepared",
    "TfdsRelease",
    "TokenTask",
    "check_vocab_size",
    "mode",
    "settle",
    "skip_bad_rows",
]

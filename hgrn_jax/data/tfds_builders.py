"""tfds builders for the LRA release (ListOps, Retrieval, Pathfinder / Path-X) and WikiText-103.

Each builder reads a manual folder (the LRA release or WikiText-103), runs the same readers as
the ``.npy`` path (:func:`listops_release.load_split`, :func:`retrieval.load_split`,
:func:`pathfinder.load_split`, :func:`wikitext.load_tokens` + :func:`wikitext.blocks`, so there is
one tokenisation), and writes fixed-shape examples in tfds's ``array_record`` format into a tfds
data folder: pod hosts read their own rows by index (``as_data_source``) and never re-tokenise or
re-decode. The functions take explicit arguments (dataset, folders, shape settings); the
experiment runner's ``python -m experiments.prepare`` maps a training config onto them.

Datasets (``<tfds_dir>/<name>/<config>/<version>/``), splits ``train`` / ``validation`` / ``test``
(the tasks' train / val / test), in the order of the source files:

=================  ==========================  ===================================================
name               configs                     features
=================  ==========================  ===================================================
``lra_listops``    ``len<seq_len>``            ``inputs`` (L,) uint16, ``lengths`` (), ``labels`` 10
``lra_retrieval``  ``len<seq_len>``            ``inputs``, ``inputs2`` (L,) uint16, ``lengths``,
                                               ``lengths2`` (), ``labels`` 2 classes
``lra_pathfinder`` ``res32``, ``res128``       ``pixels`` (R, R, 1) uint8, ``labels`` 2 classes
``wikitext103``    ``{gpt2,bytes}_block<L>``   ``ids`` (L + 1,) uint16, ``num_targets`` ():
                   (``_tokens``: the tokens    blocks with stride L (train), every token scored
                   release)                    once (validation, test: :func:`wikitext.eval_blocks`)
=================  ==========================  ===================================================

The metadata (``metadata.json``) records the vocabulary the ids were encoded with (ListOps,
Retrieval: built from the training split; WikiText: the tokenizer's size, end-of-line id and
files' SHA-256), and the sizes of the source files (``source_files``: the split files;
Pathfinder: the metadata files), which a later prepare compares. A config prepared with
``data.skip_bad_rows=True`` carries the suffix ``_skipbad`` (bad rows are reported, then left
out), so it is only read by runs that skip bad rows too. Lengths are int32, labels are tfds
``ClassLabel`` (read back as int32, like the ``.npy`` path's arrays); token ids are uint16 (the
``.npy`` path's uint8 or uint16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from hgrn_jax.data import listops, listops_release, loader, pathfinder, retrieval, wikitext
from hgrn_jax.data.errors import DatasetMissingError

TFDS_SPLITS = {"train": "train", "val": "validation", "test": "test"}
VERSION = "1.0.0"
RELEASE_NOTES = {VERSION: "First release: the readers of hgrn_jax.data, fixed-shape arrays."}
LRA_LAYOUT = """\
Unpack lra_release.gz (google-research/long-range-arena, "Dataset Setup") and pass the folder as \
the manual folder (data.lra_dir; the lra_release/ level may be doubled or absent):
  lra_release/listops-1000/basic_{train,val,test}.tsv
  lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv
  lra_release/pathfinder32/curv_contour_length_14/{imgs,metadata}
  lra_release/pathfinder128/curv_contour_length_14/{imgs,metadata}
"""
WIKITEXT_LAYOUT = """\
Unpack wikitext-103-raw-v1.zip and pass the folder holding wiki.{train,valid,test}.raw (or its \
parent with wikitext-103-raw/) as the manual folder (data.wikitext_dir; with \
data.wikitext_release=tokens: wiki.*.tokens of wikitext-103-v1.zip, or wikitext-103/); the GPT-2 \
BPE tokenizer is a local file (data.tokenizer_path: tokenizer.json, or a folder with encoder.json \
+ vocab.bpe or vocab.json + merges.txt), or `bytes`.
"""
WIKITEXT_VERSION = "1.1.0"


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """A builder config: what shapes the prepared arrays (its name says the same)."""

    seq_len: int = 0  # ListOps / Retrieval: ids per document; WikiText: block
    resolution: int = 0  # Pathfinder: 32 or 128
    tokenizer: str = ""  # WikiText: "gpt2" or "bytes"
    release: str = wikitext.DEFAULT_RELEASE  # WikiText: data.wikitext_release
    skip_bad_rows: bool = False


def _named(prefix: str, skip_bad_rows: bool, **fields) -> SourceConfig:
    name = prefix + ("_skipbad" if skip_bad_rows else "")
    return SourceConfig(name=name, skip_bad_rows=skip_bad_rows, **fields)


def _ids(shape: tuple[int, ...], dtype=np.uint16) -> tfds.features.Tensor:
    """A fixed-shape integer array stored as raw bytes (compact; no varint lists). Token ids
    are uint16: the vocabularies are built from the data when preparing, after the features are
    declared, and stay below 65,536 (checked when writing)."""
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


def _scalar() -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(), dtype=np.int32)


def _rows(
    arrays: dict[str, np.ndarray], features: tfds.features.FeaturesDict
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index, example) of every row of same-length arrays, in order, in the features' dtypes
    (a value that does not fit its feature's dtype is an error, never wrapped around)."""
    dtypes = {key: np.dtype(features[key].np_dtype) for key in arrays}
    for key, value in arrays.items():
        if np.can_cast(value.dtype, dtypes[key]) or not len(value):
            continue
        kind = np.iinfo(dtypes[key])
        if np.min(value) < kind.min or np.max(value) > kind.max:
            raise ValueError(
                f"{key} values {np.min(value)}..{np.max(value)} do not fit the "
                f"builder's {dtypes[key]} feature"
            )
    for i in range(len(next(iter(arrays.values())))):
        yield (
            i,
            {
                key: np.asarray(value[i]).astype(dtypes[key], copy=False)
                for key, value in arrays.items()
            },
        )


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared by the builders: versions, no shuffling (source order), a scratch folder for the
    readers' ``.npy`` caches during preparation (removed afterwards)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = RELEASE_NOTES
    MANUAL_DOWNLOAD_INSTRUCTIONS = LRA_LAYOUT
    _scratch: Path | None = None
    tokenizer_path: str = ""  # WikiText's tokenizer; read when preparing only

    def _dataset_info(
        self, features: dict[str, Any], description: str, homepage: str
    ) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(features),
            homepage=homepage,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def download_and_prepare(self, *args, **kwargs) -> None:
        root = Path(self.data_dir_root)
        root.mkdir(parents=True, exist_ok=True)
        _warn_leftovers(self, root)
        with (
            tempfile.TemporaryDirectory(dir=root, prefix=f".{self.name}-scratch-") as scratch,
            loader.cache_shown_as(root, "tfds_dir"),
        ):
            self._scratch = Path(scratch)
            try:
                super().download_and_prepare(*args, **kwargs)
            finally:
                self._scratch = None

    def _split_generators(self, dl_manager):
        manual = str(dl_manager.manual_dir)
        return {name: self._generate_examples(manual, split) for split, name in TFDS_SPLITS.items()}

    def _load(self, manual_dir: str, split: str) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def sources(self, manual_dir: str, split: str) -> list[Path]:
        """The files of the manual folder that ``split`` is read from (their sizes go into the
        metadata, ``source_files``, so a later prepare notices other files)."""
        raise NotImplementedError

    def _generate_examples(self, manual_dir: str, split: str):
        recorded = dict(self.info.metadata.get("source_files") or {})
        recorded.update(source_sizes(self.sources(manual_dir, split)))
        self.info.metadata["source_files"] = recorded
        yield from _rows(self._load(manual_dir, split), self.info.features)


def _warn_leftovers(b: _SourceBuilder, root: Path) -> None:
    """Warn about folders an interrupted preparation of ``b`` left (our scratch folders, tfds's
    ``incomplete.*``): they are never read, nor removed here, as another preparation may be
    using them."""
    config_dir = Path(str(b.data_path)).parent
    left = sorted(root.glob(f".{b.name}-scratch-*")) + sorted(config_dir.glob("incomplete.*"))
    if left:
        logging.warning(
            "%s: left by an interrupted preparation (unused; remove them unless another "
            "preparation is running): %s",
            b.name,
            ", ".join(map(str, left)),
        )


class LraListops(_SourceBuilder):
    """LRA ListOps from ``listops-1000/basic_*.tsv``, tokenised as the reference."""

    BUILDER_CONFIGS = [_named("len2048", False, seq_len=2048)]

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.seq_len
        return self._dataset_info(
            {
                "inputs": _ids((length,)),
                "lengths": _scalar(),
                "labels": tfds.features.ClassLabel(num_classes=listops.NUM_CLASSES),
            },
            "LRA ListOps: token ids (end token included, 0 = padding), lengths, labels 0-9.",
            "https://github.com/google-research/long-range-arena",
        )

    def sources(self, manual_dir, split):
        return [listops_release.find_file(manual_dir, split)]

    def _load(self, manual_dir, split):
        c = self.builder_config
        self.info.metadata.update(
            vocabulary_metadata(
                listops_release.vocabulary(
                    lra_dir=manual_dir, seq_len=c.seq_len, skip_bad_rows=c.skip_bad_rows
                )
            )
        )
        return listops_release.load_split(
            split, lra_dir=manual_dir, seq_len=c.seq_len, skip_bad_rows=c.skip_bad_rows
        )


class LraRetrieval(_SourceBuilder):
    """LRA Retrieval: AAN pairs from ``tsv_data/new_aan_pairs.*.tsv`` as character ids."""

    BUILDER_CONFIGS = [_named("len4000", False, seq_len=4000)]

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.seq_len
        return self._dataset_info(
            {
                "inputs": _ids((length,)),
                "lengths": _scalar(),
                "inputs2": _ids((length,)),
                "lengths2": _scalar(),
                "labels": tfds.features.ClassLabel(num_classes=retrieval.NUM_CLASSES),
            },
            "LRA Retrieval (AAN): two documents of character ids per example, lengths, label 0/1.",
            "https://github.com/google-research/long-range-arena",
        )

    def sources(self, manual_dir, split):
        return [retrieval.find_file(manual_dir, split)]

    def _load(self, manual_dir, split):
        c = self.builder_config
        self.info.metadata.update(
            vocabulary_metadata(
                retrieval.vocabulary(
                    lra_dir=manual_dir,
                    cache_dir=str(self._scratch),
                    seq_len=c.seq_len,
                    skip_bad_rows=c.skip_bad_rows,
                )
            )
        )
        return retrieval.load_split(
            split,
            lra_dir=manual_dir,
            cache_dir=str(self._scratch),
            seq_len=c.seq_len,
            skip_bad_rows=c.skip_bad_rows,
        )


class LraPathfinder(_SourceBuilder):
    """LRA Pathfinder (``res32``) and Path-X (``res128``): grey PNGs, 80/10/10 split, seed 42."""

    BUILDER_CONFIGS = [_named(f"res{r}", False, resolution=r) for r in (32, 128)]

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return self._dataset_info(
            {
                "pixels": _ids((r, r, 1), np.uint8),
                "labels": tfds.features.ClassLabel(num_classes=pathfinder.NUM_CLASSES),
            },
            "LRA Pathfinder / Path-X (curv_contour_length_14): grey pixels, label 0/1.",
            "https://github.com/google-research/long-range-arena",
        )

    def sources(self, manual_dir, split):
        root = pathfinder.find_root(manual_dir, self.builder_config.resolution)
        return sorted((root / "metadata").glob("*.npy"))  # the images: too many to stat

    def _load(self, manual_dir, split):
        c = self.builder_config
        return pathfinder.load_split(
            split,
            lra_dir=manual_dir,
            cache_dir=str(self._scratch),
            resolution=c.resolution,
            skip_bad_rows=c.skip_bad_rows,
        )


class Wikitext103(_SourceBuilder):
    """WikiText-103 (GPT-2 BPE or bytes): training blocks of ``seq_len + 1`` tokens with stride
    ``seq_len``, evaluation blocks scoring every token once (:func:`wikitext.eval_blocks`), each
    with its ``num_targets``; the tokenizer's vocabulary size, end-of-line id and file hashes
    are in the metadata. Version 1.0.0 (blocks without ``num_targets``, the evaluation splits'
    first token and tail unscored) is not read: a folder of it is not prepared data."""

    VERSION = tfds.core.Version(WIKITEXT_VERSION)
    RELEASE_NOTES = {
        **RELEASE_NOTES,
        WIKITEXT_VERSION: "num_targets; validation and test blocks score every token once.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = WIKITEXT_LAYOUT
    BUILDER_CONFIGS = [
        _named(f"{t}_block512", False, seq_len=512, tokenizer=t) for t in ("gpt2", "bytes")
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self._dataset_info(
            {"ids": _ids((self.builder_config.seq_len + 1,), np.uint16), "num_targets": _scalar()},
            "WikiText-103: each line stripped, tokenised and closed by an end-of-line token; "
            "the train split's token stream cut into blocks of seq_len + 1 with stride seq_len, "
            "the validation and test splits' into blocks whose num_targets targets cover each "
            "token once (the first block's input starts with the end-of-line token).",
            "https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-"
            "language-modeling-dataset/",
        )

    def sources(self, manual_dir, split):
        return [wikitext.find_file(manual_dir, split, self.builder_config.release)]

    def _load(self, manual_dir, split):
        c = self.builder_config
        tokens, tokenizer = wikitext.load_tokens(
            split,
            wikitext_dir=manual_dir,
            tokenizer_path=self.tokenizer_path,
            cache_dir=str(self._scratch),
            release=c.release,
        )
        if tokenizer.dtype != np.uint16:
            raise ValueError(
                f"the tokenizer at {self.tokenizer_path} has {tokenizer.vocab_size} "
                "ids, more than the uint16 blocks of this builder hold"
            )
        self.info.metadata.update(tokenizer_metadata(tokenizer))
        if split == "train":
            ids = wikitext.blocks(tokens, c.seq_len)
            return {"ids": ids, "num_targets": np.full(len(ids), c.seq_len, np.int32)}
        return wikitext.eval_blocks(tokens, c.seq_len, tokenizer.eos_id)


BUILDERS: dict[str, type[_SourceBuilder]] = {
    "listops": LraListops,
    "retrieval": LraRetrieval,
    "pathfinder": LraPathfinder,
    "wikitext103": Wikitext103,
}
"""The datasets with a builder (Pathfinder's ``res128`` config is Path-X)."""


def vocabulary_metadata(vocabulary) -> dict[str, Any]:
    """The vocabulary the ids were encoded with (built from the training split): its size and
    tokens, so hosts reading the prepared data need no release file to check or decode ids."""
    return {"vocab_size": len(vocabulary), "vocabulary": list(vocabulary.tokens)}


def tokenizer_metadata(tokenizer: wikitext.LineTokenizer) -> dict[str, Any]:
    """What identifies a WikiText tokenizer: vocabulary, end-of-line id, files' SHA-256."""
    return {
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": int(tokenizer.eos_id),
        "tokenizer_files": _file_hashes(tokenizer.files),
    }


def _file_hashes(files: list[Path]) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def source_sizes(files: list[Path]) -> dict[str, int]:
    """``{file name: size in bytes}`` (sizes, not times: a copied release keeps its sizes)."""
    return {p.name: p.stat().st_size for p in files}


def check_sources_unchanged(b: _SourceBuilder, manual_dir: str) -> None:
    """Raise ValueError when ``b``'s prepared dataset was built from files of other sizes or
    names than those now in ``manual_dir`` (data prepared before the sizes were recorded are
    not checked)."""
    recorded = dict(metadata(b).get("source_files") or {})
    if not recorded:
        return
    current: dict[str, int] = {}
    for split in TFDS_SPLITS:
        current.update(source_sizes(b.sources(manual_dir, split)))
    if current == recorded:
        return
    changed = sorted(set(current) ^ set(recorded)) or sorted(
        name for name in current if current[name] != recorded[name]
    )
    name = changed[0]
    then = f"{recorded[name]} bytes" if name in recorded else "absent"
    now = f"{current[name]} bytes" if name in current else "absent"
    raise ValueError(
        f"{b.name}/{b.builder_config.name} in data.tfds_dir={b.data_dir_root} was prepared from "
        f"other files than those in {manual_dir} ({name}: {then} then, {now} now): remove "
        f"{b.data_path} to prepare it again, or prepare into another --config.data.tfds_dir"
    )


def check_tokenizer(b: _SourceBuilder) -> None:
    """Raise ValueError when prepared WikiText-103 blocks were encoded by another tokenizer than
    the files at ``b.tokenizer_path`` (their SHA-256 against the metadata's): the config names
    (``gpt2_block<L>``) do not tell two BPE tokenizers apart. Not checked for ``bytes``, nor
    where ``tokenizer_path`` holds no tokenizer files (pod hosts reading the data need none)."""
    if not isinstance(b, Wikitext103) or b.tokenizer_path in ("", wikitext.BYTES):
        return
    try:
        files = wikitext.tokenizer_files(b.tokenizer_path)
    except DatasetMissingError:
        return
    prepared = dict(metadata(b).get("tokenizer_files") or {})
    current = _file_hashes(files)
    if prepared and prepared != current:

        def show(hashes: dict[str, str]) -> str:
            return ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in hashes.items())

        raise ValueError(
            f"{b.name}/{b.builder_config.name} in data.tfds_dir={b.data_dir_root} was prepared "
            f"with another tokenizer ({show(prepared)}) than data.tokenizer_path="
            f"{b.tokenizer_path} ({show(current)}): point --config.data.tokenizer_path at the "
            "tokenizer it was prepared with, or prepare into another --config.data.tfds_dir"
        )


# ----------------------------------------------------------------------------- configs


def _known(dataset: str) -> type[_SourceBuilder]:
    if dataset not in BUILDERS:
        raise ValueError(f"no tfds builder for {dataset!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[dataset]


def source_config(
    dataset: str,
    *,
    seq_len: int = 0,
    resolution: int = 0,
    tokenizer_path: str = "",
    wikitext_release: str = wikitext.DEFAULT_RELEASE,
    skip_bad_rows: bool = False,
) -> SourceConfig:
    """The builder config of ``dataset`` for these settings: ``seq_len`` (ListOps, Retrieval:
    ids per document; WikiText-103: block length), ``resolution`` (Pathfinder: 32 or 128),
    ``tokenizer_path`` (WikiText-103: ``bytes`` or GPT-2 BPE files), ``wikitext_release``
    (WikiText-103: ``raw``, or ``tokens``, whose configs end in ``_tokens``)."""
    if dataset in ("listops", "retrieval"):
        wanted = _named(f"len{int(seq_len)}", skip_bad_rows, seq_len=int(seq_len))
    elif dataset == "pathfinder":
        wanted = _named(f"res{int(resolution)}", skip_bad_rows, resolution=int(resolution))
    else:
        kind = wikitext.BYTES if tokenizer_path == wikitext.BYTES else "gpt2"
        wikitext.release_of(wikitext_release)
        suffix = "" if wikitext_release == wikitext.DEFAULT_RELEASE else f"_{wikitext_release}"
        wanted = _named(
            f"{kind}_block{int(seq_len)}{suffix}",
            skip_bad_rows,
            seq_len=int(seq_len),
            tokenizer=kind,
            release=wikitext_release,
        )
    for known in _known(dataset).BUILDER_CONFIGS:
        if known.name == wanted.name:  # tfds refuses a second config object of a known name
            return known
    return wanted


class _CustomConfigFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config():
    """Drop tfds's warning for configs named after the data settings (``len12`` ...): every
    such config is custom by design, and the warning would repeat at each open."""
    absl_logger, quiet = logging.getLogger("absl"), _CustomConfigFilter()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def layout(dataset: str) -> str:
    """What the manual folder of ``dataset`` must hold."""
    return _known(dataset).MANUAL_DOWNLOAD_INSTRUCTIONS


def builder(
    dataset: str, tfds_dir: str, config: SourceConfig, *, tokenizer_path: str = ""
) -> _SourceBuilder:
    """The builder of ``dataset`` with ``config`` in ``tfds_dir`` (array_record format);
    ``tokenizer_path`` is read when preparing WikiText-103 only."""
    with _quiet_custom_config():
        b = _known(dataset)(config=config, data_dir=tfds_dir, file_format="array_record")
    b.tokenizer_path = str(tokenizer_path)
    return b


def check_sources(
    dataset: str,
    manual_dir: str,
    *,
    resolution: int = 0,
    tokenizer_path: str = "",
    wikitext_release: str = wikitext.DEFAULT_RELEASE,
) -> None:
    """Raise :class:`DatasetMissingError` (layout included) before tfds starts when the manual
    folder lacks a split's file."""
    try:
        if dataset == "wikitext103":
            wikitext.find_files(manual_dir, wikitext_release)
            wikitext.LineTokenizer(tokenizer_path)
        elif dataset == "listops":
            for split in TFDS_SPLITS:
                listops_release.find_file(manual_dir, split)
        elif dataset == "retrieval":
            for split in TFDS_SPLITS:
                retrieval.find_file(manual_dir, split)
        else:
            pathfinder.find_root(manual_dir, resolution)
    except DatasetMissingError as error:
        raise DatasetMissingError(f"{error}\n{layout(dataset)}") from error


def prepare(b: _SourceBuilder, manual_dir: str) -> _SourceBuilder:
    """Build ``b``'s dataset from ``manual_dir`` (once: a prepared dataset is reused).

    A version folder that exists without tfds's finished files (``dataset_info.json``,
    ``features.json``: an interrupted copy, say) is an error, never reused nor removed (tfds
    would take any existing folder as prepared); so are a dataset prepared from other source
    files (:func:`check_sources_unchanged`) and a WikiText dataset prepared with another
    tokenizer (:func:`check_tokenizer`)."""
    folder = Path(str(b.data_path))
    if folder.exists() and not b.is_prepared():
        raise DatasetMissingError(
            f"{folder} exists but holds no finished tfds dataset (no dataset_info.json or "
            "features.json: an interrupted copy?); remove that folder, or prepare into another "
            "--config.data.tfds_dir, and run the prepare command again"
        )
    if b.is_prepared():
        check_sources_unchanged(b, manual_dir)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    check_tokenizer(b)
    return b


# ----------------------------------------------------------------------------- reading


class RecordColumns:
    """Random access to the records of a prepared split, shared by its :class:`Column` s.

    Reading ``rows`` fetches exactly those records (one process reads only its shard) and keeps
    them until other rows are asked for, so the columns of one batch read each record once.
    """

    def __init__(self, source, dtypes: dict[str, np.dtype]):
        self.source = source
        self.dtypes = dtypes
        self._rows: tuple[int, ...] | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{key: (len(rows), ...) array}`` of the records at ``rows``."""
        key = tuple(int(r) for r in rows)
        if key != self._rows:
            records = self.source.__getitems__(list(key)) if key else []
            self._arrays = {
                name: (
                    np.stack([np.asarray(r[name]) for r in records]).astype(dtype, copy=False)
                    if records
                    else np.zeros(0, dtype)
                )
                for name, dtype in self.dtypes.items()
            }
            self._rows = key
        return self._arrays


class Column:
    """One feature of a prepared split as an array-like: ``len``, ``column[rows]``,
    ``np.asarray(column)`` (every row)."""

    def __init__(self, records: RecordColumns, name: str):
        self.records, self.name = records, name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            return self.records.read(np.arange(len(self))[rows])[self.name]
        rows_array = np.asarray(rows)
        if rows_array.ndim == 0:
            return self.records.read(rows_array[None])[self.name][0]
        return self.records.read(rows_array)[self.name]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)


def open_split(b: _SourceBuilder, split: str) -> dict[str, Column]:
    """The prepared ``split`` (train | val | test) of ``b`` as columns keyed like the ``.npy``
    path's arrays (same dtypes). Raises :class:`DatasetMissingError` saying what is missing."""
    where = f"{b.name}/{b.builder_config.name} in {b.data_dir_root}"
    if not b.is_prepared():
        raise DatasetMissingError(
            f"no prepared tfds dataset {b.name}/{b.builder_config.name} "
            f"in data.tfds_dir={b.data_dir_root}"
        )
    check_tokenizer(b)
    try:
        source = b.as_data_source(split=TFDS_SPLITS[split])
    except (AssertionError, FileNotFoundError, ValueError, NotImplementedError) as error:
        raise DatasetMissingError(
            f"{where} is not readable in the array_record format ({error})"
        ) from error
    dtypes = {
        name: np.dtype(np.int32 if feature.np_dtype == np.int64 else feature.np_dtype)
        for name, feature in b.info.features.items()
    }  # ClassLabel: int64 -> int32
    records = RecordColumns(source, dtypes)
    return {name: Column(records, name) for name in dtypes}


def metadata(b: _SourceBuilder) -> dict[str, Any]:
    """The prepared dataset's metadata: ``vocab_size`` (ListOps, Retrieval: and ``vocabulary``,
    the tokens by id; WikiText: and ``eos_id``, ``tokenizer_files``); empty for Pathfinder."""
    return dict(b.info.metadata or {})

"""LRA Text: IMDB reviews (tfds ``imdb_reviews``) as byte sequences, 2 classes.

As in LRA, the 25,000 test reviews serve both as validation and test set. Token ids are the
review's UTF-8 bytes (0 is padding), truncated to ``seq_len`` (4,096); the model's vocabulary is
256. Prepared once into ``cache_dir/imdb-<hash>/`` as fixed-shape arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgrn_jax.data import loader, tfds_io
from hgrn_jax.data.errors import BadDataReport

NAME = "imdb_reviews"
NUM_CLASSES = 2
TFDS_SPLITS = {"train": "train", "val": "test", "test": "test"}
KEYS = ("inputs", "lengths", "labels")


def _build(folder: Path, tfds_split: str, tfds_dir: str, seq_len: int, skip_bad_rows: bool
           ) -> None:
    raw = tfds_io.read_all(NAME, tfds_split, tfds_dir, ("text", "label"))
    labels = np.asarray(raw["label"], np.int64)
    report = BadDataReport(f"tfds {NAME} {tfds_split}")
    keep = tfds_io.check_labels(labels, NUM_CLASSES, NAME, tfds_split, report)
    for i, text in enumerate(raw["text"]):
        if not text.strip():
            report.add(f"tfds {NAME} {tfds_split} example {i}", 0, "empty review")
            keep[i] = False
    report.finish(skip_bad_rows)
    texts = [t for t, k in zip(raw["text"], keep) if k]
    ids, lengths = loader.encode_bytes(texts, seq_len)
    loader.save_arrays(folder, "data", {"inputs": ids, "lengths": lengths,
                                        "labels": labels[keep].astype(np.int32)})


def load_split(split: str, *, tfds_dir: str, cache_dir: str, seq_len: int,
               skip_bad_rows: bool = False) -> dict[str, np.ndarray]:
    """``inputs`` (N, seq_len) uint8 bytes, ``lengths`` (N,) int32, ``labels`` (N,) int32 in {0, 1}.

    ``split`` is train | val | test (val and test are both IMDB's test split).
    """
    tfds_split = TFDS_SPLITS[split]
    key = {"dataset": NAME, "split": tfds_split, "files": tfds_io.fingerprint(NAME, tfds_dir),
           "seq_len": seq_len, "skip_bad_rows": skip_bad_rows}
    folder = loader.prepared(cache_dir, "imdb", key, lambda f: _build(
        f, tfds_split, tfds_dir, seq_len, skip_bad_rows))
    return loader.load_arrays(folder, "data", KEYS)

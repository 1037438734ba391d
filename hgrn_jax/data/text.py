"""LRA Text: IMDB reviews (tfds ``imdb_reviews``) as characters, 2 classes.

As in LRA, the 25,000 test reviews serve both as validation and test set. Tokenisation is the
reference's (OpenNLPLab/lra ``src/dataloaders/datasets.py``, class ``IMDB``: ``level="char"``,
``min_freq=15``, ``append_eos=True``, ``l_max=4096``): a review is its list of characters
(Unicode code points), truncated to ``seq_len - 1``; the vocabulary holds ``<pad>``, ``<unk>``,
``<eos>`` and every character seen at least 15 times in the truncated *training* reviews, by
descending count (:mod:`hgrn_jax.data.vocab`); other characters read as ``<unk>``; ``<eos>`` ends
every review. The vocabulary is prepared once into ``cache_dir/imdb-vocab-<hash>/vocab.json``, each
split's ids into ``cache_dir/imdb-<hash>/`` (keyed on the vocabulary's fingerprint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgrn_jax.data import loader, tfds_io
from hgrn_jax.data import vocab as vocab_lib
from hgrn_jax.data.errors import BadDataReport
from hgrn_jax.data.vocab import Vocabulary

NAME = "imdb_reviews"
NUM_CLASSES = 2
MIN_FREQ = 15
TFDS_SPLITS = {"train": "train", "val": "test", "test": "test"}
KEYS = ("inputs", "lengths", "labels")


def read_split(tfds_split: str, tfds_dir: str, skip_bad_rows: bool) -> tuple[list[str], np.ndarray]:
    """The good reviews (decoded text) and their labels (int32) of a tfds split."""
    raw = tfds_io.read_all(NAME, tfds_split, tfds_dir, ("text", "label"))
    labels = np.asarray(raw["label"], np.int64)
    report = BadDataReport(f"tfds {NAME} {tfds_split}")
    keep = tfds_io.check_labels(labels, NUM_CLASSES, NAME, tfds_split, report)
    texts = []
    for i, text in enumerate(raw["text"]):
        where = f"tfds {NAME} {tfds_split} example {i}"
        try:
            text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        except UnicodeDecodeError as error:
            report.add(where, 0, f"not UTF-8 ({error})")
            keep[i] = False
            continue
        if not text.strip():
            report.add(where, 0, "empty review")
            keep[i] = False
        elif keep[i]:
            texts.append(text)
    report.finish(skip_bad_rows)
    return texts, labels[keep].astype(np.int32)


def _fingerprint(tfds_dir: str) -> list:
    return tfds_io.fingerprint(NAME, tfds_dir)


def vocabulary(
    *, tfds_dir: str, cache_dir: str, seq_len: int, skip_bad_rows: bool = False
) -> Vocabulary:
    """The character vocabulary of the training reviews encoded at ``seq_len``."""
    key = {
        "dataset": "imdb-vocab",
        "files": _fingerprint(tfds_dir),
        "seq_len": seq_len,
        "min_freq": MIN_FREQ,
        "skip_bad_rows": skip_bad_rows,
    }

    def build(folder: Path) -> None:
        texts, _ = read_split("train", tfds_dir, skip_bad_rows)
        vocab_lib.char_vocabulary(texts, seq_len, MIN_FREQ).save(folder / "vocab.json")

    return Vocabulary.load(loader.prepared(cache_dir, "imdb-vocab", key, build) / "vocab.json")


def load_split(
    split: str, *, tfds_dir: str, cache_dir: str, seq_len: int, skip_bad_rows: bool = False
) -> dict[str, np.ndarray]:
    """``inputs`` (N, seq_len) uint8 ids (``<eos>`` included), ``lengths`` (N,) int32,
    ``labels`` (N,) int32 in {0, 1}.

    ``split`` is train | val | test (val and test are both IMDB's test split).
    """
    vocab = vocabulary(
        tfds_dir=tfds_dir, cache_dir=cache_dir, seq_len=seq_len, skip_bad_rows=skip_bad_rows
    )
    tfds_split = TFDS_SPLITS[split]
    key = {
        "dataset": NAME,
        "split": tfds_split,
        "files": _fingerprint(tfds_dir),
        "seq_len": seq_len,
        "vocab": vocab.fingerprint,
        "skip_bad_rows": skip_bad_rows,
    }

    def build(folder: Path) -> None:
        texts, labels = read_split(tfds_split, tfds_dir, skip_bad_rows)
        ids, lengths = vocab_lib.encode_chars(texts, vocab, seq_len)
        loader.save_arrays(folder, "data", {"inputs": ids, "lengths": lengths, "labels": labels})
        vocab.save(folder / "vocab.json")

    folder = loader.prepared(cache_dir, "imdb", key, build)
    return loader.load_arrays(folder, "data", KEYS)

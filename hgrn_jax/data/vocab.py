"""Vocabularies built from a training split, as the S4-derived LRA code of the paper builds them.

The reference (OpenNLPLab/lra ``src/dataloaders/datasets.py``, classes ``ListOps``, ``IMDB`` and
``AAN``) tokenises every example, truncates it to ``l_max - 1`` tokens, counts the tokens of the
*truncated training* examples and builds a torchtext vocabulary
(``build_vocab_from_iterator(..., min_freq, specials=["<pad>", "<unk>", "<eos>"])``):

- ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<eos>`` (``append_bos=False``, ``append_eos=True``);
- then every token seen at least ``min_freq`` times, by descending count, equal counts in
  ascending (code point) order of the token string;
- any other token (val/test, or rarer than ``min_freq``) reads as ``<unk>``;
- an example is its first ``l_max - 1`` token ids followed by ``<eos>``, padded with ``<pad>``.

:class:`Vocabulary` is that mapping; :func:`pack` builds the fixed-shape rows; the ``char``
helpers do the same for character-level tasks (Text, Retrieval) on numpy code-point arrays.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from hgrn_jax.data import loader

SPECIALS = ("<pad>", "<unk>", "<eos>")
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
_CHUNK_CHARS = 1 << 24  # code points counted per np.bincount call


class _Index(dict):
    """token -> id; a missing token is ``<unk>``."""

    def __missing__(self, token: str) -> int:
        return UNK_ID


class Vocabulary:
    """An ordered token list (specials first) and its token -> id map."""

    def __init__(self, tokens: Sequence[str]):
        tokens = tuple(tokens)
        if tokens[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}; got {tokens[:3]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be distinct")
        self.tokens = tokens
        self.index = _Index((token, i) for i, token in enumerate(tokens))

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_freq: int = 1) -> Vocabulary:
        """The reference's order: specials, then tokens with count >= min_freq by (-count, token)."""
        kept = [
            (token, count)
            for token, count in counts.items()
            if count >= min_freq and token not in SPECIALS
        ]
        kept.sort(key=lambda item: (-item[1], item[0]))
        return cls(SPECIALS + tuple(token for token, _ in kept))

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, {self.fingerprint})"

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id (uint8 up to 256 tokens)."""
        return np.dtype(
            np.uint8 if len(self) <= 256 else np.uint16 if len(self) <= 65536 else np.int32
        )

    @property
    def fingerprint(self) -> str:
        """A hash of the token list: caches of encoded arrays are keyed on it."""
        text = json.dumps(self.tokens, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def ids(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids (len(tokens),) int32; unknown tokens are ``<unk>``."""
        return np.fromiter(map(self.index.__getitem__, tokens), np.int32, count=len(tokens))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps(
                {"tokens": list(self.tokens), "fingerprint": self.fingerprint},
                ensure_ascii=False,
                indent=0,
            ),
            encoding="utf-8",
        )

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """The vocabulary :meth:`save` wrote to ``path`` (a prepared folder's ``vocab.json``); a
        missing, cut or malformed file is a :class:`~hgrn_jax.data.errors.BadDataError` naming
        it and its folder to remove (other OSErrors, e.g. a forbidden file, name the file)."""
        path = Path(path)
        try:
            return cls(json.loads(path.read_text(encoding="utf-8"))["tokens"])
        except FileNotFoundError:
            raise loader.damaged(path, path.parent, "missing") from None
        except (ValueError, KeyError, TypeError) as error:  # cut JSON or UTF-8; no token list
            raise loader.damaged(path, path.parent, f"{type(error).__name__}: {error}") from None


def count_tokens(token_lists: Iterable[Sequence[str]], max_tokens: int) -> collections.Counter:
    """Counts of the first ``max_tokens`` tokens of every list (the reference truncates first)."""
    counts: collections.Counter = collections.Counter()
    for tokens in token_lists:
        counts.update(tokens[:max_tokens])
    return counts


def write_row(ids: np.ndarray, i: int, row: np.ndarray) -> int:
    """Row ``i`` of ``ids`` (.., seq_len) := the first seq_len - 1 ids of ``row``, ``<eos>`` and
    padding (the row must hold zeros); returns its length."""
    row = row[: ids.shape[1] - 1]
    ids[i, : len(row)] = row
    ids[i, len(row)] = EOS_ID
    return len(row) + 1


def pack(
    rows: Iterable[np.ndarray], num_rows: int, seq_len: int, dtype=np.int32
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> ids (num_rows, seq_len) and lengths (num_rows,) int32.

    Each row keeps its first ``seq_len - 1`` ids and ends with ``<eos>``; the rest is ``<pad>``
    (0), as the reference's collate pads.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (tokens and the end token); got {seq_len}")
    ids = np.zeros((num_rows, seq_len), dtype)
    lengths = np.zeros(num_rows, np.int32)
    count = 0
    for i, row in enumerate(rows):
        lengths[i] = write_row(ids, i, row)
        count += 1
    if count != num_rows:
        raise ValueError(f"expected {num_rows} rows; got {count}")
    return ids, lengths


# ----------------------------------------------------------------------------- characters


def code_points(text: str) -> np.ndarray:
    """The characters of ``text`` as code points (len(text),) uint32 (Python's ``list(text)``)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def count_chars(texts: Iterable[str], max_chars: int) -> dict[str, int]:
    """How often each character occurs in the first ``max_chars`` characters of the texts."""
    totals = np.zeros(0, np.int64)
    pending: list[np.ndarray] = []
    size = 0

    def flush() -> None:
        nonlocal totals, pending, size
        if not pending:
            return
        counts = np.bincount(np.concatenate(pending))
        if len(counts) > len(totals):
            totals = np.pad(totals, (0, len(counts) - len(totals)))
        totals[: len(counts)] += counts
        pending, size = [], 0

    for text in texts:
        points = code_points(text[:max_chars])
        pending.append(points)
        size += len(points)
        if size >= _CHUNK_CHARS:
            flush()
    flush()
    return {chr(int(c)): int(totals[c]) for c in np.flatnonzero(totals)}


class CharEncoder:
    """Text -> ids of a character vocabulary, by a lookup table over code points."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        chars = vocabulary.tokens[len(SPECIALS) :]
        if any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary holds single characters after its specials")
        points = np.array([ord(c) for c in chars], np.int64)
        self._table = np.full(int(points.max(initial=0)) + 2, UNK_ID, np.int32)
        self._table[points] = np.arange(len(SPECIALS), len(vocabulary), dtype=np.int32)

    def ids(self, text: str, max_chars: int | None = None) -> np.ndarray:
        """Ids (n,) int32 of the first ``max_chars`` characters (all when None)."""
        points = code_points(text if max_chars is None else text[:max_chars])
        return self._table[np.minimum(points, len(self._table) - 1)]


def char_vocabulary(texts: Iterable[str], seq_len: int, min_freq: int = 1) -> Vocabulary:
    """The reference's character vocabulary of training texts encoded at length ``seq_len``."""
    return Vocabulary.from_counts(count_chars(texts, seq_len - 1), min_freq)


def encode_chars(
    texts: Sequence[str], vocabulary: Vocabulary, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """ids (N, seq_len) in ``vocabulary.dtype`` (first seq_len - 1 characters, ``<eos>``,
    padding 0) and lengths (N,) int32."""
    encoder = CharEncoder(vocabulary)
    rows = (encoder.ids(text, seq_len - 1) for text in texts)
    return pack(rows, len(texts), seq_len, vocabulary.dtype)

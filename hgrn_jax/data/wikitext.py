"""WikiText-103 for language modelling: the release files, a local tokenizer, 512-token blocks.

Files (``data.wikitext_release``):
- ``raw`` (the default, the paper's): ``wiki.{train,valid,test}.raw`` in ``data.wikitext_dir`` (or
  its ``wikitext-103-raw/`` subfolder), as unpacked from ``wikitext-103-raw-v1.zip``, which the
  reference (``OpenNLPLab/HGRN`` README, "Preprocess the data") BPE-encodes;
- ``tokens``: ``wiki.{train,valid,test}.tokens`` (or ``wikitext-103/...``) of
  ``wikitext-103-v1.zip``, whose rare words are ``<unk>``: GPT-2's BPE splits it into easy
  pieces, so its perplexity is not comparable with the paper's (a warning says so).

Each line is stripped, tokenised, and closed by an end-of-line token (fairseq's preprocessing:
``multiprocessing_bpe_encoder --keep-empty`` strips every line, ``fairseq-preprocess`` closes
each, empty ones included, with ``</s>``); the whole split is one token stream of N tokens.
Training reads blocks of ``seq_len + 1`` tokens with stride ``seq_len`` (:func:`blocks`);
evaluation scores every token once, as fairseq's ``language_modeling`` task with
``--sample-break-mode none`` (:func:`eval_blocks`).

Tokenizers (``data.tokenizer_path``), never downloaded:
- a ``tokenizer.json`` file (or a folder holding one) loadable by the ``tokenizers`` package, e.g.
  GPT-2's; the end-of-line token is ``<|endoftext|>``;
- a folder with GPT-2's original BPE files ``encoder.json`` + ``vocab.bpe`` (fairseq's names) or
  ``vocab.json`` + ``merges.txt``;
- ``bytes``: UTF-8 bytes (vocabulary 256, no file), each line closed by ``\\n``.
An empty ``data.tokenizer_path`` (the default) names no tokenizer: it is an error, never the
current folder. A BPE tokenizer must be byte-level (GPT-2's): one that cannot encode some byte of
UTF-8 text (a vocabulary without GPT-2's 256 byte symbols drops such text without a word) is
refused as it loads (:func:`check_lossless`).
Token streams are prepared once into ``cache_dir/wikitext-<hash>/`` (the hash covers the text
file's path, size and time and the tokenizer's: a raw and a tokens stream never share one).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data import loader
from hgrn_jax.data.errors import BadDataError, DatasetMissingError


@dataclasses.dataclass(frozen=True)
class Release:
    """A WikiText-103 release: its split files, the folder its zip unpacks to, the zip."""

    suffix: str
    folder: str
    archive: str

    def file(self, split: str) -> str:
        return f"wiki.{SPLIT_NAMES[split]}.{self.suffix}"


SPLIT_NAMES = {"train": "train", "val": "valid", "test": "test"}
RAW_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip"
RELEASES = {
    "raw": Release("raw", "wikitext-103-raw", "wikitext-103-raw-v1.zip"),
    "tokens": Release("tokens", "wikitext-103", "wikitext-103-v1.zip"),
}
"""``data.wikitext_release`` -> its files: ``raw`` is the paper's."""
DEFAULT_RELEASE = "raw"
BYTES = "bytes"
EOS_TOKEN = "<|endoftext|>"
CHUNK_LINES = 20_000


class NotThePapersDataWarning(UserWarning):
    """The data differ from the paper's: its numbers are no yardstick for this run."""


def release_of(release: str) -> Release:
    """The :class:`Release` named by ``data.wikitext_release``; ValueError naming the key."""
    if release not in RELEASES:
        raise ValueError(
            f"data.wikitext_release={release!r} is no WikiText-103 release; use 'raw' "
            "(wikitext-103-raw-v1.zip, the paper's) or 'tokens' (wikitext-103-v1.zip, rare words "
            "as <unk>)"
        )
    return RELEASES[release]


def _candidates(base: Path, release: Release, split: str) -> list[Path]:
    name = release.file(split)
    return [base / name, base / release.folder / name]


def find_file(wikitext_dir: str, split: str, release: str = DEFAULT_RELEASE) -> Path:
    """The ``split`` file of ``release`` in ``wikitext_dir`` or its release subfolder;
    :class:`DatasetMissingError` naming what was looked for, and (for ``raw``) saying so when
    only the ``tokens`` release is there."""
    chosen = release_of(release)
    base = Path(wikitext_dir) if wikitext_dir else None
    tried = _candidates(base, chosen, split) if base else []
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(map(str, tried)) or "nowhere: data.wikitext_dir is empty"
    name = chosen.file(split)
    if base and release == "raw":
        found = [p for p in _candidates(base, RELEASES["tokens"], split) if p.is_file()]
        if found:
            raise DatasetMissingError(
                f"WikiText-103 {name} not found (looked for {looked}); {found[0]} is of the "
                "other release, wikitext-103-v1.zip, whose rare words are <unk> (which GPT-2's "
                "BPE splits into easy pieces), so its perplexity is not comparable with the "
                f"paper's, which BPE-encodes the raw release: unpack {RAW_URL} into "
                f"data.wikitext_dir={wikitext_dir}, or set "
                "--config.data.wikitext_release=tokens to read the .tokens files anyway"
            )
    files = ", ".join(chosen.file(s) for s in SPLIT_NAMES)
    raise DatasetMissingError(
        f"WikiText-103 {name} not found (looked for {looked}): unpack {chosen.archive} and set "
        f"--config.data.wikitext_dir=FOLDER to the folder holding {files}"
    )


def find_files(wikitext_dir: str, release: str = DEFAULT_RELEASE) -> dict[str, Path]:
    """Every split's file (:func:`find_file`), warning (:class:`NotThePapersDataWarning`) when
    ``release`` is ``tokens``: the check to run once, as a run or a preparation starts."""
    files = {split: find_file(wikitext_dir, split, release) for split in SPLIT_NAMES}
    if release != DEFAULT_RELEASE:
        warnings.warn(
            f"data.wikitext_release={release!r}: reading {files['train'].parent}/wiki.*.tokens "
            "of wikitext-103-v1.zip, whose rare words are <unk>; the perplexity is not "
            "comparable with the paper's (24.14 / 24.82, on the raw release "
            "wikitext-103-raw-v1.zip: --config.data.wikitext_release=raw)",
            NotThePapersDataWarning,
            stacklevel=2,
        )
    return files


_POINT_AT_A_TOKENIZER = (
    "point it at GPT-2's tokenizer.json (loadable by the `tokenizers` package), at a folder "
    "with GPT-2's encoder.json + vocab.bpe or vocab.json + merges.txt, or use "
    "--config.data.tokenizer_path=bytes for the byte-level tokenizer (vocabulary 256)"
)


def tokenizer_files(tokenizer_path: str) -> list[Path]:
    """The GPT-2 BPE files at ``tokenizer_path`` (a file, or a folder with one of the known
    sets); :class:`DatasetMissingError` when there are none, or when ``tokenizer_path`` is
    empty (the config's default: no tokenizer, not the current folder, which ``Path("")`` is)."""
    if not tokenizer_path:
        raise DatasetMissingError(
            f"no tokenizer: data.tokenizer_path is empty (its default); {_POINT_AT_A_TOKENIZER}"
        )
    path = Path(tokenizer_path)
    if path.is_file():
        return [path]
    sets = (("tokenizer.json",), ("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
    if path.is_dir():
        for names in sets:
            if all((path / n).is_file() for n in names):
                return [path / n for n in names]
        for names in sets:  # half a set: name what is missing
            present = [n for n in names if (path / n).exists()]
            if present:
                missing = [n for n in names if not (path / n).is_file()]
                raise DatasetMissingError(
                    f"data.tokenizer_path={tokenizer_path!r} holds {' and '.join(present)} but "
                    f"no file {' and '.join(missing)} (GPT-2's tokenizer is "
                    f"{' + '.join(names)}); put {' and '.join(missing)} there (from the same "
                    "download), or point data.tokenizer_path at GPT-2's tokenizer.json"
                )
    raise DatasetMissingError(
        f"no tokenizer at data.tokenizer_path={tokenizer_path!r}: {_POINT_AT_A_TOKENIZER}"
    )


def _byte_probes() -> list[tuple[int, str]]:
    """``(byte, character)`` for every byte that UTF-8 text can hold (all but 0xC0, 0xC1 and
    0xF5-0xFF): the character's UTF-8 encoding holds the byte (ASCII: the byte itself;
    0x80-0xBF: U+0080-U+00BF, ``C2 xx``; a lead byte: the first character it starts)."""
    probes = []
    for byte in range(256):
        if byte < 0xC0:
            char = chr(byte)
        elif 0xC2 <= byte <= 0xDF:
            char = chr((byte & 0x1F) << 6)
        elif 0xE0 <= byte <= 0xEF:
            char = chr(max((byte & 0x0F) << 12, 0x800))
        elif 0xF0 <= byte <= 0xF4:
            char = chr(max((byte & 0x07) << 18, 0x10000))
        else:
            continue
        assert byte in char.encode("utf-8"), (byte, char)
        probes.append((byte, char))
    return probes


BYTE_PROBES = _byte_probes()
"""One character for each of the 243 bytes of UTF-8 text (:func:`check_lossless`)."""


def check_lossless(
    encode: Callable[[list[str]], list[list[int]]],
    decode: Callable[[list[int]], str],
    tokenizer_path: str,
    files: list[Path],
) -> None:
    """:class:`BadDataError` naming the files unless every character of :data:`BYTE_PROBES`
    comes back from ``decode(encode(...))``: a BPE vocabulary without GPT-2's byte-level
    symbols (say ``{"h": 0, "<|endoftext|>": 1}``) encoded ``hello world`` as ``h`` alone, and
    such a tokenizer trained on mostly dropped text without a word."""
    chars = [char for _, char in BYTE_PROBES]
    lost = [
        (byte, char, back)
        for (byte, char), ids in zip(BYTE_PROBES, encode(chars), strict=True)
        if (back := decode(list(ids))) != char
    ]
    if not lost:
        return
    shown = sorted(lost, key=lambda x: (not (x[1].isascii() and x[1].isalnum()), x[0]))[:3]
    examples = ", ".join(f"{char!r} (byte 0x{byte:02X}) -> {back!r}" for byte, char, back in shown)
    raise BadDataError(
        f"data.tokenizer_path={tokenizer_path!r}: {' + '.join(map(str, files))} loses text: "
        f"{len(lost)} of the {len(chars)} characters probing each byte of UTF-8 text do not come "
        f"back from encode + decode (e.g. {examples}), so the text holding them would be "
        "dropped; WikiText-103 needs a byte-level BPE (GPT-2's, whose vocabulary holds all 256 "
        f"byte symbols): {_POINT_AT_A_TOKENIZER}"
    )


class LineTokenizer:
    """Lines of text -> one token stream, each line closed by the end-of-line id."""

    def __init__(self, tokenizer_path: str):
        self.path = tokenizer_path
        if tokenizer_path == BYTES:
            self.files: list[Path] = []
            self.vocab_size, self.eos_id = 256, ord("\n")
            self._encode: Callable[[list[str]], list[list[int]]] = lambda lines: [
                list(line.encode("utf-8")) for line in lines
            ]
            self._decode: Callable[[list[int]], str] = lambda ids: bytes(ids).decode(
                "utf-8", errors="replace"
            )
            return
        self.files = tokenizer_files(tokenizer_path)
        from tokenizers import ByteLevelBPETokenizer, Tokenizer

        try:
            if len(self.files) == 1:
                tok = Tokenizer.from_file(str(self.files[0]))
            else:
                tok = ByteLevelBPETokenizer(str(self.files[0]), str(self.files[1]))
        except Exception as error:  # the tokenizers package raises a bare Exception
            files = " + ".join(map(str, self.files))
            raise BadDataError(
                f"data.tokenizer_path={tokenizer_path!r}: {files} is not a tokenizer the "
                f"`tokenizers` package can load ({' '.join(str(error).split())}); point it at "
                "GPT-2's tokenizer.json, encoder.json + vocab.bpe or vocab.json + merges.txt, "
                "or use --config.data.tokenizer_path=bytes"
            ) from None
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(
                f"the tokenizer at {tokenizer_path} has no {EOS_TOKEN} token; use "
                "GPT-2's tokenizer or --config.data.tokenizer_path=bytes"
            )
        self.vocab_size, self.eos_id = tok.get_vocab_size(), eos
        self._encode = lambda lines: [e.ids for e in tok.encode_batch(lines)]
        self._decode = tok.decode
        check_lossless(self._encode, self._decode, tokenizer_path, self.files)

    def encode_lines(self, lines: list[str]) -> np.ndarray:
        """(T,) int64 ids of the stripped lines, each followed by ``eos_id``."""
        pieces = []
        for ids in self._encode([line.strip() for line in lines]):
            pieces.append(np.asarray(ids + [self.eos_id], np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` as given (no end-of-line id added): a prompt."""
        return [int(i) for i in self._encode([text])[0]]

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (bytes that are no valid UTF-8 become U+FFFD)."""
        return self._decode([int(i) for i in ids])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)


def _undecodable(path: Path) -> BadDataError:
    """The error for a file that is not UTF-8, naming its first bad line and byte (the text
    reader decodes in blocks, so its position is not the line's)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return BadDataError(
                    f"{path}:{number}: not valid UTF-8 at byte {error.start + 1} of the line "
                    f"({error.reason}); re-save the file as UTF-8 or point data.wikitext_dir at "
                    "the release"
                )
    return BadDataError(f"{path}: not valid UTF-8; re-save the file as UTF-8")


def _build(folder: Path, path: Path, tokenizer: LineTokenizer) -> None:
    chunks = []
    progress = loader.Progress(f"{path}: tokenising", None, "lines")
    done = 0
    with path.open(encoding="utf-8") as f:
        lines: list[str] = []
        try:
            for line in f:
                lines.append(line)
                if len(lines) == CHUNK_LINES:
                    chunks.append(tokenizer.encode_lines(lines).astype(tokenizer.dtype))
                    done += len(lines)
                    progress.update(done)
                    lines = []
        except UnicodeDecodeError:
            raise _undecodable(path) from None
        chunks.append(tokenizer.encode_lines(lines).astype(tokenizer.dtype))
    progress.finish(done + len(lines))
    tokens = np.concatenate(chunks)
    loader.save_arrays(folder, "data", {"tokens": tokens})


def load_tokens(
    split: str,
    *,
    wikitext_dir: str,
    tokenizer_path: str,
    cache_dir: str,
    release: str = DEFAULT_RELEASE,
) -> tuple[np.ndarray, LineTokenizer]:
    """The split's token stream (N,) (uint16 or int32, memory-mapped) and its tokenizer."""
    path = find_file(wikitext_dir, split, release)
    tokenizer = LineTokenizer(tokenizer_path)
    key = {
        "dataset": "wikitext103",
        "file": loader.fingerprint([path.resolve()]),
        "tokenizer": BYTES
        if tokenizer_path == BYTES
        else loader.fingerprint([p.resolve() for p in tokenizer.files]),
    }
    folder = loader.prepared(cache_dir, "wikitext", key, lambda f: _build(f, path, tokenizer))
    return loader.load_arrays(folder, "data", ("tokens",))["tokens"], tokenizer


class TokenBlocks:
    """The blocks (N, seq_len + 1) of a token stream with stride ``seq_len``, read on access.

    Block ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len + 1]``. Indexing (an int, a slice,
    row numbers), ``len``, ``shape``, ``dtype`` and ``np.asarray`` act as on the array of blocks
    (a strided view of the stream, no copy). Pickled, a memory-mapped ``.npy`` stream travels as
    its file name, mapped again on arrival: a view of it pickled by value (as numpy does) sent
    the whole stream to every input worker process (235 MB for WikiText-103's train split).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, num: int):
        self.tokens, self.seq_len, self.num = tokens, int(seq_len), int(num)
        self._view = np.lib.stride_tricks.sliding_window_view(tokens, self.seq_len + 1)[
            :: self.seq_len
        ][: self.num]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num, self.seq_len + 1)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: Any) -> np.ndarray:
        return self._view[index]

    def __iter__(self):
        return iter(self._view)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy:
            return np.array(self._view, dtype=dtype, copy=True)
        return np.asarray(self._view, dtype=dtype)

    def __repr__(self) -> str:
        where = getattr(self.tokens, "filename", None) or "memory"
        size = f"{self.num} x {self.seq_len + 1} {self.dtype}"
        return f"TokenBlocks({size}, stride {self.seq_len}, {where})"

    def __getstate__(self) -> dict[str, Any]:
        file = loader.npy_file_of(self.tokens)
        tokens: Any = ("npy-file", file) if file else self.tokens
        return {"tokens": tokens, "seq_len": self.seq_len, "num": self.num}

    def __setstate__(self, state: dict[str, Any]) -> None:
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens[:1] == ("npy-file",):
            tokens = np.load(tokens[1], mmap_mode="r")
        self.__init__(tokens, state["seq_len"], state["num"])


def blocks(tokens: np.ndarray, seq_len: int, where: str = "") -> TokenBlocks:
    """Training blocks (M, seq_len + 1), M = (N - 1) // seq_len, of the stream (N,) with stride
    ``seq_len`` (:class:`TokenBlocks`: a view, no copy, that pickles a memory-mapped stream as
    its file name).

    Block ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len + 1]``; the tail shorter than a block
    is dropped. fairseq's training samples are :func:`eval_blocks`'s (the first starting at an
    added end-of-line token, the last shorter): these are the same windows one token later, all
    full, which is why training keeps them (its 100k updates sample the split's blocks at
    random, so neither the one token nor the short tail matter; evaluation, which must score
    each token once, does not use them). ``where`` names the tokens' file in the error for too
    few of them.
    """
    num = (len(tokens) - 1) // seq_len
    if num < 1:
        raise ValueError(
            f"{len(tokens)} tokens{f' in {where}' if where else ''} are fewer than "
            f"data.seq_len + 1 = {seq_len + 1}: give a longer file, or a smaller "
            "--config.data.seq_len"
        )
    return TokenBlocks(tokens, seq_len, num)


def eval_blocks(
    tokens: np.ndarray, seq_len: int, eos_id: int, where: str = ""
) -> dict[str, np.ndarray]:
    """The evaluation blocks of the stream (N,), which score each of its tokens exactly once, as
    fairseq's ``language_modeling`` task with ``--sample-break-mode none``:

    - ``ids`` (M, seq_len + 1), M = ceil(N / seq_len): row ``i`` is ``s[i * seq_len : (i + 1) *
      seq_len + 1]`` of ``s = [eos_id] + tokens`` (padded with ``eos_id`` past its end), so its
      targets ``ids[i, 1:]`` are ``tokens[i * seq_len : (i + 1) * seq_len]`` and its inputs
      ``ids[i, :-1]`` the tokens before them, the first block's starting at ``eos_id``
      (fairseq's ``TokenBlockDataset(include_targets=True)`` prepends its ``</s>`` there; every
      later block starts after a token of the stream, an end-of-line one at a line's start);
    - ``num_targets`` (M,) int32: the targets of each row, ``seq_len`` but for the last one's
      ``N - (M - 1) * seq_len``; the targets past them are padding, not scored.

    ``where`` names the tokens' file in the error for an empty stream.
    """
    seq_len, count = int(seq_len), len(tokens)
    if count < 1:
        raise ValueError(
            f"no tokens{f' in {where}' if where else ''}: give a file with at least one line"
        )
    num = -(-count // seq_len)
    stream = np.full(num * seq_len + 1, eos_id, dtype=tokens.dtype)
    stream[1 : count + 1] = tokens
    ids = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len]
    num_targets = np.full(num, seq_len, np.int32)
    num_targets[-1] = count - (num - 1) * seq_len
    return {"ids": ids, "num_targets": num_targets}

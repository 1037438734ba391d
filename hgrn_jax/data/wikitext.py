"""WikiText-103 for language modelling: token files, a local tokenizer, 512-token blocks.

Files: ``wiki.{train,valid,test}.tokens`` in ``data.wikitext_dir`` (or its ``wikitext-103/``
subfolder), as unpacked from ``wikitext-103-v1.zip``. Each line is stripped, tokenised, and
closed by an end-of-line token (fairseq's preprocessing: every line, empty ones included, ends
with ``</s>``); the whole split is one token stream cut into blocks of ``seq_len + 1`` tokens
with stride ``seq_len`` (the model predicts tokens 1..seq_len of each block).

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
Token streams are prepared once into ``cache_dir/wikitext-<hash>/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hgrn_jax.data import loader
from hgrn_jax.data.errors import BadDataError, DatasetMissingError

FILES = {"train": "wiki.train.tokens", "val": "wiki.valid.tokens", "test": "wiki.test.tokens"}
BYTES = "bytes"
EOS_TOKEN = "<|endoftext|>"
CHUNK_LINES = 20_000


def find_file(wikitext_dir: str, split: str) -> Path:
    name = FILES[split]
    base = Path(wikitext_dir) if wikitext_dir else None
    tried = [base / name, base / "wikitext-103" / name] if base else []
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(map(str, tried)) or "nowhere: data.wikitext_dir is empty"
    raise DatasetMissingError(
        f"WikiText-103 {name} not found (looked for {looked}): unpack wikitext-103-v1.zip and set "
        f"--config.data.wikitext_dir=FOLDER to the folder holding wiki.train.tokens, "
        f"wiki.valid.tokens and wiki.test.tokens"
    )


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
    split: str, *, wikitext_dir: str, tokenizer_path: str, cache_dir: str
) -> tuple[np.ndarray, LineTokenizer]:
    """The split's token stream (T,) (uint16 or int32, memory-mapped) and its tokenizer."""
    path = find_file(wikitext_dir, split)
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
    """Blocks (N, seq_len + 1) of the stream with stride ``seq_len`` (:class:`TokenBlocks`: a
    view, no copy, that pickles a memory-mapped stream as its file name).

    Block ``i`` is ``tokens[i * seq_len : (i + 1) * seq_len + 1]``; the tail shorter than a block
    is dropped. ``where`` names the tokens' file in the error for too few of them.
    """
    num = (len(tokens) - 1) // seq_len
    if num < 1:
        raise ValueError(
            f"{len(tokens)} tokens{f' in {where}' if where else ''} are fewer than "
            f"data.seq_len + 1 = {seq_len + 1}: give a longer file, or a smaller "
            "--config.data.seq_len"
        )
    return TokenBlocks(tokens, seq_len, num)

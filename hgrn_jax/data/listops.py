"""ListOps (Long Range Arena): a generator, the release's TSV layout, a reader and a tokenizer.

The LRA specification of the task (Tay et al. 2021, after Nangia & Bowman 2018):

- An expression is a tree. A leaf is a value 0-9; an inner node applies one of four operators to
  2 to ``max_args`` (10) arguments: ``[MIN``, ``[MAX``, ``[MED`` (the median, truncated to an
  integer: the median of 1 and 4 is 2) and ``[SM`` (sum modulo 10). A node is closed by ``]``.
- At each depth below ``max_depth`` (10) a node is an operator with probability 0.25 and a value
  otherwise; at ``max_depth`` it is a value. The root is at depth 1, so values sit at depth <= 10.
- The length of an expression is its number of operator, value and ``]`` tokens (no brackets).
  Only expressions with ``min_length < length < max_length`` are kept (500 and 2000 in LRA).
- Expressions are deduplicated and split, in generation order, into 96,000 train, 2,000
  validation and 2,000 test examples. The target is the value of the expression, a class 0-9.
- Files: ``basic_train.tsv``, ``basic_val.tsv``, ``basic_test.tsv``; a header ``Source<TAB>Target``
  and one ``source<TAB>target`` row per example. The source writes every operator node as
  left-nested pairs in parentheses: ``[MAX 2 9 ]`` is ``( ( ( [MAX 2 ) 9 ) ] )``.

Generation here is deterministic from a seed (Python's ``random.Random``); it cannot reproduce
the release's examples, only its distribution.

The tokenizer is the reference's (OpenNLPLab/lra ``src/dataloaders/datasets.py``,
``listops_tokenizer`` and class ``ListOps``): parentheses are deleted, ``]`` is renamed ``X``, the
rest is split at whitespace; the vocabulary is built from the *training* file's tokens (each
example truncated to ``seq_len - 1`` tokens) in torchtext's order (:mod:`hgrn_jax.data.vocab`:
``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then by descending count); every sequence is its first
``seq_len - 1`` ids and ``<eos>``, padded with 0. On the release that is 18 ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hgrn_jax.data import loader
from hgrn_jax.data.vocab import EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocabulary, count_tokens, pack

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUES = tuple(range(10))
OPERATOR_PROBABILITY = 0.25
SPLITS = ("train", "val", "test")
NUM_CLASSES = 10

Tree = int | tuple[str, tuple["Tree", ...]]


@dataclasses.dataclass(frozen=True)
class ListOpsSpec:
    """What to generate. Defaults are the LRA release's settings."""

    min_length: int = 500
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10
    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000

    def __post_init__(self):
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(
                f"need 0 <= min_length < max_length - 1; got {self.min_length}, {self.max_length}"
            )
        if self.max_depth < 2 or self.max_args < 2:
            raise ValueError("max_depth and max_args must be at least 2")

    @classmethod
    def tiny(cls) -> ListOpsSpec:
        """A small, shallow set for seconds-long CPU runs (the ``tiny`` preset, ``make demo``)."""
        return cls(
            min_length=8,
            max_length=60,
            max_depth=4,
            max_args=10,
            num_train=4_000,
            num_val=256,
            num_test=256,
        )

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


# ----------------------------------------------------------------------------- trees


def evaluate(tree: Tree) -> int:
    """The value 0-9 of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def to_source(tree: Tree) -> str:
    """The release's text of an expression (left-nested parenthesised pairs)."""
    parts: list[str] = []
    _append_source(tree, parts)
    return "".join(parts)


def _append_source(tree: Tree, parts: list[str]) -> None:
    """``parts`` + the pieces of ``tree``'s text: ``( ( ( op a0 ) a1 ) ... ] )``, written left to
    right (one join at the end instead of re-copying the text at every argument)."""
    if isinstance(tree, int):
        parts.append(str(tree))
        return
    op, args = tree
    parts.append("( " * (len(args) + 1) + op + " ")
    for arg in args:
        _append_source(arg, parts)
        parts.append(" ) ")
    parts.append(END + " )")


def parse_source(source: str) -> Tree:
    """The tree of a source string (release layout, or the same tokens without parentheses)."""
    stack: list[tuple[str, list[Tree]]] = []
    result: Tree | None = None
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token in OPERATORS:
            stack.append((token, []))
        elif token == END:
            if not stack:
                raise ValueError(f"unbalanced {END!r} in ListOps source {source[:80]!r}")
            op, args = stack.pop()
            node: Tree = (op, tuple(args))
            if stack:
                stack[-1][1].append(node)
            else:
                result = node
        elif token.isdigit() and len(token) == 1:
            if stack:
                stack[-1][1].append(int(token))
            else:
                result = int(token)
        else:
            raise ValueError(f"unknown token {token!r} in ListOps source {source[:80]!r}")
    if stack or result is None:
        raise ValueError(f"incomplete ListOps source {source[:80]!r}")
    return result


def tree_length(tree: Tree) -> int:
    """Operator, value and end tokens of a tree (the length LRA filters on)."""
    if isinstance(tree, int):
        return 1
    return 2 + sum(tree_length(a) for a in tree[1])


class _TooLong(Exception):
    pass


def _random_tree(rng: random.Random, spec: ListOpsSpec) -> tuple[Tree, int] | None:
    """One random tree following the spec and its :func:`tree_length`, or None once it grows
    past ``max_length`` tokens (the draw is then abandoned: it would be rejected anyway)."""
    left = spec.max_length
    draw, choose, count = rng.random, rng.choice, rng.randint
    max_depth, max_args = spec.max_depth, spec.max_args

    def grow(depth: int) -> Tree:
        nonlocal left
        if depth < max_depth and draw() < OPERATOR_PROBABILITY:
            left -= 2  # the operator and its end token
            if left <= 0:
                raise _TooLong
            op = choose(OPERATORS)
            num_args = count(2, max_args)
            return op, tuple([grow(depth + 1) for _ in range(num_args)])
        left -= 1
        if left <= 0:
            raise _TooLong
        return choose(VALUES)

    try:
        tree = grow(1)
    except _TooLong:
        return None
    return tree, spec.max_length - left


def generate(
    spec: ListOpsSpec, seed: int, *, max_draws: int | None = None
) -> dict[str, list[tuple[str, int]]]:
    """Deduplicated (source, target) examples per split, deterministic from ``seed``."""
    total = sum(spec.split_sizes().values())
    max_draws = max_draws or 2000 * total + 100_000
    rng = random.Random(seed)
    examples: dict[str, int] = {}
    draws = 0
    while len(examples) < total:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(
                f"only {len(examples)} distinct ListOps expressions with {spec.min_length} < "
                f"length < {spec.max_length} after {max_draws} draws; widen the length range "
                "or ask for fewer examples"
            )
        drawn = _random_tree(rng, spec)
        if drawn is None or not spec.min_length < drawn[1] < spec.max_length:
            continue
        tree = drawn[0]
        source = to_source(tree)
        if source not in examples:
            examples[source] = evaluate(tree)
    items = list(examples.items())
    out, start = {}, 0
    for split, size in spec.split_sizes().items():
        out[split] = items[start : start + size]
        start += size
    return out


# ----------------------------------------------------------------------------- files


def split_filename(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown ListOps split {split!r}; use one of {SPLITS}")
    return f"basic_{split}.tsv"


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        loader.follow_umask(tmp)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tsv(folder: str | Path, examples: dict[str, Sequence[tuple[str, int]]]) -> None:
    """``basic_{split}.tsv`` files with the release's header and rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in examples.items():
        lines = ["Source\tTarget"] + [f"{source}\t{target}" for source, target in rows]
        _atomic_write(folder / split_filename(split), "\n".join(lines) + "\n")


def generated_folder(cache_dir: str | Path, spec: ListOpsSpec, seed: int) -> Path:
    """The cache folder of one (spec, seed): ``cache_dir/listops-<hash>``."""
    key = json.dumps({"spec": dataclasses.asdict(spec), "seed": seed}, sort_keys=True)
    return Path(cache_dir) / f"listops-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_generated(cache_dir: str | Path, spec: ListOpsSpec, seed: int) -> Path:
    """The folder holding generated ``basic_*.tsv`` for (spec, seed), generating it if absent.

    Several processes may call this at once: each writes identical files atomically.
    """
    folder = generated_folder(cache_dir, spec, seed)
    if all((folder / split_filename(s)).is_file() for s in SPLITS):
        return folder
    loader.check_cache_dir(cache_dir)
    examples = generate(spec, seed)
    with loader.naming_the_cache_dir(cache_dir):
        write_tsv(folder, examples)
        _atomic_write(
            folder / "spec.json",
            json.dumps({"spec": dataclasses.asdict(spec), "seed": seed}, indent=1) + "\n",
        )
    return folder


# ----------------------------------------------------------------------------- tokenizer

# LRA's own tokenizer keeps alphanumeric characters only, so the reference deletes parentheses
# and writes the end of an operator, ``]``, as ``X``.
_TRANSLATION = {ord("]"): "X", ord("("): None, ord(")"): None}
END_TOKEN = "X"
# The release's vocabulary: the specials, 10 values, 4 operators and the end token.
VOCAB_SIZE = len(SPECIALS) + len(VALUES) + len(OPERATORS) + 1


def tokenize(source: str) -> list[str]:
    """The reference's tokens of a source: ``( ( [MAX 2 ) ] )`` -> ``['[MAX', '2', 'X']``."""
    return source.translate(_TRANSLATION).split()


class ListOpsTokenizer:
    """Source strings -> ids of a vocabulary built from the training sources (the reference's)."""

    pad_id, unk_id, eos_id = PAD_ID, UNK_ID, EOS_ID
    tokenize = staticmethod(tokenize)

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary

    @classmethod
    def fit(cls, train_sources: Sequence[str], seq_len: int) -> ListOpsTokenizer:
        """The tokenizer whose vocabulary counts the training sources' first seq_len - 1 tokens."""
        return cls(Vocabulary.from_counts(count_tokens(map(tokenize, train_sources), seq_len - 1)))

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id (a missing token is ``<unk>``)."""
        return self.vocabulary.index

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(
        self, sources: Sequence[str], seq_len: int, dtype=np.int32
    ) -> tuple[np.ndarray, np.ndarray]:
        """ids (N, seq_len) and lengths (N,) int32 (end token included, <= seq_len)."""
        rows = (self.vocabulary.ids(tokenize(s)[: seq_len - 1]) for s in sources)
        return pack(rows, len(sources), seq_len, dtype)

    def decode(self, ids: np.ndarray) -> str:
        """The source's tokens without parentheses (``X`` written ``]``), specials dropped."""
        words = [self.vocabulary.tokens[int(i)] for i in ids if int(i) not in (PAD_ID, EOS_ID)]
        return " ".join(END if w == END_TOKEN else w for w in words)


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hgrn_jax.data.listops``: write a generated set in the release's layout."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hgrn_jax.data.listops",
        description="Generate ListOps (LRA specification) as basic_{train,val,test}.tsv.",
    )
    parser.add_argument(
        "--spec",
        choices=("lra", "tiny"),
        default="lra",
        help="lra: the release's sizes and lengths; tiny: the tiny preset's",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--out",
        help="write the files into this folder, which must not hold basic_*.tsv yet (use it as "
        "data.lra_dir)",
    )
    where.add_argument(
        "--cache_dir",
        help="write into CACHE_DIR/listops-<hash> as the tasks do (nothing to do if it exists)",
    )
    parser.add_argument("--seed", type=int, default=0)
    for name in (
        "min_length",
        "max_length",
        "max_depth",
        "max_args",
        "num_train",
        "num_val",
        "num_test",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the spec")
    args = parser.parse_args(argv)
    spec = ListOpsSpec.tiny() if args.spec == "tiny" else ListOpsSpec()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(spec)
        if getattr(args, f.name) is not None
    }
    spec = dataclasses.replace(spec, **overrides)
    if args.out:
        present = [p for s in SPLITS if (p := Path(args.out) / split_filename(s)).exists()]
        if present:  # maybe the release's own files, or another seed's: never overwritten
            parser.exit(
                2,
                f"error: {present[0]} exists: --out writes a new set only into a folder without "
                "basic_{train,val,test}.tsv; choose another folder (or remove those files)\n",
            )
        write_tsv(args.out, generate(spec, args.seed))
        folder = Path(args.out)
    else:
        present = generated_folder(args.cache_dir, spec, args.seed)
        existed = all((present / split_filename(s)).is_file() for s in SPLITS)
        folder = ensure_generated(args.cache_dir, spec, args.seed)
        if existed:
            print(f"ListOps already generated in {folder}")
            return
    sizes = ", ".join(f"{n} {s}" for s, n in spec.split_sizes().items())
    print(f"ListOps ({sizes}; {spec.min_length} < length < {spec.max_length}) in {folder}")


if __name__ == "__main__":
    main()

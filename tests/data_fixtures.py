"""Small datasets in the layouts of the real releases, written by the data tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

# An AAN-style file: quoted texts with tabs, newlines and doubled quotes inside the quotes.
AAN_ROWS = [
    ("1", "a1", "b1", '"He said ""hi""\tand left."', "plain text two"),
    ("0.0", "a2", "b2", "no quotes here", '"tab\tinside\tquotes"'),
    ("1.0", "a3", "b3", '"line one\nline two"', "x"),
    ("0", "a4", "b4", 'mid "quote" stays', '"ok"'),
]


def aan_line(row) -> str:
    return "\t".join(row) + "\n"


def write_aan(root: Path, rows_per_split: int = 8, extra: dict[str, str] | None = None) -> Path:
    """``root/tsv_data/new_aan_pairs.{train,eval,test}.tsv``; ``extra[split]`` is appended raw."""
    folder = root / "tsv_data"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "test"):
        rows = [AAN_ROWS[i % len(AAN_ROWS)] for i in range(rows_per_split)]
        text = "".join(aan_line(r) for r in rows) + (extra or {}).get(split, "")
        (folder / f"new_aan_pairs.{split}.tsv").write_text(text, encoding="utf-8")
    return folder


def write_listops(root: Path, rows: int = 6, extra: str = "") -> Path:
    folder = root / "listops-1000"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        lines = ["Source\tTarget"] + [f"( ( ( [MAX {i % 10} ) 3 ) ] )\t{max(i % 10, 3)}"
                                      for i in range(rows)]
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n" + extra)
    return folder


def write_pathfinder(root: Path, resolution: int = 32, count: int = 20, *,
                     bad_lines: list[str] = (), empty_image: bool = False) -> Path:
    """``pathfinder<res>/curv_contour_length_14/{imgs/0,metadata}`` with text ``.npy`` metadata.

    Image i is constant grey ``i % 256`` with label ``i % 2`` (two metadata files, 0.npy and 1.npy).
    """
    from PIL import Image

    base = root / f"pathfinder{resolution}" / "curv_contour_length_14"
    (base / "imgs" / "0").mkdir(parents=True, exist_ok=True)
    (base / "metadata").mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {0: [], 1: []}
    for i in range(count):
        pixels = np.full((resolution, resolution), i % 256, np.uint8)
        Image.fromarray(pixels, "L").save(base / "imgs" / "0" / f"sample_{i}.png")
        lines[i * 2 // count].append(f"imgs/0 sample_{i}.png {i} {i % 2} 1.5 3 2")
    if empty_image:
        (base / "imgs" / "0" / "sample_empty.png").write_bytes(b"")
        lines[1].append("imgs/0 sample_empty.png 99 1 1.5 3 2")
    lines[1].extend(bad_lines)
    for k, content in lines.items():
        (base / "metadata" / f"{k}.npy").write_text("\n".join(content) + "\n")
    return base


WIKI_LINES = [" = Valkyria Chronicles III = ", "", " Senjō no Valkyria 3 : <unk> Chronicles ( "
              "Japanese : 戦場のヴァルキュリア3 ) is a tactical role @-@ playing video game . ",
              " It was released in January 2011 in Japan . ", ""]


def write_wikitext(folder: Path, repeats: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        lines = WIKI_LINES * (repeats if name == "train" else max(repeats // 4, 2))
        (folder / f"wiki.{name}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_bpe_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A small byte-level BPE ``tokenizer.json`` (GPT-2's kind) with ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(WIKI_LINES * 10, trainer)
    tok.save(str(path))
    return path


def jpeg(seed: int, width: int = 40, height: int = 30) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imagenet_archives(folder: Path, synsets=("n01440764", "n01443537"), per_class=4,
                            num_val=6, width=40, height=30) -> None:
    """ILSVRC2012_img_{train,val}.tar in the real layout: a tar of per-synset tars, and JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(per_class):
                    add_to_tar(tar, f"{synset}_{i}.JPEG", jpeg(10 * c + i, width, height))
            add_to_tar(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(num_val):
            add_to_tar(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(100 + i, height, width + 20))

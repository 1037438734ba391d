"""Small datasets in the layouts of the real releases, written by the data tests, and the tiny
configs that read them."""

from __future__ import annotations

import importlib
import io
import itertools
import json
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
        lines = ["Source\tTarget"] + [
            f"( ( ( [MAX {i % 10} ) 3 ) ] )\t{max(i % 10, 3)}" for i in range(rows)
        ]
        (folder / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n" + extra)
    return folder


def write_pathfinder(
    root: Path,
    resolution: int = 32,
    count: int = 20,
    *,
    bad_lines: list[str] = (),
    empty_image: bool = False,
) -> Path:
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


WIKI_LINES = [
    " = Valkyria Chronicles III = ",
    "",
    " Senjō no Valkyria 3 : <unk> Chronicles ( "
    "Japanese : 戦場のヴァルキュリア3 ) is a tactical role @-@ playing video game . ",
    " It was released in January 2011 in Japan . ",
    "",
]


def write_wikitext(folder: Path, repeats: int = 20, release: str = "raw") -> Path:
    """``folder/wiki.{train,valid,test}.raw`` (``release="tokens"``: ``.tokens``, whose rare
    words are ``<unk>``), as the release's zip unpacks them into ``wikitext-103-raw/``
    (``wikitext-103/``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid", "test"):
        lines = WIKI_LINES * (repeats if name == "train" else max(repeats // 4, 2))
        if release == "raw":
            lines = [line.replace("<unk>", "Unrecorded") for line in lines]
        text = "\n".join(lines) + "\n"
        (folder / f"wiki.{name}.{release}").write_text(text, encoding="utf-8")
    return folder


def write_bpe_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A small byte-level BPE ``tokenizer.json`` (GPT-2's kind) with ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
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


def write_imagenet_archives(
    folder: Path, synsets=("n01440764", "n01443537"), per_class=4, num_val=6, width=40, height=30
) -> None:
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


# ----------------------------------------------------------------------------- configs


def tiny_config(name: str, **data):
    """The tiny preset of ``experiments.configs.<name>`` with ``data`` keys overridden."""
    config = importlib.import_module(f"experiments.configs.{name}").get_config("tiny")
    for key, value in data.items():
        config.data[key] = value
    return config


def tfds_config(name: str, tmp_path: Path, **data):
    """The tiny preset reading tfds (``tfds.testing.mock_data``), batches of 4."""
    config = tiny_config(name, **{"source": "tfds", "cache_dir": str(tmp_path / "cache"), **data})
    config.batch_size = 4
    config.eval_batch_size = 4
    return config


def cifar_config(tmp_path: Path, **data):
    """LRA Image on (mock) CIFAR-10: 32 x 32 RGB, 10 classes, crop + flip unless overridden."""
    data = {"augment": True, **data}  # the tiny preset turns augmentation off
    config = tfds_config("lra.image", tmp_path, image_size=32, seq_len=1024, **data)
    config.model.grid_shape = (32, 32)
    config.model.num_classes = 10
    return config


def imagenet_config(tmp_path: Path, name: str = "imagenet.tiny", **data):
    """An ImageNet tiny preset on (mock) tfds ``imagenet2012``, built in threads."""
    config = tfds_config(name, tmp_path, **{"workers": 0, **data})
    config.model.num_classes = 1000
    return config


def pathfinder_config(tmp_path: Path, task: str = "lra.pathfinder", resolution: int = 32, **data):
    """Pathfinder / Path-X on the :func:`write_pathfinder` fixture under ``tmp_path``."""
    config = tiny_config(
        task,
        source="release",
        lra_dir=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        image_size=resolution,
        seq_len=resolution * resolution,
        **data,
    )
    config.model.grid_shape = (resolution, resolution)
    config.batch_size = 4
    config.eval_batch_size = 3
    return config


def train_briefly(
    config, workdir: Path, steps: int = 3, batch_size: int = 8, num_layers: int | None = 1
) -> dict:
    """``train_and_evaluate`` for ``steps`` steps (one evaluation and checkpoint at the end);
    checks ``workdir/results.json``: the step count, finite metrics, accuracies in [0, 100].

    ``num_layers``: the model's depth (1 by default: these runs test the path from the data to
    the results, which one block exercises as fully as two at about half the compile time;
    None keeps the preset's)."""
    from hgrn_jax.training.loop import train_and_evaluate

    if num_layers is not None:
        config.model.num_layers = num_layers
    config.batch_size = batch_size  # a multiple of the 8 simulated devices
    config.eval_batch_size = batch_size
    config.num_train_steps = steps
    config.eval_every = steps
    config.checkpoint_every = steps
    results = train_and_evaluate(config, workdir)
    written = json.loads((workdir / "results.json").read_text())
    assert written["steps"] == results["steps"] == steps and written["task"] == config.task
    for key in ("test", "best_val", "test_loss"):
        assert np.isfinite(written[key]), (key, written[key])
    if written["metric"] == "accuracy":
        assert 0.0 <= written["test"] <= 100.0 and 0.0 <= written["best_val"] <= 100.0
    return written


def take(iterator, n: int) -> list:
    """The first ``n`` items of ``iterator``."""
    return list(itertools.islice(iterator, n))


def assert_batch_lists_equal(a: list[dict], b: list[dict]) -> None:
    """Two lists of batches hold the same keys and exactly the same arrays."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def byte_wikitext_config(folder: Path, seq_len: int, **data):
    """The tiny LM config reading the WikiText-103 release layout under ``folder`` as bytes,
    in blocks of ``seq_len``, its token cache in ``folder/cache`` unless ``data`` names one."""
    settings = {"cache_dir": str(folder / "cache"), **data}
    return tiny_config(
        "lm.wikitext103",
        source="release",
        wikitext_dir=str(folder),
        tokenizer_path="bytes",
        seq_len=seq_len,
        **settings,
    )

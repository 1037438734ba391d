"""LRA Pathfinder (32 x 32) and Path-X (128 x 128) from the release's PNG folders.

Layout: ``pathfinder{32,128}/curv_contour_length_14/{imgs,metadata}``. Each ``metadata/<k>.npy``
is a *text* file (despite its name); a line ``imgs/<k> sample_<i>.png <i> <label> ...`` names an
image relative to ``curv_contour_length_14/`` and its label (0 / 1).

Order and split are the reference's (OpenNLPLab/lra ``src/dataloaders/datasets.py``,
``PathFinderDataset`` and ``PathFinder.setup``): metadata files in numeric order of their stem,
lines in file order, one example per line (200,000 in the release); val and test get
``int(0.1 * n)`` examples each, train the rest, by ``torch.utils.data.random_split`` with
``torch.Generator().manual_seed(42)``, reproduced exactly in numpy (:mod:`hgrn_jax.data.splits`).
The split is drawn over every metadata line, so an example skipped as bad
(``data.skip_bad_rows``) leaves the others in the reference's splits. Each split keeps the
permutation's order. Pixels are grey uint8; the task normalises them to mean 0.5 / std 0.5 of
[0, 1], i.e. ``x / 127.5 - 1``. Decoded once into ``cache_dir/pathfinder<res>-<hash>/``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hgrn_jax.data import loader, release, splits
from hgrn_jax.data.errors import BadDataError, BadDataReport

LEVEL = "curv_contour_length_14"
NUM_CLASSES = 2
SPLIT_SEED = 42
VAL_FRACTION = TEST_FRACTION = 0.1
KEYS = ("pixels", "labels")


def find_root(lra_dir: str, resolution: int) -> Path:
    return release.find_release_path(
        lra_dir,
        f"pathfinder{resolution}/{LEVEL}",
        what=f"{'Path-X' if resolution == 128 else 'Pathfinder'} ({resolution} x {resolution})",
    )


def _metadata_files(root: Path) -> list[Path]:
    files = list((root / "metadata").glob("*.npy"))
    return sorted(files, key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))


def read_metadata(
    root: Path, report: BadDataReport
) -> tuple[list[tuple[Path, int, Path, int, int]], int]:
    """The well-formed metadata lines as (image path, label, metadata file, line, position) and
    the number of example lines (the reference's dataset size); ``position`` numbers the
    non-blank lines in the reference's order, malformed ones included.

    A metadata file that is unreadable or holds no line is a :class:`BadDataError` even with
    ``data.skip_bad_rows``: its lines cannot be counted, and the split of every example
    depends on their count (skipped, it dropped all of the file's examples, counted as one,
    and moved others between splits; an empty one was taken without a word)."""
    samples = []
    position = 0
    for meta in _metadata_files(root):
        try:
            text = meta.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise BadDataError(
                f"{meta}: unreadable metadata file (it should be text: {error}); its lines "
                "decide every example's split, so it cannot be skipped: restore it from the "
                "release"
            ) from None
        if not text.strip():
            raise BadDataError(
                f"{meta}: empty metadata file (each lists the images of one folder); restore it "
                "from the release"
            )
        for line, content in enumerate(text.splitlines(), start=1):
            fields = content.split()
            if not fields:
                continue
            position += 1
            if len(fields) < 4:
                report.add(
                    meta,
                    line,
                    f"expected at least 4 fields (folder, file, index, label); got {len(fields)}",
                )
                continue
            try:
                label = int(fields[3])
            except ValueError:
                report.add(meta, line, f"label {fields[3]!r} is not an integer")
                continue
            if not 0 <= label < NUM_CLASSES:
                report.add(meta, line, f"label {label} not in 0..{NUM_CLASSES - 1}")
                continue
            samples.append((root / fields[0] / fields[1], label, meta, line, position - 1))
    return samples, position


def split_positions(n: int) -> dict[str, np.ndarray]:
    """The reference's 80/10/10 split of ``n`` examples: positions per split, in its order."""
    num_val, num_test = int(VAL_FRACTION * n), int(TEST_FRACTION * n)
    train, val, test = splits.random_split(
        n, [n - num_val - num_test, num_val, num_test], SPLIT_SEED
    )
    return {"train": train, "val": val, "test": test}


def _decode(path: Path, resolution: int) -> np.ndarray | str:
    """The grey image (resolution, resolution) uint8, or the reason it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty image file"
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), np.uint8)
    except FileNotFoundError:
        return "image file missing"
    except (OSError, UnidentifiedImageError, ValueError) as error:
        return f"unreadable image ({type(error).__name__})"
    if pixels.shape != (resolution, resolution):
        return f"image of shape {pixels.shape}, expected ({resolution}, {resolution})"
    return pixels


def _build(folder: Path, root: Path, resolution: int, skip_bad_rows: bool, workers: int) -> None:
    report = BadDataReport(str(root))
    samples, n = read_metadata(root, report)
    progress = loader.Progress(f"{root}: decoding", len(samples), "images")
    decoded = []
    with ThreadPoolExecutor(workers) as pool:
        for result in pool.map(lambda s: _decode(s[0], resolution), samples, chunksize=256):
            decoded.append(result)
            progress.update(len(decoded))
    progress.finish(len(decoded))
    pixels_at: dict[int, np.ndarray] = {}
    labels_at: dict[int, int] = {}
    for (path, label, meta, line, position), result in zip(samples, decoded):
        if isinstance(result, str):
            report.add(meta, line, f"{path}: {result}")
        else:
            pixels_at[position], labels_at[position] = result, label
    report.finish(skip_bad_rows)
    if not pixels_at and n:
        raise ValueError(
            f"no usable Pathfinder example under {root}: all {n} that metadata/*.npy lists were "
            f"skipped as bad (the warning lists why; is {root / 'imgs'} there?)"
        )
    if not pixels_at:
        raise ValueError(f"no Pathfinder examples under {root} (metadata/*.npy lists none)")
    for split, positions in split_positions(n).items():
        rows = [p for p in positions.tolist() if p in pixels_at]
        pixels = loader.writable_memmap(
            folder / f"{split}.pixels.npy", np.uint8, (len(rows), resolution, resolution, 1)
        )
        for i, position in enumerate(rows):
            pixels[i, :, :, 0] = pixels_at[position]
        pixels.flush()
        del pixels
        loader.save_arrays(
            folder, split, {"labels": np.array([labels_at[p] for p in rows], np.int32)}
        )


def load_split(
    split: str,
    *,
    lra_dir: str,
    cache_dir: str,
    resolution: int,
    skip_bad_rows: bool = False,
    workers: int = 8,
) -> dict[str, np.ndarray]:
    """``pixels`` (N, res, res, 1) uint8 and ``labels`` (N,) int32 in {0, 1} of train|val|test."""
    root = find_root(lra_dir, resolution)
    metadata = _metadata_files(root)
    if not metadata:
        raise release.DatasetMissingError(
            f"no metadata/*.npy files in {root}: unpack the LRA release's pathfinder"
            f"{resolution} folder completely (imgs/ and metadata/)"
        )
    key = {
        "dataset": f"pathfinder{resolution}",
        "metadata": loader.fingerprint(metadata),
        "split": "torch_random_split",
        "split_seed": SPLIT_SEED,
        "skip_bad_rows": skip_bad_rows,
    }
    folder = loader.prepared(
        cache_dir,
        f"pathfinder{resolution}",
        key,
        lambda f: _build(f, root, resolution, skip_bad_rows, workers),
    )
    return loader.load_arrays(folder, split, KEYS)

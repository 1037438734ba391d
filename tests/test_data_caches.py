"""A damaged prepared cache (a copy to another host cut short, a file lost) stops with one line
naming the file and the fix, whether its DONE records the file sizes (written since) or not
(caches of older code, still read)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest

from hgrn_jax.data import listops_release, loader
from hgrn_jax.data.errors import BadDataError
from hgrn_jax.data.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]


def _prepare(tmp_path: Path) -> tuple[dict, Path, Path]:
    """ListOps's train split prepared in ``tmp_path/cache``: (its arrays, the ids' folder, the
    vocabulary's folder)."""
    fx.write_listops(tmp_path, rows=8)
    data = _load(tmp_path)
    cache = tmp_path / "cache"
    (ids,) = [p for p in cache.glob("listops-*") if not p.name.startswith("listops-vocab-")]
    (vocab,) = cache.glob("listops-vocab-*")
    return {key: np.array(value) for key, value in data.items()}, ids, vocab


def _load(tmp_path: Path) -> dict:
    return listops_release.load_split(
        "train", lra_dir=str(tmp_path), seq_len=16, cache_dir=str(tmp_path / "cache")
    )


def _as_older_code_wrote_it(*folders: Path) -> None:
    """An empty DONE, as before the file sizes were recorded in it."""
    for folder in folders:
        (folder / loader.DONE).write_text("")


def _cut(path: Path, size: int | None = None) -> None:
    os.truncate(path, path.stat().st_size // 2 if size is None else size)


def _damaged(path: Path, folder: Path) -> str:
    """The message's pattern: the file, then the folder to remove and the other fix."""
    return (
        rf"^{re.escape(str(path))} of the prepared data is damaged \(.*\): remove "
        rf"{re.escape(str(folder))} to prepare it again, or copy it completely$"
    )


def test_done_records_the_sizes_of_every_file(tmp_path):
    """Fails on the code before: DONE was empty."""
    _, ids, vocab = _prepare(tmp_path)
    for folder in (ids, vocab):
        names = {p.name for p in folder.iterdir()} - {loader.DONE}
        sizes = {n: (folder / n).stat().st_size for n in names}
        assert json.loads((folder / loader.DONE).read_text()) == {"sizes": sizes}
    assert {"data.inputs.npy", "data.lengths.npy", "data.labels.npy", "vocab.json"} <= {
        p.name for p in ids.iterdir()
    }


@pytest.mark.parametrize("older_code", [False, True], ids=["sizes_in_done", "empty_done"])
@pytest.mark.parametrize(
    "damage",
    ["half_of_inputs", "inputs_within_header", "empty_inputs", "no_labels", "half_of_vocab"],
)
def test_a_damaged_cache_names_the_file_and_the_fix(tmp_path, older_code, damage):
    """The reported errors were ``ValueError: mmap length is greater than file size``,
    ``EOFError: No data left in file`` (a traceback even in the CLI), a bare
    FileNotFoundError and ``JSONDecodeError: Unterminated string ...``; the old code fails
    every case here (another exception than BadDataError)."""
    expected, ids, vocab = _prepare(tmp_path)
    if older_code:
        _as_older_code_wrote_it(ids, vocab)
    target = {
        "half_of_inputs": ids / "data.inputs.npy",
        "inputs_within_header": ids / "data.inputs.npy",
        "empty_inputs": ids / "data.inputs.npy",
        "no_labels": ids / "data.labels.npy",
        "half_of_vocab": vocab / "vocab.json",
    }[damage]
    size = target.stat().st_size
    if damage == "no_labels":
        target.unlink()
    else:
        _cut(target, {"inputs_within_header": 60, "empty_inputs": 0}.get(damage))
    folder = target.parent
    with pytest.raises(BadDataError, match=_damaged(target, folder)) as caught:
        _load(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    if damage == "no_labels":
        assert "(missing)" in message
    elif not older_code:  # found by the sizes in DONE, before reading the file
        assert f"bytes where {size} were prepared)" in message
    # The fix it names works: the folder removed, the same data are prepared again.
    shutil.rmtree(folder)
    again = _load(tmp_path)
    for key, value in expected.items():
        np.testing.assert_array_equal(again[key], value)


def test_a_cache_folder_without_done_is_never_deleted(tmp_path):
    """A cache folder without DONE is not one this code left (it renames a finished build into
    place, DONE included): a copy from another host still in progress, say. It was deleted
    with whatever it held and built again, in silence; now the run stops naming it, and the
    folder and the build are left alone."""
    cache = tmp_path / "cache"
    key = {"what": "numbers"}
    folder = loader.cache_folder(cache, "numbers", key)
    folder.mkdir(parents=True)
    (folder / "data.inputs.npy").write_bytes(b"being copied")
    built = []
    with pytest.raises(
        BadDataError,
        match=rf"^{re.escape(str(folder))} exists but holds no DONE file .*nothing was changed\. "
        "Finish the copy, or remove the folder to prepare it again$",
    ):
        loader.prepared(cache, "numbers", key, built.append)
    assert built == [] and [p.name for p in folder.iterdir()] == ["data.inputs.npy"]
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no temporary folder left


def test_a_cut_done_is_named_too(tmp_path):
    _, ids, _ = _prepare(tmp_path)
    _cut(ids / loader.DONE)
    with pytest.raises(BadDataError, match=_damaged(ids / loader.DONE, ids)):
        _load(tmp_path)


def test_a_longer_file_than_prepared_is_named(tmp_path):
    """A file of another size than DONE records, e.g. the source of an older copy appended to."""
    _, ids, _ = _prepare(tmp_path)
    with open(ids / "data.lengths.npy", "ab") as file:
        file.write(b"\0" * 8)
    with pytest.raises(BadDataError, match=_damaged(ids / "data.lengths.npy", ids)):
        _load(tmp_path)


def test_caches_of_older_code_and_whole_ones_are_read_as_before(tmp_path):
    expected, ids, vocab = _prepare(tmp_path)
    for older_code in (False, True):
        if older_code:
            _as_older_code_wrote_it(ids, vocab)
        data = _load(tmp_path)
        assert isinstance(data["inputs"], np.memmap)
        for key, value in expected.items():
            np.testing.assert_array_equal(data[key], value)
    assert (ids / loader.DONE).read_text() == ""  # reading it left the old DONE as it was


def test_vocabulary_load_names_the_file(tmp_path):
    """Vocabulary.load on its own: a cut or missing file, and JSON without the token list."""
    folder = tmp_path / "v"
    folder.mkdir()
    path = folder / "vocab.json"
    Vocabulary.from_counts({"a": 2, "b": 1}).save(path)
    assert Vocabulary.load(path).tokens[3:] == ("a", "b")
    for text in ('{"tokens": ["<pad>", "<u', '{"fingerprint": "x"}', "[1, 2]", "\udcff"):
        path.write_text(text, errors="surrogateescape")
        with pytest.raises(BadDataError, match=_damaged(path, folder)):
            Vocabulary.load(path)
    path.unlink()
    with pytest.raises(BadDataError, match=_damaged(path, folder)):
        Vocabulary.load(path)


def test_the_prepare_command_says_it_in_one_line(tmp_path):
    """``python -m experiments.prepare`` on a cut cache: one ``error:`` line, exit code 2."""
    fx.write_listops(tmp_path, rows=8)
    command = [
        sys.executable,
        "-m",
        "experiments.prepare",
        "--config=experiments/configs/lra/listops.py",
        f"--config.data.lra_dir={tmp_path}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (train,) = [
        p.parent
        for p in (tmp_path / "cache").glob("listops-*/key.json")
        if '"dataset": "listops"' in p.read_text() and "basic_train.tsv" in p.read_text()
    ]
    path = train / "data.inputs.npy"
    _cut(path)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: BadDataError: {path} of the prepared data is damaged (")
    assert lines[0].endswith(
        f"): remove {train} to prepare it again, or copy it completely (rerun with --traceback "
        "for details)"
    )

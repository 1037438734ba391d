"""tfds builders of the LRA release and WikiText-103 (``hgrn_jax.data.tfds_builders``).

Each builder prepares the release-layout fixtures into a temporary ``data.tfds_dir`` through
``python -m experiments.prepare``'s function; the arrays read back (by the tasks, from the
array_record files) equal the ``.npy`` path's for the same fixture, so tokenisation and decoding
stay one code path. Also: split sizes, shapes and dtypes, which task a config gets (tfds data
win, the release files are the fallback), per-process reads of only the process's rows (also in
two real JAX processes assembling global batches), bad rows, a missing dataset's message, and tiny
presets training from the tfds data.
"""

from __future__ import annotations

import re
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
from data_fixtures import assert_batch_lists_equal, take

from experiments import prepare
from hgrn_jax import tasks
from hgrn_jax.data import errors, listops_release, loader, retrieval
from hgrn_jax.tasks import listops as listops_task
from hgrn_jax.tasks import pathfinder as pathfinder_task
from hgrn_jax.tasks import retrieval as retrieval_task
from hgrn_jax.tasks import wikitext103 as wikitext_task


def release_and_tfds_tasks(config):
    """(task reading the prepared tfds data, task reading the release files via .npy)."""
    sizes = prepare.prepare(config)
    from_tfds = tasks.get_task(config)
    npy_config = config.copy_and_resolve_references()
    npy_config.data.tfds_dir = ""
    from_npy = tasks.get_task(npy_config)
    assert sizes == {s: from_npy.num_examples(s) for s in ("train", "val", "test")}
    return from_tfds, from_npy


def assert_same_examples(
    from_tfds, from_npy, shapes: dict[str, tuple], implied: dict[str, int] | None = None
) -> None:
    """The splits' arrays are equal; ``implied``: a column the ``.npy`` examples may leave out
    (WikiText's training ``num_targets``), and its value in every row."""
    for split in ("train", "val", "test"):
        expected = dict(from_npy.examples(split))
        rows = len(next(iter(expected.values())))
        for key, value in (implied or {}).items():
            expected.setdefault(key, np.full(rows, value, np.int32))
        got = from_tfds.examples(split)
        assert got.keys() == expected.keys()
        for key, array in expected.items():
            read = np.asarray(got[key])
            # Token ids are uint16 in tfds (vocabularies are built while preparing), uint8 or
            # uint16 in the .npy arrays; everything else has the same dtype.
            assert (
                read.dtype == array.dtype
                or key.startswith("inputs")
                and read.dtype == np.uint16
                and array.dtype.kind == "u"
            ), (split, key)
            assert read.shape[1:] == shapes[key], (split, key)
            np.testing.assert_array_equal(read, array, err_msg=f"{split} {key}")


def listops_config(tmp_path: Path, rows: int = 8):
    fx.write_listops(tmp_path / "lra_release" / "lra_release", rows=rows)  # nested release
    config = fx.tiny_config(
        "lra.listops",
        source="release",
        lra_dir=str(tmp_path),
        seq_len=12,
        tfds_dir=str(tmp_path / "tfds"),
        cache_dir=str(tmp_path / "cache"),
    )
    config.batch_size = config.eval_batch_size = 4
    return config


def wikitext_config(tmp_path: Path, tokenizer: str):
    fx.write_wikitext(tmp_path / "wiki" / "wikitext-103-raw")
    if tokenizer != "bytes":
        tokenizer = str(fx.write_bpe_tokenizer(tmp_path / "tokenizer.json"))
    config = fx.tiny_config(
        "lm.wikitext103",
        source="release",
        wikitext_dir=str(tmp_path / "wiki"),
        tokenizer_path=tokenizer,
        seq_len=16,
        tfds_dir=str(tmp_path / "tfds"),
        cache_dir=str(tmp_path / "cache"),
    )
    config.model.vocab_size = 320
    return config


# ----------------------------------------------------------------------------- each builder


def test_listops_prepared_once_read_back_like_the_release(tmp_path):
    config = listops_config(tmp_path)
    from_tfds, from_npy = release_and_tfds_tasks(config)
    assert isinstance(from_tfds, listops_task.ListOpsPrepared)
    assert isinstance(from_npy, listops_task.ListOpsRelease)
    folder = tmp_path / "tfds" / "lra_listops" / "len12" / "1.0.0"
    assert sorted(p.name for p in folder.glob("*.array_record*")) == [
        f"lra_listops-{s}.array_record-00000-of-00001" for s in ("test", "train", "validation")
    ]
    assert not list((tmp_path / "tfds").glob(".lra_listops-scratch-*"))  # scratch removed
    assert_same_examples(from_tfds, from_npy, {"inputs": (12,), "lengths": (), "labels": ()})
    vocab = listops_release.vocabulary(lra_dir=str(tmp_path), seq_len=12)
    assert tasks.tfds_release(config).metadata(config)["vocabulary"] == list(vocab.tokens)
    # Batches, resumption: the base task's, on the tfds columns.
    first_three = take(from_tfds.train_batches(0), 3)
    assert_batch_lists_equal(first_three, take(from_npy.train_batches(0), 3))
    assert_batch_lists_equal(first_three[2:], take(from_tfds.train_batches(2), 1))
    assert_batch_lists_equal(
        list(from_tfds.eval_batches("val")), list(from_npy.eval_batches("val"))
    )


def test_retrieval_quoted_texts_read_back_like_the_release(tmp_path):
    fx.write_aan(tmp_path, rows_per_split=8)
    config = fx.tiny_config(
        "lra.retrieval",
        source="release",
        lra_dir=str(tmp_path),
        seq_len=32,
        tfds_dir=str(tmp_path / "tfds"),
        cache_dir=str(tmp_path / "cache"),
    )
    from_tfds, from_npy = release_and_tfds_tasks(config)
    assert isinstance(from_tfds, retrieval_task.AanPrepared)
    assert [from_tfds.num_examples(s) for s in ("train", "val", "test")] == [8, 8, 8]
    assert_same_examples(
        from_tfds,
        from_npy,
        {"inputs": (32,), "inputs2": (32,), "lengths": (), "lengths2": (), "labels": ()},
    )
    vocab = retrieval.vocabulary(
        lra_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), seq_len=32
    )
    meta = tasks.tfds_release(config).metadata(config)
    assert meta["vocabulary"] == list(vocab.tokens) and meta["vocab_size"] == len(vocab)
    config.model.vocab_size = len(vocab) - 1
    with pytest.raises(
        ValueError,
        match=rf"smaller than the prepared data's vocabulary "
        rf"\({len(vocab)} ids\)",
    ):
        tasks.get_task(config)


@pytest.mark.parametrize(
    "task,resolution,count,sizes",
    [("lra.pathfinder", 32, 20, [16, 2, 2]), ("lra.pathx", 128, 10, [8, 1, 1])],
)
def test_pathfinder_and_pathx_read_back_like_the_release(tmp_path, task, resolution, count, sizes):
    fx.write_pathfinder(tmp_path, resolution, count=count)
    config = fx.pathfinder_config(
        tmp_path, task=task, resolution=resolution, tfds_dir=str(tmp_path / "tfds")
    )
    from_tfds, from_npy = release_and_tfds_tasks(config)
    assert isinstance(from_tfds, pathfinder_task.PathfinderPrepared)
    assert (tmp_path / "tfds" / "lra_pathfinder" / f"res{resolution}" / "1.0.0").is_dir()
    assert [from_tfds.num_examples(s) for s in ("train", "val", "test")] == sizes
    assert_same_examples(from_tfds, from_npy, {"pixels": (resolution, resolution, 1), "labels": ()})


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_wikitext_blocks_read_back_like_the_release(tmp_path, tokenizer):
    config = wikitext_config(tmp_path, tokenizer)
    from_tfds, from_npy = release_and_tfds_tasks(config)
    assert isinstance(from_tfds, wikitext_task.WikiTextPrepared)
    name = "bytes_block16" if tokenizer == "bytes" else "gpt2_block16"
    assert (tmp_path / "tfds" / "wikitext103" / name / "1.1.0").is_dir()
    assert_same_examples(
        from_tfds, from_npy, {"ids": (17,), "num_targets": ()}, implied={"num_targets": 16}
    )
    meta = tasks.tfds_release(config).metadata(config)
    assert meta["vocab_size"] == (256 if tokenizer == "bytes" else 320)
    assert list(meta["tokenizer_files"]) == ([] if tokenizer == "bytes" else ["tokenizer.json"])
    if tokenizer == "bpe":
        config.model.vocab_size = 256
        with pytest.raises(ValueError, match=r"vocab_size 256 is smaller .* \(320 ids\)"):
            tasks.get_task(config)


def test_wikitext_prepared_by_the_old_builder_is_not_read(tmp_path):
    """Version 1.0.0 held evaluation blocks that skipped each split's first token and tail, and
    no num_targets: such a folder is not prepared data of this builder (old code: read)."""
    config = wikitext_config(tmp_path, "bytes")
    prepare.prepare(config)
    folder = tmp_path / "tfds" / "wikitext103" / "bytes_block16"
    (folder / "1.1.0").rename(folder / "1.0.0")
    assert not tasks.tfds_release(config).is_prepared(config)
    assert isinstance(tasks.get_task(config), wikitext_task.WikiTextRelease)


# ----------------------------------------------------------------------------- which task


def test_release_files_are_the_fallback_until_tfds_data_are_prepared(tmp_path):
    config = listops_config(tmp_path)
    assert isinstance(tasks.get_task(config), listops_task.ListOpsRelease)  # not prepared yet
    config.data.tfds_dir = ""
    assert isinstance(tasks.get_task(config), listops_task.ListOpsRelease)
    config.data.tfds_dir = str(tmp_path / "tfds")
    prepare.prepare(config)
    assert isinstance(tasks.get_task(config), listops_task.ListOpsPrepared)
    config.data.lra_dir = ""  # the pod hosts need only the prepared data
    assert isinstance(tasks.get_task(config), listops_task.ListOpsPrepared)
    config.data.seq_len = 10  # another builder config: not prepared
    assert not tasks.tfds_release(config).is_prepared(config)


class RecordingSource:
    """A data source that records which rows are read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, rows):
        self.read.extend(rows)
        return self.source.__getitems__(rows)


def test_each_process_reads_only_its_rows(tmp_path):
    config = listops_config(tmp_path)
    prepare.prepare(config)
    whole = take(tasks.get_task(config).train_batches(0), 2)
    for p in range(2):
        task = tasks.get_task(config)
        records = task.examples("train")["inputs"].records
        records.source = spy = RecordingSource(records.source)
        for step, batch in enumerate(take(task.train_batches(0, p, 2), 2)):
            np.testing.assert_array_equal(batch["inputs"], whole[step]["inputs"][2 * p : 2 * p + 2])
        own_rows = [
            int(r) for step in range(2) for r in loader.train_rows(config.seed, step, 8, 4, p, 2)
        ]
        assert spy.read == own_rows  # one read per batch (all columns), of its own rows only


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_two_real_processes_read_the_prepared_data_each_example_once(tmp_path):
    """Two JAX processes (loopback coordinator, gloo) read a prepared tfds Pathfinder and build
    global batches with make_array_from_process_local_data: the global batches are the
    one-process ones (each training example of a batch once, each epoch covering every example
    once), each evaluation split is covered exactly once, and each process fetched from the
    array_record source only the records of its own half of each batch."""
    import data_multihost_worker as worker

    fx.write_pathfinder(tmp_path / "release", 32, count=40)
    tfds_dir = str(tmp_path / "tfds")
    prepare.prepare(worker.pathfinder_config(str(tmp_path / "release"), tfds_dir))
    # No release folder: the processes can only read the tfds data.
    seen = worker.run_two_processes(tmp_path / "global.npz", "", tfds_dir)
    assert str(seen.pop("task")) == "PathfinderPrepared"  # the prepared tfds reader
    config = worker.pathfinder_config("", tfds_dir)
    task = tasks.get_task(config)
    assert isinstance(task, pathfinder_task.PathfinderPrepared)
    ids = {
        split: np.asarray(task.examples(split)["pixels"])[:, 0, 0, 0].astype(np.int32)
        for split in ("train", "val", "test")
    }
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(40))
    steps_per_epoch = 32 // 8
    for step, batch in enumerate(take(task.train_batches(0, 0, 1), worker.TRAIN_STEPS)):
        np.testing.assert_array_equal(seen[f"train/{step}"], worker.example_ids(batch))
        assert len(set(seen[f"train/{step}"].tolist())) == 8
    for epoch in range(worker.TRAIN_STEPS // steps_per_epoch):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        epoch_ids = np.concatenate([seen[f"train/{s}"] for s in steps])
        assert sorted(epoch_ids.tolist()) == sorted(ids["train"].tolist())
    for split in ("val", "test"):
        keys = sorted(k for k in seen if k.startswith(f"{split}/") and k.endswith("/ids"))
        got = np.concatenate([seen[k] for k in keys])
        weight = np.concatenate([seen[k.replace("/ids", "/weight")] for k in keys])
        assert sorted(got[weight > 0].tolist()) == sorted(ids[split].tolist())
    for p in range(2):
        with np.load(tmp_path / f"global.npz.reads{p}.npz") as reads:
            expected = [
                r
                for step in range(worker.TRAIN_STEPS)
                for r in loader.train_rows(config.seed, step, 32, 8, p, 2)
            ]
            assert reads["train"].tolist() == [int(r) for r in expected]
            for split in ("val", "test"):
                own = [int(r) for rows, _ in loader.eval_rows(4, 8, p, 2) for r in rows]
                assert reads[split].tolist() == own


# ----------------------------------------------------------------------------- errors


def test_missing_prepared_data_names_the_layout_and_the_command(tmp_path):
    config = listops_config(tmp_path)
    config.data.lra_dir = ""
    with pytest.raises(errors.DatasetMissingError) as info:
        tasks.tfds_release(config).open_split(config, "train")
    message = str(info.value)
    assert "no prepared tfds dataset lra_listops/len12" in message
    # The variant the run reads (its preset's length), which the config file alone lacks: the
    # command used to prepare len2048, and the run then asked for len12 again.
    assert (
        "python -m experiments.prepare --config=experiments/configs/lra/listops.py "
        "--config.data.lra_dir=LRA_DIR --config.data.seq_len=12 "
        f"--config.data.tfds_dir={tmp_path / 'tfds'}"
    ) in message
    config.data.skip_bad_rows = True
    with pytest.raises(
        errors.DatasetMissingError, match=r"seq_len=12 --config\.data\.skip_bad_rows=True "
    ):
        tasks.tfds_release(config).open_split(config, "train")
    config.data.skip_bad_rows = False
    assert "listops-1000/basic_{train,val,test}.tsv" in message
    with pytest.raises(tasks.DataUnavailableError, match=r"experiments.prepare.*"):
        tasks.get_task(config)
    config.data.lra_dir = str(tmp_path / "nowhere")
    with pytest.raises(errors.DatasetMissingError, match=r"(?s)basic_train.tsv.*tsv_data/new_aan"):
        prepare.prepare(config)
    wiki = wikitext_config(tmp_path, "bytes")
    wiki.data.wikitext_dir = ""
    with pytest.raises(
        errors.DatasetMissingError,
        match=r"(?s)lm/wikitext103.py .*tokenizer_path=bytes.*wiki.\{train",
    ):
        tasks.tfds_release(wiki).open_split(wiki, "val")


def test_prepare_command_user_errors_are_one_line_with_exit_code_2(tmp_path):
    """``python -m experiments.prepare`` as ``experiments.train``: a missing release folder or an
    unknown config key is one ``error:`` line naming the path or key (exit code 2), no traceback."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)}
    for flags, expected in [
        (
            [f"--config.data.lra_dir={tmp_path / 'nowhere'}", f"--config.data.tfds_dir={tmp_path}"],
            rf"error: DatasetMissingError: basic_train.tsv not found: looked for "
            rf"{tmp_path / 'nowhere'}/listops-1000/basic_train.tsv",
        ),
        (["--config.data.lra_dri=x"], r"error: unknown config key --config.data.lra_dri"),
    ]:
        command = [sys.executable, "-m", "experiments.prepare"]
        command += ["--config=experiments/configs/lra/listops.py", *flags]
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and re.match(expected, lines[0]), proc.stderr[-2000:]


def test_bad_rows_stop_preparation_unless_skipped(tmp_path):
    folder = fx.write_listops(tmp_path, rows=6, extra="( [MAX 1 ] )\t12\n")
    config = fx.tiny_config(
        "lra.listops",
        source="release",
        lra_dir=str(tmp_path),
        seq_len=12,
        tfds_dir=str(tmp_path / "tfds"),
    )
    with pytest.raises(errors.BadDataError, match=f"{folder / 'basic_train.tsv'}:8: label '12'"):
        prepare.prepare(config)
    assert not tasks.tfds_release(config).is_prepared(config)
    config.data.skip_bad_rows = True
    with pytest.warns(UserWarning, match="1 bad example"):
        assert prepare.prepare(config)["train"] == 6
    assert (tmp_path / "tfds" / "lra_listops" / "len12_skipbad").is_dir()


def test_unfinished_tfds_folder_is_refused_and_kept(tmp_path):
    """A version folder without tfds's finished files (an interrupted copy) is neither taken as
    prepared (tfds reuses any existing folder) nor removed."""
    config = listops_config(tmp_path)
    folder = tmp_path / "tfds" / "lra_listops" / "len12" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "lra_listops-train.array_record-00000-of-00001").write_bytes(b"partial")
    with pytest.raises(errors.DatasetMissingError, match=rf"{folder} exists but .*remove that"):
        prepare.prepare(config)
    assert (folder / "lra_listops-train.array_record-00000-of-00001").read_bytes() == b"partial"


def test_prepare_again_from_other_release_files_is_refused(tmp_path):
    """The metadata record the sizes of the source files; preparing again from files that
    differ (a row added) stops naming the file instead of reusing the old data silently."""
    config = listops_config(tmp_path)
    assert prepare.prepare(config)["test"] == 8
    meta = tasks.tfds_release(config).metadata(config)
    assert sorted(meta["source_files"]) == [f"basic_{s}.tsv" for s in ("test", "train", "val")]
    assert prepare.prepare(config)["test"] == 8  # the same files: reused
    test_file = tmp_path / "lra_release" / "lra_release" / "listops-1000" / "basic_test.tsv"
    size = test_file.stat().st_size
    with test_file.open("a") as f:
        f.write("( [MAX 1 2 ] )\t2\n")
    folder = tmp_path / "tfds" / "lra_listops" / "len12" / "1.0.0"
    before = sorted(p.name for p in folder.iterdir())
    stale = (
        rf"prepared from other files .*\(basic_test.tsv: {size} bytes then, "
        rf"{test_file.stat().st_size} bytes now\): remove {folder} to prepare it again"
    )
    with pytest.raises(ValueError, match=stale):
        prepare.prepare(config)
    # Training refuses them too (it read the old data without a word: second user review).
    with pytest.raises(ValueError, match=stale):
        tasks.get_task(config)
    assert sorted(p.name for p in folder.iterdir()) == before  # left as it was
    without_release = config.copy_and_resolve_references()
    without_release.data.lra_dir = str(tmp_path / "elsewhere")  # a host with the tfds data only
    assert tasks.get_task(without_release).num_examples("test") == 8


def test_leftovers_of_an_interrupted_preparation_are_named_and_kept(tmp_path, caplog):
    """A killed preparation leaves its scratch folder (the readers' arrays) and tfds's
    incomplete.* folder: the next one warns naming them, removes neither, and prepares."""
    config = listops_config(tmp_path)
    scratch = tmp_path / "tfds" / ".lra_listops-scratch-killed"
    incomplete = tmp_path / "tfds" / "lra_listops" / "len12" / "incomplete.ABC123_1.0.0"
    for folder in (scratch, incomplete):
        folder.mkdir(parents=True)
        (folder / "part").write_bytes(b"x")
    with caplog.at_level("WARNING"):
        assert prepare.prepare(config)["train"] == 8
    assert "interrupted preparation" in caplog.text
    assert str(scratch) in caplog.text and str(incomplete) in caplog.text
    assert (scratch / "part").is_file() and (incomplete / "part").is_file()


def test_wikitext_prepared_with_another_tokenizer_is_refused(tmp_path):
    """Two BPE tokenizers share the config name gpt2_block<L>: the files' SHA-256 in the metadata
    tell them apart, when preparing again and when reading (unless no tokenizer is at hand)."""
    config = wikitext_config(tmp_path, "bpe")
    prepare.prepare(config)
    other = fx.write_bpe_tokenizer(tmp_path / "tokenizer-300.json", vocab_size=300)
    config.data.tokenizer_path = str(other)
    with pytest.raises(ValueError, match=r"gpt2_block16 .* prepared with another tokenizer"):
        prepare.prepare(config)
    with pytest.raises(ValueError, match=r"tokenizer_path at the tokenizer it was prepared with"):
        tasks.get_task(config)
    config.data.tokenizer_path = str(tmp_path / "not-on-this-host.json")  # a pod host
    assert isinstance(tasks.get_task(config), wikitext_task.WikiTextPrepared)


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
@pytest.mark.parametrize("what", ["listops", "wikitext"])
def test_tiny_preset_trains_from_the_tfds_data(tmp_path, what):
    config = (
        listops_config(tmp_path, rows=16)
        if what == "listops"
        else wikitext_config(tmp_path, "bytes")
    )
    prepare.prepare(config)
    config.data.lra_dir = config.data.wikitext_dir = ""  # read the tfds data only
    assert isinstance(
        tasks.get_task(config),
        listops_task.ListOpsPrepared if what == "listops" else wikitext_task.WikiTextPrepared,
    )
    fx.train_briefly(config, tmp_path / "run", steps=2)

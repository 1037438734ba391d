"""Real-data pipelines on release-layout fixtures: ListOps, AAN, Pathfinder / Path-X, WikiText-103.

Every pipeline: documented shapes, dtypes, label ranges and split sizes; bad rows reported with
file and line (or skipped with data.skip_bad_rows); two simulated processes see every example
exactly once per epoch and in evaluation; resumption is exact.
"""

from __future__ import annotations

from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
from data_fixtures import assert_batch_lists_equal, pathfinder_config, take
from data_fixtures import tiny_config as config_of

from hgrn_jax import tasks
from hgrn_jax.data import errors, loader, release, retrieval, wikitext
from hgrn_jax.tasks import listops as listops_task
from hgrn_jax.tasks import pathfinder as pathfinder_task
from hgrn_jax.tasks import retrieval as retrieval_task
from hgrn_jax.tasks import wikitext103 as wikitext_task

# ----------------------------------------------------------------------------- release folder


@pytest.mark.parametrize("nesting", ["", "lra_release", "lra_release/lra_release"])
def test_release_folder_is_found_nested_or_not(tmp_path, nesting):
    fx.write_aan(tmp_path / nesting)
    path = retrieval.find_file(str(tmp_path), "val")
    assert path == tmp_path / nesting / "tsv_data" / "new_aan_pairs.eval.tsv"


def test_missing_release_names_what_to_put_where(tmp_path):
    with pytest.raises(
        errors.DatasetMissingError,
        match=r"lra_release/tsv_data/new_aan_pairs.train.tsv.*--config.data.lra_dir",
    ):
        retrieval.find_file(str(tmp_path), "train")
    with pytest.raises(errors.DatasetMissingError, match=r"set --config.data.lra_dir=FOLDER"):
        release.find_release_path("", "pathfinder32", what="Pathfinder")
    config = config_of("lra.retrieval", source="release", lra_dir=str(tmp_path))
    with pytest.raises(tasks.DataUnavailableError, match=r"new_aan_pairs.*source=synthetic"):
        tasks.get_task(config)


def test_lra_dir_set_one_task_folder_too_deep_names_the_release_folder(tmp_path):
    root = tmp_path / "lra_release"
    fx.write_aan(root)
    (root / "listops-1000").mkdir()
    with pytest.raises(
        errors.DatasetMissingError,
        match=rf"lies inside the release: .*set --config.data.lra_dir={root}$",
    ):
        retrieval.find_file(str(root / "listops-1000"), "train")


# ----------------------------------------------------------------------------- ListOps


def test_listops_release_nested_shapes_and_labels(tmp_path):
    fx.write_listops(tmp_path / "lra_release" / "lra_release", rows=6)
    config = config_of(
        "lra.listops",
        source="release",
        lra_dir=str(tmp_path),
        seq_len=12,
        cache_dir=str(tmp_path / "cache"),
    )
    task = tasks.get_task(config)
    assert isinstance(task, listops_task.ListOpsRelease)
    examples = task.examples("val")
    assert examples["inputs"].shape == (6, 12) and examples["inputs"].dtype == np.uint8
    np.testing.assert_array_equal(examples["labels"], [3, 3, 3, 3, 4, 5])
    np.testing.assert_array_equal(examples["lengths"], [5] * 6)  # [MAX v 3 ] <eos>


def test_listops_bad_rows_are_reported_or_skipped(tmp_path):
    # '²' is a digit to str.isdigit but not to int() (it was a bare ValueError, no file or line).
    bad = "( [MAX 1 ] )\t12\njust one field\n( [MAX 1 2 ] )\t\u00b2\n"
    folder = fx.write_listops(tmp_path, rows=6, extra=bad)
    config = config_of(
        "lra.listops",
        source="release",
        lra_dir=str(tmp_path),
        seq_len=12,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(errors.BadDataError) as info:
        tasks.get_task(config).examples("train")
    message = str(info.value)
    assert "3 bad example(s)" in message
    assert f"{folder / 'basic_train.tsv'}:8: label '12' is not a class in 0..9" in message
    assert f"{folder / 'basic_train.tsv'}:9: expected 2 tab-separated fields; got 1" in message
    assert f"{folder / 'basic_train.tsv'}:10: label '²' is not a class" in message
    assert "--config.data.skip_bad_rows=True" in message
    config.data.skip_bad_rows = True
    with pytest.warns(errors.SkippedExamplesWarning, match="3 bad example"):
        assert tasks.get_task(config).num_examples("train") == 6


# ----------------------------------------------------------------------------- AAN


def _load_aan_train(root: Path, skip_bad_rows: bool) -> dict:
    """The AAN training split under ``root`` at sequence length 16 (cache in ``root/cache``)."""
    return retrieval.load_split(
        "train",
        lra_dir=str(root),
        cache_dir=str(root / "cache"),
        seq_len=16,
        skip_bad_rows=skip_bad_rows,
    )


def test_aan_an_unclosed_quote_is_not_skipped_with_the_rows_it_took_in(tmp_path):
    """A quote left open reads the good rows after it into one bad row: skipping that row would
    drop them unannounced (20 of 30 good rows were kept, with one 'bad example' warned of)."""
    good = "".join(f"{i % 2}\tid{i}\tjd{i}\tdoc {i}\tother {i}\n" for i in range(10))
    broken = good + '1\ta\tb\t"open quote\ty\n' + good + 'x "q" \n' + good
    fx.write_aan(tmp_path, rows_per_split=0, extra={s: broken for s in ("train", "eval", "test")})
    for skip in (False, True):
        with pytest.raises(errors.BadDataError) as info:
            _load_aan_train(tmp_path, skip_bad_rows=skip)
        message = str(info.value)
        assert "new_aan_pairs.train.tsv:11: expected 5 tab-separated fields; got 4" in message
        assert "spanning lines 11-22" in message and "skipping rows cannot help" in message
        assert message.count("spanning lines 11-22") == 1  # it was said twice


def test_aan_an_empty_file_is_not_offered_skipping(tmp_path):
    folder = fx.write_aan(tmp_path, rows_per_split=4)
    (folder / "new_aan_pairs.train.tsv").write_text("")
    with pytest.raises(errors.BadDataError, match=r"(?s)no examples.*skipping rows cannot help"):
        _load_aan_train(tmp_path, skip_bad_rows=True)


def test_aan_quoted_texts_keep_their_rows(tmp_path):
    fx.write_aan(tmp_path, rows_per_split=8)
    config = config_of(
        "lra.retrieval",
        source="release",
        lra_dir=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        seq_len=32,
    )
    config.batch_size = 4
    task = tasks.get_task(config)
    assert isinstance(task, retrieval_task.AanRelease)
    examples = task.examples("train")
    for key in ("inputs", "inputs2"):
        assert examples[key].shape == (8, 32) and examples[key].dtype == np.uint8
    np.testing.assert_array_equal(examples["labels"], [1, 0, 1, 0] * 2)
    vocab = retrieval.vocabulary(
        lra_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), seq_len=32
    )
    assert examples[key].max() < len(vocab) <= config.model.vocab_size
    doc = lambda key, i: decode(
        vocab, examples[key][i], examples[key.replace("inputs", "lengths")][i]
    )
    assert doc("inputs", 0) == 'He said "hi"\tand left.'
    assert doc("inputs2", 1) == "tab\tinside\tquotes"
    assert doc("inputs", 2) == "line one\nline two"
    assert doc("inputs", 3) == 'mid "quote" stays'
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == bool
    assert batch["inputs2"].shape == (config.batch_size, 32)
    assert set(np.unique(batch["labels"])) <= {0, 1}


def decode(vocab, ids, length) -> str:
    """The characters of a document's ids, which end in ``<eos>`` and are padded with 0."""
    assert ids[length - 1] == vocab.index["<eos>"] and not ids[length:].any()
    return "".join(vocab.tokens[i] for i in ids[: length - 1])


def test_aan_truncates_to_seq_len_characters_with_the_end_token(tmp_path):
    fx.write_aan(tmp_path, rows_per_split=4)
    examples = retrieval.load_split(
        "train", lra_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), seq_len=8
    )
    vocab = retrieval.vocabulary(lra_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), seq_len=8)
    assert decode(vocab, examples["inputs"][0], 8) == "He said"
    np.testing.assert_array_equal(examples["lengths"], [8, 8, 8, 8])
    np.testing.assert_array_equal(examples["lengths2"], [8, 8, 2, 3])


def test_aan_bad_rows_name_file_and_line(tmp_path):
    bad = (
        "x\ta\tb\tt1\tt2\n"
        "2\ta\tb\tt1\tt2\n"
        "only\tthree\tfields\n"
        "1\ta\tb\t\tt2\n"
        '1\ta\tb\t"unterminated\tt2\n1\tc\td\te\tf\n'
    )
    folder = fx.write_aan(tmp_path, rows_per_split=8, extra={"train": bad})
    path = folder / "new_aan_pairs.train.tsv"
    # 8 good rows take 10 lines (row 3 of each 4 holds a newline inside quotes).
    with pytest.raises(errors.BadDataError) as info:
        _load_aan_train(tmp_path, skip_bad_rows=False)
    message = str(info.value)
    assert "5 bad example(s)" in message
    assert f"{path}:11: label 'x' is not a number" in message
    assert f"{path}:12: label '2' not in 0..1" in message
    assert f"{path}:13: expected 5 tab-separated fields" in message
    assert f"{path}:14: empty document" in message
    assert f"{path}:15: expected 5 tab-separated fields" in message  # the unclosed quote
    # The unclosed quote took in the good row after it: skipping would drop that row too.
    with pytest.raises(errors.BadDataError, match="skipping rows cannot help"):
        _load_aan_train(tmp_path, skip_bad_rows=True)
    fx.write_aan(tmp_path, rows_per_split=8, extra={"train": bad.replace('"unterminated', "t1")})
    with pytest.warns(UserWarning, match="4 bad example"):
        examples = _load_aan_train(tmp_path, skip_bad_rows=True)
    assert len(examples["labels"]) == 10  # the 8 rows, the repaired row and the one after it


def test_prepared_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path):
    fx.write_aan(tmp_path, rows_per_split=4)
    cache = tmp_path / "cache"
    retrieval.load_split("test", lra_dir=str(tmp_path), cache_dir=str(cache), seq_len=8)
    retrieval.load_split("test", lra_dir=str(tmp_path), cache_dir=str(cache), seq_len=8)
    folders = lambda: sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert folders() == ["aan", "aan-vocab"]  # the training file's vocabulary, the test ids
    path = tmp_path / "tsv_data" / "new_aan_pairs.test.tsv"
    path.write_text(path.read_text() + fx.aan_line(fx.AAN_ROWS[0]))
    examples = retrieval.load_split("test", lra_dir=str(tmp_path), cache_dir=str(cache), seq_len=8)
    assert len(examples["labels"]) == 5 and folders() == ["aan", "aan", "aan-vocab"]


# ----------------------------------------------------------------------------- Pathfinder


def grey_values(batch) -> np.ndarray:
    """The example id of each row: fixture image i is constant grey i, i.e. x = i / 127.5 - 1."""
    return np.round((batch["inputs"][:, 0, 0] + 1.0) * 127.5).astype(int)


def test_pathfinder_split_sizes_values_and_labels(tmp_path):
    fx.write_pathfinder(tmp_path, 32, count=40)
    task = tasks.get_task(pathfinder_config(tmp_path))
    assert isinstance(task, pathfinder_task.PathfinderRelease)
    sizes = {s: task.num_examples(s) for s in ("train", "val", "test")}
    assert sizes == {"train": 32, "val": 4, "test": 4}  # 80 / 10 / 10
    seen = np.concatenate([task.examples(s)["pixels"][:, 0, 0, 0] for s in sizes])
    np.testing.assert_array_equal(np.sort(seen), np.arange(40))
    for split in sizes:
        examples = task.examples(split)
        assert examples["pixels"].dtype == np.uint8
        assert examples["pixels"].shape == (sizes[split], 32, 32, 1)
        np.testing.assert_array_equal(examples["labels"], examples["pixels"][:, 0, 0, 0] % 2)
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].shape == (4, 1024, 1) and batch["inputs"].dtype == np.float32
    np.testing.assert_allclose(batch["inputs"][:, 0, 0], grey_values(batch) / 127.5 - 1.0)


def test_two_processes_see_each_example_once_per_epoch_and_in_eval(tmp_path):
    fx.write_pathfinder(tmp_path, 32, count=40)
    task = tasks.get_task(pathfinder_config(tmp_path))
    train_ids = set(task.examples("train")["pixels"][:, 0, 0, 0].tolist())
    steps = task.steps_per_epoch()  # 32 // 4
    for epoch in range(2):
        seen = []
        for process in (0, 1):
            for batch in take(task.train_batches(epoch * steps, process, 2), steps):
                assert batch["inputs"].shape[0] == 2
                seen.extend(grey_values(batch).tolist())
        assert sorted(seen) == sorted(train_ids)
    for split in ("val", "test"):
        seen = []
        for process in (0, 1):
            with pytest.raises(ValueError, match="multiple of the number of processes"):
                next(task.eval_batches(split, process, 2))  # eval_batch_size 3 is odd
        task.config.eval_batch_size = 2
        for process in (0, 1):
            for batch in task.eval_batches(split, process, 2):
                seen.extend(grey_values(batch)[batch["weight"] > 0].tolist())
        assert sorted(seen) == sorted(task.examples(split)["pixels"][:, 0, 0, 0].tolist())
        task.config.eval_batch_size = 3


def test_training_order_resumes_exactly_and_matches_the_loader(tmp_path):
    fx.write_pathfinder(tmp_path, 32, count=40)
    task = tasks.get_task(pathfinder_config(tmp_path))
    uninterrupted = take(task.train_batches(0, 1, 2), 20)  # 2.5 epochs
    resumed = take(tasks.get_task(pathfinder_config(tmp_path)).train_batches(13, 1, 2), 7)
    assert_batch_lists_equal(uninterrupted[13:], resumed)
    n = task.num_examples("train")
    for step in (0, 9, 17):
        rows = loader.train_rows(task.config.seed, step, n, 4, 1, 2)
        np.testing.assert_array_equal(
            task.examples("train")["pixels"][rows, 0, 0, 0], grey_values(uninterrupted[step])
        )


def test_pathfinder_bad_images_and_metadata_are_reported(tmp_path):
    base = fx.write_pathfinder(
        tmp_path,
        32,
        count=20,
        empty_image=True,
        bad_lines=["imgs/0 missing.png 5 1 1.5", "imgs/0 sample_0.png 0 7 1.5", "too short"],
    )
    config = pathfinder_config(tmp_path)
    with pytest.raises(errors.BadDataError) as info:
        tasks.get_task(config).examples("train")
    meta = base / "metadata" / "1.npy"
    message = str(info.value)
    assert "4 bad example(s)" in message
    assert f"{meta}:11: {base}/imgs/0/sample_empty.png: empty image file" in message
    assert f"{meta}:12: {base}/imgs/0/missing.png: image file missing" in message
    assert f"{meta}:13: label 7 not in 0..1" in message
    assert f"{meta}:14: expected at least 4 fields" in message
    config.data.skip_bad_rows = True
    with pytest.warns(UserWarning, match="4 bad example"):
        task = tasks.get_task(config)
        assert sum(task.num_examples(s) for s in ("train", "val", "test")) == 20


@pytest.mark.parametrize("damage", ["empty", "binary"])
def test_a_pathfinder_metadata_file_that_cannot_be_counted_stops_even_with_skip_bad_rows(
    tmp_path, damage
):
    """An empty metadata file was taken without a word (half the examples gone), and a binary
    one, with skip_bad_rows, counted as one bad example while all its lines were dropped and
    the other examples moved between splits (their split depends on the line count)."""
    base = fx.write_pathfinder(tmp_path, 32, count=20)
    meta = sorted((base / "metadata").glob("*.npy"))[0]
    meta.write_bytes(b"" if damage == "empty" else b"\x93NUMPY\xff\xfe")
    config = pathfinder_config(tmp_path)
    config.data.skip_bad_rows = True
    expected = "empty metadata file" if damage == "empty" else "unreadable metadata file"
    with pytest.raises(errors.BadDataError, match=rf"^{meta}: {expected} .*restore it"):
        tasks.get_task(config).examples("train")


def test_pathfinder_without_its_images_says_so_with_skip_bad_rows(tmp_path):
    """Every image missing (imgs/ not unpacked), bad rows skipped: the message said that
    metadata/*.npy lists no example, though it listed 20."""
    import shutil

    base = fx.write_pathfinder(tmp_path, 32, count=20)
    shutil.rmtree(base / "imgs")
    config = pathfinder_config(tmp_path)
    config.data.skip_bad_rows = True
    with (
        pytest.warns(UserWarning, match="20 bad example"),
        pytest.raises(ValueError, match=r"all 20 that metadata/\*\.npy lists were skipped as bad"),
    ):
        tasks.get_task(config).examples("train")


def test_pathx_reads_128_pixel_images(tmp_path):
    fx.write_pathfinder(tmp_path, 128, count=10)
    config = pathfinder_config(tmp_path, task="lra.pathx", resolution=128)
    config.batch_size = 2
    task = tasks.get_task(config)
    assert task.examples("train")["pixels"].shape == (8, 128, 128, 1)
    batch = next(task.train_batches(0, 0, 1))
    assert batch["inputs"].shape == (2, 128 * 128, 1)
    config.data.image_size = 32
    with pytest.raises(ValueError, match="data.image_size must be 128"):
        tasks.get_task(config)


# ----------------------------------------------------------------------------- WikiText-103


def test_wikitext_bpe_blocks_and_line_ends(tmp_path):
    folder = fx.write_wikitext(tmp_path / "wikitext-103-raw")
    tokenizer_path = fx.write_bpe_tokenizer(tmp_path / "tokenizer.json")
    config = config_of(
        "lm.wikitext103",
        source="release",
        wikitext_dir=str(tmp_path),
        tokenizer_path=str(tokenizer_path),
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
    )
    config.model.vocab_size = 320
    task = tasks.get_task(config)
    assert isinstance(task, wikitext_task.WikiTextRelease)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id("<|endoftext|>")
    expected = []
    for line in (folder / "wiki.valid.raw").read_text(encoding="utf-8").splitlines():
        expected += tok.encode(line.strip()).ids + [eos]
    blocks = task.examples("val")["ids"]
    num = -(-len(expected) // 16)  # every token a target once: the first block's input is eos
    assert blocks.shape == (num, 17)
    np.testing.assert_array_equal(blocks[1], expected[15:32])
    batch = next(task.eval_batches("val", 0, 1))
    assert batch["ids"].dtype == np.int32 and batch["ids"].shape == (config.batch_size, 17)
    assert batch["ids"].max() < 320
    config.model.vocab_size = 256
    with pytest.raises(ValueError, match=r"vocab_size 256 is smaller .* \(320\)"):
        tasks.get_task(config)


def test_wikitext_half_a_tokenizer_and_a_too_short_split_name_the_file(tmp_path):
    """A tokenizer folder with encoder.json but no vocab.bpe said only "no tokenizer at ...";
    a split shorter than a block said "0 tokens are fewer than data.seq_len + 1", naming
    neither the split nor its file."""
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "encoder.json").write_text("{}")
    with pytest.raises(
        errors.DatasetMissingError,
        match=r"holds encoder\.json but no file vocab\.bpe \(GPT-2's tokenizer is encoder\.json "
        r"\+ vocab\.bpe\); put vocab\.bpe there",
    ):
        wikitext.tokenizer_files(str(gpt2))
    folder = fx.write_wikitext(tmp_path / "wikitext-103-raw")
    (folder / "wiki.train.raw").write_text("\n")
    config = fx.byte_wikitext_config(tmp_path, seq_len=16)
    with pytest.raises(
        ValueError,
        match=rf"^1 tokens in the train split \({folder / 'wiki.train.raw'}\) are fewer than "
        r"data\.seq_len \+ 1 = 17: give a longer file, or a smaller --config\.data\.seq_len$",
    ):
        tasks.get_task(config).examples("train")


def test_wikitext_byte_tokenizer_needs_no_file(tmp_path):
    folder = fx.write_wikitext(tmp_path)
    tokens, tokenizer = wikitext.load_tokens(
        "test", wikitext_dir=str(folder), tokenizer_path="bytes", cache_dir=str(tmp_path / "cache")
    )
    text = "".join(
        line.strip() + "\n"
        for line in (folder / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    )
    assert tokenizer.vocab_size == 256
    assert bytes(np.asarray(tokens, np.uint8)) == text.encode("utf-8")


def test_long_preparations_log_their_progress(tmp_path, monkeypatch, caplog):
    """Decoding Pathfinder images, tokenising WikiText and encoding AAN pairs log ``done/total``
    at INFO (at most every loader.PROGRESS_EVERY_S seconds; 0 here, so every step) and a final
    count."""
    import logging

    from hgrn_jax.data import pathfinder

    monkeypatch.setattr(loader, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    fx.write_pathfinder(tmp_path, 32, count=4)
    pathfinder.load_split(
        "train", lra_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), resolution=32
    )
    monkeypatch.setattr(wikitext, "CHUNK_LINES", 10)
    folder = fx.write_wikitext(tmp_path / "wiki", repeats=4)  # 2 x 5 test lines
    wikitext.load_tokens(
        "test", wikitext_dir=str(folder), tokenizer_path="bytes", cache_dir=str(tmp_path / "c")
    )
    fx.write_aan(tmp_path, rows_per_split=3)
    retrieval.load_split("val", lra_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), seq_len=8)
    messages = [r.getMessage() for r in caplog.records]
    pairs = tmp_path / "tsv_data" / "new_aan_pairs.eval.tsv"
    assert [m for m in messages if m.startswith(f"{pairs}: encoding")] == [
        f"{pairs}: encoding: {done}/3 pairs (0 s)" for done in (1, 2, 3, 3)
    ]
    root = tmp_path / "pathfinder32" / "curv_contour_length_14"
    for done in (1, 4):
        assert f"{root}: decoding: {done}/4 images (0 s)" in messages
    tokens_file = folder / "wiki.test.raw"
    assert [m for m in messages if m.startswith(f"{tokens_file}: tokenising")] == [
        f"{tokens_file}: tokenising: 10 lines (0 s)",
        f"{tokens_file}: tokenising: 10 lines (0 s)",
    ]


def test_wikitext_text_that_is_not_utf8_names_its_line(tmp_path):
    """The text reader decodes in blocks: its error had named line 4818 for a bad byte on
    line 5001 (and 'after line 0' for one on line 1)."""
    folder = fx.write_wikitext(tmp_path)
    lines = b"hello world line\n" * 5000
    (folder / "wiki.train.raw").write_bytes(lines + b"caf\xe9\n" + lines)
    with pytest.raises(
        errors.BadDataError, match=r"wiki\.train\.raw:5001: not valid UTF-8 at byte 4"
    ):
        wikitext.load_tokens(
            "train",
            wikitext_dir=str(folder),
            tokenizer_path="bytes",
            cache_dir=str(tmp_path / "cache"),
        )


def test_wikitext_a_file_that_is_no_tokenizer_names_the_key(tmp_path):
    garbage = tmp_path / "tokenizer.json"
    garbage.write_text('{"not": "a tokenizer"}')
    with pytest.raises(errors.BadDataError, match=r"data.tokenizer_path=.*is not a tokenizer"):
        wikitext.LineTokenizer(str(garbage))


def test_wikitext_missing_files_name_the_fix(tmp_path):
    with pytest.raises(errors.DatasetMissingError, match=r"--config.data.wikitext_dir=FOLDER"):
        wikitext.find_file(str(tmp_path), "train")
    fx.write_wikitext(tmp_path)
    with pytest.raises(errors.DatasetMissingError, match=r"tokenizer_path=bytes"):
        wikitext.LineTokenizer(str(tmp_path / "no_tokenizer.json"))


# ----------------------------------------------------------------------------- end to end


def fixture_config(what: str, tmp_path):
    """A tiny run of each real-data family on its release-layout fixture."""
    if what == "retrieval":
        fx.write_aan(tmp_path / "lra_release", rows_per_split=16)
        config = config_of(
            "lra.retrieval",
            source="release",
            lra_dir=str(tmp_path),
            cache_dir=str(tmp_path / "cache"),
            seq_len=16,
        )
    elif what == "pathfinder":
        fx.write_pathfinder(tmp_path, 32, count=40)
        config = pathfinder_config(tmp_path)
    else:
        fx.write_wikitext(tmp_path)
        config = fx.byte_wikitext_config(tmp_path, seq_len=32)
    return config


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
@pytest.mark.parametrize("what", ["retrieval", "pathfinder", "wikitext"])
def test_trains_end_to_end_on_the_release_fixture(tmp_path, what):
    fx.train_briefly(fixture_config(what, tmp_path), tmp_path / "run", steps=3)


@pytest.mark.slow  # end-to-end / multi-process / shared multi-mesh fixture: over 20 s
def test_two_real_processes_see_each_example_once(tmp_path):
    """Two JAX processes (loopback coordinator, gloo) read their shards of the same fixture and
    assemble global batches with make_array_from_process_local_data: each epoch and each eval
    split covers every example exactly once, and the global batches are the one-process ones."""
    import data_multihost_worker as worker

    fx.write_pathfinder(tmp_path, 32, count=40)
    seen = worker.run_two_processes(tmp_path / "global.npz", str(tmp_path))
    task = tasks.get_task(worker.pathfinder_config(str(tmp_path)))
    train_ids = sorted(task.examples("train")["pixels"][:, 0, 0, 0].tolist())
    for epoch in range(2):
        ids = np.concatenate([seen[f"train/{s}"] for s in range(4 * epoch, 4 * epoch + 4)])
        assert sorted(ids.tolist()) == train_ids
    for step, batch in enumerate(take(task.train_batches(0, 0, 1), worker.TRAIN_STEPS)):
        np.testing.assert_array_equal(seen[f"train/{step}"], worker.example_ids(batch))
    for split in ("val", "test"):
        keys = sorted(k for k in seen if k.startswith(f"{split}/") and k.endswith("/ids"))
        ids = np.concatenate([seen[k] for k in keys])
        weight = np.concatenate([seen[k.replace("/ids", "/weight")] for k in keys])
        assert sorted(ids[weight > 0].tolist()) == sorted(
            task.examples(split)["pixels"][:, 0, 0, 0].tolist()
        )


def test_prepare_command_fills_the_cache(tmp_path):
    from experiments import prepare

    fx.write_aan(tmp_path / "lra_release", rows_per_split=8)
    config = config_of(
        "lra.retrieval",
        source="release",
        lra_dir=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
    )
    assert prepare.prepare(config) == {"train": 8, "val": 8, "test": 8}
    assert len(list((tmp_path / "cache").glob("aan-????????????/DONE"))) == 3
    assert len(list((tmp_path / "cache").glob("aan-vocab-*/DONE"))) == 1


def test_prepare_command_says_when_the_data_were_already_prepared(tmp_path):
    """A second ``experiments.prepare`` finds the cache filled and writes nothing: it said
    "prepared in CACHE" all the same, as if it had read the release again."""
    from experiments import prepare

    fx.write_aan(tmp_path / "lra_release", rows_per_split=8)
    cache = tmp_path / "cache"
    config = config_of(
        "lra.retrieval", source="release", lra_dir=str(tmp_path), cache_dir=str(cache), seq_len=16
    )
    first = prepare.prepare_and_describe(config)
    assert first.startswith(f"retrieval (release) prepared in {cache} in ")
    assert first.endswith(" s: 8 train, 8 val, 8 test")
    second = prepare.prepare_and_describe(config)
    assert second.startswith(f"retrieval (release) already prepared in {cache} in ")


def test_prepare_command_says_a_source_writing_no_files_has_nothing_to_prepare(tmp_path):
    """WikiText-103's synthetic bytes are made in memory as each run starts: the command said
    "prepared in CACHE" of a folder it never wrote."""
    from experiments import prepare

    cache = tmp_path / "cache"
    config = config_of("lm.wikitext103", source="synthetic", cache_dir=str(cache))
    line = prepare.prepare_and_describe(config)
    assert line.startswith(
        "wikitext103 (synthetic) has nothing to prepare: it writes no files, its data are made "
        "in memory as each run starts ("
    )
    assert " prepared in " not in line and not cache.exists()


def test_gpt2_vocab_and_merges_files_tokenize_like_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    path = fx.write_bpe_tokenizer(tmp_path / "tokenizer.json")
    folder = tmp_path / "gpt2"
    folder.mkdir()
    Tokenizer.from_file(str(path)).model.save(str(folder))  # vocab.json + merges.txt
    lines = list(fx.WIKI_LINES)
    from_json = wikitext.LineTokenizer(str(path))
    from_files = wikitext.LineTokenizer(str(folder))
    assert from_files.eos_id == from_json.eos_id
    np.testing.assert_array_equal(from_files.encode_lines(lines), from_json.encode_lines(lines))


@pytest.mark.parametrize("which", ["tokenizer.json", "vocab + merges", "bytes"])
def test_a_prompt_encodes_without_the_end_of_line_and_decodes_back(tmp_path, which):
    """What experiments.generate uses: ``encode(text)`` (no end-of-line id added) and
    ``decode(ids)``, the inverse of each other on text."""
    from tokenizers import Tokenizer

    path = str(fx.write_bpe_tokenizer(tmp_path / "tokenizer.json"))
    if which == "vocab + merges":
        Tokenizer.from_file(path).model.save(str(tmp_path))
        (tmp_path / "tokenizer.json").unlink()
        path = str(tmp_path)
    tokenizer = wikitext.LineTokenizer("bytes" if which == "bytes" else path)
    text = fx.WIKI_LINES[2].strip()  # with Japanese: several bytes a character
    ids = tokenizer.encode(text)
    assert ids and tokenizer.eos_id not in ids
    assert ids == tokenizer.encode_lines([text]).tolist()[:-1]
    assert tokenizer.decode(ids) == text

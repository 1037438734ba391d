"""WikiText-103's data path: tokenizers that lose text are refused, an empty tokenizer path is no
tokenizer, and the blocks of a memory-mapped token stream travel to worker processes as the
file's name (a copy of the stream each, before)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest
from data_fixtures import take
from data_fixtures import tiny_config as config_of

from hgrn_jax import tasks
from hgrn_jax.data import errors, grain_pipeline, loader, wikitext

EOS = "<|endoftext|>"

# ----------------------------------------------------------------------------- lossless BPE


def byte_symbols() -> list[str]:
    """GPT-2's 256 byte-level symbols (``Ġ`` for the space, ...)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_bpe(folder: Path, vocab: dict[str, int], kind: str) -> str:
    """A BPE tokenizer of ``vocab`` and no merges, in one of the formats LineTokenizer reads;
    its ``data.tokenizer_path``."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tokenizer.json":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(str(folder / "tokenizer.json"))
        return str(folder / "tokenizer.json")
    names = (
        ("encoder.json", "vocab.bpe") if kind == "encoder.json" else ("vocab.json", "merges.txt")
    )
    (folder / names[0]).write_text(json.dumps(vocab), encoding="utf-8")
    (folder / names[1]).write_text("#version: 0.2\n", encoding="utf-8")
    return str(folder)


KINDS = ["encoder.json", "vocab.json", "tokenizer.json"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bpe_without_the_byte_symbols_is_refused(tmp_path, kind):
    """``{"h": 0, "<|endoftext|>": 1}`` loaded, and encoded "hello world" as ``[0, 1]``: all
    but the "h" dropped without a word (old code: no error, so pytest.raises fails)."""
    path = write_bpe(tmp_path / "tok", {"h": 0, EOS: 1}, kind)
    files = wikitext.tokenizer_files(path)
    with pytest.raises(errors.BadDataError) as caught:
        wikitext.LineTokenizer(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"data.tokenizer_path={path!r}: {' + '.join(map(str, files))} loses text: 242 of the 243 "
        "characters probing each byte of UTF-8 text do not come back from encode + decode (e.g. "
        "'0' (byte 0x30) -> '', '1' (byte 0x31) -> '', '2' (byte 0x32) -> ''), so the text "
        "holding them would be dropped; WikiText-103 needs a byte-level BPE (GPT-2's"
    )
    assert message.endswith(
        "or use --config.data.tokenizer_path=bytes for the byte-level tokenizer (vocabulary 256)"
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_bpe_missing_one_byte_symbol_names_it(tmp_path, kind):
    """One symbol short of GPT-2's alphabet: every "a" of the text would be lost."""
    symbols = [s for s in byte_symbols() if s != "a"]
    vocab = {s: i for i, s in enumerate(symbols)} | {EOS: len(symbols)}
    path = write_bpe(tmp_path / "tok", vocab, kind)
    with pytest.raises(
        errors.BadDataError,
        match=r"loses text: 1 of the 243 characters .* \(e\.g\. 'a' \(byte 0x61\) -> ''\)",
    ):
        wikitext.LineTokenizer(path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_byte_level_bpe_loads_and_keeps_every_byte(tmp_path, kind):
    """GPT-2's kind (all 256 byte symbols), even without merges: nothing is lost."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)} | {EOS: len(symbols)}
    tokenizer = wikitext.LineTokenizer(write_bpe(tmp_path / "tok", vocab, kind))
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    text = "hello world " + "".join(char for _, char in wikitext.BYTE_PROBES)
    ids = tokenizer.encode_lines(["hello world", text])
    assert len(ids) == len(b"hello world") + len(text.encode()) + 2
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_bpe_fixture_passes_the_check(tmp_path):
    """The tests' trained byte-level BPE (GPT-2's kind, with merges) and its vocab + merges."""
    from tokenizers import Tokenizer

    path = fx.write_bpe_tokenizer(tmp_path / "tokenizer.json")
    Tokenizer.from_file(str(path)).model.save(str(tmp_path))  # vocab.json + merges.txt
    (tmp_path / "gpt2").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).rename(tmp_path / "gpt2" / name)
    for where in (path, tmp_path / "gpt2"):
        assert wikitext.LineTokenizer(str(where)).vocab_size == 320


# ----------------------------------------------------------------------------- empty path


def test_an_empty_tokenizer_path_is_no_tokenizer_not_the_current_folder(tmp_path, monkeypatch):
    """``Path("")`` is ".": the default ``data.tokenizer_path=""`` took a tokenizer.json of the
    current folder (old code: ``tokenizer_files("")`` returned it, no error)."""
    fx.write_bpe_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    expected = (
        r"^no tokenizer: data\.tokenizer_path is empty \(its default\); point it at GPT-2's "
        r"tokenizer\.json .* or use --config\.data\.tokenizer_path=bytes"
    )
    with pytest.raises(errors.DatasetMissingError, match=expected):
        wikitext.LineTokenizer("")

    def no_file_system(*args):
        raise AssertionError(f"Path{args} looked at the file system")

    monkeypatch.setattr(wikitext, "Path", no_file_system)
    with pytest.raises(errors.DatasetMissingError, match=expected):
        wikitext.tokenizer_files("")


def test_prepare_with_the_default_tokenizer_path_stops_in_a_folder_holding_one(
    tmp_path, monkeypatch
):
    """``experiments.prepare`` of the WikiText config without data.tokenizer_path, run where a
    tokenizer.json lies, prepared the cache with ./tokenizer.json (old code: no error)."""
    from experiments import prepare

    fx.write_wikitext(tmp_path / "wiki")
    fx.write_bpe_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    config = config_of(
        "lm.wikitext103",
        source="release",
        wikitext_dir=str(tmp_path / "wiki"),
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
    )
    assert config.data.tokenizer_path == ""
    with pytest.raises(
        errors.DatasetMissingError, match=r"no tokenizer: data\.tokenizer_path is empty"
    ):
        prepare.prepare(config)
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- blocks


SEQ_LEN = 512


def mapped_tokens(folder: Path, count: int) -> np.ndarray:
    """A memory-mapped uint16 token stream of ``count`` tokens, as :func:`wikitext.load_tokens`
    gives it (a prepared ``.npy`` array)."""
    tokens = np.random.default_rng(0).integers(0, 50_000, count).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    loader.save_arrays(folder, "data", {"tokens": tokens})
    return loader.load_arrays(folder, "data", ("tokens",))["tokens"]


def direct_blocks(tokens: np.ndarray, seq_len: int, rows) -> np.ndarray:
    """Block ``i`` = ``tokens[i * seq_len : i * seq_len + seq_len + 1]``, computed directly."""
    return np.stack([np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1]) for i in rows])


def test_blocks_are_the_stream_windows_with_stride_seq_len(tmp_path):
    tokens = mapped_tokens(tmp_path / "data", 100_000)
    blocks = wikitext.blocks(tokens, SEQ_LEN)
    num = (100_000 - 1) // SEQ_LEN
    assert (len(blocks), blocks.shape, blocks.dtype, blocks.ndim) == (num, (num, 513), "uint16", 2)
    np.testing.assert_array_equal(np.asarray(blocks), direct_blocks(tokens, SEQ_LEN, range(num)))
    np.testing.assert_array_equal(blocks[3], tokens[3 * SEQ_LEN : 4 * SEQ_LEN + 1])
    rows = np.array([7, 0, num - 1, 7])
    np.testing.assert_array_equal(blocks[rows], direct_blocks(tokens, SEQ_LEN, rows))
    np.testing.assert_array_equal(blocks[-1], tokens[(num - 1) * SEQ_LEN : num * SEQ_LEN + 1])
    np.testing.assert_array_equal(np.stack(list(blocks)), np.asarray(blocks))


def test_pickled_blocks_of_a_mapped_stream_are_its_file_name(tmp_path):
    """The blocks were a sliding-window view, which pickles by value: 200 kB here, 235 MB per
    worker process for the train split (old code: the size assertion fails)."""
    tokens = mapped_tokens(tmp_path / "data", 100_000)
    source = grain_pipeline.ArraySource({"ids": wikitext.blocks(tokens, SEQ_LEN)}, name="wiki")
    pickled = pickle.dumps(source)
    assert len(pickled) < 2_000
    copy = pickle.loads(pickled)
    assert isinstance(copy.arrays["ids"].tokens, np.memmap)
    assert repr(copy) == repr(source) == "ArraySource('wiki', 195 rows, ids: uint16(513,))"
    rows = np.random.default_rng(1).permutation(len(source))
    read = copy.read(rows)["ids"]
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, source.read(rows)["ids"])
    np.testing.assert_array_equal(read, direct_blocks(tokens, SEQ_LEN, rows))


def test_pickled_blocks_of_a_stream_in_memory_or_a_slice_keep_their_tokens():
    """Not a whole mapped file: the tokens themselves travel (a memmap's slice has the file's
    name too, which would give other rows)."""
    tokens = np.arange(10_000, dtype=np.int32)
    for stream in (tokens, tokens[37:]):
        blocks = wikitext.blocks(stream, 64)
        copy = pickle.loads(pickle.dumps(blocks))
        np.testing.assert_array_equal(np.asarray(copy), np.asarray(blocks))


def test_pickled_blocks_of_a_slice_of_a_mapped_stream_keep_their_rows(tmp_path):
    tokens = mapped_tokens(tmp_path / "data", 10_000)
    blocks = wikitext.blocks(tokens[37:], 64)
    copy = pickle.loads(pickle.dumps(blocks))
    np.testing.assert_array_equal(
        np.asarray(copy), direct_blocks(tokens[37:], 64, range(len(blocks)))
    )


def wikitext_task(tmp_path: Path, seq_len: int):
    """The WikiText release task on a byte-tokenised train split of about 100k tokens."""
    folder = fx.write_wikitext(tmp_path / "wiki")
    line = "The quick brown fox jumps over the lazy dog, " * 2
    (folder / "wiki.train.raw").write_text((line + "\n") * 1_100, encoding="utf-8")
    config = fx.byte_wikitext_config(folder, seq_len, cache_dir=str(tmp_path / "cache"))
    config.batch_size = 8
    return tasks.get_task(config), folder


def test_an_epoch_of_training_batches_is_the_direct_slices_and_pickles_small(tmp_path):
    """The batches a training run reads (in process, and from the pickled batch function that
    worker processes receive) are the blocks ``tokens[i * L : i * L + L + 1]`` of the rows of
    each step, bit for bit; that function pickles without the token stream (old code: 200 kB)."""
    task, folder = wikitext_task(tmp_path, SEQ_LEN)
    tokens, _ = wikitext.load_tokens(
        "train", wikitext_dir=str(folder), tokenizer_path="bytes", cache_dir=str(tmp_path / "cache")
    )
    assert len(tokens) == 90 * 1_100 and isinstance(tokens, np.memmap)
    n = task.num_examples("train")
    steps = n // task.config.batch_size
    iterator = task.train_batches(0)
    batches = take(iterator, steps + 1)  # the epoch and the next one's first
    pickled = pickle.dumps(iterator.loader._batch)
    assert len(pickled) < 8_000, len(pickled)  # the config and the file name: 2.3 kB
    in_worker = pickle.loads(pickled)
    seed = int(task.config.seed)
    for step, batch in enumerate(batches):
        rows = loader.train_rows(seed, step, n, task.config.batch_size, 0, 1)
        expected = direct_blocks(tokens, SEQ_LEN, rows).astype(np.int32)
        assert batch["ids"].dtype == np.int32
        np.testing.assert_array_equal(batch["ids"], expected)
        np.testing.assert_array_equal(in_worker(step)["ids"], expected)
    covered = np.concatenate(
        [loader.train_rows(seed, s, n, task.config.batch_size, 0, 1) for s in range(steps)]
    )
    assert len(set(covered.tolist())) == steps * task.config.batch_size


@pytest.mark.slow  # a worker process
def test_blocks_read_in_a_worker_process_are_the_same(tmp_path):
    tokens = mapped_tokens(tmp_path / "data", 100_000)
    source = grain_pipeline.ArraySource({"ids": wikitext.blocks(tokens, SEQ_LEN)})

    def batches(workers: int) -> list[np.ndarray]:
        loader_ = grain_pipeline.train_loader(source, seed=3, batch_size=16, worker_count=workers)
        iterator = loader_.iterator(0)
        try:
            return [batch["ids"] for batch in take(iterator, 14)]
        finally:
            iterator.close()

    in_process, from_worker = batches(0), batches(1)
    for step, (a, b) in enumerate(zip(in_process, from_worker, strict=True)):
        rows = loader.train_rows(3, step, len(source), 16, 0, 1)
        np.testing.assert_array_equal(a, direct_blocks(tokens, SEQ_LEN, rows))
        np.testing.assert_array_equal(b, a)


# ----------------------------------------------------------------------------- releases


def test_the_raw_release_is_read_from_its_subfolder(tmp_path):
    """The paper's files: ``wikitext-103-raw/wiki.*.raw`` (old code: it looked for
    ``wiki.*.tokens`` only, so DatasetMissingError)."""
    folder = fx.write_wikitext(tmp_path / "wikitext-103-raw")
    task = tasks.get_task(fx.byte_wikitext_config(tmp_path, 8))
    tokens, _ = wikitext.load_tokens(
        "test", wikitext_dir=str(tmp_path), tokenizer_path="bytes", cache_dir=str(tmp_path / "c")
    )
    text = (folder / "wiki.test.raw").read_text(encoding="utf-8")
    assert "Unrecorded" in text and "<unk>" not in text
    assert bytes(np.asarray(tokens, np.uint8)).decode() == "".join(
        line.strip() + "\n" for line in text.splitlines()
    )
    assert task.num_examples("test") == -(-len(tokens) // 8)


def test_only_the_tokens_release_stops_with_the_reason_and_the_opt_in(tmp_path):
    """wiki.*.tokens replace rare words by <unk>: their perplexity is not the paper's (old code:
    read without a word)."""
    folder = fx.write_wikitext(tmp_path / "wikitext-103", release="tokens")
    with pytest.raises(errors.DatasetMissingError) as caught:
        tasks.get_task(fx.byte_wikitext_config(tmp_path, 8))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"WikiText-103 wiki.train.raw not found (looked for {tmp_path / 'wiki.train.raw'}, "
        f"{tmp_path / 'wikitext-103-raw' / 'wiki.train.raw'}); "
        f"{folder / 'wiki.train.tokens'} is of the other release, wikitext-103-v1.zip, whose "
        "rare words are <unk> (which GPT-2's BPE splits into easy pieces), so its perplexity is "
        f"not comparable with the paper's, which BPE-encodes the raw release: unpack "
        f"{wikitext.RAW_URL} into data.wikitext_dir={tmp_path}, or set "
        "--config.data.wikitext_release=tokens to read the .tokens files anyway"
    )


def test_the_tokens_release_is_an_opt_in_with_a_warning_and_its_own_cache(tmp_path):
    """With both releases in one folder, each reads its own files into its own cache (the key
    holds the file's path), and the tokens one warns that its perplexity is not the paper's."""
    fx.write_wikitext(tmp_path, release="tokens")
    fx.write_wikitext(tmp_path, release="raw")
    with pytest.warns(wikitext.NotThePapersDataWarning, match=r"not comparable with the paper"):
        task = tasks.get_task(fx.byte_wikitext_config(tmp_path, 8, wikitext_release="tokens"))
    for release in ("raw", "tokens"):
        tokens, _ = wikitext.load_tokens(
            "val",
            wikitext_dir=str(tmp_path),
            tokenizer_path="bytes",
            cache_dir=str(tmp_path / "cache"),
            release=release,
        )
        text = (tmp_path / f"wiki.valid.{release}").read_text(encoding="utf-8")
        expected = "".join(line.strip() + "\n" for line in text.splitlines())
        assert bytes(np.asarray(tokens, np.uint8)).decode() == expected
    assert ("<unk>" in expected) and len(list((tmp_path / "cache").glob("wikitext-*"))) == 2
    assert task.num_examples("val") == -(-len(tokens) // 8)


def test_a_bad_release_or_one_a_source_does_not_read_names_the_key(tmp_path):
    fx.write_wikitext(tmp_path)
    with pytest.raises(ValueError, match=r"^data\.wikitext_release='bpe' is no WikiText-103 rel"):
        tasks.get_task(fx.byte_wikitext_config(tmp_path, 8, wikitext_release="bpe"))
    config = config_of("lm.wikitext103", wikitext_release="tokens")
    with pytest.raises(
        ValueError,
        match=r"^config\.data\.wikitext_release='tokens' is not read by task 'wikitext103' with "
        r"data\.source='synthetic'; remove --config\.data\.wikitext_release \(its default is "
        r"'raw'\)",
    ):
        tasks.get_task(config)


# ----------------------------------------------------------------------------- evaluation


def test_eval_blocks_score_each_token_once_after_an_eos(tmp_path):
    """fairseq's blocks (--sample-break-mode none): ceil(N / L) blocks of L targets, the last
    shorter, the first input eos. The old blocks (tokens[i L : (i + 1) L + 1], tail dropped)
    never scored the first token nor the last ones (old code: no eval_blocks)."""
    seq_len, eos = 8, 7
    tokens = (np.arange(2 * seq_len + 3) * 5 % 251).astype(np.uint16)
    blocks = wikitext.eval_blocks(tokens, seq_len, eos)
    ids, num_targets = np.asarray(blocks["ids"]), blocks["num_targets"]
    assert ids.shape == (3, seq_len + 1) and num_targets.tolist() == [8, 8, 3]
    targets = np.concatenate([ids[i, 1 : 1 + n] for i, n in enumerate(num_targets)])
    inputs = np.concatenate([ids[i, :n] for i, n in enumerate(num_targets)])
    np.testing.assert_array_equal(targets, tokens)
    np.testing.assert_array_equal(inputs, np.concatenate([[eos], tokens[:-1]]))
    with pytest.raises(ValueError, match=r"^no tokens in the test split \(f\): give a file"):
        wikitext.eval_blocks(tokens[:0], seq_len, eos, "the test split (f)")


def tiny_lm_task(tmp_path: Path, val_text: str):
    """The release task (bytes, blocks of 8, eval batches of 2) with ``val_text`` as
    ``wiki.valid.raw``, and a 1-layer model of width 16."""
    fx.write_wikitext(tmp_path)
    (tmp_path / "wiki.valid.raw").write_text(val_text, encoding="utf-8")
    config = fx.byte_wikitext_config(tmp_path, 8)
    config.model.features, config.model.num_layers = 16, 1
    config.batch_size = config.eval_batch_size = 2
    return tasks.get_task(config)


def test_the_eval_perplexity_is_over_every_token_of_the_split(tmp_path):
    """exp(sum of the loss sums / sum of the weights) over the eval batches is exp(mean NLL)
    of every token of the split, computed block by block without padding; the weights count
    the split's N tokens (old code: N - 1 - its tail, 16 of 19 here)."""
    import jax
    from flax import nnx

    task = tiny_lm_task(tmp_path, "hello world\nab\n\nxy\n")  # N = 19 = 2 * 8 + 3
    stream = np.frombuffer(b"hello world\nab\n\nxy\n", np.uint8).astype(np.int32)
    model = task.build_model(nnx.Rngs(0))
    sums = {"loss_sum": 0.0, "weight": 0.0}
    batches = list(task.eval_batches("val", 0, 1))
    assert len(batches) == 2 and batches[1]["weight"].tolist() == [1.0, 0.0]  # a padding row
    for batch in batches:
        _, metrics = task.loss_fn(
            model, {k: jax.numpy.asarray(v) for k, v in batch.items()}, train=False
        )
        for key in sums:
            sums[key] += float(metrics[key])
    assert sums["weight"] == len(stream) == 19
    nll = []
    inputs = np.concatenate([[ord("\n")], stream])  # the first block's input starts with eos
    for start in range(0, len(stream), 8):
        stop = min(start + 8, len(stream))
        logits = np.asarray(model(jax.numpy.asarray(inputs[None, start:stop])), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll.extend(-log_probs[np.arange(stop - start), stream[start:stop]])
    assert len(nll) == 19
    np.testing.assert_allclose(
        np.exp(sums["loss_sum"] / sums["weight"]), np.exp(np.mean(nll)), rtol=1e-5
    )


def test_a_token_cache_of_the_old_code_is_read_as_the_stream_it_is(tmp_path, monkeypatch):
    """The cache holds the split's token stream only (keyed by the file and the tokenizer, as
    before); the blocks are cut as it loads, so a cache the old code built is reused, not
    tokenised again, and evaluation cuts the new blocks from it."""
    fx.write_wikitext(tmp_path, release="tokens")
    options = dict(
        wikitext_dir=str(tmp_path), tokenizer_path="bytes", cache_dir=str(tmp_path / "c")
    )
    path = tmp_path / "wiki.valid.tokens"
    old_key = {
        "dataset": "wikitext103",
        "file": loader.fingerprint([path.resolve()]),
        "tokenizer": "bytes",
    }
    text = path.read_text(encoding="utf-8")
    stream = np.frombuffer(
        "".join(line.strip() + "\n" for line in text.splitlines()).encode(), np.uint8
    )
    loader.prepared(
        str(tmp_path / "c"),
        "wikitext",
        old_key,
        lambda f: loader.save_arrays(f, "data", {"tokens": stream.astype(np.uint16)}),
    )

    def no_build(*args):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(wikitext, "_build", no_build)
    tokens, _ = wikitext.load_tokens("val", release="tokens", **options)
    np.testing.assert_array_equal(tokens, stream)
    blocks = wikitext.eval_blocks(tokens, 8, ord("\n"))
    assert int(blocks["num_targets"].sum()) == len(stream)


def test_the_synthetic_evaluation_scores_every_generated_byte_once():
    """The generated stand-in's val split is the release's evaluation blocks of its corpus: every
    byte a target once, the first after an end of line (old code: training windows, the first
    byte and a tail of up to seq_len unscored)."""
    from hgrn_jax.data import synthetic

    config = fx.tiny_config("lm.wikitext103", source="synthetic", eval_bytes=1000, seq_len=64)
    task = tasks.get_task(config)
    blocks = task._load("val")
    corpus = synthetic.arithmetic_corpus(1000, seed=task._split_seed("val"))
    expected = wikitext.eval_blocks(corpus, 64, ord("\n"))
    assert blocks["num_targets"].tolist() == [64] * 15 + [40]
    np.testing.assert_array_equal(blocks["ids"], expected["ids"])
    weights = sum(float(b["weight"].sum()) for b in task.eval_batches("val", 0, 1))
    targets = sum(
        float(np.sum(b["weight"] * b["num_targets"])) for b in task.eval_batches("val", 0, 1)
    )
    assert (weights, targets) == (16, 1000)


def test_the_synthetic_test_split_is_evaluation_blocks_too():
    """The generated stand-in's test split is scored as its val split: the release's evaluation
    blocks of its own corpus (test, not only val, read training windows before)."""
    from hgrn_jax.data import synthetic

    config = fx.tiny_config("lm.wikitext103", source="synthetic", eval_bytes=500, seq_len=64)
    task = tasks.get_task(config)
    corpus = synthetic.arithmetic_corpus(500, seed=task._split_seed("test"))
    expected = wikitext.eval_blocks(corpus, 64, ord("\n"))
    blocks = task._load("test")
    assert set(blocks) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(blocks[key], expected[key], err_msg=key)

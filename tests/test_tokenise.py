"""The reference's LRA tokenisation and splits, checked on fixtures computed by hand.

Vocabularies as torchtext's ``build_vocab_from_iterator`` orders them (specials ``<pad>``,
``<unk>``, ``<eos>``, then by descending count, ties by token), counted on the *truncated*
training examples only; ids end with ``<eos>`` and are padded with 0; unseen or rare tokens are
``<unk>``. The Pathfinder split is ``torch.utils.data.random_split`` with seed 42: the
permutations below were computed with torch 2.13 (CPU), ``torch.randperm(n,
generator=torch.Generator().manual_seed(seed))``; the test does not need torch.
"""

from __future__ import annotations

import hashlib

import data_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hgrn_jax import tasks
from hgrn_jax.data import (
    errors,
    listops,
    listops_release,
    loader,
    pathfinder,
    retrieval,
    splits,
    text,
    vocab,
)
from hgrn_jax.data.vocab import EOS_ID, UNK_ID, Vocabulary

SPECIALS = ["<pad>", "<unk>", "<eos>"]

# torch.randperm(n, generator=torch.Generator().manual_seed(42)) with torch 2.13 on the CPU.
TORCH_RANDPERM_10 = [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]
TORCH_RANDPERM_40 = [
    22,
    9,
    32,
    15,
    0,
    3,
    8,
    18,
    14,
    13,
    38,
    2,
    7,
    4,
    23,
    37,
    27,
    29,
    35,
    17,
    19,
    25,
    6,
    21,
    12,
    10,
    16,
    39,
    24,
    33,
    11,
    34,
    28,
    20,
    26,
    31,
    30,
    36,
    1,
    5,
]
TORCH_RANDPERM_1000 = (
    [542, 618, 816, 68, 94, 215, 60, 585, 942, 165, 968, 829],
    [284, 638, 96, 455],
    "ac5c22de20fc5d169c3080fbf2719977f1c5e187f76217d18f95047e3cf159d6",
)
TORCH_RANDPERM_200000 = (
    [37542, 143173, 127710, 58234, 152906, 31060, 95762, 141650, 121758, 123288, 24888, 12642],
    [18659, 198416, 132078, 156497],
    "ee4e53fa9a9cb4316c55a0d184c7aa8fd2f92e97453e62e49195c42034a31789",
)
TORCH_RANDPERM_7_SEED_0 = [4, 0, 5, 3, 2, 6, 1]


def sha256_int64(values: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(values, "<i8").tobytes()).hexdigest()


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_order_is_torchtexts():
    counts = {"b": 3, "a": 3, "c": 5, "d": 1, "<unk>": 9, "B": 3}
    vocab = Vocabulary.from_counts(counts, min_freq=2)
    # count 5, then the count-3 ties in code point order ("B" < "a" < "b"); "d" is too rare and
    # a counted "<unk>" stays a special.
    assert vocab.tokens == (*SPECIALS, "c", "B", "a", "b")
    assert vocab.ids(["a", "d", "zzz", "c"]).tolist() == [5, UNK_ID, UNK_ID, 3]
    assert vocab.dtype == np.uint8 and len(vocab) == 7
    assert Vocabulary.from_counts({**counts, "e": 2}, 2).fingerprint != vocab.fingerprint


def test_vocabulary_round_trips_through_json(tmp_path):
    vocab = Vocabulary.from_counts({"é": 2, "\t": 2, "😀": 1})
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    assert vocab.tokens == (*SPECIALS, "\t", "é", "😀")
    with pytest.raises(ValueError, match="starts with"):
        Vocabulary(["a", "<pad>", "<unk>", "<eos>"])


def test_pack_truncates_before_the_end_token_and_pads_with_zero():
    ids, lengths = vocab.pack([np.array([5, 6, 7, 8]), np.array([9])], 2, seq_len=4)
    assert ids.tolist() == [[5, 6, 7, EOS_ID], [9, EOS_ID, 0, 0]]
    assert lengths.tolist() == [4, 2]
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        vocab.pack([], 0, seq_len=1)


# ----------------------------------------------------------------------------- ListOps


def test_listops_tokens_are_the_references():
    assert listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )") == ["[MAX", "2", "9", "X"]
    assert listops.tokenize("(([SM 1)])") == ["[SM", "1X"]  # characters, not tokens, go


def test_listops_vocabulary_from_truncated_training_sources():
    train = ["( ( [MAX 2 ) ] )", "( ( ( [MIN 9 ) 9 ) ] )"]
    tok = listops.ListOpsTokenizer.fit(train, seq_len=8)
    # counts: [MAX 1, 2 1, X 2, [MIN 1, 9 2;
    # order: (-2) "9" < "X", then (-1) "2" < "[MAX" < "[MIN"; "]" would sort after "[MIN".
    assert tok.vocabulary.tokens == (*SPECIALS, "9", "X", "2", "[MAX", "[MIN")
    ids, lengths = tok.encode(["( ( [MIN 2 ) ] )", "( [MED 7 ] )"], seq_len=6)
    assert ids.tolist() == [
        [7, 5, 4, EOS_ID, 0, 0],
        [UNK_ID, UNK_ID, 4, EOS_ID, 0, 0],
    ]  # unseen tokens -> <unk>
    assert lengths.tolist() == [4, 4]
    # seq_len 3 counts only the first 2 tokens of each training source: no "X" in the vocabulary.
    short = listops.ListOpsTokenizer.fit(train, seq_len=3)
    assert short.vocabulary.tokens == (*SPECIALS, "2", "9", "[MAX", "[MIN")
    assert short.encode(["( [MAX ] )"], seq_len=3)[0].tolist() == [[5, UNK_ID, EOS_ID]]


def test_listops_release_vocabulary_is_the_training_files_and_cached(tmp_path):
    folder = fx.write_listops(tmp_path, rows=4)  # "( ( ( [MAX i ) 3 ) ] )", i = 0..3
    (folder / "basic_val.tsv").write_text("Source\tTarget\n( ( ( [MIN 7 ) 3 ) ] )\t3\n")
    cache = tmp_path / "cache"
    options = dict(lra_dir=str(tmp_path), seq_len=8, cache_dir=str(cache))
    # train tokens: [MAX x4, 3 x5 (i = 3 once more), X x4, 0 1 2 x1
    expected = (*SPECIALS, "3", "X", "[MAX", "0", "1", "2")
    assert listops_release.vocabulary(**options).tokens == expected
    val = listops_release.load_split("val", **options)
    assert val["inputs"].dtype == np.uint8
    assert val["inputs"].tolist() == [[UNK_ID, UNK_ID, 3, 4, EOS_ID, 0, 0, 0]]
    assert val["lengths"].tolist() == [5] and val["labels"].tolist() == [3]
    stored = sorted(cache.glob("listops-*/vocab.json"))
    assert len(stored) == 2  # the vocabulary's folder and a copy beside the val ids
    assert all(Vocabulary.load(p).tokens == expected for p in stored)
    # Without a cache the same ids come from memory.
    in_memory = listops_release.load_split("val", lra_dir=str(tmp_path), seq_len=8)
    np.testing.assert_array_equal(in_memory["inputs"], val["inputs"])


def test_generated_listops_and_the_config_vocabulary_size(tmp_path):
    config = fx.tiny_config("lra.listops", cache_dir=str(tmp_path))
    task = tasks.get_task(config)
    train = task.examples("train")
    assert config.model.vocab_size == listops.VOCAB_SIZE == 18
    assert 0 < train["inputs"].max() < 18
    lengths = train["lengths"]
    assert (train["inputs"][np.arange(len(lengths)), lengths - 1] == EOS_ID).all()
    config.model.vocab_size = 5
    with pytest.raises(
        ValueError,
        match=r"vocab_size 5 is smaller .*set "
        r"--config.model.vocab_size=18",
    ):
        tasks.get_task(config).examples("val")


# ----------------------------------------------------------------------------- characters


def test_char_vocabulary_counts_truncated_text_and_min_freq():
    texts = ["abba" + "z" * 10, "cab"]  # truncated to 4 characters: abba, cab
    assert vocab.count_chars(texts, max_chars=4) == {"a": 3, "b": 3, "c": 1}
    assert vocab.char_vocabulary(texts, seq_len=5).tokens == (*SPECIALS, "a", "b", "c")
    assert vocab.char_vocabulary(texts, seq_len=5, min_freq=2).tokens == (*SPECIALS, "a", "b")
    v = Vocabulary([*SPECIALS, "é", "a", "😀"])
    ids, lengths = vocab.encode_chars(["aé😀x", "", "ééééé"], v, seq_len=4)
    # characters, not UTF-8 bytes: "é" and "😀" are one id each; "x" is unknown.
    assert ids.tolist() == [[4, 3, 5, EOS_ID], [EOS_ID, 0, 0, 0], [3, 3, 3, EOS_ID]]
    assert lengths.tolist() == [4, 1, 4]


def test_aan_vocabulary_comes_from_both_training_columns_only(tmp_path):
    fx.write_aan(tmp_path, rows_per_split=4, extra={"test": "1\ta\tb\tq?\t@\n"})
    options = dict(lra_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), seq_len=5)
    vocab_ = retrieval.vocabulary(**options)
    # Training documents, each cut to 4 characters: 'He s', 'plai', 'no q', 'tab\t',
    # 'line', 'x', 'mid ', 'ok'.
    counts = {}
    for doc in ["He s", "plai", "no q", "tab\t", "line", "x", "mid ", "ok"]:
        for c in doc:
            counts[c] = counts.get(c, 0) + 1
    assert vocab_ == Vocabulary.from_counts(counts)
    assert vocab_.tokens[3:6] == (" ", "i", "a")  # 3 times each, then 2 times: a e l n o
    test = retrieval.load_split("test", **options)
    q, at = vocab_.index["q"], UNK_ID  # "?" and "@" never occur in training documents
    assert test["inputs"][4].tolist() == [q, UNK_ID, EOS_ID, 0, 0]
    assert test["inputs2"][4].tolist() == [at, EOS_ID, 0, 0, 0]
    assert test["inputs"].dtype == np.uint8


def test_imdb_vocabulary_is_the_training_reviews_with_min_freq_15(tmp_path):
    train_texts = [b"ab" * 8, b"a\xc3\xa9" * 4 + b"b" * 4]  # a x12, b x12 (+4 after cut), e x4
    test_texts = [b"ba\xc3\xa9!"]

    def fake(self, split, **kwargs):
        import tensorflow as tf

        texts = train_texts if split == "train" else test_texts
        return tf.data.Dataset.from_tensor_slices(
            {"text": texts, "label": np.arange(len(texts), dtype=np.int64) % 2}
        )

    config = fx.tfds_config("lra.text", tmp_path, seq_len=13)
    with tfds.testing.mock_data(as_dataset_fn=fake):
        options = dict(tfds_dir="", cache_dir=str(tmp_path / "cache"), seq_len=13)
        # The first 12 characters: "abababababab" and "aéaéaéaébbbb": a 10, b 10, é 4.
        assert text.vocabulary(**options).tokens == tuple(SPECIALS)  # all below 15
        train_texts[0] = b"ab" * 20
        options["seq_len"] = 40  # a 20 + 4, b 20 + 4, é 4: a and b pass min_freq 15
        assert text.vocabulary(**options).tokens == (*SPECIALS, "a", "b")
        test = text.load_split("test", **options)
        assert test["inputs"][0, :6].tolist() == [4, 3, UNK_ID, UNK_ID, EOS_ID, 0]
        task = tasks.get_task(config)
        assert task.examples("val")["inputs"].max() < config.model.vocab_size
    assert text.MIN_FREQ == 15


# ----------------------------------------------------------------------------- splits


def test_torch_randperm_is_reproduced_exactly():
    assert splits.torch_randperm(10, 42).tolist() == TORCH_RANDPERM_10
    assert splits.torch_randperm(40, 42).tolist() == TORCH_RANDPERM_40
    assert splits.torch_randperm(7, 0).tolist() == TORCH_RANDPERM_7_SEED_0
    for n, (head, tail, digest) in ((1000, TORCH_RANDPERM_1000), (200_000, TORCH_RANDPERM_200000)):
        perm = splits.torch_randperm(n, 42)
        assert perm[: len(head)].tolist() == head and perm[-len(tail) :].tolist() == tail
        assert sha256_int64(perm) == digest
    assert splits.torch_randperm(1, 42).tolist() == [0] and len(splits.torch_randperm(0, 42)) == 0


def test_release_split_sizes_and_membership():
    parts = pathfinder.split_positions(200_000)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [160_000, 20_000, 20_000]
    joined = np.concatenate([parts["train"], parts["val"], parts["test"]])
    assert sha256_int64(joined) == TORCH_RANDPERM_200000[2]
    assert [len(p) for p in pathfinder.split_positions(199_999).values()] == [
        160_001,
        19_999,
        19_999,
    ]
    with pytest.raises(ValueError, match="add up to"):
        splits.random_split(10, [5, 4], 42)


def test_pathfinder_splits_are_the_references_in_its_order(tmp_path):
    fx.write_pathfinder(tmp_path, 32, count=40)  # metadata line k is image k (grey value k)
    task = tasks.get_task(fx.pathfinder_config(tmp_path))
    grey = {s: task.examples(s)["pixels"][:, 0, 0, 0].tolist() for s in ("train", "val", "test")}
    assert grey == {
        "train": TORCH_RANDPERM_40[:32],
        "val": TORCH_RANDPERM_40[32:36],
        "test": TORCH_RANDPERM_40[36:],
    }


def test_skipped_pathfinder_examples_leave_the_others_in_their_split(tmp_path):
    # 20 images and a malformed 21st line: the reference's dataset has 21 positions.
    fx.write_pathfinder(tmp_path, 32, count=20, bad_lines=["too short"])
    config = fx.pathfinder_config(tmp_path, skip_bad_rows=True)
    with pytest.warns(UserWarning, match="1 bad example") as given:
        task = tasks.get_task(config)
        grey = {
            s: task.examples(s)["pixels"][:, 0, 0, 0].tolist() for s in ("train", "val", "test")
        }
    # The run that built the folder lists the bad example once; it used to add the reminder
    # below for each split it read back.
    assert not [w for w in given if "was prepared without" in str(w.message)]
    expected = pathfinder.split_positions(21)
    for split, positions in expected.items():
        assert grey[split] == [p for p in positions.tolist() if p != 20]
    # The prepared folder is reused (its key, the metadata, is unchanged): a later run says,
    # each time, that it lacks the skipped examples (a mended image would not be read again).
    loader._BUILT_HERE.clear()  # as in another process
    with pytest.warns(
        errors.SkippedExamplesWarning,
        match=r"was prepared without bad examples \(data\.skip_bad_rows=True: 1 bad example\(s\) "
        r"in .*skipped\.txt\) and is used as it is; if those files have been mended since, move "
        r"that folder away",
    ):
        assert tasks.get_task(config).num_examples("train") == len(grey["train"])

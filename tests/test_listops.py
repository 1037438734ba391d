"""The ListOps generator against the LRA specification, the TSV layout and the reader."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from hgrn_jax.data import listops, listops_release, retrieval
from hgrn_jax.data.errors import BadDataError, BadDataReport


def read_examples(path):
    """Sources and labels of one ``basic_*.tsv`` through the one ListOps reader; a bad row is an
    error naming the file and line."""
    report = BadDataReport(str(path))
    sources, labels = listops_release.read_rows(path, report)
    report.finish(skip=False)
    return sources, labels


SPEC = listops.ListOpsSpec(min_length=20, max_length=300, num_train=240, num_val=30, num_test=30)
OP_NAMES = {"[MIN": "MIN", "[MAX": "MAX", "[MED": "MED", "[SM": "SM"}


@pytest.fixture(scope="module")
def generated():
    return listops.generate(SPEC, seed=3)


def python_value(source: str) -> int:
    """An independent evaluation: rewrite the source as a Python call expression and eval it."""
    parts = []
    for token in source.split():
        if token in ("(", ")"):
            continue
        if token in OP_NAMES:
            parts.append(OP_NAMES[token] + "(")
        elif token == "]":
            parts.append("),")
        else:
            parts.append(token + ",")
    functions = {
        "MIN": lambda *a: min(a),
        "MAX": lambda *a: max(a),
        "MED": lambda *a: int(np.median(a)),
        "SM": lambda *a: sum(a) % 10,
    }
    return eval("".join(parts).rstrip(","), {"__builtins__": {}}, functions)


def shape_of(source: str) -> tuple[int, int, int]:
    """(depth with values counted, most arguments of one operator, tokens without brackets)."""
    depth = max_depth = max_args = length = 0
    counts: list[int] = []
    for token in source.split():
        if token in ("(", ")"):
            continue
        length += 1
        if token in OP_NAMES:
            if counts:
                counts[-1] += 1
            counts.append(0)
            depth += 1
            max_depth = max(max_depth, depth)
        elif token == "]":
            max_args = max(max_args, counts.pop())
            depth -= 1
        else:
            if counts:
                counts[-1] += 1
            max_depth = max(max_depth, depth + 1)
    assert not counts
    return max_depth, max_args, length


def test_expressions_follow_the_spec(generated):
    allowed = set(OP_NAMES) | {"]", "(", ")"} | {str(v) for v in range(10)}
    depths, arg_counts = [], []
    for split in listops.SPLITS:
        for source, target in generated[split]:
            assert set(source.split()) <= allowed
            depth, args, length = shape_of(source)
            assert depth <= SPEC.max_depth and 2 <= args <= SPEC.max_args
            assert SPEC.min_length < length < SPEC.max_length
            assert 0 <= target <= 9
            depths.append(depth)
            arg_counts.append(args)
    # The generator does reach deep trees and wide operators, not just shallow ones.
    assert max(depths) >= 6 and max(arg_counts) == SPEC.max_args


def test_labels_equal_a_python_evaluation(generated):
    for split in listops.SPLITS:
        for source, target in generated[split]:
            assert python_value(source) == target
    all_targets = [t for s in listops.SPLITS for _, t in generated[s]]
    assert len(set(all_targets)) == 10


def test_splits_sizes_deduplicated_and_disjoint(generated):
    sizes = {s: len(generated[s]) for s in listops.SPLITS}
    assert sizes == {"train": 240, "val": 30, "test": 30}
    sources = [src for s in listops.SPLITS for src, _ in generated[s]]
    assert len(set(sources)) == len(sources)


def test_generation_is_deterministic_from_the_seed(generated):
    assert listops.generate(SPEC, seed=3) == generated
    assert listops.generate(SPEC, seed=4)["train"] != generated["train"]


# sha256 of the generated sets as sorted JSON, computed by the generator as first released: a
# cache folder is named by (spec, seed) alone, so the generator must never change what it draws
# (a user's cached set and a fresh one of the same name would differ).
PINNED = {
    "test spec, seed 3": "58a6f3afdd39f5cf2396e794432aa7fde675c8616969c6c0c59f961e0b5d5728",
    "LRA lengths, 50 examples, seed 0": (
        "ae2560943879fa5e05d0edee09c0a43d6c2caa8c8a210b40c29935859516fb58"
    ),
}


def test_generated_sets_never_change(generated):
    lra_lengths = listops.ListOpsSpec(num_train=40, num_val=5, num_test=5)
    sets = {
        "test spec, seed 3": generated,
        "LRA lengths, 50 examples, seed 0": listops.generate(lra_lengths, seed=0),
    }
    for name, drawn in sets.items():
        digest = hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()
        assert digest == PINNED[name], name


def test_release_text_layout_and_operator_semantics():
    assert listops.to_source(("[MAX", (2, 9))) == "( ( ( [MAX 2 ) 9 ) ] )"
    tree = ("[MAX", (2, 9, ("[MIN", (4, 7)), 0))
    source = listops.to_source(tree)
    assert listops.parse_source(source) == tree
    assert listops.tree_length(tree) == len(listops.tokenize(source)) == 9
    assert listops.evaluate(tree) == 9
    assert listops.evaluate(("[MED", (1, 4))) == 2  # median 2.5, truncated
    assert listops.evaluate(("[MED", (1, 4, 8))) == 4
    assert listops.evaluate(("[SM", (7, 8, 9))) == 4


def test_tsv_layout_is_read_back_by_the_reader(tmp_path, generated):
    small = listops.ListOpsSpec(min_length=5, max_length=40, num_train=20, num_val=5, num_test=5)
    folder = listops.ensure_generated(tmp_path, small, seed=0)
    text = (folder / "basic_val.tsv").read_text()
    lines = text.splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == 6
    assert all(len(line.split("\t")) == 2 for line in lines[1:])
    sources, labels = read_examples(folder / "basic_train.tsv")
    expected = listops.generate(small, seed=0)["train"]
    assert sources == [s for s, _ in expected]
    np.testing.assert_array_equal(labels, [t for _, t in expected])
    # A second call reuses the cached files.
    mtime = (folder / "basic_train.tsv").stat().st_mtime_ns
    assert listops.ensure_generated(tmp_path, small, seed=0) == folder
    assert (folder / "basic_train.tsv").stat().st_mtime_ns == mtime


def test_out_never_overwrites_basic_tsv_files(tmp_path, capsys):
    """``python -m hgrn_jax.data.listops --out DIR`` writes a set into a folder without
    basic_*.tsv; over existing ones (the release's, another seed's) it stops with one line."""
    small = ["--spec=tiny", "--num_train=4", "--num_val=2", "--num_test=2"]
    listops.main([*small, "--out", str(tmp_path)])
    first = (tmp_path / "basic_train.tsv").read_text()
    (tmp_path / "basic_test.tsv").unlink()  # only the training and validation files remain
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        listops.main([*small, "--seed=1", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'basic_train.tsv'} exists: --out writes a new set only into a "
        "folder without basic_{train,val,test}.tsv; choose another folder (or remove those "
        "files)\n"
    )
    assert (tmp_path / "basic_train.tsv").read_text() == first
    assert not (tmp_path / "basic_test.tsv").exists()


def test_tokenizer_ids_padding_end_token_and_truncation():
    source = "( ( ( [MAX 2 ) 9 ) ] )"
    tok = listops.ListOpsTokenizer.fit([source, "( ( [SM 1 ) ] )"], seq_len=8)
    assert tok.vocab_size == 3 + 6 and tok.pad_id == 0  # specials, X [MAX [SM 1 2 9
    ids, lengths = tok.encode([source, "( ( [SM 1 ) ] )"], seq_len=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    assert lengths.tolist() == [5, 4]
    assert ids[0, :5].tolist() == [
        tok.vocab["[MAX"],
        tok.vocab["2"],
        tok.vocab["9"],
        tok.vocab["X"],
        tok.eos_id,
    ]
    assert ids[0, 5:].tolist() == [0, 0, 0]
    assert tok.decode(ids[0]) == "[MAX 2 9 ]"
    ids, lengths = tok.encode([source], seq_len=3)  # truncated, end token kept
    assert ids[0].tolist() == [tok.vocab["[MAX"], tok.vocab["2"], tok.eos_id]
    ids, _ = tok.encode(["( [FIRST 3 ] )"], seq_len=4)  # unknown tokens -> <unk>
    assert ids[0].tolist() == [tok.unk_id, tok.unk_id, tok.vocab["X"], tok.eos_id]


def test_load_split_of_a_release_style_file(tmp_path):
    rows = ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( ( [MED 1 ) 4 ) 8 ) ] )\t4"]
    for split in ("train", "test"):  # the vocabulary comes from the training file
        (tmp_path / f"basic_{split}.tsv").write_text("Source\tTarget\n" + "\n".join(rows) + "\n")
    data = listops_release.load_split("test", lra_dir=str(tmp_path), seq_len=16)
    assert data["inputs"].shape == (2, 16) and data["labels"].tolist() == [9, 4]
    assert data["lengths"].tolist() == [5, 6]


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "basic_train.tsv"
    path.write_text("Source\tTarget\n( [MAX 1 ] )\t1\n( [MAX 2 ] )\t2\textra\n")
    with pytest.raises(BadDataError, match=r"basic_train.tsv:3: expected 2"):
        read_examples(path)
    path.write_text("Source\tTarget\n( [MAX 1 ] )\t1\n( [MIN 2 ] )\tseven\n")
    with pytest.raises(BadDataError, match=r"basic_train.tsv:3: label 'seven'"):
        read_examples(path)
    path.write_text("Source\tTarget\n( [MAX 1 ] )\t12\n")
    with pytest.raises(BadDataError, match=r"basic_train.tsv:2: .*0..9"):
        read_examples(path)
    path.write_text("Input\tOutput\n1\t1\n")
    with pytest.raises(BadDataError, match=r"basic_train.tsv:1: header"):
        read_examples(path)


def test_read_tsv_without_header_picks_columns(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("1\ta\tb\tx y\tz\n0\tc\td\tu\tv\n")
    report = BadDataReport(str(path))
    rows = list(retrieval.parse_rows(path, report))  # the headerless TSV reader (Retrieval)
    assert not report.problems and [r[0] for r in rows] == [1, 0] and rows[0][1] == "x y"


def test_missing_release_files_name_the_folder_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"basic_val.tsv not found.*--config.data.lra_dir"):
        listops_release.find_file(str(tmp_path), "val")
    (tmp_path / "listops-1000").mkdir()
    (tmp_path / "listops-1000" / "basic_val.tsv").write_text("Source\tTarget\n")
    assert listops_release.find_file(str(tmp_path), "val").parent.name == "listops-1000"


def test_impossible_spec_fails_clearly():
    narrow = listops.ListOpsSpec(min_length=0, max_length=3, num_train=20, num_val=0, num_test=0)
    with pytest.raises(RuntimeError, match="widen the length range"):
        listops.generate(narrow, seed=0, max_draws=2000)


def test_tokenizer_equals_token_by_token_lookup(generated):
    sources = [s for s, _ in generated["train"][:50]]
    tok = listops.ListOpsTokenizer.fit(sources, seq_len=400)
    ids, lengths = tok.encode(sources, seq_len=400)
    for row, n, source in zip(ids, lengths, sources):
        words = [{"]": "X"}.get(t, t) for t in source.split() if t not in ("(", ")")][:399]
        assert row[:n].tolist() == [tok.vocab[t] for t in words] + [tok.eos_id]
        assert not row[n:].any()

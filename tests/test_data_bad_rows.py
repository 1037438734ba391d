"""Bad rows of the LRA release's TSV files that the csv reader itself trips on or lets through.

A carriage return (``\\r``) inside a ListOps row was a bare ``_csv.Error`` naming no file or line
(not a ValueError, so not the CLI's one-line error); in an AAN row it stopped the reading as
unskippable. An AAN quote left open was accepted when the rows it took in ended in a quoted
text, or when the file ended inside it. Quoted texts that are right stay as they were.
"""

from __future__ import annotations

import re
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest

from hgrn_jax.data import errors, listops_release, retrieval
from hgrn_jax.data.errors import BadDataReport


def _listops(root: Path, text: str) -> Path:
    """``root/listops-1000/basic_{train,val,test}.tsv``, the training file holding ``text``."""
    folder = fx.write_listops(root, rows=6)
    path = folder / "basic_train.tsv"
    path.write_bytes(text.encode())
    return path


def _load_listops(root: Path, skip_bad_rows: bool) -> dict:
    return listops_release.load_split(
        "train", lra_dir=str(root), seq_len=16, skip_bad_rows=skip_bad_rows
    )


def _aan(root: Path, text: str) -> Path:
    """``root/tsv_data/new_aan_pairs.{train,eval,test}.tsv``, the training file holding ``text``."""
    folder = fx.write_aan(root, rows_per_split=4)
    path = folder / "new_aan_pairs.train.tsv"
    path.write_bytes(text.encode())
    return path


def _load_aan(root: Path, skip_bad_rows: bool) -> dict:
    return retrieval.load_split(
        "train",
        lra_dir=str(root),
        cache_dir=str(root / "cache"),
        seq_len=16,
        skip_bad_rows=skip_bad_rows,
    )


def _aan_rows(path: Path) -> tuple[list[tuple[int, str, str]], list[tuple[str, int, str]]]:
    report = BadDataReport(str(path))
    rows = list(retrieval.parse_rows(path, report))
    return rows, report.problems


GOOD_AAN = "".join(f"{i % 2}\tid{i}\tjd{i}\tdoc {i}\tother {i}\n" for i in range(4))  # lines 1-4
LISTOPS_HEADER = "Source\tTarget\n( [MAX 2 9 ] )\t9\n"  # lines 1-2


# ----------------------------------------------------------------------------- ListOps: \r


def test_listops_a_carriage_return_in_a_row_is_a_bad_row_with_file_and_line(tmp_path):
    path = _listops(tmp_path, LISTOPS_HEADER + "( [MIN 2\r 9 ] )\t2\n( [MAX 3 ] )\t3\r\n")
    with pytest.raises(errors.BadDataError) as info:  # was _csv.Error, no file or line
        _load_listops(tmp_path, skip_bad_rows=False)
    message = str(info.value)
    assert message.startswith(f"1 bad example(s) in {path}:\n")
    assert f"\n  {path}:3: carriage return (\\r) inside the row at column 9; delete it\n" in message
    assert message.endswith("skip these examples with --config.data.skip_bad_rows=True")
    with pytest.warns(errors.SkippedExamplesWarning, match=re.escape(f"{path}:3: carriage return")):
        data = _load_listops(tmp_path, skip_bad_rows=True)
    np.testing.assert_array_equal(data["labels"], [9, 3])  # the rows around it (one CRLF) kept


@pytest.mark.parametrize("skip", [False, True])
def test_listops_old_mac_line_ends_stop_even_with_skip_bad_rows(tmp_path, skip):
    path = _listops(tmp_path, "Source\tTarget\r( [MAX 2 9 ] )\t9\r( [MIN 2 9 ] )\t2\r")
    with pytest.raises(errors.BadDataError) as info:
        _load_listops(tmp_path, skip_bad_rows=skip)
    message = str(info.value)
    assert (
        f"\n  {path}:1: 3 lines joined into one by carriage returns (\\r, old Mac line endings); "
        "convert them to newlines (tr '\\r' '\\n' < FILE > FIXED)\n"
    ) in message
    assert message.endswith("skipping rows cannot help here")


def test_listops_a_carriage_return_in_the_header_stops_the_run(tmp_path):
    path = _listops(tmp_path, "Sour\rce\tTarget\n( [MAX 2 9 ] )\t9\n")
    with pytest.raises(errors.BadDataError) as info:
        _load_listops(tmp_path, skip_bad_rows=True)
    assert f"\n  {path}:1: carriage return (\\r) inside the header at column 5" in str(info.value)


# ----------------------------------------------------------------------------- AAN: \r


def test_aan_a_carriage_return_outside_quotes_is_a_skippable_bad_row(tmp_path):
    # Line 5: a bare \r in text2; line 6: one inside quotes (text); 7: a good row; 8: CRLF.
    extra = '1\ta\tb\tt1\tt\r2\n0\tc\td\t"in\rside"\tx\n1\te\tf\tg\th\n0\ti\tj\tk\tl\r\n'
    path = _aan(tmp_path, GOOD_AAN + extra)
    with pytest.raises(errors.BadDataError) as info:
        _load_aan(tmp_path, skip_bad_rows=False)
    message = str(info.value)
    assert message.startswith(f"1 bad example(s) in {path}:\n")
    assert (
        f"\n  {path}:5: carriage return (\\r) outside quotes at column 11, which ends the row "
        "there; delete it, or quote the text that holds it\n"
    ) in message
    assert "cannot be read" not in message and "skipping rows cannot help" not in message
    assert message.endswith("--config.data.skip_bad_rows=True")
    with pytest.warns(errors.SkippedExamplesWarning, match=re.escape(f"{path}:5: carriage return")):
        data = _load_aan(tmp_path, skip_bad_rows=True)
    np.testing.assert_array_equal(data["labels"], [0, 1, 0, 1, 0, 1, 0])  # the rows after it too
    rows, problems = _aan_rows(path)
    assert rows[4:] == [(0, "in\rside", "x"), (1, "g", "h"), (0, "k", "l")]


def test_aan_a_carriage_return_after_a_multi_line_text_names_its_line(tmp_path):
    path = _aan(tmp_path, GOOD_AAN + '1\ta\tb\t"one\ntwo"\tt\r2\n' + GOOD_AAN)
    rows, problems = _aan_rows(path)
    assert problems == [
        (
            str(path),
            5,
            "carriage return (\\r) outside quotes at line 6, column 7, which ends the row there; "
            "delete it, or quote the text that holds it",
        )
    ]
    assert len(rows) == 8


@pytest.mark.parametrize("skip", [False, True])
def test_aan_old_mac_line_ends_stop_even_with_skip_bad_rows(tmp_path, skip):
    path = _aan(tmp_path, GOOD_AAN.replace("\n", "\r"))
    with pytest.raises(errors.BadDataError) as info:
        _load_aan(tmp_path, skip_bad_rows=skip)
    message = str(info.value)
    assert (
        f"\n  {path}:1: 4 rows joined into one line by carriage returns (\\r, old Mac line "
        "endings); convert them to newlines (tr '\\r' '\\n' < FILE > FIXED)\n"
    ) in message
    assert message.endswith("skipping rows cannot help here")


# ----------------------------------------------------------------------------- AAN: open quotes


@pytest.mark.parametrize("skip", [False, True])
def test_aan_a_quote_that_takes_in_rows_ending_in_a_quoted_text_stops_the_run(tmp_path, skip):
    # The quote opened in text2 of line 1 is closed by the quoted last text of line 4: one row of
    # 5 fields (lines 1-4) that was accepted, two of the five rows kept.
    path = _aan(
        tmp_path,
        '1\ta\tb\tdoc one\t"doc two opened\n'
        "0\tc\td\tthree\tfour\n"
        "1\te\tf\tfive\tsix\n"
        '0\tg\th\tseven\t"eight"\n'
        "1\ti\tj\tnine\tten\n",
    )
    with pytest.raises(errors.BadDataError) as info:
        _load_aan(tmp_path, skip_bad_rows=skip)
    message = str(info.value)
    assert message.startswith(f"1 bad example(s) in {path}:\n")
    assert (
        f'\n  {path}:1: a quote (") opened here is still open at line 2, which looks like a row '
        "of its own: lines 2-4 were read into this row's text (3 of them look like rows); close "
        'the quote where its text ends (a quote inside a quoted text is doubled: "say ""hi""")\n'
    ) in message
    assert message.endswith("skipping rows cannot help here")


def test_aan_the_line_named_is_where_the_open_quote_opened(tmp_path):
    # Row 5-6 holds a right multi-line text1; its text2 opens the quote that takes in line 7.
    path = _aan(
        tmp_path, GOOD_AAN + '1\ta\tb\t"multi\nline"\t"open\n0\tc\td\te\tf\n1\tx\ty\tz\t"w"\n'
    )
    rows, problems = _aan_rows(path)
    assert [(line, reason.split(",")[0]) for _, line, reason in problems] == [
        (6, 'a quote (") opened here is still open at line 7')
    ]


@pytest.mark.parametrize("newline", ["", "\n"])
@pytest.mark.parametrize("skip", [False, True])
def test_aan_a_file_that_ends_inside_a_quote_stops_the_run(tmp_path, skip, newline):
    path = _aan(tmp_path, GOOD_AAN + '0\tg\th\tseven\t"h trunc' + newline)
    with pytest.raises(errors.BadDataError) as info:  # text2 was read as 'h trunc'
        _load_aan(tmp_path, skip_bad_rows=skip)
    message = str(info.value)
    assert (
        f'\n  {path}:5: a quote (") opened here is never closed: the file ends inside it; close '
        "the quote where its text ends, or unpack the release again if the file was cut short\n"
    ) in message
    assert message.endswith("skipping rows cannot help here")


def test_aan_a_file_that_ends_inside_a_multi_line_quote_names_its_lines(tmp_path):
    path = _aan(tmp_path, GOOD_AAN + '0\tg\th\tseven\t"h trunc\nmore text\n')
    rows, problems = _aan_rows(path)
    assert [(line, reason.split(";")[0]) for _, line, reason in problems] == [
        (
            5,
            'a quote (") opened here is never closed: the file ends inside it (lines 5-6 are its text)',
        )
    ]
    assert len(rows) == 4


# ----------------------------------------------------------------------------- AAN: right quotes


def test_aan_right_quotes_read_as_before(tmp_path):
    """Quoted tabs, newlines, carriage returns and doubled quotes, quotes inside a text, text lines
    that do not start like rows, CRLF line ends: every row kept, with the old code's values."""
    text = (
        '1\ta1\tb1\t"He said ""hi""\tand left."\tplain text two\n'
        '0.0\ta2\tb2\tno quotes here\t"tab\tinside\tquotes"\n'
        '1.0\ta3\tb3\t"line one\nline two"\t"x\r\ny"\n'
        '0\ta4\tb4\tmid "quote" stays\t"ok"\n'
        '1\ta5\tb5\t"text lines:\n1 a\tb\n0\tonly two tabs\tx\n2\ta\tb\tc\n"\t"ab"c\r\n'
        '0\ta6\tb6\t""\t"a ""quoted"" word"\n'
    )
    path = _aan(tmp_path, text)
    rows, problems = _aan_rows(path)
    assert problems == [(str(path), 12, "empty document")]
    assert rows == [
        (1, 'He said "hi"\tand left.', "plain text two"),
        (0, "no quotes here", "tab\tinside\tquotes"),
        (1, "line one\nline two", "x\r\ny"),
        (0, 'mid "quote" stays', "ok"),
        (1, "text lines:\n1 a\tb\n0\tonly two tabs\tx\n2\ta\tb\tc\n", "abc"),
    ]


def test_aan_a_row_with_too_many_fields_names_the_line_its_open_quote_opened_on(tmp_path):
    # Row 5-8: a right multi-line text1, then text2's quote takes in line 7 and closes on line 8.
    text = GOOD_AAN + '1\ta\tb\t"multi\nline"\t"open\n0\tc\td\te\tf\nend" x\tmore\n' + GOOD_AAN
    path = _aan(tmp_path, text)
    rows, problems = _aan_rows(path)
    assert problems == [
        (
            str(path),
            5,
            'expected 5 tab-separated fields; got 6 in one row spanning lines 5-8: a quote (") '
            "opened on line 6 is not closed before line 8, and the 2 line(s) after it, rows that "
            "may be good, were read into it",
        )
    ]
    assert len(rows) == 8

"""The LRA release's ListOps files read row by row, bad rows counted (``data.skip_bad_rows``).

``listops-1000/basic_{train,val,test}.tsv`` is found whether the release is nested or not; rows
are tokenised by :class:`hgrn_jax.data.listops.ListOpsTokenizer` (the reference's tokenisation).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from hgrn_jax.data import listops, release
from hgrn_jax.data.errors import BadDataReport


def find_file(lra_dir: str, split: str) -> Path:
    """``basic_{split}.tsv`` under the release's ``listops-1000/`` (or in lra_dir itself)."""
    name = listops.split_filename(split)
    if lra_dir:
        for relative in (f"listops-1000/{name}", name, f"listops/{name}"):
            for root in release.candidate_roots(lra_dir):
                if (root / relative).is_file():
                    return root / relative
    return release.find_release_path(lra_dir, f"listops-1000/{name}", what=name)


def read_rows(path: Path, report: BadDataReport) -> tuple[list[str], np.ndarray]:
    """Sources and labels (int32, 0-9) of the good rows; bad ones go to ``report``."""
    sources, labels = [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or "Source" not in header or "Target" not in header:
            report.add(path, 1, f"header {header} must name the columns Source<TAB>Target")
            return [], np.zeros(0, np.int32)
        src, tgt = header.index("Source"), header.index("Target")
        for fields in reader:
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                report.add(path, line, f"expected {len(header)} tab-separated fields; got "
                                       f"{len(fields)}")
                continue
            value = fields[tgt].strip()
            if not (value.isdigit() and 0 <= int(value) < listops.NUM_CLASSES):
                report.add(path, line, f"label {fields[tgt]!r} is not a class in "
                                       f"0..{listops.NUM_CLASSES - 1}")
                continue
            if not fields[src].strip():
                report.add(path, line, "empty expression")
                continue
            sources.append(fields[src])
            labels.append(int(value))
    return sources, np.array(labels, np.int32)


def load_split(split: str, *, lra_dir: str, seq_len: int, skip_bad_rows: bool = False
               ) -> dict[str, np.ndarray]:
    """``inputs`` (N, seq_len) uint8 ids (end token included), ``lengths``, ``labels``."""
    path = find_file(lra_dir, split)
    report = BadDataReport(str(path))
    sources, labels = read_rows(path, report)
    report.finish(skip_bad_rows)
    if not sources:
        report.add(path, 0, "no examples")
        report.finish(False)
    ids, lengths = listops.ListOpsTokenizer().encode(sources, seq_len)
    return {"inputs": ids.astype(np.uint8), "lengths": lengths, "labels": labels}

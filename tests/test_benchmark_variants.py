"""benchmarks/train_throughput.py's variant rows: which rows a run makes, and that a variant's
change is in force while a step is traced and undone afterwards."""

from __future__ import annotations

import argparse

from benchmarks.train_throughput import VARIANTS, row_names, undone
from hgrn_jax.nn import hgru
from hgrn_jax.ops import pallas_recurrence


def test_kernel_variant_rows_only_for_the_pallas_method():
    args = argparse.Namespace(
        methods=["auto", "pallas"],
        variants=[
            "after",
            "directions in one scan",
            "chained kernel",
            "loads after stores",
            "chained kernel, directions in one scan",
        ],
    )
    assert [name for name, _, _ in row_names(args)] == [
        "hgrn[auto]",
        "hgrn[auto] (directions in one scan)",
        "hgrn[pallas]",
        "hgrn[pallas] (directions in one scan)",
        "hgrn[pallas] (chained kernel)",
        "hgrn[pallas] (loads after stores)",
        "hgrn[pallas] (chained kernel, directions in one scan)",
        "transformer",
    ]


def test_chained_kernel_variant_sets_the_streaming_options_while_in_force():
    def options():
        defaults = pallas_recurrence._streaming_defaults
        return defaults.loads_ahead, defaults.chain_in_kernel

    before = options()
    assert before == (True, False)
    with undone(VARIANTS["chained kernel"]):
        assert options() == (True, True)
        assert hgru.MERGE_DIRECTIONS is None
    with undone(VARIANTS["loads after stores"]):
        assert options() == (False, False)
    assert options() == before
    with undone(VARIANTS["directions in one scan"]):
        assert hgru.MERGE_DIRECTIONS is True and options() == before
    with undone(VARIANTS["chained kernel, directions in one scan"]):
        assert hgru.MERGE_DIRECTIONS is True and options() == (True, True)
    with undone(VARIANTS["directions in two scans"]):
        assert hgru.MERGE_DIRECTIONS is False and options() == before
    assert hgru.MERGE_DIRECTIONS is None


def test_merge_variant_rows_left_out_where_they_repeat_the_default(monkeypatch):
    """At a known length, a row forcing the directions' merge to its default for that method
    is the "after" row again and is not made: on a GPU at 1k the associative scan merges
    (only "two scans" is new) and the Pallas kernel does not (only "one scan" is new); auto
    picks associative at 1k and the kernel at 2k."""
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args = argparse.Namespace(
        methods=["associative", "pallas", "auto"],
        variants=["after", "directions in one scan", "directions in two scans"],
    )
    for length, auto_variant in (
        (1024, "directions in two scans"),
        (2048, "directions in one scan"),
    ):
        args.length = length
        assert [name for name, _, _ in row_names(args)] == [
            "hgrn[associative]",
            "hgrn[associative] (directions in two scans)",
            "hgrn[pallas]",
            "hgrn[pallas] (directions in one scan)",
            "hgrn[auto]",
            f"hgrn[auto] ({auto_variant})",
            "transformer",
        ]

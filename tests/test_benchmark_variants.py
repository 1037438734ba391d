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
        assert hgru.MERGE_DIRECTIONS is False
    with undone(VARIANTS["loads after stores"]):
        assert options() == (False, False)
    assert options() == before
    with undone(VARIANTS["directions in one scan"]):
        assert hgru.MERGE_DIRECTIONS is True and options() == before
    with undone(VARIANTS["chained kernel, directions in one scan"]):
        assert hgru.MERGE_DIRECTIONS is True and options() == (True, True)
    assert hgru.MERGE_DIRECTIONS is False

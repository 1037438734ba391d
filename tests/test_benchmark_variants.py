"""benchmarks/train_throughput.py's variant rows: which rows a run makes, and that a variant's
change is in force while a step is traced and undone afterwards; where results are written."""

from __future__ import annotations

import argparse
import json

import jax

from benchmarks.train_throughput import TIMED_ON_H200, VARIANTS, row_names, undone
from hgrn_jax.nn import hgru
from hgrn_jax.ops.pallas_streaming import active_streaming_options


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
        defaults = active_streaming_options()
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


def test_the_h200_variant_undoes_every_change_since_and_is_a_row_of_every_method():
    """ "as timed on the H200" is a row of any method (not a kernel-only variant) and, while in
    force, puts back every default the H200 timing predates; all of them come back after."""
    import jax.numpy as jnp
    from flax import nnx

    from hgrn_jax.nn import norms

    args = argparse.Namespace(methods=["auto", "pallas"], variants=["after", TIMED_ON_H200])
    assert [name for name, _, _ in row_names(args)] == [
        "hgrn[auto]",
        f"hgrn[auto] ({TIMED_ON_H200})",
        "hgrn[pallas]",
        f"hgrn[pallas] ({TIMED_ON_H200})",
        "transformer",
    ]
    layer = hgru.HGRU(4, bidirectional=True, rngs=nnx.Rngs(0))
    lam = jnp.full((1, 3, 4), 0.5)
    shared = layer.decay(lam, "reverse")
    decay = hgru._HGRUBase.decay
    with undone(VARIANTS[TIMED_ON_H200]):
        assert hgru.MERGE_DIRECTIONS is False
        assert norms.CLOSED_FORM_BATCH_NORM_GRADIENT is False
        assert active_streaming_options().loads_ahead is False
        assert hgru._HGRUBase.decay is not decay
        assert (layer.decay(lam, "reverse") == shared).all()  # the same values, computed alone
    assert hgru.MERGE_DIRECTIONS is None and norms.CLOSED_FORM_BATCH_NORM_GRADIENT is True
    assert active_streaming_options().loads_ahead is True
    assert hgru._HGRUBase.decay is decay


def test_results_go_where_hgrn_bench_results_says_with_the_load_averages(tmp_path, monkeypatch):
    """A trial run of a benchmark replaced the committed numbers in benchmarks/results (only
    four scripts had --no-write), and most files recorded no load average although the
    benchmarks README said every one did."""
    from benchmarks import common

    monkeypatch.setenv(common.RESULTS_DIR_VARIABLE, str(tmp_path / "trial"))
    path = common.write_results("probe", [{"x": 1.0}], {"what": "a test"})
    assert path == tmp_path / "trial" / f"probe_{jax.default_backend()}.json"
    written = json.loads(path.read_text())
    assert written["rows"] == [{"x": 1.0}] and written["meta"] == {"what": "a test"}
    for key in ("load_average_at_start", "load_average_at_end"):
        assert len(written["machine"][key]) == 3 and min(written["machine"][key]) >= 0


def test_results_record_the_versions_that_ran():
    """A lent machine's image has its own jax, jaxlib, flax and optax (the pinned flax did not
    import there): each JSON records the versions that ran, not only jax's."""
    import flax
    import jaxlib
    import optax

    from benchmarks import common

    machine = common.machine_info()
    assert machine["jax_version"] == jax.__version__
    assert machine["jaxlib_version"] == jaxlib.__version__
    assert machine["flax_version"] == flax.__version__
    assert machine["optax_version"] == optax.__version__

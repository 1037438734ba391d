"""experiments.report on run folders at its edges: results and metrics of a diverged run (the
non-finite numbers experiments.train writes as the strings "nan", "inf", "-inf"), and runs of
models the report cannot tell (a task of the user's own with a model of its own), which must
never be labelled HGRN nor set beside a paper's rows."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

from experiments import curves, report, tables
from experiments.configs.hgrn2 import listops as hgrn2_listops
from experiments.configs.hgrn2 import pathx as hgrn2_pathx
from experiments.configs.imagenet import tiny as imagenet_tiny
from experiments.configs.lm import wikitext103
from experiments.configs.lra import listops, pathx
from experiments.runs import find_runs, find_unfinished
from hgrn_jax.training.logging import config_as_json, jsonable

# What tests/toy_task.py's config.json holds of the model: no mixer, no layers.
TOY_MODEL = {"features": 16, "dropout": 0.1}
TOY_LABEL = "own model (dropout=0.1, features=16)"
HGRN_LRA, HGRN2_LRA = "Long Range Arena (accuracy)", "Long Range Arena, HGRN2 (accuracy)"


def write_run(
    folder: Path,
    config: dict[str, Any],
    results: dict[str, Any] | None,
    records: list[dict[str, Any]],
) -> Path:
    """A run folder as experiments.train leaves it: config.json, metrics.jsonl and (unless None)
    results.json, each written through ``jsonable`` as the run writes them (a non-finite float
    becomes "nan", "inf" or "-inf"); without results, a committed checkpoint folder."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(jsonable(config), indent=2, sort_keys=True))
    lines = "".join(json.dumps(jsonable(record), sort_keys=True) + "\n" for record in records)
    (folder / "metrics.jsonl").write_text(lines)
    if results is None:
        (folder / "checkpoints" / "41").mkdir(parents=True)
    else:
        (folder / "results.json").write_text(json.dumps(jsonable(results), indent=2))
    return folder


def results_of(task: str, test: float, best_val: float, **fields: Any) -> dict[str, Any]:
    return {
        "task": task,
        "metric": "accuracy",
        "best_val": best_val,
        "best_step": 40,
        "test": test,
        "test_loss": 1.0,
        "paper": None,
        "data_source": "release",
        "steps": 40,
        "stopped_by": "num_train_steps",
        "wall_time_s": 1.0,
        "num_params": 1000,
        "devices": 1,
        "process_count": 1,
        **fields,
    }


def records_of(val_accuracy: list[float]) -> list[dict[str, Any]]:
    """Train records every 10 steps, a val record every 20 with the given accuracies."""
    records = []
    for step in range(10, 10 * len(val_accuracy) * 2 + 1, 10):
        records.append({"step": step, "split": "train", "loss": 1.5, "accuracy": 20.0})
        if step % 20 == 0:
            accuracy = val_accuracy[step // 20 - 1]
            records.append({"step": step, "split": "val", "loss": 1.2, "accuracy": accuracy})
    return records


def lra_config(source: str = "release") -> dict[str, Any]:
    """A run's config.json of experiments/configs/lra/listops.py (the paper's HGRN)."""
    config = config_as_json(listops.get_config())
    config["data"]["source"] = source
    return config


def rows_of(markdown: str, title: str) -> list[list[str]]:
    """The cells of the body rows of the table under ``### <title>``; [] without that table."""
    if f"### {title}\n\n" not in markdown:
        return []
    table = markdown.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def run_report(tmp_path: Path, capsys: Any) -> tuple[str, str]:
    assert report.main([str(tmp_path / "runs"), "--png", str(tmp_path / "c.png")]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


# -- Bug 1: non-finite numbers written as strings ---------------------------------------------


def test_a_diverged_run_s_nan_results_are_reported_not_refused(tmp_path, capsys):
    """A run whose validation loss was NaN wrote ``"best_val": "nan", "test": "nan"`` (jsonable
    writes non-finite floats as strings); the report refused the file ("test should be a
    number, not "nan"") and listed the run as "results.json unreadable". The strings are read as
    the floats they stand for: the run keeps its row, its numbers shown as nan or inf, with a
    warning; the LRA average takes the task's other, finite run."""
    runs = tmp_path / "runs"
    nan_records = records_of([math.nan, math.nan])
    diverged = write_run(
        runs / "diverged", lra_config(), results_of("listops", math.nan, math.nan), nan_records
    )
    fine = write_run(runs / "fine", lra_config(), results_of("listops", 50.0, 51.0), records_of([]))
    toy = {"task": "toy_task:make_task", "model": TOY_MODEL, "data": {"num_val": 20}}
    inf = write_run(
        runs / "inf", toy, results_of("toy", -math.inf, math.inf, data_source=None), records_of([])
    )
    assert json.loads((diverged / "results.json").read_text())["test"] == "nan"  # as written
    out, err = run_report(tmp_path, capsys)
    assert "should be a number" not in err and "Runs without results" not in out
    lra = {r[-1]: r[1:5] for r in rows_of(out, "Long Range Arena (accuracy)") if r[0] == "ListOps"}
    assert lra == {
        str(diverged): ["59.95", "nan", "nan", "40"],
        str(fine): ["59.95", "50.00", "51.00", "40"],
    }
    assert (
        f"warning: {diverged}: results.json's best_val = nan, test = nan (not finite: did the "
        "run diverge?); shown as such in the tables" in err
    )
    assert f"warning: {inf}: results.json's best_val = inf, test = -inf (not finite" in err
    (other,) = rows_of(out, "Other runs")
    assert other[3:6] == ["-inf", "inf", "40"] and other[-1] == str(inf)
    assert f"Average of: ListOps {fine} " in out  # the finite run's validation, never NaN


def test_other_strings_where_a_number_belongs_are_still_refused(tmp_path, capsys):
    """Only jsonable's strings stand for numbers: "NaN", "n/a" or "1.5" are not what
    experiments.train writes, and the run is still listed as unreadable."""
    for name, value in (("capital", "NaN"), ("text", "n/a"), ("digits", "1.5")):
        results = results_of("listops", 50.0, 51.0) | {"test": value}
        write_run(tmp_path / "runs" / name, lra_config(), results, records_of([40.0]))
    out, err = run_report(tmp_path, capsys)
    for name, value in (("capital", "NaN"), ("text", "n/a"), ("digits", "1.5")):
        run = tmp_path / "runs" / name
        assert f'{run / "results.json"}: test should be a number, not "{value}"' in err
        (entry,) = [r for r in rows_of(out, "Runs without results") if r[0] == str(run)]
        assert entry[-1] == "results.json unreadable (see the warning)"


def test_nan_strings_in_metrics_jsonl_are_read_as_numbers(tmp_path, capsys):
    """metrics.jsonl is written through jsonable too: a NaN validation accuracy is the string
    "nan". It is read as NaN: the curves get a gap there (not a point left out in silence),
    and the best validation so far of a run without results passes over it."""
    runs = tmp_path / "runs"
    done = write_run(
        runs / "done", lra_config(), results_of("listops", 50.0, 51.0), records_of([40.0, math.nan])
    )
    write_run(runs / "unfinished", lra_config(), None, records_of([42.0, math.nan, math.inf]))
    assert '"accuracy": "nan"' in (done / "metrics.jsonl").read_text()  # as written
    (run,) = find_runs([runs])
    points = curves.curve_points(run, "val", "accuracy")
    assert points[0] == (20, 40.0) and points[1][0] == 40 and math.isnan(points[1][1])
    (unfinished,) = find_unfinished([runs])
    assert unfinished.best_val() == (42.0, 20)
    out, _ = run_report(tmp_path, capsys)
    (entry,) = rows_of(out, "Runs without results")
    assert entry[5] == "42.00 accuracy (step 20)"
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_a_damaged_metrics_line_is_named_and_the_rest_still_read(tmp_path, capsys):
    """A line of metrics.jsonl that is not a JSON record (a disk error, a hand edit) is left out
    with a warning naming FILE:LINE; the report reads the records around it. Bytes that are not
    UTF-8 stopped the whole report with a UnicodeDecodeError (it read the file as text)."""
    runs = tmp_path / "runs"
    done = write_run(
        runs / "done", lra_config(), results_of("listops", 50.0, 51.0), records_of([40.0, 45.0])
    )
    lines = (done / "metrics.jsonl").read_bytes().split(b"\n")
    lines[2] = b'{"step": 20, "split": "val", "accur'  # the first val record, cut short
    lines[3] = b"\xff\xfe garbage"
    (done / "metrics.jsonl").write_bytes(b"\n".join(lines))
    (run,) = find_runs([runs])
    assert curves.curve_points(run, "val", "accuracy") == [(40, 45.0)]
    out, err = run_report(tmp_path, capsys)
    metrics = done / "metrics.jsonl"
    assert f"warning: {metrics}:3 is not a JSON record" in err
    assert f"warning: {metrics} is not UTF-8 text (byte " in err and "line 4)" in err
    assert "50.00" in out


# -- Bug 2: models the report cannot tell ------------------------------------------------------


def test_a_task_s_own_model_is_not_labelled_hgrn(tmp_path, capsys):
    """A run of tests/toy_task.py (a model without any HGRN layer; its config.model has features
    and dropout, no mixer) was labelled "HGRN (? layers, d 16)", a user's own classifier
    "HGRN (2 layers, d 16)"; a task of one's own named like a paper's task (results.json's
    "listops") was set beside HGRN's ListOps row. Without a model.mixer, a ``module:factory``
    task's model is the task's own: labelled so, with its config.model settings, in "Other
    runs". The task reads the same in both tables: config.task (after the task's own name)."""
    runs = tmp_path / "runs"
    toy = {"task": "toy_task:make_task", "model": TOY_MODEL, "num_train_steps": 12}
    write_run(runs / "toy", toy, results_of("toy", 25.0, 35.0, data_source=None), records_of([]))
    write_run(runs / "toy_unfinished", toy, None, records_of([30.0]))
    own = {"task": "firsttok:DATASET", "model": {"num_layers": 2, "features": 16}}
    write_run(runs / "firsttok", own, results_of("firsttok", 70.0, 71.0), records_of([]))
    write_run(runs / "firsttok_unfinished", own, None, records_of([60.0]))
    clash = {"task": "mine:make_task", "model": {"num_layers": 2, "features": 16}}
    write_run(runs / "clash", clash, results_of("listops", 99.0, 99.5), records_of([]))
    out, _ = run_report(tmp_path, capsys)
    others = {Path(r[-1]).name: r[:2] for r in rows_of(out, "Other runs")}
    assert others == {
        "toy": ["toy (toy_task:make_task)", TOY_LABEL],
        "firsttok": ["firsttok (firsttok:DATASET)", "own model (features=16, num_layers=2)"],
        "clash": ["listops (mine:make_task)", "own model (features=16, num_layers=2)"],
    }
    unfinished = {Path(r[0]).name: r[1:3] for r in rows_of(out, "Runs without results")}
    assert unfinished == {
        "toy_unfinished": ["toy_task:make_task", TOY_LABEL],
        "firsttok_unfinished": ["firsttok:DATASET", "own model (features=16, num_layers=2)"],
    }
    (listops_row,) = [r for r in rows_of(out, "Long Range Arena (accuracy)") if r[0] == "ListOps"]
    assert listops_row[1:3] == ["59.95", "—"]  # the user's "listops" is not HGRN's
    assert "HGRN (" not in out.split("### Other runs", 1)[1]


def test_a_factory_s_own_model_class_is_not_hgrn_whatever_its_config_says(tmp_path, capsys):
    """A ``module:factory`` task that kept a preset's config.model (a ``model.mixer`` of HGRN)
    but built a model class of its own was labelled HGRN and set beside HGRN's paper ListOps
    row; results.json's ``model_class`` tells: outside the package, an own model in "Other
    runs"; the package's classifier (a factory wrapping the package's task) keeps the row."""
    runs = tmp_path / "runs"
    preset = config_as_json(listops.get_config("tiny"))
    preset["task"], preset["data"]["source"] = "mine:make_task", "release"
    own = results_of("listops", 99.0, 99.5, model_class="mine.OwnClassifier")
    write_run(runs / "own", preset, own, records_of([]))
    package = results_of("listops", 50.0, 51.0, model_class="hgrn_jax.nn.HGRNClassifier")
    write_run(runs / "package", preset, package, records_of([]))
    for name, model_class in (("own_unfinished", "mine.OwnClassifier"), ("hgrn_unfinished", None)):
        folder = write_run(runs / name, preset, None, records_of([30.0]))
        start = {"event": "started", "step": 0, "model_class": model_class}
        (folder / "events.jsonl").write_text(json.dumps(start) + "\n")
    out, _ = run_report(tmp_path, capsys)
    (other,) = rows_of(out, "Other runs")
    assert other[0] == "listops (mine:make_task)" and other[1].startswith("own model (")
    assert Path(other[-1]).name == "own"
    rows = [r for r in rows_of(out, "Long Range Arena (accuracy)") if r[0] == "ListOps"]
    assert [Path(r[-1].split(" (")[0]).name for r in rows] == ["package"]
    assert rows[0][2] == "50.00"
    unfinished = {Path(r[0]).name: r[2] for r in rows_of(out, "Runs without results")}
    assert unfinished["own_unfinished"].startswith("own model (")
    assert unfinished["hgrn_unfinished"] == "HGRN (2 layers, d 32)"  # a start without the field


def test_an_unfinished_run_is_labelled_by_its_newest_start_s_model_class(tmp_path):
    """A run started before the start records had ``model_class`` and resumed since: its newest
    start's class labels it (the first start's, absent, left an own model labelled HGRN)."""
    preset = config_as_json(listops.get_config("tiny"))
    preset["task"], preset["data"]["source"] = "mine:make_task", "release"
    folder = write_run(tmp_path / "runs" / "resumed", preset, None, records_of([30.0]))
    starts = [{"event": "started", "step": 0}, {"event": "stopped", "reason": "SIGTERM"}]
    starts.append({"event": "started", "step": 20, "model_class": "mine.OwnClassifier"})
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in starts))
    (unfinished,) = find_unfinished([tmp_path / "runs"])
    assert unfinished.model_class == "mine.OwnClassifier"
    assert unfinished.mixer is None


def test_the_package_s_models_keep_their_labels_and_tables(tmp_path, capsys):
    """Runs of the package's configs (ListOps's HGRN, HGRN2 through model.mixer.kind, the
    Transformer baseline) keep their paper tables and labels; so does a task of one's own whose
    config says its model (a model.mixer, as one copied from a preset), and a registry task's
    run whose config.json predates model.mixer (the registry's model: HGRN)."""
    runs = tmp_path / "runs"
    results = results_of("listops", 50.0, 51.0)
    write_run(runs / "hgrn", lra_config(), results, records_of([]))
    hgrn2 = config_as_json(hgrn2_listops.get_config())
    hgrn2["data"]["source"] = "release"
    write_run(runs / "hgrn2", hgrn2, results, records_of([]))
    baseline = config_as_json(listops.get_config("transformer"))
    baseline["data"]["source"] = "release"
    write_run(runs / "transformer", baseline, results, records_of([]))
    old = {"task": "listops", "data": {"source": "release"}, "model": {"features": 64}}
    write_run(runs / "old", old, results, records_of([]))
    preset = config_as_json(listops.get_config("tiny"))
    preset["task"] = "parity:DATASET"
    preset["model"]["mixer"]["kind"] = "hgrn2"
    write_run(runs / "parity", preset, results_of("parity", 80.0, 81.0), records_of([]))
    unfinished = dict(preset, task="listops")
    write_run(runs / "unfinished", unfinished, None, records_of([30.0]))
    out, _ = run_report(tmp_path, capsys)

    def listops_runs(title: str) -> dict[str, list[str]]:
        return {
            Path(r[-1].split(" (")[0]).name: r for r in rows_of(out, title) if r[0] == "ListOps"
        }

    hgrn = listops_runs("Long Range Arena (accuracy)")
    assert sorted(hgrn) == ["hgrn", "old"] and hgrn["hgrn"][1:3] == ["59.95", "50.00"]
    hgrn2_rows = listops_runs("Long Range Arena, HGRN2 (accuracy)")
    assert list(hgrn2_rows) == ["hgrn2"] and hgrn2_rows["hgrn2"][1:3] == ["60.52", "50.00"]
    assert hgrn2_rows["hgrn2"][-1] == f"{runs / 'hgrn2'} (HGRN2)"
    transformer = listops_runs("Long Range Arena, Transformer baseline (accuracy)")
    assert transformer["transformer"][-1] == f"{runs / 'transformer'} (Transformer baseline)"
    (parity,) = rows_of(out, "Other runs")
    width, layers = preset["model"]["features"], preset["model"]["num_layers"]
    assert parity[:2] == ["parity (parity:DATASET)", f"HGRN2 ({layers} layers, d {width})"]
    (entry,) = rows_of(out, "Runs without results")
    assert entry[1:3] == ["listops", f"HGRN2 ({layers} layers, d {width})"]


# -- A run whose model is not the paper's row's ------------------------------------------------


def hgrn2_runs(runs: Path) -> None:
    """Real-data runs of HGRN2's paper configs on the five tasks other than Path-X."""
    for task in ("listops", "text", "retrieval", "image", "pathfinder"):
        config = config_as_json(
            importlib.import_module(f"experiments.configs.hgrn2.{task}").get_config()
        )
        steps = {"steps": config["num_train_steps"]}
        write_run(runs / task, config, results_of(task, 80.0, 81.0, **steps), records_of([]))


def test_an_hgrn2_path_x_run_of_another_layer_is_marked_and_not_averaged(tmp_path, capsys):
    """HGRN2's Path-X row is of the series layer (experiments/configs/hgrn2/pathx.py,
    model.mixer.scan="2d_series"); a run of ``lra/pathx.py --config.model.mixer.kind=hgrn2`` (the
    four-scan "2d" layer at HGRN's width) was set beside its 98.12 without a word, and with the
    higher validation accuracy it was the run HGRN2's six-task average took. The average takes
    the paper's layer; the other run is marked with how its model differs; with it alone, the
    average and a line under the table say that its model is not the paper's."""
    runs = tmp_path / "runs"
    hgrn2_runs(runs)
    series = config_as_json(hgrn2_pathx.get_config())
    steps = series["num_train_steps"]  # both runs of the paper's length: only the model differs
    four_scans = json.loads(json.dumps(series))  # HGRN2's recipe, HGRN's model at kind hgrn2
    four_scans["model"] = config_as_json(pathx.get_config())["model"]
    four_scans["model"]["mixer"]["kind"] = "hgrn2"
    write_run(runs / "pathx_2d", four_scans, results_of("pathx", 60.0, 99.0, steps=steps), [])
    write_run(runs / "pathx_series", series, results_of("pathx", 92.0, 93.0, steps=steps), [])
    out, _ = run_report(tmp_path, capsys)
    rows = {r[-1].split(" (")[0]: r for r in rows_of(out, HGRN2_LRA) if r[0] == "Path-X"}
    assert rows[str(runs / "pathx_series")][-1] == f"{runs / 'pathx_series'} (HGRN2)"
    differs = (
        "model differs from the paper's: model.mixer.scan '2d' vs '2d_series', "
        "model.mixer.expand_ratio unset (2) vs 1, model.features 64 vs 32 and 3 more"
    )
    assert rows[str(runs / "pathx_2d")][-1] == f"{runs / 'pathx_2d'} (HGRN2) ({differs})"
    (average,) = [r for r in rows_of(out, HGRN2_LRA) if r[0] == "**Average** (HGRN2)"]
    assert average[1:3] == ["87.66", f"{(5 * 80.0 + 92.0) / 6:.2f}"]  # the series run's 92
    assert f"Path-X {runs / 'pathx_series'}" in out and "Not the paper's model" not in out

    (runs / "pathx_series" / "results.json").unlink()  # the "2d" run alone: marked
    out, _ = run_report(tmp_path, capsys)
    (average,) = [r for r in rows_of(out, HGRN2_LRA) if r[0] == "**Average** (HGRN2)"]
    mean = f"{(5 * 80.0 + 60.0) / 6:.2f}"
    assert average[2] == f"{mean} (model differs from the paper's for Path-X)"
    assert (
        f"- Not the paper's model (no real-data run of it): Path-X {runs / 'pathx_2d'} "
        f"({differs.split(': ', 1)[1]})"
    ) in out


def test_a_run_of_another_model_than_the_paper_s_row_is_marked(tmp_path, capsys):
    """A ListOps run with ``--config.model.num_layers=2`` sat beside the paper's 6-layer 59.95
    unmarked; so did an ImageNet run of HGRN-Tiny's width at another depth and a WikiText-103
    run of the paper's size with fla's layer. Each is marked with its differences, keys named as
    they are overridden; a run of the paper's model (other dropout, recurrence method, remat or
    dtype included: they do not change the model; dropout and dtype are marked as the recipe's),
    a run whose config.json predates keys (a key it lacks is no difference) and a tiny run on
    generated data (marked as such) are not."""
    runs = tmp_path / "runs"
    shallow = lra_config()
    shallow["model"]["num_layers"] = 2
    write_run(runs / "shallow", shallow, results_of("listops", 50.0, 51.0), [])
    same = lra_config()
    same["model"]["dropout"], same["model"]["remat"] = 0.1, "full"
    same["model"]["mixer"]["method"], same["dtype"] = "sequential", "bfloat16"
    write_run(runs / "same", same, results_of("listops", 50.0, 51.0), [])
    old = {"task": "listops", "data": {"source": "release"}, "model": {"features": 32}}
    write_run(runs / "old", old, results_of("listops", 50.0, 51.0), [])
    tiny = config_as_json(listops.get_config("tiny"))  # generated data: already marked so
    write_run(runs / "tiny", tiny, results_of("listops", 30.0, 31.0, data_source="generated"), [])
    hgrn2_old = {"task": "pathx", "model": {"features": 32, "mixer": {"kind": "hgrn2"}}}
    write_run(runs / "hgrn2_old", hgrn2_old, results_of("pathx", 90.0, 91.0), [])
    imagenet = config_as_json(imagenet_tiny.get_config())
    imagenet["model"]["num_layers"] = 6
    write_run(runs / "imagenet", imagenet, results_of("imagenet", 70.0, 71.0), [])
    lm = config_as_json(wikitext103.get_config())
    lm["model"]["mixer"]["layout"], lm["data"]["tokenizer_path"] = "fla", "/data/gpt2"
    lm_results = results_of("wikitext103", 25.0, 26.0, metric="perplexity")
    write_run(runs / "lm", lm, lm_results, [])
    out, _ = run_report(tmp_path, capsys)
    listops_runs = {Path(r[-1].split(" (")[0]).name: r[-1] for r in rows_of(out, HGRN_LRA)}
    assert listops_runs["shallow"] == (
        f"{runs / 'shallow'} (model differs from the paper's: model.num_layers 2 vs 6)"
    )
    assert listops_runs["same"] == (  # dropout and dtype: the recipe's, not the model's
        f"{runs / 'same'} (setting differs from the paper's: model.dropout 0.1 vs 0.0, "
        "dtype 'bfloat16' vs 'float32')"
    )
    assert listops_runs["old"] == str(runs / "old")
    assert listops_runs["tiny"] == f"{runs / 'tiny'} (generated data)"
    (pathx_row,) = [r for r in rows_of(out, HGRN2_LRA) if r[0] == "Path-X"]
    assert pathx_row[-1] == f"{runs / 'hgrn2_old'} (HGRN2)"
    (tiny_row,) = [r for r in rows_of(out, "ImageNet-1k (top-1 accuracy)") if r[0] == "HGRN-Tiny"]
    assert tiny_row[-1].endswith("(model differs from the paper's: model.num_layers 6 vs 12)")
    (lm_row,) = rows_of(out, "WikiText-103 (perplexity, lower is better)")
    assert lm_row[1] == "24.14"  # beside the paper's numbers: its setting's size and vocabulary
    assert lm_row[-1] == (
        f"{runs / 'lm'} (model differs from the paper's: model.mixer.layout 'fla' vs 'official')"
    )


def test_defaults_left_unset_are_the_paper_s_model_and_the_average_takes_it_first(tmp_path, capsys):
    """A run whose config leaves to the mixer a default the paper config spells out
    (``complex_valued=None``, read as True) or leaves the vocabulary to the data (0) has the
    paper's model, unmarked. For a task's average a run of the paper's model is taken before
    one of another model, even one of the paper's setting (all its steps) with a higher
    validation accuracy."""
    runs = tmp_path / "runs"
    unset = lra_config()
    unset["model"]["mixer"]["complex_valued"], unset["model"]["vocab_size"] = None, 0
    unset["num_train_steps"] = 40  # shorter than the paper's: not the paper's setting
    write_run(runs / "unset", unset, results_of("listops", 50.0, 51.0, steps=40), [])
    shallow = lra_config()
    shallow["model"]["num_layers"] = 2
    steps = shallow["num_train_steps"]
    write_run(runs / "shallow", shallow, results_of("listops", 60.0, 99.0, steps=steps), [])
    out, _ = run_report(tmp_path, capsys)
    listops_runs = {Path(r[-1].split(" (")[0]).name: r[-1] for r in rows_of(out, HGRN_LRA)}
    assert listops_runs["unset"] == str(runs / "unset")
    assert listops_runs["shallow"].endswith(
        "(model differs from the paper's: model.num_layers 2 vs 6)"
    )
    assert "Not the paper's model" not in out


def test_every_model_config_field_is_compared_or_said_not_to_define_the_model():
    """The report compares a run's model with its paper config's on tables.MODEL_KEYS; every
    field of the model config classes (and every model key of the paper configs) is either
    there or in tables.NOT_MODEL_KEYS, so that a new field is decided on, not passed over; and
    the mixer's defaults the report fills in are MixerConfig's."""
    from hgrn_jax.nn import ClassifierConfig, ImageConfig, LMConfig, MixerConfig
    from hgrn_jax.nn.mixers import LEGACY_MIXER_FIELDS

    decided = set(tables.MODEL_KEYS) | set(tables.NOT_MODEL_KEYS)
    assert not set(tables.MODEL_KEYS) & set(tables.NOT_MODEL_KEYS)
    legacy = {*LEGACY_MIXER_FIELDS, "in_channels", "glu_hidden", "mixer_norm_epsilon"}
    fields = {f"mixer.{f.name}" for f in dataclasses.fields(MixerConfig)}
    for cls in (ClassifierConfig, ImageConfig, LMConfig):
        fields |= {f.name for f in dataclasses.fields(cls)} - legacy - {"mixer"}
    assert fields - decided == set()
    for name in ("lra.pathx", "hgrn2.pathx", "imagenet.small", "lm.wikitext103", "lra.retrieval"):
        assert set(tables._paper_model(name)) - decided == set()
    for kind, layout in (("hgrn", "official"), ("hgrn2", "official"), ("hgrn2", "fla")):
        model = {"mixer.kind": kind, "mixer.layout": layout, "mixer.expand_ratio": None}
        resolved = MixerConfig(kind=kind, layout=layout).resolved_expand_ratio
        assert tables._resolved(model)["mixer.expand_ratio"] == resolved


PAPER_CONFIGS = (
    *(f"{paper}.{task}" for paper in ("lra", "hgrn2") for task in tables.LRA_TASKS),
    "imagenet.tiny",
    "imagenet.small",
    "lm.wikitext103",
)


def hgrn_runs(runs: Path, tasks: tuple[str, ...]) -> None:
    """Real-data runs of HGRN's paper configs on ``tasks``, each of the paper's length."""
    for task in tasks:
        config = config_as_json(
            importlib.import_module(f"experiments.configs.lra.{task}").get_config()
        )
        steps = {"steps": config["num_train_steps"]}
        write_run(runs / task, config, results_of(task, 80.0, 81.0, **steps), records_of([]))


def test_a_listops_run_of_another_recipe_is_marked_and_not_averaged(tmp_path, capsys):
    """A ListOps run with ``--config.optimizer.learning_rate=1e-2 --config.batch_size=16`` sat
    beside the paper's 59.95 as the paper's setting, and with its higher validation accuracy the
    average took it over a run of the paper's recipe. It is marked with the keys that differ;
    the average takes the paper's recipe; with the other run alone, the average and a line under
    the table say that its setting is not the paper's."""
    runs = tmp_path / "runs"
    hgrn_runs(runs, tuple(t for t in tables.LRA_TASKS if t != "listops"))
    paper = lra_config()
    steps = {"steps": paper["num_train_steps"]}  # both of the paper's length: the recipe differs
    other = lra_config()
    other["optimizer"]["learning_rate"], other["batch_size"] = 1e-2, 16
    write_run(runs / "lr", other, results_of("listops", 70.0, 90.0, **steps), [])
    write_run(runs / "paper", paper, results_of("listops", 50.0, 51.0, **steps), [])
    out, _ = run_report(tmp_path, capsys)
    rows = {Path(r[-1].split(" (")[0]).name: r for r in rows_of(out, HGRN_LRA) if r[0] == "ListOps"}
    differs = "optimizer.learning_rate 0.01 vs 0.0005, batch_size 16 vs 128"
    assert rows["lr"][-1] == f"{runs / 'lr'} (setting differs from the paper's: {differs})"
    assert rows["paper"][-1] == str(runs / "paper")
    (average,) = [r for r in rows_of(out, HGRN_LRA) if r[0] == "**Average**"]
    assert average[2] == f"{(5 * 80.0 + 50.0) / 6:.2f}"  # the paper recipe's 50
    assert f"ListOps {runs / 'paper'}" in out and "Not the paper's recipe" not in out

    (runs / "paper" / "results.json").unlink()  # the other recipe alone: marked
    out, _ = run_report(tmp_path, capsys)
    (average,) = [r for r in rows_of(out, HGRN_LRA) if r[0] == "**Average**"]
    mean = f"{(5 * 80.0 + 70.0) / 6:.2f}"
    assert average[2] == f"{mean} (setting differs from the paper's for ListOps)"
    assert f"- Not the paper's recipe: ListOps {runs / 'lr'} ({differs})" in out


def test_a_run_differing_only_in_keys_that_do_not_change_training_is_unmarked(tmp_path, capsys):
    """Evaluation, logging, checkpoints, sharding, data folders and workers, resumption, the
    seed (another draw of the recipe), micro-batches of the same batch and the paper's numbers
    are not the recipe; a config.json of older code without the recipe keys is no difference."""
    runs = tmp_path / "runs"
    same = lra_config()
    same.update(eval_every=7, log_every=3, checkpoint_every=9, keep_checkpoints=5, seed=4)
    same.update(resume="restart", eval_batch_size=8, max_train_time_s=0.0)
    same["mesh"]["data"], same["mesh"]["fsdp"] = 2, 2
    same["data"].update(lra_dir="/data/lra", cache_dir="/tmp/c", workers=4, skip_bad_rows=True)
    same["optimizer"]["accumulate_steps"] = 4
    same["model"]["remat"], same["paper"]["value"] = "full", 1.0
    write_run(runs / "same", same, results_of("listops", 50.0, 51.0), [])
    old = {"task": "listops", "data": {"source": "release"}, "model": {"features": 32}}
    old["optimizer"] = {"name": "adamw"}  # before learning_rate and the others were kept
    write_run(runs / "old", old, results_of("listops", 50.0, 51.0), [])
    out, _ = run_report(tmp_path, capsys)
    labels = sorted(r[-1] for r in rows_of(out, HGRN_LRA) if r[0] == "ListOps")
    assert labels == [str(runs / "old"), str(runs / "same")]


def test_every_paper_config_key_is_compared_as_the_recipe_or_said_not_to_change_training():
    """Every key of the paper configs outside the model's MODEL_KEYS is in tables.RECIPE_KEYS or
    tables.NOT_RECIPE_KEYS (so that a new key is decided on, not passed over), never in both,
    the model keys that are not the model (dropout, ...) included; each RECIPE_KEYS key is one
    that a paper config or a model config class has (no misspelt key that never compares)."""
    from hgrn_jax.nn import LMConfig

    recipe, not_recipe = set(tables.RECIPE_KEYS), set(tables.NOT_RECIPE_KEYS)
    assert not recipe & not_recipe and len(recipe) == len(tables.RECIPE_KEYS)
    model_keys = {f"model.{key}" for key in tables.MODEL_KEYS}
    assert {f"model.{key}" for key in tables.NOT_MODEL_KEYS} - recipe - not_recipe == set()
    seen = set()
    for name in PAPER_CONFIGS:
        keys = set(tables._paper_config(name))
        seen |= keys
        assert keys - model_keys - recipe - not_recipe == set(), name
    lm_fields = {f"model.{f.name}" for f in dataclasses.fields(LMConfig)}
    assert recipe - seen - lm_fields == set()

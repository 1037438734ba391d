"""experiments.report on run folders at its edges: results and metrics of a diverged run (the
non-finite numbers experiments.train writes as the strings "nan", "inf", "-inf"), and runs of
models the report cannot tell (a task of the user's own with a model of its own), which must
never be labelled HGRN nor set beside a paper's rows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from experiments import curves, report
from experiments.configs.hgrn2 import listops as hgrn2_listops
from experiments.configs.lra import listops
from experiments.runs import find_runs, find_unfinished
from hgrn_jax.training.logging import config_as_json, jsonable

# What tests/toy_task.py's config.json holds of the model: no mixer, no layers.
TOY_MODEL = {"features": 16, "dropout": 0.1}
TOY_LABEL = "own model (dropout=0.1, features=16)"


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
    assert [Path(r[-1]).name for r in rows] == ["package"] and rows[0][2] == "50.00"
    unfinished = {Path(r[0]).name: r[2] for r in rows_of(out, "Runs without results")}
    assert unfinished["own_unfinished"].startswith("own model (")
    assert unfinished["hgrn_unfinished"] == "HGRN (2 layers, d 32)"  # a start without the field


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

"""experiments.report (and experiments.runs, tables, curves) on fabricated run folders: the
markdown tables and the curves PNG."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from experiments import curves, report, tables
from experiments.papers import LRA_TASKS, lra_paper_steps
from experiments.runs import find_runs, find_unfinished

LRA_TEST = {
    "listops": 50.0,
    "text": 80.0,
    "retrieval": 90.0,
    "image": 85.0,
    "pathfinder": 88.0,
    "pathx": 91.0,
}


def make_run(
    folder: Path,
    task: str,
    test: float,
    *,
    metric: str = "accuracy",
    source: str = "release",
    features: int | None = None,
    truncated: bool = False,
    mixer: str | None = None,
    config_task: str | None = None,
    config_fields: dict | None = None,
    **results_fields: object,
) -> Path:
    folder.mkdir(parents=True)
    results = {
        "task": task,
        "metric": metric,
        "best_val": test + 1.0,
        "best_step": 40,
        "test": test,
        "paper": 0.0,
        "steps": 40,
        "wall_time_s": 1.0,
        "num_params": 6_107_560 if task == "imagenet" else 1000,
        "devices": 1,
        "process_count": 1,
        **results_fields,
    }
    (folder / "results.json").write_text(json.dumps(results))
    config = {
        "task": config_task or task,
        "data": {"source": source},
        "model": {
            # Without features (as without other model keys) the run's model is the paper's.
            **({"features": features} if features is not None else {}),
            **({"mixer": {"kind": mixer}} if mixer else {}),
        },
    }
    for key, value in (config_fields or {}).items():  # dotted keys: "model.num_layers"
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    lines = []
    for step in (10, 20, 30, 40):
        value = {"accuracy": 10.0 + step} if metric == "accuracy" else {"perplexity": 100.0 / step}
        lines.append(json.dumps({"step": step, "split": "train", "loss": 2.0 / step, **value}))
        if step % 20 == 0:
            lines.append(json.dumps({"step": step, "split": "val", "loss": 2.5 / step, **value}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 50, "split": "tra'  # a run killed mid-write
    (folder / "metrics.jsonl").write_text(text)
    return folder


def row(markdown: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith(f"| {first_cell} ")
    ]


def body_rows(table: str) -> list[list[str]]:
    """The cells of a markdown table's rows, header and rule left out."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def section(markdown: str, title: str) -> str:
    """The table under the heading ``### <title>``."""
    return markdown.split(f"### {title}\n\n", 1)[1].split("\n\n", 1)[0]


PAPER_LM = {"model.num_layers": 6, "data.tokenizer_path": "/data/gpt2"}  # with features=512
HGRN_LRA, HGRN2_LRA = "Long Range Arena (accuracy)", "Long Range Arena, HGRN2 (accuracy)"
BASELINE_LRA = "Long Range Arena, Transformer baseline (accuracy)"


def test_tables_put_our_numbers_beside_the_paper(tmp_path, capsys):
    for task, acc in LRA_TEST.items():
        make_run(tmp_path / "lra" / task, task, acc)
    make_run(tmp_path / "imagenet" / "tiny", "imagenet", 70.5, features=192, truncated=True)
    make_run(tmp_path / "imagenet" / "odd", "imagenet", 12.0, features=48, source="synthetic")
    make_run(
        tmp_path / "lm",
        "wikitext103",
        30.5,
        metric="perplexity",
        features=512,
        config_fields=PAPER_LM,
    )
    png = tmp_path / "out" / "curves.png"
    assert (
        report.main(
            [
                str(tmp_path / "lra"),
                str(tmp_path / "imagenet"),
                str(tmp_path / "lm"),
                "--png",
                str(png),
                "--markdown",
                str(tmp_path / "report.md"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("### Long Range Arena")
    mark, written = (tmp_path / "report.md").read_text().split("\n", 1)
    assert mark == report.REPORT_MARK and written in out

    (listops_row,) = row(out, "ListOps")
    assert listops_row[1:5] == ["59.95", "50.00", "51.00", "40"]
    (pathx_row,) = row(out, "Path-X")
    assert pathx_row[1:3] == ["97.50", "91.00"]
    (average,) = row(out, "**Average**")
    assert average[1] == "86.91"
    assert average[2] == f"{sum(LRA_TEST.values()) / 6:.2f}"

    (tiny_row,) = row(out, "HGRN-Tiny")
    assert tiny_row[1:5] == ["6.11M", "74.40", "6.11M", "70.50"]
    (small_row,) = row(out, "HGRN-Small")
    assert small_row[1:4] == ["23.72M", "80.09", "—"]
    (odd_row,) = row(out, "other (d=48)")
    assert odd_row[4] == "12.00" and odd_row[-1].endswith("(synthetic data)")

    (lm_row,) = row(out, "HGRN (6 layers, d 512, GPT-2 BPE)")
    assert lm_row[1:5] == ["24.14", "24.82", "31.50", "30.50"]

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"training curves: {png}" in out


def test_partial_lra_average_and_default_png(tmp_path, capsys):
    make_run(tmp_path / "runs" / "a", "listops", 33.0, source="generated")
    assert report.main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (average,) = row(out, "**Average**")
    assert average[2] == "— (0/6 tasks with real-data runs)"
    (listops_row,) = row(out, "ListOps")
    assert listops_row[-1].endswith("(generated data)")
    (text_row,) = row(out, "Text")
    assert text_row[1:3] == ["88.14", "—"]
    assert (tmp_path / "runs" / "curves.png").is_file()


def test_runs_of_other_tasks_list_their_model_and_steps(tmp_path, capsys):
    """Two runs of a task of the user's own differing in length and width looked alike in the
    "Other runs" table (task, metric, test, best val): it now says each run's model and steps."""
    for name, features, steps in (("short", 32, 400), ("long", 64, 3000)):
        make_run(
            tmp_path / "runs" / name,
            "majority",
            70.0,
            features=features,
            steps=steps,
            config_fields={"model.num_layers": 2},
        )
    assert report.main([str(tmp_path / "runs")]) == 0
    rows = body_rows(section(capsys.readouterr().out, "Other runs"))
    assert sorted((r[1], r[5]) for r in rows) == [
        ("HGRN (2 layers, d 32)", "400"),
        ("HGRN (2 layers, d 64)", "3000"),
    ]


def test_curves_read_metrics_and_skip_a_truncated_line(tmp_path):
    run_dir = make_run(tmp_path / "r", "listops", 20.0, truncated=True)
    (run,) = find_runs([tmp_path])
    assert run.path == run_dir and len(run.records) == 6
    assert [r["step"] for r in run.records if r["split"] == "val"] == [20, 40]


def test_missing_folders_and_empty_folders_fail_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert f"error: no run folder under {tmp_path} " in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        find_runs([tmp_path])


def test_lm_train_records_plot_perplexity_from_the_loss():
    assert curves._metric_value({"loss": 2.0}, "perplexity") == pytest.approx(7.389056)
    assert curves._metric_value({"loss": 2.0, "perplexity": 5.0}, "perplexity") == 5.0
    assert curves._metric_value({"loss": 2.0, "accuracy": 40.0}, "perplexity") is None
    assert curves._metric_value({"loss": 2.0}, "accuracy") is None


def test_curves_against_training_time_for_time_to_accuracy(tmp_path, capsys):
    run_dir = make_run(tmp_path / "runs" / "hgrn", "listops", 40.0)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        if record["step"] > 10:  # the first record predates the field: left out on a time axis
            record["wall_time_s"] = 6.0 * record["step"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run,) = find_runs([tmp_path / "runs"])
    assert curves.curve_points(run, "val", "accuracy", "time") == [(2.0, 30.0), (4.0, 50.0)]
    assert curves.curve_points(run, "train", "accuracy", "time")[0] == (2.0, 30.0)
    assert curves.curve_points(run, "train", "accuracy")[0] == (10, 20.0)
    with pytest.raises(ValueError, match="unknown x axis 'epoch'"):
        curves.curve_points(run, "val", "accuracy", "epoch")
    png = tmp_path / "time.png"
    assert report.main([str(tmp_path / "runs"), "--x", "time", "--png", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert f"training curves: {png}" in capsys.readouterr().out


def test_other_models_are_marked_and_averaged_apart(tmp_path, capsys):
    for task, acc in LRA_TEST.items():
        make_run(tmp_path / "hgrn" / task, task, acc, mixer="hgrn")
    make_run(tmp_path / "transformer" / "listops", "listops", 20.0, mixer="attention")
    make_run(tmp_path / "hgrn2" / "text", "text", 60.0, mixer="hgrn2", source="generated")
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    hgrn, hgrn2, baseline = (section(out, t) for t in (HGRN_LRA, HGRN2_LRA, BASELINE_LRA))
    (listops,) = row(hgrn, "ListOps")
    assert listops[1:3] == ["59.95", "50.00"] and listops[-1] == str(tmp_path / "hgrn" / "listops")
    (listops,) = row(baseline, "ListOps")
    assert listops[1:3] == ["—", "20.00"]  # the paper has no such baseline run
    assert listops[-1] == f"{tmp_path / 'transformer' / 'listops'} (Transformer baseline)"
    (text,) = row(hgrn2, "Text")
    assert text[1:3] == ["88.97", "60.00"] and text[-1].endswith("text (HGRN2) (generated data)")
    assert [r[1:3] for r in row(hgrn2, "ListOps")] == [["60.52", "—"]]  # HGRN2's paper, no run
    assert row(hgrn, "Text")[0][1:3] == ["88.14", "80.00"]  # HGRN's
    assert row(hgrn2, "Path-X") == [["Path-X", "98.12", "—", "—", "—", "—"]]  # HGRN2's paper
    assert row(baseline, "Text") == []  # no paper number, no run
    averages = {
        r[0]: r[1:3]
        for table in (hgrn, hgrn2, baseline)
        for r in row(table, "**Average**") + row(table, "**Paper's average**")
    }
    assert averages == {
        "**Average**": ["86.91", f"{sum(LRA_TEST.values()) / 6:.2f}"],  # HGRN's runs only
        "**Average** (HGRN2, 5 tasks without Path-X)": [
            "85.57 (mean of the paper's 5 rows above)",
            "— (0/5 tasks with real-data runs)",  # its one run read generated data
        ],
        "**Paper's average** (HGRN2, 6 tasks)": ["87.66", "— (no real-data Path-X run)"],
        "**Average** (Transformer baseline)": ["—", "— (1/6 tasks with real-data runs)"],
    }


def test_a_run_is_compared_by_its_config_not_its_results_paper_field(tmp_path, capsys):
    """A ListOps run of HGRN2 (whose old results.json quotes HGRN's 59.95) was listed, with
    HGRN2's 60.52, in HGRN's table: one column mixed the two papers. Each model now has its own
    table, and the run is placed by its config.json."""
    make_run(tmp_path / "a", "listops", 17.58, mixer="hgrn2", source="generated", paper=59.95)
    make_run(tmp_path / "b", "listops", 40.0, source="generated", paper=60.52)
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    (hgrn,) = row(section(out, HGRN_LRA), "ListOps")
    assert hgrn[1:3] == ["59.95", "40.00"] and hgrn[-1] == f"{tmp_path / 'b'} (generated data)"
    (hgrn2,) = row(section(out, HGRN2_LRA), "ListOps")
    assert hgrn2[1:3] == ["60.52", "17.58"] and hgrn2[-1].endswith("(HGRN2) (generated data)")


def test_the_data_marks_say_what_the_task_read(tmp_path, capsys):
    """A ``module:factory`` task reads no data.source, yet its config's ``generated`` marked it
    ``(generated data)``; a ``module:DATASET`` run on ``synthetic`` data was marked
    ``(generated data)`` too (docs/data.md: generated is ListOps's LRA-specification set,
    synthetic the small stand-ins). The marks follow results.json's ``data_source`` now, and
    config.json's for a package task of a run older than that field."""
    factory = dict(source="generated", config_task="myparity:make_task")
    make_run(tmp_path / "factory", "myparity", 90.0, **factory, data_source=None)
    make_run(tmp_path / "old_factory", "myparity", 70.0, **factory)
    make_run(tmp_path / "dataset", "parity", 80.0, config_task="m:DATASET", data_source="synthetic")
    make_run(tmp_path / "old_text", "text", 60.0, source="synthetic")
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    others = {r[3]: r[-1] for r in row(out, "myparity") + row(out, "parity")}
    assert others == {
        "90.00": str(tmp_path / "factory"),
        "70.00": str(tmp_path / "old_factory"),
        "80.00": f"{tmp_path / 'dataset'} (synthetic data)",
    }
    assert row(out, "Text")[0][-1] == f"{tmp_path / 'old_text'} (synthetic data)"


def test_hgrn2_runs_are_compared_with_the_hgrn2_paper(tmp_path, capsys):
    """HGRN2's paper numbers (arXiv 2404.07904, its LRA figure) beside HGRN2 runs, and, without
    a Path-X run, HGRN2's average over its other five tasks: HGRN's numbers and a six-task
    average had been used."""
    hgrn2_paper = {"listops": 60.52, "text": 88.97, "retrieval": 95.07, "image": 89.33}
    hgrn2_paper["pathfinder"] = 93.95
    for task in hgrn2_paper:
        make_run(tmp_path / "hgrn2" / task, task, LRA_TEST[task], mixer="hgrn2")
    make_run(tmp_path / "lm", "wikitext103", 3.0, metric="perplexity", mixer="hgrn2")
    make_run(tmp_path / "im", "imagenet", 70.0, features=192, mixer="attention")
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    hgrn, hgrn2 = section(out, HGRN_LRA), section(out, HGRN2_LRA)
    for task, accuracy in hgrn2_paper.items():
        (task_row,) = row(hgrn2, tables.LRA_NAMES[task])
        assert task_row[1] == f"{accuracy:.2f}" and task_row[-1].endswith("(HGRN2)")
        assert row(hgrn, tables.LRA_NAMES[task])[0][2] == "—"  # HGRN's paper row, no run
    (pathx_row,) = row(hgrn, "Path-X")
    assert pathx_row[1:3] == ["97.50", "—"]
    assert row(hgrn2, "Path-X") == [["Path-X", "98.12", "—", "—", "—", "—"]]
    averages = {r[0]: r[1:3] for r in row(out, "**Average**") + row(out, "**Paper's average**")}
    expected_ours = sum(LRA_TEST[t] for t in hgrn2_paper) / 5
    # The paper's own average is over six tasks, Path-X (98.12) included, which has no run here:
    # the mean of its five rows is given, labelled as such, beside its own six-task average.
    assert averages["**Average** (HGRN2, 5 tasks without Path-X)"] == [
        f"{sum(hgrn2_paper.values()) / 5:.2f} (mean of the paper's 5 rows above)",
        f"{expected_ours:.2f}",
    ]
    paper_average = averages["**Paper's average** (HGRN2, 6 tasks)"]
    assert paper_average == ["87.66", "— (no real-data Path-X run)"]
    # The paper's two-decimal figures: its five rows and Path-X make its six-task average.
    assert sum(hgrn2_paper.values()) + 98.12 == pytest.approx(6 * 87.66, abs=0.005)
    assert averages["**Average**"] == ["86.91", "— (0/6 tasks with real-data runs)"]
    # Other models' LM and ImageNet runs are not set beside HGRN's paper numbers.
    (paper_lm,) = row(out, "HGRN (6 layers, d 512, GPT-2 BPE)")
    assert paper_lm[3:5] == ["—", "—"]
    (hgrn2_lm,) = row(out, "HGRN2")
    assert hgrn2_lm[1:3] == ["—", "—"]
    (tiny_row,) = row(out, "HGRN-Tiny")
    assert tiny_row[3] == "—"
    (baseline,) = row(out, "Transformer baseline (d=192)")
    assert baseline[1:3] == ["—", "—"] and baseline[4] == "70.00"


def test_hgrn2_with_a_path_x_run_is_averaged_over_six_tasks_as_hgrn(tmp_path, capsys):
    """With Path-X (Hgru2_2d_series, experiments/configs/hgrn2/pathx.py) HGRN2's average is over
    the six tasks its paper's 87.66 is over, in one row as HGRN's: no five-task rows."""
    for task, accuracy in LRA_TEST.items():
        make_run(tmp_path / "hgrn2" / task, task, accuracy, mixer="hgrn2")
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    hgrn2 = section(capsys.readouterr().out, HGRN2_LRA)
    (pathx,) = row(hgrn2, "Path-X")
    assert pathx[1:3] == ["98.12", f"{LRA_TEST['pathx']:.2f}"] and pathx[-1].endswith("(HGRN2)")
    averages = {r[0]: r[1:3] for r in row(hgrn2, "**Average**") + row(hgrn2, "**Paper's")}
    assert averages == {"**Average** (HGRN2)": ["87.66", f"{sum(LRA_TEST.values()) / 6:.2f}"]}
    # Path-X on generated data only: not in the average, which then lacks a task (as HGRN's).
    other = tmp_path / "other"
    for task, accuracy in LRA_TEST.items():
        source = "synthetic" if task == "pathx" else "release"
        make_run(other / task, task, accuracy, mixer="hgrn2", source=source)
    assert report.main([str(other), "--png", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    hgrn2 = section(out, HGRN2_LRA)
    averages = {r[0]: r[1:3] for r in row(hgrn2, "**Average**") + row(hgrn2, "**Paper's")}
    five = [a for t, a in LRA_TEST.items() if t != "pathx"]
    assert averages == {
        "**Average** (HGRN2, 5 tasks without Path-X)": [
            "85.57 (mean of the paper's 5 rows above)",
            f"{sum(five) / 5:.2f}",
        ],
        "**Paper's average** (HGRN2, 6 tasks)": ["87.66", "— (no real-data Path-X run)"],
    }
    notes = out.split(f"### {HGRN2_LRA}\n\n", 1)[1].split("\n\n")[1]
    assert "- Not in the average (generated or synthetic data only): Path-X" in notes


def paper_steps(task: str) -> dict:
    """config.json and results.json fields of a run that did the paper config's steps."""
    steps = lra_paper_steps("hgrn", task)
    return {"config_fields": {"num_train_steps": steps}, "steps": steps}


def test_the_lra_average_takes_real_data_then_the_paper_setting_then_validation(tmp_path, capsys):
    """With six real-data runs and a tiny run on generated data at a path sorting first, the
    average took the tiny run's 28.12 for ListOps ("the first run of each task, in path
    order"). It takes real data first, then the paper's number of steps, then the best
    validation accuracy (not the test score), and says which run it used."""
    for task, acc in LRA_TEST.items():
        make_run(tmp_path / "lra" / task, task, acc, **paper_steps(task))  # best_val = acc + 1
    make_run(tmp_path / "a_tiny", "listops", 28.12, source="generated", best_val=99.0)
    short = dict(config_fields={"num_train_steps": 1000}, steps=1000)
    make_run(tmp_path / "lra" / "listops_short", "listops", 70.0, best_val=90.0, **short)
    seed2 = tmp_path / "lra" / "listops_seed2"
    make_run(seed2, "listops", 10.0, best_val=60.0, **paper_steps("listops"))
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    (average,) = row(out, "**Average**")
    assert average[2] == f"{(10.0 + sum(LRA_TEST.values()) - LRA_TEST['listops']) / 6:.2f}"
    assert f"- Average of: ListOps {seed2}; Text {tmp_path / 'lra' / 'text'};" in out
    assert "Shorter than the paper's setting" not in out


def test_the_lra_average_is_of_real_data_runs_and_says_what_it_lacks(tmp_path, capsys):
    """A task run on generated data only is left out of the average (which is then not given),
    and a real-data run shorter than the paper's setting is named with its steps."""
    for task, acc in LRA_TEST.items():
        if task != "listops":
            make_run(tmp_path / task, task, acc, **paper_steps(task))
    make_run(tmp_path / "listops", "listops", 33.0, source="generated")
    make_run(tmp_path / "text_short", "text", 70.0, best_val=95.0, steps=40)
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    (average,) = row(out, "**Average**")
    assert average[2] == "— (5/6 tasks with real-data runs)"
    assert "- Not in the average (generated or synthetic data only): ListOps" in out
    assert f"- Average of: Text {tmp_path / 'text'};" in out  # the paper's steps first
    assert "Shorter than the paper's setting" not in out
    (tmp_path / "text" / "results.json").unlink()  # now the short run is Text's only one
    (tmp_path / "text" / "metrics.jsonl").unlink()
    (tmp_path / "text" / "config.json").unlink()
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    paper_text_steps = lra_paper_steps("hgrn", "text")
    assert (
        f"- Shorter than the paper's setting: Text {tmp_path / 'text_short'} (40 of "
        f"{paper_text_steps} steps)" in out
    )


def make_unfinished(
    folder: Path,
    task: str,
    steps: int,
    *,
    lock_pid: int | None = None,
    host: str | None = None,
    **lock_fields: Any,
) -> Path:
    """A run folder as the loop leaves it before results.json: config.json, metrics.jsonl (train
    records every 10 steps, val every 20), a committed checkpoint at ``steps + 1`` (a run
    preempted one step after its last log) and, with ``lock_pid``, the run.lock it holds."""
    folder.mkdir(parents=True)
    config = {"task": task, "num_train_steps": 5000, "data": {"source": "release"}}
    config["model"] = {"features": 64, "num_layers": 4, "mixer": {"kind": "hgrn"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    lines = []
    for step in range(10, steps + 1, 10):
        lines.append({"accuracy": 20.0, "loss": 1.5, "lr": 1e-3, "split": "train", "step": step})
        if step % 20 == 0:
            accuracy = 40.0 + (step == 20) * 5.0  # the best at step 20
            lines.append({"accuracy": accuracy, "loss": 1.2, "split": "val", "step": step})
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines)
    (folder / "metrics.jsonl").write_text(text)
    (folder / "checkpoints" / str(steps + 1)).mkdir(parents=True)
    if lock_pid is not None:
        holder = {"host": host or socket.gethostname(), "pid": lock_pid, "token": "ab"}
        holder |= {"start_time": "2026-01-01T00:00:00+00:00", "command": "train", **lock_fields}
        (folder / "run.lock").write_text(json.dumps(holder, indent=1) + "\n")
    return folder


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_runs_without_results_get_their_own_table(tmp_path, capsys):
    """Runs without results.json (in progress, preempted, failed) were left out silently, and a
    folder holding only such runs was an error. They are listed apart, with how far they got,
    their best validation so far and whether their lock is held; never in the paper tables."""
    make_run(tmp_path / "done", "listops", 50.0)
    running = make_unfinished(tmp_path / "running", "text", 100, lock_pid=os.getpid())
    stopped = make_unfinished(tmp_path / "stopped", "listops", 1000, lock_pid=dead_pid())
    remote = make_unfinished(tmp_path / "remote", "image", 40, lock_pid=1, host="other-host")
    beating = make_unfinished(
        tmp_path / "beating", "image", 40, lock_pid=1, host="node1", heartbeat_s=5
    )
    dead = make_unfinished(tmp_path / "dead", "image", 40, lock_pid=1, host="node2", heartbeat_s=5)
    os.utime(dead / "run.lock", (time.time() - 3 * 3600, time.time() - 3 * 3600))
    reused = make_unfinished(
        tmp_path / "reused", "listops", 30, lock_pid=os.getpid(), heartbeat_s=5
    )
    os.utime(reused / "run.lock", (0, 0))  # a live pid that stopped refreshing: another process
    aside = make_unfinished(tmp_path / "done" / "previous-20260101T000000Z", "listops", 20)
    (tmp_path / "model").mkdir()  # another program's config.json beside checkpoints
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model" / "checkpoints").mkdir()
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "### Runs without results\n" in out
    table = section(out, "Runs without results")
    rows = {r[0]: r[1:] for r in body_rows(table)}
    model, ASIDE = "HGRN (4 layers, d 64)", "set aside (--config.resume=restart)"
    assert rows == {
        str(aside): ["listops", model, "20 / 5000", "21", "45.00 accuracy (step 20)", ASIDE],
        str(remote): [
            "image",
            model,
            "40 / 5000",
            "41",
            "45.00 accuracy (step 20)",
            "locked by other-host (cannot be checked from here)",
        ],
        str(beating): [
            "image",
            model,
            "40 / 5000",
            "41",
            "45.00 accuracy (step 20)",
            "locked by node1 (running there: its lock was refreshed in the last 20 s)",
        ],
        str(dead): [
            "image",
            model,
            "40 / 5000",
            "41",
            "45.00 accuracy (step 20)",
            "locked by node2, not refreshed for 3.0 h (its run is gone; the next run takes the "
            "lock over)",
        ],
        str(running): ["text", model, "100 / 5000", "101", "45.00 accuracy (step 20)", "running"],
        str(reused): ["listops", model, "30 / 5000", "31", "45.00 accuracy (step 20)", "stopped"],
        str(stopped): [
            "listops",
            model,
            "1000 / 5000",
            "1001",
            "45.00 accuracy (step 20)",
            "stopped",
        ],
    }
    lra = section(out, HGRN_LRA)
    assert str(stopped) not in lra and str(running) not in lra
    assert [r[-1] for r in row(lra, "ListOps")] == [str(tmp_path / "done")]
    runs = find_unfinished([tmp_path])
    labels = {run.path.name: run.curve_label for run in runs}
    assert labels["running"] == f"{running} (in progress)"
    assert labels["stopped"] == f"{stopped} (unfinished)"


def test_a_stopped_run_says_why_when_it_recorded_a_reason(tmp_path, capsys):
    """The state of every stopped run was plain "stopped" (a NaN loss stops a run before its
    step is logged). A run records its starts and the error or signal that stopped it in
    events.jsonl: the report shows the reason, or that the last start recorded none (killed)."""

    def add_events(folder: Path, *events: dict[str, str]) -> None:
        with open(folder / "events.jsonl", "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)

    started = {"event": "started", "time": "2026-12-01T10:00:00+0000"}
    nan = make_unfinished(tmp_path / "nan", "listops", 40, lock_pid=dead_pid())
    reason = "NonFiniteLossError: the training loss is nan at step 47"
    add_events(
        nan, started, {"event": "stopped", "time": "2026-12-01T11:00:00+0000", "reason": reason}
    )
    killed = make_unfinished(tmp_path / "killed", "listops", 40)
    add_events(killed, started, {"event": "stopped", "time": "x", "reason": "old"}, started)
    old = make_unfinished(tmp_path / "old", "listops", 40)
    ended = make_unfinished(tmp_path / "ended", "listops", 40)  # results.json deleted
    add_events(ended, started, {"event": "finished", "time": "2026-12-01T12:00:00+0000"})
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    table = section(capsys.readouterr().out, "Runs without results")
    states = {r[0]: r[-1] for r in body_rows(table)}
    assert states == {
        str(nan): f"stopped at 2026-12-01T11:00:00+0000: {reason}",
        str(killed): "stopped (killed, crashed or lost: the start at 2026-12-01T10:00:00+0000 "
        "recorded no stop; its log says more)",
        str(old): "stopped",
        str(ended): "finished at 2026-12-01T12:00:00+0000, but its results.json is gone",
    }
    assert [r[3:5] for r in body_rows(table)][0] == ["40 / 5000", "41"]


def test_an_event_after_a_line_cut_short_by_a_kill_gets_its_own_line(tmp_path):
    """events.jsonl is never rewound: a record appended to a line a kill cut short was glued
    to it and lost, and the report named the older start."""
    from experiments import runs
    from hgrn_jax.training.logging import MetricsWriter

    (tmp_path / "events.jsonl").write_text('{"event": "started", "time": "t1"}\n{"event": "sto')
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.event("started", step=3)
    writer.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert lines[1] == '{"event": "sto' and json.loads(lines[2])["step"] == 3
    records = [json.loads(line) for line in lines if line.endswith("}")]
    assert runs.stopped_state(records).startswith(
        f"stopped (killed, crashed or lost: the start at {records[-1]['time']} recorded"
    )


def test_a_suspended_run_is_reported_as_such(tmp_path, capsys):
    """A run stopped by Ctrl-Z was "running" (its pid is alive), or "stopped" once its lock had
    not been refreshed for 20 s (judged a reused pid). A lock of this machine records its
    process's start: the run is "suspended", with how to resume it; a live pid that started
    at another moment is not the run's."""
    from hgrn_jax.training.workdir import process_status, this_machine

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (process_status(sleeper.pid) or ("?",))[0] != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        start = process_status(sleeper.pid)[1]
        fields = {"heartbeat_s": 5, "machine": this_machine(), "lock_pid": sleeper.pid}
        paused = make_unfinished(tmp_path / "paused", "text", 40, process_start=start, **fields)
        os.utime(paused / "run.lock", (0, 0))
        reused = make_unfinished(tmp_path / "reused", "text", 40, process_start=start - 1, **fields)
        assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    finally:
        sleeper.kill()
        sleeper.wait()
    table = section(capsys.readouterr().out, "Runs without results")
    assert {r[0]: r[-1] for r in body_rows(table)} == {
        str(paused): f"suspended (Ctrl-Z or SIGSTOP; kill -CONT {sleeper.pid} resumes it)",
        str(reused): "stopped",
    }


def test_a_folder_of_unfinished_runs_only_is_reported(tmp_path, capsys):
    """A folder holding only a run in progress said "no results.json under ..." (exit 2), as an
    empty folder does; it prints the runs-without-results table and exits 0."""
    running = make_unfinished(tmp_path / "runs" / "a", "listops", 1000, lock_pid=os.getpid())
    assert report.main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Runs without results\n")
    assert "### Long Range Arena" not in out
    (entry,) = row(out, str(running))
    assert entry[3:5] == ["1000 / 5000", "1001"] and entry[-1] == "running"
    assert (tmp_path / "runs" / "curves.png").stat().st_size > 1000


def test_wikitext_rows_say_each_runs_size_and_vocabulary(tmp_path, capsys):
    """A 2-layer d 32 byte-level LM appeared as "HGRN (6 layers, d 512)" beside the paper's BPE
    perplexity. Each run is labelled by its own size and vocabulary; the paper's numbers stand
    only beside a run of its setting, and per-byte perplexity is marked not comparable."""
    tiny = {"model.num_layers": 2, "data.tokenizer_path": ""}
    make_run(
        tmp_path / "tiny",
        "wikitext103",
        6.61,
        metric="perplexity",
        source="synthetic",
        features=32,
        config_fields=tiny,
        data_source="synthetic",
    )
    make_run(
        tmp_path / "bytes",
        "wikitext103",
        3.0,
        metric="perplexity",
        features=512,
        config_fields={"model.num_layers": 6, "data.tokenizer_path": "bytes"},
    )
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    lm = section(capsys.readouterr().out, "WikiText-103 (perplexity, lower is better)")
    (paper_row,) = row(lm, "HGRN (6 layers, d 512, GPT-2 BPE)")
    assert paper_row[1:5] == ["24.14", "24.82", "—", "—"]
    not_comparable = " (per-byte perplexity: not comparable)"
    (tiny_row,) = row(lm, "HGRN (2 layers, d 32, bytes)" + not_comparable)
    assert tiny_row[1:5] == ["—", "—", "7.61", "6.61"]
    (bytes_row,) = row(lm, "HGRN (6 layers, d 512, bytes)" + not_comparable)
    assert bytes_row[1:5] == ["—", "—", "4.00", "3.00"]
    make_run(
        tmp_path / "paper",
        "wikitext103",
        25.0,
        metric="perplexity",
        features=512,
        config_fields=PAPER_LM,
    )
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    lm = section(capsys.readouterr().out, "WikiText-103 (perplexity, lower is better)")
    (paper_row,) = row(lm, "HGRN (6 layers, d 512, GPT-2 BPE)")
    assert paper_row[1:5] == ["24.14", "24.82", "26.00", "25.00"]


def test_a_finished_run_set_aside_by_restart_is_marked_and_never_averaged(tmp_path, capsys):
    """A finished run moved into ``previous-<time>/`` by ``--config.resume=restart`` had a plain
    row, and its best validation (99) made it the run the ListOps average took. Its row is
    marked, and the average takes the current run."""
    current = make_run(tmp_path / "listops", "listops", 50.0)
    aside = make_run(current / "previous-20260101T000000Z", "listops", 30.0, best_val=99.0)
    for task in LRA_TASKS[1:]:
        make_run(tmp_path / task, task, LRA_TEST[task])
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    lra = section(out, HGRN_LRA)
    assert {r[-1] for r in row(lra, "ListOps")} == {
        str(current),
        f"{aside} (set aside by --config.resume=restart)",
    }
    (average,) = row(lra, "**Average**")
    assert average[2] == f"{sum(LRA_TEST.values()) / 6:.2f}"  # the current run's 50.00
    assert f"- Average of: ListOps {current};" in out
    assert "Runs without results" not in out


def test_a_run_with_an_unreadable_results_json_is_listed_not_lost(tmp_path, capsys):
    """A run whose results.json is corrupt dropped out of every table, and alone it was reported
    as "no run folder under ...". It is listed under runs without results, with its best
    validation from metrics.jsonl."""
    run = make_run(tmp_path / "runs" / "a", "listops", 50.0)
    (run / "results.json").write_text('{"task": "listops", "te')  # cut short while writing
    assert report.main([str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping {run}: {run / 'results.json'} is not valid JSON" in captured.err
    (entry,) = row(captured.out, str(run))
    assert entry[1] == "listops" and entry[5] == "50.00 accuracy (step 40)"
    assert entry[-1] == "results.json unreadable (see the warning)"
    assert "### Long Range Arena" not in captured.out


def test_no_average_line_without_a_run_in_it(tmp_path, capsys):
    """With only generated-data runs (two of one task), an empty "- Average of:  (per task: ...)"
    line was printed under the table."""
    make_run(tmp_path / "a", "text", 60.0, mixer="hgrn2", source="generated")
    make_run(tmp_path / "b", "text", 61.0, mixer="hgrn2", source="generated")
    make_run(tmp_path / "c", "listops", 30.0, source="generated")
    make_run(tmp_path / "d", "listops", 31.0, source="generated")
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "Average of" not in out
    assert "- Not in the average (generated or synthetic data only): Text" in out
    assert "- Not in the average (generated or synthetic data only): ListOps" in out


def test_thirteen_runs_get_thirteen_curve_styles(tmp_path, monkeypatch):
    """The default colour cycle has 10 colours: the 11th run was drawn like the 1st. Each run
    has its own colour and marker."""
    from matplotlib.figure import Figure

    runs = find_runs([make_run(tmp_path / f"r{i:02d}", "listops", 50.0) for i in range(13)])
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    curves.plot_curves(runs, tmp_path / "c.png")
    (fig,) = saved
    styles = {
        line.get_label(): (line.get_color(), line.get_marker())
        for line in fig.axes[0].get_lines()
        if not line.get_label().startswith("_")
    }
    assert len(styles) == 13 and len(set(styles.values())) == 13


def test_a_run_without_its_config_json_is_read_from_its_checkpoint_s_copy_or_left_out(
    tmp_path, capsys
):
    """A run folder without config.json was reported as HGRN's (the model kind's default),
    beside HGRN's paper number: an HGRN2 or Transformer run entered HGRN's table. Its newest
    checkpoint's copy of the config is read instead (a warning says so); without one the run
    is left out with a warning, as a corrupt config.json's was."""
    hgrn2 = make_run(tmp_path / "runs" / "hgrn2", "listops", 17.58, mixer="hgrn2")
    copy = hgrn2 / "checkpoints" / "40" / "config"
    copy.mkdir(parents=True)
    (hgrn2 / "config.json").rename(copy / "metadata")
    lost = make_run(tmp_path / "runs" / "lost", "listops", 20.0, mixer="attention")
    (lost / "config.json").unlink()
    # Not UTF-8 (a disk error, another program's file): the report named no file ("'utf-8'
    # codec can't decode byte 0xff") and stopped with status 2.
    binary = make_run(tmp_path / "runs" / "binary", "listops", 21.0, mixer="attention")
    (binary / "config.json").write_bytes(b"\xff\xfe{")
    assert report.main([str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    (row_hgrn2,) = row(section(captured.out, HGRN2_LRA), "ListOps")
    assert row_hgrn2[1:3] == ["60.52", "17.58"]
    (row_hgrn,) = row(section(captured.out, HGRN_LRA), "ListOps")
    assert row_hgrn[1:3] == ["59.95", "—"]  # neither run is HGRN's
    assert captured.err.count(f"warning: {hgrn2 / 'config.json'} not found; using the copy") == 1
    assert (
        f"warning: skipping {lost}: {lost / 'config.json'} not found and no checkpoint holds a "
        "copy of the run's config, so its model cannot be told" in captured.err
    )
    assert f"warning: skipping {binary}: {binary / 'config.json'} is not valid JSON (" in (
        captured.err
    )


def test_runs_reached_twice_or_through_a_link_are_listed_once(tmp_path, capsys):
    """A run folder given with its parent, or twice, was listed (and drawn) once per mention,
    the legend's colour another copy's; a run linked into a folder of runs was passed over."""
    run = make_run(tmp_path / "runs" / "listops", "listops", 50.0)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "listops-link").symlink_to(run, target_is_directory=True)
    (tmp_path / "linked" / "loop").symlink_to(tmp_path / "linked", target_is_directory=True)
    args = [str(run), str(tmp_path / "runs"), str(run), "--png", str(tmp_path / "c.png")]
    assert report.main(args) == 0
    assert len(row(capsys.readouterr().out, "ListOps")) == 1
    assert report.main([str(tmp_path / "linked"), "--png", str(tmp_path / "c.png")]) == 0
    (listops,) = row(capsys.readouterr().out, "ListOps")
    assert listops[-1] == str(tmp_path / "linked" / "listops-link")


def test_another_program_s_folder_with_a_task_and_model_is_not_a_run(tmp_path, capsys):
    """A folder of another program whose config.json names a task and a model, beside a
    metrics.jsonl of its own, was listed as a stopped run of ours."""
    make_run(tmp_path / "done", "listops", 50.0)
    other = tmp_path / "ner"
    other.mkdir()
    (other / "config.json").write_text('{"task": "ner", "model": {"name": "bert-base"}}')
    (other / "metrics.jsonl").write_text('{"epoch": 1, "f1": 0.8}\n')
    assert report.main([str(tmp_path), "--png", str(tmp_path / "c.png")]) == 0
    assert "ner" not in capsys.readouterr().out


def test_png_and_markdown_paths_are_what_the_report_writes(tmp_path, capsys):
    """--png PATH without a suffix wrote PATH.png and named PATH; a folder, FOLDER.png; a
    suffix matplotlib cannot write printed a traceback after the tables; --markdown into a
    missing folder failed (and skipped the curves) where --png made the folder."""
    make_run(tmp_path / "runs" / "a", "listops", 50.0)
    runs = str(tmp_path / "runs")
    assert report.main([runs, "--png", str(tmp_path / "plot")]) == 0
    assert capsys.readouterr().out.endswith(f"training curves: {tmp_path / 'plot.png'}\n")
    assert (tmp_path / "plot.png").is_file()
    (tmp_path / "folder").mkdir()
    assert report.main([runs, "--png", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "curves.png").is_file()
    capsys.readouterr()
    assert report.main([runs, "--png", str(tmp_path / "plot.txt")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"error: --png {tmp_path / 'plot.txt'}: matplotlib cannot write .txt files; end the path"
    )
    markdown = tmp_path / "new" / "folder" / "tables.md"
    assert report.main([runs, "--markdown", str(markdown)]) == 0
    first, tables = markdown.read_text().split("\n", 1)
    assert first == report.REPORT_MARK and tables.startswith("#")


def test_a_users_file_at_the_report_s_paths_is_never_written_over(tmp_path, capsys):
    """--markdown replaced whatever file it named (a user's notes.md) and the curves any
    figure, with nothing said. A file this command did not write (a --markdown file without
    its first line, a figure matplotlib did not write) now stops it before anything is printed
    or written; its own earlier files are replaced."""
    make_run(tmp_path / "runs" / "a", "listops", 50.0)
    runs = str(tmp_path / "runs")
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    assert report.main([runs, "--markdown", str(notes)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and notes.read_text() == "my notes\n"
    assert captured.err == (
        f"error: --markdown {notes} exists and was not written by this command; nothing was "
        "changed: choose another path, or move it away\n"
    )
    photo = tmp_path / "runs" / "curves.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n a photo")
    assert report.main([runs]) == 2
    assert "error: the curves " in capsys.readouterr().err and photo.read_bytes().endswith(b"photo")
    assert report.main([runs, "--png", str(photo)]) == 2
    assert f"error: --png {photo} exists and was not written" in capsys.readouterr().err
    photo.unlink()
    ours = tmp_path / "tables.md"
    for _ in range(2):  # the second run replaces the first's files
        assert report.main([runs, "--markdown", str(ours)]) == 0
    assert ours.read_text().startswith(report.REPORT_MARK) and photo.is_file()


def test_a_finished_run_trained_further_leaves_the_paper_tables_until_its_new_end(tmp_path, capsys):
    """A finished run started again with more steps showed its old results in the paper
    tables as final, while running and after being stopped. It is a run without results
    until its new end, its state saying so."""
    run = make_run(tmp_path / "runs" / "a", "listops", 50.0, config_fields={"num_train_steps": 100})
    events = [
        {"event": "started", "time": "t0", "step": 0},
        {"event": "finished", "time": "t1"},
        {"event": "started", "time": "t2", "step": 40},
        {"event": "stopped", "time": "t3", "reason": "terminated (SIGTERM)"},
    ]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert report.main([str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "### Long Range Arena" not in out
    (entry,) = row(out, str(run))
    assert entry[-1] == (
        "stopped at t3: terminated (SIGTERM); trained further from its finished 40 steps to 100 "
        "(their results.json is kept)"
    )
    # Finished again (or a rerun that ended where it had): the paper tables take it back.
    events += [{"event": "started", "time": "t4", "step": 40}, {"event": "finished", "time": "t5"}]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert [r.path for r in find_runs([tmp_path / "runs"])] == [run]
    assert find_unfinished([tmp_path / "runs"]) == []


def test_numbers_are_rounded_half_up_as_the_papers_are():
    """28.125 (an accuracy over 256 examples) showed as 28.12: format rounds half to even."""
    assert [tables._fmt(v) for v in (28.125, 96.875, 2.675, 59.95, -0.125)] == [
        "28.13",
        "96.88",
        "2.68",
        "59.95",
        "-0.13",
    ]


def test_a_reader_that_goes_away_ends_the_report_quietly(tmp_path):
    """``report ... | head -1`` ended in a BrokenPipeError traceback and exit status 1."""
    make_run(tmp_path / "runs" / "a", "listops", 50.0)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    try:
        done = subprocess.run(
            [sys.executable, "-m", "experiments.report", str(tmp_path / "runs")],
            cwd=Path(__file__).resolve().parents[1],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr

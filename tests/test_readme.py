"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh namespace.

A block that cannot run by itself says what it needs on its first line, ``# needs: <what>``.
Two needs this test meets: ``8 devices`` (the suite's 8 simulated CPU devices, conftest.py) and
``a run folder`` (the block runs in a temporary folder holding ``runs/demo-listops``, a tiny
ListOps run like the one ``make demo`` writes there). Any other need skips the block, and the
skipped blocks are listed exactly (:data:`SKIPPED`): a new block that does not run fails here
until it runs or someone marks it deliberately. A block defining ``get_config()`` is a config
file: its ``get_config()`` is called too. Warnings that a block's own lines or hgrn_jax raise
(a deprecated name, an ignored setting) fail it: the docs show the current API.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md"))))
NEEDS = re.compile(r"#\s*needs:\s*(.+)")
RUN_FOLDER = "runs/demo-listops"

SKIPPED = {
    ("docs/tasks.md", "Worked example: a new dataset", "the rest of hgrn_jax/tasks/registry.py"),
}
"""(file, heading, need) of the blocks this test does not run."""
ELSEWHERE = {
    ("docs/tasks.md", "# hgrn_jax/tasks/parity.py"): (
        "test_training.py",
        "test_the_worked_example_of_docs_tasks_md_loads_as_module_dataset",
    ),
}
"""(file, first line) of blocks another test runs, and that test (file, function)."""


@dataclasses.dataclass(frozen=True)
class Block:
    file: str
    heading: str
    line: int  # of the block's first code line, 1-based
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0] if self.code else ""

    @property
    def need(self) -> str | None:
        match = NEEDS.match(self.first_line)
        return match.group(1).split(" (")[0].strip() if match else None

    @property
    def name(self) -> str:
        return f"{self.file}:{self.line}"


def doc_blocks(file: str) -> list[Block]:
    """The ```python blocks of ``file`` with the heading above each."""
    blocks, heading, fence = [], "", None
    for number, line in enumerate((REPO / file).read_text().splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                if fence[0] == "python":
                    blocks.append(Block(file, heading, fence[1], "\n".join(fence[2]) + "\n"))
                fence = None
            else:
                fence[2].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), number + 1, [])
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert fence is None, f"{file}: a code fence opened at line {fence[1] - 1} is never closed"
    return blocks


BLOCKS = [block for file in DOCS for block in doc_blocks(file)]


def can_meet(need: str | None) -> bool:
    if need is None or need == "a run folder":
        return True
    return need == "8 devices" and jax.device_count() >= 8


def test_the_blocks_that_do_not_run_here_are_the_known_ones():
    assert len(BLOCKS) >= 10  # the parser found the blocks
    skipped = {(b.file, b.heading, b.need) for b in BLOCKS if not can_meet(b.need)}
    assert skipped == SKIPPED, "mark a new block '# needs: ...' deliberately, or make it run"
    for (file, first_line), (test_file, test) in ELSEWHERE.items():
        assert any(b.file == file and b.first_line == first_line for b in BLOCKS), first_line
        assert f"def {test}(" in (REPO / "tests" / test_file).read_text(), test


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A folder holding ``runs/demo-listops``: the demo's preset (listops.py:tiny) trained for 2
    steps on a small generated set (a checkpoint, results.json)."""
    from hgrn_jax.training.loop import train_and_evaluate

    folder = tmp_path_factory.mktemp("demo")
    config = importlib.import_module("experiments.configs.lra.listops").get_config("tiny")
    config.data.cache_dir = str(folder / "cache")
    config.data.train_examples, config.data.val_examples, config.data.test_examples = 64, 32, 32
    config.num_train_steps = config.eval_every = config.checkpoint_every = 2
    train_and_evaluate(config, folder / RUN_FOLDER)
    return folder


@pytest.mark.parametrize(
    "block",
    [
        # the run folder's block trains a run first: ~13 s on 2 cores, so slow
        pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.need == "a run folder" else [])
        for b in BLOCKS
        if can_meet(b.need) and (b.file, b.first_line) not in ELSEWHERE
    ],
)
def test_doc_block_runs_as_written(block: Block, request, monkeypatch):
    monkeypatch.chdir(request.getfixturevalue("demo_run") if block.need == "a run folder" else REPO)
    filename = f"{block.file}, the block at line {block.line}"
    namespace = {"__name__": f"doc_block_{block.line}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(block.code, filename, "exec"), namespace)
        if callable(namespace.get("get_config")):
            namespace["get_config"]()
    ours = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if w.filename == filename or "hgrn_jax" in w.filename
    ]
    assert not ours, "\n".join(ours)

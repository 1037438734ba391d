"""The papers' numbers, read from the paper-setting configs (one source of truth), and which of
them a run is compared with: the one of its own task and model (``model.mixer.kind``), which
``experiments.train`` quotes in results.json and ``experiments.report`` sets beside the run."""

from __future__ import annotations

import functools
import importlib
from typing import Any

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
"""HGRN's and HGRN2's LRA rows alike (HGRN2's Path-X: 98.12, Hgru2_2d_series, our HGRN2DSeries)."""
IMAGENET_SIZES = {192: "HGRN-Tiny", 384: "HGRN-Small"}
PAPER_LM = ("hgrn", 6, 512, "GPT-2 BPE")
"""The paper's WikiText-103 setting (:func:`lm_setting`): mixer kind, layers, width, vocabulary.
Only a run of this setting is compared with the paper's perplexity: a byte-level run's is per
byte, not per BPE token, and another model size is another model."""
PAPER_TASKS = (*LRA_TASKS, "imagenet", "wikitext103")
"""The tasks the papers report: their numbers come from :func:`paper_of`, whatever a config says."""


def _paper(module: str) -> dict[str, Any]:
    config = importlib.import_module(f"experiments.configs.{module}").get_config()
    return config.paper.to_dict()


@functools.cache
def paper_numbers() -> dict[str, dict[str, Any]]:
    """The paper's numbers (each config's ``paper`` fields): HGRN's by task name (ImageNet's as
    ``imagenet-tiny`` and ``imagenet-small``), and HGRN2's six LRA rows under
    ``"hgrn2"``. Do not modify the returned dicts (they are cached)."""
    numbers = {task: _paper(f"lra.{task}") for task in LRA_TASKS}
    numbers["imagenet-tiny"] = _paper("imagenet.tiny")
    numbers["imagenet-small"] = _paper("imagenet.small")
    numbers["wikitext103"] = _paper("lm.wikitext103")
    numbers["hgrn2"] = {task: _paper(f"hgrn2.{task}") for task in LRA_TASKS}
    return numbers


def lra_paper_accuracy(paper: dict[str, dict[str, Any]], kind: str, task: str) -> float | None:
    """The paper's LRA accuracy of the model with mixer ``kind`` on ``task``; None where there
    is none (the Transformer baseline at our settings)."""
    if kind == "hgrn":
        return paper[task]["value"]
    if kind == "hgrn2" and task in paper["hgrn2"]:
        return paper["hgrn2"][task]["value"]
    return None


def lra_paper_average(kind: str) -> tuple[float, int] | None:
    """The average accuracy the paper of the model with mixer ``kind`` reports, and over how
    many tasks: HGRN's 86.91 over six, HGRN2's 87.66 over six (its figure's, which the mean of its
    six two-decimal rows rounds to); None for the baseline."""
    if kind == "hgrn":
        return sum(paper_numbers()[task]["value"] for task in LRA_TASKS) / len(LRA_TASKS), 6
    if kind == "hgrn2":
        from experiments.configs.hgrn2 import lra

        return lra.PAPER_AVERAGE, len(LRA_TASKS)
    return None


@functools.cache
def lra_paper_steps(kind: str, task: str) -> int:
    """``num_train_steps`` of the paper's setting of the model with mixer ``kind`` on LRA
    ``task`` (one of :data:`LRA_TASKS`; its config file without a preset; the Transformer
    baseline keeps HGRN's schedule, ``common.use_attention``)."""
    module = f"experiments.configs.{'hgrn2' if kind == 'hgrn2' else 'lra'}.{task}"
    return int(importlib.import_module(module).get_config().num_train_steps)


def lm_tokenizer(source: str | None, tokenizer_path: str | None) -> str:
    """An LM run's vocabulary: ``bytes`` (the synthetic corpus, or ``data.tokenizer_path=bytes``),
    ``GPT-2 BPE`` (the BPE files at ``data.tokenizer_path``, the paper's), or ``tokenizer
    unknown`` (no path: a config.json without the key, or a config not yet given one)."""
    if source == "synthetic" or tokenizer_path == "bytes":
        return "bytes"
    return "GPT-2 BPE" if tokenizer_path else "tokenizer unknown"


def lm_setting(kind: str, source: str | None, config: Any) -> tuple[str, Any, Any, str]:
    """The setting of an LM run that is compared with :data:`PAPER_LM`: mixer ``kind``,
    ``model.num_layers``, ``model.features`` and the vocabulary (:func:`lm_tokenizer` of the
    data ``source`` and ``data.tokenizer_path``) of ``config`` (a ConfigDict, or a run's
    config.json as a dict)."""
    model = config.get("model", None) or {}
    data = config.get("data", None) or {}
    tokenizer = lm_tokenizer(source, data.get("tokenizer_path", None))
    return kind, model.get("num_layers", None), model.get("features", None), tokenizer


def paper_of(
    task: str,
    kind: str,
    features: int | None,
    lm: tuple[str, Any, Any, str] | None = None,
) -> dict[str, Any] | None:
    """The ``paper`` fields (``metric``, ``value``, ...) of the papers' run of the model with
    mixer ``kind`` (``"hgrn"``, ``"hgrn2"``, ``"attention"``) on ``task`` (a task name of the
    registry), or None where no paper reports one: the Transformer baseline, tasks from outside
    the package (``module:factory``), an ImageNet model of another width (``features``) than
    the paper's two, and a WikiText-103 run whose setting (``lm``: :func:`lm_setting`) is not
    :data:`PAPER_LM` (HGRN2's, not found; the byte-level ``tiny`` presets; another size). LRA
    numbers do not depend on the width: a smaller run (the ``tiny`` presets) is still compared
    with them."""
    numbers = paper_numbers()
    if task in LRA_TASKS:
        found = {"hgrn": numbers[task], "hgrn2": numbers["hgrn2"].get(task)}.get(kind)
        return dict(found) if found else None
    if task == "imagenet" and kind == "hgrn" and features in IMAGENET_SIZES:
        return dict(numbers[f"imagenet-{IMAGENET_SIZES[features].split('-')[1].lower()}"])
    if task == "wikitext103" and lm == PAPER_LM:
        return dict(numbers["wikitext103"])
    return None

"""A run folder back as a model: ``load_trained_model`` (parameters and BatchNorm statistics bit
for bit as the runner restores them, the run's test accuracy and validation loss reproduced,
its errors) and ``python -m experiments.generate`` on a trained LM.

Three tiny runs are made once per module on the suite's 8 simulated CPU devices (so their
checkpoints are sharded over the mesh and loaded as plain one-device arrays): ListOps (a
classifier with BatchNorm), the WikiText-103 LM on its synthetic source and on a release-layout
folder with a BPE tokenizer.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from collections.abc import Coroutine
from pathlib import Path

import data_fixtures as fx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hgrn_jax.nn import generate
from hgrn_jax.training import load_trained_model
from hgrn_jax.training.checkpoint import CheckpointUnverifiedWarning
from hgrn_jax.training.loop import Run, resolve_task, train_and_evaluate
from hgrn_jax.training.state import merge_model
from hgrn_jax.training.trained import best_step

REPO = Path(__file__).resolve().parents[1]


def _config(name: str, cache_dir: Path, **changes):
    config = importlib.import_module(f"experiments.configs.{name}").get_config("tiny")
    config.data.cache_dir = str(cache_dir)
    config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 2, 2
    config.log_every = 2
    for key, value in changes.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.fixture(scope="module")
def listops_run(tmp_path_factory) -> Path:
    """A 4-step ListOps run (checkpoints 2 and 4, each after an evaluation)."""
    folder = tmp_path_factory.mktemp("listops")
    config = _config(
        "lra.listops",
        folder / "cache",
        **{"data.train_examples": 512, "data.val_examples": 64, "data.test_examples": 64},
    )
    train_and_evaluate(config, folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A 4-step WikiText-103 LM run on the synthetic byte corpus (config.json: vocab_size 0)."""
    folder = tmp_path_factory.mktemp("lm")
    config = _config(
        "lm.wikitext103", folder / "cache", **{"data.train_bytes": 20_000, "data.eval_bytes": 2_048}
    )
    train_and_evaluate(config, folder / "run")
    return folder / "run"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A 4-step WikiText-103 LM run on a release-layout folder with a GPT-2-kind BPE tokenizer
    of 320 tokens (tests/data_fixtures.py), its tokenizer at ``bpe/tokenizer.json``."""
    folder = tmp_path_factory.mktemp("bpe")
    fx.write_wikitext(folder / "wikitext-103-raw", repeats=4)
    config = _config(
        "lm.wikitext103",
        folder / "cache",
        **{
            "data.source": "release",
            "data.wikitext_dir": str(folder),
            "data.tokenizer_path": str(fx.write_bpe_tokenizer(folder / "tokenizer.json")),
            "data.seq_len": 16,
        },
    )
    config.batch_size = 8  # the suite's 8 simulated devices
    train_and_evaluate(config, folder / "run")
    return folder / "run"


def _runner_state(run: Path, tmp_path: Path, step: int):
    """``(Run, state)``: the runner's own restore of checkpoint ``step`` (from a copy)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    runner = Run(ml_collections.ConfigDict(json.loads((run / "config.json").read_text())), copy)
    state, _ = runner.restore(step)
    return runner, state


def _plain(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as NumPy arrays (typed PRNG keys as their raw data)."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # end-to-end: a training run
def test_best_listops_checkpoint_loads_bit_for_bit_and_reproduces_the_test_accuracy(
    listops_run, tmp_path
):
    """Parameters and BatchNorm statistics equal the runner's restore of the best step, and the
    loaded model's correct predictions over the test split are the run's test accuracy exactly
    (a count of correct examples over a count of examples: no rounding to allow for)."""
    results = json.loads((listops_run / "results.json").read_text())
    assert best_step(listops_run) == results["best_step"]
    before = _folder_digest(listops_run)
    model, config = load_trained_model(listops_run, "best")
    assert _folder_digest(listops_run) == before  # the run folder is only read
    assert config.task == "listops" and config.model.vocab_size == 18
    runner, state = _runner_state(listops_run, tmp_path, results["best_step"])
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(state.params))
    for got, want in zip(_plain(params), _plain(state.params), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_plain(model_state), _plain(state.model_state), strict=True):
        np.testing.assert_array_equal(got, want)
    assert all(len(leaf.devices()) == 1 for leaf in jax.tree.leaves(params))  # not sharded

    task = resolve_task(config)
    correct = weight = 0.0
    forward = nnx.jit(lambda classifier, inputs, mask: classifier(inputs, mask))
    for batch in task.eval_batches("test"):
        logits = forward(model, batch["inputs"], batch["mask"])  # the model is in eval mode
        hits = np.asarray(jnp.argmax(logits, -1)) == batch["labels"]
        correct += float(np.sum(hits * batch["weight"]))
        weight += float(np.sum(batch["weight"]))
    assert 100.0 * correct / weight == results["test"]


@pytest.mark.slow  # end-to-end: a training run
def test_latest_and_a_step_number_load_those_checkpoints(listops_run, tmp_path, monkeypatch):
    runner, state = _runner_state(listops_run, tmp_path, 2)
    for choice in (2, "2"):
        model, _ = load_trained_model(listops_run, choice)
        params = nnx.state(model, nnx.Param)
        for got, want in zip(_plain(params), _plain(state.params), strict=True):
            np.testing.assert_array_equal(got, want)
    # 'best' follows the saved validation metric, not the step: make step 2 the best one.
    copy = tmp_path / "step-2-best"
    shutil.copytree(listops_run, copy)
    for step, value in ((2, 101.0), (4, -1.0)):
        (copy / "checkpoints" / str(step) / "metrics" / "metrics").write_text(
            json.dumps({"val_accuracy": value})
        )
        (copy / "checkpoints" / str(step) / "integrity.json").unlink()  # metrics changed
    with pytest.warns(CheckpointUnverifiedWarning, match="loading it unverified"):
        best, _, best_at = load_trained_model(copy, "best", return_step=True)
    assert best_at == 2
    # A run still training writes a checkpoint's checksums after its commit: the warning said
    # it was saved by older code or that its run had stopped.
    from hgrn_jax.training import trained

    with monkeypatch.context() as patch:
        patch.setattr(trained, "lock_state", lambda workdir: ("live", {"pid": 1}))
        with pytest.warns(
            CheckpointUnverifiedWarning,
            match=r"integrity\.json yet: its run, still training, writes it; loading it unverified",
        ):
            load_trained_model(copy, "best")
    for got, want in zip(_plain(nnx.state(best, nnx.Param)), _plain(state.params), strict=True):
        np.testing.assert_array_equal(got, want)
    latest, _, latest_at = load_trained_model(listops_run, "latest", return_step=True)
    assert latest_at == 4
    restored_4, _ = runner.restore(4)
    for got, want in zip(
        _plain(nnx.state(latest, nnx.Param)), _plain(restored_4.params), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # end-to-end: a training run
def test_load_errors_name_the_path_and_the_fix(listops_run, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=rf"{tmp_path}/config\.json not found: .* not a run"
    ):
        load_trained_model(tmp_path)
    with pytest.raises(
        ValueError, match=r"no checkpoint at step 3; pass one of the steps there: 2, 4"
    ):
        load_trained_model(listops_run, 3)
    with pytest.raises(ValueError, match=r"checkpoint='worst' is not 'best', 'latest' or a step"):
        load_trained_model(listops_run, "worst")

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text('{"task": "listops", ')
    with pytest.raises(
        ValueError, match=rf"{fresh}/config\.json is not valid JSON \(.*\); put back"
    ):
        load_trained_model(fresh)
    shutil.copy(listops_run / "config.json", fresh / "config.json")
    with pytest.raises(FileNotFoundError, match=r"checkpoints holds no checkpoint yet"):
        load_trained_model(fresh)

    copy = tmp_path / "damaged"
    shutil.copytree(listops_run, copy)
    before = _folder_digest(listops_run)
    data = sorted((copy / "checkpoints" / "4" / "state").rglob("d/*"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {copy}/checkpoints/4 is damaged \(.*fails "
        r"its SHA-256 checksum.*\); load another of its steps \(2\) with checkpoint=STEP",
    ):
        load_trained_model(copy, 4)
    assert (copy / "checkpoints" / "4").is_dir()  # not moved aside
    assert not (copy / "checkpoints.damaged").exists()
    assert _folder_digest(listops_run) == before

    for step in (2, 4):  # no validation metric: as checkpoints saved between evaluations
        (copy / "checkpoints" / str(step) / "metrics" / "metrics").unlink()
    with pytest.raises(
        ValueError,
        match=r"no checkpoint with a validation metric yet \(steps "
        r"2, 4\); pass checkpoint='latest'",
    ):
        load_trained_model(copy, "best")

    config = json.loads((listops_run / "config.json").read_text())
    config["task"] = "no_such_module_of_mine:make_task"
    (fresh / "config.json").write_text(json.dumps(config))
    (fresh / "checkpoints").symlink_to(listops_run / "checkpoints")
    with pytest.raises(
        ValueError,
        match=rf"{fresh}/config\.json: config\.task="
        r"'no_such_module_of_mine:make_task': cannot import",
    ):
        load_trained_model(fresh, "latest")


@pytest.mark.slow  # end-to-end: a training run
def test_a_run_whose_config_json_is_lost_loads_from_its_checkpoint_s_copy(listops_run, tmp_path):
    """Each checkpoint holds a copy of the config: a run folder whose config.json was cut
    short or deleted still loads (a warning names the copy), the same parameters as before."""
    want = load_trained_model(listops_run, "latest")
    for damage, text in (
        ("cut short", '{"task": "listops", '),
        ("deleted", None),
        ("without its model", '{"task": "listops"}'),
    ):
        copy = tmp_path / damage.replace(" ", "_")
        shutil.copytree(listops_run, copy)
        if text is None:
            (copy / "config.json").unlink()
        else:
            (copy / "config.json").write_text(text)
        with pytest.warns(
            RuntimeWarning,
            match=r"config\.json (not found|is not valid JSON|holds no run config).*; "
            r"using the copy of the run's config in .*checkpoints/4/config/metadata",
        ):
            got = load_trained_model(copy, "latest")
        for a, b in zip(
            _plain(nnx.state(got, nnx.Param)), _plain(nnx.state(want, nnx.Param)), strict=True
        ):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # end-to-end: a training run
def test_a_config_json_without_the_vocabulary_size_reads_it_off_the_checkpoint(bpe_run, tmp_path):
    """A model key absent from config.json stands for its default; for ``vocab_size`` (0: the
    data's) that is the checkpoint's arrays, as for a 0 (a missing key was a bare
    ``needs vocab_size`` error naming no file)."""
    copy = tmp_path / "run"
    shutil.copytree(bpe_run, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["model"]["vocab_size"]
    (copy / "config.json").write_text(json.dumps(config))
    model, _ = load_trained_model(copy)
    assert model.config.vocab_size == 320


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.generate", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # end-to-end: a training run
def test_loaded_lm_gives_the_runner_s_logits_and_its_validation_loss(lm_run, tmp_path):
    """Logits equal those of the runner's restored model bit for bit; the validation loss
    logged at the best step is reproduced from the val split to rtol 1e-5: the run summed each
    batch's ~1000 float32 token losses over 8 devices in its jitted step, here on one device,
    so the sums differ in rounding order only (measured: 3e-7, a few float32 ulps)."""
    results = json.loads((lm_run / "results.json").read_text())
    model, config = load_trained_model(lm_run)
    assert config.model.vocab_size == 0 and model.config.vocab_size == 256  # synthetic: bytes
    runner, state = _runner_state(lm_run, tmp_path, results["best_step"])
    theirs = merge_model(runner.graphdef, state.params, state.model_state)
    theirs.eval()
    task = resolve_task(config)
    val = list(task.eval_batches("val"))
    ids = jnp.asarray(val[0]["ids"][:, :-1])
    forward = nnx.jit(lambda lm, ids: lm(ids))
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(theirs, ids)))

    loss_fn = nnx.jit(lambda lm, batch: task.loss_fn(lm, batch, train=False))
    loss_sum = weight = 0.0
    for batch in val:
        _, sums = loss_fn(model, batch)
        loss_sum += float(sums["loss_sum"])
        weight += float(sums["weight"])
    records = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    logged = next(
        r["loss"] for r in records if r["split"] == "val" and r["step"] == results["best_step"]
    )
    assert loss_sum / weight == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow  # end-to-end: a training run
def test_a_run_loads_the_same_inside_a_set_mesh(bpe_run):
    """Inside ``jax.set_mesh`` (8 devices) an LM run loads as outside one: the same arrays, bit
    for bit, on the same device. (Its config.json leaves vocab_size to the tokenizer, so the
    loader also builds a probe model to read the size from the checkpoint.)"""
    outside, _ = load_trained_model(bpe_run)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        inside, _ = load_trained_model(bpe_run)
    assert inside.config.vocab_size == outside.config.vocab_size == 320
    inside_state, outside_state = nnx.state(inside), nnx.state(outside)
    for x, y in zip(jax.tree.leaves(inside_state), jax.tree.leaves(outside_state), strict=True):
        assert x.sharding == y.sharding
    for x, y in zip(_plain(inside_state), _plain(outside_state), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # end-to-end: a training run
def test_a_tokenizer_run_decodes_and_takes_text_prompts(lm_run, tmp_path, capsys):
    """The synthetic run's config.json rewritten as a byte-tokenizer release run: its
    vocabulary (0, left to the tokenizer) is read off the checkpoint, a text prompt is encoded
    and the ids decoded; without a tokenizer a text prompt is refused, the byte tokenizer
    suggested as the model has 256 tokens, and --tokenizer_path=bytes takes it; ids alone
    get a note saying it would decode them."""
    from experiments.generate import continue_prompt

    ids, text, _ = continue_prompt(
        str(lm_run), prompt_ids=[49, 43], prompt=None, max_new_tokens=1, greedy=True
    )
    assert text is None and "--tokenizer_path=bytes decodes them" in capsys.readouterr().err

    with pytest.raises(ValueError) as refused:
        continue_prompt(str(lm_run), prompt_ids=None, prompt="1+2", max_new_tokens=2)
    assert str(refused.value) == (
        f"--prompt needs a tokenizer and the run in {lm_run} has none (its config.json sets no "
        "data.tokenizer_path); pass the prompt as token ids with --prompt_ids or, as its model "
        "has the 256 tokens of bytes, pass --tokenizer_path=bytes if it was trained on bytes "
        "(e.g. the synthetic corpus)"
    )
    ids, text, _ = continue_prompt(
        str(lm_run),
        prompt_ids=None,
        prompt="1+2=",
        max_new_tokens=3,
        greedy=True,
        tokenizer_path="bytes",
    )
    assert ids[:4] == list(b"1+2=") and len(ids) == 7
    assert text == bytes(ids).decode("utf-8", errors="replace")
    run = tmp_path / "bytes"
    shutil.copytree(lm_run, run)
    config = json.loads((run / "config.json").read_text())
    config["data"].update(source="release", tokenizer_path="bytes", wikitext_dir="/nowhere")
    (run / "config.json").write_text(json.dumps(config))
    model, _ = load_trained_model(run, "latest")
    assert model.config.vocab_size == 256
    assert best_step(run) == 4  # perplexity: the lowest wins
    (run / "checkpoints" / "2" / "metrics" / "metrics").write_text('{"val_perplexity": 1.0}')
    assert best_step(run) == 2
    ids, text, step = continue_prompt(
        str(run),
        prompt_ids=None,
        prompt="12+3",
        max_new_tokens=4,
        checkpoint="latest",
        greedy=True,
    )
    assert ids[:4] == list(b"12+3") and len(ids) == 8 and step == 4
    assert text == bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.slow  # end-to-end: a training run
def test_a_task_of_the_user_s_own_loads_through_its_factory(tmp_path, monkeypatch):
    """config.task='toy_task:make_task' (tests/toy_task.py: BatchNorm and dropout): the factory
    builds the model; parameters and model state are the runner's."""
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    from toy_task import ToyTask, toy_config

    config = toy_config()
    config.num_train_steps, config.eval_every, config.checkpoint_every = 3, 3, 3
    train_and_evaluate(config, tmp_path / "run", task=ToyTask(config))
    model, loaded = load_trained_model(tmp_path / "run")
    assert loaded.task == "toy_task:make_task"
    runner, state = _runner_state(tmp_path / "run", tmp_path, 3)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    for got, want in zip(
        _plain((params, model_state)), _plain(state.params) + _plain(state.model_state), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # end-to-end: a training run
def test_a_checkpoint_the_run_deletes_while_it_is_read(listops_run, tmp_path, monkeypatch):
    """A run still training saves step 6 and deletes step 4 while 'latest' (4) is read: the
    load reads 6 instead; a step asked for by number is refused naming the steps there."""
    from hgrn_jax.training import trained

    copy = tmp_path / "training"
    shutil.copytree(listops_run, copy)
    checkpoints = copy / "checkpoints"
    verify = trained.integrity.verify

    def run_saves_meanwhile(folder):
        if Path(folder) == checkpoints / "4":
            if not (checkpoints / "6").exists():
                shutil.copytree(checkpoints / "4", checkpoints / "6")
            shutil.rmtree(checkpoints / "4")
        return verify(folder)

    monkeypatch.setattr(trained.integrity, "verify", run_saves_meanwhile)
    latest, _ = load_trained_model(copy, "latest")
    want, _ = load_trained_model(listops_run, 4)
    for got, ref in zip(_plain(nnx.state(latest)), _plain(nnx.state(want)), strict=True):
        np.testing.assert_array_equal(got, ref)

    shutil.copytree(checkpoints / "6", checkpoints / "4")
    with pytest.raises(
        ValueError, match=r"checkpoints/4 was deleted while it was read .* steps there: 2, 6"
    ):
        load_trained_model(copy, 4)


@pytest.mark.slow  # end-to-end: a training run and two commands
def test_generate_command_prints_the_greedy_ids_and_their_text_and_fails_in_one_line(
    bpe_run, tmp_path
):
    """--prompt_ids --greedy --checkpoint=2 prints generate(greedy=True)'s ids of that step and,
    the run having a tokenizer, their decoding, and names step 2 on standard error (the tiny
    run's greedy ids are the same at steps 2 and 4); an error (here: --prompt with the run folder moved
    and its tokenizer gone, so --prompt reaches the tokenizer) is one line naming the path and
    --tokenizer_path, exit code 2. The other outcomes of the command are continue_prompt's,
    checked in-process by the next test (two commands: each starts JAX and compiles generate)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bpe_run.parent / "tokenizer.json"))
    prompt = tok.encode("The quick brown fox").ids
    model, _ = load_trained_model(bpe_run, 2)
    want = [int(i) for i in np.asarray(generate(model, np.asarray([prompt]), 8, greedy=True))[0]]
    done = _cli(
        f"--workdir={bpe_run}",
        f"--prompt_ids={','.join(map(str, prompt))}",
        "--max_new_tokens=8",
        "--greedy",
        "--checkpoint=2",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"generated with the checkpoint at step 2 of {bpe_run} (--checkpoint=2)\n" in done.stderr
    assert done.stdout.splitlines()[0] == ",".join(map(str, want))
    assert "\n".join(done.stdout.splitlines()[1:]) == tok.decode(want)

    moved = tmp_path / "moved"
    shutil.copytree(bpe_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["tokenizer_path"] = str(tmp_path / "gone" / "tokenizer.json")
    (moved / "config.json").write_text(json.dumps(config))
    gone = _cli(f"--workdir={moved}", "--prompt=The", "--max_new_tokens=1")
    assert gone.returncode == 2
    assert gone.stderr.strip().splitlines() == [
        f"error: ValueError: the run's tokenizer does not load from data.tokenizer_path="
        f"'{tmp_path}/gone/tokenizer.json' of {moved}/config.json: no tokenizer is there; pass "
        "the tokenizer the run was trained with, e.g. --tokenizer_path=/path/to/tokenizer.json "
        "(rerun with --traceback for details)"
    ]
    worst = _cli(
        f"--workdir={bpe_run}", "--prompt_ids=1", "--max_new_tokens=1", "--checkpoint=worst"
    )
    assert worst.returncode == 2
    assert worst.stderr.strip().startswith(
        "error: ValueError: --checkpoint=worst is not 'best', 'latest' or a step; pass one of"
    )


def test_generate_s_errors_name_its_flag_not_the_python_argument():
    """load_trained_model's fixes name its argument (checkpoint='latest'); the command said so
    too, where its flag is --checkpoint=latest."""
    from experiments.generate import as_flags

    assert as_flags("pass checkpoint='latest' or a step") == "pass --checkpoint=latest or a step"
    assert as_flags("load another of its steps (2, 4) with checkpoint=STEP") == (
        "load another of its steps (2, 4) with --checkpoint=STEP"
    )
    assert as_flags("checkpoint /r/checkpoints/4 is damaged") == (
        "checkpoint /r/checkpoints/4 is damaged"
    )


@pytest.mark.slow  # end-to-end: two training runs
def test_generate_encodes_a_text_prompt_with_the_run_s_bpe_tokenizer(
    bpe_run, listops_run, tmp_path
):
    """A text prompt is encoded with the run's tokenizer.json, the ids are generate(greedy=True)'s
    and the text their decoding; --tokenizer_path stands in for a tokenizer that is gone, and one
    with more tokens than the run's model is refused; a step that is not there and a
    classifier's run are refused naming the fix."""
    from tokenizers import Tokenizer

    from experiments.generate import continue_prompt

    tokenizer_path = bpe_run.parent / "tokenizer.json"
    tok = Tokenizer.from_file(str(tokenizer_path))
    prompt = tok.encode("The quick brown fox").ids
    model, _ = load_trained_model(bpe_run)
    assert model.config.vocab_size == 320
    want = [int(i) for i in np.asarray(generate(model, np.asarray([prompt]), 8, greedy=True))[0]]
    ids, text, step = continue_prompt(
        str(bpe_run), prompt_ids=None, prompt="The quick brown fox", max_new_tokens=8, greedy=True
    )
    assert ids == want and text == tok.decode(want) and step == best_step(bpe_run)

    moved = tmp_path / "moved"
    shutil.copytree(bpe_run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["tokenizer_path"] = str(tmp_path / "gone" / "tokenizer.json")
    (moved / "config.json").write_text(json.dumps(config))
    ids, text, _ = continue_prompt(
        str(moved),
        prompt_ids=None,
        prompt="The quick brown fox",
        max_new_tokens=8,
        greedy=True,
        tokenizer_path=str(tokenizer_path),
    )
    assert ids == want and text == tok.decode(want)
    big = fx.write_bpe_tokenizer(tmp_path / "big.json", vocab_size=400)
    with pytest.raises(ValueError, match=r"big\.json has \d+ tokens, more than the run's"):
        continue_prompt(
            str(moved), prompt_ids=None, prompt="T", max_new_tokens=1, tokenizer_path=str(big)
        )

    with pytest.raises(
        ValueError, match=r"has no checkpoint at step 3; pass one of the steps there: 2, 4"
    ):
        continue_prompt(str(bpe_run), prompt_ids=[1], prompt=None, max_new_tokens=2, checkpoint="3")
    with pytest.raises(ValueError) as refused:
        continue_prompt(str(listops_run), prompt_ids=[1, 2], prompt=None, max_new_tokens=2)
    assert str(refused.value) == (
        f"{listops_run} is a run of task 'listops', whose HGRNClassifier is no language model; "
        "experiments.generate continues the prompts of LM runs (e.g. "
        "experiments/configs/lm/wikitext103.py); load this one with "
        "hgrn_jax.training.load_trained_model"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "x"}, r"^both of --prompt_ids and --prompt given; pass one prompt"),
        ({"prompt_ids": None}, r"^neither of --prompt_ids and --prompt given; pass one prompt"),
        ({"max_new_tokens": -1}, r"^--max_new_tokens=-1 is negative; pass a count >= 0"),
        (
            {"temperature": 0.0},
            r"^--temperature=0.0 is not a finite number > 0; .* or --greedy for argmax",
        ),
        ({"top_p": 1.5}, r"^--top_p=1.5 is outside \(0, 1\]; pass e\.g\. --top_p=0\.9"),
        ({"top_k": 0}, r"^--top_k=0 is out of range; pass a count >= 1, or leave it out"),
        (
            {"greedy": True, "top_k": 5},
            r"^--greedy takes the argmax and would ignore --top_k=5; leave it out, or drop "
            r"--greedy to sample$",
        ),
        (
            {"seed": 2**63},  # an OverflowError traceback after the model had loaded
            r"^--seed=9223372036854775808 is outside the 64-bit integers; pass e\.g\. --seed=0$",
        ),
        (
            {"greedy": True, "temperature": 0.5, "top_p": 0.9},
            r"^--greedy takes the argmax and would ignore --temperature=0\.5 --top_p=0\.9; leave "
            r"them out",
        ),
    ],
)
def test_generate_flags_are_refused_naming_the_flag_before_loading(tmp_path, change, message):
    """Bad flags are refused with the command's own flag names and fixes, before the run folder
    (here none) is read."""
    from experiments.generate import continue_prompt

    given = {"prompt_ids": [1, 2], "prompt": None, "max_new_tokens": 2, **change}
    with pytest.raises(ValueError, match=message):
        continue_prompt(str(tmp_path), **given)


def test_the_byte_tokenizer_is_refused_for_a_model_of_another_vocabulary():
    """--tokenizer_path=bytes on a BPE run fed the prompt's bytes to the BPE model in silence,
    and its generated ids from 256 up failed to decode (``bytes must be in range(0, 256)``,
    the ids lost). A model of 256 tokens, or of unknown size, takes it."""
    from experiments.generate import _bytes_mismatch
    from hgrn_jax.data.wikitext import LineTokenizer

    byte_level = LineTokenizer("bytes")
    assert _bytes_mismatch(byte_level, 256) is None and _bytes_mismatch(byte_level, None) is None
    assert _bytes_mismatch(byte_level, 320) == (
        "--tokenizer_path=bytes reads and writes the 256 byte values, but the run's model has "
        "320 tokens (it was trained with another tokenizer); pass that one as --tokenizer_path"
    )


@pytest.mark.slow  # end-to-end: a training run
def test_generate_prompt_ids_outside_the_vocabulary_name_the_flag(lm_run):
    from experiments.generate import continue_prompt

    with pytest.raises(
        ValueError,
        match=r"^prompt token id 256 is outside the run's vocabulary \[0, 256\); pass "
        r"--prompt_ids below 256",
    ):
        continue_prompt(str(lm_run), prompt_ids=[1, 256], prompt=None, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^--top_k=257 is out of range; .* <= 256"):
        continue_prompt(str(lm_run), prompt_ids=[1], prompt=None, max_new_tokens=2, top_k=257)


@pytest.mark.slow  # end-to-end: a training run
def test_an_hgrn2_lm_run_loads_and_generates_what_its_full_pass_predicts(tmp_path):
    """The HGRN2 LM (matrix-state mixer) comes back from its run folder with the parameters the
    runner restores, bit for bit, and greedy generation through its step() cache picks, at every
    position, the argmax of one full causal pass over the generated ids: the recurrent cache
    and the parallel pass agree on a trained model, not only at initialisation."""
    config = _config(
        "hgrn2.wikitext103",
        tmp_path / "cache",
        **{"data.train_bytes": 20_000, "data.eval_bytes": 2_048},
    )
    # One checkpoint (after 2 steps and an evaluation) is all this test loads.
    config.num_train_steps = config.eval_every = config.checkpoint_every = 2
    results = train_and_evaluate(config, tmp_path / "run")
    model, loaded = load_trained_model(tmp_path / "run")
    assert loaded.model.mixer.kind == "hgrn2"
    runner, state = _runner_state(tmp_path / "run", tmp_path, results["best_step"])
    params = nnx.state(model, nnx.Param)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(state.params))
    for got, want in zip(_plain(params), _plain(state.params), strict=True):
        np.testing.assert_array_equal(got, want)
    prompt = np.asarray([[49, 50, 43], [10, 97, 98]], np.int32)
    forward = nnx.jit(lambda lm, ids: lm(ids))
    out = np.asarray(generate(model, prompt, 8, greedy=True))
    logits = np.asarray(forward(model, jnp.asarray(out[:, :-1])))
    np.testing.assert_array_equal(out[:, 3:], np.argmax(logits[:, 2:], axis=-1))


def test_generate_names_what_is_wrong_with_a_tokenizer_that_loses_text(tmp_path):
    """A BPE without GPT-2's byte symbols is refused as it loads (it dropped most text); the
    generate command said only "it is no tokenizer the `tokenizers` package can load", which
    misdescribed it. It now passes on what is wrong, with --tokenizer_path as the fix."""
    from experiments.generate import tokenizer_of

    (tmp_path / "encoder.json").write_text(json.dumps({"h": 0, "<|endoftext|>": 1}))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    config = ml_collections.ConfigDict({"data": {"tokenizer_path": str(tmp_path)}})
    with pytest.raises(ValueError) as raised:
        tokenizer_of(config, "runs/x")
    message = str(raised.value)
    assert message.startswith(
        f"the run's tokenizer does not load from data.tokenizer_path={str(tmp_path)!r} of "
        f"runs/x/config.json: {tmp_path}/encoder.json + {tmp_path}/vocab.bpe loses text: 242 of "
        "the 243 characters"
    ), message
    assert message.endswith(
        "pass the tokenizer the run was trained with, e.g. --tokenizer_path=/path/to/tokenizer.json"
    )
    # This command's flag, not the training config's key.
    assert "--tokenizer_path=bytes" in message and "--config." not in message


def test_a_run_trained_with_sequence_parallelism_loads_as_a_one_device_model(listops_run, tmp_path):
    """model.mixer.sequence_axis (the sequence split over a mesh axis) changes no parameter,
    but the loaded model kept it: its first call asked for a mesh with that axis ("needs a
    mesh with that axis; the mesh in use has axes ()"). It loads to run on one device."""
    copy = tmp_path / "run"
    shutil.copytree(listops_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["mixer"]["sequence_axis"] = "model"
    (copy / "config.json").write_text(json.dumps(config))
    model, loaded_config = load_trained_model(copy, "latest")
    assert loaded_config.model.mixer.sequence_axis == "model"  # the run's config, as it was
    want, _ = load_trained_model(listops_run, "latest")
    ids = jnp.ones((2, 16), jnp.int32)
    np.testing.assert_array_equal(model(ids), want(ids))


@pytest.mark.slow  # end-to-end: a training run
def test_a_pixel_task_run_loads(tmp_path):
    """A Pathfinder run (linear pixel encoder, no vocabulary) was refused: "leaves
    model.vocab_size to the data (0) and the checkpoint's arrays do not say it"."""
    config = _config("lra.pathfinder", tmp_path / "cache")
    config.num_train_steps, config.eval_every, config.checkpoint_every = 2, 2, 2
    train_and_evaluate(config, tmp_path / "run")
    model, _ = load_trained_model(tmp_path / "run")
    height, width = model.config.grid_shape  # from the data, as the run found it
    assert model(jnp.zeros((1, height * width, 1))).shape == (1, 2)


_OWN_MODEL_TASK = '''
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from hgrn_jax.nn import HGRU
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import TokenTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.settings import check_vocab_size, settle


class FirstToken(TokenTask):
    """The label is the first token: a long-range dependency, generated."""

    model_kind = models.CLASSIFIER

    @classmethod
    def derive(cls, config):
        config = super().derive(config)
        check_vocab_size(config, 5, "the symbols'")
        settle(config, "model.num_classes", 4, "the classes")
        return config

    def _load(self, split):
        rng = np.random.default_rng(self._split_seed(split))
        n, length = self._split_size(split), int(self.config.data.seq_len)
        tokens = rng.integers(0, 4, (n, length))
        return {
            "inputs": (tokens + 1).astype(np.int32),
            "lengths": np.full(n, length, np.int32),
            "labels": tokens[:, 0].astype(np.int32),
        }


class OwnClassifier(nnx.Module):
    def __init__(self, vocab, d, classes, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.mix = HGRU(d, bidirectional=True, rngs=rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, ids, mask):
        x = self.embed(ids)
        x = x + self.mix(x, 0.0, mask)
        m = mask[..., None].astype(x.dtype)
        return self.head((x * m).sum(1) / jnp.maximum(m.sum(1), 1))


class WithOwnModel(FirstToken):
    def build_model(self, rngs):
        c = self.config.model
        return OwnClassifier(c.vocab_size, c.features, c.num_classes, rngs=rngs)


DATASET = Dataset("first_token_own", models.CLASSIFIER, sources={"synthetic": WithOwnModel})
'''


@pytest.mark.slow  # end-to-end: a training run
def test_a_dataset_source_with_its_own_model_loads_that_model(tmp_path, monkeypatch):
    """A registry-style Dataset whose source class builds its own model (docs/tasks.md) trained
    it, but load_trained_model rebuilt the package's classifier and refused the checkpoint as
    holding "other arrays than the model config.json describes"."""
    (tmp_path / "own_model_task.py").write_text(_OWN_MODEL_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config("lra.listops", tmp_path / "cache")
    config.task, config.data.source = "own_model_task:DATASET", "synthetic"
    config.model.vocab_size, config.model.num_classes, config.paper.value = 0, 0, 0
    config.model.features, config.data.seq_len = 16, 32
    config.data.train_examples, config.data.val_examples, config.data.test_examples = 64, 16, 16
    train_and_evaluate(config, tmp_path / "run")
    model, _ = load_trained_model(tmp_path / "run", "latest")
    assert type(model).__name__ == "OwnClassifier"
    saved = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "4" / "state")
    np.testing.assert_array_equal(
        model.head.kernel[...], saved["params"]["head"]["kernel"]["value"]
    )


def test_a_release_source_of_ones_own_with_its_own_model_builds_that_model(tmp_path, monkeypatch):
    """A Dataset whose ``release`` source is a ReleaseOrPrepared of the user's classes with their
    own model: the loader rebuilt the package's classifier (it looked for a class, and the pair
    is not one), so the checkpoint was refused as holding other arrays."""
    from hgrn_jax.training.trained import _model_builder

    module = _OWN_MODEL_TASK + (
        "\nfrom hgrn_jax.tasks.prepared_tfds import ReleaseOrPrepared\n"
        "RELEASE = Dataset('first_token_release', models.CLASSIFIER,\n"
        "                  sources={'release': ReleaseOrPrepared(WithOwnModel, WithOwnModel)})\n"
    )
    (tmp_path / "own_release_task.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config("lra.listops", tmp_path / "cache")
    config.task, config.data.source, config.data.tfds_dir = (
        "own_release_task:RELEASE",
        "release",
        "",
    )
    config.model.vocab_size, config.model.num_classes, config.paper.value = 0, 0, 0
    config.model.features, config.data.seq_len = 16, 32
    config.data.train_examples, config.data.val_examples, config.data.test_examples = 64, 16, 16
    build = _model_builder(tmp_path, config, {})
    assert type(build(nnx.Rngs(0))).__name__ == "OwnClassifier"

    # Only the prepared data's class has a model of its own, and the run read prepared data.
    from hgrn_jax.tasks.prepared_tfds import ReleaseOrPrepared

    own = sys.modules["own_release_task"]
    pair = ReleaseOrPrepared(own.FirstToken, own.WithOwnModel)
    monkeypatch.setitem(own.RELEASE.sources, "release", pair)
    monkeypatch.setattr(ReleaseOrPrepared, "pick", lambda self, config: self.prepared)
    build = _model_builder(tmp_path, config, {})
    assert type(build(nnx.Rngs(0))).__name__ == "OwnClassifier"


def test_a_missing_required_flag_is_named_as_required(tmp_path):
    """absl said "Flag --max_new_tokens must have a value other than None"."""
    done = _cli(f"--workdir={tmp_path}", "--prompt_ids=1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --max_new_tokens is required: pass --max_new_tokens=... (pass --helpshort to "
        "see the flags)"
    )


class _Pending:
    """An awaitable that suspends a coroutine once (as a TensorStore read in flight)."""

    def __await__(self):
        yield


def _orbax_read_echoes(folder: Path) -> None:
    """What Orbax, TensorStore and asyncio printed of a read of ``folder`` that a run still
    training deleted meanwhile (measured: 19 tracebacks and 190 lines per such load, 62 to
    3,948 lines with a checkpoint every 2 steps), each through its own channel: a task whose
    exception was never retrieved (asyncio's log), a future finishing after its event loop
    closed (``Event loop is closed``) and an error record of Orbax's through absl; and
    :func:`_suspended_read`."""

    async def deserialize():
        raise FileNotFoundError(2, "No such file or directory", f"{folder}/state/manifest.ocdbt")

    loop = asyncio.new_event_loop()
    task = loop.create_task(deserialize())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as closed:
        sys.unraisablehook(_unraisable(closed))
    del task
    gc.collect()  # asyncio logs 'Task exception was never retrieved'
    absl = logging.getLogger("absl")
    absl.handle(
        absl.makeRecord(
            "absl",
            logging.ERROR,
            "/venv/site-packages/orbax/checkpoint/_src/handlers/base_pytree_checkpoint_handler.py",
            1,
            f"Requested directory for restore does not exist at {folder}/state.",
            (),
            None,
        )
    )


def _suspended_read(folder: Path) -> Coroutine:
    """An Orbax read coroutine of ``folder`` suspended in TensorStore: once collected (the
    failed read's error holds it), ``Exception ignored in: <coroutine ...>`` with the
    TensorStore spec naming ``folder``."""

    async def read_array_index():
        try:
            await _Pending()
        except BaseException as error:
            raise Exception(  # as Orbax's serialization does
                "Encountered error while reading array index: (slice(0, 32, 1),). See full "
                f"TensorStore details: {{'path': '{folder}/state/'}}."
            ) from error

    coroutine = read_array_index()
    coroutine.send(None)
    return coroutine


def _unraisable(error: BaseException) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        exc_type=type(error),
        exc_value=error,
        exc_traceback=error.__traceback__,
        err_msg=None,
        object=None,
    )


def _two_load_filters(monkeypatch) -> tuple[list, object, object]:
    """``(shown, first, second)``: the unraisable errors that reach the hook, and the filters
    of two loads, of folder-a's and folder-b's reads (not installed)."""
    from hgrn_jax.training.checkpoint import Echoes

    shown: list = []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    first = Echoes(lambda error, text: "a" if "folder-a" in str(error) else None, False)
    second = Echoes(lambda error, text: "b" if "folder-b" in str(error) else None, False)
    return shown, first, second


def test_echoes_ended_in_another_order_than_begun_pass_later_errors_on(monkeypatch):
    """Two loads in two threads: A's filter installed, then B's over it, A ended, then B. B put
    back the hook before it, A's, which went on holding (never showing) every later unraisable
    error naming A's folders, and every ``Event loop is closed``, for the process's life."""
    shown, first, second = _two_load_filters(monkeypatch)
    first.install()
    second.install()
    first.uninstall()
    second.uninstall()
    later = _unraisable(RuntimeError("reading folder-a failed"))
    sys.unraisablehook(later)
    assert shown == [later] and not first.held
    assert sys.unraisablehook == shown.append  # the ended filters leave no chain behind


def test_echoes_hold_while_active_and_pass_on_once_ended(monkeypatch):
    """Two loads at once: while both filters are on, an echo of the first's read is held by
    the first (the second chains below it, not past it); once the first has ended, though
    still in the chain under the second, an echo naming its folder is shown. A hook put back
    over an ended filter (by code other than ours) is skipped by the next filter chained."""
    shown, first, second = _two_load_filters(monkeypatch)
    first.install()
    second.install()
    echo = _unraisable(RuntimeError("reading folder-a failed"))
    sys.unraisablehook(echo)
    assert shown == [] and [what for what, _ in first.held] == ["a"]
    first.uninstall()
    later = _unraisable(RuntimeError("reading folder-a failed again"))
    sys.unraisablehook(later)
    assert shown == [later] and len(first.held) == 1
    second.uninstall()
    assert sys.unraisablehook == shown.append

    from hgrn_jax.training.checkpoint import Echoes

    third = Echoes(lambda error, text: None, False)
    third.install()
    foreign = third.unraisable  # e.g. a test harness's hook, restored after ours ended
    third.uninstall()
    sys.unraisablehook = foreign
    fourth = Echoes(lambda error, text: None, False)
    fourth.install()
    assert fourth.shown == shown.append  # not the ended filter's hook
    fourth.uninstall()


def test_late_callbacks_are_explained_only_when_every_other_read_is(tmp_path, monkeypatch):
    """asyncio's ``Event loop is closed`` names no folder: it is left out only when some read
    was overtaken by the run's deletion and every read but a successful last one is explained.
    A load that succeeded at its first read, or failed at a step that is still there, shows it;
    a step the run deletes shortly after the load moved on is waited for, not the whole wait."""
    from hgrn_jax.training import trained
    from hgrn_jax.training.checkpoint import LATE_CALLBACK

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "6").mkdir(parents=True)
    once = trained._Reads()
    once.folders.append(checkpoints / "6")
    once.finish(succeeded=True)
    assert not once.explained(LATE_CALLBACK)

    failed = trained._Reads()
    failed.folders += [checkpoints / "4", checkpoints / "6"]  # 4 deleted, 6 damaged
    failed.retried.add(checkpoints / "4")
    failed.finish(succeeded=False)
    assert failed.explained(checkpoints / "4") and not failed.explained(LATE_CALLBACK)

    (checkpoints / "8").mkdir()
    monkeypatch.setattr(trained, "_DELETION_WAIT_S", 30.0)
    moved_on = trained._Reads()
    moved_on.folders += [checkpoints / "8", checkpoints / "10"]
    moved_on.retried.add(checkpoints / "8")
    threading.Timer(0.05, shutil.rmtree, [checkpoints / "8"]).start()
    began = time.monotonic()
    moved_on.finish(succeeded=True)
    assert time.monotonic() - began < 5.0
    assert moved_on.explained(checkpoints / "8") and moved_on.explained(LATE_CALLBACK)


@pytest.fixture
def training_run(tmp_path, monkeypatch):
    """``(workdir, reads, shown)``: a run folder with checkpoints 4 and 6 whose reads are
    simulated (``trained._load_step``, no JAX): ``reads`` maps a step to what its read does
    (``"vanish"``: the run saves the next even step and deletes this one while it is read,
    with Orbax's echoes; ``"corrupt"``: the read fails with the same echoes, the folder stays;
    ``"corrupt, then saved"``: so, and the run saves the next even step meanwhile;
    absent: the read returns ``("model", step)``); ``shown`` collects the unraisable errors
    that reach the hook."""
    from hgrn_jax.training import trained

    workdir = tmp_path / "run"
    for step in (4, 6):
        (workdir / "checkpoints" / str(step) / "state").mkdir(parents=True)
    reads: dict[int, str] = {}

    def load_step(workdir, config, step):
        folder = workdir / "checkpoints" / str(step)
        if step in reads:
            if reads[step] != "corrupt":
                (folder.parent / str(step + 2) / "state").mkdir(parents=True, exist_ok=True)
            if reads[step] == "vanish":
                shutil.rmtree(folder)
            read = _suspended_read(folder)
            _orbax_read_echoes(folder)
            try:
                raise FileNotFoundError(2, "No such file or directory", f"{folder}/state")
            except FileNotFoundError as missing:
                missing.read = read  # freed with this error, as Orbax's holds its coroutines
                del read
                raise trained._unrestorable(workdir, step, missing) from None
        return ("model", step)

    shown: list = []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    monkeypatch.setattr(trained, "read_config", lambda workdir: ml_collections.ConfigDict())
    monkeypatch.setattr(trained, "_load_step", load_step)
    return workdir, reads, shown


def _echoes_seen(caplog, shown) -> list[str]:
    return [r.getMessage()[:80] for r in caplog.records if r.levelno >= logging.ERROR] + [
        f"{type(u.exc_value).__name__}: {str(u.exc_value)[:80]}" for u in shown
    ]


def test_a_checkpoint_deleted_while_it_is_read_leaves_no_echoes_and_loads_the_next(
    training_run, caplog, capsys
):
    """'latest' (6) vanishes while it is read, with Orbax's and asyncio's tracebacks of the
    failed read: the load returns step 8 and none of them is shown (every one of them was)."""
    workdir, reads, shown = training_run
    reads[6] = "vanish"
    caplog.set_level(logging.INFO)
    model, _, step = load_trained_model(workdir, "latest", return_step=True)
    assert (model, step) == (("model", 8), 8)
    assert _echoes_seen(caplog, shown) == []
    assert capsys.readouterr().err == ""


def test_a_checkpoint_that_stays_shows_its_errors_and_other_errors_are_shown(
    training_run, caplog, monkeypatch
):
    """A checkpoint that fails to read and is still there (corrupt, unreadable) is a genuine
    error: the load raises it and Orbax's tracebacks of it are shown; an error that names no
    checkpoint read is shown even when the one read vanished."""
    workdir, reads, shown = training_run
    reads[6] = "corrupt"
    caplog.set_level(logging.INFO)
    with pytest.raises(ValueError, match=r"checkpoints/6 does not restore \(FileNotFoundError"):
        load_trained_model(workdir, "latest")
    seen = _echoes_seen(caplog, shown)
    assert any("Task exception was never retrieved" in line for line in seen), seen
    assert any("Requested directory for restore does not exist" in line for line in seen)
    assert any(line.startswith("Exception: Encountered error while reading") for line in seen)
    assert "RuntimeError: Event loop is closed" in seen
    caplog.clear()
    shown.clear()

    reads[6] = "vanish"
    other = _raised_in_read(ValueError("PERMISSION_DENIED: /elsewhere/data"))
    from hgrn_jax.training import trained

    vanish_with_another_error = trained._load_step

    def load_step(workdir, config, step):
        if step == 6:
            sys.unraisablehook(_unraisable(other))
            logging.getLogger("absl").handle(
                logging.getLogger("absl").makeRecord(
                    "absl",
                    logging.ERROR,
                    "/x/orbax/checkpoint/y.py",
                    1,
                    "RESOURCE_EXHAUSTED",
                    (),
                    None,
                )
            )
        return vanish_with_another_error(workdir, config, step)

    monkeypatch.setattr(trained, "_load_step", load_step)
    model, _ = load_trained_model(workdir, "latest")
    assert model == ("model", 8)
    assert _echoes_seen(caplog, shown) == [
        "RESOURCE_EXHAUSTED",
        "ValueError: PERMISSION_DENIED: /elsewhere/data",
    ]


def test_a_damaged_checkpoint_passed_over_for_a_newer_one_shows_its_errors(
    training_run, caplog, monkeypatch
):
    """'latest' (6) fails to read and stays on disk while the run saves 8: the load returns 8,
    and the errors of 6, which is damaged, not deleted, are shown (they were dropped, since the
    load succeeded); a step the run is still deleting is waited for, then its echoes dropped."""
    from hgrn_jax.training import trained

    monkeypatch.setattr(trained, "_DELETION_WAIT_S", 0.2)
    workdir, reads, shown = training_run
    reads[6] = "corrupt, then saved"
    caplog.set_level(logging.INFO)
    model, _, step = load_trained_model(workdir, "latest", return_step=True)
    assert (model, step) == (("model", 8), 8)
    seen = _echoes_seen(caplog, shown)
    assert any("Requested directory for restore does not exist" in line for line in seen), seen
    caplog.clear()
    shown.clear()

    reads.clear()
    reads[8] = "corrupt, then saved"  # the run's deletion of 8 ends after the load moved on
    late_delete = threading.Timer(0.05, shutil.rmtree, [workdir / "checkpoints" / "8"])
    monkeypatch.setattr(trained, "_DELETION_WAIT_S", 5.0)
    real_load = trained._load_step

    def load_step(workdir, config, step):
        if step == 8:
            late_delete.start()
        return real_load(workdir, config, step)

    monkeypatch.setattr(trained, "_load_step", load_step)
    assert load_trained_model(workdir, "latest")[0] == ("model", 10)
    assert _echoes_seen(caplog, shown) == []


def _raised_in_read(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_a_run_that_deletes_every_checkpoint_read_fails_in_one_line_without_echoes(
    training_run, caplog
):
    """Five reads in a row overtaken by the run's saves: one line naming the run folder and
    what to do (it was the last read's 'does not restore (FileNotFoundError ...)' naming a
    step to load that the run deletes next), and no echo; a step asked for by number that
    vanishes says so, without echoes either."""
    workdir, reads, shown = training_run
    reads.update({step: "vanish" for step in range(6, 16, 2)})
    caplog.set_level(logging.INFO)
    with pytest.raises(
        ValueError,
        match=rf"^run {workdir} is still training and deleted the checkpoint 'latest' named "
        r"each time it was read \(5 tries: steps 6, 8, 10, 12, 14\); load it again, or once",
    ):
        load_trained_model(workdir, "latest")
    gc.collect()  # the error raised no longer holds the last read's coroutine
    assert _echoes_seen(caplog, shown) == []
    reads[4] = "vanish"
    with pytest.raises(ValueError, match=r"checkpoints/4 was deleted while it was read"):
        load_trained_model(workdir, 4)
    gc.collect()
    assert _echoes_seen(caplog, shown) == []


@pytest.mark.parametrize(
    "text, named",
    [
        ("TensorStore {'path': '{c}/4/state/'}", "4"),
        ("No such file or directory: '{c}/4'", "4"),
        ("does not exist at {c}/4.", "4"),
        ("reading {c}/40/state/d/0", None),
        ("writing {c}/4.orbax-checkpoint-tmp-17/state", None),
        ("Event loop is closed", None),
    ],
)
def test_an_echo_is_of_the_step_whose_path_it_names(text, named):
    from hgrn_jax.training.trained import _Reads

    checkpoints = Path("/runs/a/checkpoints")
    reads = _Reads()
    reads.folders.append(checkpoints / "4")
    message = text.replace("{c}", str(checkpoints))
    got = reads.named(None, message)
    assert got == (checkpoints / named if named else None)
    assert reads.named(_raised_in_read(RuntimeError(message)), "x") == got

"""Every experiment config against the paper's settings (docs/design.md section 3.4, transcribed)."""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from hgrn_jax import tasks

# docs/design.md 3.4, LRA table: model, layers, d, GLU expand, norm, batch, lr, wd, dropout,
# warmup / schedule steps, epochs, length, paper accuracy.
LRA_TABLE = {
    #             mixer layers  d  glu  norm         batch  lr     wd    drop warmup   steps  ep  length  acc
    "listops": ("1d", 6, 32, 1, "sync_batch", 128, 5e-4, 0.01, 0.0, 5_000, 50_000, 50, 2048, 59.95),
    "text": ("1d", 4, 128, 1, "sync_batch", 32, 5e-3, 0.0, 0.1, 10_000, 50_000, 32, 4096, 88.14),
    "retrieval": ("1d", 2, 64, 2, "batch", 64, 5e-3, 0.0, 0.0, 312, 50_000, 20, 4000, 94.23),
    "image": ("2d", 6, 512, 1, "batch", 50, 3e-3, 0.0, 0.0, 30_000, 50_000, 100, 32 * 32, 88.69),
    "pathfinder": (
        "2d",
        6,
        128,
        1,
        "batch",
        128,
        2e-3,
        0.0,
        0.0,
        50_000,
        500_000,
        200,
        32 * 32,
        92.92,
    ),
    "pathx": (
        "2d",
        6,
        64,
        1,
        "sync_batch",
        16,
        7.5e-4,
        0.0,
        0.0,
        150_000,
        500_000,
        100,
        128 * 128,
        97.50,
    ),
}
LRA_AVERAGE = 86.91
# Reference train-set sizes behind num_train_steps = epochs * (size // batch).
LRA_TRAIN_SIZES = {
    "listops": 96_000,
    "text": 25_000,
    "retrieval": 147_086,
    "image": 45_000,
    "pathfinder": 160_000,
    "pathx": 160_000,
}
# ImageNet rows: d, layers, parameters, top-1.
IMAGENET_TABLE = {"tiny": (192, 12, 6_107_560, 74.40), "small": (384, 12, 23_715_688, 80.09)}

ALL_CONFIGS = [f"lra.{t}" for t in LRA_TABLE] + [
    "imagenet.tiny",
    "imagenet.small",
    "lm.wikitext103",
]


def load(name: str, preset: str | None = None):
    return importlib.import_module(f"experiments.configs.{name}").get_config(preset)


def abstract_params(config) -> int:
    model = nnx.eval_shape(lambda: tasks.build_model(config, nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@functools.cache
def paper_params(name: str) -> int:
    """``abstract_params`` of the preset ``name``'s paper config, traced once per module (an
    ImageNet model's trace is ~1.7 CPU-s, and several tests count the same presets)."""
    return abstract_params(load(name))


@pytest.mark.parametrize("task", list(LRA_TABLE))
def test_lra_configs_match_the_paper_table(task):
    (
        mixer,
        layers,
        d,
        glu,
        norm,
        batch,
        lr,
        wd,
        dropout,
        warmup,
        steps,
        epochs,
        length,
        accuracy,
    ) = LRA_TABLE[task]
    c = load(f"lra.{task}")
    assert c.task == task
    m = c.model
    assert (m.mixer.scan, m.num_layers, m.features, m.glu_expand, m.norm) == (
        mixer,
        layers,
        d,
        glu,
        norm,
    )
    assert (m.mixer.kind, m.mixer.layout) == ("hgrn", "official")
    assert m.dropout == dropout
    assert c.batch_size == batch and c.epochs == epochs and c.data.seq_len == length
    assert c.num_train_steps == epochs * (LRA_TRAIN_SIZES[task] // batch)
    assert c.optimizer.name == "adamw" and c.optimizer.weight_decay_mask == "all"
    assert c.optimizer.learning_rate == pytest.approx(lr)
    assert c.optimizer.weight_decay == pytest.approx(wd)
    assert c.optimizer.grad_clip_norm == 0.0
    assert (c.schedule.name, c.schedule.warmup_steps, c.schedule.decay_steps) == (
        "cosine",
        warmup,
        steps,
    )
    assert c.dtype == "float32" and c.label_smoothing == 0.0
    assert c.paper.metric == "accuracy" and c.paper.value == pytest.approx(accuracy)
    # Encoders and positions (docs/design.md 3.3): tokens for the text tasks, pixels for the
    # 2-D ones; sinusoidal positions except for Pathfinder and Path-X.
    assert m.encoder == ("embed" if mixer == "1d" else "linear")
    assert m.position_encoding == (task not in ("pathfinder", "pathx"))
    if mixer == "2d":
        side = int(length**0.5)
        assert tuple(m.grid_shape) == (side, side)
        assert m.input_channels == (3 if task == "image" else 1)
    assert m.get("dual", False) == (task == "retrieval")
    assert m.num_classes == (10 if task in ("listops", "image") else 2)
    for switch in ("use_lower_bound", "complex_valued", "separate_phases", "use_forget_gate"):
        assert _switches(m)[switch] is True


def test_lra_average_of_the_paper_rows():
    rows = [load(f"lra.{t}").paper.value for t in LRA_TABLE]
    assert np.mean(rows) == pytest.approx(LRA_AVERAGE, abs=0.005)


@pytest.mark.slow
@pytest.mark.parametrize("size", list(IMAGENET_TABLE))
def test_imagenet_configs_follow_deit(size):
    d, layers, params, top1 = IMAGENET_TABLE[size]
    c = load(f"imagenet.{size}")
    assert (c.model.features, c.model.num_layers, c.model.patch_size) == (d, layers, 14)
    assert tuple(c.model.image_size) == (224, 224) and c.model.num_classes == 1000
    assert (c.batch_size, c.epochs) == (2048, 300)
    assert c.num_train_steps == 300 * (1_281_167 // 2048)
    assert c.optimizer.name == "adamw" and c.optimizer.learning_rate == pytest.approx(2e-3)
    assert c.optimizer.weight_decay == pytest.approx(0.05)
    assert c.optimizer.weight_decay_mask == "timm"  # test_imagenet_weight_decay_is_timms
    assert c.optimizer.grad_clip_norm == 5.0
    # OpenNLPLab/HGRN's script_im.sh (warmup_epochs=10) and im's main.py defaults; the
    # schedule's values: test_training's test_timm_cosine_schedule_is_deits_per_epoch.
    assert c.schedule.name == "timm_cosine" and c.schedule.decay_steps == c.num_train_steps
    assert c.schedule.warmup_steps == 10 * c.schedule.steps_per_epoch == 10 * 625
    assert (c.schedule.warmup_lr, c.schedule.min_lr) == (1e-6, 1e-5)
    assert c.data.repeated_augmentation == 3  # main.py's repeated_aug=True (RASampler)
    assert c.dtype == "float32"  # train_im.sh's --fp32-resume: no autocast
    assert c.label_smoothing == pytest.approx(0.1)
    aug = c.data.augment
    assert (aug.mixup, aug.cutmix, aug.random_erasing) == (0.8, 1.0, 0.25)
    assert aug.randaugment.startswith("rand-m9")
    assert c.paper.value == pytest.approx(top1) and c.paper.num_params == params
    assert paper_params(f"imagenet.{size}") == params  # the paper's exact parameter count


def _timm_decayed(num_layers: int) -> set[str]:
    """What timm's create_optimizer (weight decay on all but 1-D parameters and biases) decays
    of OpenNLPLab/im's hgrn1d_vit (BiHgru1d blocks), named as our parameters: every Linear
    weight, both HGRU phases ((1, 1, d) in hgru-pytorch) and lower_bounds (depth, d); not the
    biases nor the LayerNorm weights."""
    names = {"patch_embed/kernel", "head/kernel", "lower_bounds/param"}
    for i in range(num_layers):
        mixer, mlp = f"blocks/{i}/mixer", f"blocks/{i}/mlp"
        names |= {f"{mixer}/{p}/kernel" for p in ("input_proj", "lambda_proj", "gate", "out_proj")}
        names |= {f"{mixer}/theta", f"{mixer}/theta_reverse"}
        names |= {f"{mlp}/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_imagenet_weight_decay_is_timms(preset):
    """The ImageNet configs decay exactly the parameters the reference run decays (the
    lower-bound matrix and the phases too, which no_bias_norm left out), for the paper's
    12-layer model (abstract shapes) and the tiny preset's."""
    from hgrn_jax.training import optim

    c = load("imagenet.tiny", preset)
    model = nnx.eval_shape(lambda: tasks.build_model(c, nnx.Rngs(0)))
    mask = optim.weight_decay_mask(nnx.state(model, nnx.Param), c.optimizer.weight_decay_mask)
    decides = {
        "/".join(n for n in optim._path_names(path) if n != "value"): bool(decayed)
        for path, decayed in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert {name for name, decayed in decides.items() if decayed} == _timm_decayed(
        c.model.num_layers
    )
    kept = {name.rsplit("/", 1)[-1] for name, decayed in decides.items() if not decayed}
    assert kept == {"bias", "scale"}


def test_wikitext103_config_follows_the_paper():
    c = load("lm.wikitext103")
    m = c.model
    assert (m.num_layers, m.features, m.glu_expand * m.features, m.glu_activation, m.norm) == (
        6,
        512,
        1024,
        "none",
        "layer",
    )
    assert m.tie_embeddings and m.vocab_size == 50_264
    assert c.data.seq_len == 512 and c.batch_size * c.data.seq_len == 65_536
    assert c.num_train_steps == 100_000
    assert (c.optimizer.name, c.optimizer.b1, c.optimizer.b2) == ("adamw", 0.9, 0.98)
    assert c.optimizer.weight_decay == pytest.approx(0.2)
    assert c.optimizer.learning_rate == pytest.approx(5e-4)
    assert (c.schedule.name, c.schedule.warmup_steps) == ("inverse_sqrt", 8_000)
    # train_alm.sh: --dropout 0.1, and no --fp16 / --bf16 (fairseq's float32)
    assert (m.dropout, c.dtype) == (0.1, "float32")
    assert load("lm.wikitext103", "tiny").model.dropout == 0.0
    assert c.paper.metric == "perplexity"
    assert (c.paper.value, c.paper.val_value) == (24.82, 24.14)
    assert paper_params("lm.wikitext103") == pytest.approx(46.25e6, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_preset_builds_its_model(name):
    paper = load(name)
    assert paper_params(name) > 0
    tiny = load(name, "tiny")
    # The tiny model's size from its shapes, without initialising weights: test_tasks builds
    # and runs the tiny presets' models (imagenet.small's tiny model is imagenet.tiny's).
    assert abstract_params(tiny) < 200_000
    assert tiny.data.source in ("generated", "synthetic")
    assert tiny.num_train_steps <= 300 and tiny.batch_size <= 64
    assert tiny.schedule.decay_steps == tiny.num_train_steps
    task = tasks.get_task(tiny)  # the tiny data exist without downloads
    assert task.name == paper.task


def test_listops_transformer_presets_swap_only_the_token_mixer():
    from hgrn_jax.nn import SoftmaxAttention

    hgrn, transformer = load("lra.listops"), load("lra.listops", "transformer")
    assert transformer.model.mixer.kind == "attention"
    assert transformer.model.position_encoding and not transformer.model.use_lower_bound
    differing = {
        key
        for key in set(hgrn.model.keys()) | set(transformer.model.keys())
        if key != "mixer" and hgrn.model.get(key) != transformer.model.get(key)
    }
    assert differing == {"use_lower_bound"}  # ListOps has sinusoidal positions already
    assert hgrn.optimizer == transformer.optimizer and hgrn.data == transformer.data
    assert hgrn.paper.value == 59.95 and transformer.paper.value == 0.0  # none in the paper
    tiny = load("lra.listops", "tiny_transformer")
    model = nnx.eval_shape(lambda: tasks.build_model(tiny, nnx.Rngs(0)))  # structure only
    assert all(isinstance(block.mixer, SoftmaxAttention) for block in model.blocks)
    assert tiny.num_train_steps == load("lra.listops", "tiny").num_train_steps


def test_wikitext103_transformer_presets_swap_the_token_mixer_and_add_positions():
    from hgrn_jax.nn import SoftmaxAttention

    hgrn, transformer = load("lm.wikitext103"), load("lm.wikitext103", "transformer")
    assert transformer.model.mixer.kind == "attention"
    differing = {
        key
        for key in set(hgrn.model.keys()) | set(transformer.model.keys())
        if key != "mixer" and hgrn.model.get(key) != transformer.model.get(key)
    }
    assert differing == {"use_lower_bound", "position_encoding"}
    assert transformer.model.position_encoding and not transformer.model.use_lower_bound
    assert hgrn.optimizer == transformer.optimizer and hgrn.data == transformer.data
    paper = (transformer.paper.value, transformer.paper.val_value, transformer.paper.num_params)
    assert paper == (0.0, 0.0, 0) and hgrn.paper.value == 24.82
    tiny = load("lm.wikitext103", "tiny_transformer")
    model = nnx.eval_shape(lambda: tasks.build_model(tiny, nnx.Rngs(0)))  # structure only
    assert all(isinstance(block.mixer, SoftmaxAttention) for block in model.blocks)
    assert model.config.position_encoding and model.blocks[0].mixer.causal


# Where each ablation switch shows in the built model.
ABLATIONS = {
    "use_lower_bound": lambda m: m.lower_bounds.enabled,
    "complex_valued": lambda m: m.blocks[0].mixer.complex_valued,
    "separate_phases": lambda m: m.blocks[0].mixer.num_phases == 2,
    "use_forget_gate": lambda m: m.blocks[0].mixer.use_forget_gate,
}


def _switches(model_config):
    """Where each ablation switch lives in a config: the model (lower bounds) or its mixer."""
    return {
        "use_lower_bound": model_config.use_lower_bound,
        **{k: v for k, v in model_config.mixer.items() if k in ABLATIONS},
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lra.listops", "lra.image", "imagenet.tiny", "lm.wikitext103"])
@pytest.mark.parametrize("switch", list(ABLATIONS))
def test_ablation_switches_reach_the_model(name, switch):
    config = load(name, "tiny")
    if switch not in _switches(config.model):
        assert name == "lm.wikitext103" and switch == "separate_phases"  # causal: one direction
        return
    assert _switches(config.model)[switch] is True
    build = lambda: tasks.build_model(config, nnx.Rngs(0))
    assert ABLATIONS[switch](nnx.eval_shape(build)) is True
    owner = config.model if switch == "use_lower_bound" else config.model.mixer
    owner[switch] = False
    assert ABLATIONS[switch](nnx.eval_shape(build)) is False


def test_unknown_presets_and_keys_fail_clearly():
    with pytest.raises(
        ValueError,
        match=r"unknown preset 'huge' for experiments/configs/lra/"
        r"text.py; choose one of: tiny",
    ):
        load("lra.text", "huge")
    config = load("lra.listops")
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optimizer.learning_rat = 1.0  # locked: typos cannot add keys


def test_a_preset_cannot_add_a_misspelt_key():
    """A preset runs on the locked config: a typo in one (a user's new preset) added a key that
    nothing read, and the run used the value it meant to change (num_train_steps 200, not 3)."""
    from experiments.configs import common

    def short(c):
        c.num_train_step = 3

    with pytest.raises(AttributeError, match=r'"num_train_step".*"num_train_steps"'):
        common.finish(common.base_config("listops"), "short", {"short": short}, "x.py")
    for preset in ("transformer", "tiny_transformer"):  # the LM's add sinusoidal positions
        assert load("lm.wikitext103", preset).model.position_encoding is True


def test_mixer_settings_left_unset_take_integers_on_the_command_line():
    """``--config.model.mixer.expand_ratio=8`` (README's HGRN2 switch) and ``num_heads``: the
    fields HGRN leaves unset were None, a type the command line refuses to override."""
    from pathlib import Path

    from absl import flags
    from ml_collections import config_flags

    spec = Path(__file__).resolve().parents[1] / "experiments/configs/lra/listops.py"

    def parse(*overrides: str):
        argv = ["train", f"--config={spec}:tiny", *overrides]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
        values(argv)
        return values.config.model.mixer

    assert parse().expand_ratio is None  # HGRN: unset, as before
    mixer = parse("--config.model.mixer.kind=hgrn2", "--config.model.mixer.expand_ratio=8")
    assert (mixer.kind, mixer.expand_ratio) == ("hgrn2", 8)
    mixer = parse("--config.model.mixer.kind=attention", "--config.model.mixer.num_heads=2")
    assert (mixer.kind, mixer.num_heads) == ("attention", 2)  # HGRN2 refuses num_heads


REPO = Path(__file__).resolve().parents[1]
# Every config file with a get_config (the helpers common.py, hgrn2/lra.py and variants.py not).
CONFIG_FILES = sorted(
    str(p.relative_to(REPO))
    for p in REPO.glob("experiments/configs/*/*.py")
    if p.name not in ("__init__.py", "lra.py", "variants.py")
)


def documented_data_keys() -> list[str]:
    """The ``data.*`` keys of docs/data.md's table ("Every experiment config has the same data
    keys")."""
    keys = re.findall(r"^\| `data\.(\w+)` \|", (REPO / "docs/data.md").read_text(), re.M)
    assert keys, "docs/data.md lost its table of data keys"
    return keys


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_takes_the_documented_data_keys_on_the_command_line(path):
    """docs/data.md's data keys exist in every config, ``data.workers`` included (default 0;
    ImageNet's -1): ``--config.data.workers=2`` was an unknown key outside ImageNet."""
    from absl import flags
    from ml_collections import config_flags

    def parse(*overrides: str):
        argv = ["train", f"--config={REPO / path}", *overrides]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
        values(argv)
        return values.config

    config = parse()
    missing = [k for k in documented_data_keys() if k not in config.data]
    assert not missing, f"{path} lacks data keys docs/data.md lists: {missing}"
    assert config.data.workers == (-1 if config.task == "imagenet" else 0)
    assert parse("--config.data.workers=2").data.workers == 2


def test_pod_log_example_matches_the_listops_run():
    """docs/pods.md's example log is of the paper's ListOps run: its parameter count, steps and
    evaluation step are that config's (the count had been 11,850 against 66,250)."""
    text = (REPO / "docs/pods.md").read_text()
    config = load("lra.listops")
    params = re.search(r"^model: ([\d,]+) parameters", text, re.M)
    assert params and int(params[1].replace(",", "")) == paper_params("lra.listops")
    assert re.search(rf"^resuming from step \d+ of {config.num_train_steps} ", text, re.M)
    evaluated = re.search(r"^step (\d+): val loss", text, re.M)
    assert evaluated and int(evaluated[1]) % config.eval_every == 0


def every_config_and_preset() -> list[tuple[str, str | None]]:
    """(module under experiments.configs, preset) for every config file in experiments/configs
    and each of its presets (None: the paper's setting), the presets read from the error that
    names them."""
    found = []
    root = Path(__file__).parents[1] / "experiments" / "configs"
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        module = importlib.import_module(f"experiments.configs.{name}")
        if not hasattr(module, "get_config"):
            continue
        with pytest.raises(ValueError, match="choose one of: ") as error:
            module.get_config("no such preset")
        presets = re.search(r"choose one of: (.*?) \(", str(error.value)).group(1).split(", ")
        found += [(name, preset) for preset in [None, *presets]]
    return found


# The paper runs that train past their cosine's decay_steps (as the reference LRA trainer's
# do): docs/design.md 3.4's 50k / 500k schedules against 100 epochs of Image and Path-X, and
# HGRN2's Image (75 epochs at batch 64 on a 50k schedule).
RUNS_PAST_DECAY_STEPS = {("lra.image", None), ("lra.pathx", None), ("hgrn2.image", None)}
# The paper run that ends within its warmup (as the reference's does): HGRN2's Path-X, 200 epochs
# of 625 steps (batch 256) = 125,000 steps against run_lra's 150,000 warmup steps.
RUNS_WITHIN_WARMUP = {("hgrn2.pathx", None)}


def test_paper_and_preset_configs_give_no_run_length_warning_but_the_paper_s_own():
    """Unshrunk, no config departs from its epochs; the cosine past decay_steps is the paper's
    own (three runs), as is HGRN2's Path-X ending within its warmup, and no other config
    (ImageNet, the other HGRN2 rows, the tiny presets, the Transformer baselines) does either."""
    from hgrn_jax.training.config_checks import run_length_warnings

    configs = every_config_and_preset()
    assert len(configs) > 30 and ("lra.listops", "transformer") in configs
    past, within = set(), set()
    for name, preset in configs:
        lines = run_length_warnings(load(name, preset))
        for line in lines:
            if " runs past config.schedule.decay_steps=" in line:
                past.add((name, preset))
            else:
                assert " ends within config.schedule.warmup_steps=" in line, line
                within.add((name, preset))
        assert len(lines) <= 1
    assert past == RUNS_PAST_DECAY_STEPS and within == RUNS_WITHIN_WARMUP

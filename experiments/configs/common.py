"""Shared defaults and helpers of the experiment configs (one file per row of the paper's tables).

Each config file defines ``get_config(preset=None)``: no preset gives the paper's setting
(docs/design.md section 3.4), ``tiny`` a run that finishes in well under a minute on a 2-core CPU with
generated data, and any other name is an error listing the presets. The schema is the runner
contract's (``task``, ``seed``, ``model``, ``data``, ``batch_size``, ``num_train_steps``,
``epochs``, ``optimizer``, ``schedule``, ``eval_every``, ``checkpoint_every``, ``log_every``,
``keep_checkpoints``, ``mesh``, ``dtype``, ``paper``) plus ``eval_batch_size`` (0 = batch_size)
and ``label_smoothing``. The returned ConfigDict is locked: overriding a key that does not exist
fails at once. ``epochs`` records the recipe: the files derive ``num_train_steps`` (and the
evaluation's steps; ImageNet's schedule too, the LRA files keep the paper's schedule steps) from it
as they load, and the runner counts ``num_train_steps``, so ``experiments.train`` refuses
``--config.epochs`` without ``--config.num_train_steps`` and warns when ``num_train_steps`` is not
``epochs`` x (``data.train_examples`` // ``batch_size``)
(:func:`hgrn_jax.training.config_checks.run_length_warnings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections import config_dict

# Training-set sizes the reference trainers use; num_train_steps = epochs * (size // batch).
LRA_TRAIN_EXAMPLES = {
    "listops": 96_000,  # basic_train.tsv
    "text": 25_000,  # IMDB train (the test set serves as validation, as in LRA)
    "retrieval": 147_086,  # new_aan_pairs.train.tsv
    "image": 45_000,  # CIFAR-10 train minus 5,000 validation images
    "pathfinder": 160_000,  # 80% of the 200,000 curv_contour_length_14 images
    "pathx": 160_000,  # idem at 128 x 128
}

DATA_DEFAULTS = dict(
    lra_dir="",  # the LRA release (lra_release/): listops-1000/, tsv_data/, pathfinder*/
    tfds_dir="",  # tfds data_dir with prepared datasets (IMDB, CIFAR-10, ImageNet)
    manual_dir="",  # tfds manual_dir (ImageNet's tar files)
    wikitext_dir="",  # the WikiText-103 release (wiki.train.raw, ...)
    wikitext_release="raw",  # its files: raw (the paper's) or tokens (<unk> for rare words)
    tokenizer_path="",  # the LM's GPT-2 BPE files
    cache_dir="cache",  # generated data (ListOps TSV files) live here
    generator_seed=0,  # generated/synthetic data depend on this seed only
    skip_bad_rows=False,  # real data: skip (and report) malformed rows instead of failing
    workers=0,  # grain worker processes building training batches (0: in the training process)
)


def base_config(task: str) -> ml_collections.ConfigDict:
    """Keys every experiment shares, with neutral defaults the task files overwrite."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(DATA_DEFAULTS, source="release", seq_len=0))
    c.batch_size = 0
    c.eval_batch_size = 0
    c.num_train_steps = 0
    c.epochs = 0
    c.label_smoothing = 0.0
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            weight_decay_mask="all",
            grad_clip_norm=0.0,
            accumulate_steps=1,
        )
    )
    c.schedule = ml_collections.ConfigDict(
        dict(name="cosine", warmup_steps=0, decay_steps=0, min_lr=0.0)
    )
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.log_every = 50
    c.max_train_time_s = 0.0  # stop training after this much wall time (0: no limit)
    c.keep_checkpoints = 2
    c.resume = (
        "auto"  # on a changed config: "auto" refuses model/data/optimizer changes; see train.py
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
    c.dtype = "float32"  # activations: float32, bfloat16, or float16 (with dynamic loss scaling)
    c.paper = paper_numbers(task, metric="accuracy", value=0.0)
    return c


def paper_numbers(task: str, **numbers: Any) -> ml_collections.ConfigDict:
    """The ``paper`` section: the paper's ``numbers`` (``metric``, ``value``, ...; 0: not
    known) and the run they are of, ``task`` and ``mixer`` (the model's ``model.mixer.kind``,
    here HGRN's; :func:`use_attention` and the HGRN2 configs change it), so that a config file
    copied for another task or model does not quote them (``experiments.cli``)."""
    return ml_collections.ConfigDict(dict(numbers, task=task, mixer="hgrn"))


def hgrn_mixer(scan: str = "1d") -> ml_collections.ConfigDict:
    """The ``model.mixer`` of the paper's HGRN rows (:class:`hgrn_jax.nn.MixerConfig` fields).

    ``num_heads`` is None (only attention has heads), so that :func:`use_attention` runs can set
    it. The ablation switches (the paper's ablation rows flip ``complex_valued``, ``separate_phases``
    and ``use_forget_gate``) live here; ``use_lower_bound`` is a model field. ``expand_ratio`` is
    unset (None; HGRN has none), an integer placeholder so that
    ``--config.model.mixer.expand_ratio=8`` can set it for HGRN2 (a plain None cannot be
    overridden on the command line); ``num_heads`` likewise.
    """
    return ml_collections.ConfigDict(
        dict(
            kind="hgrn",
            layout="official",
            scan=scan,
            expand_ratio=config_dict.placeholder(int),
            complex_valued=True,
            separate_phases=True,
            use_forget_gate=True,
            method="auto",
            sequence_axis=config_dict.placeholder(str),
            num_heads=config_dict.placeholder(int),
        )
    )


def use_attention(c: ml_collections.ConfigDict) -> None:
    """Make ``c``'s model the same-size Transformer baseline: multi-head softmax attention in
    place of each HGRU (heads of 64 channels, at least one; ``model.mixer.num_heads`` sets
    them; causal in an LM), with sinusoidal positions and no lower bounds; everything else
    (width, depth, norms, GLU, pooling, optimizer, schedule) stays. The paper reports no run
    of this baseline, so its ``paper`` numbers are 0 (not known), not HGRN's."""
    c.model.mixer.kind = "attention"
    with c.unlocked():  # the LM's config has no position_encoding key (LMConfig's default: off)
        c.model.position_encoding = True
    c.model.use_lower_bound = False
    c.paper.mixer = "attention"
    for key in ("value", "val_value", "num_params"):
        if key in c.paper:
            c.paper[key] = type(c.paper[key])(0)


def with_transformer_presets(
    tiny: Callable[[ml_collections.ConfigDict], Any],
) -> dict[str, Callable[[ml_collections.ConfigDict], Any]]:
    """A task's presets: ``tiny``, and its Transformer baselines (:func:`use_attention`)
    ``transformer`` (the paper's setting) and ``tiny_transformer``."""
    return {
        "tiny": tiny,
        "transformer": use_attention,
        "tiny_transformer": lambda c: (tiny(c), use_attention(c)),
    }


def use_hgrn2(c: ml_collections.ConfigDict, expand_ratio: int) -> None:
    """Switch ``c.model.mixer`` to hgru2-pytorch's HGRN2 layer with heads of width
    ``expand_ratio`` (the HGRU-only switches stay at their defaults; HGRN2 refuses others)."""
    c.model.mixer.kind = "hgrn2"
    c.model.mixer.layout = "official"
    c.model.mixer.expand_ratio = expand_ratio


def lra_config(
    task: str,
    *,
    scan: str,
    layers: int,
    features: int,
    glu_expand: int,
    norm: str,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    dropout: float,
    warmup_steps: int,
    decay_steps: int,
    epochs: int,
    paper_accuracy: float,
    position_encoding: bool,
) -> ml_collections.ConfigDict:
    """An LRA row of docs/design.md 3.4: AdamW on all parameters, cosine with linear warmup, fp32,
    no clipping, mean pooling; ``num_train_steps`` = epochs over the reference's train set."""
    c = base_config(task)
    c.model = ml_collections.ConfigDict(
        dict(
            num_classes=10,
            features=features,
            num_layers=layers,
            glu_expand=glu_expand,
            mixer=hgrn_mixer(scan),
            norm=norm,
            batch_norm_groups=1,  # norm="batch" per slice of the batch (per GPU), 1: all of it
            dropout=dropout,
            position_encoding=position_encoding,
            position_dropout=0.1,
            remat=config_dict.placeholder(str),
            use_lower_bound=True,
        )
    )
    c.batch_size = batch_size
    steps_per_epoch = LRA_TRAIN_EXAMPLES[task] // batch_size
    c.epochs = epochs
    c.num_train_steps = epochs * steps_per_epoch
    c.optimizer.learning_rate = learning_rate
    c.optimizer.weight_decay = weight_decay
    c.schedule.warmup_steps = warmup_steps
    c.schedule.decay_steps = decay_steps
    c.eval_every = steps_per_epoch
    c.checkpoint_every = min(steps_per_epoch, 1000)
    c.log_every = 100
    c.paper.value = paper_accuracy
    return c


def tiny_schedule(
    c: ml_collections.ConfigDict,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int = 10,
) -> None:
    """Shrink the training length, batch and schedule for a seconds-long CPU run."""
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.num_train_steps = steps
    c.epochs = 0
    c.optimizer.learning_rate = learning_rate
    c.schedule.warmup_steps = warmup_steps
    c.schedule.decay_steps = steps
    c.eval_every = max(steps // 4, 1)
    c.checkpoint_every = max(steps // 4, 1)
    c.log_every = max(steps // 10, 1)
    c.mesh.data = -1


def finish(
    c: ml_collections.ConfigDict,
    preset: str | None,
    presets: dict[str, Callable[[ml_collections.ConfigDict], Any]],
    path: str,
) -> ml_collections.ConfigDict:
    """Lock the config, then apply ``presets[preset]`` (None = the paper's setting): a preset
    sets keys the config has, so a misspelt one is an error naming it, not a new key that
    nothing reads."""
    c.lock()
    if preset not in (None, ""):
        if preset not in presets:
            names = ", ".join(sorted(presets))
            raise ValueError(
                f"unknown preset {preset!r} for {path}; choose one of: {names} "
                f"(or none for the paper's setting, e.g. --config={path})"
            )
        presets[preset](c)
    return c


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def imagenet_config(
    *, features: int, paper_top1: float, paper_params: int
) -> ml_collections.ConfigDict:
    """An ImageNet-1k row: the paper's image model with DeiT's training recipe."""
    c = base_config("imagenet")
    c.model = ml_collections.ConfigDict(
        dict(
            num_classes=1000,
            image_size=(224, 224),
            patch_size=14,
            input_channels=3,
            features=features,
            num_layers=12,
            glu_expand=2,
            norm="layer",
            dropout=0.0,
            remat=config_dict.placeholder(str),
            mixer=hgrn_mixer("1d"),
            use_lower_bound=True,
        )
    )
    c.data.source = "tfds"
    c.data.image_size = 224
    c.data.seq_len = (224 // 14) ** 2
    c.data.train_examples = IMAGENET_TRAIN_EXAMPLES
    c.data.val_examples = 1_000  # generated stand-in (source="synthetic") only
    c.data.test_examples = 1_000
    c.data.augment = ml_collections.ConfigDict(
        dict(
            mixup=0.8,
            cutmix=1.0,
            mixup_switch_prob=0.5,
            mixup_group_size=128,
            randaugment="rand-m9-mstd0.5-inc1",
            random_erasing=0.25,
            color_jitter=0.4,
            interpolation="bicubic",
        )
    )
    c.data.workers = -1  # grain worker processes for ImageNet (-1: one per CPU; 0: threads)
    c.data.repeated_augmentation = 3  # im's main.py: repeated_aug=True (RASampler), 1: off
    c.batch_size = 2048
    c.epochs = 300
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // c.batch_size
    c.num_train_steps = c.epochs * steps_per_epoch
    c.label_smoothing = 0.1
    c.optimizer.learning_rate = 2e-3  # script_im.sh's lr 5e-4 x 2048 / 512 (main.py's scaling)
    c.optimizer.weight_decay = 0.05
    c.optimizer.weight_decay_mask = "timm"  # timm's create_optimizer: not biases, 1-D params
    c.optimizer.grad_clip_norm = 5.0
    c.schedule.name = "timm_cosine"  # timm's CosineLRScheduler, stepped per epoch by main.py
    c.schedule.steps_per_epoch = steps_per_epoch
    c.schedule.warmup_steps = 10 * steps_per_epoch  # script_im.sh: warmup_epochs=10
    c.schedule.decay_steps = c.num_train_steps  # timm's t_initial: --epochs 300
    c.schedule.warmup_lr = 1e-6  # main.py's --warmup-lr
    c.schedule.min_lr = 1e-5  # main.py's --min-lr
    c.eval_every = steps_per_epoch
    c.checkpoint_every = 1000
    c.log_every = 100
    # train_im.sh passes --fp32-resume: no autocast and no GradScaler (utils/engine.py).
    c.dtype = "float32"
    c.paper = paper_numbers(
        "imagenet", metric="accuracy", value=paper_top1, num_params=paper_params
    )
    return c


def imagenet_tiny(c: ml_collections.ConfigDict) -> None:
    """A 2-layer model on generated 28 x 28 colour images: 2 x 2 patches of 14, 10 classes.
    The paper's numbers are those of its two widths (192, 384), not of this one: none (0)."""
    c.model.num_classes = 0  # from the source: 10 generated colours, ImageNet's 1000 with tfds
    c.model.image_size = (28, 28)
    c.model.features = 32
    c.model.num_layers = 2
    c.data.source = "synthetic"
    c.data.image_size = 28
    c.data.seq_len = 4
    c.data.train_examples = 320  # epochs of 10 steps: the per-epoch schedule gets 12
    c.data.val_examples = 256
    c.data.test_examples = 256
    c.dtype = "float32"
    tiny_schedule(c, steps=120, batch_size=32, learning_rate=3e-3)
    c.schedule.steps_per_epoch = 10
    c.schedule.min_lr = 0.0
    c.data.augment.mixup_group_size = 2  # divides any per-host share of a small batch
    c.paper.value = 0.0
    c.paper.num_params = 0

"""LRA ListOps (docs/design.md 3.4): 1-D HGRN, 6 layers, d 32, sync BatchNorm, 2,048 tokens; 59.95%.

Presets: ``tiny`` (generated data, a minute on a CPU); ``transformer`` and ``tiny_transformer``
the same runs with softmax attention in place of the HGRU (``common.use_attention``), the
baseline of time-to-accuracy comparisons (``--config.max_train_time_s``, ``experiments.report
--x time``).

Data: ``source="release"`` reads the LRA release's ``basic_{train,val,test}.tsv`` from
``data.lra_dir`` (the ``listops-1000`` folder or its parent); ``source="generated"`` writes a set
of the same specification into ``data.cache_dir`` first (see :mod:`hgrn_jax.data.listops`).
"""

from experiments.configs import common
from hgrn_jax.data.listops import VOCAB_SIZE, ListOpsSpec

PATH = "experiments/configs/lra/listops.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "listops",
        scan="1d",
        layers=6,
        features=32,
        glu_expand=1,
        norm="sync_batch",
        batch_size=128,
        learning_rate=5e-4,
        weight_decay=0.01,
        dropout=0.0,
        warmup_steps=5_000,
        decay_steps=50_000,
        epochs=50,
        paper_accuracy=59.95,
        position_encoding=True,
    )
    c.model.encoder = "embed"
    c.model.vocab_size = VOCAB_SIZE  # the reference's vocabulary of the release: 18 ids
    c.data.source = "release"
    c.data.seq_len = 2048
    # The generator's specification (used with source="generated"): LRA's values.
    c.data.min_length = 500
    c.data.max_length = 2000
    c.data.max_depth = 10
    c.data.max_args = 10
    c.data.train_examples = 96_000
    c.data.val_examples = 2_000
    c.data.test_examples = 2_000
    return common.finish(c, preset, common.with_transformer_presets(_tiny), PATH)


def _tiny(c):
    c.model.num_layers = 2
    c.model.features = 32
    c.data.source = "generated"
    c.data.seq_len = 64
    spec = ListOpsSpec.tiny()  # what `python -m hgrn_jax.data.listops --spec=tiny` writes
    c.data.min_length = spec.min_length
    c.data.max_length = spec.max_length
    c.data.max_depth = spec.max_depth
    c.data.max_args = spec.max_args
    c.data.train_examples = spec.num_train
    c.data.val_examples = spec.num_val
    c.data.test_examples = spec.num_test
    common.tiny_schedule(c, steps=200, batch_size=32, learning_rate=3e-3)

"""LRA Retrieval (AAN pairs, DESIGN.md 3.4): 1-D HGRN, 2 layers, d 64, GLU x2, BN, 4,000 bytes
per document; 94.23%.

Token ids are bytes (1-255; 0 is padding). The release's ``tsv_data/new_aan_pairs.*.tsv`` (in
``data.lra_dir``) are read by ``hgrn_jax.training.real_data``; ``tiny`` uses generated pairs that
share a pattern or not.
"""

from experiments.configs import common

PATH = "experiments/configs/lra/retrieval.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "retrieval", mixer="1d", layers=2, features=64, glu_expand=2, norm="batch",
        batch_size=64, learning_rate=5e-3, weight_decay=0.0, dropout=0.0,
        warmup_steps=312, decay_steps=50_000, epochs=20, paper_accuracy=94.23,
        position_encoding=True)
    c.model.num_classes = 2
    c.model.encoder = "embed"
    c.model.vocab_size = 256
    c.model.dual = True
    c.data.source = "release"
    c.data.seq_len = 4000
    c.data.train_examples = 147_086
    c.data.val_examples = 1_000
    c.data.test_examples = 1_000
    return common.finish(c, preset, {"tiny": _tiny}, PATH)


def _tiny(c):
    c.model.features = 32
    c.data.source = "synthetic"
    c.data.seq_len = 64
    c.data.train_examples = 2_000
    c.data.val_examples = 256
    c.data.test_examples = 256
    common.tiny_schedule(c, steps=120, batch_size=32, learning_rate=3e-3)

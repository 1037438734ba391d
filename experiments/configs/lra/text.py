"""LRA Text (IMDB bytes, DESIGN.md 3.4): 1-D HGRN, 4 layers, d 128, sync BN, 4,096 bytes; 88.14%.

Token ids are the document's bytes (1-255; 0 is padding). The real data (tfds ``imdb_reviews`` in
``data.tfds_dir``) are read by ``hgrn_jax.training.real_data``; ``tiny`` uses generated documents.
"""

from experiments.configs import common

PATH = "experiments/configs/lra/text.py"


def get_config(preset: str | None = None):
    c = common.lra_config(
        "text", mixer="1d", layers=4, features=128, glu_expand=1, norm="sync_batch",
        batch_size=32, learning_rate=5e-3, weight_decay=0.0, dropout=0.1,
        warmup_steps=10_000, decay_steps=50_000, epochs=32, paper_accuracy=88.14,
        position_encoding=True)
    c.model.num_classes = 2
    c.model.encoder = "embed"
    c.model.vocab_size = 256
    c.data.source = "tfds"
    c.data.seq_len = 4096
    # Sizes of the generated stand-in (source="synthetic").
    c.data.train_examples = 25_000
    c.data.val_examples = 1_000
    c.data.test_examples = 1_000
    return common.finish(c, preset, {"tiny": _tiny}, PATH)


def _tiny(c):
    c.model.num_layers = 2
    c.model.features = 32
    c.model.dropout = 0.0
    c.data.source = "synthetic"
    c.data.seq_len = 128
    c.data.train_examples = 2_000
    c.data.val_examples = 256
    c.data.test_examples = 256
    common.tiny_schedule(c, steps=120, batch_size=32, learning_rate=3e-3)

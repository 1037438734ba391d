"""WikiText-103 language model (docs/design.md 3.4): 6 layers, d 512, 46.25M parameters; perplexity
24.14 (validation) / 24.82 (test).

fairseq's recipe: 512-token samples, 65,536 tokens per update (128 samples), 100k updates,
AdamW betas (0.9, 0.98) wd 0.2, lr 5e-4 with the inverse-sqrt schedule and 8k warmup, GPT-2 BPE
vocabulary of 50,264 entries, dropout 0.1, float32 (``OpenNLPLab/HGRN`` ``train_alm.sh``:
``--dropout 0.1`` and no ``--fp16``/``--bf16``; ``--config.dtype=bfloat16`` trains faster, off
the recipe). The release (``data.wikitext_dir``, GPT-2 BPE files at
``data.tokenizer_path``) is read by ``hgrn_jax.tasks``; ``tiny`` trains a byte-level
model on a generated arithmetic corpus. ``transformer`` and ``tiny_transformer``: the same runs
with causal softmax attention in place of the HGRU and sinusoidal positions
(``common.use_attention``), the same-size Transformer LM.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import common

PATH = "experiments/configs/lm/wikitext103.py"


def get_config(preset: str | None = None):
    c = common.base_config("wikitext103")
    mixer = common.hgrn_mixer("1d")
    del mixer["separate_phases"]  # causal: one direction
    c.model = ml_collections.ConfigDict(
        dict(
            vocab_size=50_264,
            features=512,
            num_layers=6,
            glu_expand=2,
            glu_activation="none",
            norm="layer",
            tie_embeddings=True,
            scale_embeddings=True,
            dropout=0.1,  # train_alm.sh: --dropout 0.1
            remat=config_dict.placeholder(str),
            mixer=mixer,
            use_lower_bound=True,
        )
    )  # GLU hidden 2 x 512 = 1024
    c.data.source = "release"
    c.data.seq_len = 512
    c.data.train_bytes = 1_000_000  # generated stand-in corpus (source="synthetic") only
    c.data.eval_bytes = 100_000
    c.batch_size = 128  # 128 x 512 = 65,536 tokens per update
    c.num_train_steps = 100_000
    c.epochs = 0  # the recipe counts updates, not epochs
    c.optimizer.b2 = 0.98
    c.optimizer.learning_rate = 5e-4
    c.optimizer.weight_decay = 0.2
    c.schedule.name = "inverse_sqrt"
    c.schedule.warmup_steps = 8_000
    c.schedule.decay_steps = 100_000
    c.eval_every = 5_000
    c.checkpoint_every = 1_000
    c.log_every = 100
    c.dtype = "float32"  # train_alm.sh passes neither --fp16 nor --bf16: fairseq trained in float32
    c.paper = common.paper_numbers(
        "wikitext103", metric="perplexity", value=24.82, val_value=24.14, num_params=46_250_000
    )
    return common.finish(c, preset, common.with_transformer_presets(_tiny), PATH)


def _tiny(c):
    c.model.vocab_size = 0  # from the data: 256 bytes here, the tokenizer's with source=release
    c.model.features = 32
    c.model.num_layers = 2
    c.model.dropout = 0.0
    c.data.source = "synthetic"
    c.data.seq_len = 64
    c.data.train_bytes = 200_000
    c.data.eval_bytes = 8_192
    c.dtype = "float32"
    common.tiny_schedule(c, steps=120, batch_size=16, learning_rate=3e-3)
    # Per-byte perplexity of a smaller model: not comparable with the paper's (per BPE token).
    c.paper.value = c.paper.val_value = 0.0
    c.paper.num_params = 0

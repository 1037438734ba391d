"""HGRN2 WikiText-103 language model (arXiv 2404.07904); sources in :mod:`experiments.configs.hgrn2`.

Training recipe from [script_lm] (``OpenNLPLab/HGRN2`` ``script_lm.sh``): 512-token samples, 128
per update (16 per device x update_freq 128 / 16 / gpus), 50k updates, inverse-sqrt schedule with
4k warmup from 1e-7, lr 5e-4, Adam betas (0.9, 0.98) with weight decay 0.1, gradient clip 1.0,
dropout 0.1, bf16, tied input/output embeddings (``--share-decoder-input-output-embed``).

Not found, assumed: the architecture of ``hgrn2_lm_outproduct_<e>`` (defined in
``OpenNLPLab/fairseq-evo``, not in the snapshot we could read). We keep the HGRN LM of
``lm/wikitext103.py`` (6 layers, d 512, bilinear GLU 1024, LayerNorm, scaled tied embeddings, the
fairseq lower-bound scheme) and replace its mixer by hgru2-pytorch's HGRN2 layer with
``expand_ratio`` 128 (the largest ``outproduct`` setting of the script's list and fla's default;
4 heads of 128 x 128 states). The paper's WikiText-103 perplexity could not be read, so
``paper.value`` is 0 (unknown). ``tiny`` is the HGRN tiny run with HGRN2 heads of width 8.
"""

from experiments.configs.hgrn2.variants import hgrn2_variant
from experiments.configs.lm import wikitext103 as hgrn

PATH = "experiments/configs/hgrn2/wikitext103.py"


def get_config(preset: str | None = None):
    return hgrn2_variant(
        hgrn,
        preset,
        PATH,
        expand_ratio=128,  # assumed (see the module docstring)
        tiny_expand_ratio=8,
        paper=_paper,
        paper_numbers={"value": 0.0, "val_value": 0.0, "num_params": 0},  # not found
    )


def _paper(c):
    c.model.dropout = 0.1  # --dropout 0.1
    c.num_train_steps = 50_000  # MAX_UPDATE=50000
    c.optimizer.b2 = 0.98  # --adam-betas '(0.9, 0.98)'
    c.optimizer.learning_rate = 5e-4  # LR=0.0005
    c.optimizer.weight_decay = 0.1  # decay=0.1
    c.optimizer.grad_clip_norm = 1.0  # CLIP_NORM=1.0
    c.schedule.name = "inverse_sqrt"  # --lr-scheduler inverse_sqrt
    c.schedule.warmup_steps = 4_000  # WARM_UP=4000
    c.schedule.decay_steps = 50_000
    c.batch_size = 128  # 128 x 512 = 65,536 tokens per update
    c.data.seq_len = 512  # TOKENS_PER_SAMPLE=512
    c.dtype = "bfloat16"  # --bf16

"""HGRN2 experiment configs (arXiv 2404.07904): the six LRA rows and WikiText-103.

Sources, cited per value in each file:

- [run_lra] ``OpenNLPLab/HGRN2`` ``run_lra.py`` at commit ``b154c396`` (the per-task dictionaries
  ``batches``, ``gpus``, ``d_model_dict``, ``n_layers_dict``, ``norm_dict``, ``lr_dict``,
  ``wd_dict``, ``dropout_dict``, ``warmup_steps_dict``, ``training_steps_dict``,
  ``expand_ratio_glu_dict``, ``expand_ratio_dict``, ``training_epochs_dict``, ``encoder_dict``,
  ``use_series_dict``, ``gradient_clip_dict``; Path-X is its ``pathfinderx``) and
  ``script_lra_others.sh`` (bf16, seed 2222, pool decoder). The total
  batch is ``batches[task]``; the script divides it over ``gpus[task]`` devices.
- [lra_fig] ``figures/lra.png`` of the same repo (the paper's LRA table): HGRN2 ListOps 60.52,
  Text 88.97, Retrieval 95.07, Image 89.33, Pathfinder 93.95, Path-X 98.12, average 87.66.
- [script_lm] ``script_lm.sh`` of the same repo (fairseq: 512-token samples, 16 per device,
  128 per update, 50k updates, 4k warmup, lr 5e-4, clip 1.0, weight decay 0.1, dropout 0.1,
  Adam betas (0.9, 0.98), inverse-sqrt schedule, bf16, tied input/output embeddings).

Not found: the LRA glue of the HGRN2 runs (``OpenNLPLab/lra`` branch ``release_torch2``, which
defines ``hgrn2_1d`` and the model-level ``encoder`` option) is not in the snapshot we could read,
so that ``hgrn2_1d`` is the bidirectional ``BiHgru2_1d`` and that ``encoder="position"`` means
sinusoidal positions (``"id"``: none) are inferences, from the release branch's encoder registry
(``"position"``: ``PositionalEncoder``, ``"id"``: identity) and from the HGRN1 runs. The HGRN2
WikiText-103 architectures (``hgrn2_lm_outproduct_*`` in ``OpenNLPLab/fairseq-evo``) and the
paper's WikiText-103 perplexity could not be read either. Path-X runs ``Hgru2_2d_series``
(``use_series=True``; our ``HGRN2DSeries``, ``mixer.scan="2d_series"``, checked by the golden case
``official_hgrn2_2d_series``); Image and Pathfinder use ``Hgru2_2d_parallel`` (our ``HGRN2D``,
checked by ``official_hgrn2_2d``). Which class ``use_series`` picks is, for want of the glue, read
from the names (hgru2-pytorch has exactly these two 2-D classes).
"""

"""HGRN2 on LRA Retrieval (arXiv 2404.07904); settings and sources in
:mod:`experiments.configs.hgrn2.lra` (``SETTINGS["retrieval"]``), data as in ``lra/retrieval.py``."""

from experiments.configs.hgrn2.lra import hgrn2_lra_config

PATH = "experiments/configs/hgrn2/retrieval.py"


def get_config(preset: str | None = None):
    return hgrn2_lra_config("retrieval", preset, PATH)

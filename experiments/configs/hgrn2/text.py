"""HGRN2 on LRA Text (arXiv 2404.07904); settings and sources in
:mod:`experiments.configs.hgrn2.lra` (``SETTINGS["text"]``), data as in ``lra/text.py``."""

from experiments.configs.hgrn2.lra import hgrn2_lra_config

PATH = "experiments/configs/hgrn2/text.py"


def get_config(preset: str | None = None):
    return hgrn2_lra_config("text", preset, PATH)

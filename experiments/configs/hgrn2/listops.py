"""HGRN2 on LRA ListOps (arXiv 2404.07904); settings and sources in
:mod:`experiments.configs.hgrn2.lra` (``SETTINGS["listops"]``), data as in ``lra/listops.py``."""

from experiments.configs.hgrn2.lra import hgrn2_lra_config

PATH = "experiments/configs/hgrn2/listops.py"


def get_config(preset: str | None = None):
    return hgrn2_lra_config("listops", preset, PATH)

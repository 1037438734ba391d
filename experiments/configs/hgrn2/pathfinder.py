"""HGRN2 on LRA Pathfinder (arXiv 2404.07904; 2-D, ``Hgru2_2d_parallel``); settings and sources in
:mod:`experiments.configs.hgrn2.lra` (``SETTINGS["pathfinder"]``), data as in ``lra/pathfinder.py``."""

from experiments.configs.hgrn2.lra import hgrn2_lra_config

PATH = "experiments/configs/hgrn2/pathfinder.py"


def get_config(preset: str | None = None):
    return hgrn2_lra_config("pathfinder", preset, PATH)

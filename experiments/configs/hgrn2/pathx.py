"""HGRN2 on LRA Path-X (arXiv 2404.07904; 2-D, ``Hgru2_2d_series``, our ``HGRN2DSeries``); settings
and sources in :mod:`experiments.configs.hgrn2.lra` (``SETTINGS["pathx"]``, run_lra.py's
``pathfinderx``), data as in ``lra/pathx.py`` (the release's ``pathfinder128`` images; ``tiny``:
generated 12 x 12 path images)."""

from experiments.configs.hgrn2.lra import hgrn2_lra_config

PATH = "experiments/configs/hgrn2/pathx.py"


def get_config(preset: str | None = None):
    return hgrn2_lra_config("pathx", preset, PATH)

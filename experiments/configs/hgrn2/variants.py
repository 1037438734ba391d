"""An HGRN2 config as a variant of the HGRN config of the same task (shared by the HGRN2 rows)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import ml_collections

from experiments.configs import common


def hgrn2_variant(
    hgrn: ModuleType,
    preset: str | None,
    path: str,
    *,
    expand_ratio: int,
    tiny_expand_ratio: int,
    paper: Callable[[ml_collections.ConfigDict], None],
    paper_numbers: dict[str, float],
) -> ml_collections.ConfigDict:
    """``hgrn.get_config(preset)`` (an HGRN config module) with HGRN2 mixers of head width
    ``expand_ratio``, then ``paper(c)`` applies the HGRN2 run's own settings; ``preset="tiny"``
    is the HGRN tiny run with heads of width ``tiny_expand_ratio`` and nothing else changed.
    Both carry HGRN2's ``paper_numbers`` (``c.paper`` fields; 0 = not known), not HGRN's."""
    if preset not in (None, ""):
        if preset != "tiny":
            raise ValueError(
                f"unknown preset {preset!r} for {path}; choose one of: tiny "
                f"(or none for the paper's setting, e.g. --config={path})"
            )
        c = hgrn.get_config("tiny")
        common.use_hgrn2(c, expand_ratio=tiny_expand_ratio)
    else:
        c = hgrn.get_config(None)
        common.use_hgrn2(c, expand_ratio=expand_ratio)
        paper(c)
    c.paper.update(dict(paper_numbers, mixer="hgrn2"))
    return c

"""Finding files of the Long Range Arena release, nested or not.

The release archive ``lra_release.gz`` unpacks to ``lra_release/`` and, depending on how it was
unpacked, sometimes to ``lra_release/lra_release/``. ``data.lra_dir`` may name the folder that
holds ``listops-1000/``, ``tsv_data/``, ``pathfinder32/`` ... or any of its nested parents.
"""

from __future__ import annotations

from pathlib import Path

from hgrn_jax.data.errors import DatasetMissingError

NESTINGS = (".", "lra_release", "lra_release/lra_release")


def candidate_roots(lra_dir: str | Path) -> list[Path]:
    """The folders searched for release files, most specific first."""
    base = Path(lra_dir)
    return [base / nesting if nesting != "." else base for nesting in NESTINGS]


def find_release_path(lra_dir: str | Path, relative: str, *, what: str) -> Path:
    """``<root>/<relative>`` for the first candidate root where it exists (file or folder).

    Raises :class:`DatasetMissingError` naming every place looked at and the config key.
    """
    if not str(lra_dir):
        raise DatasetMissingError(
            f"{what} needs the LRA release: download lra_release.gz (the Long Range Arena "
            f"repository's release), unpack it and set --config.data.lra_dir=FOLDER to the "
            f"folder that holds {relative.split('/')[0]}/"
        )
    tried = [root / relative for root in candidate_roots(lra_dir)]
    for path in tried:
        if path.exists():
            return path
    above = release_root_above(lra_dir, relative)
    if above is not None:
        raise DatasetMissingError(
            f"{what} not found in data.lra_dir={lra_dir}, which lies inside the release: "
            f"{above / relative} exists; set --config.data.lra_dir={above}"
        )
    raise DatasetMissingError(
        f"{what} not found: looked for {', '.join(str(p) for p in tried)}. Unpack the LRA "
        f"release (lra_release.gz) so that {relative} is inside data.lra_dir={lra_dir}, or set "
        f"--config.data.lra_dir to the folder that holds it"
    )


def release_root_above(lra_dir: str | Path, relative: str, levels: int = 3) -> Path | None:
    """The nearest of the ``levels`` parents of ``lra_dir`` that holds ``relative``: a
    ``lra_dir`` set to one task's folder of the release (``.../lra_release/listops-1000`` for
    Pathfinder), one level too deep."""
    for parent in list(Path(lra_dir).absolute().parents)[:levels]:
        if (parent / relative).exists():
            return parent
    return None

"""Command-line plumbing shared by ``experiments.train`` and ``experiments.prepare``: user errors
(a bad flag, config file or value; missing or malformed data) as one line on stderr with exit
code 2, instead of a traceback."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

EXIT_USAGE = 2
"""Exit code of a user error."""


def one_line(message: str) -> str:
    """``message`` with its lines joined by ``; ``."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: <message on one line>`` to stderr and exit with ``code``."""
    # In a multi-process run every process may fail; the index says which one spoke.
    who = f"process {os.environ['JAX_PROCESS_ID']}: " if os.environ.get("JAX_PROCESS_ID") else ""
    print(f"error: {who}{one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_config_file() -> None:
    """Stop with one line when the --config file does not exist."""
    path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    if not os.path.isfile(path):
        fail(
            f"config file {path} not found (--config={path}); pass "
            "--config=path/to/config.py[:PRESET], e.g. experiments/configs/lra/listops.py:tiny",
            EXIT_USAGE,
        )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config-override errors as one line naming the key."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        text = str(error)
        # A config file's own error (e.g. an unknown preset) is the useful part of absl's text.
        cause = next(
            (line.strip() for line in reversed(text.splitlines()) if "Error: " in line), None
        )
        fail(f"{cause or text} (pass --helpshort to see the flags)", EXIT_USAGE)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections reports an unknown --config.key as an AttributeError/KeyError whose
        # text is the quoted key, sometimes with a suggestion; make it one readable line.
        text = str(error.args[0] if error.args else error)
        text = " ".join(text.replace("\\n", "\n").split()).replace("\\'", "").replace("'", "")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        key = text.split()[0].strip('"') if text else ""
        text = text.strip('"')
        culprit = next((o for o in overrides if key and o.endswith("." + key)), None)
        culprit = culprit or next((o for o in overrides if key and key in o), "--config.?")
        if isinstance(error, (AttributeError, KeyError)):
            fail(
                f"unknown config key {culprit} ({text}); the keys are those of the config "
                "file (a previous run's config.json lists them)",
                EXIT_USAGE,
            )
        fail(f"bad value for {culprit}: {text}", EXIT_USAGE)
    return []

"""Continue a prompt with a trained language model::

    python -m experiments.generate --workdir=RUN --prompt_ids=1,2,3 --max_new_tokens=N \\
        [--prompt="text"] [--greedy | --temperature=T --top_k=K --top_p=P --seed=S] \\
        [--checkpoint=best|latest|STEP] [--tokenizer_path=PATH]

``RUN`` is the ``--workdir`` of an ``experiments.train`` run of a language model (WikiText-103),
finished or still training; its model is loaded by
:func:`hgrn_jax.training.load_trained_model` (default: the best validation checkpoint) and
continued by :func:`hgrn_jax.nn.generate` (``--greedy``: argmax, which refuses the sampling
flags; otherwise sampling with ``--temperature``, ``--top_k``, ``--top_p`` from
``jax.random.key(--seed)``).

Output: one line with the token ids, comma-separated (the prompt's, then the new ones); where
the run's data have a tokenizer (``data.tokenizer_path`` of its config.json: GPT-2's files, or
``bytes``), their decoded text after it (from the next line on). ``--prompt`` (text, instead of
``--prompt_ids``) needs that tokenizer; ``--tokenizer_path`` points at it where it has moved since
(a relative ``data.tokenizer_path`` is read from the current folder), and
``--tokenizer_path=bytes`` reads and writes UTF-8 bytes as the ids 0-255, for a run trained on
bytes whose config.json names no tokenizer (the synthetic byte corpus, a vocabulary of 256).
Standard error names the checkpoint's step (``generated with the checkpoint at step 4 of RUN
(--checkpoint=best)``).

User errors (a bad flag, a folder that is not a run, a run that is not a language model, a
checkpoint that cannot be loaded) print one line naming the file or value and the fix, exit code
2 (as ``experiments.train``); ``--traceback`` shows the full traceback instead.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags

from experiments import cli


def define_flags() -> None:
    """The command's flags (defined when it runs, so that tests may import this module beside
    experiments.train and experiments.prepare, which define some of the same names)."""
    flags.DEFINE_string("workdir", None, "Run folder of an experiments.train LM run.")
    flags.DEFINE_string("prompt_ids", None, "Prompt token ids, e.g. 1,2,3.")
    flags.DEFINE_string("prompt", None, "Prompt text (needs the run's tokenizer).")
    flags.DEFINE_string(
        "tokenizer_path",
        None,
        "The run's tokenizer, where it no longer is at data.tokenizer_path of its config.json "
        "(a tokenizer.json), or 'bytes' for a run trained on bytes (e.g. the synthetic corpus, "
        "whose config.json names no tokenizer).",
    )
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to add to the prompt.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
    flags.DEFINE_integer("top_k", None, "Sample from the k most probable tokens.")
    flags.DEFINE_float("top_p", None, "Nucleus sampling probability, in (0, 1].")
    flags.DEFINE_bool(
        "greedy", False, "Argmax decoding (without --temperature, --top_k and --top_p)."
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed: jax.random.key(seed).")
    flags.DEFINE_string(
        "checkpoint", "best", "Which checkpoint: best (validation), latest, or a step number."
    )
    flags.DEFINE_bool(
        "traceback", False, "Show full tracebacks instead of one-line error messages."
    )
    flags.mark_flags_as_required(["workdir", "max_new_tokens"])


def parse_ids(text: str) -> list[int]:
    """``"1, 2,3"`` -> ``[1, 2, 3]``; ValueError naming ``--prompt_ids`` otherwise."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise ValueError(
            f"--prompt_ids={text!r} is not a list of token ids; pass whole numbers >= 0 "
            "separated by commas, e.g. --prompt_ids=1,2,3"
        )
    return ids


def tokenizer_of(config, workdir: str, tokenizer_path: str | None = None):
    """The run's tokenizer (:class:`hgrn_jax.data.wikitext.LineTokenizer`) at ``tokenizer_path``
    (``--tokenizer_path``) or else at its config's ``data.tokenizer_path``; None when neither
    names one (e.g. the synthetic source). ValueError naming the path and ``--tokenizer_path``
    when no tokenizer loads from there."""
    data = config.get("data", None)
    saved = str(data.get("tokenizer_path", "") or "") if hasattr(data, "get") else ""
    path = tokenizer_path or saved
    if not path:
        return None
    from hgrn_jax.data import errors, wikitext

    try:
        return wikitext.LineTokenizer(path)
    except (errors.DatasetMissingError, errors.BadDataError) as error:
        where = (
            f"--tokenizer_path={path!r}"
            if tokenizer_path
            else f"data.tokenizer_path={path!r} of {Path(workdir) / 'config.json'}"
        )
        if not isinstance(error, errors.DatasetMissingError):
            # What is wrong with the files (not loadable, or losing text), without the key.
            why = (
                str(error)
                .split(": ", 1)[-1]
                .replace(
                    "--config.data.tokenizer_path=",
                    "--tokenizer_path=",  # this command's flag
                )
            )
        elif Path(path).is_absolute():
            why = "no tokenizer is there"
        else:
            why = f"no tokenizer is there (a relative path, read from the current folder {Path.cwd()})"
        raise ValueError(
            f"the run's tokenizer does not load from {where}: {why}; pass the tokenizer the run "
            "was trained with, e.g. --tokenizer_path=/path/to/tokenizer.json"
        ) from None


def check_flags(
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    vocab_size: int | None = None,
    prompt_ids: list[int] | None = None,
) -> None:
    """ValueError naming the flag and its fix for a value :func:`hgrn_jax.nn.generate` refuses
    (the vocabulary's bounds once the model, of ``vocab_size`` tokens, is loaded)."""
    if max_new_tokens < 0:
        raise ValueError(
            f"--max_new_tokens={max_new_tokens} is negative; pass a count >= 0 (0 prints the "
            "prompt)"
        )
    if greedy:
        from hgrn_jax.nn.generate import options_greedy_ignores

        ignored = options_greedy_ignores(temperature, top_k, top_p)
        given = [f"--{name}={value}" for name, value in ignored]
        if given:
            raise ValueError(
                f"--greedy takes the argmax and would ignore {' '.join(given)}; leave "
                f"{'them' if len(given) > 1 else 'it'} out, or drop --greedy to sample"
            )
    if not greedy and not 0 < np.float32(temperature) < np.inf:
        raise ValueError(
            f"--temperature={temperature} is not a finite number > 0; pass a positive "
            "temperature (1 samples the model's distribution), or --greedy for argmax decoding"
        )
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(
            f"--top_p={top_p} is outside (0, 1]; pass e.g. --top_p=0.9, or leave it out to "
            "sample from every token"
        )
    if top_k is not None and (top_k < 1 or (vocab_size and top_k > vocab_size)):
        most = f" and <= {vocab_size} (the run's vocabulary)" if vocab_size else ""
        raise ValueError(
            f"--top_k={top_k} is out of range; pass a count >= 1{most}, or leave it out to "
            "sample from every token"
        )
    if vocab_size and prompt_ids and max(prompt_ids) >= vocab_size:
        raise ValueError(
            f"prompt token id {max(prompt_ids)} is outside the run's vocabulary [0, "
            f"{vocab_size}); pass --prompt_ids below {vocab_size}, or --prompt with text"
        )


class Continuation(NamedTuple):
    """What :func:`continue_prompt` gives back."""

    ids: list[int]
    """The prompt's token ids, then the new ones."""
    text: str | None
    """Their decoding, where the run has a tokenizer."""
    step: int
    """The step of the checkpoint that generated them (which one ``best`` or ``latest`` named)."""


def continue_prompt(
    workdir: str,
    *,
    prompt_ids: list[int] | None,
    prompt: str | None,
    max_new_tokens: int,
    checkpoint: str = "best",
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer_path: str | None = None,
) -> Continuation:
    """The prompt and its ``max_new_tokens`` new tokens (ids), their text where the run has a
    tokenizer (else None) and the checkpoint's step (:class:`Continuation`). Exactly one of
    ``prompt_ids`` and ``prompt`` (text) is given; ``tokenizer_path`` stands in for the run's
    ``data.tokenizer_path``.
    ValueError / FileNotFoundError with a one-line message for what the user can mend."""
    import jax

    from hgrn_jax.nn import generate
    from hgrn_jax.nn.generate import is_language_model
    from hgrn_jax.training import load_trained_model
    from hgrn_jax.training.trained import read_config

    if (prompt_ids is None) == (prompt is None):
        given = "both" if prompt is not None else "neither"
        raise ValueError(
            f"{given} of --prompt_ids and --prompt given; pass one prompt: --prompt_ids=1,2,3 "
            "or --prompt='text'"
        )
    check_flags(max_new_tokens, greedy, temperature, top_k, top_p)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"--seed={seed} is outside the 64-bit integers; pass e.g. --seed=0")
    config = read_config(workdir)
    tokenizer = tokenizer_of(config, workdir, tokenizer_path) if prompt is not None else None
    if prompt is not None and tokenizer is not None:
        prompt_ids = tokenizer.encode(prompt)
        if not prompt_ids:
            raise ValueError("--prompt='' has no tokens; pass some text or --prompt_ids")
    model, config, step = load_trained_model(workdir, checkpoint, return_step=True)
    if not is_language_model(model):
        raise ValueError(
            f"{workdir} is a run of task {config.task!r}, whose {type(model).__name__} is no "
            "language model; experiments.generate continues the prompts of LM runs (e.g. "
            "experiments/configs/lm/wikitext103.py); load this one with "
            "hgrn_jax.training.load_trained_model"
        )
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if prompt is not None and tokenizer is None:  # after the model, whose vocabulary may tell
        from hgrn_jax.data.wikitext import BYTES

        bytes_hint = (
            f" or, as its model has the {vocab_size} tokens of bytes, pass "
            f"--tokenizer_path={BYTES} if it was trained on bytes (e.g. the synthetic corpus)"
            if vocab_size == 256
            else ""
        )
        raise ValueError(
            f"--prompt needs a tokenizer and the run in {workdir} has none (its config.json "
            "sets no data.tokenizer_path); pass the prompt as token ids with --prompt_ids"
            + bytes_hint
        )
    check_flags(max_new_tokens, greedy, temperature, top_k, top_p, vocab_size, prompt_ids)
    if tokenizer is not None and (problem := _bytes_mismatch(tokenizer, vocab_size)):
        raise ValueError(f"{problem}, or the prompt as --prompt_ids")
    if tokenizer is not None and vocab_size and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer at {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the "
            f"run's model ({vocab_size}); pass the tokenizer the run was trained with as "
            "--tokenizer_path"
        )
    out = generate(
        model,
        np.asarray([prompt_ids], np.int32),
        max_new_tokens,
        rng=jax.random.key(seed),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        greedy=greedy,
    )
    ids = [int(i) for i in np.asarray(out)[0]]
    if tokenizer is None:
        try:
            tokenizer = tokenizer_of(config, workdir, tokenizer_path)
        except (ValueError, OSError) as error:  # ids without their text still answer
            print(f"warning: no decoded text: {cli.one_line(str(error))}", file=sys.stderr)
        else:
            if tokenizer is not None and (problem := _bytes_mismatch(tokenizer, vocab_size)):
                print(f"warning: no decoded text: {problem}", file=sys.stderr)
                tokenizer = None
            elif tokenizer is None and vocab_size == 256:
                print(
                    "note: no decoded text: the run names no tokenizer; if it was trained on "
                    "bytes (the synthetic corpus), --tokenizer_path=bytes decodes them",
                    file=sys.stderr,
                )
    return Continuation(ids, tokenizer.decode(ids) if tokenizer is not None else None, step)


def _bytes_mismatch(tokenizer: Any, vocab_size: int | None) -> str | None:
    """Why the byte tokenizer cannot stand for a model of ``vocab_size`` tokens, else None: it
    reads and writes 256 byte values (a BPE model's prompt was fed as bytes, and its ids from
    256 up failed to decode, losing the generated ids)."""
    from hgrn_jax.data.wikitext import BYTES

    if tokenizer.path != BYTES or not vocab_size or vocab_size == 256:
        return None
    return (
        f"--tokenizer_path={BYTES} reads and writes the 256 byte values, but the run's model has "
        f"{vocab_size} tokens (it was trained with another tokenizer); pass that one as "
        "--tokenizer_path"
    )


def as_flags(message: str) -> str:
    """A message of :func:`~hgrn_jax.training.load_trained_model`, whose fixes name its Python
    argument (``checkpoint='latest'``, ``checkpoint=STEP``), with this command's flag instead
    (``--checkpoint=latest``)."""
    return re.sub(r"(?<![\w-])checkpoint='?(\w+)'?", r"--checkpoint=\1", message)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options look like --max_new_tokens=32")
    if not flags.FLAGS["verbosity"].present:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs its reads at INFO
    from hgrn_jax.training.checkpoint import CheckpointError

    given = flags.FLAGS
    try:
        prompt_ids = parse_ids(given.prompt_ids) if given.prompt_ids is not None else None
        ids, text, step = continue_prompt(
            given.workdir,
            prompt_ids=prompt_ids,
            prompt=given.prompt,
            max_new_tokens=given.max_new_tokens,
            checkpoint=given.checkpoint,
            greedy=given.greedy,
            temperature=given.temperature,
            top_k=given.top_k,
            top_p=given.top_p,
            seed=given.seed,
            tokenizer_path=given.tokenizer_path,
        )
    except (ValueError, OSError, KeyError, CheckpointError) as error:
        if given.traceback:
            raise
        cli.fail(
            f"{type(error).__name__}: {as_flags(str(error))} (rerun with --traceback for details)"
        )
    print(
        f"generated with the checkpoint at step {step} of {given.workdir} "
        f"(--checkpoint={given.checkpoint})",
        file=sys.stderr,
    )
    print(",".join(map(str, ids)))
    if text is not None:
        print(text)


def run() -> None:
    cli.show_warnings_on_one_line()
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()

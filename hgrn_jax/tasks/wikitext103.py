"""WikiText-103 language modelling: next-token prediction on blocks of ``seq_len + 1`` tokens.

=============  =================================================================  ==============
source         data                                                               reads
=============  =================================================================  ==============
``release``    ``wiki.{train,valid,test}.raw`` in ``data.wikitext_dir``           ``wikitext_dir``
               (``.tokens`` with ``data.wikitext_release=tokens``),
               GPT-2 BPE files (or ``bytes``) at ``data.tokenizer_path``           ``tokenizer_path``
               (prepared tfds data when in ``data.tfds_dir``)                     ``tfds_dir``
``prepared``   the tfds dataset ``wikitext103`` (``{gpt2,bytes}_block<L>``,        ``tfds_dir``
               ``_tokens`` with ``data.wikitext_release=tokens``)
``synthetic``  a generated arithmetic corpus of bytes                             (none)
=============  =================================================================  ==============

``model.vocab_size`` 0 takes the tokenizer's vocabulary (256 for the synthetic bytes). The
validation and test perplexities (of every source) score every token of the split once, as
fairseq's (:func:`hgrn_jax.data.wikitext.eval_blocks`): exp(total NLL / N) over its N tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hgrn_jax.data import synthetic, wikitext
from hgrn_jax.tasks import models
from hgrn_jax.tasks.array_task import ArrayTask
from hgrn_jax.tasks.dataset_entry import Dataset
from hgrn_jax.tasks.losses import next_token_loss
from hgrn_jax.tasks.model_settings import mode
from hgrn_jax.tasks.prepared_tfds import PreparedTfds, ReleaseOrPrepared, TfdsRelease


class LanguageModelTask(ArrayTask):
    """Next-token prediction on windows of ``seq_len + 1`` tokens (``ids``): the model reads
    ``ids[:, :-1]`` and predicts ``ids[:, 1:]``, of which the first ``num_targets`` count.

    Examples: ``ids`` (M, seq_len + 1) and, optionally, ``num_targets`` (M,), the scored targets
    of each row (evaluation's last, shorter block); without it every target counts. Batches:
    ``ids`` (B, seq_len + 1) int32, ``num_targets`` (B,) int32 and ``weight`` (B,).
    """

    metric = "perplexity"
    model_kind = models.LM
    columns = ("ids",)
    token_columns = ("ids",)
    label_smoothing = False  # the perplexity is of the plain next-token cross-entropy

    def _batch(self, examples, rows):
        ids = np.asarray(examples["ids"][rows]).astype(np.int32)
        scored = examples.get("num_targets")
        if scored is None:
            num_targets = np.full(len(ids), ids.shape[1] - 1, np.int32)
        else:
            num_targets = np.asarray(scored[rows]).astype(np.int32)
        return {"ids": ids, "num_targets": num_targets}

    def loss_fn(self, model, batch, *, train):
        ids = batch["ids"]
        targets = ids[:, 1:]
        logits = mode(model, train)(ids[:, :-1])
        scored = jnp.arange(targets.shape[1])[None, :] < batch["num_targets"][:, None]
        weight = batch["weight"][:, None] * scored
        return next_token_loss(logits, targets, weight)


class WikiTextRelease(LanguageModelTask):
    """The release's text files (``data.wikitext_release``), tokenised once into
    ``data.cache_dir``: training blocks (:func:`~hgrn_jax.data.wikitext.blocks`) for ``train``,
    blocks scoring every token (:func:`~hgrn_jax.data.wikitext.eval_blocks`) for ``val`` and
    ``test``."""

    reads = frozenset({"wikitext_dir", "tokenizer_path", "tfds_dir", "wikitext_release"})

    def _check_source(self) -> None:
        data = self.config.data
        wikitext.find_files(data.wikitext_dir, release(self.config))
        tokenizer = wikitext.LineTokenizer(data.tokenizer_path)
        if not self.config.model.vocab_size:
            self.config.model.vocab_size = tokenizer.vocab_size
        if tokenizer.vocab_size > self.config.model.vocab_size:
            raise ValueError(
                f"config.model.vocab_size {self.config.model.vocab_size} is smaller "
                f"than the tokenizer's vocabulary ({tokenizer.vocab_size}); set "
                f"--config.model.vocab_size={tokenizer.vocab_size} or larger"
            )

    def _load(self, split):
        data = self.config.data
        tokens, tokenizer = wikitext.load_tokens(
            split,
            wikitext_dir=data.wikitext_dir,
            tokenizer_path=data.tokenizer_path,
            cache_dir=data.cache_dir,
            release=release(self.config),
        )
        path = wikitext.find_file(data.wikitext_dir, split, release(self.config))
        where = f"the {split} split ({path})"
        if split == "train":
            return {"ids": wikitext.blocks(tokens, int(data.seq_len), where)}
        return wikitext.eval_blocks(tokens, int(data.seq_len), tokenizer.eos_id, where)


def release(config) -> str:
    """``config.data.wikitext_release`` (``raw`` where a config predates the key)."""
    return str(config.data.get("wikitext_release", wikitext.DEFAULT_RELEASE))


TFDS = TfdsRelease(
    "wikitext103",
    "wikitext_dir",
    lambda config: {
        "seq_len": int(config.data.seq_len),
        "tokenizer_path": str(config.data.tokenizer_path),
        **(
            {}
            if release(config) == wikitext.DEFAULT_RELEASE
            else {"wikitext_release": release(config)}
        ),
    },
    "experiments/configs/lm/wikitext103.py",
)


class WikiTextPrepared(PreparedTfds, LanguageModelTask):
    """The tfds dataset ``wikitext103`` (``{gpt2,bytes}_block<seq_len>``)."""

    tfds_release = TFDS
    reads = frozenset({"tfds_dir", "wikitext_dir", "tokenizer_path", "wikitext_release"})


SYNTHETIC_EOS = ord("\n")  # the bytes tokenizer's end of line, which ends each generated sum


class WikiTextSynthetic(LanguageModelTask):
    """A generated arithmetic corpus of bytes (``data.train_bytes`` / ``data.eval_bytes``):
    training blocks of ``seq_len + 1`` bytes for ``train``; for ``val`` and ``test`` blocks
    scoring every byte of the corpus once, as the release's (:func:`~hgrn_jax.data.wikitext.
    eval_blocks`, the first block starting at an end of line)."""

    @classmethod
    def derive(cls, config):
        config = super().derive(config)
        if not config.model.vocab_size:
            config.model.vocab_size = 256
        return config

    def _load(self, split):
        data = self.config.data
        size = data.train_bytes if split == "train" else data.eval_bytes
        corpus = synthetic.arithmetic_corpus(int(size), seed=self._split_seed(split))
        if corpus.max() >= self.config.model.vocab_size:
            raise ValueError(
                f"config.model.vocab_size {self.config.model.vocab_size} is too "
                "small for a byte corpus; use 256"
            )
        t = int(data.seq_len)
        if split != "train":
            where = f"the generated {split} corpus (data.eval_bytes={size})"
            return wikitext.eval_blocks(corpus, t, SYNTHETIC_EOS, where)
        num = (len(corpus) - 1) // t
        if num < 1:
            raise ValueError(
                f"the {split} corpus ({len(corpus)} tokens) is shorter than "
                f"data.seq_len + 1 = {t + 1}"
            )
        windows = np.lib.stride_tricks.sliding_window_view(corpus, t + 1)[::t][:num]
        return {"ids": np.ascontiguousarray(windows)}


DATASET = Dataset(
    "wikitext103",
    models.LM,
    sources={
        "release": ReleaseOrPrepared(WikiTextRelease, WikiTextPrepared),
        "prepared": WikiTextPrepared,
        "synthetic": WikiTextSynthetic,
    },
    tfds=TFDS,
)

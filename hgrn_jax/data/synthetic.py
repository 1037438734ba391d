"""Small generated datasets for the ``tiny`` presets of the families that need downloads.

These are placeholders, not the paper's data: they let every model family (LRA 1-D, LRA 2-D,
Retrieval, ImageNet, the LM) run end to end in seconds on a CPU with nothing to download. Each
keeps the *shape* of its real counterpart (byte documents, pixel grids, document pairs, RGB
images cut into 14x14 patches, a byte corpus) and has labels a model can learn. The real input
pipelines (IMDB, AAN, CIFAR-10, Pathfinder, ImageNet, WikiText-103) live in the other modules
of this package.

Every function is a pure function of its arguments: the same ``seed`` gives the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Anything np.random.default_rng accepts as a seed: an int or a sequence of ints.
Seed = int | Sequence[int]

# ----------------------------------------------------------------------------- 2-D pixel tasks


def bright_quadrant_images(
    num: int, *, size: int = 8, channels: int = 3, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images in which one quadrant is brighter; the label is that quadrant.

    A stand-in for LRA Image (CIFAR-10 pixels). Returns images (num, size, size, channels)
    float32 in [0, 1] and labels (num,) int32 in 0..3 (top-left, top-right, bottom-left,
    bottom-right).
    """
    if size % 2:
        raise ValueError(f"size must be even; got {size}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, num).astype(np.int32)
    images = rng.uniform(0.0, 0.6, (num, size, size, channels))
    half = size // 2
    for i, quadrant in enumerate(labels):
        r, c = divmod(int(quadrant), 2)
        images[i, r * half : (r + 1) * half, c * half : (c + 1) * half] += 0.4
    return images.clip(0.0, 1.0).astype(np.float32), labels


_STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def _walk(
    rng: np.random.Generator, size: int, start: tuple[int, int], length: int, blocked: np.ndarray
) -> list[tuple[int, int]] | None:
    """A random self-avoiding walk of ``length`` cells from ``start`` avoiding ``blocked``."""
    path = [start]
    seen = {start}
    for _ in range(length - 1):
        r, c = path[-1]
        options = [
            (r + dr, c + dc)
            for dr, dc in _STEPS
            if 0 <= r + dr < size
            and 0 <= c + dc < size
            and (r + dr, c + dc) not in seen
            and not blocked[r + dr, c + dc]
        ]
        if not options:
            return None
        nxt = options[rng.integers(len(options))]
        path.append(nxt)
        seen.add(nxt)
    return path


def _grown(cells: list[tuple[int, int]], size: int) -> np.ndarray:
    """Mask of ``cells`` and their 4-neighbours."""
    mask = np.zeros((size, size), bool)
    for r, c in cells:
        mask[max(r - 1, 0) : r + 2, c] = True
        mask[r, max(c - 1, 0) : c + 2] = True
    return mask


def path_images(
    num: int, *, size: int = 16, path_length: int = 12, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """Pathfinder-like grids: are the two bright endpoints joined by one drawn path?

    Positive (label 1): one self-avoiding walk of ``2 * path_length`` cells whose two ends are
    marked. Negative (label 0): two walks of ``path_length`` cells that never touch (not even
    side by side), each with one end marked. Both classes light the same number of pixels.
    Returns images (num, size, size, 1) float32 (background 0, path 0.5, endpoints 1) and labels
    (num,) int32.
    """
    if 2 * path_length > size * size // 2:
        raise ValueError(f"path_length {path_length} is too long for a {size}x{size} grid")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num).astype(np.int32)
    images = np.zeros((num, size, size, 1), np.float32)
    for i, label in enumerate(labels):
        while True:
            free = np.zeros((size, size), bool)
            start = tuple(int(v) for v in rng.integers(0, size, 2))
            if label == 1:
                path = _walk(rng, size, start, 2 * path_length, free)
                if path is None:
                    continue
                cells, ends = path, (path[0], path[-1])
            else:
                first = _walk(rng, size, start, path_length, free)
                if first is None:
                    continue
                blocked = _grown(first, size)
                candidates = np.argwhere(~blocked)
                if not len(candidates):
                    continue
                start2 = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
                second = _walk(rng, size, start2, path_length, blocked)
                if second is None:
                    continue
                cells, ends = first + second, (first[-1], second[-1])
            for r, c in cells:
                images[i, r, c, 0] = 0.5
            for r, c in ends:
                images[i, r, c, 0] = 1.0
            break
    return images, labels


def colour_images(
    num: int, *, size: int = 28, num_classes: int = 10, seed: Seed
) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet-like RGB images whose class is the colour of a random rectangle on noise.

    Class k has hue k / num_classes. ``size`` 28 with patch 14 gives 2x2 = 4 patches. Returns
    images (num, size, size, 3) float32 in [0, 1] and labels (num,) int32 in [0, num_classes).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num).astype(np.int32)
    hues = np.arange(num_classes) / num_classes
    # HSV -> RGB at full saturation and value: each channel is a triangle wave of the hue.
    phase = (hues[:, None] + np.array([0.0, 2 / 3, 1 / 3])[None]) % 1.0
    palette = np.clip(np.abs(phase * 6 - 3) - 1, 0, 1)
    images = rng.uniform(0.0, 0.3, (num, size, size, 3))
    for i, label in enumerate(labels):
        h, w = rng.integers(size // 2, size + 1, 2)
        r, c = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        shade = rng.uniform(0.7, 1.0)
        patch = images[i, r : r + h, c : c + w]
        images[i, r : r + h, c : c + w] = 0.7 * shade * palette[label] + 0.3 * patch
    return images.astype(np.float32), labels


# ----------------------------------------------------------------------------- byte documents

_NEUTRAL = (
    "the",
    "a",
    "film",
    "story",
    "actor",
    "scene",
    "plot",
    "it",
    "was",
    "and",
    "of",
    "this",
    "movie",
    "with",
    "music",
    "end",
)
_POSITIVE = ("great", "superb", "moving", "brilliant", "fun")
_NEGATIVE = ("dull", "awful", "boring", "weak", "messy")


def keyword_documents(
    num: int, *, max_bytes: int = 128, seed: Seed
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IMDB-like byte documents; label 1 when positive words outnumber negative ones.

    Words are drawn from a neutral list with a few positive and negative words mixed in (never
    as many of each). Returns bytes (num, max_bytes) uint8 (ASCII, 0-padded), lengths (num,)
    int32 and labels (num,) int32 in {0, 1}.
    """
    rng = np.random.default_rng(seed)
    docs = np.zeros((num, max_bytes), np.uint8)
    lengths = np.zeros(num, np.int32)
    labels = rng.integers(0, 2, num).astype(np.int32)
    for i, label in enumerate(labels):
        num_major = int(rng.integers(2, 5))
        num_minor = int(rng.integers(0, num_major))
        major, minor = (_POSITIVE, _NEGATIVE) if label else (_NEGATIVE, _POSITIVE)
        words = [str(rng.choice(major)) for _ in range(num_major)]
        words += [str(rng.choice(minor)) for _ in range(num_minor)]
        words += [str(rng.choice(_NEUTRAL)) for _ in range(int(rng.integers(8, 20)))]
        order = rng.permutation(len(words))
        text = " ".join(words[j] for j in order).encode("ascii")
        # Keep whole words: every sentiment word must survive truncation.
        while len(text) > max_bytes:
            neutral = [k for k, j in enumerate(order) if j >= num_major + num_minor]
            if not neutral:
                raise ValueError(f"max_bytes {max_bytes} is too short for keyword documents")
            order = np.delete(order, neutral[-1])
            text = " ".join(words[j] for j in order).encode("ascii")
        docs[i, : len(text)] = np.frombuffer(text, np.uint8)
        lengths[i] = len(text)
    return docs, lengths, labels


def _has_common_ngram(a: bytes, b: bytes, n: int) -> bool:
    grams = {a[k : k + n] for k in range(len(a) - n + 1)}
    return any(b[k : k + n] in grams for k in range(len(b) - n + 1))


def pattern_pair_documents(
    num: int, *, length: int = 64, pattern_length: int = 5, alphabet_size: int = 16, seed: Seed
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Retrieval-like pairs of byte strings; label 1 when both contain the same pattern.

    Each document is ``length`` random letters from the first ``alphabet_size`` of 'a'..'z'.
    Positive pairs have one random ``pattern_length``-gram planted in both; negative pairs share
    no ``pattern_length``-gram at all (checked). Returns docs1, docs2 (num, length) uint8 and
    labels (num,) int32.
    """
    if not 2 <= alphabet_size <= 26 or pattern_length > length:
        raise ValueError("need 2 <= alphabet_size <= 26 and pattern_length <= length")
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz"[:alphabet_size], np.uint8)
    labels = rng.integers(0, 2, num).astype(np.int32)
    docs = np.zeros((2, num, length), np.uint8)
    for i, label in enumerate(labels):
        while True:
            pair = letters[rng.integers(0, alphabet_size, (2, length))]
            if label:
                pattern = letters[rng.integers(0, alphabet_size, pattern_length)]
                for doc in pair:
                    at = rng.integers(0, length - pattern_length + 1)
                    doc[at : at + pattern_length] = pattern
                break
            if not _has_common_ngram(pair[0].tobytes(), pair[1].tobytes(), pattern_length):
                break
        docs[:, i] = pair
    return docs[0], docs[1], labels


# ----------------------------------------------------------------------------- LM corpus


def arithmetic_corpus(num_bytes: int, *, seed: Seed) -> np.ndarray:
    """A byte corpus of sums and products such as ``"37+45=82\\n"``: (num_bytes,) uint8.

    The answers make part of the text predictable from its context, so a language model's
    perplexity falls as it learns.
    """
    rng = np.random.default_rng(seed)
    chunks: list[bytes] = []
    total = 0
    while total < num_bytes:
        a, b = (int(v) for v in rng.integers(0, 100, 2))
        op = "+" if rng.random() < 0.5 else "*"
        line = f"{a}{op}{b}={a + b if op == '+' else a * b}\n".encode("ascii")
        chunks.append(line)
        total += len(line)
    return np.frombuffer(b"".join(chunks)[:num_bytes], np.uint8).copy()

"""Local data augmentation of behaviour sequences and feature vectors.

Sequence operations (CoSeRec-style) on a user's *training* items only:
- crop: keep a random contiguous eta-fraction;
- mask: replace a gamma-fraction of positions with the mask token (id 0, which the model never sees otherwise:
  right padding sits after every real position, so causal attention never reads it);
- reorder: shuffle a random contiguous beta-fraction window;
- substitute: replace a fraction of items with items similar by co-occurrence;
- insert: put a similar item after a fraction of positions.
Similarity comes from ``ItemSimilarity``, built from one merchant's own training sequences, so no held-out event
and no other merchant's data can influence an augmented view.

Each view also says which original position every item came from (``View.source``), so a position's side
features (event type, time; common/data/features.py) travel with its item through crop, reorder and insert.

Vector noise, a' = a + N(0, sigma^2), on each kind of vector the model consumes, applied inside SASRec while
training (never at evaluation): item-attribute vectors of catalog models (``attribute_sigma``), behaviour vectors
(``behaviour_sigma``) and context vectors (``context_sigma``).

Every op is a pure function of (sequence, rng): the same seed gives the same view, ids stay in 0..n_items, and
no view is longer than ``max_len``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fedaug.common.config import AugmentSection

MASK = 0
SHORT_SEQUENCE_OPS = ("insert", "substitute")
"""CoSeRec's observation: on short sequences, crop/mask/reorder destroy most of the signal; informative ops help."""


class ItemSimilarity:
    """Top-k co-occurring items per item, counted within ``window`` positions inside each training sequence.

    Scores are counts normalised by sqrt(freq_i * freq_j), so popular items do not dominate every list.
    """

    def __init__(self, sequences: list[np.ndarray], n_items: int, k: int = 10, window: int = 2):
        self.n_items = n_items
        lefts, rights = [], []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            for d in range(1, window + 1):
                if len(seq) > d:
                    lefts.append(seq[:-d])
                    rights.append(seq[d:])
        self.neighbours = [np.zeros(0, dtype=np.int64) for _ in range(n_items + 1)]
        if not lefts:
            return
        a = np.concatenate(lefts + rights)
        b = np.concatenate(rights + lefts)  # symmetric
        keep = a != b
        a, b = a[keep], b[keep]
        codes, counts = np.unique(a * (n_items + 1) + b, return_counts=True)
        src, dst = codes // (n_items + 1), codes % (n_items + 1)
        freq = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]), minlength=n_items + 1)
        score = counts / np.sqrt(freq[src] * freq[dst])
        order = np.lexsort((dst, -score, src))  # by source, best first, ties by id (deterministic)
        src, dst = src[order], dst[order]
        starts = np.searchsorted(src, np.arange(n_items + 2))
        for item in np.unique(src):
            self.neighbours[item] = dst[starts[item] : starts[item + 1]][:k]

    def similar(self, item: int, rng: np.random.Generator) -> int:
        """A random item among ``item``'s top-k neighbours, or ``item`` itself when it has none."""
        options = self.neighbours[item]
        return int(options[rng.integers(len(options))]) if len(options) else int(item)


# ------------------------------------------------------------------------------------------------ sequence ops


def crop(seq: np.ndarray, rng: np.random.Generator, eta: float) -> np.ndarray:
    length = max(1, int(np.floor(eta * len(seq))))
    start = int(rng.integers(len(seq) - length + 1))
    return seq[start : start + length].copy()


def mask(seq: np.ndarray, rng: np.random.Generator, gamma: float) -> np.ndarray:
    out = seq.copy()
    count = int(np.floor(gamma * len(seq)))
    out[rng.choice(len(seq), count, replace=False)] = MASK
    return out


def reorder(seq: np.ndarray, rng: np.random.Generator, beta: float) -> np.ndarray:
    out = seq.copy()
    length = int(np.floor(beta * len(seq)))
    if length >= 2:
        start = int(rng.integers(len(seq) - length + 1))
        out[start : start + length] = rng.permutation(out[start : start + length])
    return out


def substitute(seq: np.ndarray, rng: np.random.Generator, rate: float, similarity: ItemSimilarity) -> np.ndarray:
    out = seq.copy()
    count = max(1, int(np.floor(rate * len(seq))))
    for pos in rng.choice(len(seq), count, replace=False):
        out[pos] = similarity.similar(int(out[pos]), rng)
    return out


def insert(seq: np.ndarray, rng: np.random.Generator, rate: float, similarity: ItemSimilarity,
           max_len: int) -> np.ndarray:
    return inserted(seq, rng, rate, similarity, max_len).items


def inserted(seq: np.ndarray, rng: np.random.Generator, rate: float, similarity: ItemSimilarity,
             max_len: int) -> View:
    """``insert`` with each item's source position (an inserted item shares the one it follows)."""
    count = max(1, int(np.floor(rate * len(seq))))
    positions = set(rng.choice(len(seq), count, replace=False).tolist())
    out, source = [], []
    for pos, item in enumerate(seq.tolist()):
        out.append(item)
        source.append(pos)
        if pos in positions:
            out.append(similarity.similar(item, rng))
            source.append(pos)
    return View(np.asarray(out[-max_len:], dtype=np.int64), np.asarray(source[-max_len:], dtype=np.int64))


class View(NamedTuple):
    """An augmented view: its items and, for each, the position of the original sequence it came from (None: no
    source, e.g. a random public chain, whose side features are unknown)."""

    items: np.ndarray
    source: np.ndarray | None


class Augmenter:
    """Draws augmented views of training sequences according to ``[augment]`` (the policy,
    fedaug.common.config.AugmentSection).

    Build one per merchant from its training data; ``views(seq, rng)`` gives that round's views of one user.
    """

    def __init__(self, settings: AugmentSection, train_sequences: list[np.ndarray], n_items: int, max_len: int):
        self.settings = settings
        self.max_len = max_len
        self.similarity = ItemSimilarity(train_sequences, n_items, settings.similar_k, settings.window)

    def choose_op(self, length: int, rng: np.random.Generator) -> str:
        ops = self.settings.ops
        if length <= self.settings.short_length:
            ops = tuple(op for op in ops if op in SHORT_SEQUENCE_OPS) or ops
        return ops[int(rng.integers(len(ops)))]

    def apply(self, op: str, seq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply_view(op, seq, rng).items

    def apply_view(self, op: str, seq: np.ndarray, rng: np.random.Generator) -> View:
        """``op`` on ``seq`` with each item's source position. Crop and reorder move positions, so they run on
        the positions themselves (the same draws as on the items); mask and substitute keep every position."""
        s = self.settings
        seq = np.asarray(seq, dtype=np.int64)
        positions = np.arange(len(seq))
        if op == "crop":
            source = crop(positions, rng, s.crop_eta)
            return View(seq[source], source)
        if op == "reorder":
            source = reorder(positions, rng, s.reorder_beta)
            return View(seq[source], source)
        if op == "mask":
            return View(mask(seq, rng, s.mask_gamma), positions)
        if op == "substitute":
            return View(substitute(seq, rng, s.substitute_rate, self.similarity), positions)
        if op == "insert":
            return inserted(seq, rng, s.insert_rate, self.similarity, self.max_len)
        raise ValueError(f"unknown op {op!r}")

    def views(self, seq: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        return [view.items for view in self.source_views(seq, rng)]

    def source_views(self, seq: np.ndarray, rng: np.random.Generator) -> list[View]:
        """This round's views of one user's sequence, each with its items' source positions."""
        if not self.settings.enabled or len(seq) == 0:
            return []
        return [self.apply_view(self.choose_op(len(seq), rng), seq, rng) for _ in range(self.settings.views)]


def random_chains(n_items: int, length: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` chains of uniformly random catalog items: contrastive negatives that carry no user's data."""
    return [rng.integers(1, n_items + 1, max(length, 2)) for _ in range(count)]


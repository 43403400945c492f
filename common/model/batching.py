"""Turning ragged user sequences into padded tensors: per-user samples, batches trimmed to their longest row, and
length-bucketed micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedaug.common.data.features import N_CODES, input_rows
from fedaug.common.model.augment import View


def pad_right(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each sequence's last ``max_len`` items, right-padded with 0 to the longest kept length.

    Returns the ``[B, T]`` int64 matrix and the kept lengths.
    """
    kept = [np.asarray(s[-max_len:], dtype=np.int64) for s in sequences]
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    out = np.zeros((len(kept), max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    for row, seq in enumerate(kept):
        out[row, : len(seq)] = seq
    return out, lengths


def pad_side(histories: list[np.ndarray], features: list[np.ndarray], max_len: int, width: int) -> np.ndarray:
    """``[B, T, width]`` side input of each history (``input_rows`` of its events' rows, the query moment's row
    last), aligned with ``pad_right(histories, max_len)``."""
    kept = [min(len(h), max_len) for h in histories]
    out = np.zeros((len(histories), max(max(kept, default=0), 1), width), dtype=np.float32)
    for row, (history, rows, n) in enumerate(zip(histories, features, kept, strict=True)):
        out[row, :n] = input_rows(rows[:, :width], len(history))[len(history) - n :]
    return out


@dataclass(frozen=True)
class Contrastive:
    """How a sample's views are laid out for the InfoNCE term: view 0 is the anchor, views 1..positives are its
    augmentations, the rest are negatives (random public item chains)."""

    positives: int
    weight: float
    temperature: float


class UserSamples:
    """One training sample per user: ``[views, T]`` next-item inputs (items[:-1]) and targets (items[1:]).

    View 0 is the user's own sequence; further views (augmentations, contrastive negatives) belong to the same
    user, so under DP they sit inside that user's one clipped sample. Only the first ``target_views`` views carry
    next-item targets. Built once per round; ``batch(rows)`` trims columns to the rows' longest view, so short
    Beauty sequences (8.9 items on average) don't pay for the 50-wide window.

    ``features``: each user's side-feature rows (fedaug.common.data.features), aligned with their sequence; views follow
    their items' source positions and each input position gets ``input_rows``' shift. ``target_weights``: a
    weight per behaviour code (index 0 = unknown type) for each next-item target; a target whose weight is 0 is
    no target at all (e.g. purchases only).
    """

    def __init__(self, sequences: list[np.ndarray], max_len: int,
                 extra_views: Callable[[np.ndarray], list] | None = None, n_extra: int = 0,
                 target_views: int | None = None, contrastive: Contrastive | None = None,
                 features: list[np.ndarray] | None = None, target_weights: np.ndarray | None = None):
        self.users = np.array([i for i, s in enumerate(sequences) if len(s) >= 2], dtype=np.int64)
        self.views = 1 + n_extra
        self.contrastive = contrastive
        windows, sides = [], []
        for u in self.users:
            seq = sequences[u]
            own = View(seq, np.arange(len(seq)))
            views = [own] + [v if isinstance(v, View) else View(v, None)
                             for v in (extra_views(seq) if extra_views else [])]
            views += [own] * (self.views - len(views))  # a fixed number of views per user
            for view in views[: self.views]:
                windows.append(view.items[-(max_len + 1):])
                if features is not None:
                    sides.append(None if view.source is None else features[u][view.source[-(max_len + 1):]])
        inputs, lengths = pad_right([w[:-1] for w in windows], max_len)
        targets, _ = pad_right([w[1:] for w in windows], max_len)
        self.inputs = inputs.reshape(len(self.users), self.views, -1)
        self.targets = targets.reshape(len(self.users), self.views, -1)
        self.side = self.weights = None
        if features is not None:
            width = features[0].shape[1] if features else N_CODES
            side = np.zeros((len(windows), inputs.shape[1], width), dtype=np.float32)
            codes = np.zeros(targets.shape, dtype=np.int64)  # behaviour code of each target
            for row, (window, rows) in enumerate(zip(windows, sides, strict=True)):
                if rows is not None:
                    side[row, : len(window) - 1] = input_rows(rows, len(window) - 1)
                    codes[row, : len(window) - 1] = rows[1:, 0]
            self.side = side.reshape(*self.inputs.shape, width)
            if target_weights is not None:
                weights = np.asarray(target_weights, dtype=np.float32)[codes].reshape(self.targets.shape)
                self.targets[weights == 0] = 0
                self.weights = weights
        if target_views is not None:
            self.targets[:, target_views:] = 0
        self.view_lengths = lengths.reshape(len(self.users), self.views)
        self.lengths = self.view_lengths.max(axis=1)

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors ``[B, views, T]`` of inputs and targets for sample rows ``rows`` (0 = no target)."""
        width = self._width(rows)
        return (torch.from_numpy(self.inputs[rows, :, :width]).to(device),
                torch.from_numpy(self.targets[rows, :, :width]).to(device))

    def batch_side(self, rows: np.ndarray, device) -> torch.Tensor | None:
        """``[B, views, T, F]`` side-feature rows of the inputs (None: the samples carry none)."""
        if self.side is None:
            return None
        return torch.from_numpy(self.side[rows, :, : self._width(rows)]).to(device)

    def batch_weights(self, rows: np.ndarray, device) -> torch.Tensor | None:
        """``[B, views, T]`` weight of each target (None: all 1)."""
        if self.weights is None:
            return None
        return torch.from_numpy(self.weights[rows, :, : self._width(rows)]).to(device)

    def _width(self, rows: np.ndarray) -> int:
        return max(int(self.lengths[rows].max(initial=0)), 1)

    def micro_batches(self, rows: np.ndarray, token_budget: int) -> list[np.ndarray]:
        """``rows`` as length buckets of at most ``token_budget`` padded positions, counting every view."""
        return length_buckets(rows, self.lengths, token_budget // self.views)

    def batch_view_lengths(self, rows: np.ndarray, device) -> torch.Tensor:
        """``[B, views]`` input length of every view (for the contrastive term)."""
        return torch.from_numpy(self.view_lengths[rows]).to(device)


def length_buckets(rows: np.ndarray, lengths: np.ndarray, token_budget: int, shrink: float = 0.7) -> list[np.ndarray]:
    """Split ``rows`` into micro-batches of similar length, each at most ``token_budget`` padded positions.

    Rows are sorted longest first; a micro-batch closes when the next row would break the budget or is shorter
    than ``shrink`` times the batch's width, so padding stays below 1 / shrink of the real positions. Every row
    lands in exactly one micro-batch (a row longer than the budget gets one of its own).
    """
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    widths = np.maximum(lengths[rows], 1)
    buckets, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or (i - start + 1) * widths[start] > token_budget or widths[i] < shrink * widths[start]:
            buckets.append(rows[start:i])
            start = i
    return buckets

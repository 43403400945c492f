"""Turning ragged user sequences into padded tensors: per-user samples, batches trimmed to their longest row, and
length-bucketed micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


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
    """

    def __init__(self, sequences: list[np.ndarray], max_len: int,
                 extra_views: Callable[[np.ndarray], list[np.ndarray]] | None = None, n_extra: int = 0,
                 target_views: int | None = None, contrastive: Contrastive | None = None):
        self.users = np.array([i for i, s in enumerate(sequences) if len(s) >= 2], dtype=np.int64)
        self.views = 1 + n_extra
        self.contrastive = contrastive
        windows = []
        for u in self.users:
            seq = sequences[u]
            views = [seq] + (extra_views(seq) if extra_views else [])
            views += [seq] * (self.views - len(views))  # a fixed number of views per user
            windows.extend(v[-(max_len + 1):] for v in views[: self.views])
        inputs, lengths = pad_right([w[:-1] for w in windows], max_len)
        targets, _ = pad_right([w[1:] for w in windows], max_len)
        self.inputs = inputs.reshape(len(self.users), self.views, -1)
        self.targets = targets.reshape(len(self.users), self.views, -1)
        if target_views is not None:
            self.targets[:, target_views:] = 0
        self.view_lengths = lengths.reshape(len(self.users), self.views)
        self.lengths = self.view_lengths.max(axis=1)

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors ``[B, views, T]`` of inputs and targets for sample rows ``rows`` (0 = no target)."""
        width = max(int(self.lengths[rows].max(initial=0)), 1)
        return (torch.from_numpy(self.inputs[rows, :, :width]).to(device),
                torch.from_numpy(self.targets[rows, :, :width]).to(device))

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

"""Turning ragged user sequences into padded tensors, trimmed to the longest sequence in each batch."""

from __future__ import annotations

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


class NextItemExamples:
    """Every user's training sequence as (input, target) rows: input = items[:-1], target = items[1:].

    Built once per data set; ``batch(users)`` slices rows and trims columns to the batch's longest sequence, so
    a batch of short Beauty sequences (mean 8.9 items) costs far less than padding everyone to ``max_len``.
    """

    def __init__(self, sequences: list[np.ndarray], max_len: int):
        self.users = np.array([i for i, s in enumerate(sequences) if len(s) >= 2], dtype=np.int64)
        windows = [sequences[u][-(max_len + 1):] for u in self.users]
        self.inputs, self.lengths = pad_right([w[:-1] for w in windows], max_len)
        self.targets, _ = pad_right([w[1:] for w in windows], max_len)
        self.n_targets = int(self.lengths.sum())

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors ``[B, T]`` of inputs and targets for example rows ``rows`` (0 = no target)."""
        width = max(int(self.lengths[rows].max(initial=0)), 1)
        inputs = torch.from_numpy(self.inputs[rows, :width]).to(device)
        targets = torch.from_numpy(self.targets[rows, :width]).to(device)
        return inputs, targets

"""Leave-one-out evaluation of any scorer over a split's valid or test users."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .batching import pad_right
from .metrics import METRIC_NAMES, mask_history, mean_metrics, rank_metrics
from .model import SASRec
from .split import LeaveOneOut

Scorer = Callable[[list[np.ndarray]], torch.Tensor]
"""Maps a batch of input histories to next-item scores ``[B, n_items + 1]``."""


def evaluate(scorer: Scorer, split: LeaveOneOut, stage: str, batch_size: int = 1024) -> dict[str, float]:
    """Mean HR@K / NDCG@K / AUC over the users evaluable at ``stage``; ``users`` counts them."""
    per_user = evaluate_per_user(scorer, split, stage, batch_size)
    return mean_metrics([per_user]) | {"users": len(per_user["auc"])}


def evaluate_per_user(scorer: Scorer, split: LeaveOneOut, stage: str, batch_size: int = 1024
                      ) -> dict[str, np.ndarray]:
    """Each evaluable user's HR@K / NDCG@K / AUC at ``stage`` (for paired comparisons of two scorers)."""
    histories, targets = split.eval_inputs(stage)
    per_user = []
    for start in range(0, len(targets), batch_size):
        batch_hist = histories[start : start + batch_size]
        scores = scorer(batch_hist).float()
        batch_targets = torch.from_numpy(targets[start : start + batch_size]).to(scores.device)
        per_user.append(rank_metrics(mask_history(scores, batch_hist, batch_targets), batch_targets))
    if not per_user:
        return {name: np.zeros(0) for name in METRIC_NAMES}
    return {name: np.concatenate([p[name] for p in per_user]) for name in METRIC_NAMES}


class SASRecScorer:
    """A SASRec model as a Scorer (eval mode for the pass, its training mode restored after)."""

    def __init__(self, model: SASRec, device):
        self.model, self.device = model, device

    def __call__(self, histories: list[np.ndarray]) -> torch.Tensor:
        model = self.model
        items, lengths = pad_right(histories, model.cfg.max_len)
        was_training = model.training
        model.eval()
        scores = model.score(torch.from_numpy(items).to(self.device), torch.from_numpy(lengths).to(self.device))
        model.train(was_training)
        return scores


def sasrec_scorer(model: SASRec, device) -> SASRecScorer:
    return SASRecScorer(model, device)

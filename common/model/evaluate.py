"""Leave-one-out evaluation of any scorer over a split's valid or test users, and a scorer's test figures in detail
(``tested``: per user, on cold-item targets, by the test event's type) that runs, reports and a merchant's check of
a received model (common/recommend/check.py) share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.features import N_CODES
from fedaug.common.data.split import LeaveOneOut
from fedaug.common.model.batching import pad_right, pad_side
from fedaug.common.model.metrics import METRIC_NAMES, mask_history, mean_metrics, rank_metrics, select
from fedaug.common.model.sasrec import SASRec

Scorer = Callable[..., torch.Tensor]
"""Maps a batch of input histories to next-item scores ``[B, n_items + 1]``. A scorer that reads side features
has ``side_columns`` (the numeric context columns it needs, see ``side_columns``) and takes each history's
feature rows (fedaug.common.data.features; the query moment's row last) as its second argument."""


def side_columns(scorer: Scorer) -> tuple[str, ...] | None:
    """The context columns ``scorer`` reads beside event types and times; None: it reads no side features."""
    return getattr(scorer, "side_columns", None)


def eval_features(scorer: Scorer, split: LeaveOneOut, stage: str) -> list[np.ndarray] | None:
    """The side-feature rows ``scorer`` reads for ``split.eval_inputs(stage)``'s histories (None: it reads none)."""
    columns = side_columns(scorer)
    return split.eval_features(stage, columns) if columns is not None else None


def score(scorer: Scorer, histories: list[np.ndarray], features: list[np.ndarray] | None) -> torch.Tensor:
    """``scorer``'s float scores for ``histories``, with their side features where it reads them."""
    return (scorer(histories) if features is None else scorer(histories, features)).float()


def evaluate(scorer: Scorer, split: LeaveOneOut, stage: str, batch_size: int = 1024) -> dict[str, float]:
    """Mean HR@K / NDCG@K / AUC over the users evaluable at ``stage``; ``users`` counts them."""
    per_user = evaluate_per_user(scorer, split, stage, batch_size)
    return mean_metrics([per_user]) | {"users": len(per_user["auc"])}


def evaluate_per_user(scorer: Scorer, split: LeaveOneOut, stage: str, batch_size: int = 1024
                      ) -> dict[str, np.ndarray]:
    """Each evaluable user's HR@K / NDCG@K / AUC at ``stage`` (for paired comparisons of two scorers)."""
    histories, targets = split.eval_inputs(stage)
    features = eval_features(scorer, split, stage)
    per_user = []
    for start in range(0, len(targets), batch_size):
        batch_hist = histories[start : start + batch_size]
        scores = score(scorer, batch_hist, None if features is None else features[start : start + batch_size])
        batch_targets = torch.from_numpy(targets[start : start + batch_size]).to(scores.device)
        per_user.append(rank_metrics(mask_history(scores, batch_hist, batch_targets), batch_targets))
    if not per_user:
        return {name: np.zeros(0) for name in METRIC_NAMES}
    return {name: np.concatenate([p[name] for p in per_user]) for name in METRIC_NAMES}


COLD_BELOW = 5
"""A test target is a cold item when it had fewer training interactions than this."""


def cold_targets(split: LeaveOneOut) -> np.ndarray:
    """Per evaluable test user: is the target an item with fewer than COLD_BELOW training interactions?"""
    counts = np.bincount(split.train.items, minlength=split.n_items + 1)
    _, targets = split.eval_inputs("test")
    return counts[targets] < COLD_BELOW


@dataclass(frozen=True)
class Tested:
    """A scorer's test metrics: per user, over all users and over the users whose target is a cold item."""

    per_user: dict[str, np.ndarray]
    cold_mask: np.ndarray
    target_types: np.ndarray | None = None
    """EVENT_TYPES index of each user's test event (None: the data has no event types)."""

    @property
    def users(self) -> int:
        """How many users were tested."""
        return len(self.cold_mask)

    @property
    def all(self) -> dict:
        return select(mean_metrics([self.per_user]))

    @property
    def cold(self) -> dict | None:
        """None where no target is cold."""
        if not self.cold_mask.any():
            return None
        return select(mean_metrics([{k: v[self.cold_mask] for k, v in self.per_user.items()}]))

    @property
    def by_type(self) -> dict[str, dict] | None:
        """Test metrics by the test event's type, where the data has more than one type (else None)."""
        if self.target_types is None or len(np.unique(self.target_types)) < 2:
            return None
        return {EVENT_TYPES[t]: select(mean_metrics([{k: v[self.target_types == t] for k, v in self.per_user.items()}]))
                | {"users": int((self.target_types == t).sum())} for t in np.unique(self.target_types).tolist()}


def tested(scorer: Scorer, split: LeaveOneOut) -> Tested:
    """``scorer``'s test figures on ``split`` (``.all`` equals ``evaluate(scorer, split, "test")`` less ``users``)."""
    return Tested(evaluate_per_user(scorer, split, "test"), cold_targets(split), split.target_types("test"))


class SASRecScorer:
    """A SASRec model as a Scorer (eval mode for the pass, its training mode restored after)."""

    def __init__(self, model: SASRec, device):
        self.model, self.device = model, device

    @property
    def side_columns(self) -> tuple[str, ...] | None:
        cfg = self.model.cfg
        return cfg.context_columns if cfg.side_vectors else None

    def __call__(self, histories: list[np.ndarray], features: list[np.ndarray] | None = None) -> torch.Tensor:
        """``features``: each history's side-feature rows (None: unknown, e.g. a request without them)."""
        model = self.model
        items, lengths = pad_right(histories, model.cfg.max_len)
        side = None
        if features is not None and model.cfg.side_vectors:
            side = torch.from_numpy(pad_side(histories, features, model.cfg.max_len,
                                             N_CODES + len(model.cfg.context_columns))).to(self.device)
        was_training = model.training
        if was_training:  # a served model is in eval mode already: no walk over its modules per request
            model.eval()
        try:
            return model.score(torch.from_numpy(items).to(self.device), torch.from_numpy(lengths).to(self.device),
                               side)
        finally:
            if was_training:
                model.train()


def sasrec_scorer(model: SASRec, device) -> SASRecScorer:
    return SASRecScorer(model, device)

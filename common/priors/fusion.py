"""Score fusion with the public text prior: a trained model never has to be worse than the prior it starts from.

Each scorer's scores are standardised per user over the catalog (mean 0, std 1; padding excluded), then summed
with the prior's weighted by ``weight``. The weight is chosen on validation from ``WEIGHTS``, which holds 0 (the
model alone) and infinity (the prior alone), so on validation the fused model is at least as good as either; a
finite weight must beat the prior alone beyond chance (a paired 95 % interval over the validation users,
widened for the number of weights tried).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedaug.common.data.split import LeaveOneOut
from fedaug.common.model.evaluate import Scorer, eval_features, score, side_columns
from fedaug.common.model.metrics import mask_history, mean_metrics, paired_gain, rank_metrics

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0, math.inf)
"""inf: the prior alone, exactly (a model that learned nothing useful costs nothing, not even its noise)."""


def standardise(scores: torch.Tensor) -> torch.Tensor:
    items = scores[:, 1:]
    out = torch.zeros_like(scores)
    out[:, 1:] = (items - items.mean(1, keepdim=True)) / items.std(1, keepdim=True).clamp(min=1e-8)
    return out


class Fused:
    def __init__(self, model: Scorer, prior: Scorer, weight: float):
        self.model, self.prior, self.weight = model, prior, weight

    @property
    def side_columns(self) -> tuple[str, ...] | None:
        return side_columns(self.model)

    def __call__(self, histories: list[np.ndarray], features: list[np.ndarray] | None = None) -> torch.Tensor:
        """``features``: the model's side features (the prior reads none)."""
        if math.isinf(self.weight):
            return standardise(self.prior(histories).float())
        scores = standardise(score(self.model, histories, features))
        if self.weight:
            prior = standardise(self.prior(histories).float()).to(scores.device)
            scores += self.weight * prior
        return scores


def fused_rows(model: Scorer, prior: Scorer, split: LeaveOneOut, weights: tuple[float, ...] = WEIGHTS,
               stage: str = "valid", batch_size: int = 1024) -> dict[float, list[dict]]:
    """Every weight's rank metrics per user at ``stage``, in batches; one pass of each scorer per batch serves
    every weight."""
    histories, targets = split.eval_inputs(stage)
    features = eval_features(model, split, stage)
    per_user: dict[float, list] = {w: [] for w in weights}
    for start in range(0, len(targets), batch_size):
        batch = histories[start : start + batch_size]
        scores = standardise(score(model, batch, None if features is None else features[start : start + batch_size]))
        extra = standardise(prior(batch).float()).to(scores.device)
        batch_targets = torch.from_numpy(targets[start : start + batch_size]).to(scores.device)
        for weight in weights:
            fused = mask_history(extra.clone() if math.isinf(weight) else scores + weight * extra, batch,
                                 batch_targets)
            per_user[weight].append(rank_metrics(fused, batch_targets))
    return per_user


def fit_fusion(model: Scorer, prior: Scorer, split: LeaveOneOut, weights: tuple[float, ...] = WEIGHTS,
               batch_size: int = 1024) -> tuple[Fused, list[dict], dict[str, float]]:
    """The fusion whose weight validates best (NDCG@10, never test), every weight's validation NDCG@10, and the
    chosen fusion's full validation metrics."""
    per_user = fused_rows(model, prior, split, weights, "valid", batch_size)
    targets = split.eval_inputs("valid")[1]
    means = {w: mean_metrics(rows) | {"users": len(targets)} for w, rows in per_user.items()}
    tried = [{"weight": w, "valid_ndcg@10": means[w]["ndcg@10"]} for w in weights]
    # Ties go to the larger prior weight, and the model is taken into the prior only where what it adds shows on
    # validation beyond chance (a paired 95 % interval above zero): picking the best of several weights on the
    # same users otherwise rewards noise — a model that learned nothing (all budgets spent before it trained)
    # would still be mixed in, and cost test metrics.
    best = max(tried, key=lambda row: (row["valid_ndcg@10"], row["weight"]))["weight"]
    if math.inf in weights and not math.isinf(best):
        ndcg = {w: np.concatenate([row["ndcg@10"] for row in per_user[w]]) for w in (best, math.inf)}
        if paired_gain(ndcg[best], ndcg[math.inf], comparisons=len(weights) - 1)["low"] <= 0:
            best = math.inf
    return Fused(model, prior, best), tried, means[best]

"""Full-ranking metrics: HR@K, NDCG@K over all items and per-user AUC.

Each user's target is ranked against every item except padding and the items already in the user's input
history (the target itself is never excluded). Ties are counted as half above the target, so a model that scores
everything equally gets chance-level ranks instead of perfect ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KS = (5, 10, 20)
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("hr", "ndcg") for k in KS) + ("auc",)


def select(metrics: dict) -> dict:
    """The reported metrics of an evaluation result (which also carries counts such as ``users``)."""
    return {k: metrics[k] for k in METRIC_NAMES}


def json_number(value):
    """ε as metrics.json holds it: JSON has no infinity, so a non-private ε is the string "inf"."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def mask_history(scores: torch.Tensor, histories: list[np.ndarray], targets: torch.Tensor) -> torch.Tensor:
    """Set padding and history items to -inf (in place), keeping each target's own score."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = float("-inf")
    scores[:, 0] = float("-inf")
    scores.scatter_(1, targets.unsqueeze(1), target_scores)
    return scores


def rank_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-user metrics from masked scores ``[B, V+1]`` (excluded items at -inf) and target ids ``[B]``."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    candidates = torch.isfinite(scores)
    higher = ((scores > target_scores) & candidates).sum(1).double()
    ties = ((scores == target_scores) & candidates).sum(1).double() - 1  # the target ties with itself
    rank = higher + ties / 2  # 0-based
    others = candidates.sum(1).double() - 1
    out = {}
    for k in KS:
        hit = rank < k
        out[f"hr@{k}"] = hit.double().cpu().numpy()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 2), torch.zeros_like(rank)).cpu().numpy()
    out["auc"] = ((others - rank) / others.clamp(min=1)).cpu().numpy()
    return out


def mean_metrics(per_user: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Average per-user metric arrays gathered over batches."""
    if not per_user:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: float(np.concatenate([p[name] for p in per_user]).mean()) for name in METRIC_NAMES}


def paired_gain(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean per-user difference ``a - b`` of one metric over the same users, with its normal-approximation 95 %
    interval (``low``, ``high``): a gain is real when ``low`` > 0."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
    return {"gain": float(diff.mean()), "low": float(diff.mean() - half), "high": float(diff.mean() + half),
            "users": len(diff)}

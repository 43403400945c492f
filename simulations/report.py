"""The metrics.json shape every run writes (baseline, local, and later federated)."""

from __future__ import annotations

import time

from common.config import BaselineConfig
from common.data import BehaviorData
from common.evaluate import Scorer, evaluate
from common.split import LeaveOneOut

METRIC_KEYS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "auc")


def final_metrics(scorer: Scorer, split: LeaveOneOut, data: BehaviorData, config: BaselineConfig, device,
                  epochs: int, started: float) -> dict:
    """``{"test", "valid", "epochs", "seconds", "data", "config"}``; callers add their own keys."""
    return {
        "test": select(evaluate(scorer, split, "test")),
        "valid": select(evaluate(scorer, split, "valid")),
        "epochs": epochs,
        "seconds": round(time.monotonic() - started, 2),
        "data": data.summary(),
        "config": config.model_dump(mode="json") | {"device": str(device)},
    }


def select(metrics: dict) -> dict:
    return {k: metrics[k] for k in METRIC_KEYS}

"""The model bundles a run leaves behind (DIR/model, and DIR/model-best for a federation): the scorer the run
evaluated, with what trained it and the privacy it was trained under on its card (common/recommend/bundle.py)."""

from __future__ import annotations

import math
from pathlib import Path

from fedaug.common.data import BehaviorData
from fedaug.common.data.source import event_schema
from fedaug.common.model.evaluate import Scorer
from fedaug.common.recommend.bundle import write_bundle
from fedaug.common.records import RunMetrics

MODEL, BEST_MODEL = "model", "model-best"


def save_model(directory: Path, scorer: Scorer, data: BehaviorData, metrics: RunMetrics, config, *,
               round_: int | None = None, test: dict | None = None, valid: dict | None = None,
               parts: dict | None = None) -> Path:
    """Write ``scorer`` as a bundle; ``round_`` / ``test`` / ``valid`` name a federation's model other than its
    final one (the best-validating round)."""
    privacy = metrics.privacy
    epsilon = privacy.epsilon_max if privacy else None
    private = epsilon is not None and math.isfinite(epsilon)
    text = getattr(config, "text", None)
    encoder = None if text is None else "packaged" if text.encoder is None else str(Path(text.encoder).resolve())
    rounds = metrics.rounds[-1].round if metrics.rounds else None
    section = getattr(config, "data", None)
    return write_bundle(
        directory, scorer, data.catalog,
        trained={"mode": metrics.mode, "data": data.summary(), "epochs": metrics.epochs, "rounds": rounds,
                 "round": round_ if round_ is not None else rounds, "merchants": metrics.merchants_total or None},
        privacy={"epsilon": epsilon, "delta": privacy.delta, "unit": "user",
                 "accountant": "min(PRV, RDP), composed over every release"} if private else None,
        metrics={"test": test if test is not None else metrics.test,
                 "valid": valid if valid is not None else metrics.valid},
        text_encoder=encoder, parts=parts, schema=None if section is None else event_schema(section))

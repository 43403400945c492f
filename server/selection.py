"""The aggregator's side of the federated DP evaluation (common/priors/fusion_weights.py, client/client_app.py
``select``): after the last round it sends every connected merchant the candidate model — the final global model fused
with the public prior and the summed fit-count statistics, as a bundle — with the public grid of fusion weights; each
merchant answers with its noised figures (accounted in its ledger, reserved before round 1); the sum picks the
trained model's weight in the model handed out. Summing and choosing are post-processing: no further ε."""

from __future__ import annotations

import math
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.priors import fusion_weights
from fedaug.common.records import merchant_name
from fedaug.server.replies import query_problem

QUERY = "query.selection"


def evaluate_candidates(grid: Grid, settings: FederationSection, run_key: str, candidate: dict[str, bytes],
                        weights: tuple[float, ...] = fusion_weights.WEIGHTS) -> dict:
    """Ask every connected merchant for its figures on ``candidate`` (a bundle's files) at ``weights``; the choice
    (fedaug.common.priors.fusion_weights.choose) with how many merchants answered. No merchant answering: the weight
    is ∞."""
    config = ConfigRecord({"run-key": run_key, "weights": [float(w) for w in weights]})
    messages = [Message(RecordDict({"bundle": ConfigRecord(dict(candidate)), "config": config}), dst_node_id=node,
                        message_type=QUERY) for node in grid.get_node_ids()]
    total, variance, answered = None, 0.0, 0
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        name = merchant_name(reply.metadata.src_node_id, None, settings.names)
        problem = _problem(reply, fusion_weights.size(weights))
        if problem:
            log(WARNING, "fedaug selection: %s: %s", name, problem)
            continue
        vector = reply.content["arrays"]["selection"].numpy().astype(np.float64)
        noise = float(reply.content["metrics"]["noise-multiplier"])
        total = vector if total is None else total + vector
        variance += (noise * fusion_weights.sensitivity(weights)) ** 2
        answered += 1
    if total is None:
        return {"weight": math.inf, "merchants": 0, "candidates": [], "why": "no merchant answered"}
    chosen = fusion_weights.choose(total, math.sqrt(variance), weights) | {"merchants": answered}
    log(INFO, "fedaug selection: %d merchants scored %d candidate weights; the trained model's weight: %s",
        answered, len(weights), chosen["weight"])
    return chosen


def _problem(reply: Message, size: int) -> str | None:
    problem = query_problem(reply)
    if problem:
        return problem
    metrics = reply.content["metrics"]
    arrays = reply.content.get("arrays")
    if arrays is None or "selection" not in arrays:
        return "rejected (no selection array)"
    vector = arrays["selection"].numpy()
    if vector.shape != (size,) or not np.isfinite(vector).all():
        return f"rejected (a vector of shape {vector.shape}, {size} finite values expected)"
    noise = float(metrics.get("noise-multiplier", -1))
    if not (math.isfinite(noise) and noise >= 0):
        return "rejected (missing or bad noise multiplier)"
    return None

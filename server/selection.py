"""The aggregator's side of the federated DP evaluation (common/priors/fusion_weights.py, client/client_app.py
``select``): after the last round it sends every connected merchant the candidate model — the final global model fused
with the public prior and the summed fit-count statistics, as a bundle — with the public grid of fusion weights; each
merchant answers with its noised figures (accounted in its ledger, reserved before round 1) — through one secure
sum where the federation runs secure aggregation (server/secure.py), else one by one; the sum picks the trained
model's weight in the model handed out. Summing and choosing are post-processing: no further ε."""

from __future__ import annotations

import math
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.priors import fusion_weights
from fedaug.common.protocol.messages import SELECTION, SelectionReply, SelectionRequest
from fedaug.common.records import merchant_name
from fedaug.runtime.secagg import SecAggFailed
from fedaug.server import secure
from fedaug.server.replies import query_reply


def evaluate_candidates(grid: Grid, settings: FederationSection, run_key: str, candidate: dict[str, bytes],
                        weights: tuple[float, ...] = fusion_weights.WEIGHTS) -> dict:
    """Ask every connected merchant for its figures on ``candidate`` (a bundle's files) at ``weights``; the choice
    (fedaug.common.priors.fusion_weights.choose) with how many merchants answered. No merchant answering: the weight
    is ∞."""
    request = SelectionRequest(run_key=run_key, weights=tuple(float(w) for w in weights), bundle=dict(candidate))
    if secure.enabled(settings, len(list(grid.get_node_ids()))):
        return _securely(grid, settings, request)
    messages = [Message(request.encode(), dst_node_id=node, message_type=SELECTION) for node in grid.get_node_ids()]
    total, variance, answered = None, 0.0, 0
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        name = merchant_name(reply.metadata.src_node_id, None, settings.names)
        answer, problem = query_reply(reply, SelectionReply)
        problem = problem or _problem(answer, fusion_weights.size(weights))
        if problem:
            log(WARNING, "fedaug selection: %s: %s", name, problem)
            continue
        vector = answer.figures.astype(np.float64)
        total = vector if total is None else total + vector
        variance += (answer.noise_multiplier * fusion_weights.sensitivity(weights)) ** 2
        answered += 1
    if total is None:
        return {"weight": math.inf, "merchants": 0, "candidates": [], "why": "no merchant answered"}
    chosen = fusion_weights.choose(total, math.sqrt(variance), weights) | {"merchants": answered}
    log(INFO, "fedaug selection: %d merchants scored %d candidate weights; the trained model's weight: %s",
        answered, len(weights), chosen["weight"])
    return chosen


def _securely(grid: Grid, settings: FederationSection, request: SelectionRequest) -> dict:
    """The figures through one secure sum (server/secure.py): the aggregator sees only their sum, quantised
    (``fusion_weights.quantised``), whose noise is the survivors' pooled shares. A sum that cannot be unmasked
    leaves the trained model out (weight ∞), logged."""
    try:
        result = secure.secure_sum(grid, settings, request, length=fusion_weights.size(request.weights))
    except SecAggFailed as exc:
        log(WARNING, "fedaug selection: the secure sum failed (%s); the trained model is left out", exc)
        return {"weight": math.inf, "merchants": 0, "candidates": [], "why": f"the secure sum failed ({exc})"}
    total = result.total.astype(np.float64) / fusion_weights.SCALE
    noise_std = math.sqrt(result.variances[0]) / fusion_weights.SCALE
    chosen = fusion_weights.choose(total, noise_std, request.weights) | {"merchants": result.survivors,
                                                                         "release": result.card()}
    log(INFO, "fedaug selection: %d merchants scored %d candidate weights in a secure sum; the trained model's "
        "weight: %s", result.survivors, len(request.weights), chosen["weight"])
    return chosen


def _problem(answer: SelectionReply, size: int) -> str | None:
    vector = answer.figures
    if vector.shape != (size,) or not np.isfinite(vector).all():
        return f"rejected (a vector of shape {vector.shape}, {size} finite values expected)"
    return None

"""The aggregator's side of the DP collaborative statistics (client/releases.py): ask every connected merchant
once, before round 1, for its noised counts over the public candidate table, check and sum the replies.

The sum is post-processing of the merchants' releases: it costs no further ε. A merchant that errs or declines
(budget spent) is left out and logged; the sum's noise level is the merchants' added in quadrature."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.priors.dp_counts import Counts, Statistics
from fedaug.common.records import merchant_name
from fedaug.server.replies import query_problem

ARRAYS = ("popularity", "pairs", "serve-popularity", "serve-pairs")

QUERY = "query.statistics"


def collect_statistics(grid: Grid, settings: FederationSection, neighbours: np.ndarray,
                       run_key: str) -> tuple[Statistics | None, int, float | None]:
    """The summed counts of every merchant that answered, how many did, and the largest ε a private one reported
    after its release (its selection reservation included; None: none private)."""
    config = ConfigRecord({"run-key": run_key, "share": settings.statistics_share,
                           "selection-share": settings.selection_share if settings.selection == "evaluated" else 0.0,
                           "max-items": settings.statistics_max_items, "max-pairs": settings.statistics_max_pairs})
    messages = [Message(RecordDict({"arrays": ArrayRecord({"neighbours": Array(neighbours)}), "config": config}),
                        dst_node_id=node, message_type=QUERY) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
    total, merchants, epsilons = None, 0, []
    for reply in replies:
        node = reply.metadata.src_node_id
        problem = _problem(reply, neighbours.shape)
        if problem:
            log(WARNING, "fedaug statistics: %s: %s", merchant_name(node, None, settings.names), problem)
            continue
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        stds = float(metrics["popularity-std"]), float(metrics["pair-std"])
        counts = Statistics(*(Counts(arrays[f"{prefix}popularity"].numpy().astype(np.float64),
                                     arrays[f"{prefix}pairs"].numpy().astype(np.float64), *stds)
                              for prefix in ("", "serve-")))
        total = counts if total is None else total + counts
        merchants += 1
        if float(metrics.get("epsilon", -1)) >= 0:
            epsilons.append(float(metrics["epsilon"]))
    return total, merchants, max(epsilons, default=None)


def _problem(reply: Message, shape: tuple[int, int]) -> str | None:
    problem = query_problem(reply)
    if problem:
        return problem
    metrics = reply.content["metrics"]
    arrays = reply.content.get("arrays")
    if arrays is None or set(arrays) != set(ARRAYS):
        return f"rejected (expected arrays {', '.join(ARRAYS)})"
    for prefix in ("", "serve-"):
        popularity, pairs = arrays[f"{prefix}popularity"].numpy(), arrays[f"{prefix}pairs"].numpy()
        if popularity.shape != (shape[0],) or pairs.shape != shape:
            return (f"rejected ({prefix}shapes {popularity.shape} and {pairs.shape}, expected ({shape[0]},) and "
                    f"{shape})")
        if not (np.isfinite(popularity).all() and np.isfinite(pairs).all()):
            return "rejected (non-finite counts)"
    stds = (float(metrics.get("popularity-std", -1)), float(metrics.get("pair-std", -1)))
    if not all(np.isfinite(s) and s >= 0 for s in stds):
        return "rejected (missing or bad noise levels)"
    return None

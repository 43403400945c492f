"""The aggregator's side of the DP collaborative statistics (client/releases.py): ask every connected merchant
once, before round 1, for its noised counts over the public candidate table, and sum them — through one secure sum
(server/secure.py: the aggregator sees only the sum, whose noise the merchants' pooled shares make up), or, where
the federation runs no secure aggregation, one by one (each merchant's counts checked, then summed).

The sum is post-processing of the merchants' releases: it costs no further ε. A merchant that errs or declines
(budget spent) is left out and logged; the sum's noise level is the merchants' added in quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.priors.dp_counts import Counts, Statistics, statistics_of
from fedaug.common.protocol.messages import STATISTICS, StatisticsReply, StatisticsRequest
from fedaug.common.records import merchant_name
from fedaug.runtime.secagg import SecAggFailed
from fedaug.server import secure
from fedaug.server.replies import query_reply


@dataclass(frozen=True)
class Collected:
    """The merchants' summed statistics and how they were released."""

    statistics: Statistics | None
    merchants: int
    """Merchants whose counts the sum holds."""
    epsilon: float | None
    """The largest ε a private merchant reported after its release (its selection reservation included)."""
    release: dict = field(default_factory=lambda: {"secure_aggregation": None, "noise": "local"})
    """How: secure aggregation (SecAgg+) or none, the noise (pooled, local), for reports and model cards."""


def collect_statistics(grid: Grid, settings: FederationSection, neighbours: np.ndarray, run_key: str) -> Collected:
    """Ask every connected merchant for its counts over the candidate table ``neighbours`` and sum them: through
    a secure sum where the federation runs secure aggregation (server/secure.py), else one by one."""
    request = StatisticsRequest(run_key=run_key, neighbours=neighbours, share=settings.statistics_share,
                                selection_share=settings.selection_share if settings.selection == "evaluated" else 0.0,
                                max_items=settings.statistics_max_items, max_pairs=settings.statistics_max_pairs)
    if secure.enabled(settings, len(list(grid.get_node_ids()))):
        return _securely(grid, settings, request)
    messages = [Message(request.encode(), dst_node_id=node, message_type=STATISTICS) for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
    total, merchants, epsilons = None, 0, []
    for reply in replies:
        node = reply.metadata.src_node_id
        answer, problem = query_reply(reply, StatisticsReply)
        problem = problem or _problem(answer, neighbours.shape)
        if problem:
            log(WARNING, "fedaug statistics: %s: %s", merchant_name(node, None, settings.names), problem)
            continue
        stds = answer.popularity_std, answer.pair_std
        counts = Statistics(*(Counts(popularity.astype(np.float64), pairs.astype(np.float64), *stds)
                              for popularity, pairs in ((answer.fit_popularity, answer.fit_pairs),
                                                        (answer.serve_popularity, answer.serve_pairs))))
        total = counts if total is None else total + counts
        merchants += 1
        if math.isfinite(answer.epsilon):
            epsilons.append(answer.epsilon)
    return Collected(total, merchants, max(epsilons, default=None))


def _securely(grid: Grid, settings: FederationSection, request: StatisticsRequest) -> Collected:
    """The statistics through one secure sum: the aggregator sees only the survivors' summed counts, whose noise
    is the survivors' shares added. A sum that cannot be unmasked leaves the run without statistics (logged)."""
    n, k = request.neighbours.shape
    try:
        result = secure.secure_sum(grid, settings, request, length=2 * (n + n * k))
    except SecAggFailed as exc:
        log(WARNING, "fedaug statistics: the secure sum failed (%s); this run goes on without statistics", exc)
        return Collected(None, 0, None)
    popularity, pairs = result.variances
    statistics = statistics_of(result.total, (n, k), popularity_std=math.sqrt(popularity),
                               pair_std=math.sqrt(pairs))
    return Collected(statistics, result.survivors, result.epsilon, result.card())


def _problem(answer: StatisticsReply, shape: tuple[int, int]) -> str | None:
    for name, popularity, pairs in (("", answer.fit_popularity, answer.fit_pairs),
                                    ("serve-", answer.serve_popularity, answer.serve_pairs)):
        if popularity.shape != (shape[0],) or pairs.shape != shape:
            return (f"rejected ({name}shapes {popularity.shape} and {pairs.shape}, expected ({shape[0]},) and "
                    f"{shape})")
        if not (np.isfinite(popularity).all() and np.isfinite(pairs).all()):
            return "rejected (non-finite counts)"
    return None

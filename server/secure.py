"""The aggregator's side of a secure sum: SecAgg+ (runtime/secagg.py) driven over Flower's Grid in four exchanges.

1. setup: every connected merchant makes its key pairs and says what noise its ledger needs the sum to carry;
2. share keys: each gets its neighbours' public keys and returns its key shares, encrypted for each neighbour;
3. mask: each gets the shares addressed to it and the sum's noise, computes its release (its counts plus its noise
   share), masks it and sends it;
4. unmask: each survivor sends the shares that remove the survivors' masks (and those of merchants that dropped).

The aggregator sees public keys, ciphertexts it cannot read, masked vectors and key shares; it unmasks only the sum
of at least M − T survivors' vectors (T: ``[federation] secure_aggregation_dropouts``). What the protocol assumes
(README, "Secure aggregation"): the aggregator follows it, and at most T merchants drop out or collude with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.errors import ConfigError
from fedaug.common.protocol.messages import (
    SECURE_MASK,
    SECURE_SETUP,
    SECURE_SHARE,
    SECURE_UNMASK,
    SecureCiphertexts,
    SecureKeys,
    SecureMask,
    SecureMasked,
    SecureSetup,
    SecureShareKeys,
    SecureShares,
    SecureUnmask,
    SelectionRequest,
    StatisticsRequest,
)
from fedaug.common.records import merchant_name
from fedaug.runtime.secagg import AggregatorSecAgg, SecAggFailed, default_threshold
from fedaug.server.replies import query_reply, sender

MINIMUM = 3
"""The fewest merchants a secure sum is run with: with two, each could subtract its own vector from the sum."""
BITS = 32
"""Vectors are summed mod 2**32: counts of up to a few hundred million users, with their noise, fit."""
COMPLETE_UP_TO = 50
"""Every merchant is every other's neighbour up to this many merchants; beyond, SecAgg+'s ring of this degree."""


@dataclass(frozen=True)
class SecureSum:
    """What one secure sum gave the aggregator: the survivors' summed vector and how it was made."""

    total: np.ndarray
    """The survivors' vectors summed (signed int64)."""
    merchants: int
    """Merchants that took part (sent keys)."""
    survivors: int
    """Merchants whose vectors the sum holds."""
    tolerated: int
    """T: the dropouts and colluders the noise shares were sized for."""
    variances: tuple[float, ...]
    """The noise variance per part of the vector in the sum (the survivors' shares added)."""
    pooled: tuple[float, ...]
    """The variance per part one release needs (the largest any merchant's ledger asked for): what a trusted
    curator would add once, and what the merchants' pooled shares make up."""
    epsilon: float | None
    """The largest ε a private merchant reported after its release (None: none private)."""

    def card(self) -> dict:
        """How the release was made, for reports and model cards: the noise is "pooled" where the sum carries less
        than one whole noise per survivor (the merchants added shares), "local" where each added a whole one,
        "none" where no merchant added any."""
        single = sum(self.pooled)
        noise = ("none" if single == 0 else
                 "local" if sum(self.variances) >= self.survivors * single * (1 - 1e-9) else "pooled")
        return {"secure_aggregation": "SecAgg+", "noise": noise, "merchants": self.merchants,
                "survivors": self.survivors, "tolerated": self.tolerated,
                "noise_std": [round(math.sqrt(v), 3) for v in self.variances],
                "single_release_std": [round(math.sqrt(v), 3) for v in self.pooled]}


def enabled(settings: FederationSection, merchants: int) -> bool:
    """Whether this federation's releases go through secure sums: ``secure_aggregation`` true (refused below the
    protocol's minimum), or auto with at least MINIMUM merchants."""
    if settings.secure_aggregation is True and merchants < MINIMUM:
        raise ConfigError(f"federation.secure_aggregation = true needs at least {MINIMUM} merchants; "
                          f"{merchants} connected")
    return settings.secure_aggregation is True or (settings.secure_aggregation == "auto" and merchants >= MINIMUM)


def tolerated(settings: FederationSection, merchants: int) -> int:
    """T for ``merchants``: the setting, or a third of them (at least 1); always fewer than half."""
    wanted = settings.secure_aggregation_dropouts
    most = (merchants - 1) // 2
    t = max(1, merchants // 3) if wanted == "auto" else wanted
    if t > most:
        if wanted != "auto":
            raise ConfigError(f"federation.secure_aggregation_dropouts = {wanted}: with {merchants} merchants at most "
                              f"{most} (fewer than half) can be tolerated")
        t = most
    return t


def secure_sum(grid: Grid, settings: FederationSection, request: StatisticsRequest | SelectionRequest, *,
               length: int) -> SecureSum:
    """Run one secure sum of ``request``'s release (vectors of ``length``) over every connected merchant.

    Raises SecAggFailed (one line: the stage and why) where too few merchants are left to unmask a sum of at least
    M − T of them."""
    nodes = sorted(grid.get_node_ids())
    enabled(settings, len(nodes))  # (refuses fewer than the minimum)
    if len(nodes) < MINIMUM:
        raise SecAggFailed(f"setup: {len(nodes)} merchants connected, a secure sum needs {MINIMUM}")
    t = tolerated(settings, len(nodes))
    degree = None if len(nodes) - 1 <= COMPLETE_UP_TO else COMPLETE_UP_TO
    threshold = max(default_threshold(len(nodes) - 1 if degree is None else degree), len(nodes) - t)
    keys = _exchange(grid, settings, SECURE_SETUP, SecureKeys,
                     {n: SecureSetup(request=request, threshold=threshold, bits=BITS) for n in nodes})
    if len(keys) < threshold:
        raise SecAggFailed(f"setup: {len(keys)} of {len(nodes)} merchants sent keys, {threshold} needed")
    parts = {len(k.variances) for k in keys.values()}
    if len(parts) != 1:
        raise SecAggFailed(f"setup: the merchants asked for noise in {sorted(parts)} parts, one count expected")
    variances = tuple(float(v) for v in np.max([k.variances for k in keys.values()], axis=0))
    aggregator = AggregatorSecAgg(nodes=sorted(keys), length=length, bits=BITS, degree=degree, threshold=threshold)
    for node, answer in keys.items():
        aggregator.add_public_keys(node, (answer.encryption_key, answer.mask_key))
    shared = _exchange(grid, settings, SECURE_SHARE, SecureCiphertexts,
                       {n: SecureShareKeys(run_key=request.run_key, keys=aggregator.keys_for(n)) for n in keys})
    for node, answer in shared.items():
        aggregator.add_ciphertexts(node, answer.by_node)
    aggregator.check("share_keys")
    m, floor = len(keys), len(keys) - t
    masked = _exchange(grid, settings, SECURE_MASK, SecureMasked,
                       {n: SecureMask(request=request, ciphertexts=aggregator.ciphertexts_for(n), variances=variances,
                                      merchants=m, tolerated=t) for n in shared})
    if len(masked) < floor:
        raise SecAggFailed(f"mask: {len(masked)} of {m} merchants sent a masked vector; the noise shares need "
                           f"{floor} (T = {t})")
    for node, answer in masked.items():
        aggregator.add_masked(node, answer.vector)
    aggregator.check("mask")
    unmasks = {n: SecureUnmask(request.run_key, *map(tuple, aggregator.unmask_request(n))) for n in masked}
    shares = _exchange(grid, settings, SECURE_UNMASK, SecureShares, unmasks)
    for node, answer in shares.items():
        aggregator.add_shares(node, answer.by_node)
    total = aggregator.result()
    survivors = [masked[n] for n in aggregator.survivors]
    summed = tuple(float(v) for v in np.sum([s.share_variances for s in survivors], axis=0))
    epsilons = [s.epsilon for s in survivors if math.isfinite(s.epsilon)]
    log(INFO, "fedaug secure sum: the vectors of %d of %d merchants unmasked together, with the key shares of %d "
        "(T = %d)", len(survivors), m, len(shares), t)
    return SecureSum(total=total, merchants=m, survivors=len(survivors), tolerated=t, variances=summed,
                     pooled=variances, epsilon=max(epsilons, default=None))


def _exchange(grid: Grid, settings: FederationSection, message_type: str, reply_type: type,
              records: Mapping[int, object]) -> dict:
    """Send each merchant its record, wait for the replies; the decoded replies by node (errors, declines and
    undecodable replies are logged and left out: that merchant has dropped out)."""
    sent = [Message(record.encode(), dst_node_id=node, message_type=message_type) for node, record in records.items()]
    answers = {}
    for reply in grid.send_and_receive(sent, timeout=settings.round_timeout):
        node = sender(reply, sent)
        answer, problem = query_reply(reply, reply_type)
        if problem:
            log(WARNING, "fedaug secure sum (%s): %s: %s", message_type.removeprefix("query."),
                merchant_name(node, None, settings.names), problem)
            continue
        answers[node] = answer
    return answers

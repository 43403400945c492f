"""The merchant's side of a secure sum (runtime/secagg.py; the aggregator drives it from server/secure.py): four
ClientApp queries, one per SecAgg+ stage. Between them the merchant's protocol state (its secret keys, the key
shares it holds) lives in Flower's ``context.state`` for the run, under the federation's run key.

What it masks is its release — the DP statistics (client/releases.py ``secure_statistics``) or the run's selection
figures (``secure_selection``) — noised with its share of the pooled noise (or the whole noise, under ``[privacy]
noise = "local"``) and ledgered before it leaves.
A merchant that cannot afford the release declines at setup, or at the mask stage (then it counts as dropped).
"""

from __future__ import annotations

import math
import time

from flwr.app import ConfigRecord, Context, Message

from fedaug.client.ledger import BudgetExceeded
from fedaug.client.merchant import Merchant
from fedaug.client.releases import (
    candidate_figures,
    check_candidates,
    secure_selection,
    secure_statistics,
    selection_variance,
    statistics_variances,
)
from fedaug.client.round_log import MerchantRound, append_round
from fedaug.common.protocol.messages import (
    SecureCiphertexts,
    SecureKeys,
    SecureMask,
    SecureMasked,
    SecureSetup,
    SecureShareKeys,
    SecureShares,
    SecureUnmask,
    SelectionRequest,
)
from fedaug.runtime.secagg import MerchantSecAgg

STATE = "fedaug-secure-aggregation"
"""The record in Flower's ``context.state`` that keeps this merchant's protocol state, by run key."""


def setup(msg: Message, context: Context, merchant: Merchant) -> Message:
    """Make fresh key pairs for the sum and say what noise this merchant's ledger needs the sum to carry."""
    instruction = SecureSetup.decode(msg.content)
    request = instruction.request
    try:
        if isinstance(request, SelectionRequest):
            variances = (selection_variance(merchant.trainer, request),)
        else:
            check_candidates(request, merchant.model_config.n_items)
            variances = statistics_variances(merchant.trainer, request.run_key, request)
    except BudgetExceeded as exc:
        return Message(SecureKeys(partition=merchant.partition_id, decline=str(exc)).encode(), reply_to=msg)
    protocol = MerchantSecAgg.setup(node_id=context.node_id, threshold=instruction.threshold, bits=instruction.bits)
    _keep(context, instruction.request.run_key, protocol)
    encryption, masking = protocol.public_keys()
    reply = SecureKeys(encryption_key=encryption, mask_key=masking, variances=variances,
                       partition=merchant.partition_id)
    return Message(reply.encode(), reply_to=msg)


def share_keys(msg: Message, context: Context) -> Message:
    """Shamir-share this merchant's mask seed and masking key among its neighbours, each share encrypted for it."""
    instruction = SecureShareKeys.decode(msg.content)
    protocol = _protocol(context, instruction.run_key)
    ciphertexts = protocol.share_keys(instruction.keys)
    _keep(context, instruction.run_key, protocol)
    return Message(SecureCiphertexts(ciphertexts).encode(), reply_to=msg)


def mask(msg: Message, context: Context, merchant: Merchant) -> Message:
    """The release, noised with this merchant's share and ledgered, masked for the sum."""
    started = time.monotonic()
    instruction = SecureMask.decode(msg.content)
    request, trainer = instruction.request, merchant.trainer
    protocol = _protocol(context, request.run_key)
    try:
        if isinstance(request, SelectionRequest):
            exact = candidate_figures(request, merchant.split, merchant.device)
            vector, share = secure_selection(trainer, request, exact, variance=instruction.variances[0],
                                             merchants=instruction.merchants, tolerated=instruction.tolerated)
            shares, stage = (share,), "selection"
        else:
            check_candidates(request, merchant.model_config.n_items)
            vector, shares = secure_statistics(trainer, request, merchant.split.seen_sequences(),
                                               variances=instruction.variances, merchants=instruction.merchants,
                                               tolerated=instruction.tolerated)
            stage = "statistics"
    except BudgetExceeded as exc:
        return Message(SecureMasked(partition=merchant.partition_id, decline=str(exc)).encode(), reply_to=msg)
    masked = protocol.mask(instruction.ciphertexts, vector)
    _keep(context, request.run_key, protocol)
    epsilon = merchant.trainer.epsilon_spent()
    if merchant.state_dir is not None:
        append_round(merchant.state_dir, MerchantRound(
            round=0, run=request.run_key, declined=False, epsilon=None if math.isinf(epsilon) else epsilon,
            seconds=0.0, bytes_sent=int(masked.nbytes), stage=stage,
            work_seconds=round(time.monotonic() - started, 3)))
    reply = SecureMasked(vector=masked, share_variances=shares, epsilon=epsilon, partition=merchant.partition_id)
    return Message(reply.encode(), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """The key shares that remove the survivors' masks (seed shares) and the dropped ones' (masking-key shares)."""
    instruction = SecureUnmask.decode(msg.content)
    protocol = _protocol(context, instruction.run_key)
    shares = protocol.unmask_shares(active=instruction.active, dead=instruction.dead)
    _keep(context, instruction.run_key, protocol)
    return Message(SecureShares(shares).encode(), reply_to=msg)


def _keep(context: Context, run_key: str, protocol: MerchantSecAgg) -> None:
    record = context.state.get(STATE)
    if not isinstance(record, ConfigRecord):
        record = context.state[STATE] = ConfigRecord()
    record[run_key] = protocol.to_bytes()


def _protocol(context: Context, run_key: str) -> MerchantSecAgg:
    record = context.state.get(STATE)
    if not isinstance(record, ConfigRecord) or run_key not in record:
        raise ValueError(f"secure sum: no setup for run {run_key} in this merchant's state (it joined late, or "
                         "restarted mid-sum)")
    return MerchantSecAgg.from_bytes(record[run_key])

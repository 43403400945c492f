"""Sorting a round's replies: accepted updates, declines, errors, rejected updates and missing merchants.

Nothing a merchant sends reaches a strategy unchecked. Every reply is decoded into its typed record
(common/protocol/messages.py); one that does not decode is rejected with the reason. An accepted training reply is
rewritten to the update (decoded to fp32 weights) and one metric, the weight the strategy averages by, so every
strategy (and Flower's DP wrapper, which insists on identical metric keys) sees one shape. A private merchant
withholds its user count (outside its accounting): where any accepted merchant did, the round weighs every update
equally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedaug.common.protocol.messages import (
    EvaluateReply,
    ProtocolError,
    TrainReply,
    Update,
    for_strategy,
    set_strategy_arrays,
    strategy_arrays,
)
from fedaug.common.records import WITHHELD, merchant_name
from fedaug.server.strategies import WEIGHT

Reply = TypeVar("Reply")


@dataclass
class MerchantOutcome:
    """What a round learned about one merchant from its reply."""

    status: str
    """ok, error, declined, rejected, missing, or (evaluation) withheld."""
    reason: str | None = None
    epsilon: float | None = None
    """The ε the merchant reported spent (None: non-private, or not reported)."""
    partition: int | None = None
    users: int | None = None
    train_loss: float | None = None
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    """An evaluation's figures per stage."""


@dataclass
class RoundReplies:
    accepted: list[Message] = field(default_factory=list)
    merchants: dict[int, MerchantOutcome] = field(default_factory=dict)
    """node id -> what this round learned about the merchant."""
    bytes_received: int = 0

    def with_status(self, *statuses: str) -> dict[int, MerchantOutcome]:
        return {node: m for node, m in self.merchants.items() if m.status in statuses}

    def problems(self, names: dict[str, str] | None = None) -> list[str]:
        """One ``merchant: status (reason)`` entry per merchant that did not contribute."""
        return [f"{merchant_name(node, m.partition, names)}: {m.status}" + (f" ({m.reason})" if m.reason else "")
                for node, m in sorted(self.merchants.items()) if m.status != "ok"]


def sort_train_replies(sent: Iterable[Message], replies: Iterable[Message], reference: dict[str, np.ndarray],
                       uniform_weights: bool) -> RoundReplies:
    """Check every training reply against the global model ``reference`` (same keys, shapes, dtypes; finite)."""
    out = RoundReplies()
    sent = list(sent)
    expected = {m.metadata.dst_node_id for m in sent}
    accepted: list[tuple[int, Message, ArrayRecord, TrainReply]] = []  # sender, reply, decoded weights, record
    for reply in replies:
        node = sender(reply, sent)
        expected.discard(node)
        if reply.has_error():
            out.merchants[node] = MerchantOutcome("error", reply.error.reason)
            continue
        try:
            answer = TrainReply.decode(reply.content)
        except ProtocolError as exc:
            out.merchants[node] = MerchantOutcome("rejected", str(exc))
            continue
        info = MerchantOutcome("ok", epsilon=answer.epsilon if math.isfinite(answer.epsilon) else None,
                               partition=answer.partition, users=answer.figures.users if answer.figures else None,
                               train_loss=answer.figures.train_loss if answer.figures else None)
        if answer.decline is not None:
            info.status, info.reason = "declined", answer.decline
            out.merchants[node] = info
            continue
        arrays, problem = _weights(answer.update, reference)
        problem = problem or _check_update(arrays, reference)
        if problem:
            info.status, info.reason = "rejected", problem
            out.merchants[node] = info
            continue
        out.bytes_received += answer.update.nbytes
        accepted.append((node, reply, arrays, answer))
        out.merchants[node] = info
    # In a fixed order (a simulation's partition, else the node id), not arrival order: float sums then do not
    # depend on which merchant finished first, so a run on a cluster aggregates exactly as on one machine.
    accepted.sort(key=lambda entry: (-1 if entry[3].partition is None else entry[3].partition, entry[0]))
    counted = all(answer.figures is not None for *_, answer in accepted)
    for _, reply, arrays, answer in accepted:
        users = float(answer.figures.users) if answer.figures is not None else 1.0
        reply.content = for_strategy({WEIGHT: users if counted and not uniform_weights else 1.0}, arrays)
        out.accepted.append(reply)
    for node in sorted(expected):
        out.merchants[node] = MerchantOutcome("missing", "no reply before the round timeout")
    return out


def sort_evaluate_replies(sent: Iterable[Message], replies: Iterable[Message]
                          ) -> tuple[list[Message], dict[int, MerchantOutcome]]:
    """Evaluation replies with finite figures and a positive user count (rewritten to weigh by users); a private
    merchant's withheld metrics are its right, not a fault."""
    accepted, merchants, sent = [], {}, list(sent)
    for reply in replies:
        node = sender(reply, sent)
        if reply.has_error():
            merchants[node] = MerchantOutcome("error", reply.error.reason)
            continue
        try:
            answer = EvaluateReply.decode(reply.content)
        except ProtocolError as exc:
            merchants[node] = MerchantOutcome("rejected", f"evaluation metrics missing or not finite ({exc})")
            continue
        if answer.withheld:
            merchants[node] = MerchantOutcome(WITHHELD, "private: metrics on its users are outside its ε",
                                              partition=answer.partition)
            continue
        reply.content = for_strategy(answer.flat() | {WEIGHT: float(answer.users)})
        accepted.append(reply)
        merchants[node] = MerchantOutcome("ok", partition=answer.partition, users=answer.users,
                                          figures=answer.figures)
    return accepted, merchants


def query_reply(reply: Message, record: type[Reply]) -> tuple[Reply | None, str | None]:
    """A reply to a one-off query (statistics, selection) decoded as ``record``, or why it carries no release: an
    error, a reply that does not decode, or the merchant declined (its budget)."""
    if reply.has_error():
        return None, f"error ({reply.error.reason})"
    try:
        answer = record.decode(reply.content)
    except ProtocolError as exc:
        return None, f"rejected ({exc})"
    if answer.decline is not None:
        return None, f"declined ({answer.decline})"
    return answer, None


def sender(reply: Message, sent: list[Message]) -> int:
    """The merchant a reply answers for: the node its message was sent to. Flower's own error replies (say, for a
    node that stopped sending heartbeats) do not come from that node, so their source id would misname it."""
    answered = reply.metadata.reply_to_message_id
    for message in sent:
        if answered and message.metadata.message_id == answered:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def _weights(update: Update, reference: dict[str, np.ndarray]) -> tuple[ArrayRecord | None, str | None]:
    """The update as fp32 weights (de-quantised when it came compressed), and why it cannot be read (or None)."""
    if update.compression == "none":
        return update.arrays, None
    try:
        weights = update.weights(reference)
    except Exception as exc:  # noqa: BLE001  (a malformed compressed update is the sender's fault, not ours)
        return None, str(exc) if isinstance(exc, ValueError) else f"compression: cannot be decoded ({exc!r})"
    return ArrayRecord({k: Array(v) for k, v in weights.items()}), None


def _check_update(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> str | None:
    """Why this update cannot be aggregated, or None."""
    if set(arrays.keys()) != set(reference):
        extra, lacking = set(arrays.keys()) - set(reference), set(reference) - set(arrays.keys())
        return (f"array keys differ from the global model (unexpected {sorted(extra)[:3]}, "
                f"missing {sorted(lacking)[:3]})")
    for key, ref in reference.items():
        try:
            value = arrays[key].numpy()
        except Exception as exc:  # noqa: BLE001  (a malformed array is the sender's fault, not ours)
            return f"array {key!r} cannot be decoded ({exc.__class__.__name__})"
        if value.shape != ref.shape:
            return f"array {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"array {key!r} has dtype {value.dtype}, expected {ref.dtype}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"array {key!r} contains NaN or Inf"
    return None


def bound_norms(accepted: list[Message], reference: dict[str, np.ndarray], factor: float) -> dict[int, float]:
    """Clip each accepted update's distance from ``reference`` to ``factor`` × the median distance, in place;
    returns {node: distance before clipping} for the updates that were clipped."""
    if factor <= 0 or not accepted:
        return {}
    distances = []
    for reply in accepted:
        arrays = strategy_arrays(reply.content)
        distances.append(math.sqrt(sum(float(((arrays[k].numpy().astype(np.float64) - reference[k]) ** 2).sum())
                                       for k in reference)))
    bound = factor * float(np.median(distances))
    clipped = {}
    for reply, distance in zip(accepted, distances, strict=True):
        if distance <= bound or distance == 0:
            continue
        arrays = strategy_arrays(reply.content)
        scale = bound / distance
        set_strategy_arrays(reply.content, ArrayRecord({
            k: Array((reference[k] + scale * (arrays[k].numpy() - reference[k])).astype(reference[k].dtype))
            for k in reference}))
        clipped[reply.metadata.src_node_id] = distance
    return clipped

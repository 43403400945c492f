"""Sorting a round's replies: accepted updates, declines, errors, rejected updates and missing merchants.

Nothing a merchant sends reaches a strategy unchecked. An accepted training reply is rewritten to exactly
``{"arrays": <the update>, "metrics": {weight, num-examples, train_loss}}`` so every strategy (and Flower's DP
wrapper, which insists on identical metric keys) sees one shape. A private merchant withholds its user count and
loss (outside its accounting): where any accepted merchant did, the round weighs every update equally.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedaug.common.protocol.codec import Encoded, decode
from fedaug.common.records import WITHHELD, merchant_name
from fedaug.server.strategies import WEIGHT


@dataclass
class RoundReplies:
    accepted: list[Message] = field(default_factory=list)
    merchants: dict[int, dict] = field(default_factory=dict)
    """node id -> what this round learned about the merchant (status, ε, users, loss, reason)."""
    bytes_received: int = 0

    def with_status(self, *statuses: str) -> dict[int, dict]:
        return {node: m for node, m in self.merchants.items() if m["status"] in statuses}

    def problems(self, names: dict[str, str] | None = None) -> list[str]:
        """One ``merchant: status (reason)`` entry per merchant that did not contribute."""
        return [f"{merchant_name(node, m.get('partition-id'), names)}: {m['status']}"
                + (f" ({m['reason']})" if m.get("reason") else "")
                for node, m in sorted(self.merchants.items()) if m["status"] != "ok"]


def sort_train_replies(sent: Iterable[Message], replies: Iterable[Message], reference: dict[str, np.ndarray],
                       uniform_weights: bool) -> RoundReplies:
    """Check every training reply against the global model ``reference`` (same keys, shapes, dtypes; finite)."""
    out = RoundReplies()
    sent = list(sent)
    expected = {m.metadata.dst_node_id for m in sent}
    accepted: list[tuple[Message, dict]] = []  # with the metrics each reported
    for reply in replies:
        node = _sender(reply, sent)
        expected.discard(node)
        if reply.has_error():
            out.merchants[node] = {"status": "error", "reason": reply.error.reason}
            continue
        metrics = _metrics_of(reply)
        info = {"status": "ok", **_reported(metrics)}
        if metrics.get("declined") == 1:
            reason = reply.content["decline"]["reason"] if "decline" in reply.content else "declined"
            out.merchants[node] = info | {"status": "declined", "reason": str(reason)}
            continue
        arrays, size, problem = _decoded(reply, reference)
        problem = problem or _check_update(arrays, metrics, reference)
        if problem:
            out.merchants[node] = info | {"status": "rejected", "reason": problem}
            continue
        out.bytes_received += size
        accepted.append((reply, arrays, metrics))
        out.merchants[node] = info
    # In a fixed order (a simulation's partition, else the node id), not arrival order: float sums then do not
    # depend on which merchant finished first, so a run on a cluster aggregates exactly as on one machine.
    accepted.sort(key=lambda entry: (entry[2].get("partition-id", -1), _sender(entry[0], sent)))
    counted = all("num-examples" in metrics for _, _, metrics in accepted)
    for reply, arrays, metrics in accepted:
        users = float(metrics.get("num-examples", 1.0))
        reply.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({
            WEIGHT: users if counted and not uniform_weights else 1.0, "num-examples": users,
            "train_loss": float(metrics.get("train_loss", 0.0))})})
        out.accepted.append(reply)
    for node in sorted(expected):
        out.merchants[node] = {"status": "missing", "reason": "no reply before the round timeout"}
    return out


def sort_evaluate_replies(sent: Iterable[Message], replies: Iterable[Message]) -> tuple[list[Message], dict[int, dict]]:
    """Evaluation replies with finite metrics and a positive user count (rewritten to weigh by users); a private
    merchant's withheld metrics are its right, not a fault."""
    accepted, merchants, sent = [], {}, list(sent)
    for reply in replies:
        node = _sender(reply, sent)
        if reply.has_error():
            merchants[node] = {"status": "error", "reason": reply.error.reason}
            continue
        metrics = _metrics_of(reply)
        if metrics.get(WITHHELD) == 1:
            merchants[node] = {"status": WITHHELD, "reason": "private: metrics on its users are outside its ε"}
            continue
        values = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        users = values.get("num-examples", 0)
        if not users or users <= 0 or not all(math.isfinite(v) for v in values.values()):
            merchants[node] = {"status": "rejected", "reason": "evaluation metrics missing or not finite"}
            continue
        reply.content = RecordDict({"metrics": MetricRecord(values | {WEIGHT: float(users)})})
        accepted.append(reply)
        merchants[node] = {"status": "ok", **values}
    return accepted, merchants


def query_problem(reply: Message) -> str | None:
    """Why a reply to a one-off query (statistics, selection) carries no release: an error, no metrics, or the
    merchant declined (its budget); None when it does."""
    if reply.has_error():
        return f"error ({reply.error.reason})"
    metrics = reply.content.get("metrics")
    if metrics is None:
        return "no metrics"
    if int(metrics.get("declined", 0)):
        return f"declined ({reply.content['decline']['reason']})"
    return None


def _sender(reply: Message, sent: list[Message]) -> int:
    """The merchant a reply answers for: the node its message was sent to. Flower's own error replies (say, for a
    node that stopped sending heartbeats) do not come from that node, so their source id would misname it."""
    answered = reply.metadata.reply_to_message_id
    for message in sent:
        if answered and message.metadata.message_id == answered:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def _decoded(reply: Message, reference: dict[str, np.ndarray]) -> tuple[ArrayRecord | None, int, str | None]:
    """The reply's update as fp32 weights (de-quantised when it came compressed), the bytes it took on the wire,
    and why it cannot be read (or None)."""
    arrays = reply.content.array_records.get("arrays") if reply.content else None
    if arrays is None:
        return None, 0, None
    size = sum(len(a.data) for a in arrays.values())
    spec = reply.content.config_records.get("compression")
    if spec is None:
        return arrays, size, None
    try:
        kind, keys, scales = str(spec["kind"]), list(spec.get("keys", [])), list(spec.get("scales", []))
        if len(keys) != len(scales):
            raise ValueError("compression: keys and scales differ in length")
        encoded = Encoded(kind, {k: a.numpy() for k, a in arrays.items()}, dict(zip(keys, map(float, scales),
                                                                                    strict=True)))
        weights = decode(encoded, reference)
    except Exception as exc:  # noqa: BLE001  (a malformed compressed update is the sender's fault, not ours)
        return None, 0, str(exc) if isinstance(exc, ValueError) else f"compression: cannot be decoded ({exc!r})"
    return ArrayRecord({k: Array(v) for k, v in weights.items()}), size + 4 * len(scales), None


def _metrics_of(reply: Message) -> dict:
    if reply.content is None or "metrics" not in reply.content.metric_records:
        return {}
    return dict(reply.content.metric_records["metrics"])


def _reported(metrics: dict) -> dict:
    """The merchant's self-reported figures worth keeping (ε = -1 means non-private)."""
    keep = ("epsilon", "num-examples", "train_loss", "partition-id", "noise_multiplier", "seconds")
    return {k: metrics[k] for k in keep if isinstance(metrics.get(k), int | float)}


def _check_update(arrays: ArrayRecord | None, metrics: dict, reference: dict[str, np.ndarray]) -> str | None:
    """Why this update cannot be aggregated, or None."""
    if arrays is None:
        return "no 'arrays' record in the reply"
    if not isinstance(metrics.get("epsilon"), int | float):
        return "no 'metrics' record with the merchant's epsilon in the reply"
    users = metrics.get("num-examples", 1)  # withheld by a private merchant
    if not isinstance(users, int | float) or isinstance(users, bool) or not math.isfinite(users) or users <= 0:
        return "num-examples not positive or not finite"
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
        arrays = reply.content["arrays"]
        distances.append(math.sqrt(sum(float(((arrays[k].numpy().astype(np.float64) - reference[k]) ** 2).sum())
                                       for k in reference)))
    bound = factor * float(np.median(distances))
    clipped = {}
    for reply, distance in zip(accepted, distances, strict=True):
        if distance <= bound or distance == 0:
            continue
        arrays = reply.content["arrays"]
        scale = bound / distance
        reply.content["arrays"] = ArrayRecord({k: Array((reference[k] + scale * (arrays[k].numpy() - reference[k]))
                                                        .astype(reference[k].dtype)) for k in reference})
        clipped[reply.metadata.src_node_id] = distance
    return clipped

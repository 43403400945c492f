"""What the aggregator tells its operators: Prometheus gauges on /metrics and a JSONL log of every round.

The JSONL file is rewritten (atomically) from the checkpoint's history after each round, so a resumed run's log
has every round exactly once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.records import OnRound, RoundRecord

ROUND_LOG = "rounds.jsonl"


class Monitor:
    def __init__(self, state_dir: Path, port: int = 0):
        self.state_dir = Path(state_dir)
        self.registry = CollectorRegistry()  # our own, so two servers in one process (tests) don't collide
        r = self.registry
        self.round = Gauge("fedaug_round", "Last completed federated round", registry=r)
        self.participants = Gauge("fedaug_round_participants", "Merchants whose update was aggregated", registry=r)
        self.failures = Counter("fedaug_merchant_failures", "Merchant replies not aggregated, by kind",
                                ["kind"], registry=r)
        self.ndcg = Gauge("fedaug_global_ndcg_at_10", "Global model NDCG@10 (validation)", registry=r)
        self.hr = Gauge("fedaug_global_hr_at_10", "Global model HR@10 (validation)", registry=r)
        self.loss = Gauge("fedaug_train_loss", "User-weighted mean merchant training loss", registry=r)
        self.epsilon_max = Gauge("fedaug_merchant_epsilon_max", "Largest ε any merchant reports", registry=r)
        self.epsilon_mean = Gauge("fedaug_merchant_epsilon_mean", "Mean ε merchants report", registry=r)
        self.epsilon = Gauge("fedaug_merchant_epsilon", "ε each merchant last reported, by merchant name",
                             ["merchant"], registry=r)
        self.seconds = Gauge("fedaug_round_seconds", "Wall time of the last completed round", registry=r)
        self.central_epsilon = Gauge("fedaug_central_epsilon", "Client-level (central DP) ε", registry=r)
        self.bytes = Counter("fedaug_bytes_received", "Bytes of accepted model updates received", registry=r)
        self.server = None
        if port:
            self.server, _ = start_http_server(port, registry=self.registry)

    def record(self, entry: RoundRecord, history: list[RoundRecord], merchants: dict[str, dict] | None = None) -> None:
        """Publish one finished round (``entry``) and rewrite the round log from ``history``; ``merchants``: the
        checkpoint's merchant records (name, last reported ε)."""
        self.round.set(entry.round)
        for merchant in (merchants or {}).values():
            if merchant.get("epsilon") is not None:
                self.epsilon.labels(merchant["name"]).set(merchant["epsilon"])
        self.participants.set(entry.participants or 0)
        for kind, count in entry.failures.items():
            if count:
                self.failures.labels(kind).inc(count)
        if entry.valid and "ndcg@10" in entry.valid:
            self.ndcg.set(entry.valid["ndcg@10"])
            self.hr.set(entry.valid["hr@10"])
        for gauge, value in ((self.loss, entry.train_loss), (self.epsilon_max, entry.epsilon_max),
                             (self.seconds, entry.seconds),
                             (self.epsilon_mean, entry.epsilon_mean), (self.central_epsilon, entry.central_epsilon)):
            if value is not None:
                gauge.set(value)
        self.bytes.inc(entry.bytes_received)
        lines = "".join(json.dumps(h.to_json()) + "\n" for h in history)
        write_bytes_atomic(self.state_dir / ROUND_LOG, lines.encode())

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class RoundWatcher:
    """Reports rounds as the server logs them (the ServerApp runs inside Flower, out of our call stack)."""

    def __init__(self, state_dir: Path, total: int, on_round: OnRound | None):
        self.path, self.total, self.on_round = state_dir / ROUND_LOG, total, on_round
        self._seen = self._count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _count(self) -> int:
        try:
            return len(self.path.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            for line in lines[self._seen:]:
                entry = RoundRecord.from_json(json.loads(line))
                if self.on_round:
                    self.on_round(entry.round, self.total, entry)
            self._seen = max(self._seen, len(lines))

    def start(self) -> None:
        if self.on_round:
            self.on_round(self._seen, self.total, None)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

"""Results as typed records, defined once: a round, a merchant's figures, the privacy a run was trained under, and
a run's metrics.json — which every command writes through ``write_metrics`` alone.

Metric maps (``{"ndcg@10": ..., "hr@10": ...}``, fedaug.common.model.metrics.METRIC_NAMES) stay plain dicts. JSON has no
infinity: a non-private ε is written as the string "inf".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fedaug.common.atomic import write_json_atomic

Metrics = dict[str, float]


def merchant_name(node: int | str | None, partition_id: int | float | None = None,
                  names: dict[str, str] | None = None) -> str:
    """How every log, report and status line names a merchant: its registered name where the aggregator gave one
    (merchant-1 for merchant-1.pub), merchant-N for a simulation's partition N (as its state folder is named),
    else its Flower node id."""
    if names and str(node) in names:
        return names[str(node)]
    if isinstance(partition_id, int | float) and partition_id >= 0:
        return f"merchant-{int(partition_id)}"
    return f"node {node}"


def federation_name(run_key: str, flower_runs: list[int] | tuple[int, ...] = ()) -> str:
    """How output names a federation: its own key (what merchants' ledgers record its rounds under), with the
    Flower run ids it ran under (what `flwr ls` and Flower's logs show; a resumed federation has several)."""
    runs = ", ".join(str(r) for r in flower_runs)
    flower = f" (Flower run{'s' if len(flower_runs) > 1 else ''} {runs})" if flower_runs else ""
    return f"federation {run_key[:12]}…{flower}" if len(run_key) > 12 else f"federation {run_key}{flower}"


WITHHELD = "withheld"
"""Set (1) in a merchant's evaluation reply whose metrics it keeps to itself: computed on a private merchant's
users, they lie outside its accounted ε (client/client_app.py sends it, server/replies.py honours it)."""


@dataclass
class MerchantWork:
    """The merchants' own work in one round, beside the engine's wall time: what a simulation, which hosts every
    merchant, reads from their round logs (client/round_log.py); a deployed aggregator never sees it."""

    seconds: dict[str, float] = field(default_factory=dict)
    """Merchant -> its handlers' own time this round: training (or scoring) and encoding the reply."""
    setup: dict[str, float] = field(default_factory=dict)
    """Merchant -> time spent building its state for this round's messages (data slice, split, trainer, ledger)."""
    lanes: int = 1
    """Merchants the engine can run at once (its actors)."""
    nodes: dict[str, str] = field(default_factory=dict)
    """Merchant -> the Ray node that ran its training (simulations on a Ray cluster)."""

    def ideal(self) -> float:
        """The least wall time the merchants' own work needs on ``lanes`` lanes: the busiest merchant, or the
        total spread evenly, whichever is longer (on at least as many lanes as merchants: the busiest one)."""
        work = list(self.seconds.values())
        return max(max(work, default=0.0), sum(work) / max(self.lanes, 1))


@dataclass
class RoundRecord:
    """One finished round: of a federation (fedaug.server.federation), or of a merchant or pooled run training alone."""

    round: int
    train_loss: float | None = None
    """User-weighted mean training loss of the merchants aggregated."""
    epsilon_max: float | None = None
    """Largest ε any merchant had spent after this round (None: nobody private)."""
    epsilon_mean: float | None = None
    seconds: float | None = None
    participants: int | None = None
    """Merchants whose update was aggregated."""
    attempts: int = 1
    failures: dict[str, int] = field(default_factory=dict)
    """Replies not aggregated, by kind: error, declined, rejected, missing."""
    problems: list[str] = field(default_factory=list)
    bytes_received: int = 0
    central_epsilon: float | None = None
    central_delta: float | None = None
    valid: Metrics | None = None
    """Validation of the model after this round: on every user at once where the runner has them all (a
    simulation's central evaluation, a merchant alone, pooled training), else the merchants' federated one."""
    test: Metrics | None = None
    """Test metrics of the same kind, for the final round."""
    federated_valid: Metrics | None = None
    """The merchants' own validation of the global model, user-weighted."""
    federated_test: Metrics | None = None
    federated_merchants: int = 0
    fusion_weight: float | None = None
    """Weight of the public text prior fused with the global model, chosen on this round's validation (inf: the
    prior alone)."""
    model_valid: Metrics | None = None
    """Validation of the global model alone, before fusion with the prior."""
    budgets_spent: bool = False
    """Every merchant declined this round for its privacy budget: the model stayed as it was and the federation
    ended here (a run whose budgets are spent before round 1 is the public prior, with its DP statistics)."""
    train_seconds: float | None = None
    """Wall time of the round's training phase: sending, waiting for the merchants, checking, aggregating."""
    evaluate_seconds: float | None = None
    """Wall time of the merchants' federated evaluation."""
    central_seconds: float | None = None
    """Wall time of the server's central evaluation (simulations)."""
    work: MerchantWork | None = None
    """The merchants' own work (simulations)."""

    @property
    def engine_seconds(self) -> float | None:
        """Wall time spent waiting on merchants: the training and federated evaluation phases."""
        if self.train_seconds is None:
            return None
        return self.train_seconds + (self.evaluate_seconds or 0.0)

    @property
    def overhead(self) -> float | None:
        """Engine overhead: the merchant phases' wall time beyond what the merchants' own work needs on the
        engine's lanes (``MerchantWork.ideal``) — scheduling, serialisation, building merchant state."""
        if self.work is None or self.engine_seconds is None:
            return None
        return self.engine_seconds - self.work.ideal()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> RoundRecord:
        names = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in values.items() if k in names})
        if isinstance(record.fusion_weight, str):  # metrics.json writes an infinite weight as "inf"
            record.fusion_weight = float(record.fusion_weight)
        if isinstance(record.work, dict):
            record.work = MerchantWork(**record.work)
        return record


OnRound = Callable[[int, int, RoundRecord | None], None]
"""``on_round(done, total, record)``: progress of a run, by rounds (or merchants); record None where there is none."""


@dataclass
class MerchantRecord:
    merchant: int
    """Partition id in a simulation, -1 when deployed (then ``node`` names it)."""
    users: int | None = None
    epsilon: float | None = None
    epsilon_by_round: dict[str, float] = field(default_factory=dict)
    test: Metrics | None = None
    node: str | None = None
    name: str | None = None
    """As logs and status name it (merchant_name)."""
    epsilon_releases: dict[str, float] = field(default_factory=dict)
    """The merchant's ε after each release before round 1, in ledger order ("selection": the DP evaluation's
    reservation, "statistics"), where its ledger is at hand (simulations, a merchant alone)."""

    @property
    def label(self) -> str:
        return self.name or merchant_name(self.node, self.merchant)


@dataclass
class PrivacyRecord:
    """What a run's privacy amounts to; fields that do not apply to a run stay None."""

    epsilon_budget: float | None = None
    epsilon_max: float | None = None
    """The most ε any merchant (or the one merchant, or the pooled trainer) spent."""
    epsilon_mean: float | None = None
    delta: float | str | None = None
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    grad_sample_mode: str | None = None
    central: dict | None = None
    """Client-level DP added by the server: epsilon, delta, noise_multiplier, clipping_norm."""


@dataclass
class FusionRecord:
    """A trained model's scores fused with the public text prior's (common/priors/fusion.py), weight chosen on
    validation; ``model_test`` / ``model_valid``: the model alone."""

    weight: float
    tried: list[dict]
    model_test: Metrics
    model_valid: Metrics | None
    model_test_cold: Metrics | None = None
    """The model alone on the test users whose target item is cold (see RunMetrics.test_cold)."""


@dataclass
class RunMetrics:
    """metrics.json of every run. ``mode``: baseline | merchant (one merchant alone) | federated | local (every
    simulated merchant alone) | central (all data pooled) | deployed."""

    mode: str
    test: Metrics | None
    valid: Metrics | None
    seconds: float
    data: dict
    config: dict
    privacy: PrivacyRecord | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    merchants: list[MerchantRecord] = field(default_factory=list)
    test_users: int | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    stopped_by: str | None = None
    history: list[dict] = field(default_factory=list)
    """Baseline: loss and validation NDCG@10 per epoch."""
    augment_views: int | None = None
    federated_test: Metrics | None = None
    run_key: str | None = None
    baselines: dict[str, Metrics] = field(default_factory=dict)
    attack: dict | None = None
    defence: str | None = None
    merchants_total: int | None = None
    merchant_keys: dict[str, str] | None = None
    best_round: int | None = None
    """Federations: the round whose global model validated best (the one kept), and its metrics."""
    best_valid: Metrics | None = None
    best_test: Metrics | None = None
    test_cold: Metrics | None = None
    """Test metrics over the users whose target item had fewer than COLD_BELOW training interactions."""
    baselines_cold: dict[str, Metrics] = field(default_factory=dict)
    """The same for the baselines (popularity, text prior)."""
    baselines_valid: dict[str, Metrics] = field(default_factory=dict)
    """The baselines' validation metrics (the references of the per-round validation plot)."""
    cold_users: int | None = None
    test_by_type: dict[str, dict] | None = None
    """Test metrics (and ``users``) by the type of each user's test event, for data with several event types."""
    fusion: FusionRecord | None = None
    model: str | None = None
    """The model as built for this data (catalog attributes only where the data has them)."""
    gain_over_text: dict[str, dict] | None = None
    """Federations with item texts: the final (``final``) and best-validation (``best``) global model's test
    NDCG@10, each with its mean per-user gain over the text prior alone and that gain's 95 % interval."""
    selection: str | None = None
    """How the model handed out was chosen: "private" (public settings and accounted releases only) or
    "pooled validation (not private)" (the research switch: choices read every merchant's held-out users)."""
    product: str | None = None
    """What the model handed out is made of, in one phrase (fedaug.common.priors.composite.product_kind)."""
    parts: dict | None = None
    """Its bundle card's parts: each part, its weight and settings."""
    flower_runs: list[int] = field(default_factory=list)
    """Federations: the Flower run ids the federation (``run_key``) ran under, one per start (a resume is a new
    Flower run)."""

    def to_json(self) -> dict:
        values = asdict(self)
        values["rounds"] = [r.to_json() for r in self.rounds]
        return _json_safe(values)

    @classmethod
    def from_json(cls, values: dict) -> RunMetrics:
        """A metrics.json read back (keys this fedaug does not know are left out; "inf" is infinity again)."""

        def known(kind, record: dict) -> dict:
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in record.items() if k in names}

        def number(value):
            return math.inf if value == "inf" else value

        out = known(cls, values)
        if out.get("privacy"):
            privacy = known(PrivacyRecord, out["privacy"])
            out["privacy"] = PrivacyRecord(**privacy | {k: number(privacy.get(k)) for k in
                                                        ("epsilon_budget", "epsilon_max", "epsilon_mean")})
        out["rounds"] = [RoundRecord.from_json(r) for r in out.get("rounds", [])]
        out["merchants"] = [MerchantRecord(**known(MerchantRecord, m) | {"epsilon": number(m.get("epsilon"))})
                            for m in out.get("merchants", [])]
        if out.get("fusion"):
            fusion = known(FusionRecord, out["fusion"])
            out["fusion"] = FusionRecord(**fusion | {"weight": float(fusion["weight"])})
        return cls(**out)


def _json_safe(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(out: Path, metrics: RunMetrics) -> dict:
    """``out/metrics.json`` (atomically); returns what was written."""
    values = metrics.to_json()
    write_json_atomic(Path(out) / "metrics.json", values)
    return values


@dataclass(frozen=True)
class RunSpend:
    """What one run (a federation's run key, or one `fedaug local` run) took from a merchant's budget."""

    run_id: str
    rounds: int
    """DP rounds recorded (a round trained again counts again)."""
    last_round: int
    epsilon_after: float
    """The merchant's total ε after this run's last recorded round (composition over everything before it)."""


@dataclass(frozen=True)
class LedgerStatus:
    """One merchant's privacy ledger, as `fedaug status` shows it."""

    state_dir: str
    epsilon: float
    """ε spent so far (after the last recorded round, at that round's δ)."""
    delta: float | None
    rounds: int
    runs: list[RunSpend]
    last_recorded: str | None
    """ISO-8601 UTC time of the last recorded round."""


@dataclass(frozen=True)
class FederationStatus:
    """An aggregator's (or a simulation's server's) checkpoint, as `fedaug status` shows it."""

    state_dir: str
    run_key: str
    strategy: str
    round: int
    """Last completed round."""
    best_round: int
    valid_ndcg10: float | None
    """Validation NDCG@10 after the last completed round."""
    epsilon_max: float | None
    """Largest ε any merchant had spent after the last completed round (None: non-private)."""
    merchants: dict[str, float | None]
    """Merchant (node id, or partition) -> ε it reported last."""
    model: str | None
    """The final model bundle's folder, where one was written."""
    product: str | None = None
    """What that model is made of (fedaug.common.priors.composite.product_kind)."""
    selection_valid_ndcg10: float | None = None
    """The validation NDCG@10 of the model handed out as the merchants' federated DP evaluation released it (a
    noised estimate; None: no evaluation ran)."""
    flower_runs: list[int] = field(default_factory=list)
    """The Flower run ids this federation ran under (``run_key`` is the federation's own key)."""


@dataclass(frozen=True)
class StatusReport:
    state_dir: str
    federations: list[FederationStatus]
    ledgers: list[LedgerStatus]

    def to_json(self) -> dict:
        return _json_safe(asdict(self))

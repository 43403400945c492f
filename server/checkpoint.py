"""The aggregator's checkpoint: everything needed to resume at the next round, in one atomically replaced file.

``state-dir/checkpoint.npz`` holds the global arrays, the strategy's state (FedAdam / FedYogi moments), and a JSON
record with the last completed round, the run key merchants account under, the central-DP accountant and the
metric history. A crash leaves the previous round's checkpoint; the restarted server redoes only the round that
was cut short.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.errors import ConfigError
from fedaug.common.priors.dp_counts import Counts, Statistics
from fedaug.common.records import FederationStatus, RoundRecord, merchant_name

CHECKPOINT = "checkpoint.npz"
PARTITION, USERS = "partition-id", "num-examples"
"""Keys of a merchant's entry in ``ServerState.merchants`` (beside status, name, ε, epsilon_by_round, users and the
stages' figures): its simulation partition and its training user count, as it last reported them."""


@dataclass
class ServerState:
    run_key: str
    """Stable across restarts: merchants record this run's rounds in their ledgers under it."""
    strategy: str
    round: int = 0
    """Last completed round (0: none yet)."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    accountant: dict | None = None
    history: list[RoundRecord] = field(default_factory=list)
    merchants: dict[str, dict] = field(default_factory=dict)
    """node id (as text) -> latest figures: ε, users, partition-id, per-round ε."""
    best_round: int = 0
    """The round whose global model validated best so far (0: none validated); its arrays are ``best_arrays``."""
    best_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    best_test: dict | None = None
    """Test metrics of the best round's model, evaluated once the last round is done (simulations)."""
    statistics: Statistics | None = None
    """The merchants' summed DP collaborative statistics, collected once before round 1."""
    statistics_merchants: int = 0
    statistics_epsilon: float | None = None
    """The largest ε a private merchant reported after its statistics release (and its selection reservation)."""
    statistics_release: dict | None = None
    """How the statistics were released: secure aggregation or none, pooled or local noise (server/statistics.py)."""
    budgets_spent: bool = False
    """The federation ended before its last round: every merchant declined for its privacy budget."""
    selection: dict | None = None
    """The federated DP evaluation's choice of the trained model's weight (fedaug.server.selection), once made."""
    flower_runs: list[int] = field(default_factory=list)
    """The Flower run ids this federation ran under, one per start of the ServerApp that ran rounds."""

    def finished(self, rounds: int) -> bool:
        """Nothing is left to run: the last of ``rounds`` is done, or every merchant's budget is spent."""
        return self.round >= rounds or self.budgets_spent


def save(state_dir: Path, state: ServerState) -> None:
    meta = {"run_key": state.run_key, "strategy": state.strategy, "round": state.round,
            "accountant": state.accountant, "history": [h.to_json() for h in state.history],
            "merchants": state.merchants, "best_round": state.best_round, "best_test": state.best_test,
            "budgets_spent": state.budgets_spent, "selection": state.selection, "flower_runs": state.flower_runs,
            "statistics": None if state.statistics is None else {
                "popularity_std": state.statistics.fit.popularity_std, "pair_std": state.statistics.fit.pair_std,
                "merchants": state.statistics_merchants, "epsilon": state.statistics_epsilon,
                "release": state.statistics_release},
            "strategy_state_keys": {name: list(arrays) for name, arrays in state.strategy_state.items()}}
    entries = {f"global/{k}": v for k, v in state.arrays.items()}
    entries.update({f"best/{k}": v for k, v in state.best_arrays.items()})
    if state.statistics is not None:
        fit, serve = state.statistics.fit, state.statistics.serve
        entries |= {"statistics/popularity": fit.popularity, "statistics/pairs": fit.pairs,
                    "statistics/serve-popularity": serve.popularity, "statistics/serve-pairs": serve.pairs}
    for name, arrays in state.strategy_state.items():
        entries.update({f"{name}/{k}": v for k, v in arrays.items()})
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.array(json.dumps(meta)), **entries)
    write_bytes_atomic(Path(state_dir) / CHECKPOINT, buffer.getvalue())


def load(state_dir: Path) -> ServerState | None:
    path = Path(state_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["__meta__"]))
            arrays = {k.removeprefix("global/"): stored[k] for k in stored.files if k.startswith("global/")}
            best = {k.removeprefix("best/"): stored[k] for k in stored.files if k.startswith("best/")}
            stats = meta.get("statistics")
            statistics = None if stats is None else _statistics(stored, stats)
            strategy_state = {name: {k: stored[f"{name}/{k}"] for k in keys}
                              for name, keys in meta["strategy_state_keys"].items()}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: not a readable fedaug checkpoint ({exc})") from None
    return ServerState(run_key=meta["run_key"], strategy=meta["strategy"], round=int(meta["round"]), arrays=arrays,
                       strategy_state=strategy_state, accountant=meta["accountant"],
                       history=[RoundRecord.from_json(h) for h in meta["history"]],
                       merchants=meta["merchants"], best_round=int(meta.get("best_round", 0)), best_arrays=best,
                       best_test=meta.get("best_test"), statistics=statistics,
                       statistics_merchants=int((meta.get("statistics") or {}).get("merchants", 0)),
                       statistics_epsilon=(meta.get("statistics") or {}).get("epsilon"),
                       statistics_release=(meta.get("statistics") or {}).get("release"),
                       budgets_spent=bool(meta.get("budgets_spent", False)), selection=meta.get("selection"),
                       flower_runs=[int(r) for r in meta.get("flower_runs", [])])


def _statistics(stored, stats: dict) -> Statistics:
    stds = stats["popularity_std"], stats["pair_std"]
    fit = Counts(stored["statistics/popularity"], stored["statistics/pairs"], *stds)
    if "statistics/serve-pairs" not in stored.files:  # a checkpoint from before serve counts: fit serves too
        return Statistics(fit, fit)
    return Statistics(fit, Counts(stored["statistics/serve-popularity"], stored["statistics/serve-pairs"], *stds))


@contextmanager
def exclusive(state_dir: Path, wait_seconds: float = 120.0) -> Iterator[None]:
    """Hold ``state_dir`` for one ServerApp at a time. A restarted aggregator may start a new ServerApp while the
    one it lost is still winding down; the new one waits for that to let go instead of both writing checkpoints."""
    handle = open(Path(state_dir) / "server.lock", "a+")
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"{state_dir}: another ServerApp still holds this state directory "
                                      f"(after {wait_seconds:.0f} s)") from None
                time.sleep(0.5)
        yield
    finally:
        handle.close()  # closing releases the lock (also when the process dies)


def federation_status(state_dir: Path) -> FederationStatus | None:
    """The checkpoint in ``state_dir`` summarised for operators (None where there is none)."""
    state = load(state_dir)
    if state is None:
        return None
    last = state.history[-1] if state.history else None
    model = next((str(p) for p in (Path(state_dir) / "model", Path(state_dir).parent / "model")
                  if (p / "card.json").is_file()), None)
    product = None
    if model is not None:
        from fedaug.common.priors.composite import product_kind
        from fedaug.common.recommend.bundle import load_bundle

        product = product_kind(load_bundle(model).scorer)
    return FederationStatus(
        state_dir=str(Path(state_dir)), run_key=state.run_key, strategy=state.strategy, round=state.round,
        best_round=state.best_round, valid_ndcg10=(last.valid or {}).get("ndcg@10") if last else None,
        epsilon_max=last.epsilon_max if last else None,
        merchants=dict(sorted((figures.get("name") or merchant_name(node, figures.get(PARTITION)),
                               figures.get("epsilon"))
                              for node, figures in state.merchants.items())), model=model, product=product,
        selection_valid_ndcg10=handed_out_estimate(state.selection), flower_runs=state.flower_runs)


def handed_out_estimate(selection: dict | None) -> float | None:
    """The released validation NDCG@10 of the weight the federated DP evaluation chose."""
    if not selection or not selection.get("candidates"):
        return None
    if math.isinf(float(selection["weight"])):
        return selection.get("prior_valid_ndcg@10")
    return next((c.get("valid_ndcg@10") for c in selection["candidates"] if c["weight"] == selection["weight"]), None)


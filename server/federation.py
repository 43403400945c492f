"""The aggregator's round loop: Flower's strategy does the sampling and the arithmetic, this loop does the rest.

Per round: configure and send training messages through the Grid, sort the replies (fedaug.server.replies), aggregate
if at least ``min_replies`` usable updates arrived (else retry the round, then stop cleanly), evaluate (federated
and, in simulation, centrally), checkpoint atomically, publish metrics. Started again on the same state-dir it
resumes after the last checkpointed round.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationSection
from fedaug.common.errors import ConfigError, FedaugError
from fedaug.common.model.metrics import select
from fedaug.common.priors.dp_counts import Statistics
from fedaug.common.protocol.messages import EvaluateInstruction, TrainInstruction, aggregated_figures
from fedaug.common.records import WITHHELD, MerchantWork, RoundRecord, merchant_name
from fedaug.server import checkpoint
from fedaug.server.checkpoint import PARTITION, USERS, ServerState
from fedaug.server.monitor import Monitor
from fedaug.server.replies import MerchantOutcome, bound_norms, sort_evaluate_replies, sort_train_replies
from fedaug.server.statistics import collect_statistics
from fedaug.server.strategies import STATE_ATTRIBUTES, WEIGHT, build_strategy, central_dp, inner

Evaluator = Callable[[dict[str, np.ndarray], tuple[str, ...], Statistics | None], dict]
"""Central evaluation of global arrays at the given stages, with the run's DP statistics where there are any
(attached by simulations, where the server has the data): ``{"valid": {...}, "test": {...}}``."""


WorkReader = Callable[[int, str], MerchantWork | None]
"""The merchants' own work in a round (round, run key): attached by simulations, which host every merchant."""


class RoundFailed(FedaugError):
    """A round got too few usable replies in all its attempts; the last checkpoint is kept for a resume."""


def run_federation(grid: Grid, settings: FederationSection, initial: dict[str, np.ndarray],
                   evaluator: Evaluator | None = None, on_round: Callable[[RoundRecord], None] | None = None,
                   node_wait_seconds: float = 600.0, neighbours: np.ndarray | None = None,
                   merchant_work: WorkReader | None = None, flower_run: int | None = None) -> ServerState:
    """Run (or resume) the federation; ``neighbours``: the public candidate table when the merchants are to
    release DP collaborative statistics before round 1 (fedaug.server.statistics); ``merchant_work``: where a
    simulation reads its merchants' own time per round (recorded beside the engine's); ``flower_run``: the Flower
    run this start is (kept in the checkpoint beside the federation's own key)."""
    state_dir = settings.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.exclusive(state_dir):
        return _federate(grid, settings, initial, evaluator, on_round, node_wait_seconds, neighbours, merchant_work,
                         flower_run)


def _federate(grid: Grid, settings: FederationSection, initial: dict[str, np.ndarray], evaluator: Evaluator | None,
              on_round: Callable[[RoundRecord], None] | None, node_wait_seconds: float,
              neighbours: np.ndarray | None, merchant_work: WorkReader | None, flower_run: int | None
              ) -> ServerState:
    state_dir = settings.state_dir
    n_nodes = _wait_for_nodes(grid, settings.min_nodes, node_wait_seconds)
    strategy = build_strategy(settings, n_nodes)
    state = _resume(state_dir, settings, initial, strategy)
    if state.finished(settings.rounds):
        log(INFO, "fedaug: the federation in %s is finished (round %d%s); nothing to do", state_dir, state.round,
            ", every merchant's budget spent" if state.budgets_spent else "")
        return state
    if flower_run is not None and flower_run not in state.flower_runs:
        state.flower_runs.append(flower_run)
    if neighbours is not None and state.statistics is None and state.round == 0:
        collected = collect_statistics(grid, settings, neighbours, state.run_key)
        state.statistics, state.statistics_merchants = collected.statistics, collected.merchants
        state.statistics_epsilon, state.statistics_release = collected.epsilon, collected.release
        log(INFO, "fedaug: DP statistics from %d merchants", state.statistics_merchants)
        checkpoint.save(state_dir, state)
    monitor = Monitor(state_dir, settings.metrics_port)
    try:
        for server_round in range(state.round + 1, settings.rounds + 1):
            entry = _run_round(grid, settings, strategy, state, server_round, evaluator)
            if merchant_work is not None:
                entry.work = merchant_work(server_round, state.run_key)
            state.round = server_round
            state.history.append(entry)
            inner_strategy = inner(strategy)
            state.strategy_state = {name: dict(getattr(inner_strategy, name)) for name in STATE_ATTRIBUTES
                                    if getattr(inner_strategy, name, None)}
            dp = central_dp(strategy)
            state.accountant = dp.accountant.state_dict() if dp else None
            _keep_best(state, entry)
            state.budgets_spent = entry.budgets_spent
            if state.finished(settings.rounds) and evaluator is not None:
                state.best_test = _best_test(state, entry, evaluator)
            checkpoint.save(state_dir, state)
            monitor.record(entry, state.history, state.merchants)
            if on_round:
                on_round(entry)
            if state.finished(settings.rounds):
                break
    finally:
        monitor.close()
    return state


def _run_round(grid: Grid, settings: FederationSection, strategy, state: ServerState, server_round: int,
               evaluator: Evaluator | None) -> RoundRecord:
    started = time.monotonic()
    arrays = ArrayRecord({k: Array(v) for k, v in state.arrays.items()})
    dp = central_dp(strategy)
    for attempt in range(1, settings.retries + 2):
        random.seed(f"{settings.seed}/{server_round}/{attempt}")  # Flower samples nodes with `random`
        instruction = TrainInstruction(arrays, run_key=state.run_key, attempt=attempt,
                                       compression=settings.compression)
        messages = list(strategy.configure_train(server_round, arrays, instruction.config(), grid))
        replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
        replies = sort_train_replies(messages, replies, state.arrays, uniform_weights=dp is not None)
        for problem in replies.problems(settings.names):
            log(WARNING, "fedaug round %d: %s", server_round, problem)
        for node, distance in bound_norms(replies.accepted, state.arrays, settings.norm_bound).items():
            log(INFO, "fedaug round %d: %s: update clipped (distance %.3g)", server_round,
                _name(settings, node, replies.merchants[node].partition if node in replies.merchants else None),
                distance)
        enough = len(replies.accepted) >= settings.min_replies
        # Called even with too few replies: Flower's DP wrapper keeps a pending privacy event until it is.
        aggregated, _ = strategy.aggregate_train(server_round, replies.accepted if enough else [])
        if aggregated is not None:
            break
        if messages and len(replies.with_status("declined")) == len(messages):
            break  # every merchant declined for its budget: asking again cannot help, and neither can later rounds
        why = (f"{len(replies.accepted)} usable replies, {settings.min_replies} needed" if not enough
               else "the strategy aggregated nothing (central DP needs a reply from every sampled merchant)")
        log(WARNING, "fedaug round %d attempt %d: not aggregated: %s", server_round, attempt, why)
    else:
        declined = len(replies.with_status("declined"))
        advice = (f"{declined} merchant{'s' * (declined > 1)} declined because the round would pass their privacy "
                  "budget: starting again will not help; a new run needs merchants with budget left"
                  if declined and len(replies.accepted) + declined >= settings.min_replies else
                  f"{settings.state_dir} keeps round {server_round - 1}: start again to resume")
        raise RoundFailed(f"round {server_round}: not aggregated in {settings.retries + 1} attempts ({why}); "
                          f"stopped. {advice}")
    spent = aggregated is None  # (the loop ends without aggregating only when every budget is spent)
    if spent:
        aggregated = arrays  # the global model stays as it was; it is evaluated and kept as the final one
        log(WARNING, "fedaug round %d: every merchant declined for its privacy budget: the federation ends with "
            "the model of round %d", server_round, server_round - 1)
    state.arrays = {k: v.numpy() for k, v in aggregated.items()}
    trained = time.monotonic()
    entry = RoundRecord(round=server_round, attempts=attempt, participants=len(replies.accepted),
                        failures={kind: len(replies.with_status(kind)) for kind in ("error", "declined", "rejected",
                                                                                    "missing")},
                        problems=replies.problems(settings.names), bytes_received=replies.bytes_received,
                        budgets_spent=spent,
                        **_train_summary(replies.merchants))
    _remember_merchants(state, server_round, replies.merchants, settings)
    if dp is not None:
        entry.central_epsilon = dp.privacy_spent().epsilon
        entry.central_delta = dp.privacy_spent().delta
    # Validation every round; test only for the final model (scoring 12k items per user is not free).
    stages = ("valid", "test") if server_round == settings.rounds or spent else ("valid",)
    entry.train_seconds = round(trained - started, 3)
    _federated_evaluation(grid, settings, strategy, state, server_round, aggregated, stages, entry)
    evaluated = time.monotonic()
    entry.evaluate_seconds = round(evaluated - trained, 3)
    if evaluator is not None:
        central = evaluator(state.arrays, stages, state.statistics)
        entry.central_seconds = round(time.monotonic() - evaluated, 3)
        entry.valid = select(central["valid"])
        entry.test = select(central["test"]) if "test" in central else None
        if "fusion" in central:
            entry.fusion_weight, entry.model_valid = central["fusion"]["weight"], central["fusion"]["model_valid"]
    else:
        entry.valid, entry.test = entry.federated_valid, entry.federated_test
    entry.seconds = round(time.monotonic() - started, 2)
    log(INFO, "fedaug round %d: %d merchants aggregated%s", server_round, len(replies.accepted),
        f", valid NDCG@10 {entry.valid['ndcg@10']:.4f}" if entry.valid else "")
    return entry


def _keep_best(state: ServerState, entry: RoundRecord) -> None:
    """Keep the global model that validates best: what a merchant is given never validates worse than an earlier
    round's model (nor, with fusion, than the public prior alone)."""
    if entry.valid is None:
        return
    best = max((r.valid["ndcg@10"] for r in state.history[:-1] if r.round == state.best_round and r.valid),
               default=-1.0)
    if state.best_round == 0 or entry.valid["ndcg@10"] > best:
        state.best_round, state.best_arrays = entry.round, {k: v.copy() for k, v in state.arrays.items()}


def _best_test(state: ServerState, entry: RoundRecord, evaluator: Evaluator) -> dict | None:
    if state.best_round == entry.round:
        return entry.test
    return select(evaluator(state.best_arrays, ("valid", "test"), state.statistics)["test"])


def _federated_evaluation(grid, settings, strategy, state, server_round, arrays, stages,
                          entry: RoundRecord) -> None:
    """The merchants score the global model; their user-weighted metrics go into ``entry``."""
    if settings.fraction_evaluate == 0:
        return
    config = EvaluateInstruction(arrays, run_key=state.run_key, stages=tuple(stages)).config()
    messages = list(strategy.configure_evaluate(server_round, arrays, config, grid))
    replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
    accepted, merchants = sort_evaluate_replies(messages, replies)
    for node, outcome in merchants.items():
        record = state.merchants.setdefault(str(node), {})
        name = _name(settings, node, record.get(PARTITION))
        if outcome.status == "ok":
            for stage in stages:
                record[stage] = dict(outcome.figures.get(stage, {}))
            record["users"] = outcome.users
        elif outcome.status == WITHHELD:
            log(INFO, "fedaug round %d: %s keeps its evaluation to itself (private)", server_round, name)
        else:
            log(WARNING, "fedaug round %d: evaluation by %s: %s (%s)", server_round, name, outcome.status,
                outcome.reason)
    if not accepted:
        return
    metrics = strategy.aggregate_evaluate(server_round, accepted)
    if metrics is None:
        return
    figures = aggregated_figures({k: float(v) for k, v in metrics.items() if k != WEIGHT})
    entry.federated_valid = figures.get("valid", {})
    if "test" in stages:
        entry.federated_test = figures.get("test", {})
    entry.federated_merchants = len(accepted)


def _train_summary(merchants: dict[int, MerchantOutcome]) -> dict:
    # Only merchants that reported both count (private ones withhold them: outside their accounting).
    reported = [(m.users, m.train_loss) for m in merchants.values()
                if m.status == "ok" and m.users is not None and m.train_loss is not None]
    users, losses = zip(*reported, strict=True) if reported else ((), ())
    epsilons = [m.epsilon for m in merchants.values() if m.epsilon is not None]
    return {
        "train_loss": float(np.average(losses, weights=users)) if sum(users) > 0 else None,
        "epsilon_max": max(epsilons) if epsilons else None,
        "epsilon_mean": float(np.mean(epsilons)) if epsilons else None,
    }


def _name(settings: FederationSection, node: int, partition: int | None) -> str:
    return merchant_name(node, partition, settings.names)


def _remember_merchants(state: ServerState, server_round: int, merchants: dict[int, MerchantOutcome],
                        settings: FederationSection) -> None:
    """What the checkpoint keeps of each merchant (its keys: server/checkpoint.py)."""
    for node, outcome in merchants.items():
        record = state.merchants.setdefault(str(node), {})
        record["status"] = outcome.status
        record["name"] = _name(settings, node, record.get(PARTITION, outcome.partition))
        if outcome.partition is not None:
            record[PARTITION] = outcome.partition
        if outcome.users is not None:
            record[USERS] = outcome.users
        if outcome.epsilon is not None:
            record["epsilon"] = outcome.epsilon
            record.setdefault("epsilon_by_round", {})[str(server_round)] = outcome.epsilon


def _resume(state_dir, settings: FederationSection, initial: dict[str, np.ndarray], strategy) -> ServerState:
    state = checkpoint.load(state_dir)
    if state is None:
        return ServerState(run_key=uuid.uuid4().hex, strategy=settings.strategy, arrays=dict(initial))
    where = state_dir / checkpoint.CHECKPOINT
    if state.strategy != settings.strategy:
        raise ConfigError(f"{where}: the checkpoint is of a {state.strategy} run, this run is {settings.strategy} "
                          f"(use a new state-dir)")
    shapes = {k: v.shape for k, v in state.arrays.items()}
    if shapes != {k: v.shape for k, v in initial.items()}:
        raise ConfigError(f"{where}: the checkpoint holds a different model (use a new state-dir)")
    inner_strategy = inner(strategy)
    for name, arrays in state.strategy_state.items():
        setattr(inner_strategy, name, dict(arrays))
    dp = central_dp(strategy)
    if dp is not None and state.accountant is not None:
        dp.accountant.load_state_dict(state.accountant)
    log(INFO, "fedaug: resuming after round %d of %d from %s", state.round, settings.rounds, where)
    return state


def _wait_for_nodes(grid: Grid, minimum: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} merchants connected within {seconds:.0f} s "
                              f"(federation.min_nodes = {minimum})")
        time.sleep(1)
    return len(nodes)


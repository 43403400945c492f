"""`fedaug simulate`: the ServerApp and ClientApp in Flower's simulation engine, over merchants cut from one data
set (simulations/apps.py attaches what only a simulation has), and the two comparisons that make its numbers mean
something (every merchant alone; all data pooled), each under the same DP settings and rounds × local epochs."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import tomli_w
import torch

from fedaug.common.config import to_run_config
from fedaug.common.data.source import load_data
from fedaug.common.data.split import Merchants, leave_one_out, merchant_partitions
from fedaug.common.errors import ConfigError, FedaugError
from fedaug.common.model.build import describe
from fedaug.common.model.device import pick_device
from fedaug.common.model.evaluate import Scorer
from fedaug.common.model.metrics import paired_gain, select
from fedaug.common.priors.composite import product_kind
from fedaug.common.priors.fusion import Fused
from fedaug.common.recommend.bundle import bundle_bytes, write_bundle_files
from fedaug.common.records import FusionRecord, MerchantRecord, OnRound, PrivacyRecord, RoundRecord, RunMetrics
from fedaug.server import checkpoint
from fedaug.server.distribute import MODEL_DIR
from fedaug.server.monitor import RoundWatcher
from fedaug.server.summary import federation_summary, read_handed_out
from fedaug.simulations.baseline import text_prior
from fedaug.simulations.bundles import BEST_MODEL, MODEL, save_model
from fedaug.simulations.local import releases_before_training, run_local, write_outputs
from fedaug.simulations.report import METRIC_KEYS, Tested, tested
from fedaug.simulations.report import baselines as report_baselines
from fedaug.simulations.scenario import SimulationConfig


def run_simulate(config: SimulationConfig, out: Path, on_round: OnRound | None = None,
                 baselines: dict[str, dict] | None = None, verbose: bool = False) -> RunMetrics:
    """Run the configured mode; write ``out/metrics.json``, ``out/report.md`` and the plots; return the metrics."""
    started = time.monotonic()
    out = Path(out)
    data = load_data(config.data, config.synthetic)
    split = leave_one_out(data)
    merchants = Merchants(config.assigned(data))
    n_merchants = len(merchants)
    mode = config.simulation.mode
    state_dir = _state_dir(config, out)
    evaluations: list = []  # the server's central evaluation, fitted during the run: the bundles reuse it
    if mode == "federated":
        metrics = _federated(config, merchants, state_dir, on_round, verbose, evaluations)
    elif mode == "local":
        metrics = _local_only(config, data, state_dir, on_round)
    else:
        metrics = _central(config, data, state_dir, on_round, out / MODEL)
    sim = config.simulation
    metrics.mode = mode
    prior = None
    if data.catalog.texts:  # the public prior every merchant has on day one
        fitted = evaluations[-1].text if evaluations else None
        prior = fitted or text_prior(config, data, split, pick_device(config.device), progress=verbose)[0]
    references = report_baselines(split, prior)
    metrics.baselines, metrics.baselines_cold = references.test, references.cold
    metrics.baselines_valid, prior_test = references.valid, references.prior
    metrics.baselines |= baselines or {}
    metrics.attack = ({"kind": sim.attack, "fraction": sim.attackers, "scale": sim.attack_scale,
                       "merchants": config.attacker_ids()} if sim.attack else None)
    metrics.defence = sim.defence or ("normbound" if config.federation.norm_bound else config.federation.strategy)
    metrics.seconds = round(time.monotonic() - started, 2)
    metrics.data, metrics.merchants_total = data.summary(), n_merchants
    metrics.model = describe(config.model, data)
    metrics.config = config.model_dump(mode="json")
    out.mkdir(parents=True, exist_ok=True)
    if mode == "federated":
        scorers = _save_global_models(config, data, state_dir, metrics, out, evaluations[-1] if evaluations else None)
        _test_in_detail(metrics, scorers, split, prior_test if config.text.fuse else None, merchants.data.merchant)
        for m in metrics.merchants:  # where each merchant's budget went before training, from its own ledger
            if m.merchant >= 0:
                m.epsilon_releases = releases_before_training(state_dir / f"merchant-{m.merchant}", metrics.run_key)
    write_outputs(metrics, out)
    return metrics


def finished_run(config: SimulationConfig, out: Path) -> RunMetrics | None:
    """The run ``out`` already holds, where its metrics.json (written last) is of exactly this configuration:
    nothing is left to run. None where there is none, or it was run with other settings."""
    path = Path(out) / "metrics.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FedaugError(f"{path}: not a readable metrics.json ({exc}); remove it to run again") from None
    if stored.get("config") != config.model_dump(mode="json"):
        return None
    return RunMetrics.from_json(stored)


def _test_in_detail(metrics: RunMetrics, scorers: dict[str, tuple[int, Scorer]], split, prior: Tested | None,
                    merchant_of_user: np.ndarray) -> None:
    """The final global model on cold-item targets and per merchant, the model alone beside its fusion with the
    prior (the item-id model vs with text), and the final and best model's paired gain over the text prior."""
    final = tested(scorers["final"][1], split)
    metrics.test = final.all  # the reported test figures are those of the bundle the run wrote
    metrics.test_cold, metrics.cold_users = final.cold, int(final.cold_mask.sum())
    metrics.test_by_type = final.by_type
    _per_merchant(metrics, final, split, merchant_of_user)
    if isinstance(scorers["final"][1], Fused):
        alone = tested(scorers["final"][1].model, split)
        metrics.fusion = FusionRecord(weight=scorers["final"][1].weight, tried=[], model_test=alone.all,
                                      model_test_cold=alone.cold,
                                      model_valid=metrics.rounds[-1].model_valid if metrics.rounds else None)
        if not math.isinf(scorers["final"][1].weight):  # beside it: what the releases alone would have handed out
            metrics.baselines["prior + statistics, model left out"] = tested(scorers["final"][1].prior, split).all
    if prior is None:
        return
    gains = {}
    for name, (round_, scorer) in scorers.items():
        ndcg = (final if scorer is scorers["final"][1] else tested(scorer, split)).per_user["ndcg@10"]
        gains[name] = {"round": round_, "test_ndcg@10": float(ndcg.mean()),
                       "gain_over_text_prior": paired_gain(ndcg, prior.per_user["ndcg@10"])}
    metrics.gain_over_text = gains


def _per_merchant(metrics: RunMetrics, final: Tested, split, merchant_of_user: np.ndarray) -> None:
    """Each merchant's users and test metrics from the central evaluation of the final model: a simulation holds
    every merchant's data, while a private merchant keeps its own figures off the wire (README, "What crosses the
    wire")."""
    tested_users = merchant_of_user[split.eval_users("test")]
    for m in metrics.merchants:
        if m.merchant < 0:
            continue
        m.users = int((merchant_of_user == m.merchant).sum())
        rows = tested_users == m.merchant
        if rows.any():
            m.test = select({name: float(values[rows].mean()) for name, values in final.per_user.items()})


def _state_dir(config: SimulationConfig, out: Path) -> Path:
    """Where checkpoints and ledgers live: [federation] state_dir when given, else DIR/state."""
    if "state_dir" in config.federation.model_fields_set:
        return config.federation.state_dir.resolve()
    return (out / "state").resolve()


# federated: Flower's simulation engine ------------------------------------------------------------------------


def _federated(config: SimulationConfig, merchants: Merchants, state_dir: Path, on_round: OnRound | None,
               verbose: bool, evaluations: list) -> RunMetrics:
    """The federation of ``merchants`` in Flower's simulation engine, which every worker maps from the state dir
    (simulations/apps.py, SHARED_DATA) while it runs; the server's central evaluation is appended to
    ``evaluations`` (the ServerApp runs in this process)."""
    from flwr.app import Context, RecordDict
    from flwr.common import EventType

    from fedaug.runtime.flower import (
        NOOP_FEDERATION_ID,
        RUN_ID_NUM_BYTES,
        SUPERLINK_NODE_ID,
        TASK_ID_NUM_BYTES,
        Run,
        TaskIdentity,
        random_id,
        run_simulation_in_process,
    )
    from fedaug.server.server_app import server_app
    from fedaug.simulations.apps import SHARED_DATA, CentralEvaluation, central_evaluation, client, merchant_work

    def keep_central_evaluation(*args) -> CentralEvaluation | None:
        evaluation = central_evaluation(*args)
        if evaluation is not None:
            evaluations.append(evaluation)
        return evaluation

    n_merchants = len(merchants)
    run_config = to_run_config(config.changed(federation={"state_dir": state_dir, "min_nodes": n_merchants}))
    # Flower's simulation reads the merchants' run_config from an app directory's pyproject.toml, as `flwr run`
    # does; this one carries exactly this run's config.
    run_id = random_id(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = random_id(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    state_dir.mkdir(parents=True, exist_ok=True)
    watcher = RoundWatcher(state_dir, config.federation.rounds, on_round)
    try:
        merchants.write(state_dir / SHARED_DATA)
        with tempfile.TemporaryDirectory(prefix="fedaug-app-") as app_dir:
            _write_app_dir(Path(app_dir), run_config)
            watcher.start()
            run_simulation_in_process(num_supernodes=n_merchants, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                            client_app=client,
                            server_app=server_app(SimulationConfig, keep_central_evaluation, merchant_work),
                            backend_name="ray",
                            backend_config=_backend_config(config, verbose), server_app_context=context,
                            app_dir=app_dir, is_app=True, run=run, verbose_logging=verbose)
    finally:
        watcher.stop()
        flwr_logger.setLevel(level)
        (state_dir / SHARED_DATA).unlink(missing_ok=True)
    state = checkpoint.load(state_dir)
    if state is None or not state.finished(config.federation.rounds):
        done = 0 if state is None else state.round
        raise FedaugError(f"simulation stopped after round {done} of {config.federation.rounds} (see the log "
                          f"above); run the same command again to resume from {state_dir}")
    return federation_summary(config, state, mode="federated", seconds=0.0, data={})


def _save_global_models(config: SimulationConfig, data, state_dir: Path, metrics: RunMetrics, out: Path,
                        evaluation=None) -> dict[str, tuple[int, Scorer]]:
    """DIR/model: the model every merchant received — the aggregator's bundle (fedaug.server.distribute: composed by
    public rules from the prior, the merchants' DP statistics and the final global model), byte for byte, so
    what this run reports is what a deployment delivers. With [simulation] pooled_selection (research, not
    private): the final model as the run's pooled validation fitted it, and DIR/model-best, the best-validating
    round's. ``evaluation``: the server's, already fitted. Returns the scorers by name (final, best) with their
    rounds."""
    state = checkpoint.load(state_dir)
    if not config.simulation.pooled_selection:
        received = read_handed_out(metrics, state_dir / MODEL_DIR)
        write_bundle_files(out / MODEL, bundle_bytes(state_dir / MODEL_DIR))
        metrics.selection = "private"
        return {"final": (state.round, received.scorer)}  # a private run keeps no best round: nothing chose one

    from fedaug.server.server_app import initial_model
    from fedaug.simulations.apps import CentralEvaluation

    metrics.selection = POOLED
    if evaluation is None:  # e.g. every round was done before this start: nothing was fitted in this process
        evaluation = CentralEvaluation(config, data, initial_model(config, data))
    rounds = {r.round: r for r in state.history}

    def scorer(arrays, round_: int):
        record = rounds.get(round_)
        return evaluation.scorer(arrays, state.statistics, "test",  # serving: the serve counts
                                 weight=record.fusion_weight if record is not None else None)[0]

    final = scorer(state.arrays, state.round)
    metrics.product = product_kind(final)
    save_model(out / MODEL, final, data, metrics, config)
    scorers = {"final": (state.round, final), "best": (state.round, final)}
    if state.best_round and state.best_round != state.round and state.best_arrays:
        best, record = scorer(state.best_arrays, state.best_round), rounds.get(state.best_round)
        save_model(out / BEST_MODEL, best, data, metrics, config, round_=state.best_round, test=state.best_test,
                   valid=record.valid if record is not None else None)
        scorers["best"] = (state.best_round, best)
    return scorers


POOLED = "pooled validation (not private)"


def _write_app_dir(app_dir: Path, run_config: dict) -> None:
    project = {
        "project": {"name": "fedaug", "version": "0.1.0"},
        "tool": {"flwr": {"app": {"publisher": "fedaug",
                                  "components": {"serverapp": "fedaug.simulations.apps:server",
                                                 "clientapp": "fedaug.simulations.apps:client"},
                                  "config": run_config}}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")


def _backend_config(config: SimulationConfig, verbose: bool) -> dict:
    """Flower's Ray backend: a local Ray over this machine's CPUs (and GPUs), or the running cluster at
    [simulation] ray_address, whose nodes bring their own resources."""
    init_args = {"include_dashboard": False, "log_to_driver": verbose}
    if config.simulation.ray_address:
        _check_cluster(config.simulation.ray_address)
        init_args["address"] = config.simulation.ray_address
    else:
        gpus = torch.cuda.device_count() if pick_device(config.device).type == "cuda" else 0
        # "local": a Ray of our own even where RAY_ADDRESS names a cluster (ray.init would join it otherwise).
        init_args |= {"address": "local", "num_cpus": os.cpu_count() or 1, "num_gpus": gpus}
    return {"client_resources": config.client_resources(), "init_args": init_args}


def _check_cluster(address: str) -> None:
    """Fail in one line, before Flower starts, where no Ray cluster answers at HOST:PORT (Ray itself would retry
    for minutes inside Flower's engine); ``auto`` is left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise ConfigError(f"simulation.ray_address: expected auto or HOST:PORT, got {address!r}")
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise FedaugError(f"simulation.ray_address: no Ray cluster answers at {address} ({exc.strerror or exc}); "
                          "start one with `ray start --head` or fix the address") from exc


# local and central: the client's own trainer, without Flower -----------------------------------------------------


def _local_only(config: SimulationConfig, data, state_dir: Path, on_round: OnRound | None) -> RunMetrics:
    """Every merchant trains alone for the same rounds × local epochs at the same ε; metrics weigh merchants by
    their evaluated users, which equals scoring every user with their own merchant's model."""
    merchant_run = config.merchant_run()
    parts = merchant_partitions(config.assigned(data))
    results: list[RunMetrics] = []
    for i, part in enumerate(parts):
        results.append(run_local(merchant_run, None, state_dir / f"merchant-{i}", data=part))
        if on_round:
            on_round(i + 1, len(parts), None)
    weights = np.array([r.test_users for r in results], dtype=float)

    def mean(values) -> float:
        return float(np.average(list(values), weights=weights))

    rounds = [RoundRecord(round=j + 1, valid={"ndcg@10": mean(r.rounds[j].valid["ndcg@10"] for r in results)},
                          epsilon_max=max(r.rounds[j].epsilon_max for r in results),
                          train_loss=mean(r.rounds[j].train_loss for r in results))
              for j in range(config.federation.rounds)]
    merchants = [MerchantRecord(merchant=i, users=r.test_users, epsilon=r.privacy.epsilon_max,
                                epsilon_by_round={str(h.round): h.epsilon_max for h in r.rounds}, test=r.test,
                                epsilon_releases=r.merchants[0].epsilon_releases if r.merchants else {})
                 for i, r in enumerate(results)]
    products = sorted({r.product for r in results if r.product})
    epsilons = [m.epsilon for m in merchants if np.isfinite(m.epsilon)]
    return RunMetrics(mode="local", test={k: mean(r.test[k] for r in results) for k in METRIC_KEYS},
                      valid={k: mean(r.valid[k] for r in results) for k in METRIC_KEYS}, seconds=0.0, data={},
                      config={}, rounds=rounds, merchants=merchants,
                      privacy=PrivacyRecord(epsilon_budget=config.privacy.epsilon,
                                            epsilon_max=max(epsilons, default=None),
                                            epsilon_mean=float(np.mean(epsilons)) if epsilons else None,
                                            max_grad_norm=config.privacy.max_grad_norm),
                      product=("each merchant's own: " + products[0] if len(products) == 1 else
                               "each merchant's own, of different parts: " + " | ".join(products)) if products
                      else None)


def _central(config: SimulationConfig, data, state_dir: Path, on_round: OnRound | None, model_dir: Path
             ) -> RunMetrics:
    """All merchants' users pooled into one DP trainer (the upper bound federation tries to reach)."""
    metrics = run_local(config.merchant_run(), None, state_dir / "pooled", on_round=on_round, data=data,
                        mode="central", model_dir=model_dir)
    metrics.privacy.epsilon_mean = None
    return metrics

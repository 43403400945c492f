"""The ServerApp and ClientApp as `fedaug simulate` runs them: the production handlers (fedaug.server.server_app,
fedaug.client.client_app) with the simulation-only behaviour attached from here — merchants cut from one data set by
[simulation] partition, Byzantine merchants (poisoned data, or a mod that poisons their updates) and the server's
central evaluation on every user, which only a simulation's server can do (it has the data)."""

from __future__ import annotations

import copy
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message

from fedaug.client.client_app import client_app
from fedaug.client.merchant import (
    NUM_PARTITIONS,
    PARTITION_ID,
    Merchant,
    build_merchant,
    partition_dir,
    partition_of,
)
from fedaug.client.round_log import read_rounds
from fedaug.common.config import from_run_config
from fedaug.common.data import BehaviorData
from fedaug.common.data.split import Merchants, leave_one_out
from fedaug.common.errors import FedaugError
from fedaug.common.model.device import pick_device
from fedaug.common.model.evaluate import evaluate, sasrec_scorer
from fedaug.common.model.metrics import select
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.dp_counts import ReleaseRule, Statistics, fit_prior_with_counts
from fedaug.common.priors.fusion import Fused, fit_fusion
from fedaug.common.protocol.messages import TrainInstruction
from fedaug.common.records import MerchantWork
from fedaug.runtime.flower import ClientAppCallable
from fedaug.server.server_app import public_prior, server_app, statistics_candidates
from fedaug.simulations.attacks import flip_labels, poison_mod
from fedaug.simulations.baseline import text_prior
from fedaug.simulations.scenario import SimulationConfig


def simulated_merchant(context: Context) -> Merchant:
    """Partition ``partition-id`` of the run's data set as [simulation] cuts it (poisoned for a label flipper).

    Built for each message and dropped after it: a worker maps the data set `fedaug simulate` wrote once
    (``run_merchants``; every merchant's slice of it is a copy of its own users away) and holds no merchant's
    state between its rounds — its ledger and replay cache live in its state dir — so memory and time follow the
    merchants sampled, not the ones registered."""
    pid, n = partition_of(context)
    config = _config(tuple(sorted(context.run_config.items())))
    data = run_merchants(config, n).merchant_data(pid)
    if config.simulation.attack == "labelflip" and pid in config.attacker_ids(n):
        data = flip_labels(data, config.simulation.partition_seed)
    return build_merchant(config.federation_config, data, merchant_dir(config, pid), pid)


SHARED_DATA = "merchants.data"
"""In a simulation's state dir while it runs: the data set cut into merchants (Merchants.write), written once by
`fedaug simulate` before the engine starts; every worker maps it rather than loading the data set again."""


def run_merchants(config: SimulationConfig, n: int) -> Merchants:
    """The run's ``n`` merchants, mapped from its state dir's SHARED_DATA once per worker (and file)."""
    path = Path(config.federation.state_dir) / SHARED_DATA
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FedaugError(f"{path}: the run's data set is missing (fedaug simulate writes it before any merchant "
                          "starts); on a Ray cluster [federation] state_dir must be on a file system every node "
                          "sees") from None
    merchants = _mapped(path, (stat.st_ino, stat.st_mtime_ns, stat.st_size))
    if len(merchants) != n:
        raise FedaugError(f"{path}: holds {len(merchants)} merchants, the run has {n}")
    return merchants


@lru_cache(maxsize=1)
def _mapped(path: Path, stamp: tuple) -> Merchants:
    """``path`` mapped; ``stamp`` (inode, mtime, size) tells a file written again by a later run from this one."""
    return Merchants.mapped(path)


def merchant_dir(config: SimulationConfig, pid: int) -> Path:
    """Where simulated merchant ``pid`` keeps its ledger, replays and round log."""
    return partition_dir(config.federation.state_dir, pid)


@lru_cache(maxsize=4)
def _config(run_items: tuple) -> SimulationConfig:
    return from_run_config(dict(run_items), SimulationConfig)


def _attack_of(context: Context) -> tuple[str, float]:
    config = _config(tuple(sorted(context.run_config.items())))
    pid, n = int(context.node_config.get(PARTITION_ID, -1)), int(context.node_config.get(NUM_PARTITIONS, 0))
    byzantine = pid in config.attacker_ids(n)
    return (config.simulation.attack, config.simulation.attack_scale) if byzantine else ("", 0.0)


class CentralEvaluation:
    """Score global arrays on every merchant's held-out users at once (the union of the merchants' users is the
    whole data set): reporting only. By default the scored model is the one every merchant receives, composed by
    public rules from the public text prior, the merchants' DP statistics and the global model
    (fedaug.common.priors.composite): nothing chosen here. With [simulation] pooled_selection (research, not private)
    the weights are chosen on the pooled validation users instead (common/priors/fusion.py,
    common/priors/dp_counts.py; the model alone is a candidate)."""

    def __init__(self, config: SimulationConfig, data: BehaviorData, model: SASRec):
        self.config, self.split = config, leave_one_out(data)
        self.pooled = config.simulation.pooled_selection
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        if self.pooled:
            self.text = (text_prior(config, data, self.split, self.device, progress=False)[0]
                         if data.catalog.texts and config.text.fuse else None)
        else:
            self.text = public_prior(config, data)
        self.neighbours = statistics_candidates(config, data, self.text) if self.text is not None else None
        self._with_counts: tuple | None = None  # (statistics, fitted prior, its serve twin): fitted once per run

    def prior(self, statistics: Statistics | None, stage: str = "valid"):
        """The public prior, with the merchants' summed statistics when there are any: the fit counts for
        validation (they hold no validation item), the serve counts for test and serving; weights and cuts by the
        release rule, or (pooled) fitted on validation with the fit counts."""
        if statistics is None or self.neighbours is None:
            return self.text
        if not self.pooled:
            return ReleaseRule.from_section(self.config.federation).scorer(
                self.text, statistics.fit if stage == "valid" else statistics.serve, self.neighbours)
        if self._with_counts is None or not self._with_counts[0].same_as(statistics):
            fitted = fit_prior_with_counts(self.text, statistics.fit, self.neighbours, self.split)[0]
            self._with_counts = (statistics, fitted, fitted.with_counts(statistics.serve))
        return self._with_counts[1] if stage == "valid" else self._with_counts[2]

    def scorer(self, arrays: dict[str, np.ndarray], statistics: Statistics | None = None, stage: str = "valid", *,
               weight: float | None = None):
        """The global model's scorer composed with the prior where there is one, for ``stage``, and the fusion's
        record: ``(scorer, None)``, ``(fused, {"weight", "model_valid", "valid"})``, or ``(fused, None)`` given a
        weight. Private: the model's weight is ∞ (no accounted evaluation measured it), the record still gives the
        model's own validation. Each scorer holds its own copy of the model: two rounds' never share weights."""
        model = copy.deepcopy(self.model)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        scorer = sasrec_scorer(model, self.device)
        if self.text is None:
            return scorer, None
        if weight is not None:
            return Fused(scorer, self.prior(statistics, stage), weight), None
        if not self.pooled:
            fused = Fused(scorer, self.prior(statistics, stage), math.inf)
            if stage != "valid":
                return fused, None
            return fused, {"weight": math.inf, "model_valid": select(evaluate(scorer, self.split, "valid")),
                           "valid": evaluate(fused, self.split, "valid")}
        fused, tried, valid = fit_fusion(scorer, self.prior(statistics), self.split)
        if stage != "valid":
            fused = Fused(scorer, self.prior(statistics, stage), fused.weight)
        alone = next(row for row in tried if row["weight"] == 0)
        return fused, {"weight": fused.weight, "model_valid": {"ndcg@10": alone["valid_ndcg@10"]}, "valid": valid}

    def __call__(self, arrays: dict[str, np.ndarray], stages: tuple[str, ...], statistics: Statistics | None = None
                 ) -> dict:
        scorer, fusion = self.scorer(arrays, statistics)  # the fusion weight, fitted once on validation
        out = {} if fusion is None else {"valid": fusion.pop("valid"), "fusion": fusion}
        for stage in stages:
            if stage == "valid" and fusion is not None:
                continue
            at_stage = scorer if fusion is None else Fused(scorer.model, self.prior(statistics, stage), scorer.weight)
            out[stage] = evaluate(at_stage, self.split, stage)
        return out


PLACEMENTS = "placements.jsonl"
"""In a simulated merchant's state dir: the Ray node that ran each of its training rounds."""


def placement_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Note which Ray node trained this merchant's round (what proves a run used every node of a cluster)."""
    import ray

    reply = call_next(msg, context)
    if PARTITION_ID in context.node_config and ray.is_initialized():
        instruction = TrainInstruction.decode(msg.content)
        config_ = _config(tuple(sorted(context.run_config.items())))
        folder = merchant_dir(config_, int(context.node_config[PARTITION_ID]))
        folder.mkdir(parents=True, exist_ok=True)
        line = {"round": instruction.server_round, "run": instruction.run_key or "",
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        with open(folder / PLACEMENTS, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")
    return reply


def merchant_work(config: SimulationConfig):
    """Reads a round's own work of every merchant from their round logs (client/round_log.py), their Ray nodes
    from their placements, and the engine's lanes from the Ray cluster the simulation runs on."""

    def read(server_round: int, run_key: str) -> MerchantWork:
        work = MerchantWork(lanes=engine_lanes(config))
        for folder in sorted(config.federation.state_dir.glob("merchant-*")):
            for entry in read_rounds(folder):
                if entry.round == server_round and entry.run == run_key:
                    work.seconds[folder.name] = work.seconds.get(folder.name, 0.0) + entry.work_seconds
                    work.setup[folder.name] = work.setup.get(folder.name, 0.0) + entry.setup_seconds
            for line in _lines(folder / PLACEMENTS):
                if line.get("round") == server_round and line.get("run") == run_key:
                    work.nodes[folder.name] = str(line["node"])
        return work

    return read


def engine_lanes(config: SimulationConfig) -> int:
    """How many merchants Flower's Ray backend runs at once: its actor pool, sized by Flower from the cluster."""
    import ray

    from fedaug.runtime.flower import ray_pool_size

    if not ray.is_initialized():
        return 1
    return ray_pool_size(config.client_resources())


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, ValueError):
        return []


def central_evaluation(config: SimulationConfig, data: BehaviorData, model: SASRec) -> CentralEvaluation | None:
    """The server's central evaluation, where [simulation] central_evaluation asks for it."""
    return CentralEvaluation(config, data, model) if config.simulation.central_evaluation else None


client = client_app(simulated_merchant, train_mods=[poison_mod(_attack_of), placement_mod])
server = server_app(SimulationConfig, central_evaluation, merchant_work)

"""One merchant as the ClientApp sees it: its local split, its trainer and its ledger, built from Flower's context.

Where the data comes from (``merchant_for``):
- deployment: ``node_config`` has ``data.path`` (+ ``data.format``, ``data.catalog`` — the shared public catalog that
  numbers items —, ...), ``merchant.state_dir``, and the merchant's own ``privacy.epsilon`` / ``privacy.delta`` and
  ``device`` (written by fedaug.client.daemon); they override the recipe that arrives in run_config;
- Flower's simulation convention (`flwr run .`): ``node_config`` has ``partition-id`` / ``num-partitions``; the
  merchant is that partition of the run's data set, cut uniformly (seeded by ``federation.seed``); its ledger lives
  in ``federation.state_dir``/merchant-<id>. `fedaug simulate` cuts the same way by its own [simulation] rule
  (``partitions``, ``partition_dir``) and adds what only a simulation has in simulations/apps.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context

from fedaug.client.replay import ReplayCache
from fedaug.client.trainer import LocalTrainer, build_trainer
from fedaug.common.config import FederationConfig, from_run_config
from fedaug.common.data import BehaviorData
from fedaug.common.data.source import load_data
from fedaug.common.data.split import LeaveOneOut, Merchants, assign_merchants, leave_one_out
from fedaug.common.errors import ConfigError
from fedaug.common.model.build import build, train_features
from fedaug.common.model.device import pick_device
from fedaug.common.model.sasrec import SASRec, SASRecConfig

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
"""Flower's own node_config keys in simulation."""
STATE_DIR = "merchant.state_dir"
"""node_config key of a deployed merchant's state directory (ledger, replay cache)."""
OWN_SECTIONS = ("data", "synthetic")
"""run_config sections that describe the aggregator's files, never a deployed merchant's."""


@dataclass
class Merchant:
    split: LeaveOneOut
    trainer: LocalTrainer
    model_config: SASRecConfig
    item_attributes: torch.Tensor | None
    """Public catalog attributes per item (catalog models); built locally, never sent."""
    device: torch.device
    partition_id: int = -1
    """Simulation: which partition of the data set this merchant is (-1 in deployment)."""
    replays: ReplayCache | None = None
    """The last update sent, for a round asked again (private merchants only: it saves their budget)."""
    state_dir: Path | None = None
    """Where this merchant keeps its ledger, replays and the federation's final model bundle."""

    def model(self, state_dict: dict | None = None) -> SASRec:
        model = SASRec(self.model_config, self.item_attributes)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.to(self.device)


MerchantSource = Callable[[Context], Merchant]
"""How a ClientApp finds the merchant a message is for."""


def build_merchant(config: FederationConfig, data: BehaviorData, state_dir: Path, partition_id: int = -1) -> Merchant:
    """The merchant training ``config``'s recipe on ``data``, keeping its ledger in ``state_dir``."""
    device = pick_device(config.device)
    split = leave_one_out(data)
    trainer = build_trainer(config.recipe, split.train.sequences(), data.n_items, rounds=config.federation.rounds,
                            seed=config.federation.seed, state_dir=state_dir, device=device,
                            features=train_features(config.model, split))
    return Merchant(split, trainer, *build(config.model, data), device, partition_id,
                    ReplayCache(state_dir) if trainer.ledger else None, Path(state_dir))


def merchant_for(context: Context) -> Merchant:
    """The merchant for this node. Deployed, it is built once per process (its data loading and splitting are
    not per round); in a simulation, for each message from the data set the process holds once (nothing of a
    merchant stays in memory between its rounds: its ledger and replays live in its state dir)."""
    node, run = tuple(sorted(context.node_config.items())), tuple(sorted(context.run_config.items()))
    if "data.path" in context.node_config:
        return _deployed(node, run)
    if PARTITION_ID in context.node_config:  # Flower's simulation (`flwr run .`): a uniform share of the data set
        config = _federation_config(run)
        pid, n = partition_of(context)
        data = partitions(config, n, "uniform", config.federation.seed).merchant_data(pid)
        return build_merchant(config, data, partition_dir(config.federation.state_dir, pid), pid)
    raise ConfigError(f"node_config needs data.path (deployment) or {PARTITION_ID} (simulation)")


def partition_of(context: Context) -> tuple[int, int]:
    """Flower's simulation convention: this node's partition of the run's data set, and how many there are."""
    if PARTITION_ID not in context.node_config:
        raise ConfigError(f"node_config: key {PARTITION_ID} is required in a simulation")
    return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])


def partition_dir(state_dir: Path, pid: int) -> Path:
    """Where the merchant of partition ``pid`` keeps its ledger, replays and round log."""
    return Path(state_dir) / f"merchant-{pid}"


@lru_cache(maxsize=1)  # the data set, once per process: every merchant's share of it is a view away
def partitions(config, n: int, scheme: str, seed: int, alpha: float = 0.5) -> Merchants:
    """``config``'s data set cut into ``n`` merchants by ``scheme`` (fedaug.common.data.split.assign_merchants)."""
    return Merchants(assign_merchants(load_data(config.data, config.synthetic), n, scheme, seed, alpha))


@lru_cache(maxsize=4)
def _deployed(node_items: tuple, run_items: tuple) -> Merchant:
    """This node's own data, budget and state."""
    node, run = dict(node_items), dict(run_items)
    if STATE_DIR not in node:
        raise ConfigError(f"node_config: key {STATE_DIR} is required next to data.path")
    recipe = {k: v for k, v in run.items() if k.split(".")[0] not in OWN_SECTIONS}
    own = {k: v for k, v in node.items() if k != STATE_DIR}
    config = from_run_config(recipe, FederationConfig, own, where="run_config + node_config")
    return build_merchant(config, load_data(config.data, config.synthetic), Path(str(node[STATE_DIR])))


@lru_cache(maxsize=4)
def _federation_config(run_items: tuple) -> FederationConfig:
    return from_run_config(dict(run_items), FederationConfig)

"""One merchant as the ClientApp sees it: its local split, its trainer and its ledger, built from Flower's context.

Where the data comes from:
- deployment: ``node_config`` has ``data-path`` (+ ``data-format``), ``catalog-path`` (the shared public catalog that
  numbers items), ``state-dir``, ``epsilon-budget``, ``delta`` (written by client.daemon);
- simulation: ``node_config`` has ``partition-id`` / ``num-partitions``; the merchant is that partition of the
  run's data set (``run_config`` ``data-path`` or the embedded synthetic data), cut by ``partition``
  (uniform | category | column) with ``seed``; its ledger lives in ``run_config`` ``state-dir``/merchant-<id>.
Run-wide training settings come from ``run_config`` (see client.config.RUN_CONFIG_KEYS).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from common.device import pick_device
from common.errors import ConfigError
from common.model import SASRec, SASRecConfig
from common.split import LeaveOneOut, assign_merchants, leave_one_out, merchant_partitions

from .attacks import attackers, flip_labels
from .config import MerchantConfig, merchant_config_from
from .ledger import PrivacyLedger
from .replay import ReplayCache
from .trainer import LocalTrainer


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
    attack: str = ""
    """Simulation only: this merchant is Byzantine and sends updates poisoned this way (client.attacks)."""

    def model(self, state_dict: dict | None = None) -> SASRec:
        model = SASRec(self.model_config, self.item_attributes)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.to(self.device)


def merchant_for(node_config: dict, run_config: dict) -> Merchant:
    """The merchant for this node, built once per process (data loading and splitting are not per round)."""
    return _build(tuple(sorted(node_config.items())), tuple(sorted(run_config.items())))


@lru_cache(maxsize=256)  # one per merchant a simulation process hosts
def _build(node_items: tuple, run_items: tuple) -> Merchant:
    node, run = dict(node_items), dict(run_items)
    attack = ""
    if "data-path" in node:  # deployment: this node's own data and state
        config = merchant_config_from(run, node)
        if "state-dir" not in node:
            raise ConfigError("node_config: key state-dir is required next to data-path")
        data, state_dir = config.load_data(), Path(str(node["state-dir"]))
    elif "partition-id" in node:  # simulation: one partition of the run's data set
        config = merchant_config_from(run)
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
        seed = int(run.get("partition-seed", 0))
        data = _partitioned(config, n, str(run.get("partition", "uniform")), seed,
                            float(run.get("dirichlet-alpha", 0.5)))[pid]
        state_dir = Path(str(run.get("state-dir", "fedaug-state"))) / f"merchant-{pid}"
        if run.get("attack") and pid in attackers(n, float(run.get("attackers", 0.0)), seed):
            attack = str(run["attack"])
            data = flip_labels(data, seed) if attack == "labelflip" else data
    else:
        raise ConfigError("node_config needs data-path (deployment) or partition-id (simulation)")
    device = pick_device(config.device)
    split = leave_one_out(data)
    privacy = config.privacy_settings()
    ledger = PrivacyLedger(state_dir) if privacy.private else None
    trainer = LocalTrainer(split.train.sequences(), data.n_items, privacy, config.local.settings(),
                           config.augment.settings(), ledger, device)
    return Merchant(split, trainer, *config.model.build(data), device, int(node.get("partition-id", -1)),
                    ReplayCache(state_dir) if ledger else None, attack)


@lru_cache(maxsize=2)
def _partitioned(config: MerchantConfig, n: int, scheme: str, seed: int, alpha: float):
    return merchant_partitions(assign_merchants(config.load_data(), n, scheme, seed, alpha))

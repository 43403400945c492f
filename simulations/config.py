"""A simulation's configuration: a merchant config plus [federation] (the server) and [simulation] (how the data
set is cut into merchants, which mode runs), and its translation into Flower's flat run_config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import Section
from common.split import PARTITIONS
from server.config import FederatedConfig
from server.config import flat_run_config as server_flat_run_config

MODES = ("federated", "local", "central")


class SimulationSection(Section):
    merchants: int = Field(5, ge=1)
    partition: Literal[PARTITIONS] = "uniform"  # type: ignore[valid-type]
    dirichlet_alpha: float = Field(0.5, gt=0)
    partition_seed: int = 0
    mode: Literal[MODES] = "federated"  # type: ignore[valid-type]
    """federated: Flower's simulation engine; local: every merchant alone; central: all data pooled — each with the
    same DP settings and rounds × local epochs, so the three compare like for like."""
    client_cpus: int = Field(0, ge=0)
    """CPUs per simulated merchant (0: all of them, one merchant trains at a time)."""


SIMULATION_KEYS = {"partition": "partition", "partition-seed": "partition_seed", "dirichlet-alpha": "dirichlet_alpha"}
"""The [simulation] keys merchants read from run_config (client.merchant)."""


class SimulationConfig(FederatedConfig):
    simulation: SimulationSection = SimulationSection()


def flat_run_config(config: SimulationConfig) -> dict:
    """Flower's run_config for a simulation: the federation's, plus how merchants cut the data set."""
    return server_flat_run_config(config) | {key: getattr(config.simulation, field)
                                              for key, field in SIMULATION_KEYS.items()}

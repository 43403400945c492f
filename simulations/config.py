"""A simulation's configuration: a merchant config plus [federation] (the server) and [simulation] (how the data
set is cut into merchants, which mode runs), and its translation into Flower's flat run_config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from client.config import RUN_CONFIG_KEYS, LocalSection, MerchantConfig, MerchantModelSection
from common.config import Section
from common.split import PARTITIONS
from server.config import FederationSection, run_config_of

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


class SimulationModelSection(MerchantModelSection):
    """Under DP, public catalog attributes plus narrow per-item tables beat wide learned tables (README: DP
    utility), so simulations default to them; data without attributes gets the narrow tables alone."""

    catalog: bool | Literal["auto"] = "auto"
    item_dim: int | None = Field(8, ge=0)


class SimulationLocalSection(LocalSection):
    """A merchant holds a tenth of a data set's users, and a round is a few DP steps: bigger Poisson batches (less
    noise per step) and a larger step size learn where the single-shop defaults barely move (README: tuning)."""

    batch_size: int = Field(1024, ge=1)
    lr: float = Field(0.03, gt=0)


class SimulationConfig(MerchantConfig):
    model: SimulationModelSection = SimulationModelSection()
    local: SimulationLocalSection = SimulationLocalSection()
    federation: FederationSection = FederationSection()
    simulation: SimulationSection = SimulationSection()

    def merchant_config(self) -> MerchantConfig:
        """What one merchant trains with: planned rounds = the federation's rounds."""
        fields = {name: getattr(self, name) for name in MerchantConfig.model_fields}
        fields["local"] = self.local.model_copy(update={"rounds": self.federation.rounds,
                                                        "seed": self.federation.seed})
        return MerchantConfig(**fields)


def flat_run_config(config: SimulationConfig) -> dict:
    """Flower's run_config for ``config``: hyphenated keys, values of Flower's config types ("" = default)."""
    dumped = config.merchant_config().model_dump(mode="json")
    flat: dict = {}
    for key, dotted in RUN_CONFIG_KEYS.items():
        if key in ("epsilon-budget",):  # a deployment alias of epsilon
            continue
        node = dumped
        for part in dotted.split("."):
            node = node[part]
        flat[key] = "" if node is None else node
    flat |= {key: getattr(config.simulation, field) for key, field in SIMULATION_KEYS.items()}
    flat |= run_config_of(config.federation)
    flat.setdefault("central-delta", "")
    if isinstance(flat.get("epsilon"), float) and flat["epsilon"] == float("inf"):
        flat["epsilon"] = "inf"
    return flat

"""A simulation's configuration: a federation's sections plus [simulation] (how the data set is cut into
merchants, which mode runs, which merchants are Byzantine). Flower's run_config carries all of it to the
simulation's ServerApp and ClientApp (simulations/apps.py)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from fedaug.common.config import (
    FEDERATED_DEFAULTS,
    NONPRIVATE_FEDERATED_DEFAULTS,
    Config,
    DataPart,
    FederationConfig,
    FederationSection,
    MerchantRunConfig,
    RecipePart,
    Section,
    SyntheticPart,
    federation_config,
)
from fedaug.common.data import BehaviorData
from fedaug.common.data.split import PARTITIONS, assign_merchants
from fedaug.common.model.device import pick_device
from fedaug.simulations.attacks import ATTACKS, attackers

MODES = ("federated", "local", "central")


def _byzantine(simulation: dict) -> int:
    return max(1, round(float(simulation.get("attackers", 0)) * int(simulation.get("merchants", 5))))


DEFENCES = {  # [simulation] defence -> the [federation] settings it stands for
    "none": lambda sim: {"strategy": "fedavg", "norm_bound": 0.0},
    "trimmed": lambda sim: {"strategy": "fedtrimmedavg", "norm_bound": 0.0},
    "median": lambda sim: {"strategy": "fedmedian", "norm_bound": 0.0},
    "multikrum": lambda sim: {"strategy": "multikrum", "byzantine": _byzantine(sim), "norm_bound": 0.0},
    "normbound": lambda sim: {"strategy": "fedavg", "norm_bound": 1.0},
}


class SimulationSection(Section):
    """[simulation]: how the data set is cut into merchants, which mode runs, which merchants are Byzantine."""

    merchants: int = Field(5, ge=1)
    """Merchants the data set is cut into."""
    partition: Literal[PARTITIONS] = "uniform"  # type: ignore[valid-type]
    """How users are given to merchants: uniform (a seeded random split into near-equal groups) | category (non-IID:
    each user's dominant category spread over merchants by Dirichlet(dirichlet_alpha)) | column (the merchant ids
    that came with the data)."""
    dirichlet_alpha: float = Field(0.5, gt=0)
    """The category partition's skew (smaller: more distinct merchants)."""
    partition_seed: int = 0
    """Seeds the partition and the choice of attackers."""
    mode: Literal[MODES] = "federated"  # type: ignore[valid-type]
    """federated: Flower's simulation engine; local: every merchant alone; central: all data pooled — each with the
    same DP settings and rounds × local epochs, so the three compare like for like."""
    client_cpus: int = Field(0, ge=0)
    """CPUs per simulated merchant (0: all of this machine's, one merchant trains at a time; on a Ray cluster, 1).
    Flower's Ray backend runs as many merchants at once as the cluster's nodes fit."""
    client_gpus: float = Field(-1.0, ge=-1)
    """GPUs per simulated merchant (-1: one where this machine has CUDA and the device is not cpu, else none; a
    fraction shares a GPU between merchants)."""
    pooled_selection: bool = False
    """Research switch, not private: choose the text prior's weighting, the statistics' weights and cuts, the
    model's fusion weight and the round kept on every merchant's validation users pooled — data no real aggregator
    holds, read outside any ledger. Every report of such a run says "not private". Off: the model handed out is
    chosen from public settings and accounted releases alone (fedaug.common.priors.composite), as a deployment does."""
    central_evaluation: bool = True
    """The server also scores every round's global model on every user (a simulation's server has the data);
    false: only the merchants sampled for evaluation score it, as in a deployment — a round's cost then follows
    the merchants sampled, not the ones registered. The final model is tested on every user either way."""
    ray_address: str = ""
    """Join a running Ray cluster (``auto``, or the head's HOST:PORT) instead of starting Ray on this machine.
    Every node runs the same Python environment with fedaug installed and sees the state dir at the same path."""
    attack: Literal[("",) + ATTACKS] = ""  # type: ignore[valid-type]
    """Robustness experiments: make a fraction of merchants Byzantine (fedaug.simulations.attacks)."""
    attackers: float = Field(0.0, ge=0, lt=1)
    """The fraction of merchants that attack."""
    attack_scale: float = Field(10.0, gt=0)
    """λ of the scale / signflip / noise attacks."""
    defence: Literal[tuple(DEFENCES)] | None = None  # type: ignore[valid-type]
    """Shorthand that sets [federation]: none (FedAvg), trimmed, median, multikrum (tolerating the attackers),
    normbound (FedAvg after clipping updates to the median distance)."""

    @model_validator(mode="after")
    def _attack_needs_attackers(self):
        if bool(self.attack) != (self.attackers > 0):
            raise ValueError("attack and attackers go together (an attack needs attackers > 0, and vice versa)")
        return self


class SimulationConfig(Config, DataPart, SyntheticPart, RecipePart):
    """`fedaug simulate`, `sweep`, `audit --federated`: a federation over merchants cut from one data set."""

    defaults, nonprivate_defaults = FEDERATED_DEFAULTS, NONPRIVATE_FEDERATED_DEFAULTS
    federation: FederationSection = FederationSection()
    simulation: SimulationSection = SimulationSection()

    @model_validator(mode="before")
    @classmethod
    def _defence_sets_the_federation(cls, raw):
        """[simulation] defence is shorthand for [federation] settings; both given and disagreeing is an error."""
        simulation = raw.get("simulation") if isinstance(raw, dict) else None
        if not isinstance(simulation, dict) or simulation.get("defence") not in DEFENCES:
            return raw
        federation = dict(raw.get("federation") or {})
        for key, value in DEFENCES[simulation["defence"]](simulation).items():
            if key in federation and federation[key] != value:
                raise ValueError(f"simulation.defence {simulation['defence']} sets federation.{key} = {value!r}, "
                                 f"but federation.{key} is {federation[key]!r}")
            federation[key] = value
        return {**raw, "federation": federation}

    @property
    def federation_config(self) -> FederationConfig:
        return federation_config(self)

    def merchant_run(self) -> MerchantRunConfig:
        """What one merchant trains when it trains alone (modes local and central): the same recipe, for the
        federation's rounds and seed."""
        local = self.local.model_dump() | {"rounds": self.federation.rounds, "seed": self.federation.seed}
        return MerchantRunConfig(data=self.data, synthetic=self.synthetic, model=self.model, augment=self.augment,
                                 privacy=self.privacy, local=local, device=self.device)

    def changed(self, **sections: dict) -> SimulationConfig:
        """This config with keys replaced (``section={key: value}``; None removes a key), validated again. Only
        what was set travels, so defaults that mean "not given" stay so — [federation] state_dir, when unset,
        puts each run's state in its own DIR/state."""
        raw = self.given()
        for section, values in sections.items():
            merged = {**raw.get(section, {}), **values}
            raw[section] = {key: value for key, value in merged.items() if value is not None}
        return SimulationConfig.model_validate(raw)

    def client_resources(self) -> dict[str, float]:
        """The Ray resources one simulated merchant takes ([simulation] client_cpus, client_gpus)."""
        sim = self.simulation
        cpus = os.cpu_count() or 1
        if sim.ray_address:
            per_client = sim.client_cpus or 1
        else:
            per_client = min(sim.client_cpus or cpus, cpus)
        gpus = sim.client_gpus
        if gpus < 0:
            gpus = 1.0 if pick_device(self.device).type == "cuda" else 0.0
        return {"num_cpus": per_client, "num_gpus": gpus}

    def assigned(self, data: BehaviorData) -> BehaviorData:
        """``data`` with every user given a merchant, as [simulation] cuts it."""
        sim = self.simulation
        return assign_merchants(data, sim.merchants, sim.partition, sim.partition_seed, sim.dirichlet_alpha)

    def attacker_ids(self, merchants: int | None = None) -> list[int]:
        """Partition ids of the Byzantine merchants among ``merchants`` (default: [simulation] merchants)."""
        sim = self.simulation
        n = sim.merchants if merchants is None else merchants
        return sorted(attackers(n, sim.attackers, sim.partition_seed)) if sim.attack else []


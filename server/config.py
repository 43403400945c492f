"""The aggregator's settings: [federation] in TOML, hyphenated keys in Flower's run_config.

One table, FEDERATION_KEYS, maps the flat run_config keys the ServerApp reads to their TOML names, so that
`fedaug simulate`, `flwr run .` and the deployed aggregator all configure the server the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from client.config import RUN_CONFIG_KEYS, LocalSection, MerchantConfig, MerchantModelSection
from common.config import Section
from common.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum", "multikrum")


class FederationSection(Section):
    """[federation]: rounds, the aggregation strategy, failure handling, central DP, checkpoints and monitoring."""

    rounds: int = Field(10, ge=1)
    strategy: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    """0 turns federated evaluation off (the simulation's central evaluation still runs)."""
    min_nodes: int = Field(1, ge=1)
    """Connected merchants to wait for before sampling a round."""
    min_replies: int = Field(1, ge=1)
    """Usable training replies a round needs to be aggregated; with fewer it is retried, then the run stops."""
    round_timeout: float = Field(3600.0, gt=0)
    """Seconds to wait for replies; merchants that have not answered by then count as dropped out."""
    retries: int = Field(2, ge=0)
    """Extra attempts for a round that got fewer than min_replies usable replies."""
    proximal_mu: float = Field(0.01, ge=0)
    """FedProx μ (sent to merchants, who add the proximal term)."""
    server_lr: float = Field(0.01, gt=0)
    """FedAdam / FedYogi server learning rate η."""
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    """FedTrimmedAvg: fraction cut from each end."""
    byzantine: int = Field(0, ge=0)
    """Krum / multi-Krum: number of malicious merchants tolerated."""
    krum_select: int = Field(0, ge=0)
    """Multi-Krum: updates averaged (0 = all but the tolerated malicious ones)."""
    norm_bound: float = Field(0.0, ge=0)
    """Defence before aggregation: clip every update's distance from the global model to this multiple of the
    round's median distance (0 = off), so no merchant can move the model more than a typical one."""
    central_dp: bool = False
    """Client-level DP on top: Flower's server-side fixed clipping of each update plus Gaussian noise."""
    central_noise: float = Field(1.0, gt=0)
    central_clip: float = Field(1.0, gt=0)
    central_delta: float | None = Field(None, gt=0, lt=1)
    """Default 1 / (10 · merchants)."""
    central_eval: bool = False
    """Simulation only: the server also scores the global model on every merchant's users (it has the data)."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Prometheus /metrics port; 0 = off."""
    state_dir: Path = Path("fedaug-state")
    """Checkpoint, round log and (in simulation) the merchants' ledgers."""
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if self.central_dp and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError("central_dp needs strategy fedavg or fedprox (Flower's accountant assumes FedAvg "
                             "aggregation)")
        return self


FEDERATION_KEYS = {
    # Flower run_config key -> FederationSection field
    "num-server-rounds": "rounds",
    "strategy": "strategy",
    "fraction-train": "fraction_train",
    "fraction-evaluate": "fraction_evaluate",
    "min-nodes": "min_nodes",
    "min-replies": "min_replies",
    "round-timeout": "round_timeout",
    "retries": "retries",
    "proximal-mu": "proximal_mu",
    "server-lr": "server_lr",
    "trim-beta": "trim_beta",
    "byzantine": "byzantine",
    "krum-select": "krum_select",
    "norm-bound": "norm_bound",
    "central-dp": "central_dp",
    "central-noise": "central_noise",
    "central-clip": "central_clip",
    "central-delta": "central_delta",
    "central-eval": "central_eval",
    "metrics-port": "metrics_port",
    "state-dir": "state_dir",
    "seed": "seed",
}


def federation_from(run_config: dict) -> FederationSection:
    """The server's settings from Flower's flat run_config ("" means default); errors name the run_config key."""
    values = {field: run_config[key] for key, field in FEDERATION_KEYS.items()
              if key in run_config and run_config[key] != ""}
    try:
        return FederationSection.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        key = next((k for k, f in FEDERATION_KEYS.items() if f == field), field)
        where = f"run_config key {key}: " if key else "run_config: "
        raise ConfigError(where + error["msg"].removeprefix("Value error, ")) from None


def run_config_of(federation: FederationSection) -> dict:
    """The flat run_config entries for ``federation`` (None values left out: Flower configs have no null)."""
    dumped = federation.model_dump(mode="json")
    return {key: dumped[field] for key, field in FEDERATION_KEYS.items() if dumped[field] is not None}


def state_dir_of(run_config: dict) -> Path:
    return Path(str(run_config.get("state-dir") or "fedaug-state"))


class FederatedModelSection(MerchantModelSection):
    """Under DP, public catalog attributes plus narrow per-item tables beat wide learned tables (README: DP
    utility), so federations default to them; data without attributes gets the narrow tables alone."""

    catalog: bool | Literal["auto"] = "auto"
    item_dim: int | None = Field(8, ge=0)


class FederatedLocalSection(LocalSection):
    """A merchant holds a tenth of a data set's users, and a round is a few DP steps: bigger Poisson batches (less
    noise per step) and a larger step size learn where the single-shop defaults barely move (README: tuning)."""

    batch_size: int = Field(1024, ge=1)
    lr: float = Field(0.03, gt=0)


class FederatedConfig(MerchantConfig):
    """A federation's recipe: what every merchant trains (model, augment, privacy, local) and [federation]. Both
    `fedaug simulate` and the deployed aggregator send it to merchants as Flower's run_config."""

    model: FederatedModelSection = FederatedModelSection()
    local: FederatedLocalSection = FederatedLocalSection()
    federation: FederationSection = FederationSection()

    def merchant_config(self) -> MerchantConfig:
        """What one merchant trains with: planned rounds = the federation's rounds."""
        fields = {name: getattr(self, name) for name in MerchantConfig.model_fields}
        fields["local"] = self.local.model_copy(update={"rounds": self.federation.rounds,
                                                        "seed": self.federation.seed})
        return MerchantConfig(**fields)


def flat_run_config(config: FederatedConfig) -> dict:
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
    flat |= run_config_of(config.federation)
    flat.setdefault("central-delta", "")
    if isinstance(flat.get("epsilon"), float) and flat["epsilon"] == float("inf"):
        flat["epsilon"] = "inf"
    return flat

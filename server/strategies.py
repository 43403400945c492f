"""Strategy choice: Flower's own strategies from flwr.serverapp.strategy, picked and parameterised by config.

Every strategy weighs replies by the key WEIGHT, which the server writes into each reply after validating it (the
merchant's user count, or 1 for every merchant under central DP, whose accountant assumes uniform weights).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedaug.common.config import FederationSection
from fedaug.common.errors import ConfigError
from fedaug.runtime.flower import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

WEIGHT = "weight"
STATE_ATTRIBUTES = ("m_t", "v_t")
"""Strategy state a checkpoint must carry (FedAdam / FedYogi moments); FedAvg-style strategies have none."""


def sample_size(federation: FederationSection, n_nodes: int) -> int:
    """Merchants sampled per training round (what FedAvg.configure_train computes)."""
    return max(int(n_nodes * federation.fraction_train), 1)


def build_strategy(federation: FederationSection, n_nodes: int) -> Strategy:
    """The configured strategy for a federation of ``n_nodes`` merchants, wrapped for central DP when asked."""
    common = dict(fraction_train=federation.fraction_train, fraction_evaluate=federation.fraction_evaluate,
                  min_train_nodes=1, min_evaluate_nodes=0 if federation.fraction_evaluate == 0 else 1,
                  min_available_nodes=federation.min_nodes, weighted_by_key=WEIGHT)
    name = federation.strategy
    sampled = sample_size(federation, n_nodes)
    if name in ("krum", "multikrum") and sampled <= 2 * federation.byzantine + 2:
        raise ConfigError(f"federation.byzantine: {name} needs more than 2·byzantine + 2 sampled merchants "
                          f"({sampled} sampled, byzantine = {federation.byzantine})")
    if name == "fedavg":
        strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=federation.proximal_mu)
    elif name == "fedadam":
        strategy = FedAdam(**common, eta=federation.server_lr)
    elif name == "fedyogi":
        strategy = FedYogi(**common, eta=federation.server_lr)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, beta=federation.trim_beta)
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "krum":
        strategy = Krum(**common, num_malicious_nodes=federation.byzantine)
    else:
        strategy = MultiKrum(**common, num_malicious_nodes=federation.byzantine,
                             num_nodes_to_select=federation.krum_select or sampled - federation.byzantine)
    if not federation.central_dp:
        return strategy
    delta = federation.central_delta or 1.0 / (10 * n_nodes)
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=n_nodes, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return DifferentialPrivacyServerSideFixedClipping(strategy, federation.central_noise, federation.central_clip,
                                                      sampled, accountant=accountant)


def central_dp(strategy: Strategy) -> DifferentialPrivacyServerSideFixedClipping | None:
    return strategy if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) else None


def inner(strategy: Strategy) -> Strategy:
    """The aggregation strategy under any DP wrapper (where the optimiser state lives)."""
    dp = central_dp(strategy)
    return dp.strategy if dp else strategy

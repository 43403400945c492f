"""What a finished (or stopped) federation amounts to, from the aggregator's checkpoint alone: the final global
model's metrics, every round, every merchant's ε. `fedaug simulate` and the deployed aggregator both write it as
metrics.json."""

from __future__ import annotations

import numpy as np

from common.metrics import json_number, select

from .checkpoint import ServerState
from .config import FederatedConfig


def federation_summary(config: FederatedConfig, state: ServerState) -> dict:
    """``test`` is the central evaluation where the server has the data (simulation), else the merchants'
    user-weighted federated test."""
    last = state.history[-1]
    rounds = [{"round": h["round"], "participants": h["participants"], "failures": h["failures"],
               "train_loss": h["train_loss"], "epsilon_max": h["epsilon_max"], "epsilon_mean": h["epsilon_mean"],
               "central_epsilon": h.get("central_epsilon"), "valid": _valid(h),
               "federated_valid": select(h["federated"]) if h.get("federated") else None, "seconds": h["seconds"]}
              for h in state.history]
    merchants = []
    for node, m in state.merchants.items():
        merchants.append({"merchant": int(m.get("partition-id", -1)), "node": node,
                          "users": m.get("users", m.get("num-examples")), "epsilon": m.get("epsilon"),
                          "epsilon_by_round": m.get("epsilon_by_round", {}),
                          "test": select(m["test"]) if m.get("test") else None})
    merchants.sort(key=lambda m: m["merchant"])
    epsilons = [m["epsilon"] for m in merchants if m["epsilon"] is not None]
    privacy = {"epsilon_budget": json_number(config.privacy.epsilon), "epsilon_max": max(epsilons, default=None),
               "epsilon_mean": float(np.mean(epsilons)) if epsilons else None,
               "delta": config.privacy.delta or "1 / (10 · merchant users)",
               "max_grad_norm": config.privacy.max_grad_norm}
    if config.federation.central_dp:
        privacy["central"] = {"epsilon": last.get("central_epsilon"), "delta": last.get("central_delta"),
                              "noise_multiplier": config.federation.central_noise,
                              "clipping_norm": config.federation.central_clip}
    federated_test = select(last["federated"]["test"]) if "test" in (last.get("federated") or {}) else None
    return {"test": select(last["central_test"]) if "central_test" in last else federated_test,
            "valid": _valid(last), "federated_test": federated_test,
            "rounds": rounds, "merchants": merchants, "privacy": privacy, "run_key": state.run_key}


def _valid(entry: dict) -> dict | None:
    if "central" in entry:
        return select(entry["central"])
    return select(entry["federated"]) if entry.get("federated") else None

"""What a finished (or stopped) federation amounts to, from the aggregator's checkpoint alone: the final global
model's metrics, every round, every merchant's ε. `fedaug simulate` and the deployed aggregator both write it as
metrics.json."""

from __future__ import annotations

import numpy as np

from common.metrics import METRIC_NAMES, json_number, select

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


def render_deployment_report(metrics: dict) -> str:
    """report.md of a deployed run: the final global model's federated metrics, each merchant's ε, each round."""
    cfg, privacy = metrics["config"], metrics["privacy"]
    names = {node: name for name, node in metrics.get("merchant_keys", {}).items()}
    lines = ["# fedaug federation (deployed)", "",
             "| setting | value |", "|---|---|",
             f"| rounds | {cfg['federation']['rounds']} ({cfg['federation']['strategy']}) |",
             f"| merchants allowed | {', '.join(sorted(metrics.get('merchant_keys', {}))) or '—'} |",
             f"| catalog | {cfg['data']['catalog']} |",
             f"| default ε budget | {privacy['epsilon_budget']} (a merchant's own budget wins) |",
             f"| wall time | {metrics['seconds']:.0f} s |", "",
             "## Final global model (merchants' held-out users, user-weighted)", "",
             "| " + " | ".join(METRIC_NAMES) + " |", "|" + "---|" * len(METRIC_NAMES)]
    test = metrics.get("test")
    lines.append("| " + " | ".join(f"{test[k]:.4f}" if test else "—" for k in METRIC_NAMES) + " |")
    lines += ["", "## Merchants", "", "| merchant | node | users | ε spent |", "|---|---|---|---|"]
    for m in sorted(metrics["merchants"], key=lambda m: names.get(str(m["node"]), "~")):
        eps, users = m["epsilon"], m["users"] if m["users"] is not None else "—"
        spent = "—" if eps is None else ("inf" if eps < 0 else f"{eps:.3f}")
        lines.append(f"| {names.get(str(m['node']), '?')} | {m['node']} | {users} | {spent} |")
    lines += ["", "## Rounds", "", "| round | participants | failures | train loss | max ε | valid NDCG@10 |",
              "|---|---|---|---|---|---|"]
    for r in metrics["rounds"]:
        failures = ", ".join(f"{k} {v}" for k, v in r["failures"].items() if v) or "—"
        valid = f"{r['valid']['ndcg@10']:.4f}" if r.get("valid") else "—"
        loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "—"
        eps = f"{r['epsilon_max']:.3f}" if r.get("epsilon_max") is not None else "—"
        lines.append(f"| {r['round']} | {r['participants']} | {failures} | {loss} | {eps} | {valid} |")
    return "\n".join(lines) + "\n"

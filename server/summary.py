"""What a finished (or stopped) federation amounts to, from the aggregator's checkpoint alone: the final global
model's metrics, every round, every merchant's ε. `fedaug simulate` and the deployed aggregator both write it as
metrics.json."""

from __future__ import annotations

import math

import numpy as np

from common.config import FederationConfig
from common.metrics import METRIC_NAMES, select
from common.records import MerchantRecord, PrivacyRecord, RunMetrics

from .checkpoint import ServerState


def federation_summary(config: FederationConfig, state: ServerState, *, mode: str, seconds: float,
                       data: dict) -> RunMetrics:
    """``test`` is the central evaluation where the server has the data (simulation), else the merchants'
    user-weighted federated test."""
    last = state.history[-1]
    merchants = sorted((MerchantRecord(merchant=int(m.get("partition-id", -1)), node=node, name=m.get("name"),
                                       users=m.get("users", m.get("num-examples")), epsilon=m.get("epsilon"),
                                       epsilon_by_round=m.get("epsilon_by_round", {}),
                                       test=select(m["test"]) if m.get("test") else None)
                        for node, m in state.merchants.items()), key=lambda m: m.merchant)
    epsilons = [m.epsilon for m in merchants if m.epsilon is not None]
    privacy = PrivacyRecord(epsilon_budget=config.privacy.epsilon, epsilon_max=max(epsilons, default=None),
                            epsilon_mean=float(np.mean(epsilons)) if epsilons else None,
                            delta=config.privacy.delta or "1 / (10 · merchant users)",
                            max_grad_norm=config.privacy.max_grad_norm)
    if config.federation.central_dp:
        privacy.central = {"epsilon": last.central_epsilon, "delta": last.central_delta,
                           "noise_multiplier": config.federation.central_noise,
                           "clipping_norm": config.federation.central_clip}
    best = next((r for r in state.history if r.round == state.best_round), None)
    parts = {"model": {"evaluation": state.selection}} if state.selection else None
    return RunMetrics(parts=parts, mode=mode, test=last.test, valid=last.valid,
                      federated_test=last.federated_test, rounds=list(state.history), merchants=merchants,
                      privacy=privacy, run_key=state.run_key, seconds=seconds, data=data,
                      config=config.model_dump(mode="json"), best_round=state.best_round or None,
                      best_valid=best.valid if best else None, best_test=state.best_test)


def render_deployment_report(metrics: RunMetrics) -> str:
    """report.md of a deployed run: the final global model's federated metrics, each merchant's ε, each round."""
    cfg = metrics.config
    keys = metrics.merchant_keys or {}
    names = {node: name for name, node in keys.items()}
    lines = ["# fedaug federation (deployed)", "",
             "| setting | value |", "|---|---|",
             f"| rounds | {cfg['federation']['rounds']} ({cfg['federation']['strategy']}) |",
             f"| merchants allowed | {', '.join(sorted(keys)) or '—'} |",
             f"| catalog | {cfg['data']['catalog']} |",
             f"| default ε budget | {cfg['privacy']['epsilon']} (a merchant's own budget wins) |",
             f"| wall time | {metrics.seconds:.0f} s |", "",
             "## Final global model (merchants' held-out users, user-weighted)", "",
             "| " + " | ".join(METRIC_NAMES) + " |", "|" + "---|" * len(METRIC_NAMES)]
    test = metrics.test
    lines.append("| " + " | ".join(f"{test[k]:.4f}" if test else "—" for k in METRIC_NAMES) + " |")
    if not test:
        lines += ["", "Private merchants keep metrics on their users to themselves (outside their accounted ε)."]
    evaluation = (metrics.parts or {}).get("model", {}).get("evaluation")
    if evaluation and evaluation.get("candidates"):
        lines += ["", "## The model handed out: the merchants' federated DP evaluation", "",
                  f"{evaluation['merchants']} merchants scored the candidate weights of the trained model beside the "
                  "text prior with the DP statistics on their own validation users and released noised sums "
                  f"(accounted in their ledgers; noise std {evaluation['noise_std']:.1f} per summed figure, "
                  f"{evaluation['users']:.0f} users as released). Chosen weight: {evaluation['weight']}"
                  + (" (the trained model adds nothing measured)" if math.isinf(float(evaluation["weight"])) else "")
                  + ".", "", "| model weight | valid NDCG@10 (DP estimate) | gain over none | low end |",
                  "|---|---|---|---|", f"| none (prior + statistics) | {_num(evaluation.get('prior_valid_ndcg@10'))} | "
                  "— | — |"]
        lines += [f"| {c['weight']:g} | {_num(c.get('valid_ndcg@10'))} | {_num(c.get('gain'))} | "
                  f"{_num(c.get('low'))} |" for c in evaluation["candidates"]]
    lines += ["", "## Merchants", "", "| merchant | node | users | ε spent |", "|---|---|---|---|"]
    for m in sorted(metrics.merchants, key=lambda m: names.get(str(m.node), "~")):
        users = m.users if m.users is not None else "—"
        spent = "—" if m.epsilon is None else ("inf" if m.epsilon < 0 else f"{m.epsilon:.3f}")
        lines.append(f"| {names.get(str(m.node), '?')} | {m.node} | {users} | {spent} |")
    lines += ["", "## Rounds", "", "| round | participants | failures | train loss | max ε | valid NDCG@10 |",
              "|---|---|---|---|---|---|"]
    for r in metrics.rounds:
        failures = ", ".join(f"{k} {v}" for k, v in r.failures.items() if v) or "—"
        valid = f"{r.valid['ndcg@10']:.4f}" if r.valid else "—"
        loss = f"{r.train_loss:.3f}" if r.train_loss is not None else "—"
        eps = f"{r.epsilon_max:.3f}" if r.epsilon_max is not None else "—"
        lines.append(f"| {r.round} | {r.participants} | {failures} | {loss} | {eps} | {valid} |")
    lines.append("")
    return "\n".join(lines)


def _num(value) -> str:
    return "—" if value is None else f"{value:.4f}"

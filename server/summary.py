"""What a finished (or stopped) federation amounts to, from the aggregator's checkpoint alone: the final global
model's metrics, every round, every merchant's ε. `fedaug simulate` and the deployed aggregator both write it as
metrics.json. And the story every run's output tells (``attribute``): what the model handed out is made of, read
from its bundle card's parts, where its trained parts add nothing, and the ε spent — one line for the aggregator,
`fedaug simulate` and `fedaug local`, and the head of their reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedaug.common.config import FederationConfig
from fedaug.common.model.metrics import METRIC_NAMES, select
from fedaug.common.priors.composite import product_kind
from fedaug.common.recommend.bundle import Bundle, load_bundle
from fedaug.common.records import MerchantRecord, PrivacyRecord, RunMetrics, federation_name
from fedaug.server.checkpoint import PARTITION, USERS, ServerState

DASH = "—"
"""A cell with nothing to show."""


def federation_summary(config: FederationConfig, state: ServerState, *, mode: str, seconds: float,
                       data: dict) -> RunMetrics:
    """``test`` is the central evaluation where the server has the data (simulation), else the merchants'
    user-weighted federated test."""
    last = state.history[-1]
    merchants = sorted((MerchantRecord(merchant=int(m.get(PARTITION, -1)), node=node, name=m.get("name"),
                                       users=m.get("users", m.get(USERS)), epsilon=m.get("epsilon"),
                                       epsilon_by_round=m.get("epsilon_by_round", {}),
                                       test=select(m["test"]) if m.get("test") else None)
                        for node, m in state.merchants.items()), key=lambda m: m.merchant)
    epsilons = [m.epsilon for m in merchants if m.epsilon is not None]
    privacy = PrivacyRecord(epsilon_budget=config.privacy.epsilon, epsilon_max=max(epsilons, default=None),
                            epsilon_mean=float(np.mean(epsilons)) if epsilons else None,
                            delta=config.privacy.delta or "1 / (10 × each merchant's trainable users)",
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
                      best_valid=best.valid if best else None, best_test=state.best_test,
                      flower_runs=list(state.flower_runs))


def read_handed_out(metrics: RunMetrics, model_dir: Path) -> Bundle:
    """What the model handed out is, from its own bundle: its card's parts and one phrase for it (``metrics.parts``,
    ``metrics.product``); returns the bundle."""
    bundle = load_bundle(model_dir)
    metrics.parts, metrics.product = bundle.card.parts, product_kind(bundle.scorer)
    return bundle


@dataclass(frozen=True)
class Attribution:
    """What a run's headline figure is the figure of — the model handed out, read from its card's parts —,
    whether the trained parts (DP statistics, trained model) add anything over the public text prior, and the ε
    spent for it."""

    source: str
    """The parts the headline figure comes from, e.g. "the public text prior + DP statistics"."""
    nothing: str | None
    """Plainly, what adds nothing (None: every trained part in it was measured to add something)."""
    spent: str
    """ε spent, e.g. "ε spent: 8.00 per merchant"."""

    def line(self) -> str:
        """One line for terminals and reports."""
        return "; ".join(filter(None, (f"the model handed out: {self.source}", self.nothing, self.spent)))


def attribute(metrics: RunMetrics) -> Attribution:
    """The run's Attribution, from what its metrics already say: the card's parts (``metrics.parts``: the model's
    weight, the statistics' weights and what their cuts kept), else the fusion weight and ``metrics.product``, and
    the paired test gain over the text prior (``metrics.gain_over_text``)."""
    parts = metrics.parts or {}
    model = parts.get("model") or {}
    prior = "text prior" in parts or (not parts and metrics.fusion is not None)
    weight = float(model["weight"]) if "weight" in model else metrics.fusion.weight if metrics.fusion else 1.0
    model_used = not math.isinf(weight)
    statistics = parts.get("statistics")
    stats_used = None if statistics is None else bool(
        (statistics.get("popularity_weight") and statistics.get("items_kept", 1))
        or (statistics.get("pair_weight") and statistics.get("pairs_kept", 1)))
    notes: list[str] = []
    if not prior:
        source = metrics.product if metrics.product and not parts else "the trained model alone (no public text prior)"
    elif not parts:  # the research switch's model, or every merchant's own: the phrase its run gave
        source = metrics.product or "the public text prior" + (" + the trained model" if model_used else " alone")
    else:
        names = ["the public text prior"] + (["DP statistics"] if stats_used else [])
        if model_used:
            names.append(f"the trained model (fused at prior weight {weight:g})")
        source = " + ".join(names) + ("" if len(names) > 1 else " alone")
    if prior and not model_used:
        notes.append("the trained model adds nothing over the public prior"
                     + (" with the DP statistics" if stats_used else ""))
    if stats_used is False:
        notes.append("the DP statistics were all below their noise cut (they add nothing)")
    gain = ((metrics.gain_over_text or {}).get("final") or {}).get("gain_over_text_prior")
    if gain and prior and (model_used or stats_used) and gain["low"] <= 0:
        added = "the trained parts" if model_used else "the DP statistics"
        interval = f"test NDCG@10 gain {gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"
        notes.append(f"{added} make it worse than the public prior alone ({interval})" if gain["high"] < 0 else
                     f"what {added} add over the public prior is within chance ({interval})")
    popularity = metrics.baselines.get("popularity")
    if popularity and metrics.test and metrics.test["ndcg@10"] < popularity["ndcg@10"]:
        notes.append(f"below popularity (test NDCG@10 {metrics.test['ndcg@10']:.4f} vs {popularity['ndcg@10']:.4f})")
    return Attribution(source=source, nothing="; ".join(notes) or None, spent=_spent(metrics))


def _spent(metrics: RunMetrics) -> str:
    privacy = metrics.privacy
    budget = privacy.epsilon_budget if privacy else None
    if privacy is None or (isinstance(budget, int | float) and math.isinf(budget)):
        return "non-private (no ε spent)"
    of = f" of {budget:g}" if isinstance(budget, int | float) else ""
    epsilons = [m.epsilon for m in metrics.merchants if m.epsilon is not None and math.isfinite(m.epsilon)]
    if len(epsilons) > 1:
        high, low = max(epsilons), min(epsilons)
        return (f"ε spent: {high:.2f}{of} per merchant" if high - low < 0.005 else
                f"ε spent: {low:.2f} to {high:.2f}{of} per merchant (mean {np.mean(epsilons):.2f})")
    spent = epsilons[0] if epsilons else privacy.epsilon_max
    if spent is None:
        return "ε spent: not reported"
    return f"ε spent: {spent:.2f}{of}" + (" per merchant" if metrics.mode in ("federated", "deployed", "local") else "")


def markdown_table(header: list[str], rows: list[list[str]], *, keep: tuple[int, ...] = (0,)) -> list[str]:
    """A Markdown table's lines; a column whose every cell is empty or "—" is left out (columns in ``keep``
    stay)."""
    shown = [i for i in range(len(header))
             if i in keep or any(row[i] not in ("", DASH) for row in rows)]
    return (["| " + " | ".join(header[i] for i in shown) + " |", "|" + "---|" * len(shown)]
            + ["| " + " | ".join(row[i] for i in shown) + " |" for row in rows])


def render_deployment_report(metrics: RunMetrics) -> str:
    """report.md of a deployed run: what the model handed out is and whether its trained parts add anything, the
    final global model's federated metrics, each merchant's ε, each round."""
    cfg = metrics.config
    keys = metrics.merchant_keys or {}
    names = {node: name for name, node in keys.items()}
    test = metrics.test
    lines = [f"# fedaug {federation_name(metrics.run_key or '?', metrics.flower_runs)} (deployed)", "",
             f"**{attribute(metrics).line()}.**", "",
             "| setting | value |", "|---|---|",
             f"| rounds | {cfg['federation']['rounds']} ({cfg['federation']['strategy']}) |",
             f"| merchants allowed | {', '.join(sorted(keys)) or DASH} |",
             f"| catalog | {cfg['data']['catalog']} |",
             f"| default ε budget | {cfg['privacy']['epsilon']} (a merchant's own budget wins) |",
             f"| wall time | {metrics.seconds:.0f} s |", "",
             "## Final global model (merchants' held-out users, user-weighted)", ""]
    if test:
        lines += markdown_table(list(METRIC_NAMES), [[f"{test[k]:.4f}" for k in METRIC_NAMES]])
    else:
        lines.append("Private merchants keep metrics on their users to themselves (outside their accounted ε).")
    evaluation = (metrics.parts or {}).get("model", {}).get("evaluation")
    if evaluation and evaluation.get("candidates"):
        lines += ["", "## The model handed out: the merchants' federated DP evaluation", "",
                  f"{evaluation['merchants']} merchants scored the candidate weights of the trained model beside the "
                  "text prior with the DP statistics on their own validation users and released noised sums "
                  f"(accounted in their ledgers; noise std {evaluation['noise_std']:.1f} per summed figure, "
                  f"{evaluation['users']:.0f} users as released). Chosen weight: {evaluation['weight']}"
                  + (" (the trained model adds nothing measured)" if math.isinf(float(evaluation["weight"])) else "")
                  + ".", ""]
        lines += markdown_table(
            ["model weight", "valid NDCG@10 (DP estimate)", "gain over none", "low end"],
            [["none (prior + statistics)", _num(evaluation.get("prior_valid_ndcg@10")), DASH, DASH]]
            + [[f"{c['weight']:g}", _num(c.get("valid_ndcg@10")), _num(c.get("gain")), _num(c.get("low"))]
               for c in evaluation["candidates"]])
    lines += ["", "## Merchants", ""]
    lines += markdown_table(["merchant", "node", "users", "ε spent"], [
        [names.get(str(m.node)) or m.label, str(m.node), DASH if m.users is None else str(m.users),
         DASH if m.epsilon is None else ("inf" if m.epsilon < 0 else f"{m.epsilon:.3f}")]
        for m in sorted(metrics.merchants, key=lambda m: names.get(str(m.node)) or m.label)])
    lines += ["", "## Rounds", ""]
    lines += markdown_table(["round", "participants", "failures", "train loss", "max ε", "valid NDCG@10"], [
        [str(r.round), str(r.participants), ", ".join(f"{k} {v}" for k, v in r.failures.items() if v) or DASH,
         DASH if r.train_loss is None else f"{r.train_loss:.3f}",
         DASH if r.epsilon_max is None else f"{r.epsilon_max:.3f}", _num((r.valid or {}).get("ndcg@10"))]
        for r in metrics.rounds])
    lines.append("")
    return "\n".join(lines)


def _num(value) -> str:
    return DASH if value is None else f"{value:.4f}"

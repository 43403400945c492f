"""The run metrics every training run starts from (baseline, merchant, pooled) and the simulation report."""

from __future__ import annotations

import math
import time
from pathlib import Path

from pydantic import BaseModel

from common.atomic import write_bytes_atomic
from common.data import BehaviorData
from common.evaluate import COLD_BELOW, Scorer, Tested, cold_targets, evaluate, tested
from common.metrics import METRIC_NAMES, select
from common.records import RunMetrics
from common.split import LeaveOneOut

METRIC_KEYS = METRIC_NAMES
# ``tested``, ``Tested``, ``cold_targets`` and ``COLD_BELOW`` live in common/evaluate.py (a merchant's check of a
# received model uses them too, and client/ never imports simulations/); runs import them from here as before.
__all__ = ["COLD_BELOW", "METRIC_KEYS", "Tested", "cold_targets", "final_metrics", "render_report", "tested",
           "write_report"]


def final_metrics(mode: str, scorer: Scorer, split: LeaveOneOut, data: BehaviorData, config: BaseModel, device,
                  epochs: int, started: float) -> RunMetrics:
    """The trained model's test (all users, and cold-item targets) and validation metrics with what the run was;
    callers fill in the rest."""
    test = tested(scorer, split)
    return RunMetrics(mode=mode, test=test.all, valid=select(evaluate(scorer, split, "valid")),
                      test_users=len(test.cold_mask), epochs=epochs, seconds=round(time.monotonic() - started, 2),
                      data=data.summary(), config=config.model_dump(mode="json") | {"device": str(device)},
                      test_cold=test.cold, cold_users=int(test.cold_mask.sum()), test_by_type=test.by_type,
                      model=config.model.describe(data) if hasattr(config, "model") else None)


def write_report(metrics: RunMetrics, out: Path, plots: list[str]) -> None:
    """``out/report.md``: settings, the test table with the baselines, privacy, merchants and rounds."""
    write_bytes_atomic(Path(out) / "report.md", render_report(metrics, plots).encode())


def _selection_lines(metrics: RunMetrics) -> list[str]:
    """How the model handed out was chosen and what it is made of (above the test table)."""
    if metrics.selection == "private":
        how = ("**private selection**: from public settings and the merchants' accounted releases alone (the "
               "statistics' cuts from their own noise level); no merchant's held-out data was read to choose "
               "anything. The model tested is the bundle every merchant received.")
    else:
        how = (f"**{metrics.selection}** — NOT PRIVATE: the prior's weighting, the statistics' weights and cuts, "
               "the model's fusion weight and the round kept were chosen on every merchant's validation users "
               "pooled, data no real aggregator holds, outside any ledger. A research figure.")
    lines = [f"Selection: {how}", "", f"The model handed out: {metrics.product or '—'}.", ""]
    parts = metrics.parts or {}
    if "statistics" in parts:
        st = parts["statistics"]
        lines += [f"DP statistics: popularity weight {st['popularity_weight']:g} (cut {st['popularity_cut_std']:g} "
                  f"noise std, {st['items_kept']} items kept), transition weight {st['pair_weight']:g} (cut "
                  f"{st['pair_cut_std']:g} noise std, {st['pairs_kept']} pairs kept), from "
                  f"{st.get('merchants', '?')} merchants.", ""]
    if "model" in parts and parts["model"].get("note"):
        lines += [f"Trained model: weight {parts['model']['weight']} — {parts['model']['note']}.", ""]
    evaluation = (parts.get("model") or {}).get("evaluation")
    if evaluation and evaluation.get("candidates"):
        lines += [f"Federated DP evaluation ({evaluation.get('merchants', '?')} merchants, "
                  f"{evaluation['users']:.0f} validation users as released, noise std {evaluation['noise_std']:.1f} "
                  "per summed coordinate): the model's weight beside the prior with the statistics, each "
                  "candidate's validation gain over none and the low end of its interval.", "",
                  "| weight | valid NDCG@10 (released) | gain | low |", "|---|---|---|---|"]
        lines += [f"| {c['weight']:g} | {_fmt(c.get('valid_ndcg@10'))} | {_fmt(c.get('gain'))} | "
                  f"{_fmt(c.get('low'))} |" for c in evaluation["candidates"]]
        lines.append("")
    return lines


def render_report(metrics: RunMetrics, plots: list[str]) -> str:
    cfg = metrics.config
    fed, sim, priv = cfg["federation"], cfg["simulation"], metrics.privacy
    augment = cfg["augment"]
    lines = [f"# fedaug simulation: {metrics.mode}", "",
             "| setting | value |", "|---|---|",
             f"| data | {cfg['data']['path'] or 'embedded synthetic'} ({metrics.data['users']} users, "
             f"{metrics.data['items']} items) |",
             f"| merchants | {metrics.merchants_total} ({sim['partition']} partition) |",
             f"| mode | {metrics.mode} |",
             f"| rounds × local epochs | {fed['rounds']} × {cfg['local']['local_epochs']} |",
             f"| strategy | {fed['strategy'] if metrics.mode == 'federated' else '—'} |",
             f"| ε per merchant (budget) | {_fmt(priv.epsilon_budget)} |",
             f"| augmentation | {_augment_text(augment)} |",
             f"| model | {metrics.model or '—'} |",
             f"| batch, lr, C | {cfg['local']['batch_size']}, {cfg['local']['lr']}, "
             f"{cfg['privacy']['max_grad_norm']} |",
             f"| wall time | {metrics.seconds:.0f} s |", "",
             "## Test metrics (leave-one-out, full ranking)", "",
             "| run | " + " | ".join(METRIC_KEYS) + " | NDCG@10 ratio |",
             "|---|" + "---|" * (len(METRIC_KEYS) + 1)]
    if metrics.selection:
        lines[-4:-4] = _selection_lines(metrics)
    runs = {f"**{metrics.mode}**": metrics.test}
    if metrics.best_test is not None and metrics.best_round != len(metrics.rounds) and \
            metrics.selection != "private":
        runs[f"{metrics.mode}, best-validation round ({metrics.best_round})"] = metrics.best_test
    if metrics.fusion is not None:
        runs[f"{metrics.mode}, model alone (item ids, no text prior)"] = metrics.fusion.model_test
    runs |= dict(metrics.baselines)
    reference = metrics.baselines.get("centralised non-private")
    for name, test in runs.items():
        ratio = f"{metrics.test['ndcg@10'] / test['ndcg@10']:.2f}× of it" if test is not metrics.test and \
            test["ndcg@10"] > 0 else ""
        lines.append(f"| {name} | " + " | ".join(f"{test[k]:.4f}" for k in METRIC_KEYS) + f" | {ratio} |")
    if reference:
        lines += ["", f"Test NDCG@10 is **{metrics.test['ndcg@10'] / reference['ndcg@10']:.3f}×** the "
                  "centralised non-private baseline."]
    if metrics.gain_over_text:
        gains = [f"{name} model (round {g['round']}) {d['gain']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                 for name, g in metrics.gain_over_text.items() for d in [g["gain_over_text_prior"]]]
        lines += ["", "Gain over the text prior, test NDCG@10 per user (mean, 95 % paired interval): "
                  + "; ".join(gains) + "."]
    if metrics.test_cold is not None:
        cold = {f"**{metrics.mode}**": metrics.test_cold}
        if metrics.fusion is not None and metrics.fusion.model_test_cold is not None:
            cold[f"{metrics.mode}, model alone"] = metrics.fusion.model_test_cold
        cold |= {name: m for name, m in metrics.baselines_cold.items() if m is not None}
        lines += ["", f"Cold items: the {metrics.cold_users} test users whose target had fewer than {COLD_BELOW} "
                  "training interactions.", "", "| run | hr@10 | ndcg@10 |", "|---|---|---|"]
        lines += [f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} |" for name, m in cold.items()]
    if metrics.test_by_type:
        lines += ["", f"By the test event's type ({metrics.mode}):", "", "| type | users | hr@10 | ndcg@10 |",
                  "|---|---|---|---|"]
        lines += [f"| {kind} | {m['users']} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} |"
                  for kind, m in metrics.test_by_type.items()]
    lines += ["", "## Privacy", ""]
    if isinstance(priv.epsilon_budget, int | float) and math.isinf(priv.epsilon_budget):
        lines.append("- non-private (ε = inf): no DP-SGD, no noise, nothing accounted.")
    else:
        lines.append(f"- ε per merchant: max {_fmt(priv.epsilon_max)}, mean {_fmt(priv.epsilon_mean)} "
                     f"(budget {_fmt(priv.epsilon_budget)}), user-level DP-SGD with per-user clipping C = "
                     f"{priv.max_grad_norm}, accounted by each merchant's ledger (PRV, never above RDP).")
    if priv.central:
        c = priv.central
        lines.append(f"- central (client-level) DP: ε {_fmt(c['epsilon'])} at δ {c['delta']:.2g}, noise multiplier "
                     f"{c['noise_multiplier']}, update clipping {c['clipping_norm']} (Flower's RDP accountant, "
                     "no sampling amplification).")
    if metrics.merchants:
        lines += ["", "## Merchants", "", "| merchant | users | ε | test NDCG@10 | test HR@10 |",
                  "|---|---|---|---|---|"]
        for m in metrics.merchants:
            test = m.test or {}
            lines.append(f"| {m.merchant} | {m.users} | {_fmt(m.epsilon)} | "
                         f"{_fmt(test.get('ndcg@10'))} | {_fmt(test.get('hr@10'))} |")
    if metrics.rounds:
        fused = any(r.fusion_weight is not None for r in metrics.rounds)
        lines += ["", "## Rounds", ""]
        if fused:
            lines += ["Validation is of the global model fused with the public text prior, at the weight this round's "
                      "validation chose (common/fusion.py); \"model alone\" is without the prior.", ""]
        lines += ["| round | valid NDCG@10 | model alone | prior weight | train loss | max ε | merchants | "
                  "not aggregated |", "|---|---|---|---|---|---|---|---|"]
        for r in metrics.rounds:
            missing = ", ".join(f"{v} {k}" for k, v in r.failures.items() if v) or "—"
            alone = _fmt(r.model_valid["ndcg@10"]) if r.model_valid else "—"
            valid = _fmt(r.valid["ndcg@10"]) if r.valid else "—"
            lines.append(f"| {r.round}{' (kept)' if r.round == metrics.best_round else ''} | "
                         f"{valid} | {alone} | {_fmt(r.fusion_weight)} | {_fmt(r.train_loss)} | "
                         f"{_fmt(r.epsilon_max)} | {r.participants if r.participants is not None else '—'} | "
                         f"{missing} |")
    lines += _engine_lines(metrics.rounds)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _engine_lines(rounds) -> list[str]:
    """Per round: the wall time of the phases that wait on merchants, the merchants' own work and what the engine
    added beyond it (RoundRecord.overhead), beside the server's own central evaluation."""
    timed = [r for r in rounds if r.work is not None and r.engine_seconds]
    if not timed:
        return []
    lines = ["", "## Engine overhead", "",
             "Merchant phases: the training and federated-evaluation wall time. Own work: each merchant's handlers "
             "(training, scoring, encoding the reply), from their round logs; the ideal is the busiest merchant or "
             "the total over the engine's lanes, whichever is longer. Overhead: merchant phases − ideal (Ray "
             "scheduling, serialisation, building each merchant's state: setup).", "",
             "| round | round wall s | merchant phases s | merchants | lanes | busiest s | total work s | setup s | "
             "overhead s | overhead % | central evaluation s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        work = r.work
        lines.append(f"| {r.round} | {_fmt(r.seconds)} | {r.engine_seconds:.2f} | {len(work.seconds)} | "
                     f"{work.lanes} | {max(work.seconds.values(), default=0.0):.2f} | "
                     f"{sum(work.seconds.values()):.2f} | {sum(work.setup.values()):.2f} | {r.overhead:.2f} | "
                     f"{100 * r.overhead / r.engine_seconds:.1f} | {_fmt(r.central_seconds)} |")
    nodes = sorted({node for r in timed for node in r.work.nodes.values()})
    if len(nodes) > 1:
        lines += ["", f"Merchants ran on {len(nodes)} Ray nodes: " + ", ".join(node[:12] for node in nodes) + "."]
    return lines


def _augment_text(augment: dict) -> str:
    if not augment["enabled"]:
        return "off"
    return f"{augment['views']} view(s) as {augment['use_as']}, attribute noise σ {augment['attribute_sigma']}"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)

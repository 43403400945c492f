"""The run metrics every training run starts from (baseline, merchant, pooled) and the simulation report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.data import BehaviorData
from fedaug.common.data.split import LeaveOneOut
from fedaug.common.model.build import describe
from fedaug.common.model.evaluate import COLD_BELOW, Scorer, Tested, cold_targets, evaluate, tested
from fedaug.common.model.metrics import METRIC_NAMES, select
from fedaug.common.priors.popularity import Popularity
from fedaug.common.records import RunMetrics
from fedaug.server.summary import DASH, attribute, markdown_table

METRIC_KEYS = METRIC_NAMES
# ``tested``, ``Tested``, ``cold_targets`` and ``COLD_BELOW`` live in common/model/evaluate.py (a merchant's check of a
# received model uses them too, and client/ never imports simulations/); runs import them from here as before.
__all__ = ["COLD_BELOW", "METRIC_KEYS", "Baselines", "Tested", "baselines", "cold_targets", "final_metrics",
           "render_report", "tested", "write_report"]


def final_metrics(mode: str, scorer: Scorer, split: LeaveOneOut, data: BehaviorData, config: BaseModel, device,
                  epochs: int, started: float) -> RunMetrics:
    """The trained model's test (all users, and cold-item targets) and validation metrics with what the run was;
    callers fill in the rest."""
    test = tested(scorer, split)
    return RunMetrics(mode=mode, test=test.all, valid=select(evaluate(scorer, split, "valid")),
                      test_users=len(test.cold_mask), epochs=epochs, seconds=round(time.monotonic() - started, 2),
                      data=data.summary(), config=config.model_dump(mode="json") | {"device": str(device)},
                      test_cold=test.cold, cold_users=int(test.cold_mask.sum()), test_by_type=test.by_type,
                      model=describe(config.model, data) if hasattr(config, "model") else None)


@dataclass
class Baselines:
    """What every merchant has without training, on the run's own test (and validation) users: popularity over
    the training events, and the public text prior where the items have texts."""

    test: dict[str, dict]
    cold: dict[str, dict | None]
    valid: dict[str, dict]
    prior: Tested | None
    """The text prior's test figures per user (for paired gains), None without one."""


def baselines(split: LeaveOneOut, prior: Scorer | None) -> Baselines:
    """Popularity and (given) the text prior, tested and validated on ``split``."""
    scorers = {"popularity": Popularity(split.train)} | ({"text prior": prior} if prior is not None else {})
    test = {name: tested(scorer, split) for name, scorer in scorers.items()}
    return Baselines(test={name: t.all for name, t in test.items()}, cold={name: t.cold for name, t in test.items()},
                     valid={name: select(evaluate(scorer, split, "valid")) for name, scorer in scorers.items()},
                     prior=test.get("text prior"))


def write_report(metrics: RunMetrics, out: Path, plots: list[str]) -> None:
    """``out/report.md``: settings, the test table with the baselines, privacy, merchants and rounds."""
    write_bytes_atomic(Path(out) / "report.md", render_report(metrics, plots).encode())


def _selection_lines(metrics: RunMetrics) -> list[str]:
    """How the model handed out was chosen and what it is made of (above the test table)."""
    alone = metrics.mode in ("merchant", "central")
    if metrics.selection == "private":
        whose = "its own" if alone else "the merchants'"
        how = (f"**private selection**: from public settings and {whose} "
               "accounted releases alone (the statistics' cuts from their own noise level); no held-out data was "
               "read to choose anything outside an accounted release. The model tested is the bundle "
               + ("this run wrote." if alone else "every merchant received."))
    else:
        how = (f"**{metrics.selection}** — NOT PRIVATE: the prior's weighting, the statistics' weights and cuts, "
               "the model's fusion weight and the round kept were chosen on every merchant's validation users "
               "pooled, data no real aggregator holds, outside any ledger. A research figure.")
    lines = [f"Selection: {how}", "", f"What it is made of: {metrics.product or DASH}.", ""]
    parts = metrics.parts or {}
    if "statistics" in parts:
        st = parts["statistics"]
        lines += [f"DP statistics: popularity weight {st['popularity_weight']:g} (cut {st['popularity_cut_std']:g} "
                  f"noise std, {st['items_kept']} items kept), transition weight {st['pair_weight']:g} (cut "
                  f"{st['pair_cut_std']:g} noise std, {st['pairs_kept']} pairs kept)"
                  + (f", from {_count(st['merchants'], 'merchant')}" if st.get("merchants") else "")
                  + _release_line(st.get("release")) + ".", ""]
    if "model" in parts and parts["model"].get("note"):
        lines += [f"Trained model: weight {parts['model']['weight']} — {parts['model']['note']}.", ""]
    evaluation = (parts.get("model") or {}).get("evaluation")
    if evaluation and evaluation.get("candidates"):
        lines += [f"{'DP evaluation' if alone else 'Federated DP evaluation'} "
                  f"({_count(evaluation.get('merchants', 0), 'merchant')}, "
                  f"{evaluation['users']:.0f} validation users as released, noise std {evaluation['noise_std']:.1f} "
                  "per summed coordinate"
                  + (f"; through secure aggregation, {evaluation['release']['noise']} noise"
                     if evaluation.get("release") else "")
                  + "): the model's weight beside the prior with the statistics, each candidate's validation gain "
                  "over none and the low end of its interval.", ""]
        lines += markdown_table(["weight", "valid NDCG@10 (released)", "gain", "low"],
                                [[f"{c['weight']:g}", _fmt(c.get("valid_ndcg@10")), _fmt(c.get("gain")),
                                  _fmt(c.get("low"))] for c in evaluation["candidates"]])
        lines.append("")
    return lines


def _settings(metrics: RunMetrics) -> list[list[str]]:
    """The settings table's rows: those that apply to the run."""
    cfg, priv = metrics.config, metrics.privacy
    fed, sim = cfg.get("federation"), cfg.get("simulation")
    rounds = fed["rounds"] if fed else cfg["local"].get("rounds")
    rows = [["data", f"{cfg['data']['path'] or 'embedded synthetic'} ({metrics.data['users']} users, "
                     f"{metrics.data['items']} items)"]]
    if sim:
        rows.append(["merchants", f"{metrics.merchants_total} ({sim['partition']} partition)"])
    rows += [["mode", MODES.get(metrics.mode, metrics.mode)],
             ["rounds × local epochs", f"{rounds} × {cfg['local']['local_epochs']}"]]
    if fed and metrics.mode == "federated":
        rows.append(["strategy", fed["strategy"]])
    rows += [["ε per merchant (budget)", _fmt(priv.epsilon_budget if priv else None)],
             ["augmentation", _augment_text(cfg["augment"])], ["model", metrics.model or DASH],
             ["batch, lr, C", f"{cfg['local']['batch_size']}, {cfg['local']['lr']}, "
                              f"{cfg['privacy']['max_grad_norm']}"],
             ["wall time", f"{metrics.seconds:.0f} s"]]
    return rows


RUN_LABELS = {"merchant": "local"}
"""How a run's own row is named where its mode's name would read oddly."""
MODES = {"merchant": "one merchant alone (fedaug local)", "federated": "federated",
         "local": "every merchant alone", "central": "all merchants' data pooled in one DP trainer"}


def render_report(metrics: RunMetrics, plots: list[str]) -> str:
    """report.md of a simulation or of one merchant alone (``fedaug local``): what the model handed out is and
    whether its trained parts add anything, settings, the test table beside the public prior and popularity,
    privacy, merchants, rounds, plots, and the engine's overhead in an appendix."""
    priv = metrics.privacy
    story = attribute(metrics)
    title = "fedaug local: one merchant alone" if metrics.mode == "merchant" else f"fedaug simulation: {metrics.mode}"
    headline = story.line()
    lines = [f"# {title}", "", f"**{headline[0].upper()}{headline[1:]}.**", ""]
    lines += markdown_table(["setting", "value"], _settings(metrics))
    lines += ["", "## Test metrics (leave-one-out, full ranking)", ""]
    if metrics.selection and (metrics.selection != "private" or "text prior" in (metrics.parts or {})):
        lines += _selection_lines(metrics)  # (a trained model alone: nothing was chosen)
    run = RUN_LABELS.get(metrics.mode, metrics.mode)
    runs = {f"**{run}**: {story.source}": metrics.test}
    if metrics.best_test is not None and metrics.best_round != len(metrics.rounds) and \
            metrics.selection != "private":
        runs[f"{run}, best-validation round ({metrics.best_round})"] = metrics.best_test
    if metrics.fusion is not None:
        runs["the trained model alone (item ids, no text prior)"] = metrics.fusion.model_test
    runs |= dict(metrics.baselines)
    rows = [[name] + [f"{test[k]:.4f}" for k in METRIC_KEYS]
            + [f"{metrics.test['ndcg@10'] / test['ndcg@10']:.2f}×" if test is not metrics.test and test["ndcg@10"] > 0
               else DASH] for name, test in runs.items()]
    lines += markdown_table(["run", *METRIC_KEYS, f"{run} ÷ this (NDCG@10)"], rows)
    reference = metrics.baselines.get("centralised non-private")
    if reference:
        lines += ["", f"Test NDCG@10 is **{metrics.test['ndcg@10'] / reference['ndcg@10']:.3f}×** the "
                  "centralised non-private baseline."]
    if metrics.gain_over_text:
        gains = [f"{name} model (round {g['round']}) {d['gain']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                 for name, g in metrics.gain_over_text.items() for d in [g["gain_over_text_prior"]]]
        lines += ["", "Gain over the text prior, test NDCG@10 per user (mean, 95 % paired interval): "
                  + "; ".join(gains) + "."]
    if metrics.test_cold is not None:
        cold = {f"**{run}**": metrics.test_cold}
        if metrics.fusion is not None and metrics.fusion.model_test_cold is not None:
            cold["the trained model alone"] = metrics.fusion.model_test_cold
        cold |= {name: m for name, m in metrics.baselines_cold.items() if m is not None}
        lines += ["", f"Cold items: the {metrics.cold_users} test users whose target had fewer than {COLD_BELOW} "
                  "training interactions.", ""]
        lines += markdown_table(["run", "hr@10", "ndcg@10"],
                                [[name, f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}"] for name, m in cold.items()])
    if metrics.test_by_type:
        lines += ["", f"By the test event's type ({run}):", ""]
        lines += markdown_table(["type", "users", "hr@10", "ndcg@10"],
                                [[kind, str(m["users"]), f"{m['hr@10']:.4f}", f"{m['ndcg@10']:.4f}"]
                                 for kind, m in metrics.test_by_type.items()])
    lines += ["", "## Privacy", ""]
    if priv is None or (isinstance(priv.epsilon_budget, int | float) and math.isinf(priv.epsilon_budget)):
        lines.append("- non-private (ε = inf): no DP-SGD, no noise, nothing accounted.")
    else:
        how = ((metrics.parts or {}).get("statistics") or {}).get("release") or {}
        pooled = how.get("secure_aggregation") is not None
        lines.append(f"- ε per merchant: max {_fmt(priv.epsilon_max)}, mean {_fmt(priv.epsilon_mean)} "
                     f"(budget {_fmt(priv.epsilon_budget)}), user-level DP-SGD with per-user clipping C = "
                     f"{priv.max_grad_norm}, accounted by each merchant's ledger "
                     + ("(RDP: the statistics' Skellam release is accounted by its Rényi-DP bound)." if pooled else
                        "(PRV, never above RDP)."))
        if pooled:
            lines.append(f"- noise: **{how['noise']}** for the statistics (through secure aggregation; it assumes "
                         "each user shops at one merchant, that the aggregator follows the protocol and that at "
                         f"most T = {how['tolerated']} merchants drop out or collude); DP-SGD updates: each "
                         "merchant's own (local) noise.")
        releases = _releases_line(metrics)
        if releases:
            lines.append(releases)
    if priv and priv.central:
        c = priv.central
        lines.append(f"- central (client-level) DP: ε {_fmt(c['epsilon'])} at δ {c['delta']:.2g}, noise multiplier "
                     f"{c['noise_multiplier']}, update clipping {c['clipping_norm']} (Flower's RDP accountant, "
                     "no sampling amplification).")
    if metrics.merchants and metrics.mode not in ("merchant", "central"):  # (one trainer: the figures above)
        lines += ["", "## Merchants", ""]
        lines += markdown_table(["merchant", "users", "ε", "test NDCG@10", "test HR@10"], [
            [m.label, DASH if m.users is None else str(m.users), _fmt(m.epsilon),
             _fmt((m.test or {}).get("ndcg@10")), _fmt((m.test or {}).get("hr@10"))] for m in metrics.merchants])
    if metrics.rounds:
        lines += ["", "## Rounds", ""]
        fused = any(r.fusion_weight is not None for r in metrics.rounds)
        if fused:
            lines += ["Validation is of the global model composed with the public text prior (and the DP "
                      "statistics) as the central evaluation composed it, the prior at the weight shown beside the "
                      "model's 1 (inf: the model left out); \"model alone\" is the trained model without them.", ""]
        lines += markdown_table(
            ["round", "valid NDCG@10" if fused else "valid NDCG@10 (the trained model)", "model alone",
             "prior weight", "train loss", "max ε", "merchants", "not aggregated"],
            [[f"{r.round}{' (kept)' if r.round == metrics.best_round and metrics.selection != 'private' else ''}",
              _fmt((r.valid or {}).get("ndcg@10")), _fmt((r.model_valid or {}).get("ndcg@10")),
              _fmt(r.fusion_weight), _fmt(r.train_loss), _fmt(r.epsilon_max),
              DASH if r.participants is None else str(r.participants),
              ", ".join(f"{v} {k}" for k, v in r.failures.items() if v) or DASH] for r in metrics.rounds])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += _engine_lines(metrics.rounds)
    return "\n".join(lines) + "\n"


def _releases_line(metrics: RunMetrics) -> str | None:
    """Where the budget went before training: each merchant's ε after the selection's reservation and after the
    DP statistics (from their ledgers), beside its ε at the end."""
    before = [m for m in metrics.merchants if m.epsilon_releases]
    if not before:
        return None
    names = {"selection": "the DP evaluation's reservation", "statistics": "the DP statistics"}
    steps = [k for k in names if any(k in m.epsilon_releases for m in before)]
    highest = {k: max(m.epsilon_releases[k] for m in before if k in m.epsilon_releases) for k in steps}
    return ("- before any training, the budget went to " + ", then ".join(
        f"{names[k]} (ε {highest[k]:.2f} after it)" for k in steps)
            + f"; DP-SGD took the rest, to ε {_fmt(metrics.privacy.epsilon_max)} (largest over merchants).")


def _engine_lines(rounds) -> list[str]:
    """Appendix, per round: the wall time of the phases that wait on merchants, the merchants' own work and what
    the engine added beyond it (RoundRecord.overhead), beside the server's own central evaluation."""
    timed = [r for r in rounds if r.work is not None and r.engine_seconds]
    if not timed:
        return []
    lines = ["", "## Appendix: engine overhead", "",
             "For developers of the simulation engine. Merchant phases: the training and federated-evaluation wall "
             "time. Own work: each merchant's handlers (training, scoring, encoding the reply), from their round "
             "logs; the ideal is the busiest merchant or the total over the engine's lanes, whichever is longer. "
             "Overhead: merchant phases − ideal (Ray scheduling, serialisation, building each merchant's state: "
             "setup). Times in seconds.", ""]

    def sec(value) -> str:
        return DASH if value is None else f"{value:.2f}"

    lines += markdown_table(
        ["round", "round wall", "merchant phases", "merchants", "lanes", "busiest", "total work", "setup",
         "overhead", "overhead %", "central evaluation"],
        [[str(r.round), sec(r.seconds), sec(r.engine_seconds), str(len(r.work.seconds)), str(r.work.lanes),
          sec(max(r.work.seconds.values(), default=0.0)), sec(sum(r.work.seconds.values())),
          sec(sum(r.work.setup.values())), sec(r.overhead), f"{100 * r.overhead / r.engine_seconds:.1f}",
          sec(r.central_seconds)] for r in timed])
    nodes = sorted({node for r in timed for node in r.work.nodes.values()})
    if len(nodes) > 1:
        lines += ["", f"Merchants ran on {len(nodes)} Ray nodes: " + ", ".join(node[:12] for node in nodes) + "."]
    return lines


def _release_line(how: dict | None) -> str:
    """How the statistics were released, as the end of the report's statistics line."""
    if not how:
        return ""
    if how.get("secure_aggregation") is None:
        return "; each merchant's counts sent one by one with its own noise (local)"
    noise = {"pooled": "pooled noise: each merchant added a share of one Skellam noise",
             "local": "local noise: each merchant added a whole Skellam noise", "none": "no noise"}[how["noise"]]
    return (f"; through secure aggregation (SecAgg+: the aggregator unmasked only the sum of {how['survivors']} of "
            f"{how['merchants']} merchants, T = {how['tolerated']}), {noise} (noise std in the sum "
            f"{', '.join(f'{v:g}' for v in how['noise_std'])}; popularity, pairs)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _augment_text(augment: dict) -> str:
    if not augment["enabled"]:
        return "off"
    return f"{augment['views']} view(s) as {augment['use_as']}, attribute noise σ {augment['attribute_sigma']}"


def _fmt(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)

"""PNG plots of a run's metrics.json: validation NDCG@10 per round beside the public prior and popularity, ε per
merchant release by release, test NDCG@10 per merchant of the model handed out, and a sweep's privacy–utility
curve. Written atomically like every other output."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedaug.common.atomic import write_bytes_atomic  # noqa: E402
from fedaug.common.records import MerchantRecord, RunMetrics  # noqa: E402
from fedaug.server.summary import attribute  # noqa: E402


def write_plots(metrics: RunMetrics, out: Path) -> list[str]:
    """The run's plots in ``out``; returns their file names (for the report)."""
    written = []
    for plot in (_ndcg_per_round, _epsilon_per_merchant, _merchant_ndcg):
        name = plot(metrics, out)
        if name:
            written.append(name)
    return written


def _ndcg_per_round(metrics: RunMetrics, out: Path) -> str | None:
    """Validation NDCG@10 per round of the model as composed for validation and of the trained model alone, with
    what needs no training (the public text prior, popularity: validated on the same users) as reference lines."""
    rounds = [r for r in metrics.rounds if r.valid]
    if not rounds:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    composed = any(r.fusion_weight is not None for r in rounds)
    left_out = composed and all(r.fusion_weight is not None and math.isinf(r.fusion_weight) for r in rounds)
    label = ("as composed: the prior with the statistics (the model left out)" if left_out else
             "as composed: prior (+ statistics) + the model at its weight" if composed else
             "global model (all merchants' users)" if metrics.mode == "federated" else "the trained model")
    ax.plot([r.round for r in rounds], [r.valid["ndcg@10"] for r in rounds], marker="o", label=label)
    alone = [(r.round, r.model_valid["ndcg@10"]) for r in rounds if r.model_valid and r.fusion_weight is not None]
    if alone:
        ax.plot(*zip(*alone, strict=True), marker="s", label="the trained model alone")
    federated = [(r.round, r.federated_valid["ndcg@10"]) for r in rounds if r.federated_valid]
    if federated:
        ax.plot(*zip(*federated, strict=True), marker="x", linestyle="--", label="federated evaluation")
    for (name, values), style in zip(metrics.baselines_valid.items(), (":", "-."), strict=False):
        ax.axhline(values["ndcg@10"], color="grey", linestyle=style, label=f"{name} (no training)")
    ax.set(xlabel="round", ylabel="validation NDCG@10", title="Validation NDCG@10 per round")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return _save(fig, out / "ndcg_per_round.png")


RELEASES = {"selection": "DP evaluation's reservation", "statistics": "DP statistics"}
"""The releases a merchant's ledger records before DP-SGD, in ledger order (MerchantRecord.epsilon_releases)."""


def _epsilon_per_merchant(metrics: RunMetrics, out: Path) -> str | None:
    """Each merchant's ε after each release, from 0: the releases before training (shaded), then every DP-SGD
    round; merchants with the same curve share a line."""
    merchants = [m for m in metrics.merchants if m.epsilon_by_round]
    if not merchants:
        return None
    lines = epsilon_lines(merchants)
    steps = [k for k in RELEASES if any(k in m.epsilon_releases for m in merchants)]
    rounds = sorted({r for _, points in lines for r, _ in points if isinstance(r, int)})
    ticks = ["start", *(RELEASES[k] for k in steps), *(f"round {r}" for r in rounds)]
    where = {"start": 0} | {k: i + 1 for i, k in enumerate(steps)} | {r: len(steps) + i + 1
                                                                       for i, r in enumerate(rounds)}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if steps:
        ax.axvspan(0, len(steps), color="tab:orange", alpha=0.12, label="before training (selection, statistics)")
    ax.axvspan(len(steps), len(ticks) - 1, color="tab:blue", alpha=0.06, label="DP-SGD rounds")
    for label, points in lines:
        ax.plot([where[x] for x, _ in points], [e for _, e in points], marker=".", label=label)
    budget = metrics.privacy.epsilon_budget if metrics.privacy else None
    if isinstance(budget, int | float) and math.isfinite(budget):
        ax.axhline(budget, color="red", linestyle=":", label="budget")
    ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set(ylabel="ε spent (composed)", title="ε per merchant, release by release")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, out / "epsilon_per_merchant.png")


def _merchant_ndcg(metrics: RunMetrics, out: Path) -> str | None:
    """Each merchant's test NDCG@10 of the model handed out, titled by what that model is."""
    tested = [m for m in metrics.merchants if m.test]
    if len(tested) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.bar([m.label for m in tested], [m.test["ndcg@10"] for m in tested])
    ax.axhline(metrics.test["ndcg@10"], color="black", linestyle="--", label="all users")
    what = (attribute(metrics).source if metrics.mode == "federated" else
            "each merchant's own model" if metrics.mode == "local" else metrics.mode)
    ax.set(xlabel="merchant", ylabel="test NDCG@10", title=f"Test NDCG@10 per merchant: {what}")
    ax.title.set_fontsize(8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    return _save(fig, out / "merchant_ndcg.png")


def epsilon_lines(merchants: list[MerchantRecord]) -> list[tuple[str, tuple[tuple[int | str, float], ...]]]:
    """(label, [(step, ε)]) per line of the ε plot — steps: "start" (ε 0), the releases before training by name,
    then round numbers —; merchants whose curve is the same share one line (ten identical merchants are one line,
    "all 10 merchants", not ten on top of each other)."""
    curves: dict[tuple, list[str]] = {}
    for m in merchants:
        rounds = tuple(sorted((int(r), round(e, 6)) for r, e in m.epsilon_by_round.items()
                              if isinstance(e, int | float) and math.isfinite(e)))
        if rounds:
            before = tuple((k, round(m.epsilon_releases[k], 6)) for k in RELEASES if k in m.epsilon_releases)
            curves.setdefault((("start", 0.0), *before, *rounds), []).append(m.label)
    return [(who[0] if len(who) == 1 else
             f"{'all ' if len(who) == len(merchants) else ''}{len(who)} merchants", points)
            for points, who in curves.items()]


def privacy_utility_plot(lines: dict[str, list[tuple[float, float]]], out: Path, baselines: dict[str, float]) -> str:
    """NDCG@10 against ε, one line per setting; ε = inf is drawn at the right edge."""
    finite = [e for points in lines.values() for e, _ in points if math.isfinite(e)]
    inf_at = max(finite, default=1.0) * 2
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in sorted(lines.items()):
        points = sorted((inf_at if math.isinf(e) else e, v) for e, v in points)
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for name, value in baselines.items():
        ax.axhline(value, linestyle=":", color="grey")
        # x in axes fraction, y in data: the name stays at the left edge whatever the x scale becomes
        ax.annotate(name, (0.01, value), xycoords=ax.get_yaxis_transform(), fontsize=7, va="bottom", color="grey")
    ax.set_xscale("log")
    ticks = sorted(set(finite)) + [inf_at]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["∞"])
    ax.set(xlabel="ε per merchant", ylabel="test NDCG@10", title="Privacy–utility")
    ax.legend(fontsize=7)
    return _save(fig, out / "privacy_utility.png")


def _save(fig, path: Path) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path.name

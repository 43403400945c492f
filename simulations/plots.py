"""PNG plots of a run's metrics.json: NDCG@10 per round, ε per merchant per round, test NDCG@10 per merchant, and a
sweep's privacy–utility curve. Written atomically like every other output."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.atomic import write_bytes_atomic  # noqa: E402
from common.records import MerchantRecord, RunMetrics  # noqa: E402


def write_plots(metrics: RunMetrics, out: Path) -> list[str]:
    """The run's plots in ``out``; returns their file names (for the report)."""
    written = []
    rounds = [r for r in metrics.rounds if r.valid]
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r.round for r in rounds], [r.valid["ndcg@10"] for r in rounds], marker="o",
                label="global model (all merchants' users)" if metrics.mode == "federated" else metrics.mode)
        federated = [(r.round, r.federated_valid["ndcg@10"]) for r in rounds if r.federated_valid]
        if federated:
            ax.plot(*zip(*federated, strict=True), marker="x", linestyle="--", label="federated evaluation")
        # (baselines are test figures: they belong in the report's tables, not on a validation axis)
        ax.set(xlabel="round", ylabel="validation NDCG@10", title="NDCG@10 per round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "ndcg_per_round.png"))
    merchants = metrics.merchants
    with_epsilon = [m for m in merchants if m.epsilon_by_round]
    if with_epsilon:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, points in epsilon_lines(with_epsilon):
            ax.plot(*zip(*points, strict=True), marker=".", label=label)
        budget = metrics.privacy.epsilon_budget if metrics.privacy else None
        if isinstance(budget, int | float) and math.isfinite(budget):
            ax.axhline(budget, color="red", linestyle=":", label="budget")
        ax.set(xlabel="round", ylabel="ε spent", title="ε per merchant per round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=6, ncol=2)
        written.append(_save(fig, out / "epsilon_per_merchant.png"))
    tested = [m for m in merchants if m.test]
    if tested:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([str(m.merchant) for m in tested], [m.test["ndcg@10"] for m in tested])
        ax.axhline(metrics.test["ndcg@10"], color="black", linestyle="--", label="all users")
        ax.set(xlabel="merchant", ylabel="test NDCG@10", title="Test NDCG@10 per merchant")
        ax.legend(fontsize=8)
        written.append(_save(fig, out / "merchant_ndcg.png"))
    return written


def epsilon_lines(merchants: list[MerchantRecord]) -> list[tuple[str, tuple[tuple[int, float], ...]]]:
    """(label, [(round, ε)]) per line of the ε plot: merchants whose ε per round is the same share one line (ten
    identical merchants are one line, "all 10 merchants", not ten on top of each other)."""
    curves: dict[tuple, list[str]] = {}
    for m in merchants:
        points = tuple(sorted((int(r), round(e, 6)) for r, e in m.epsilon_by_round.items()
                              if isinstance(e, int | float) and math.isfinite(e)))
        if points:
            curves.setdefault(points, []).append(m.label)
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

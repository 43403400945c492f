"""Do behaviour and context vectors help? The centralised baseline trained with and without them, over seeds.

Four variants — none, behaviour only, time context only, both — each trained with every seed on the same data and
split; validation and test NDCG@10 per run, their means and the spread, each variant's paired per-user test gain
over "none" (every test user's NDCG@10 averaged over the seeds, then the mean difference and its 95 % interval:
run-to-run noise shows in the interval), and the test event types' figures where the data has several types.
Each run writes ``OUT/VARIANT-sSEED/`` (metrics.json and the model bundle) and is skipped when its metrics.json
exists, so an interrupted ablation continues; ``OUT/report.md`` and ``OUT/gains.json`` are rebuilt from the runs
found.

    python -m fedaug.simulations.experiments.side_vectors --out simulations/results/synthetic-side-vectors \
        [--seeds 0 1 2]
    python -m fedaug.simulations.experiments.side_vectors --config beauty.toml --out ...
        (--config: any baseline config: data, model, train)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from fedaug.common.atomic import write_bytes_atomic, write_json_atomic
from fedaug.common.config import BaselineConfig, load_config
from fedaug.common.data.source import load_data
from fedaug.common.data.split import leave_one_out
from fedaug.common.model.evaluate import evaluate_per_user
from fedaug.common.model.metrics import paired_gain
from fedaug.common.recommend.bundle import load_bundle
from fedaug.simulations.baseline import run_baseline
from fedaug.simulations.bundles import MODEL

VARIANTS = {
    "none": {"model.behaviour": False, "model.time_context": False},
    "behaviour": {"model.behaviour": True, "model.time_context": False},
    "time": {"model.behaviour": False, "model.time_context": True},
    "both": {"model.behaviour": True, "model.time_context": True},
}


def run(config: Path | None, out: Path, seeds: list[int], variants: list[str]) -> str:
    for seed in seeds:
        for variant in variants:
            run_dir = out / f"{variant}-s{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            cfg = load_config(config, VARIANTS[variant] | {"train.seed": seed}, BaselineConfig)
            metrics = run_baseline(cfg, run_dir)
            print(f"{variant} seed {seed}: valid NDCG@10 {metrics.valid['ndcg@10']:.4f}  test NDCG@10 "
                  f"{metrics.test['ndcg@10']:.4f}  ({metrics.epochs} epochs, {metrics.seconds:.0f} s)", flush=True)
    gains = paired_gains(out, config)
    write_json_atomic(out / "gains.json", gains)
    report = render(out, config, gains)
    write_bytes_atomic(out / "report.md", report.encode())
    return report


def paired_gains(out: Path, config: Path | None) -> dict[str, dict]:
    """Each variant's per-user test NDCG@10 gain over "none" (both averaged over the seeds they share), scored
    again from the runs' bundles on the same split."""
    baseline = load_config(config, None, BaselineConfig)
    split = leave_one_out(load_data(baseline.data, baseline.synthetic))
    per_user: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted(out.glob("*-s*/metrics.json")):
        variant, seed = path.parent.name.rsplit("-s", 1)
        scorer = load_bundle(path.parent / MODEL).scorer
        per_user.setdefault(variant, {})[int(seed)] = evaluate_per_user(scorer, split, "test")["ndcg@10"]
    none = per_user.get("none", {})
    gains = {}
    for variant, runs in per_user.items():
        seeds = sorted(set(runs) & set(none))
        if variant != "none" and seeds:
            mean = np.mean([runs[s] for s in seeds], axis=0)
            gains[variant] = paired_gain(mean, np.mean([none[s] for s in seeds], axis=0)) | {"seeds": seeds}
    return gains


def render(out: Path, config: Path | None, gains: dict[str, dict]) -> str:
    runs: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*-s*/metrics.json")):
        variant = path.parent.name.rsplit("-s", 1)[0]
        runs.setdefault(variant, []).append(json.loads(path.read_text()))
    first = next(iter(runs.values()))[0]
    lines = ["# Behaviour and context vectors: with and without", "",
             "Centralised baseline (`python -m fedaug.simulations.experiments.side_vectors"
             f"{f' --config {config}' if config else ''} "
             f"--out {out}`), data: {first['config']['data']['path'] or 'embedded synthetic'} "
             f"({first['data']['users']} users, {first['data']['items']} items, {first['data']['interactions']} "
             "events). NDCG@10, mean over seeds (each seed's figure in brackets); model chosen by validation.", "",
             "| variant | seeds | valid NDCG@10 | test NDCG@10 | paired test gain over none [95 % interval] |",
             "|---|---|---|---|---|"]
    for variant in VARIANTS:
        if variant not in runs:
            continue
        rows, g = runs[variant], gains.get(variant)
        gain = f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]" if g else ""
        lines.append(f"| {variant} | {len(rows)} | {_cell(rows, 'valid')} | {_cell(rows, 'test')} | {gain} |")
    typed = {v: rows for v, rows in runs.items() if rows[0].get("test_by_type")}
    if typed:
        kinds = list(next(iter(typed.values()))[0]["test_by_type"])
        lines += ["", "Test NDCG@10 by the test event's type (mean over seeds):", "",
                  "| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for variant in VARIANTS:
            if variant in typed:
                cells = [statistics.fmean(r["test_by_type"][k]["ndcg@10"] for r in typed[variant]) for k in kinds]
                lines.append(f"| {variant} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _mean(rows: list[dict], stage: str) -> float | None:
    return statistics.fmean(r[stage]["ndcg@10"] for r in rows) if rows else None


def _cell(rows: list[dict], stage: str) -> str:
    each = ", ".join(f"{r[stage]['ndcg@10']:.4f}" for r in rows)
    return f"{_mean(rows, stage):.4f} ({each})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="baseline TOML (data, model, train); default: synthetic data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    print(run(args.config, args.out, args.seeds, args.variants), end="")


if __name__ == "__main__":
    main()

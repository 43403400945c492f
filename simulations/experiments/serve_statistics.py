"""Test NDCG@10 of the text prior plus the merchants' summed DP statistics read from a federation's checkpoint.

A federation (`fedaug simulate`) collects every merchant's statistics once, before round 1, and keeps their sum in
its checkpoint (in ``OUT/state``), so a run cut short after a few rounds still holds them. This scores the
public text prior with those counts over every user: validation with the fit counts (the training histories),
test with the serve counts (each history with its validation item) and, for comparison, with the fit counts; each
test figure with the per-user paired 95 % interval of its gain over the text prior alone. The weights come from
``--selection``: ``pooled`` fits them on the pooled validation users with the fit counts (how the recorded figure
was made, when that was the default; research only, not private), ``private`` takes the release rule's public
weights and cuts. Give the same data and settings as the federation's run (``--config``, ``--data``,
``--merchants``, ``--epsilon``). Prints the JSON and writes it to ``--out``.

Recorded in simulations/results/beauty-eps8-serve-statistics/ (prior_with_statistics.json; the run's rounds in
rounds.jsonl), from the state of `fedaug simulate --data ../shared/data/amazon-beauty/Beauty.txt --format amazon-seq
--merchants 10 --epsilon 8 --out runs/fed8` stopped after round 3:

    python -m fedaug.simulations.experiments.serve_statistics --data ../shared/data/amazon-beauty/Beauty.txt \\
        --format amazon-seq --merchants 10 --epsilon 8 --state-dir runs/fed8/state \\
        --out simulations/results/beauty-eps8-serve-statistics/prior_with_statistics.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedaug.common.atomic import write_json_atomic
from fedaug.common.config import load_config
from fedaug.common.data.source import load_data
from fedaug.common.errors import FedaugError
from fedaug.common.model.evaluate import evaluate_per_user
from fedaug.common.model.metrics import paired_gain
from fedaug.common.priors.dp_counts import PriorWithCounts
from fedaug.server import checkpoint
from fedaug.server.server_app import initial_model
from fedaug.simulations.apps import CentralEvaluation
from fedaug.simulations.scenario import SimulationConfig


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog="python -m fedaug.simulations.experiments.serve_statistics",
                                   description=__doc__.splitlines()[0])
    made.add_argument("--state-dir", type=Path, required=True,
                      help="the directory that holds the federation's checkpoint (fedaug simulate: OUT/state)")
    made.add_argument("--out", type=Path, required=True, help="the JSON file the figures are written to")
    made.add_argument("--config", type=Path, default=None, help="the run's TOML config, as given to fedaug simulate")
    made.add_argument("--data", type=Path, default=None, help="the run's data (default: the config's)")
    made.add_argument("--format", default=None, help="the data's format (default: the config's, or its suffix)")
    made.add_argument("--merchants", type=int, default=None, help="the run's merchants (default: the config's)")
    made.add_argument("--epsilon", type=float, default=None, help="the run's ε per merchant (default: the config's)")
    made.add_argument("--selection", choices=("pooled", "private"), default="pooled",
                      help="how the statistics' weights are chosen (see above)")
    return made


def measure(config: SimulationConfig, state_dir: Path) -> dict:
    """The figures, from the checkpoint in ``state_dir``; FedaugError where it holds no statistics."""
    started = time.monotonic()
    state = checkpoint.load(state_dir)
    if state is None or state.statistics is None:
        raise FedaugError(f"{state_dir}: no checkpoint with the merchants' statistics")
    data = load_data(config.data, config.synthetic)
    evaluation = CentralEvaluation(config, data, initial_model(config, data))
    fit = evaluation.prior(state.statistics, "valid")
    if not isinstance(fit, PriorWithCounts):
        raise FedaugError(f"{config.data.path}: the data has no item texts, so there is no text prior to add the "
                          "statistics to")
    split = evaluation.split
    text = evaluate_per_user(evaluation.text, split, "test")["ndcg@10"]
    valid_fit = evaluate_per_user(fit, split, "valid")["ndcg@10"].mean()
    test_serve = evaluate_per_user(evaluation.prior(state.statistics, "test"), split, "test")["ndcg@10"]
    test_fit = evaluate_per_user(fit, split, "test")["ndcg@10"]
    return {"round": state.round, "merchants": state.statistics_merchants,
            "pair_std": state.statistics.fit.pair_std,
            "weights": {"popularity": fit.popularity_weight, "pair": fit.pair_weight, "threshold": fit.threshold},
            "text_prior_test": float(text.mean()), "valid_prior_with_fit_counts": float(valid_fit),
            "test_with_serve_counts": float(test_serve.mean()), "gain_serve": paired_gain(test_serve, text),
            "test_with_fit_counts": float(test_fit.mean()), "gain_fit": paired_gain(test_fit, text),
            "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.config, {"data.path": args.data, "data.format": args.format,
                                           "simulation.merchants": args.merchants, "privacy.epsilon": args.epsilon,
                                           "simulation.pooled_selection": args.selection == "pooled"},
                             SimulationConfig)
        figures = measure(config, args.state_dir)
    except FedaugError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(figures, indent=2))
    write_json_atomic(args.out, figures)


if __name__ == "__main__":
    main()

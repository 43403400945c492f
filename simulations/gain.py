"""A finished simulation's gain over the public text prior, paired per user: test NDCG@10 of its final and its
best-validation global model (fused with the prior and the run's DP statistics, as the server evaluated them),
each with the 95 % interval of its per-user difference from the text prior alone.

    python -m simulations.gain RUN_DIR        # writes RUN_DIR/gain.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import FedaugError
from common.evaluate import evaluate_per_user
from common.metrics import paired_gain
from server import checkpoint
from server.server_app import initial_model

from .apps import CentralEvaluation
from .config import SimulationConfig


def gain_over_prior(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    config = SimulationConfig.model_validate(metrics["config"])
    state = checkpoint.load(config.federation.state_dir if config.federation.state_dir.is_absolute()
                            else run / "state")
    if state is None or not state.history:
        raise FedaugError(f"{run}: no finished federation to compare (no checkpoint)")
    data = config.load_data()
    evaluation = CentralEvaluation(config, data, initial_model(config, data))
    if evaluation.text is None:
        raise FedaugError(f"{run}: the data has no item texts, so there is no text prior to compare with")
    prior = evaluate_per_user(evaluation.text, evaluation.split, "test")["ndcg@10"]
    out = {"text_prior_test_ndcg@10": float(prior.mean())}

    def gain(scorer) -> dict:
        test = evaluate_per_user(scorer, evaluation.split, "test")["ndcg@10"]
        return {"test_ndcg@10": float(test.mean()), "gain_over_text_prior": paired_gain(test, prior)}

    for name, arrays, round_ in (("final", state.arrays, state.round), ("best", state.best_arrays, state.best_round)):
        scorer, fusion = evaluation.scorer(arrays, state.statistics, "test")
        out[name] = {"round": round_, "prior_weight": fusion["weight"]} | gain(scorer)
    prior_with_counts = evaluation.prior(state.statistics, "test")
    if prior_with_counts is not evaluation.text:
        out["prior_with_statistics"] = gain(prior_with_counts)
    write_json_atomic(run / "gain.json", out)
    return out


if __name__ == "__main__":
    print(json.dumps(gain_over_prior(Path(sys.argv[1])), indent=2))

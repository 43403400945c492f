"""Measure one lever of private learning on top of the public text prior: DP collaborative statistics.

Each of ``--merchants`` merchants (uniform split) releases its users' bounded popularity and text-neighbour
transition counts through the Gaussian mechanism at its own ε (δ = 1/(10·its users), the ledger's default); the
counts are summed and fused with the text prior. Fusion weights are chosen on validation; test NDCG@10 is reported
with the per-user paired 95 % interval of the gain over the text prior alone.

    python -m fedaug.simulations.experiments.dp_counts_probe --data ../shared/data/amazon-beauty/Beauty.txt --out DIR
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from fedaug.client.ledger import calibrate_noise, epsilon_of
from fedaug.common.atomic import write_json_atomic
from fedaug.common.config import TextSection
from fedaug.common.data.loaders import load
from fedaug.common.data.split import assign_merchants, leave_one_out, merchant_partitions
from fedaug.common.model.evaluate import evaluate_per_user
from fedaug.common.model.metrics import paired_gain
from fedaug.common.priors.dp_counts import (
    COUNT_RELEASES,
    PriorWithCounts,
    bounded_counts,
    epsilon_history,
    fit_prior_with_counts,
    noised,
    text_neighbours,
)
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import fit_text_prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merchants", type=int, default=10)
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--max-items", type=int, default=8)
    parser.add_argument("--max-pairs", default="1,2,4,8", help="candidate caps per user, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve", choices=("train", "train+valid"), default="train",
                        help="counts used at test: the fitted release (train) or a second release over the histories "
                             "test sees (train + each user's validation item); the budget covers both releases")
    args = parser.parse_args()

    started = time.monotonic()
    data = load(args.data)
    split = leave_one_out(data)
    releases = COUNT_RELEASES * (2 if args.serve == "train+valid" else 1)
    vectors = catalog_vectors(TextSection(), data, "cpu")
    prior, _ = fit_text_prior(vectors, split)
    neighbours = text_neighbours(vectors, args.neighbours)
    base_valid = evaluate_per_user(prior, split, "valid")["ndcg@10"]
    base_test = evaluate_per_user(prior, split, "test")["ndcg@10"]
    merchants = merchant_partitions(assign_merchants(split.train, args.merchants, "uniform", args.seed))
    caps = [int(c) for c in args.max_pairs.split(",")]
    true = {cap: [bounded_counts(m.sequences(), neighbours, max_items=args.max_items, max_pairs=cap)
                  for m in merchants] for cap in caps}
    rows = []
    rng = np.random.default_rng(args.seed)

    for epsilon in (float(e) for e in args.epsilons.split(",")):
        tried, best, best_scorer = [], None, None
        for cap in caps:
            released, spent = None, []
            for merchant, counts in zip(merchants, true[cap], strict=True):
                delta = 1.0 / (10 * merchant.n_users)
                noise = calibrate_noise([], 1.0, releases, delta, epsilon)
                one = counts if noise == 0 else noised(counts, noise_multiplier=noise, max_items=args.max_items,
                                                        max_pairs=cap, rng=rng)
                released = one if released is None else released + one
                spent.append(epsilon_of(epsilon_history(noise, releases), delta) if noise else math.inf)
            scorer, grid = fit_prior_with_counts(prior, released, neighbours, split)
            grid = [row | {"max_pairs": cap, "noise_multiplier": noise, "epsilon_spent_max": max(spent)}
                    for row in grid]
            tried += grid
            top = max(grid, key=lambda row: row["valid_ndcg@10"])
            if best is None or top["valid_ndcg@10"] > best["valid_ndcg@10"]:
                best, best_scorer, best_noise = top, scorer, noise
            print(f"ε={epsilon} max_pairs={cap}: best {top}", flush=True)
        scorer = best_scorer
        if args.serve == "train+valid":
            scorer = serving_scorer(scorer, data, split, args, best["max_pairs"], best_noise, rng)
        test = evaluate_per_user(scorer, split, "test")["ndcg@10"]
        rows.append({"epsilon": epsilon, "chosen": best, "grid": tried, "test_ndcg@10": float(test.mean()),
                     "gain_over_text": paired_gain(test, base_test)})
        print(f"ε={epsilon}: test {test.mean():.4f}, gain {rows[-1]['gain_over_text']}", flush=True)
        write_json_atomic(args.out / "results.json", {  # after every ε: a cut-short sweep keeps what it measured
            "data": data.summary(), "merchants": args.merchants, "neighbours": args.neighbours,
            "max_items": args.max_items, "max_pairs": caps, "seed": args.seed,
            "text_prior": {"decay": prior.decay, "valid_ndcg@10": float(base_valid.mean()),
                           "test_ndcg@10": float(base_test.mean())},
            "runs": rows, "seconds": round(time.monotonic() - started, 1)})


def serving_scorer(fitted: PriorWithCounts, data, split, args, max_pairs: int, noise: float,
                   rng: np.random.Generator) -> PriorWithCounts:
    """The fitted weights over a second release counted on the histories test sees (train + validation item)."""
    seen = data.select_events(~np.isin(np.arange(data.n_interactions), data.offsets[1:][split.test > 0] - 1))
    merchants = merchant_partitions(assign_merchants(seen, args.merchants, "uniform", args.seed))
    released = None
    for merchant in merchants:
        counts = bounded_counts(merchant.sequences(), fitted.neighbours.cpu().numpy(), max_items=args.max_items,
                                max_pairs=max_pairs)
        one = counts if noise == 0 else noised(counts, noise_multiplier=noise, max_items=args.max_items,
                                                max_pairs=max_pairs, rng=rng)
        released = one if released is None else released + one
    return fitted.with_counts(released)


if __name__ == "__main__":
    main()

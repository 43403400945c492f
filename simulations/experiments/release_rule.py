"""Validation NDCG@10 of the release rule's public weights: every merchant's DP counts, the rule's cuts, the text prior.

Each of ``--merchants`` merchants (uniform split) releases its users' bounded popularity and text-neighbour
transition counts (fit counts: the training histories, never a validation or test item) at ``--share`` of its ε
(δ = 1/(10·its users), the ledger's default); the releases are summed, and for each pair of public weights the
release rule (fedaug.common.priors.dp_counts.ReleaseRule) cuts the counts where their own noise level allows and
adds them to the public text prior. Validation only: this is how the rule's default weights were set, so test is
never read. Prints each ε's cuts and each candidate's validation NDCG@10; writes the rows to ``--out`` (JSON)
after each ε, so a cut-short probe keeps what it measured.

Recorded in simulations/results/beauty-release-rule/ (valid.json; the printed lines in log.txt):

    python -m fedaug.simulations.experiments.release_rule --data ../shared/data/amazon-beauty/Beauty.txt \\
        --epsilons 8,inf,1 --out simulations/results/beauty-release-rule/valid.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from fedaug.client.ledger import RELEASE_MAX_NOISE_MULTIPLIER, calibrate_noise, epsilon_of
from fedaug.common.atomic import write_json_atomic
from fedaug.common.config import TextSection
from fedaug.common.data.loaders import load
from fedaug.common.data.split import assign_merchants, leave_one_out, merchant_partitions
from fedaug.common.errors import FedaugError
from fedaug.common.model.evaluate import evaluate_per_user
from fedaug.common.priors.dp_counts import (
    FALSE_KEEPS,
    RELEASES,
    Counts,
    ReleaseRule,
    bounded_counts,
    noised,
    release_cut,
    skellam_noised,
    text_neighbours,
)
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.privacy.skellam import share_variance, variance_for


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers ("inf" allowed)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    """A comma-separated list of integers."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def release(true: list[Counts], users: list[int], epsilon: float, args: argparse.Namespace, max_pairs: int,
            rng: np.random.Generator) -> Counts:
    """The merchants' summed release at ``epsilon`` each, as a federation makes it: the selection reserved first,
    then ``share`` of what is left; local Gaussian noise per merchant, or pooled Skellam shares (server/secure.py,
    client/releases.py ``statistics_variances`` / ``secure_statistics``)."""
    if math.isinf(epsilon):
        return sum(true[1:], true[0])
    pooled = args.noise == "pooled"
    needs = []
    for n_users in users:
        delta = 1.0 / (10 * n_users)
        history = [(calibrate_noise([], 1.0, 1, delta, args.selection_share * epsilon,
                                    limit=RELEASE_MAX_NOISE_MULTIPLIER), 1.0, 1)] if args.selection_share else []
        spent = epsilon_of(history, delta, rdp_only=pooled)
        target = spent + args.share * (epsilon - spent)
        if args.popularity_noise == 1.0:
            needs.append(calibrate_noise(history, 1.0, RELEASES, delta, target, rdp_only=pooled))
            continue
        low, high = 0.05, 50.0  # pair noise z, popularity noise ratio·z (two releases each)
        while high - low > 1e-3:
            mid = (low + high) / 2
            split = [(args.popularity_noise * mid, 1.0, 2), (mid, 1.0, 2)]
            low, high = (mid, high) if epsilon_of(history + split, delta, rdp_only=pooled) > target else (low, mid)
        needs.append(high)
    if not pooled:
        return sum((noised(c, noise_multiplier=z, max_items=args.max_items, max_pairs=max_pairs, rng=rng)
                    for c, z in zip(true, needs, strict=True)), Counts(0 * true[0].popularity, 0 * true[0].pairs))
    t = args.tolerated if args.tolerated is not None else max(1, len(true) // 3)
    noise = max(needs)
    variances = [variance_for(z, l1=bound, l2=math.sqrt(bound))
                 for z, bound in ((args.popularity_noise * noise, args.max_items), (noise, max_pairs))]
    shares = [share_variance(v, merchants=len(true), tolerated=t) for v in variances]
    summed = [skellam_noised(c, popularity_variance=shares[0], pair_variance=shares[1], rng=rng) for c in true]
    total = sum(summed[1:], summed[0])
    return Counts(total.popularity, total.pairs, math.sqrt(len(true) * shares[0]), math.sqrt(len(true) * shares[1]))


def parser() -> argparse.ArgumentParser:
    made = argparse.ArgumentParser(prog="python -m fedaug.simulations.experiments.release_rule",
                                   description=__doc__.splitlines()[0])
    made.add_argument("--data", type=Path, required=True, help="behaviour data with item texts (e.g. Beauty.txt)")
    made.add_argument("--format", default=None, help="the data's format (default: from its suffix)")
    made.add_argument("--out", type=Path, required=True, help="the JSON file the rows are written to")
    made.add_argument("--epsilons", type=floats, default=[8.0, float("inf"), 1.0], help="each merchant's ε")
    made.add_argument("--share", type=float, default=0.9, help="the statistics' share of each merchant's ε")
    made.add_argument("--merchants", type=int, default=10)
    made.add_argument("--popularity-weights", type=floats, default=[0.01, 0.03])
    made.add_argument("--pair-weights", type=floats, default=[0.1, 0.3, 1.0])
    made.add_argument("--false-keeps", type=floats, default=[FALSE_KEEPS],
                      help="the rule's expected share of kept cells that are pure noise")
    made.add_argument("--neighbours", type=ints, default=[50], help="text neighbours per item (pair candidates)")
    made.add_argument("--decay", type=float, default=0.25, help="the text prior's history weighting")
    made.add_argument("--max-items", type=int, default=8, help="popularity cells per user")
    made.add_argument("--max-pairs", type=ints, default=[1], help="transitions per user")
    made.add_argument("--noise", choices=("local", "pooled"), default="local",
                      help="local: each merchant's own Gaussian, summed; pooled: Skellam shares of one noise, as a "
                           "secure sum gives (M - T survivors carry it; accounted by RDP)")
    made.add_argument("--tolerated", type=int, default=None, help="pooled: T (default: the federation's auto)")
    made.add_argument("--popularity-noise", type=float, default=1.0,
                      help="pooled: the popularity counts' noise multiplier as a multiple of the pair counts'")
    made.add_argument("--selection-share", type=float, default=0.05,
                      help="the selection release reserved before the statistics, as a federation does")
    made.add_argument("--seed", type=int, default=0)
    return made


def probe(args: argparse.Namespace) -> None:
    """Print and write the rows (see the module's docstring)."""
    started = time.monotonic()
    data = load(args.data, args.format)
    split = leave_one_out(data)
    vectors = catalog_vectors(TextSection(), data, "cpu")
    prior = TextPrior(vectors, decay=args.decay)
    base = float(evaluate_per_user(prior, split, "valid")["ndcg@10"].mean())
    print("prior valid", base, round(time.monotonic() - started), flush=True)
    merchants = merchant_partitions(assign_merchants(split.train, args.merchants, "uniform", args.seed))
    users = [m.n_users for m in merchants]
    rng = np.random.default_rng(args.seed)
    rows = []
    for k in args.neighbours:
        neighbours = text_neighbours(vectors, k)
        for max_pairs in args.max_pairs:
            true = [bounded_counts(m.sequences(), neighbours, max_items=args.max_items, max_pairs=max_pairs)
                    for m in merchants]
            for epsilon in args.epsilons:
                released = release(true, users, epsilon, args, max_pairs, rng)
                print("eps", epsilon, "neighbours", k, "max_pairs", max_pairs, "noise", args.noise, "cuts",
                      release_cut(released.popularity, released.popularity_std),
                      release_cut(released.pairs, released.pair_std), "stds", round(released.popularity_std, 3),
                      round(released.pair_std, 3), flush=True)
                for false_keeps in args.false_keeps:
                    for popularity_weight in args.popularity_weights:
                        for pair_weight in args.pair_weights:
                            rule = ReleaseRule(popularity_weight, pair_weight, false_keeps)
                            valid = evaluate_per_user(rule.scorer(prior, released, neighbours), split,
                                                      "valid")["ndcg@10"]
                            rows.append({"eps": epsilon, "noise": args.noise, "neighbours": k,
                                         "max_pairs": max_pairs, "fk": false_keeps, "pw": popularity_weight,
                                         "qw": pair_weight, "valid": float(valid.mean())})
                            print(rows[-1], round(time.monotonic() - started), flush=True)
                write_json_atomic(args.out, rows)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        probe(args)
    except FedaugError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()

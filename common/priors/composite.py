"""The model a run hands out: the public text prior, the released DP statistics and the trained model, fused by
public rules — the one composition every mode uses (the aggregator's final bundle, a simulation's, a merchant
alone), so what a simulation reports is what a deployment delivers.

Private selection: nothing here reads anyone's held-out data. The statistics' cuts follow from the released
counts and their public noise level, their weights are public settings (fedaug.common.priors.dp_counts.ReleaseRule), the
text prior's history weighting is public (fedaug.common.priors.text_prior.public_decay). Post-processing of accounted
releases costs no ε. The trained model's weight is whatever an accounted evaluation chose; where none measured it, it is
left out (weight ∞: the prior with the statistics alone), and the card says so.
"""

from __future__ import annotations

import math

import numpy as np

from fedaug.common.model.evaluate import Scorer
from fedaug.common.model.metrics import json_number
from fedaug.common.priors.dp_counts import Counts, PriorWithCounts, ReleaseRule
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.text_prior import TextPrior

UNMEASURED = ("not used: no accounted evaluation measured what the trained model adds (the product is the public "
              "text prior with the released statistics)")


def compose(model: Scorer, prior: TextPrior | None, statistics: Counts | None, neighbours: np.ndarray | None,
            rule: ReleaseRule, *, evaluation: dict | None = None, who: str = "the merchants'"
            ) -> tuple[Scorer, dict]:
    """The composite scorer and its parts as a bundle card names them (``parts``): each part, its weight and
    settings. ``evaluation``: the DP evaluation's choice of the model's weight
    (fedaug.common.priors.fusion_weights.choose; None: none ran, the model is left out); ``who``: whose validation users
    it read, for the card. Without a prior (no item texts, or fusion off) the product is the trained model alone."""
    if prior is None:
        return model, {"model": {"weight": 1.0, "note": "the trained model alone (no public text prior)"},
                       "selection": "none"}
    parts: dict = {"text prior": {"decay": prior.decay, "window": prior.window, "source": "public item texts"}}
    base: Scorer = prior
    if statistics is not None and neighbours is not None:
        base = rule.scorer(prior, statistics, neighbours)
        parts["statistics"] = statistics_part(base, statistics)
    weight = math.inf if evaluation is None else float(evaluation["weight"])
    if evaluation is None:
        note = UNMEASURED
    elif math.isinf(weight):
        note = (f"not used: its gain over the prior with the statistics was not above zero beyond chance and noise "
                f"on {who} {evaluation['users']:.0f} validation users (DP evaluation)")
    else:
        note = f"fused at the weight the DP evaluation on {who} validation users chose"
    parts["model"] = {"weight": json_number(weight), "note": note}
    if evaluation is not None:
        parts["model"]["evaluation"] = evaluation
    parts["selection"] = ("statistics: public settings and the release's own noise level (post-processing: no ε, no "
                          "held-out data read); " + ("the model: left out, nothing measured it" if evaluation is None
                                                     else "the model's weight: a DP evaluation (noised validation "
                                                          "sums, accounted)"))
    return Fused(model, base, weight), parts


def statistics_part(scorer: PriorWithCounts, counts: Counts) -> dict:
    """What the card says of the statistics term: weights, cuts, the noise they were cut against, what was kept."""
    kept_pairs = int((scorer.pairs[1:] > 0).sum())
    kept_items = int((scorer.popularity[1:] > 0).sum())
    return {"popularity_weight": scorer.popularity_weight, "popularity_cut_std": scorer.popularity_threshold,
            "pair_weight": scorer.pair_weight, "pair_cut_std": scorer.threshold,
            "popularity_noise_std": counts.popularity_std, "pair_noise_std": counts.pair_std,
            "items_kept": kept_items, "pairs_kept": kept_pairs, "pair_window": scorer.pair_window}


def product_kind(scorer: Scorer) -> str:
    """One phrase for summaries: what the product is made of (honest about an unused model)."""
    if not isinstance(scorer, Fused):
        return "trained model alone"
    base = "text prior + DP statistics" if isinstance(scorer.prior, PriorWithCounts) else "text prior"
    if isinstance(scorer.prior, PriorWithCounts) and not (scorer.prior.popularity_weight or scorer.prior.pair_weight):
        base = "text prior (statistics all below their noise cut)"
    if math.isinf(scorer.weight):
        return f"{base}; the trained model adds nothing measured"
    return f"{base} + trained model (weight {scorer.weight:g})"

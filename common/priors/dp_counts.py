"""DP collaborative statistics that add to the public text prior: item popularity and item-to-next-item counts.

Each user contributes at most ``max_items`` distinct items (their most recent) to the popularity counts and at
most ``max_pairs`` distinct transitions ``a -> b`` (their most recent) to the pair counts, each +1, so one user
changes the two count vectors by at most sqrt(max_items) and sqrt(max_pairs) in L2. Gaussian noise of
``noise_multiplier`` times that sensitivity on every cell is the Gaussian mechanism, accounted as two releases at
sampling rate 1 (``epsilon_history``) in the same ledger as DP-SGD rounds.

Pairs are counted only where ``b`` is among the ``k`` public text neighbours of ``a`` (``text_neighbours``): the
candidate set comes from the catalog, not from users, so selecting it costs nothing, and noise falls on
``n_items * k`` cells instead of ``n_items**2``. Everything a merchant releases is the noised counts; sums over
merchants and the scores below are post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedaug.common.config import FederationSection
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.privacy.skellam import skellam_noise


def text_neighbours(vectors: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """``[n_items + 1, k]``: each item's ``k`` most text-similar other items (row 0, padding, is all 0); a catalog
    with fewer other items gives them all (``k`` is cut to ``n_items - 1``)."""
    v = torch.as_tensor(vectors, dtype=torch.float32)
    k = max(1, min(k, len(v) - 2))
    out = np.zeros((len(v), k), dtype=np.int64)
    for start in range(1, len(v), chunk):
        sims = v[start : start + chunk] @ v.T
        sims[:, 0] = -np.inf
        rows = torch.arange(start, min(start + chunk, len(v)))
        sims[rows - start, rows] = -np.inf  # not itself
        out[start : start + chunk] = sims.topk(k, dim=1).indices.numpy()
    return out


@dataclass(frozen=True)
class Counts:
    popularity: np.ndarray
    """``[n_items + 1]``"""
    pairs: np.ndarray
    """``[n_items + 1, k]``: count of transitions a -> neighbours[a, j]"""
    popularity_std: float = 0.0
    """Standard deviation of the noise in every popularity cell (public: it follows from the noise multiplier)."""
    pair_std: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        """Counts of two groups of users (merchants): independent noises add in quadrature."""
        return Counts(self.popularity + other.popularity, self.pairs + other.pairs,
                      float(np.hypot(self.popularity_std, other.popularity_std)),
                      float(np.hypot(self.pair_std, other.pair_std)))


def bounded_counts(sequences: list[np.ndarray], neighbours: np.ndarray, *, max_items: int,
                   max_pairs: int) -> Counts:
    """Each user's bounded contribution, summed: their last ``max_items`` distinct items and last ``max_pairs``
    distinct candidate transitions."""
    n, k = neighbours.shape
    popularity = np.zeros(n, dtype=np.float64)
    pairs = np.zeros((n, k), dtype=np.float64)
    slot = {}  # (a, b) -> column of b in a's neighbour row
    for seq in sequences:
        items = list(dict.fromkeys(reversed(seq.tolist())))[:max_items]
        popularity[items] += 1
        seen: set[tuple[int, int]] = set()
        for a, b in zip(seq[-2::-1].tolist(), seq[:0:-1].tolist(), strict=True):  # most recent first
            if len(seen) == max_pairs:
                break
            if (a, b) in seen:
                continue
            column = slot.get((a, b))
            if column is None:
                hits = np.flatnonzero(neighbours[a] == b)
                column = slot[(a, b)] = int(hits[0]) if len(hits) else -1
            if column >= 0:
                seen.add((a, b))
                pairs[a, column] += 1
    return Counts(popularity, pairs)


def noised(counts: Counts, *, noise_multiplier: float, max_items: int, max_pairs: int,
           rng: np.random.Generator) -> Counts:
    """The Gaussian mechanism on both count vectors (std = noise multiplier × L2 sensitivity); padding stays 0."""
    popularity_std, pair_std = noise_multiplier * np.sqrt(max_items), noise_multiplier * np.sqrt(max_pairs)
    popularity = counts.popularity + rng.normal(0, popularity_std, counts.popularity.shape)
    pairs = counts.pairs + rng.normal(0, pair_std, counts.pairs.shape)
    popularity[0], pairs[0] = 0, 0
    return Counts(popularity, pairs, float(popularity_std), float(pair_std))


@dataclass(frozen=True)
class Statistics:
    """What a merchant releases for a run: counts over its users' training histories (``fit``: fusion weights are
    chosen on validation with these, which must not contain the validation items) and over the histories test and
    serving see (``serve``: each user's validation item included — the most recent behaviour the prior can use)."""

    fit: Counts
    serve: Counts

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(self.fit + other.fit, self.serve + other.serve)

    def same_as(self, other: Statistics | None) -> bool:
        """The same released numbers (e.g. this run's statistics read back from its checkpoint)."""
        return other is self or (other is not None and all(
            np.array_equal(a, b) for a, b in ((self.fit.popularity, other.fit.popularity),
                                              (self.fit.pairs, other.fit.pairs),
                                              (self.serve.popularity, other.serve.popularity),
                                              (self.serve.pairs, other.serve.pairs))))


def vector_of(statistics: Statistics) -> np.ndarray:
    """The four count vectors as one flat int64 vector, the payload of a secure sum: fit popularity, fit pairs,
    serve popularity, serve pairs (the counts must be integers: exact, or noised with integer noise)."""
    parts = [statistics.fit.popularity, statistics.fit.pairs, statistics.serve.popularity, statistics.serve.pairs]
    flat = np.concatenate([np.ravel(p) for p in parts])
    if not np.array_equal(flat, np.round(flat)):
        raise ValueError("a secure sum carries integer counts")
    return flat.astype(np.int64)


def statistics_of(vector: np.ndarray, shape: tuple[int, int], *, popularity_std: float, pair_std: float
                  ) -> Statistics:
    """``vector_of``'s inverse for a candidate table of ``shape`` ([n_items + 1, k]), with the sum's noise levels."""
    n, k = shape
    if vector.shape != (2 * (n + n * k),):
        raise ValueError(f"a vector of {2 * (n + n * k)} counts was expected, got shape {vector.shape}")
    fit, serve = np.split(np.asarray(vector, np.float64), 2)
    return Statistics(*(Counts(half[:n], half[n:].reshape(n, k), popularity_std, pair_std) for half in (fit, serve)))


def skellam_noised(counts: Counts, *, popularity_variance: float, pair_variance: float,
                   rng: np.random.Generator) -> Counts:
    """Integer counts plus symmetric Skellam noise of the given variances (a merchant's share of a pooled release,
    fedaug.common.privacy); padding stays 0. The stds recorded are the share's own."""
    popularity = counts.popularity + skellam_noise(counts.popularity.shape, variance=popularity_variance, rng=rng)
    pairs = counts.pairs + skellam_noise(counts.pairs.shape, variance=pair_variance, rng=rng)
    popularity[0], pairs[0] = 0, 0
    return Counts(popularity, pairs, math.sqrt(popularity_variance), math.sqrt(pair_variance))


COUNT_RELEASES = 2
"""Gaussian releases per ``Counts``: the popularity and the pair counts."""
RELEASES = 2 * COUNT_RELEASES
"""Gaussian releases per statistics request: both counts, over the fit and the serve histories."""


def epsilon_history(noise_multiplier: float, releases: int = RELEASES) -> list[tuple[float, float, int]]:
    """The releases as ledger mechanisms: (noise multiplier, sample rate 1, one step each)."""
    return [(noise_multiplier, 1.0, releases)]


class PriorWithCounts:
    """Scores = text prior + ``popularity_weight`` · log(1 + popularity) + ``pair_weight`` · Σ over the last
    ``pair_window`` history items a (weighted ``decay**age``) of log(1 + count(a -> item)).

    A noisy count below its threshold in noise standard deviations counts as 0 (``popularity_threshold`` for the
    popularity counts, ``threshold`` for the pair counts): most candidate cells hold no transition at all and most
    items few interactions, and without the cut their noise alone would rank items."""

    def __init__(self, prior: TextPrior, popularity: torch.Tensor, pairs: torch.Tensor, neighbours: torch.Tensor, *,
                 popularity_weight: float, pair_weight: float, threshold: float, popularity_threshold: float = 0.0,
                 pair_window: int = 3):
        """From the scoring tensors (log-counts, already thresholded): what a model bundle keeps."""
        device = prior.vectors.device
        self.prior, self.popularity, self.pairs = prior, popularity.to(device), pairs.to(device)
        self.neighbours = torch.as_tensor(neighbours).to(device)
        self.popularity_weight, self.pair_weight, self.pair_window = popularity_weight, pair_weight, pair_window
        self.threshold, self.popularity_threshold = threshold, popularity_threshold

    @classmethod
    def from_counts(cls, prior: TextPrior, counts: Counts, neighbours: np.ndarray, *, popularity_weight: float,
                    pair_weight: float, threshold: float = 0.0, popularity_threshold: float = 0.0,
                    pair_window: int = 3) -> PriorWithCounts:
        def log_counts(values: np.ndarray, cut: float) -> torch.Tensor:
            kept = np.where(values > cut, values, 0.0)
            return torch.as_tensor(np.log1p(np.maximum(kept, 0)), dtype=torch.float32)

        return cls(prior, log_counts(counts.popularity, popularity_threshold * counts.popularity_std),
                   log_counts(counts.pairs, threshold * counts.pair_std), torch.as_tensor(neighbours),
                   popularity_weight=popularity_weight, pair_weight=pair_weight, threshold=threshold,
                   popularity_threshold=popularity_threshold, pair_window=pair_window)

    def with_counts(self, counts: Counts) -> PriorWithCounts:
        """The same weights and thresholds over other counts (the serve release of the same merchants)."""
        return PriorWithCounts.from_counts(self.prior, counts, self.neighbours.cpu().numpy(),
                                           popularity_weight=self.popularity_weight, pair_weight=self.pair_weight,
                                           threshold=self.threshold, popularity_threshold=self.popularity_threshold,
                                           pair_window=self.pair_window)

    def __call__(self, histories: list[np.ndarray]) -> torch.Tensor:
        scores = self.prior(histories)
        if self.popularity_weight:
            scores += self.popularity_weight * self.popularity
        if self.pair_weight:
            scores += self.pair_weight * self.pair_term(histories, scores)
        return scores

    def pair_term(self, histories: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
        """The unweighted transition term ``[B, n_items + 1]`` (shaped and placed ``like`` a score tensor)."""
        out = torch.zeros_like(like)
        for age in range(self.pair_window):
            weight = self.prior.decay ** age
            if weight == 0:
                break
            rows = [i for i, h in enumerate(histories) if len(h) > age]
            if not rows:  # every history is shorter (one item, or an explanation's leave-one-out variant)
                break
            last = torch.as_tensor([int(histories[i][-1 - age]) for i in rows], device=out.device)
            rows_t = torch.as_tensor(rows, device=out.device)
            out.index_put_((rows_t.unsqueeze(1), self.neighbours[last]), weight * self.pairs[last], accumulate=True)
        return out


# Private selection: every choice from the release itself (post-processing, no ε) ---------------------------------

CUTS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
"""The cuts (in noise standard deviations) a release rule may pick from."""
FALSE_KEEPS = FederationSection.model_fields["statistics_false_keeps"].default
"""The share of kept cells that may be pure noise, at most (expected): the rule's one setting ([federation]
statistics_false_keeps)."""


def release_cut(values: np.ndarray, std: float, false_keeps: float = FALSE_KEEPS) -> float:
    """The smallest cut ``t`` (noise standard deviations) at which the expected number of pure-noise cells above
    ``t·std`` — at most every cell's ``P(N(0, 1) > t)`` — is at most ``false_keeps`` of the cells kept
    (Benjamini–Hochberg's bound with every cell taken as null). Read from the released counts and their public
    noise level alone, so choosing it costs no ε. Exact counts (``std`` 0) keep every positive cell; ``inf``:
    no cut keeps enough signal, the term is dropped."""
    if std <= 0:
        return 0.0
    cells = values[1:].ravel()  # padding (row / cell 0) is never released
    for cut in CUTS:
        kept = int((cells > cut * std).sum())
        if kept and cells.size * _normal_tail(cut) <= false_keeps * kept:
            return cut
    return math.inf


def _normal_tail(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


@dataclass(frozen=True)
class ReleaseRule:
    """How a private run turns released counts into a scorer without looking at anyone's held-out data: the
    weights are public settings (``[federation] statistics_popularity_weight`` / ``statistics_pair_weight``), the
    cuts follow from the release (``release_cut``)."""

    popularity_weight: float
    pair_weight: float
    false_keeps: float = FALSE_KEEPS
    pair_window: int = 3

    @classmethod
    def from_section(cls, section: FederationSection) -> ReleaseRule:
        """[federation]'s statistics weights and false-keep share."""
        return cls(section.statistics_popularity_weight, section.statistics_pair_weight,
                   section.statistics_false_keeps)

    def scorer(self, prior: TextPrior, counts: Counts, neighbours: np.ndarray) -> PriorWithCounts:
        popularity_cut = release_cut(counts.popularity, counts.popularity_std, self.false_keeps)
        pair_cut = release_cut(counts.pairs, counts.pair_std, self.false_keeps)
        return PriorWithCounts.from_counts(
            prior, counts, neighbours,
            popularity_weight=self.popularity_weight if math.isfinite(popularity_cut) else 0.0,
            pair_weight=self.pair_weight if math.isfinite(pair_cut) else 0.0,
            popularity_threshold=popularity_cut if math.isfinite(popularity_cut) else 0.0,
            threshold=pair_cut if math.isfinite(pair_cut) else 0.0, pair_window=self.pair_window)


# Selection on validation (the pooled research switch and the probe) -----------------------------------------------

POPULARITY_WEIGHTS = (0.01, 0.02, 0.03, 0.05, 0.1)
POPULARITY_THRESHOLDS = (0.0, 1.0, 2.0, 3.0)
PAIR_WEIGHTS = (0.1, 0.3, 1.0)
THRESHOLDS = (1.0, 2.0, 3.0)
"""Noisy counts below this many noise standard deviations are dropped (post-processing)."""
KEEP_LEVEL = 0.05
"""The level of both tests that keep the statistics at all (``fit_prior_with_counts``): pure-noise statistics are
kept for at most this share of releases."""
RELABELLINGS = 19
"""Relabelled copies of the counts the selection is rerun on: the fewest with which ``KEEP_LEVEL`` is reachable
(a release that gains more than all 19 has p = 1/20)."""
RELABEL_SEED = 0
"""The relabellings' seed: the same release on the same validation users always gets the same choice."""


def relabelled(counts: Counts, rng: np.random.Generator) -> Counts:
    """The counts with the item labels shuffled: item ``a`` gets item ``π(a)``'s popularity and its row of pair
    counts (on ``a``'s own text neighbours). The same values, no link to the items users take: a release of pure
    noise is exchangeable with its relabellings."""
    order = np.concatenate([[0], 1 + rng.permutation(len(counts.popularity) - 1)])
    return Counts(counts.popularity[order], counts.pairs[order], counts.popularity_std, counts.pair_std)


def fit_prior_with_counts(prior: TextPrior, counts: Counts, neighbours: np.ndarray, split, batch_size: int = 1024
                          ) -> tuple[PriorWithCounts, list[dict]]:
    """Weights and thresholds chosen on validation (never test), stagewise: the popularity term alone (weight and
    threshold), then the pair term's on top of it; a term is kept only where it validates better than without.

    The statistics are kept at all only where the best candidate passes two tests at ``KEEP_LEVEL``:

    - its gain over the text prior alone is beyond chance over the validation users, its choice among every
      candidate tried accounted for (``best_gain_p_value``: a sign-flip test with the max statistic);
    - the counts carry signal: the same selection rerun on ``RELABELLINGS`` relabelled copies of them
      (``relabelled``) gains at least as much for few of them (a permutation test over items: p = (1 + copies
      gaining at least as much) / (1 + copies); the copies stop at the first that decides it).

    The first alone does not bound the keeps of pure noise: the best of thirty rescorings by random counts can
    truly beat a weak prior on validation users (on the synthetic data it kept 19 of 30 pure-noise releases,
    whose gain held on validation users left out of the choice, not on test). The second does, by
    exchangeability. Each stage is one pass over the validation users: the prior and each pair term are scored
    once per batch."""
    from fedaug.common.model.metrics import best_gain_p_value, mask_history, rank_metrics

    histories, targets = split.eval_inputs("valid")

    def scorer(of: Counts = counts, **weights) -> PriorWithCounts:
        return PriorWithCounts.from_counts(prior, of, neighbours, **weights)

    def validate(of: Counts, candidates: list[dict]) -> list[np.ndarray]:
        """Each candidate's validation NDCG@10 per user, with counts ``of``."""
        popularity = {c["popularity_threshold"]: scorer(of, popularity_weight=1.0, pair_weight=0.0,
                                                        popularity_threshold=c["popularity_threshold"]).popularity
                      for c in candidates}
        pairs = {c["threshold"]: scorer(of, popularity_weight=0.0, pair_weight=1.0, threshold=c["threshold"])
                 for c in candidates if c["pair_weight"]}
        ndcg = [[] for _ in candidates]
        for start in range(0, len(targets), batch_size):
            batch = histories[start : start + batch_size]
            text = prior(batch)
            batch_targets = torch.from_numpy(targets[start : start + batch_size]).to(text.device)
            pair_terms = {t: s.pair_term(batch, text) for t, s in pairs.items()}
            masked = mask_history(text, batch, batch_targets)  # the terms added are finite: masked stays masked
            for i, c in enumerate(candidates):
                scores = masked + c["popularity_weight"] * popularity[c["popularity_threshold"]]
                if c["pair_weight"]:
                    scores += c["pair_weight"] * pair_terms[c["threshold"]]
                ndcg[i].append(rank_metrics(scores, batch_targets)["ndcg@10"])
        return [np.concatenate(rows) if rows else np.zeros(0) for rows in ndcg]

    def with_means(candidates: list[dict], per_user: list[np.ndarray]) -> list[dict]:
        return [c | {"valid_ndcg@10": float(rows.mean()) if len(rows) else 0.0}
                for c, rows in zip(candidates, per_user, strict=True)]

    none = {"popularity_weight": 0.0, "popularity_threshold": 0.0, "pair_weight": 0.0, "threshold": 0.0}

    def select(of: Counts) -> tuple[list[dict], list[np.ndarray]]:
        """Every candidate tried (the text prior alone first) with its mean, and its NDCG@10 per user."""
        stage = [none] + [none | {"popularity_weight": w, "popularity_threshold": k}
                          for k in POPULARITY_THRESHOLDS for w in POPULARITY_WEIGHTS]
        per_user = validate(of, stage)
        tried = with_means(stage, per_user)
        popularity = max(tried, key=lambda row: row["valid_ndcg@10"])
        stage = [{k: popularity[k] for k in none} | {"pair_weight": w, "threshold": t}
                 for t in THRESHOLDS for w in PAIR_WEIGHTS]
        stage_per_user = validate(of, stage)
        return tried + with_means(stage, stage_per_user), per_user + stage_per_user

    def gain(tried: list[dict]) -> float:
        return max(row["valid_ndcg@10"] for row in tried) - tried[0]["valid_ndcg@10"]

    tried, per_user = select(counts)
    best = max(range(len(tried)), key=lambda i: tried[i]["valid_ndcg@10"])
    # The best of some thirty candidates on the same users is otherwise partly noise (at eps 1, it cost test).
    if best and best_gain_p_value(np.stack(per_user[1:]), per_user[0]) > KEEP_LEVEL:
        best = 0
    rng, at_least = np.random.default_rng(RELABEL_SEED), 0
    for _ in range(RELABELLINGS if best else 0):
        at_least += gain(select(relabelled(counts, rng))[0]) >= gain(tried)
        if (1 + at_least) / (1 + RELABELLINGS) > KEEP_LEVEL:
            best = 0
            break
    return scorer(**{k: tried[best][k] for k in none}), tried

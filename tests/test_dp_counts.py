"""DP collaborative statistics: one user's influence is bounded as the accounting assumes, the noise has the
stated scale, the candidate pairs come from public text alone, and fusion with the prior obeys its weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedaug.common.config import SyntheticSection
from fedaug.common.data.split import leave_one_out
from fedaug.common.data.synthetic import generate
from fedaug.common.model.evaluate import evaluate
from fedaug.common.priors.dp_counts import Counts, PriorWithCounts, bounded_counts, noised, text_neighbours
from fedaug.common.priors.fusion import Fused, fit_fusion, standardise
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text_prior import TextPrior


def unit_vectors(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n + 1, d)).astype(np.float32)
    v[0] = 0
    v[1:] /= np.linalg.norm(v[1:], axis=1, keepdims=True)
    return v


def test_neighbours_are_the_most_similar_other_items():
    v = unit_vectors(30)
    neighbours = text_neighbours(v, 5, chunk=7)
    sims = v @ v.T
    for item in range(1, 31):
        others = [j for j in np.argsort(-sims[item]) if j not in (0, item)][:5]
        assert sorted(neighbours[item]) == sorted(others)
    assert not neighbours[0].any()


@pytest.mark.parametrize("max_items, max_pairs", [(1, 1), (3, 2), (8, 8)])
def test_one_user_moves_the_counts_by_at_most_the_sensitivity(max_items, max_pairs):
    """Adding any one user changes the popularity vector by ≤ sqrt(max_items) and the pair counts by
    ≤ sqrt(max_pairs) in L2, whatever their sequence (repeats, long histories)."""
    rng = np.random.default_rng(1)
    n = 20
    neighbours = text_neighbours(unit_vectors(n), 6)
    others = [rng.integers(1, n + 1, size=rng.integers(2, 15)) for _ in range(30)]
    base = bounded_counts(others, neighbours, max_items=max_items, max_pairs=max_pairs)
    for _ in range(50):
        user = rng.integers(1, n + 1, size=rng.integers(2, 40))
        user[::3] = user[0]  # repeated items and repeated transitions
        more = bounded_counts(others + [user], neighbours, max_items=max_items, max_pairs=max_pairs)
        assert np.linalg.norm(more.popularity - base.popularity) <= np.sqrt(max_items) + 1e-9
        assert np.linalg.norm(more.pairs - base.pairs) <= np.sqrt(max_pairs) + 1e-9
        assert np.all(more.pairs - base.pairs <= 1)  # distinct cells, +1 each


def test_only_candidate_transitions_are_counted_most_recent_first():
    neighbours = np.zeros((6, 2), np.int64)
    neighbours[1], neighbours[2], neighbours[3] = [2, 3], [3, 1], [1, 2]
    counts = bounded_counts([np.array([1, 2, 5, 3, 1])], neighbours, max_items=10, max_pairs=1)
    assert counts.pairs.sum() == 1 and counts.pairs[3, 0] == 1  # 3 -> 1, the most recent candidate pair
    assert counts.popularity.tolist() == [0, 1, 1, 1, 0, 1]  # distinct items once each


def test_the_noise_has_the_stated_scale_and_stds_add_in_quadrature():
    zeros = Counts(np.zeros(20001), np.zeros((2001, 10)))
    one = noised(zeros, noise_multiplier=0.7, max_items=4, max_pairs=9, rng=np.random.default_rng(0))
    assert one.popularity[1:].std() == pytest.approx(0.7 * 2, rel=0.03)
    assert one.pairs[1:].std() == pytest.approx(0.7 * 3, rel=0.03)
    assert one.popularity[0] == 0 and not one.pairs[0].any()
    assert (one + one).pair_std == pytest.approx(0.7 * 3 * np.sqrt(2))


def test_pair_counts_below_the_threshold_do_not_score():
    v = unit_vectors(4)
    neighbours = np.array([[0, 0], [2, 3], [1, 3], [1, 2], [1, 2]])
    pairs = np.zeros((5, 2))
    pairs[1] = [10.0, 1.5]  # 1 -> 2 clearly, 1 -> 3 within the noise
    counts = Counts(np.zeros(5), pairs, popularity_std=1.0, pair_std=1.0)
    prior = TextPrior(v)
    history = [np.array([4, 1])]
    scorer = PriorWithCounts.from_counts(prior, counts, neighbours, popularity_weight=0.0, pair_weight=1.0,
                                         threshold=2.0)
    gain = scorer(history) - prior(history)
    assert gain[0, 2] == pytest.approx(np.log1p(10.0)) and gain[0, 3] == 0


def test_histories_shorter_than_the_pair_window_score_their_own_transitions():
    v = unit_vectors(4)
    neighbours = np.array([[0, 0], [2, 3], [1, 3], [1, 2], [1, 2]])
    pairs = np.zeros((5, 2))
    pairs[1] = [10.0, 4.0]
    counts = Counts(np.zeros(5), pairs, popularity_std=1.0, pair_std=1.0)
    prior = TextPrior(v, decay=0.5)
    scorer = PriorWithCounts.from_counts(prior, counts, neighbours, popularity_weight=0.0, pair_weight=1.0,
                                         threshold=0.0, pair_window=3)
    gain = scorer([np.array([1])]) - prior([np.array([1])])  # one item: nothing at ages 1 and 2
    assert gain[0, 2] == pytest.approx(np.log1p(10.0)) and gain[0, 3] == pytest.approx(np.log1p(4.0))


def test_popularity_below_its_threshold_does_not_score():
    counts = Counts(np.array([0.0, 30.0, 2.0, -4.0]), np.zeros((4, 2)), popularity_std=10.0, pair_std=1.0)
    prior = TextPrior(unit_vectors(3))
    neighbours = np.array([[0, 0], [2, 3], [1, 3], [1, 2]])
    cut = PriorWithCounts.from_counts(prior, counts, neighbours, popularity_weight=1.0, pair_weight=0.0,
                                      popularity_threshold=1.0)
    assert cut.popularity.tolist() == pytest.approx([0.0, np.log1p(30.0), 0.0, 0.0])
    kept = PriorWithCounts.from_counts(prior, counts, neighbours, popularity_weight=1.0, pair_weight=0.0)
    assert kept.popularity[2] == pytest.approx(np.log1p(2.0))


def test_the_one_pass_fit_scores_each_candidate_as_the_scorer_itself_does():
    """fit_prior_with_counts validates every candidate from shared per-batch terms; each figure equals the
    candidate scorer's own evaluation, and the chosen scorer is the best-validating candidate."""
    from fedaug.common.priors.dp_counts import fit_prior_with_counts

    split = leave_one_out(generate(SyntheticSection(users=400, items=80, titles=False)))
    n = split.n_items
    prior = TextPrior(unit_vectors(n, seed=3), decay=0.5)
    neighbours = text_neighbours(prior.vectors.numpy(), 6)
    counts = noised(bounded_counts(split.train.sequences(), neighbours, max_items=4, max_pairs=2),
                    noise_multiplier=0.3, max_items=4, max_pairs=2, rng=np.random.default_rng(0))
    chosen, tried = fit_prior_with_counts(prior, counts, neighbours, split, batch_size=64)
    keys = ("popularity_weight", "popularity_threshold", "pair_weight", "threshold")
    for row in tried[:: max(len(tried) // 8, 1)] + [tried[-1]]:
        own = evaluate(PriorWithCounts.from_counts(prior, counts, neighbours, **{k: row[k] for k in keys}),
                       split, "valid")["ndcg@10"]
        assert row["valid_ndcg@10"] == pytest.approx(own, abs=1e-12)
    best = max(tried, key=lambda row: row["valid_ndcg@10"])
    assert all(getattr(chosen, k) == best[k] for k in keys) or all(getattr(chosen, k) == 0 for k in keys)
    assert any(row["pair_weight"] for row in tried) and any(row["popularity_threshold"] for row in tried)


def _noise_test_setting():
    split = leave_one_out(generate(SyntheticSection(users=400, items=80, titles=False)))
    prior = TextPrior(unit_vectors(split.n_items, seed=3), decay=0.5)
    neighbours = text_neighbours(prior.vectors.numpy(), 6)
    return split, prior, neighbours, bounded_counts(split.train.sequences(), neighbours, max_items=4, max_pairs=2)


def test_statistics_that_only_add_noise_are_kept_at_most_at_the_rules_level():
    """Counts drowned in noise (multiplier 1e4) say nothing about which items users take, yet the best of thirty
    rescorings by them can beat this weak text prior on validation users (a test over users alone kept 19 of 30;
    the earlier normal interval 7 of 30). The rule keeps them for at most KEEP_LEVEL of the noise draws."""
    from fedaug.common.priors.dp_counts import KEEP_LEVEL, fit_prior_with_counts

    split, prior, neighbours, exact = _noise_test_setting()
    draws, kept = 60, 0
    for seed in range(draws):
        counts = noised(exact, noise_multiplier=1e4, max_items=4, max_pairs=2, rng=np.random.default_rng(seed))
        chosen, tried = fit_prior_with_counts(prior, counts, neighbours, split)
        kept += chosen.popularity_weight != 0 or chosen.pair_weight != 0
        assert max(row["valid_ndcg@10"] for row in tried) > tried[0]["valid_ndcg@10"]  # noise wins validation...
    assert kept / draws <= KEEP_LEVEL  # ...and is rarely kept


def test_statistics_with_signal_are_kept():
    """Exact counts of data with transition and popularity structure beat the text prior and their relabellings."""
    from fedaug.common.priors.dp_counts import fit_prior_with_counts

    split, prior, neighbours, exact = _noise_test_setting()
    for counts in (exact, noised(exact, noise_multiplier=0.5, max_items=4, max_pairs=2,
                                 rng=np.random.default_rng(0))):
        chosen, tried = fit_prior_with_counts(prior, counts, neighbours, split)
        assert chosen.popularity_weight > 0
        assert evaluate(chosen, split, "valid")["ndcg@10"] == max(row["valid_ndcg@10"] for row in tried)


def test_relabelled_counts_keep_their_values_and_lose_their_items():
    from fedaug.common.priors.dp_counts import relabelled

    counts = Counts(np.arange(6.0), np.arange(12.0).reshape(6, 2), popularity_std=2.0, pair_std=3.0)
    shuffled = relabelled(counts, np.random.default_rng(1))
    order = np.searchsorted(counts.popularity, shuffled.popularity)  # which item's counts each item now has
    assert order[0] == 0 and sorted(order) == list(range(6)) and not np.array_equal(order, np.arange(6))
    assert np.array_equal(shuffled.pairs, counts.pairs[order])  # an item's popularity and pair row move together
    assert (shuffled.popularity_std, shuffled.pair_std) == (2.0, 3.0)


def test_the_best_gain_p_value_accounts_for_the_choice_among_candidates():
    """Differences symmetric about 0: the best of 30 candidates' p-value is uniform (rejected at 5 % about 5 % of
    the time), while a per-candidate test would reject most of the time; a real gain gets a small p-value; the
    same figures always give the same p-value."""
    from fedaug.common.model.metrics import best_gain_p_value

    rng = np.random.default_rng(0)
    baseline = rng.uniform(0, 1, 300)
    null = [best_gain_p_value(baseline + rng.choice([-0.1, 0.0, 0.0, 0.1], (30, 300)), baseline, flips=500)
            for _ in range(200)]
    assert 0.02 <= np.mean(np.array(null) <= 0.05) <= 0.09
    candidates = baseline + rng.choice([-0.1, 0.0, 0.0, 0.1], (30, 300))
    candidates[7] += 0.03
    assert best_gain_p_value(candidates, baseline) < 0.01
    assert best_gain_p_value(candidates, baseline) == best_gain_p_value(candidates, baseline)
    assert best_gain_p_value(np.tile(baseline, (3, 1)), baseline) == 1.0  # nothing moves: nothing gained


def test_fusion_standardises_and_weighs_the_prior():
    model = lambda h: torch.tensor([[0.0, 1.0, 2.0, 3.0]]) * 100  # noqa: E731 - scale must not matter
    prior = lambda h: torch.tensor([[0.0, 0.9, 0.1, 0.0]])  # noqa: E731
    alone = Fused(model, prior, 0.0)([np.array([1])])
    assert torch.allclose(alone, standardise(model(None)))
    assert Fused(model, prior, 0.0)([None]).argmax() == 3 and Fused(model, prior, 4.0)([None]).argmax() == 1
    prior_alone = Fused(lambda h: torch.full((1, 4), float("nan")), prior, math.inf)([None])  # model never used
    assert torch.equal(prior_alone, standardise(prior(None)))
    z = standardise(torch.tensor([[5.0, 1.0, 2.0, 3.0]]))
    assert z[0, 0] == 0 and z[0, 1:].mean().abs() < 1e-6 and z[0, 1:].std() == pytest.approx(1.0)


def test_fusion_offers_the_exact_prior_and_takes_what_validates_best():
    """The prior alone (weight inf) is a candidate scored exactly as the prior itself; validation takes the best
    candidate, and between equally good ones (or ones apart by chance) the one leaning most on the prior."""
    split = leave_one_out(generate(SyntheticSection(users=300, items=60, titles=False)))
    noise = lambda h: torch.randn(len(h), split.n_items + 1,  # noqa: E731
                                  generator=torch.Generator().manual_seed(len(h)))
    prior = Popularity(split.train)
    fused, tried, valid = fit_fusion(noise, prior, split)
    by_weight = {row["weight"]: row["valid_ndcg@10"] for row in tried}
    assert by_weight[math.inf] == pytest.approx(evaluate(prior, split, "valid")["ndcg@10"], abs=1e-12)
    assert valid["ndcg@10"] == by_weight[fused.weight] > by_weight[0.0]
    # the best weight, or the prior alone where the best one's edge over it is within chance
    assert by_weight[fused.weight] == max(by_weight.values()) or fused.weight == math.inf

    _, targets = split.eval_inputs("valid")
    oracle = lambda h: torch.nn.functional.one_hot(torch.from_numpy(targets), split.n_items + 1).float()  # noqa: E731
    fused, tried, valid = fit_fusion(noise, oracle, split)  # 16 ties with inf: both rank every target first
    assert valid["ndcg@10"] == 1.0 and fused.weight == math.inf


def test_a_model_is_mixed_into_the_prior_only_where_it_helps_beyond_chance():
    """A model that helps one validation user (and so wins the mean by a hair) is not mixed in: its gain over the
    prior alone is within chance."""
    split = leave_one_out(generate(SyntheticSection(users=300, items=60, titles=False)))
    prior = Popularity(split.train)
    _, targets = split.eval_inputs("valid")
    lucky = int(np.flatnonzero(targets != targets[0])[0])  # one user whose target is not the first user's

    def model(histories):
        scores = prior(histories).clone()
        if len(histories) > lucky:
            scores[lucky, targets[lucky]] += 1e3  # its target first, for this one user only
        return scores

    fused, tried, _ = fit_fusion(model, prior, split)
    by_weight = {row["weight"]: row["valid_ndcg@10"] for row in tried}
    assert max(by_weight.values()) > by_weight[math.inf]  # the model does win on the mean...
    assert fused.weight == math.inf  # ...but not beyond chance


def test_a_merchant_releases_fit_and_serve_counts_once_within_its_share(tmp_path):
    """Fit counts over the training histories, serve counts over the histories test sees (validation item
    included), noised together at the share of the budget, ledgered before release and resent, not re-released."""
    from fedaug.client.merchant import build_merchant
    from fedaug.client.releases import release_statistics
    from fedaug.common.config import FederationConfig, SyntheticSection
    from fedaug.common.data.synthetic import generate
    from fedaug.common.priors.dp_counts import RELEASES

    data = generate(SyntheticSection(users=200, items=80, titles=False))
    config = FederationConfig.model_validate({"privacy": {"epsilon": 8.0}, "local": {"batch_size": 32}})
    merchant = build_merchant(config, data, tmp_path)
    neighbours = text_neighbours(np.random.default_rng(0).normal(size=(81, 4)).astype(np.float32), 5)
    seen = merchant.split.seen_sequences()
    held_out = int((merchant.split.valid > 0).sum())
    assert sum(map(len, seen)) == sum(map(len, merchant.split.train.sequences())) + held_out
    released = release_statistics(merchant.trainer, "run-1", neighbours, share=0.5, max_items=4, max_pairs=1,
                                  state_dir=tmp_path, serve_sequences=seen)
    exact = bounded_counts(seen, neighbours, max_items=4, max_pairs=1)
    assert released.serve.pair_std == released.fit.pair_std > 0
    residual = released.serve.pairs[1:] - exact.pairs[1:]
    assert abs(residual.std() / released.serve.pair_std - 1) < 0.1  # serve = true serve counts + the noise
    history = merchant.trainer.ledger.history()
    assert sum(steps for _, _, steps in history) == RELEASES
    assert merchant.trainer.epsilon_spent() == pytest.approx(4.0, rel=1e-3)  # half the budget, all four releases
    again = release_statistics(merchant.trainer, "run-1", neighbours, share=0.5, max_items=4, max_pairs=1,
                               state_dir=tmp_path, serve_sequences=seen)
    assert np.array_equal(again.serve.pairs, released.serve.pairs)
    assert len(merchant.trainer.ledger.history()) == len(history)  # resent, not released again

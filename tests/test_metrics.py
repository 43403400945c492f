"""Ranking metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from fedaug.common.model.metrics import mask_history, mean_metrics, rank_metrics, tie_key, top_k


def _metrics(scores, target, history=()):
    scores = torch.tensor([scores], dtype=torch.float32)
    targets = torch.tensor([target])
    masked = mask_history(scores, [np.array(history, dtype=np.int64)], targets)
    return {k: float(v[0]) for k, v in rank_metrics(masked, targets).items()}


def test_top_ranked_target_is_a_perfect_hit():
    # item 0 is padding; items 1..5; target 3 scores highest
    m = _metrics([9.0, 0.1, 0.2, 0.9, 0.3, 0.4], target=3)
    assert m["hr@5"] == m["hr@10"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx(1.0)  # above all 4 other items; padding (score 9) is excluded


def test_rank_six_misses_top_five_and_hits_top_ten():
    scores = [0.0] + [10.0 - i for i in range(12)]  # item 1 best, item 12 worst
    m = _metrics(scores, target=7)  # six items score higher: rank 6 (0-based)
    assert m["hr@5"] == 0.0 and m["ndcg@5"] == 0.0
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(8))
    assert m["auc"] == pytest.approx(5 / 11)  # 5 of the 11 other items score lower


def test_history_items_are_excluded_but_never_the_target():
    scores = [0.0] + [10.0 - i for i in range(12)]
    m = _metrics(scores, target=7, history=[1, 2, 3, 7])  # 1..3 removed: rank 3
    assert m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(5))
    assert m["auc"] == pytest.approx(5 / 8)  # 8 candidates left besides the target, 5 below it


def test_constant_scores_get_chance_rank_not_a_perfect_one():
    scores = torch.zeros(100, 101)  # every target ties with 99 other items
    m = rank_metrics(scores.index_fill(1, torch.tensor([0]), float("-inf")), torch.arange(1, 101))
    assert m["hr@10"].mean() == pytest.approx(0.1) and m["hr@20"].mean() == pytest.approx(0.2)
    assert m["auc"].mean() == pytest.approx(0.5)


def test_served_top_k_breaks_ties_as_the_metrics_do():
    scores = torch.tensor([[float("-inf"), 1.0, 2.0, 2.0, 2.0, 0.5, 2.0]])
    values, items = top_k(scores.clone(), 4)
    assert values.tolist() == [[2.0] * 4] and sorted(items[0].tolist()) == [2, 3, 4, 6]
    for position, item in enumerate(items[0].tolist()):  # each item's metric rank is its served position
        m = rank_metrics(scores.clone(), torch.tensor([item]))
        assert m["ndcg@5"][0] == pytest.approx(1 / math.log2(position + 2))


def test_mean_over_batches():
    a = {k: np.array([1.0, 0.0]) for k in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "auc")}
    b = {k: np.array([1.0]) for k in a}
    assert mean_metrics([a, b])["hr@10"] == pytest.approx(2 / 3)


def test_top_k_equals_a_full_stable_sort_on_tie_heavy_scores():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(3, 40, (1,), generator=generator))
        scores = torch.randint(0, 4, (5, n), generator=generator).float()
        scores[:, 0] = float("-inf")
        k = int(torch.randint(1, n, (1,), generator=generator))
        order = torch.argsort(tie_key(n))
        full, positions = torch.sort(scores[:, order], dim=1, descending=True, stable=True)
        values, items = top_k(scores.clone(), k)
        assert torch.equal(values, full[:, :k]) and torch.equal(items, order[positions[:, :k]])

"""The embedded default data: deterministic, realistic in shape, and learnable."""

import numpy as np
import pytest

from fedaug.common.config import BaselineConfig, SyntheticSection, load_config
from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.split import dominant_category
from fedaug.common.data.synthetic import generate
from fedaug.simulations.baseline import run_baseline


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (generate(SyntheticSection(users=200, seed=seed)) for seed in (5, 5, 6))
    assert np.array_equal(a.items, b.items) and np.array_equal(a.timestamps, b.timestamps)
    assert np.array_equal(a.context["device"], b.context["device"])
    assert not np.array_equal(a.items[:100], c.items[:100])


def test_shape_of_the_default_data():
    data = generate()
    summary = data.summary()
    assert (summary["users"], summary["items"]) == (3000, 1500)
    # interactions counted from the events themselves, and about users × mean length (14)
    assert summary["interactions"] == len(data.items) == int(data.lengths.sum())
    assert 0.8 * 3000 * 14 < summary["interactions"] < 1.2 * 3000 * 14
    assert data.lengths.min() >= 5 and data.items.min() >= 1 and data.items.max() <= data.n_items
    # funnel: each stage is rarer than the one before
    counts = dict(zip(EVENT_TYPES, np.bincount(data.event_type, minlength=len(EVENT_TYPES)), strict=True))
    assert counts["view"] > counts["click"] > counts["cart"] > 0 and counts["purchase"] > 0
    # Zipf-like popularity: the top 10% of items take a large share of events
    counts = np.sort(np.bincount(data.items)[1:])[::-1]
    assert counts[: len(counts) // 10].sum() > 0.35 * counts.sum()
    # time order within users, and context derived from it
    ts = np.split(data.timestamps, data.offsets[1:-1])
    assert all((np.diff(t) >= 0).all() for t in ts)
    assert set(np.unique(data.context["hour"])) <= set(range(24))
    # non-IID merchants: their users' dominant categories are distributed differently
    dom = dominant_category(data)
    mixes = np.stack([np.bincount(dom[data.merchant == m], minlength=13) for m in range(5)]).astype(float)
    mixes /= mixes.sum(1, keepdims=True)
    assert np.abs(mixes - mixes.mean(0)).sum(1).max() > 0.4


@pytest.mark.slow
def test_sequential_model_beats_popularity_twice_over():
    pop = run_baseline(load_config(None, {"model.kind": "pop"}))
    cfg = load_config(None, {"train.epochs": 4, "train.patience": 4})
    assert isinstance(cfg, BaselineConfig)
    sasrec = run_baseline(cfg)
    assert sasrec.test["ndcg@10"] >= 2 * pop.test["ndcg@10"], (sasrec.test, pop.test)

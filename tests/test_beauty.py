"""Real data: Amazon Beauty loads with the published counts, and the popularity baseline is in its known range."""

import numpy as np

from common.evaluate import evaluate
from common.loaders import load
from common.popularity import Popularity
from common.split import assign_merchants, leave_one_out, merchant_partitions


def test_beauty_loads_with_published_counts(beauty_dir):
    data = load(beauty_dir / "Beauty.txt", "amazon-seq")
    assert data.summary() == {"users": 22363, "items": 12101, "interactions": 198502}
    assert data.timestamps is not None and len(data.timestamps) == 198502
    assert len(data.catalog.attributes) == 12102 and data.catalog.category.max() > 1
    assert list(data.catalog.raw_ids[data.sequence(0)]) == [1, 2, 3, 4, 5]
    split = leave_one_out(data)
    assert len(split.eval_users("test")) == 22363


def test_beauty_popularity_and_partition(beauty_dir):
    data = load(beauty_dir / "Beauty.txt", "amazon-seq")
    split = leave_one_out(data)
    pop = evaluate(Popularity(split.train), split, "test")
    assert 0.003 < pop["ndcg@10"] < 0.01 and 0.5 < pop["auc"] < 0.75
    parts = merchant_partitions(assign_merchants(data, 10, "uniform", seed=0))
    assert [p.n_users for p in parts] == [2237] * 3 + [2236] * 7
    assert int(np.sum([p.n_interactions for p in parts])) == 198502

"""Real data: Amazon Beauty loads with the published counts, and the popularity baseline is in its known range."""

import numpy as np
import pandas as pd

from fedaug.common.data.loaders import load
from fedaug.common.data.split import assign_merchants, leave_one_out, merchant_partitions
from fedaug.common.model.evaluate import evaluate
from fedaug.common.priors.popularity import Popularity


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


def test_beauty_as_a_shops_event_log_with_text_ids_loads_to_the_same_data(beauty_dir, tmp_path):
    """Beauty exported as a shop would (ids like u30644 / i1203, renamed columns, its own event name, ISO time)
    loads through [data.columns] / [data.events] into exactly the data the amazon-seq file gives, so every model
    trains and scores the same."""
    from fedaug.common.data.events import EventSchema

    data = load(beauty_dir / "Beauty.txt", "amazon-seq")
    users = data.event_user()
    frame = pd.DataFrame({"customer": np.char.add("u", data.user_ids[users].astype(str)),
                          "sku": np.char.add("i", data.catalog.raw_ids[data.items].astype(str)),
                          "when": pd.to_datetime(data.timestamps, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "action": "review"})
    path = tmp_path / "beauty-events.csv"
    frame.to_csv(path, index=False)
    events = load(path, "events", schema=EventSchema(user="customer", item="sku", timestamp="when",
                                                     event_type="action", events={"review": "purchase"}))
    assert events.summary() == data.summary()
    assert events.user_ids[:3].tolist() == ["u1", "u2", "u3"] and events.catalog.raw_ids[1] == "i1"
    for name in ("items", "offsets", "timestamps"):
        assert np.array_equal(getattr(events, name), getattr(data, name)), name
    split, again = leave_one_out(data), leave_one_out(events)
    assert evaluate(Popularity(again.train), again, "test") == evaluate(Popularity(split.train), split, "test")

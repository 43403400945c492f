"""Leave-one-out, k-core and merchant partitions."""

import numpy as np
import pytest

from fedaug.common.config import SyntheticSection
from fedaug.common.data import ItemCatalog, from_sequences
from fedaug.common.data.split import (
    Merchants,
    assign_merchants,
    dominant_category,
    k_core,
    leave_one_out,
    merchant_partitions,
)
from fedaug.common.data.synthetic import generate
from fedaug.common.errors import ConfigError


def _toy():
    catalog = ItemCatalog(raw_ids=np.arange(8), category=np.array([0, 1, 1, 2, 2, 3, 3, 1]))
    seqs = [[1, 2, 3, 4], [5, 6], [7, 1, 2], [3, 4, 5, 6, 7]]
    return from_sequences(seqs, catalog, timestamps=np.arange(14))


def test_leave_one_out_holds_out_last_two_items():
    split = leave_one_out(_toy())
    assert list(split.test) == [4, 0, 2, 7]
    assert list(split.valid) == [3, 0, 1, 6]
    assert [list(s) for s in split.train.sequences()] == [[1, 2], [5, 6], [7], [3, 4, 5]]
    assert list(split.train.timestamps) == [0, 1, 4, 5, 6, 9, 10, 11]  # side information stays aligned
    histories, targets = split.eval_inputs("test")
    assert [list(h) for h in histories] == [[1, 2, 3], [7, 1], [3, 4, 5, 6]] and list(targets) == [4, 2, 7]
    histories, targets = split.eval_inputs("valid")
    assert [list(h) for h in histories] == [[1, 2], [7], [3, 4, 5]] and list(targets) == [3, 1, 6]


def test_held_out_events_never_reach_training_data():
    data = generate(SyntheticSection(users=300, items=200, seed=3, titles=False))
    split = leave_one_out(data)
    for user in split.eval_users("test"):
        full = data.sequence(user)
        assert np.array_equal(split.train.sequence(user), full[:-2])
    assert split.train.n_interactions == data.n_interactions - 2 * len(split.eval_users("test"))


def test_k_core_filters_until_stable():
    data = k_core(_toy(), 3)
    counts = np.bincount(data.items)
    assert (data.lengths >= 3).all() and (counts[data.items] >= 3).all()


def test_uniform_partition_is_seeded_and_balanced():
    data = _toy()
    a = assign_merchants(generate(SyntheticSection(users=100, items=100, titles=False)), 4, "uniform", seed=1)
    b = assign_merchants(generate(SyntheticSection(users=100, items=100, titles=False)), 4, "uniform", seed=1)
    assert np.array_equal(a.merchant, b.merchant)
    assert sorted(np.bincount(a.merchant)) == [25, 25, 25, 25]
    with pytest.raises(ConfigError, match="merchants must be between 1"):
        assign_merchants(data, 10, "uniform")


def test_category_partition_is_non_iid_and_covers_every_merchant():
    data = generate(SyntheticSection(users=600, items=300, seed=2, titles=False))
    parts = assign_merchants(data, 5, "category", seed=0, alpha=0.1)
    assert set(np.unique(parts.merchant)) == set(range(5))
    # merchants' mixes of users' dominant categories stray far from the overall mix; a uniform split's do not
    assert _mix_gap(parts) > 3 * _mix_gap(assign_merchants(data, 5, "uniform", seed=0))


def _mix_gap(data) -> float:
    dominant = dominant_category(data)
    overall = np.bincount(dominant, minlength=dominant.max() + 1) / len(dominant)
    gaps = []
    for m in np.unique(data.merchant):
        mix = np.bincount(dominant[data.merchant == m], minlength=len(overall))
        gaps.append(np.abs(mix / mix.sum() - overall).sum())
    return float(np.mean(gaps))


def test_merchant_partitions_are_self_contained():
    data = assign_merchants(generate(SyntheticSection(users=200, items=100, titles=False)), 3, "uniform")
    parts = merchant_partitions(data)
    assert sum(p.n_users for p in parts) == data.n_users
    assert sum(p.n_interactions for p in parts) == data.n_interactions
    splits = [leave_one_out(p) for p in parts]
    assert all(s.n_items == data.n_items for s in splits)  # one global item space for the shared model


def test_one_merchant_is_cut_out_on_demand_as_the_partitions_cut_it():
    data = assign_merchants(generate(SyntheticSection(users=300, items=100, titles=False)), 7, "uniform", seed=4)
    merchants = Merchants(data)
    assert len(merchants) == 7
    for m, part in enumerate(merchant_partitions(data)):
        alone = merchants.merchant_data(m)
        assert np.array_equal(alone.user_ids, data.user_ids[np.flatnonzero(data.merchant == m)])
        assert np.array_equal(alone.items, part.items) and np.array_equal(alone.offsets, part.offsets)
    with pytest.raises(ConfigError, match="merchant 7 is not one of the 7"):
        merchants.merchant_data(7)


def test_column_partition_needs_merchant_ids():
    with pytest.raises(ConfigError, match="needs a merchant_id column"):
        assign_merchants(_toy(), 2, "column")
    data = generate(SyntheticSection(users=50, items=60, merchants=3, titles=False))
    assert assign_merchants(data, 0, "column") is data

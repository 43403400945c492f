"""Side features: codes per event, the shift that gives each position the next moment's context, and the split's
held-out rows (the query moment, never the held-out item's type)."""

import numpy as np
import pytest

from fedaug.common.data import EVENT_TYPES, ItemCatalog, from_sequences
from fedaug.common.data.features import GAP_BUCKETS, event_features, input_rows
from fedaug.common.data.split import leave_one_out
from fedaug.common.errors import ConfigError
from fedaug.common.model.sasrec import SASRecConfig

MONDAY_NOON = 1_704_110_400  # 2024-01-01 12:00 UTC, a Monday


def _data():
    catalog = ItemCatalog(raw_ids=np.arange(6))
    stamps = [MONDAY_NOON, MONDAY_NOON + 1, MONDAY_NOON + 3600, MONDAY_NOON + 86400 * 2, MONDAY_NOON + 86400 * 30,
              MONDAY_NOON + 5, MONDAY_NOON + 6, MONDAY_NOON + 70]
    types = [EVENT_TYPES.index(t) for t in ("view", "click", "cart", "purchase", "view", "view", "cart", "purchase")]
    return from_sequences([[1, 2, 3, 4, 5], [5, 4, 3]], catalog, user_ids=np.array(["a", "b"]),
                          timestamps=np.array(stamps), event_type=np.array(types, np.int8),
                          context={"price": np.array([0, 1, 10, 100, 1e6, -3, 0, 2], np.float32)})


def test_each_event_gets_its_type_gap_bucket_hour_and_weekday():
    rows = event_features(_data(), ("price",))
    assert rows[:, 0].tolist() == [1, 2, 4, 5, 1, 1, 4, 5]  # 1 + EVENT_TYPES index
    # gaps: first event of each user unknown, then log2 buckets of 1 s, ~1 h, ~2 d, ~28 d; 1 s and 64 s
    assert rows[:, 1].tolist() == [0, 2, 12, 18, 22, 0, 2, 7]
    assert rows[:, 1].max() <= GAP_BUCKETS
    assert rows[:5, 2].tolist() == [13, 13, 14, 13, 13]  # 1 + hour of day (UTC)
    assert rows[:5, 3].tolist() == [1, 1, 1, 3, 3]  # Monday = 1; 30 days later is a Wednesday
    np.testing.assert_allclose(rows[:, 4], np.arcsinh([0, 1, 10, 100, 1e6, -3, 0, 2]), rtol=1e-6)


def test_data_without_types_or_times_has_unknown_codes():
    data = from_sequences([[1, 2, 3]], ItemCatalog(raw_ids=np.arange(4)))
    assert (event_features(data) == 0).all()
    with pytest.raises(ConfigError, match="model.context_columns: 'price' is not a context column"):
        event_features(data, ("price",))


def test_a_position_reads_its_own_behaviour_and_the_next_moments_context():
    rows = np.array([[1, 0, 13, 1], [2, 2, 13, 1], [4, 12, 14, 1]], np.float32)
    shifted = input_rows(rows, 2)  # two input positions, the third row is the moment predicted for
    assert shifted.tolist() == [[1, 2, 13, 1], [2, 12, 14, 1]]
    assert input_rows(rows[:2], 2).tolist() == [[1, 2, 13, 1], [2, 0, 0, 0]]  # query moment unknown


def test_the_split_hands_evaluation_the_held_out_moment_but_not_its_item():
    split = leave_one_out(_data())
    rows = event_features(_data())
    train = split.train_features()
    assert [len(r) for r in train] == [3, 1]
    (valid,) = [f for f in split.eval_features("valid")][:1]
    np.testing.assert_array_equal(valid, rows[:4])  # 3 training events + the validation event's row
    test = split.eval_features("test")[0]
    np.testing.assert_array_equal(test, rows[:5])  # history with the validation event, then the test moment
    assert split.target_types("valid").tolist() == [EVENT_TYPES.index("purchase"), EVENT_TYPES.index("cart")]
    assert split.target_types("test").tolist() == [EVENT_TYPES.index("view"), EVENT_TYPES.index("purchase")]
    # a user subset keeps its own rows
    np.testing.assert_array_equal(split.select_users(np.array([1])).eval_features("test")[0], rows[5:8])


def test_purchase_only_targets_and_weights_by_type():
    from fedaug.common.config import ModelSection
    from fedaug.common.model.batching import UserSamples

    split = leave_one_out(_data())
    sequences = split.train.sequences() + [np.array([5, 4, 3])]
    features = split.train_features() + [event_features(_data())[5:8]]
    only_purchases = ModelSection(target_weights={"view": 0, "click": 0, "favourite": 0, "cart": 0})
    purchases = SASRecConfig.from_section(only_purchases, 5)
    samples = UserSamples(sequences, 5, features=features, target_weights=purchases.target_weights)
    # user b's events: view, cart, purchase -> the only target left is the purchased item (3), after the cart (4)
    assert samples.targets[1, 0].tolist() == [0, 3]
    assert samples.targets[0].sum() == 0  # user a trains on view, click, cart: no purchase among its targets
    weighted = SASRecConfig.from_section(ModelSection(target_weights={"purchase": 4.0, "view": 0.5}), 5).target_weights
    samples = UserSamples(sequences, 5, features=features, target_weights=weighted)
    assert samples.weights[1, 0, :2].tolist() == [1.0, 4.0] and samples.weights[0, 0, :2].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least one event type must be a target"):
        ModelSection(target_weights={kind: 0 for kind in EVENT_TYPES})

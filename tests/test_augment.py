"""Property tests of the augmentation ops: ids in range, length bounds, determinism, no held-out item."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedaug.common.config import SEQUENCE_OPS, AugmentSection
from fedaug.common.data import ItemCatalog, from_sequences
from fedaug.common.data.split import leave_one_out
from fedaug.common.model.augment import Augmenter, ItemSimilarity

N_ITEMS = 50
MAX_LEN = 12

sequences = st.lists(st.integers(1, N_ITEMS), min_size=1, max_size=30).map(lambda s: np.array(s, dtype=np.int64))
corpora = st.lists(sequences, min_size=1, max_size=8)


def _augmenter(corpus, **kw):
    return Augmenter(AugmentSection(**kw), corpus, N_ITEMS, MAX_LEN)


@settings(max_examples=150, deadline=None)
@given(corpora, sequences, st.sampled_from(SEQUENCE_OPS), st.integers(0, 2**32 - 1))
def test_every_op_keeps_ids_in_range_bounds_length_and_is_deterministic(corpus, seq, op, seed):
    aug = _augmenter(corpus)
    view = aug.apply(op, seq, np.random.default_rng(seed))
    again = aug.apply(op, seq, np.random.default_rng(seed))
    assert np.array_equal(view, again)
    assert view.dtype == np.int64 and ((view >= 0) & (view <= N_ITEMS)).all()
    assert 1 <= len(view) <= max(len(seq), MAX_LEN) and len(view) <= max(MAX_LEN, len(seq))
    if op in ("mask", "reorder", "substitute"):
        assert len(view) == len(seq)
    if op == "crop":
        assert len(view) <= len(seq)
    if op == "insert":
        assert len(view) <= MAX_LEN
    if op == "reorder":
        assert sorted(view.tolist()) == sorted(seq.tolist())
    if op != "mask":
        assert (view > 0).all()  # only mask introduces the mask token


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, N_ITEMS), min_size=3, max_size=15), min_size=2, max_size=6),
       st.integers(0, 1000))
def test_held_out_events_never_influence_views(rows, seed):
    """Changing every user's validation and test items changes nothing the augmenter produces."""
    catalog = ItemCatalog(raw_ids=np.arange(N_ITEMS + 1))
    original = leave_one_out(from_sequences([np.array(r) for r in rows], catalog))
    changed_rows = [r[:-2] + [(r[-2] % N_ITEMS) + 1, (r[-1] + 7) % N_ITEMS + 1] for r in rows]
    changed = leave_one_out(from_sequences([np.array(r) for r in changed_rows], catalog))

    def all_views(split):
        train = split.train.sequences()
        aug = Augmenter(AugmentSection(views=3), train, N_ITEMS, MAX_LEN)
        rng = np.random.default_rng(seed)
        return [v.tolist() for s in train for v in aug.views(s, rng)]

    assert all_views(original) == all_views(changed)


def test_similarity_comes_from_co_occurrence():
    corpus = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([5, 6])]
    sim = ItemSimilarity(corpus, 6, k=2, window=1)
    assert sim.neighbours[1].tolist() == [2]
    assert set(sim.neighbours[2].tolist()) <= {1, 3, 4} and sim.neighbours[2][0] == 1
    assert sim.neighbours[5].tolist() == [6]
    rng = np.random.default_rng(0)
    assert sim.similar(6, rng) == 5
    assert ItemSimilarity([], 6).similar(3, rng) == 3  # no neighbours: the item itself


def test_policy_prefers_informative_ops_on_short_sequences():
    aug = _augmenter([np.array([1, 2, 3])], short_length=4)
    rng = np.random.default_rng(0)
    assert {aug.choose_op(3, rng) for _ in range(50)} == {"insert", "substitute"}
    assert {aug.choose_op(20, rng) for _ in range(200)} == set(SEQUENCE_OPS)


def test_disabled_augmentation_gives_no_views_and_bad_settings_fail():
    aug = _augmenter([np.array([1, 2])], enabled=False)
    assert aug.views(np.array([1, 2, 3]), np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="ops.1\n  Input should be 'crop', 'mask', 'reorder', 'substitute' or"):
        AugmentSection(ops=("crop", "rotate"))
    with pytest.raises(ValueError, match="crop_eta"):
        AugmentSection(crop_eta=1.5)


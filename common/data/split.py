"""Leave-one-out splits, k-core filtering and merchant partitioning.

The privacy and evaluation boundary lives here: ``LeaveOneOut.train`` holds every event a trainer or augmenter may
see; the validation and test items exist only as targets (and, for the test stage, the validation item joins the
input history, as in the standard SASRec protocol, and likewise in ``seen_sequences``, what DP statistics count for
scoring test). Nothing downstream of ``train`` can reach a held-out item.
"""

from __future__ import annotations

import mmap
import pickle
import struct
from dataclasses import dataclass

import numpy as np

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.data import BehaviorData
from fedaug.common.data.features import event_features, user_rows
from fedaug.common.errors import ConfigError

PARTITIONS = ("uniform", "category", "column")
STAGES = ("valid", "test")


@dataclass(frozen=True)
class LeaveOneOut:
    train: BehaviorData
    """All events but each evaluable user's last two."""
    valid: np.ndarray
    """Validation target item per user (0 = user too short to evaluate)."""
    test: np.ndarray
    """Test target item per user (0 = user too short to evaluate)."""
    full: BehaviorData | None = None
    """The data before the split (each user's training events, then the held-out ones): where the held-out
    events' types and times come from, for side features and per-type metrics. None: training events only."""

    @property
    def n_items(self) -> int:
        return self.train.n_items

    def eval_users(self, stage: str) -> np.ndarray:
        return np.flatnonzero(self._targets(stage) > 0)

    def eval_inputs(self, stage: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Input histories and targets of the users evaluable at ``stage`` ('valid' or 'test').

        Validation sees the training history; test sees the training history plus the validation item.
        """
        targets = self._targets(stage)
        users = np.flatnonzero(targets > 0)
        histories = [self.train.sequence(u) for u in users]
        if stage == "test":
            histories = [np.append(h, v) for h, v in zip(histories, self.valid[users], strict=True)]
        return histories, targets[users]

    def _targets(self, stage: str) -> np.ndarray:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        return self.valid if stage == "valid" else self.test

    def seen_sequences(self) -> list[np.ndarray]:
        """Every user's history as test sees it: the training sequence, then the validation item where held out."""
        return [np.append(self.train.sequence(u), v) if v > 0 else self.train.sequence(u)
                for u, v in enumerate(self.valid.tolist())]

    def select_users(self, users: np.ndarray) -> LeaveOneOut:
        return LeaveOneOut(self.train.select_users(users), self.valid[users], self.test[users],
                           None if self.full is None else self.full.select_users(users))

    def train_features(self, columns: tuple[str, ...] = ()) -> list[np.ndarray]:
        """Each user's side-feature rows (fedaug.common.data.features) of their training events."""
        return self._user_features(columns, 0, np.arange(self.train.n_users))

    def eval_features(self, stage: str, columns: tuple[str, ...] = ()) -> list[np.ndarray]:
        """Side-feature rows of the histories ``eval_inputs(stage)`` returns, plus one row for the held-out event
        itself: the moment of the prediction (its type is never read)."""
        users = self.eval_users(stage)
        return self._user_features(columns, 2 if stage == "test" else 1, users)

    def target_types(self, stage: str) -> np.ndarray | None:
        """EVENT_TYPES index of each evaluable user's held-out event at ``stage``; None without event types."""
        if self.full is None or self.full.event_type is None:
            return None
        users = self.eval_users(stage)
        held = self.full.offsets[users] + self.train.lengths[users] + (1 if stage == "test" else 0)
        return self.full.event_type[held].astype(np.int64)

    def _user_features(self, columns: tuple[str, ...], extra: int, users: np.ndarray) -> list[np.ndarray]:
        source = self.full if self.full is not None else self.train
        extra = extra if self.full is not None else 0  # without the held-out events their rows stay unknown
        rows = event_features(source, columns)
        return user_rows(rows, source.offsets[users], self.train.lengths[users] + extra)


MIN_EVALUABLE = 3
"""Events a user needs to be evaluated: at least one to train on, one for validation, one for test."""


def leave_one_out(data: BehaviorData, min_length: int = MIN_EVALUABLE) -> LeaveOneOut:
    """Hold out each user's last item for test and second-to-last for validation.

    Users with fewer than ``min_length`` events stay whole in training and are not evaluated.
    """
    lengths = data.lengths
    evaluable = lengths >= max(min_length, MIN_EVALUABLE)
    ends = data.offsets[1:]
    valid = np.zeros(data.n_users, dtype=np.int64)
    test = np.zeros(data.n_users, dtype=np.int64)
    test[evaluable] = data.items[ends[evaluable] - 1]
    valid[evaluable] = data.items[ends[evaluable] - 2]
    keep = np.ones(data.n_interactions, dtype=bool)
    keep[ends[evaluable] - 1] = False
    keep[ends[evaluable] - 2] = False
    return LeaveOneOut(data.select_events(keep), valid, test, data)


def tied_test_targets(data: BehaviorData) -> int | None:
    """Evaluable users whose test event (their last) has the same time as the one before it, so that the file's
    order, which ties keep, decides which of the two is held out for test; None without timestamps."""
    if data.timestamps is None:
        return None
    ends = data.offsets[1:][data.lengths >= MIN_EVALUABLE]
    return int((data.timestamps[ends - 1] == data.timestamps[ends - 2]).sum())


def k_core(data: BehaviorData, k: int) -> BehaviorData:
    """Repeatedly drop users and items with fewer than ``k`` interactions (item ids keep their numbering)."""
    if k <= 1:
        return data
    while True:
        item_counts = np.bincount(data.items, minlength=data.n_items + 1)
        keep_events = item_counts[data.items] >= k
        data = data.select_events(keep_events)
        keep_users = np.flatnonzero(data.lengths >= k)
        data = data.select_users(keep_users)
        item_counts = np.bincount(data.items, minlength=data.n_items + 1)
        if (data.lengths >= k).all() and (item_counts[data.items] >= k).all():
            return data


def assign_merchants(
    data: BehaviorData, n_merchants: int, scheme: str = "uniform", seed: int = 0, alpha: float = 0.5
) -> BehaviorData:
    """Give every user a merchant.

    - ``column``: keep the merchant ids that came with the data (``merchant_id`` column or generator).
    - ``uniform``: a seeded random split of users into ``n_merchants`` near-equal groups.
    - ``category``: non-IID; each user's dominant item category is spread over merchants by Dirichlet(alpha)
      proportions drawn per category, so merchants differ in category mix (smaller alpha, more skew).
    """
    if scheme not in PARTITIONS:
        raise ConfigError(f"unknown partition {scheme!r} (expected one of: {', '.join(PARTITIONS)})")
    if scheme == "column":
        if data.merchant is None:
            raise ConfigError("partition 'column' needs a merchant_id column in the data")
        return data
    if n_merchants < 1 or n_merchants > data.n_users:
        raise ConfigError(f"merchants must be between 1 and the number of users ({data.n_users}), got {n_merchants}")
    rng = np.random.default_rng(seed)
    if scheme == "uniform":
        merchant = rng.permutation(np.arange(data.n_users) % n_merchants)
    else:
        if data.catalog.category is None:
            raise ConfigError("partition 'category' needs item categories (an attribute file or the synthetic data)")
        if alpha <= 0:
            raise ConfigError(f"Dirichlet alpha must be positive, got {alpha}")
        merchant = _dirichlet_split(dominant_category(data), n_merchants, alpha, rng)
    return data.with_merchant(merchant, [f"merchant-{m}" for m in range(n_merchants)])


def dominant_category(data: BehaviorData) -> np.ndarray:
    """Each user's most frequent item category (ties to the lower id)."""
    n_cat = int(data.catalog.category.max()) + 1
    pairs = data.event_user() * n_cat + data.catalog.category[data.items]
    counts = np.bincount(pairs, minlength=data.n_users * n_cat).reshape(data.n_users, n_cat)
    return counts.argmax(axis=1)


def _dirichlet_split(label: np.ndarray, n_merchants: int, alpha: float, rng) -> np.ndarray:
    merchant = np.empty(len(label), dtype=np.int64)
    for value in np.unique(label):
        users = rng.permutation(np.flatnonzero(label == value))
        shares = rng.dirichlet(np.full(n_merchants, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(users)).round().astype(int)
        for m, group in enumerate(np.split(users, cuts)):
            merchant[group] = m
    # Every merchant needs users: hand empty merchants a user from the largest one.
    for m in range(n_merchants):
        if not (merchant == m).any():
            largest = np.bincount(merchant, minlength=n_merchants).argmax()
            merchant[rng.choice(np.flatnonzero(merchant == largest))] = m
    return merchant


class Merchants:
    """A data set's users grouped by merchant, so one merchant's data is cut out on demand, in time proportional
    to its own users (a simulation worker builds only the merchants it is asked for)."""

    def __init__(self, data: BehaviorData):
        if data.merchant is None:
            raise ConfigError("data has no merchant assignment; call assign_merchants first")
        self.data = data
        n = len(data.merchant_names) if data.merchant_names else int(data.merchant.max()) + 1
        self._order = np.argsort(data.merchant, kind="stable")  # each merchant's users in ascending order
        self._starts = np.searchsorted(data.merchant[self._order], np.arange(n + 1))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def merchant_data(self, merchant: int) -> BehaviorData:
        """Merchant ``merchant``'s users as a self-contained BehaviorData."""
        if not 0 <= merchant < len(self):
            raise ConfigError(f"merchant {merchant} is not one of the {len(self)} merchants")
        return self.data.select_users(self._order[self._starts[merchant] : self._starts[merchant + 1]])

    def write(self, path) -> None:
        """Write these merchants to ``path`` (replacing it whole) for other processes to map with ``mapped``: a
        pickle whose per-user and per-event arrays lie after it raw (pickle's out-of-band buffers, PEP 574), each
        at an aligned offset; the catalog (public, per item) stays inside the pickle."""
        users = {id(a) for a in (*vars(self.data).values(), *self.data.context.values(), *vars(self).values())
                 if isinstance(a, np.ndarray)}
        buffers: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:  # false: raw after the pickle
            if id(memoryview(buffer).obj) in users:
                buffers.append(buffer)
                return False
            return True

        head = pickle.dumps(self, protocol=5, buffer_callback=out_of_band)
        parts = [memoryview(head), *(buffer.raw() for buffer in buffers)]
        chunks = [struct.pack(f"<Q{len(parts)}Q", len(parts), *(part.nbytes for part in parts))]
        offset = len(chunks[0])
        for part in parts:
            chunks += [bytes(-offset % _ALIGN), part]
            offset += -offset % _ALIGN + part.nbytes
        write_bytes_atomic(path, chunks)

    @classmethod
    def mapped(cls, path) -> Merchants:
        """The merchants ``write`` wrote to ``path``, their per-user and per-event arrays read-only views of the
        file mapped into memory: processes that map it share one copy (the page cache), and a merchant's slice
        (``merchant_data``) copies only its own users."""
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        count = struct.unpack_from("<Q", mapped)[0]
        sizes = struct.unpack_from(f"<{count}Q", mapped, 8)
        view, offset, parts = memoryview(mapped), 8 * (count + 1), []
        for size in sizes:
            offset += -offset % _ALIGN
            parts.append(view[offset : offset + size])
            offset += size
        return pickle.loads(parts[0], buffers=parts[1:])


_ALIGN = 64
"""Byte alignment of each part of a ``Merchants.write`` file (numpy's, for any dtype)."""


def merchant_partitions(data: BehaviorData) -> list[BehaviorData]:
    """One self-contained BehaviorData per merchant (split it with ``leave_one_out`` for train/valid/test)."""
    merchants = Merchants(data)
    return [merchants.merchant_data(m) for m in range(len(merchants))]

"""The one in-memory form of behaviour data.

Events are stored flat, grouped by user in chronological order, with ``offsets`` marking where each user's events
start (CSR layout): user ``u`` owns events ``offsets[u]:offsets[u+1]``. Item ids are remapped to ``1..n_items``;
``0`` is reserved for padding. Every per-event array (items, timestamps, event types, context columns) shares the
same layout, so slicing users or trimming sequences keeps them aligned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np

EVENT_TYPES = ("view", "click", "favourite", "cart", "purchase")
"""Behaviour kinds, from the weakest signal of interest to the strongest; ``event_type`` arrays hold indices into
this tuple."""


@dataclass(frozen=True)
class ItemCatalog:
    """Public, non-user item side information (ids and attributes), shared by every merchant."""

    raw_ids: np.ndarray
    """Original item id for each internal id; ``raw_ids[0]`` is the padding placeholder."""
    attributes: list[np.ndarray] | None = None
    """Attribute ids (1..n_attributes) of each internal item id; index 0 is empty."""
    attribute_names: list[str] | None = None
    """Name of each attribute id; index 0 is the empty placeholder."""
    category: np.ndarray | None = None
    """One category index per internal item id (0 = unknown), used for non-IID partitioning."""
    category_names: list[str] | None = None
    texts: list[str] | None = None
    """Public text of each internal item id (title, brand, categories), for text encoders; index 0 is empty."""
    titles: list[str] | None = None
    """The part of each item's text that is not its attribute names (its title, and a catalog's other text
    columns); index 0 is empty. Set with ``texts``: what a written catalog's ``title`` column holds."""

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1


@dataclass(frozen=True)
class BehaviorData:
    """Per-user chronological item sequences with optional per-event and per-user side information."""

    items: np.ndarray
    """All events' internal item ids (int64, 1..n_items), grouped by user, chronological within a user."""
    offsets: np.ndarray
    """int64 array of length n_users + 1."""
    catalog: ItemCatalog
    user_ids: np.ndarray
    """Original user id of each user (strings or ints)."""
    timestamps: np.ndarray | None = None
    """Unix seconds per event (int64)."""
    event_type: np.ndarray | None = None
    """Index into EVENT_TYPES per event (int8)."""
    merchant: np.ndarray | None = None
    """Merchant index per user (int64), naming ``merchant_names``."""
    merchant_names: list[str] | None = None
    context: dict[str, np.ndarray] = field(default_factory=dict)
    """Extra per-event context features (e.g. hour, weekday, device), numeric arrays aligned with ``items``."""

    def __post_init__(self):
        if len(self.offsets) != len(self.user_ids) + 1 or self.offsets[-1] != len(self.items):
            raise ValueError("offsets do not match items/users")
        for name, arr in self._event_arrays().items():
            if len(arr) != len(self.items):
                raise ValueError(f"per-event array {name!r} is not aligned with items")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return self.catalog.n_items

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def event_user(self) -> np.ndarray:
        """The user index of every event."""
        return np.repeat(np.arange(self.n_users), self.lengths)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def sequences(self) -> list[np.ndarray]:
        return np.split(self.items, self.offsets[1:-1])

    def fingerprint(self) -> str:
        """Who and what this data is about: a hash of its user ids and item ids (not of their events), so the same
        shop's log, re-exported or grown by new events, keeps its fingerprint and its privacy budget."""
        digest = hashlib.sha256()
        for ids in (self.user_ids, self.catalog.raw_ids[1:]):
            digest.update("\x1f".join(sorted(map(str, ids.tolist()))).encode())
            digest.update(b"\x1e")
        return digest.hexdigest()[:32]

    def summary(self) -> dict:
        return {"users": self.n_users, "items": self.n_items, "interactions": self.n_interactions}

    def _event_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"items": self.items}
        if self.timestamps is not None:
            arrays["timestamps"] = self.timestamps
        if self.event_type is not None:
            arrays["event_type"] = self.event_type
        arrays.update({f"context.{k}": v for k, v in self.context.items()})
        return arrays

    def select_events(self, keep: np.ndarray) -> BehaviorData:
        """Keep the events where the boolean mask ``keep`` is true; users keep their order (and may become empty)."""
        counts = np.bincount(self.event_user()[keep], minlength=self.n_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return replace(
            self,
            items=self.items[keep],
            offsets=offsets,
            timestamps=None if self.timestamps is None else self.timestamps[keep],
            event_type=None if self.event_type is None else self.event_type[keep],
            context={k: v[keep] for k, v in self.context.items()},
        )

    def select_users(self, users: np.ndarray) -> BehaviorData:
        """A new BehaviorData holding only ``users`` (indices, in the given order)."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.lengths[users]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        index = _ranges(self.offsets[users], lengths)
        return replace(
            self,
            items=self.items[index],
            offsets=offsets,
            user_ids=self.user_ids[users],
            timestamps=None if self.timestamps is None else self.timestamps[index],
            event_type=None if self.event_type is None else self.event_type[index],
            merchant=None if self.merchant is None else self.merchant[users],
            context={k: v[index] for k, v in self.context.items()},
        )

    def with_merchant(self, merchant: np.ndarray, names: list[str]) -> BehaviorData:
        return replace(self, merchant=np.asarray(merchant, dtype=np.int64), merchant_names=list(names))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each start s and length n, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - seg_starts)


def from_sequences(sequences: list, catalog: ItemCatalog, user_ids=None, **per_user) -> BehaviorData:
    """Build BehaviorData from a list of per-user item-id arrays (already internal ids)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    if user_ids is None:
        user_ids = np.arange(1, len(sequences) + 1)
    return BehaviorData(items=items, offsets=offsets, catalog=catalog, user_ids=np.asarray(user_ids), **per_user)


def catalog_only(catalog: ItemCatalog) -> BehaviorData:
    """A data set with the catalog's items and no users: what a model's shapes need, and nothing private."""
    return BehaviorData(items=np.zeros(0, np.int64), offsets=np.zeros(1, np.int64), catalog=catalog,
                        user_ids=np.zeros(0, np.int64))

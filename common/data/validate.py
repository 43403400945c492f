"""`fedaug validate` and the merchant daemon's start: a behaviour data file checked without training on it.

The file is read by the very loaders training uses (so a malformed file fails here with the same one-line error)
and summarised: users, items, events per type, time range, how long the users' histories are, the users too short
to evaluate, the evaluated users whose held-out test event shares its time with the event before (file order
decides their test target), what loading left out (and the CSV delimiter it found), and the items a shared catalog
does not know (an error: such a file cannot train in a federation numbered by that catalog).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np

from fedaug.common.config import DataSection
from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.loaders import id_index, load_catalog, load_counted
from fedaug.common.data.source import event_schema
from fedaug.common.data.split import MIN_EVALUABLE, tied_test_targets

LENGTH_BINS = (1, 2, 3, 5, 10, 20, 50, 100)
"""Lower edges of the history-length histogram's bins."""


@dataclass(frozen=True)
class DataReport:
    path: str
    format: str
    users: int
    items: int
    events: int
    events_by_type: dict[str, int] | None
    """None where the file has no event types."""
    first_event: str | None
    """ISO-8601 UTC times of the first and last event (None without timestamps)."""
    last_event: str | None
    history_lengths: dict[str, int]
    """Users per history length bin ("3-4": three or four events; "100+": at least 100)."""
    too_short: int
    """Users with fewer events than evaluation needs (they train, but are not scored)."""
    tied_test_targets: int | None
    """Evaluated users whose test event (their last) has the same time as the event before it: which of the two is
    the test target is decided by the file's order (ties are kept in file order). None without timestamps."""
    merchants: int | None
    context: list[str]
    dropped: int | None
    """Events mapped to "drop" by [data.events] (events files)."""
    duplicates: int | None
    """Exact duplicate events, kept once (events files)."""
    delimiter: str | None
    """The events CSV's field separator as detected (',' unless its first line splits on ';', tab or '|')."""
    unknown_catalog_items: int | None
    """Items the configured catalog ([data] catalog) does not list; None without a catalog."""
    fingerprint: str
    """Who and what the data is about (``BehaviorData.fingerprint``): its privacy budget is bound to it."""
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def tied_test_share(self) -> float | None:
        """``tied_test_targets`` over the evaluated users."""
        evaluated = self.users - self.too_short
        return None if self.tied_test_targets is None or not evaluated else self.tied_test_targets / evaluated

    def to_json(self) -> dict:
        return asdict(self) | {"tied_test_share": self.tied_test_share, "ok": self.ok}


def check_data(section: DataSection) -> DataReport:
    """Load ``section``'s file as training would and report on it; DataError where the file is malformed."""
    fmt = section.format or ("amazon-seq" if section.path.suffix == ".txt" else "events")
    data, ingested = load_counted(section.path, section.format, timestamps=section.timestamps,
                                  attributes=section.attributes, texts=section.texts, schema=event_schema(section))
    errors, unknown = [], None
    if section.catalog is not None:
        known = id_index(load_catalog(section.catalog, section.text_columns).raw_ids)
        missing = [raw for raw in data.catalog.raw_ids[1:].tolist() if str(raw) not in known]
        unknown = len(missing)
        if missing:
            errors.append(f"{section.path}: {unknown} item id{'s' * (unknown > 1)} not in the catalog "
                          f"{section.catalog} (first: {missing[0]!r})")
    lengths = data.lengths
    edges = (*LENGTH_BINS, np.inf)
    histogram = {_bin_name(low, high): int(((lengths >= low) & (lengths < high)).sum())
                 for low, high in zip(edges[:-1], edges[1:], strict=True)}
    stamps = data.timestamps
    return DataReport(
        path=str(section.path), format=fmt, users=data.n_users, items=data.n_items, events=data.n_interactions,
        events_by_type=None if data.event_type is None else {
            name: int(n) for name, n in zip(EVENT_TYPES, np.bincount(data.event_type, minlength=len(EVENT_TYPES)),
                                            strict=True)},
        first_event=None if stamps is None or not len(stamps) else _iso(stamps.min()),
        last_event=None if stamps is None or not len(stamps) else _iso(stamps.max()),
        history_lengths=histogram, too_short=int((lengths < MIN_EVALUABLE).sum()),
        tied_test_targets=tied_test_targets(data),
        merchants=None if data.merchant_names is None else len(data.merchant_names), context=sorted(data.context),
        dropped=None if ingested is None else ingested.dropped,
        duplicates=None if ingested is None else ingested.duplicates,
        delimiter=None if ingested is None else ingested.delimiter,
        unknown_catalog_items=unknown, fingerprint=data.fingerprint(), errors=errors)


def _bin_name(low: float, high: float) -> str:
    if np.isinf(high):
        return f"{int(low)}+"
    return str(int(low)) if high == low + 1 else f"{int(low)}-{int(high) - 1}"


def _iso(seconds) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

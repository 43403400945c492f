"""Per-event side features: what the model's behaviour and context vectors are made from.

Every event gets one row of ``FEATURE_CODES`` (small integer codes, 0 = unknown) followed by the chosen numeric
context columns:

- ``behaviour``: 1 + the event's EVENT_TYPES index (a view, a cart, a purchase…);
- ``gap``: 1 + floor(log2(1 + seconds since the user's previous event)), capped at GAP_BUCKETS (0 for a user's
  first event): seconds, minutes, hours, days and months land in different buckets;
- ``hour``, ``weekday``: 1 + hour of day and day of week (UTC, Monday = 1);
- numeric context columns (``model.context_columns``): asinh of the value. asinh is linear near 0 and
  logarithmic for large values and needs no statistics of anyone's data, so every merchant and the serving side
  normalise the same way and nothing about a merchant's distribution is needed to share a model.

The model reads position t's *behaviour* from event t and its *context* from event t + 1: the moment the
prediction is for. That moment is known when a recommendation is asked for (the request's time, the gap since the
shopper's last event) without knowing the item — at evaluation it is the held-out event's time, at serving the
request's. ``input_rows`` does that shift, in one place, for training, evaluation and serving alike.
"""

from __future__ import annotations

import numpy as np

from fedaug.common.data import EVENT_TYPES, BehaviorData
from fedaug.common.errors import ConfigError

FEATURE_CODES = ("behaviour", "gap", "hour", "weekday")
GAP_BUCKETS = 32
"""log2 buckets of the gap in seconds: 2**32 s is 136 years, so no real gap is capped."""
CODE_SIZES = {"behaviour": len(EVENT_TYPES) + 1, "gap": GAP_BUCKETS + 1, "hour": 25, "weekday": 8}
"""Vocabulary of each code, the unknown code 0 included (embedding table sizes)."""
BEHAVIOUR_CODES = (0,)
CONTEXT_CODES = (1, 2, 3)
"""Columns of a feature row the behaviour vector and the context vector are made from; numeric columns follow
the codes."""
N_CODES = len(FEATURE_CODES)


def event_features(data: BehaviorData, columns: tuple[str, ...] = ()) -> np.ndarray:
    """``[events, N_CODES + len(columns)]`` float32 rows aligned with ``data.items`` (zeros where the data has no
    event types or timestamps). ``columns``: numeric context columns of ``data.context`` to include."""
    missing = [c for c in columns if c not in data.context]
    if missing:
        found = ", ".join(sorted(data.context)) or "none"
        raise ConfigError(f"model.context_columns: {missing[0]!r} is not a context column of the data (found: "
                          f"{found})")
    rows = np.zeros((data.n_interactions, N_CODES + len(columns)), dtype=np.float32)
    _fill_codes(rows, data.event_type, data.timestamps, data.offsets[:-1][data.lengths > 0])
    for i, column in enumerate(columns):
        rows[:, N_CODES + i] = np.arcsinh(data.context[column].astype(np.float64))
    return rows


def history_rows(event_types: np.ndarray | None, timestamps: np.ndarray | None, at: int | None,
                 n: int, width: int = N_CODES) -> np.ndarray:
    """One shopper's ``n`` history events (oldest first; their EVENT_TYPES indices and Unix-second times, either
    may be None) and the moment asked about (``at``, Unix seconds; None: unknown) as ``n + 1`` feature rows: what
    a served model reads. Numeric context columns stay 0 (asinh(0): the neutral value)."""
    rows = np.zeros((n + 1, width), dtype=np.float32)
    types = None if event_types is None else np.append(np.asarray(event_types, np.int64), 0)
    stamps = None
    if timestamps is not None and at is not None:
        stamps = np.append(np.asarray(timestamps, np.int64), at)
    _fill_codes(rows, types, stamps, np.array([0]))
    if timestamps is not None and at is None:  # the history's own times are known, the moment's are not
        _fill_codes(rows[:n], None, np.asarray(timestamps, np.int64), np.array([0]))
    elif timestamps is None and at is not None:  # the moment's hour and weekday, no gap
        _fill_codes(rows[n:], None, np.array([at]), np.array([0]))
    return rows


def _fill_codes(rows: np.ndarray, event_type: np.ndarray | None, timestamps: np.ndarray | None,
                first: np.ndarray) -> None:
    """Write the behaviour and time codes of flat events into ``rows``; ``first``: each user's first event (no
    gap before it)."""
    if event_type is not None:
        rows[:, 0] = np.asarray(event_type, np.float32) + 1
    if timestamps is not None and len(timestamps):
        stamps = timestamps.astype(np.int64)
        gaps = np.diff(stamps, prepend=stamps[0]).clip(min=0)
        gap_code = 1 + np.minimum(np.floor(np.log2(1.0 + gaps)), GAP_BUCKETS - 1)
        gap_code[first] = 0  # nothing before a user's first event
        rows[:, 1] = gap_code
        rows[:, 2] = 1 + (stamps // 3600) % 24
        rows[:, 3] = 1 + (stamps // 86400 + 3) % 7  # 1970-01-01 was a Thursday


def user_rows(rows: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Each user's first ``lengths[u]`` rows of the flat ``rows`` whose users start at ``offsets[u]``."""
    return [rows[start : start + n] for start, n in zip(offsets.tolist(), lengths.tolist(), strict=True)]


def input_rows(rows: np.ndarray, n_inputs: int) -> np.ndarray:
    """The model's side input ``[n_inputs, F]`` for a history of ``n_inputs`` items whose events have ``rows``:
    behaviour from each position's own event, context from the next one (the moment being predicted for). Rows
    beyond the history (``len(rows)`` = n_inputs + 1: the query moment) give the last position its context; with
    fewer rows the positions they lack stay unknown (0)."""
    out = np.zeros((n_inputs, rows.shape[1]), dtype=np.float32)
    behaviour = list(BEHAVIOUR_CODES)
    context = [c for c in range(rows.shape[1]) if c not in BEHAVIOUR_CODES]
    own = rows[:n_inputs, behaviour]
    out[: len(own), behaviour] = own
    following = rows[1 : n_inputs + 1, context]
    out[: len(following), context] = following
    return out

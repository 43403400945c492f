"""`fedaug recommend --users FILE`: one CSV row per user of a behaviour file, written atomically."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.loaders import load
from fedaug.common.recommend.recommender import Activity, Recommender

BATCH = 256


def recommend_file(recommender: Recommender, users: Path, out: Path | None, *, fmt: str | None = None, k: int = 10,
                   query: str | None = None, exclude_seen: bool = True,
                   on_batch: Callable[[int, int], None] | None = None) -> int:
    """Recommend for every user of ``users`` (its histories in the shop's ids); write ``user,items,scores`` rows
    (items and scores space-separated, best first) to ``out`` or stdout; return the number of users. History items
    the bundle's catalog does not know are left out and counted in an ``unknown`` column (a user left with none
    gets the bundle's popular items). The file is read with the recommender's mapping (the shop's column and event
    names the bundle was trained with, or ``--config``'s); its event types and times go with the histories
    (models with behaviour and context vectors read them)."""
    data = load(users, fmt, schema=recommender.schema)
    raw = data.catalog.raw_ids
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["user", "items", "scores", "unknown"])
    for start in range(0, data.n_users, BATCH):
        rows = range(start, min(start + BATCH, data.n_users))
        histories, unknown, activities = [], [], []
        for user in rows:
            events = slice(data.offsets[user], data.offsets[user + 1])
            items = [str(i) for i in raw[data.items[events]].tolist()]
            known = [n for n, i in enumerate(items) if i in recommender.index]
            histories.append([items[n] for n in known])
            unknown.append(len(items) - len(known))
            activities.append(Activity(
                events=None if data.event_type is None else [EVENT_TYPES[t] for t in data.event_type[events][known]],
                timestamps=None if data.timestamps is None else data.timestamps[events][known].tolist()))
        results = recommender.recommend_many(histories, k=k, exclude_seen=exclude_seen,
                                             queries=[query] * len(histories) if query else None,
                                             activities=activities)
        for user, recs, missing in zip(rows, results, unknown, strict=True):
            writer.writerow([data.user_ids[user], " ".join(r.item for r in recs),
                             " ".join(f"{r.score:.5g}" for r in recs), missing])
        if on_batch:
            on_batch(rows.stop, data.n_users)
    if out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        write_bytes_atomic(out, buffer.getvalue().encode())
    return data.n_users

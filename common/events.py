"""Event logs (CSV or Parquet) as shops export them: one row per event, the shop's own column names and event
names (mapped by ``EventSchema``: [data.columns] and [data.events]), any string or integer ids.

pyarrow reads the file (multi-threaded CSV, Parquet); every column is then checked and converted with vectorised
code, so a bad cell is named by its line (CSV) or row (Parquet) and column. A CSV that pyarrow cannot parse at all
(ragged rows, bad encoding, binary data) is read once more line by line, only to locate the fault.

Ids: a column whose every id is a decimal integer (no leading zeros) keeps integer ids (item 0 is reserved for
padding); any other column keeps its ids as text (SKUs, ASINs, UUIDs, ``u30644``). Internal numbers follow the ids'
natural order ("i2" before "i10"), so ids written as prefixed integers number exactly as the integers would.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .data import EVENT_TYPES, BehaviorData, ItemCatalog
from .errors import DataError

DROP = "drop"
"""An event name mapped to this is left out (e.g. page leaves)."""
TIMESTAMP_UNITS = ("auto", "s", "ms", "iso")
MAX_ID_CHARS = 256
MS_FROM = 1e11
"""Unix times at or above this are milliseconds when the unit is "auto" (1e11 s is the year 5138)."""


@dataclass(frozen=True)
class EventSchema:
    """Which of the file's columns is what, and what its event names mean."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    event_type: str = "event_type"
    """Used when the file has it."""
    merchant: str = "merchant_id"
    """Used when the file has it: the shop each user belongs to (simulations can partition by it)."""
    context: tuple[str, ...] | None = None
    """Extra per-event context columns; None: every column not named above."""
    timestamp_unit: str = "auto"
    """auto (numbers: seconds, or milliseconds from 1e11 on; text: ISO-8601) | s | ms | iso"""
    names: tuple[str, ...] | None = None
    """A CSV without a header line (Taobao's UserBehavior.csv): its columns' names, in order."""
    events: dict[str, str] = field(default_factory=dict)
    """The shop's event names -> one of EVENT_TYPES or "drop"; the standard names are always understood."""

    def stage(self) -> dict[str, int]:
        """Lower-cased event name (or the stage's index) -> EVENT_TYPES index, -1 to drop."""
        known = {name: i for i, name in enumerate(EVENT_TYPES)} | {str(i): i for i in range(len(EVENT_TYPES))}
        return known | {name.strip().lower(): -1 if target == DROP else EVENT_TYPES.index(target)
                        for name, target in self.events.items()}


@dataclass(frozen=True)
class Ingested:
    """What loading an events file left out."""

    rows: int
    """Rows in the file."""
    dropped: int
    """Events whose name [data.events] maps to "drop"."""
    duplicates: int
    """Exact duplicate events (same user, item, time, type and context), kept once."""


def load_events(path, schema: EventSchema | None = None, *, check_file) -> BehaviorData:
    """The events of ``path`` as BehaviorData: users by id, their events in time order (ties in file order),
    exact duplicate rows dropped. ``check_file``: the size check every loader applies before reading."""
    return load_events_counted(path, schema, check_file=check_file)[0]


def load_events_counted(path, schema: EventSchema | None = None, *, check_file) -> tuple[BehaviorData, Ingested]:
    """``load_events`` and what it left out."""
    path, schema = Path(path), schema or EventSchema()
    table, row_offset, unit = _read(path, check_file, schema.names)
    columns = table.column_names
    missing = [c for c in (schema.user, schema.item, schema.timestamp) if c not in columns]
    if missing:
        raise DataError(path, f"missing required column {missing[0]!r} (found: {', '.join(columns)})",
                        1 if unit == "line" else None)
    if table.num_rows == 0:
        raise DataError(path, "file has a header but no rows")

    def fail(row: int, column: str, message: str):
        raise DataError(path, message, int(row) + row_offset, column, unit)

    item_codes, items = _id_codes(table[schema.item], schema.item, fail, padding=True)
    user_codes, users = _id_codes(table[schema.user], schema.user, fail, padding=False)
    frame = pd.DataFrame({"user": user_codes, "item": item_codes,
                          "ts": _timestamps(table[schema.timestamp], schema, fail), "row": np.arange(table.num_rows)})
    if schema.event_type in columns:
        frame["event"] = _event_codes(table[schema.event_type], schema, fail)
        frame = frame[frame["event"] >= 0]
    merchant_names = None
    if schema.merchant in columns:
        merchant_raw = _text(table[schema.merchant])
        empty = np.flatnonzero(merchant_raw == "")
        if len(empty):
            fail(empty[0], schema.merchant, "empty merchant id")
        merchant_names = sorted(set(merchant_raw.tolist()))
        codes = pd.Categorical(merchant_raw, categories=merchant_names).codes.astype(np.int64)
        frame["merchant"] = codes[frame["row"].to_numpy()]
    named = {schema.user, schema.item, schema.timestamp, schema.event_type, schema.merchant}
    context = schema.context if schema.context is not None else tuple(c for c in columns if c not in named)
    for column in context:
        if column not in columns:
            raise DataError(path, f"context column {column!r} is not in the file (found: {', '.join(columns)})",
                            1 if unit == "line" else None)
        frame[f"ctx:{column}"] = _context(table[column], column, fail)[frame["row"].to_numpy()]
    if frame.empty:
        raise DataError(path, "every event was dropped by the event mapping ([data.events])")

    # Duplicated events are dropped; time order within a user, ties in file order.
    kept = len(frame)
    frame = frame.drop_duplicates(subset=[c for c in frame.columns if c != "row"])
    ingested = Ingested(rows=table.num_rows, dropped=table.num_rows - kept, duplicates=kept - len(frame))
    frame = frame.sort_values(["user", "ts", "row"], kind="stable")
    if "merchant" in frame:
        per_user = frame.groupby("user")["merchant"].nunique()
        if (per_user > 1).any():
            user = per_user.index[np.argmax(per_user.to_numpy() > 1)]
            rows = frame.loc[frame["user"] == user, "row"].to_numpy()
            fail(rows.max(), schema.merchant, f"user {users[user]} appears under more than one merchant")

    # Users and items without a kept event (all dropped) are left out and the rest renumbered.
    kept_users, user_index = np.unique(frame["user"].to_numpy(), return_inverse=True)
    kept_items, item_index = np.unique(frame["item"].to_numpy(), return_inverse=True)
    lengths = np.bincount(user_index, minlength=len(kept_users))
    merchant = None
    if "merchant" in frame:
        merchant = np.zeros(len(kept_users), dtype=np.int64)
        merchant[user_index] = frame["merchant"].to_numpy()
    return BehaviorData(
        items=item_index.astype(np.int64) + 1,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        catalog=ItemCatalog(raw_ids=np.concatenate([_padding(items), items[kept_items]])),
        user_ids=users[kept_users],
        timestamps=frame["ts"].to_numpy(np.int64),
        event_type=frame["event"].to_numpy(np.int8) if "event" in frame else None,
        merchant=merchant,
        merchant_names=merchant_names,
        context={c[4:]: frame[c].to_numpy() for c in frame.columns if c.startswith("ctx:")},
    ), ingested


# reading ----------------------------------------------------------------------------------------------------------


def _read(path: Path, check_file, names: tuple[str, ...] | None) -> tuple[pa.Table, int, str]:
    """The file as an Arrow table, the offset from row index to line (CSV) or row (Parquet) number, the unit.
    ``names``: a headerless CSV's column names."""
    check_file(path)
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path), 1, "row"
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise DataError(path, f"not a readable Parquet file ({type(exc).__name__})") from None
    import pyarrow.csv as pacsv

    header = _header(path) if names is None else list(names)
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=list(names) if names else None),
                               convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                                                    strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        _locate_csv_fault(path, names)  # raises a located DataError for what pyarrow refused
        raise DataError(path, f"malformed CSV ({str(exc).splitlines()[0]})") from None
    return table.rename_columns([c.strip() for c in table.column_names]), 1 if names else 2, "line"


def _header(path: Path) -> list[str]:
    """The CSV header's column names (each once)."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        _locate_csv_fault(path)
        raise
    if "\x00" in text:
        _locate_csv_fault(path)
    header = [c.strip() for c in next(csv.reader([text]), [])]
    if not any(header):
        raise DataError(path, "file is empty" if not text.strip() else "the header names no columns", 1)
    duplicated = [c for c in header if header.count(c) > 1]
    if duplicated:
        raise DataError(path, f"column {duplicated[0]!r} appears twice in the header", 1)
    return header


def _locate_csv_fault(path: Path, names: tuple[str, ...] | None = None) -> None:
    """Read ``path`` line by line to name what makes it unreadable (encoding, binary data, a ragged line)."""
    from .loaders import read_text_lines

    lines = read_text_lines(path)  # encoding, binary, emptiness and line-length faults, located
    try:
        pd.read_csv(io.StringIO("\n".join(lines)), dtype=str, keep_default_na=False,
                    header=None if names else "infer", names=list(names) if names else None)
    except pd.errors.ParserError as exc:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if match:
            raise DataError(path, f"ragged line: {match.group(3)} fields, header has {match.group(1)}",
                            int(match.group(2))) from None
        raise DataError(path, f"malformed CSV ({str(exc).splitlines()[0]})") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty") from None


# columns ----------------------------------------------------------------------------------------------------------


def _text(column: pa.ChunkedArray) -> np.ndarray:
    """A column as stripped strings (object array); nulls as ""."""
    values = pc.utf8_trim_whitespace(pc.cast(column, pa.string())) if not pa.types.is_string(column.type) else \
        pc.utf8_trim_whitespace(column)
    return np.asarray(pc.fill_null(values, "").to_numpy(zero_copy_only=False), dtype=object)


def _id_codes(column: pa.ChunkedArray, name: str, fail, *, padding: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row's id as a code into the sorted distinct ids, and those ids (int64 when every id is a decimal
    integer, else text). ``padding``: integer id 0 is reserved (items)."""
    if pa.types.is_integer(column.type):
        ids = column.to_numpy()
        if (ids < 0).any():
            fail(np.flatnonzero(ids < 0)[0], name, "integer ids must be non-negative")
    else:
        text = _text(column)
        lengths = np.fromiter(map(len, text), dtype=np.int64, count=len(text))
        control = pc.match_substring_regex(pa.array(text, pa.string()), r"[\x00-\x1f\x7f]").to_numpy(
            zero_copy_only=False)
        bad = np.flatnonzero((lengths == 0) | (lengths > MAX_ID_CHARS) | control)
        if len(bad):
            row = bad[0]
            fail(row, name, "empty id" if lengths[row] == 0 else f"id longer than {MAX_ID_CHARS} characters"
                 if lengths[row] > MAX_ID_CHARS else f"id {text[row][:40]!r} holds a control character")
        ids = typed_ids(text)
    if ids.dtype != object and padding and (ids == 0).any():
        fail(np.flatnonzero(ids == 0)[0], name, "item id 0 is reserved for padding")
    codes, uniques = pd.factorize(ids)
    order = id_order(np.asarray(uniques))
    return np.argsort(order)[codes].astype(np.int64), np.asarray(uniques)[order]


INTEGER_ID = r"^(0|[1-9][0-9]{0,17})$"
"""An id that is an integer: at most 18 digits, no leading zeros (zero-padded SKUs stay text, so "007" and "7"
remain two items)."""


def typed_ids(text: np.ndarray) -> np.ndarray:
    """Ids given as text: int64 when every one is an integer (``INTEGER_ID``), else the text."""
    digits = pc.match_substring_regex(pa.array(text, pa.string()), INTEGER_ID)
    return text.astype(np.int64) if pc.all(digits).as_py() is not False else text


def sorted_ids(text: list[str]) -> np.ndarray:
    """Distinct ids given as text, typed (``typed_ids``) and in the order internal numbers follow."""
    ids = pd.unique(typed_ids(np.asarray(text, dtype=object)))
    return np.asarray(ids)[id_order(np.asarray(ids))]


def id_order(ids: np.ndarray) -> np.ndarray:
    """Indices sorting distinct ids: integers by value; text naturally, each leading run of digits compared as a
    number ("i2" before "i10")."""
    if ids.dtype != object:
        return np.argsort(ids, kind="stable")
    parts = pd.Series(ids, dtype=object).str.extract(r"^(\D*)(\d*)(.*)$", flags=re.DOTALL)
    key = parts[0] + parts[1].str.lstrip("0").str.len().astype(str).str.zfill(3) + parts[1].str.lstrip("0") + \
        "\x00" + parts[2] + "\x00" + pd.Series(ids, dtype=object)
    return np.argsort(key.to_numpy(dtype=object), kind="stable")


def _padding(ids: np.ndarray) -> np.ndarray:
    return np.zeros(1, dtype=np.int64) if ids.dtype != object else np.array([""], dtype=object)


def _timestamps(column: pa.ChunkedArray, schema: EventSchema, fail) -> np.ndarray:
    """Unix seconds (int64). Numbers are seconds or milliseconds (``timestamp_unit``, detected under "auto"),
    text is ISO-8601 (a zone given or UTC)."""
    name, unit = schema.timestamp, schema.timestamp_unit
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("s", column.type.tz)).cast(pa.int64()).to_numpy()
    text = pd.Series(_text(column), dtype=object)
    numeric = pd.to_numeric(text, errors="coerce") if unit != "iso" else pd.Series(np.nan, index=text.index)
    if unit == "iso" or (unit == "auto" and numeric.isna().all()):
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        if parsed.isna().any():
            bad = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            fail(bad, name, f"not an ISO-8601 timestamp: {text.iloc[bad][:40]!r}")
        return parsed.dt.tz_convert(None).astype("datetime64[s]").astype(np.int64).to_numpy()
    values = numeric.to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        fail(row, name, f"not a Unix time{' or ISO-8601 timestamp' if unit == 'auto' else ''}: {text.iloc[row][:40]!r}")
    if unit == "ms" or (unit == "auto" and values.max() >= MS_FROM):
        values = values / 1000
    if (values >= MS_FROM).any():
        row = int(np.flatnonzero(values >= MS_FROM)[0])
        fail(row, name, f"Unix time {numeric.iloc[row]:g} is out of range (expected seconds or milliseconds "
                        "since 1970)")
    return values.astype(np.int64)


def _event_codes(column: pa.ChunkedArray, schema: EventSchema, fail) -> np.ndarray:
    """EVENT_TYPES index per row, -1 for events mapped to "drop"."""
    text = pd.Series(_text(column), dtype=object).str.lower()
    codes = text.map(schema.stage())
    if codes.isna().any():
        bad = int(np.flatnonzero(codes.isna().to_numpy())[0])
        fail(bad, schema.event_type, f"unknown event type {text.iloc[bad][:40]!r} (expected one of "
                                     f"{', '.join(EVENT_TYPES)}, or map it in [data.events])")
    return codes.to_numpy(np.int8)


def _context(column: pa.ChunkedArray, name: str, fail) -> np.ndarray:
    """Numeric context stays numeric; text context (e.g. device) becomes category codes in sorted order."""
    text = pd.Series(_text(column), dtype=object)
    numeric = pd.to_numeric(text, errors="coerce")
    if numeric.notna().all():
        out = numeric.to_numpy(dtype=float)
        if not np.isfinite(out).all():
            fail(int(np.flatnonzero(~np.isfinite(out))[0]), name, "context value is not a finite number")
        return out.astype(np.float32)
    return pd.Categorical(text, categories=sorted(set(text.tolist()))).codes.astype(np.float32)

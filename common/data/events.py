"""Event logs (CSV or Parquet) as shops export them: one row per event, the shop's own column names and event
names (mapped by ``EventSchema``: [data.columns] and [data.events]), any string or integer ids.

pyarrow reads the file (multi-threaded CSV, Parquet); every column is then checked and converted with vectorised
code, the columns in parallel, so a bad cell is named by its line (CSV) or row (Parquet) and column. Ids are hashed
once and stay in Arrow; only the kept distinct ids become Python values. A CSV that pyarrow cannot parse at all
(ragged rows, bad encoding, binary data) is read once more line by line, only to locate the fault.

Ids: a column whose every id is a decimal integer (no leading zeros) keeps integer ids (item 0 is reserved for
padding); any other column keeps its ids as text (SKUs, ASINs, UUIDs, ``u30644``). Internal numbers follow the ids'
natural order ("i2" before "i10"), so ids written as prefixed integers number exactly as the integers would.
"""

from __future__ import annotations

import csv
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedaug.common.config import DROP
from fedaug.common.data import EVENT_TYPES, BehaviorData, ItemCatalog
from fedaug.common.data.files import check_file_size, read_text_lines
from fedaug.common.errors import DataError

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
    delimiter: str | None = None
    """The CSV's field separator (detected: ',' unless the first line has none and splits on ';', tab or '|');
    None for Parquet."""


def load_events(path, schema: EventSchema | None = None) -> BehaviorData:
    """The events of ``path`` as BehaviorData: users by id, their events in time order (ties in file order),
    exact duplicate rows dropped; a file over the size limit (common/data/files.py) is refused unread."""
    return load_events_counted(path, schema)[0]


def load_events_counted(path, schema: EventSchema | None = None) -> tuple[BehaviorData, Ingested]:
    """``load_events`` and what it left out."""
    path, schema = Path(path), schema or EventSchema()
    table, row_offset, unit, delimiter = _read(path, schema.names, {schema.event_type, schema.merchant})
    columns = table.column_names
    missing = [c for c in (schema.user, schema.item, schema.timestamp) if c not in columns]
    if missing:
        raise DataError(path, f"missing required column {missing[0]!r} (found: {', '.join(columns)})",
                        1 if unit == "line" else None)
    if table.num_rows == 0:
        raise DataError(path, "file has a header but no rows")

    def fail(row: int, column: str, message: str):
        raise DataError(path, message, int(row) + row_offset, column, unit)

    # One job per column, each checking and typing it; a fault is reported for the first column in this order.
    jobs = {"item": partial(_id_codes, table[schema.item], schema.item, fail, padding=True),
            "user": partial(_id_codes, table[schema.user], schema.user, fail, padding=False),
            "ts": partial(_timestamps, table[schema.timestamp], schema, fail)}
    if schema.event_type in columns:
        jobs["event"] = partial(_event_codes, table[schema.event_type], schema, fail)
    if schema.merchant in columns:
        jobs["merchant"] = partial(_merchant_codes, table[schema.merchant], schema.merchant, fail)
    named = {schema.user, schema.item, schema.timestamp, schema.event_type, schema.merchant}
    context = schema.context if schema.context is not None else tuple(c for c in columns if c not in named)
    for column in context:
        jobs[f"ctx:{column}"] = partial(_context, table[column], column, fail) if column in columns else partial(
            _raise, DataError(path, f"context column {column!r} is not in the file (found: {', '.join(columns)})",
                              1 if unit == "line" else None))
    rows = table.num_rows
    del table  # each job holds its text column, whose memory goes back when the job is done
    with ThreadPoolExecutor(pa.cpu_count()) as pool:  # Arrow and numpy release the GIL
        inputs = ("ts", "user")  # the sort's, submitted first
        futures = {name: pool.submit(jobs[name]) for name in [*inputs, *(n for n in jobs if n not in inputs)]}
        names = list(jobs)
        del jobs
        try:  # time order within a user, ties in file order: sorted while the other columns are converted
            order, user, ts = _user_time_order(futures["ts"].result(), lambda: futures["user"].result()[0])
        except DataError:
            pass  # raised below unless an earlier column's fault comes first
        events = {name: futures.pop(name).result() for name in names}
        (item_codes, items), users = events.pop("item"), events.pop("user")[1]
        merchant_names = None
        if "merchant" in events:
            events["merchant"], merchant_names = events["merchant"]
        if "event" in events and (events["event"] < 0).any():
            kept = events["event"][order] >= 0
            order, user, ts = order[kept], user[kept], ts[kept]
            if not len(order):
                raise DataError(path, "every event was dropped by the event mapping ([data.events])")
        del events["ts"]
        events = {"item": item_codes} | events
        duplicated = _duplicated(events, order, user, ts)
        unique = order[~duplicated] if duplicated.any() else order  # each kept event's row in the file
        ingested = Ingested(rows=rows, dropped=rows - len(order), duplicates=len(order) - len(unique),
                            delimiter=delimiter)
        if len(unique) < len(order):
            user, ts = user[~duplicated], ts[~duplicated]
        events = dict(zip(events, pool.map(lambda values: np.take(values, unique, mode="clip"), events.values()),
                          strict=True))  # clip: unchecked, unbuffered (the rows are in range)

    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    merchant = None
    if "merchant" in events:
        per_user = events["merchant"][starts]
        mixed = np.flatnonzero(np.minimum.reduceat(events["merchant"], starts) !=
                               np.maximum.reduceat(events["merchant"], starts))
        if len(mixed):
            first, end = starts[mixed[0]], np.r_[starts, len(user)][mixed[0] + 1]
            fail(unique[first:end].max(), schema.merchant,
                 f"user {_ids_at(users, user[first:first + 1])[0]} appears under more than one merchant")
        merchant = per_user.astype(np.int64)

    # Users and items without a kept event (all dropped) are left out and the rest renumbered.
    kept_items, item_ids = _renumber(events["item"], len(items))
    return BehaviorData(
        items=item_ids,
        offsets=np.r_[starts, len(user)].astype(np.int64),
        catalog=ItemCatalog(raw_ids=np.concatenate([_padding(items), _ids_at(items, kept_items)])),
        user_ids=_ids_at(users, user[starts]),
        timestamps=ts.astype(np.int64, copy=False),
        event_type=events["event"].astype(np.int8, copy=False) if "event" in events else None,
        merchant=merchant,
        merchant_names=merchant_names,
        context={name[4:]: values for name, values in events.items() if name.startswith("ctx:")},
    ), ingested


def _user_time_order(ts: np.ndarray, user_codes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows in stable (user, time) order, their users and their times; ``user_codes()`` gives each row's user
    (int32), called when the sort needs them (after the pass over times where there are two). Each sort is a plain
    sort of distinct packed keys (the row or position in the low bits keeps ties in order): user, time and row in
    one key where they surely fit 63 bits (a user code has at most as many bits as a row number), else two passes,
    least significant first (time and row, then user and position); lexsort beyond. Large arrays are reused where
    done with: each new one costs more in page faults than the sorts."""
    row_bits = max(len(ts) - 1, 1).bit_length()
    low = int(ts.min())
    ts_bits = (int(ts.max()) - low).bit_length()
    if max(row_bits, ts_bits) + row_bits > 63:
        user = user_codes()
        order = np.lexsort((ts, user))
        return order, user[order], ts[order]
    positions = np.arange(len(ts), dtype=np.int64)
    key = ts - low
    key <<= row_bits
    if 2 * row_bits + ts_bits <= 63:
        key |= np.left_shift(user_codes(), ts_bits + row_bits, dtype=np.int64)
        user = np.right_shift(_sorted_with(key, positions), ts_bits + row_bits, out=positions)
        order = _low_bits(key, row_bits)
        return order, user, np.take(ts, order, mode="clip")
    by_time = _low_bits(_sorted_with(key, positions), row_bits)
    key = np.left_shift(np.take(user_codes(), by_time, mode="clip"), row_bits, dtype=np.int64)
    user = np.right_shift(_sorted_with(key, positions), row_bits, out=positions)  # positions are done with
    order = np.take(by_time, _low_bits(key, row_bits), mode="clip")
    return order, user, np.take(ts, order, out=by_time, mode="clip")  # so is by_time


def _sorted_with(key: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``key`` (its low bits free) with ``positions`` in its low bits, sorted in place: one sort of distinct values,
    numpy's fastest, is a stable argsort whose result the low bits hold."""
    key |= positions
    key.sort()
    return key


def _low_bits(key: np.ndarray, bits: int) -> np.ndarray:
    """``key``'s low ``bits``, in place."""
    key &= (1 << bits) - 1
    return key


def _duplicated(events: dict[str, np.ndarray], order: np.ndarray, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """For the events at ``order`` (rows in (user, time) order, whose ``user`` and ``ts`` are given): which equal an
    earlier one in everything. Only events sharing their user and time with a neighbour are compared."""
    tie = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
    candidates = np.flatnonzero(np.r_[False, tie] | np.r_[tie, False])
    duplicated = np.zeros(len(order), dtype=bool)
    if len(candidates):
        rows = order[candidates]
        fields = pd.DataFrame({"user": user[candidates], "ts": ts[candidates]} |
                              {name: values[rows] for name, values in events.items()})
        duplicated[candidates] = fields.duplicated().to_numpy()
    return duplicated


def _renumber(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The codes in use (sorted) and each code's place among them, counted from 1 (int64)."""
    used = np.zeros(n, dtype=bool)
    used[codes] = True
    return np.flatnonzero(used), np.cumsum(used, dtype=np.int64)[codes]


# reading ----------------------------------------------------------------------------------------------------------


def _read(path: Path, names: tuple[str, ...] | None,
          dictionary_columns: set[str]) -> tuple[pa.Table, int, str, str | None]:
    """The file as an Arrow table, the offset from row index to line (CSV) or row (Parquet) number, the unit, the
    CSV's delimiter. ``names``: a headerless CSV's column names; ``dictionary_columns``: columns of a few distinct
    values (event names, merchants), read as Arrow dictionaries."""
    check_file_size(path)
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            text = [f.name for f in pq.read_schema(path) if f.name in dictionary_columns and pa.types.is_string(f.type)]
            return pq.read_table(path, read_dictionary=text), 1, "row", None
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise DataError(path, f"not a readable Parquet file ({type(exc).__name__})") from None
    import pyarrow.csv as pacsv

    first = _first_line(path)
    delimiter = _delimiter(first)
    header = _header(path, first, delimiter) if names is None else list(names)
    # Every column is read as text (checked and typed below, with located errors), in pyarrow's default blocks.
    # Columns of a few distinct values straight into Arrow dictionaries (one per block, cheap to unify); ids as
    # plain text, hashed once later (their per-block dictionaries cost more to unify: 10M events, 500k users).
    types = {c: pa.dictionary(pa.int32(), pa.string()) if c in dictionary_columns else pa.string() for c in header}
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=list(names) if names else None),
                               parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        _locate_csv_fault(path, names, delimiter)  # raises a located DataError for what pyarrow refused
        raise DataError(path, f"malformed CSV ({str(exc).splitlines()[0]})") from None
    return table.rename_columns([c.strip() for c in table.column_names]), 1 if names else 2, "line", delimiter


def _first_line(path: Path) -> str:
    """The CSV's first line (its header, or a headerless file's first row) as text."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        _locate_csv_fault(path)
        raise
    if "\x00" in text:
        _locate_csv_fault(path)
    return text


def _delimiter(first_line: str) -> str:
    """',' unless the first line holds none and csv.Sniffer finds it ';', tab or '|' separated (spreadsheets in
    comma-decimal locales write ';')."""
    if "," in first_line:
        return ","
    try:
        return csv.Sniffer().sniff(first_line, delimiters=";\t|").delimiter
    except csv.Error:
        return ","


def _header(path: Path, text: str, delimiter: str) -> list[str]:
    """The CSV header's column names (each once)."""
    header = [c.strip() for c in next(csv.reader([text], delimiter=delimiter), [])]
    if not any(header):
        raise DataError(path, "file is empty" if not text.strip() else "the header names no columns", 1)
    duplicated = [c for c in header if header.count(c) > 1]
    if duplicated:
        raise DataError(path, f"column {duplicated[0]!r} appears twice in the header", 1)
    return header


def _locate_csv_fault(path: Path, names: tuple[str, ...] | None = None, delimiter: str = ",") -> None:
    """Read ``path`` line by line to name what makes it unreadable (encoding, binary data, a ragged line)."""
    lines = read_text_lines(path)  # encoding, binary, emptiness and line-length faults, located
    try:
        pd.read_csv(io.StringIO("\n".join(lines)), sep=delimiter, dtype=str, keep_default_na=False,
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


def _encoded(column: pa.ChunkedArray) -> tuple[list[np.ndarray], pa.Array, np.ndarray | None]:
    """The column dictionary-encoded: each chunk's indices, the distinct stripped values (Arrow strings; null as
    ""), and where stripping made values equal, the index of each dictionary entry among those values (None where
    the indices point at them already; ``_gathered`` maps the rows). One hash pass over the column; only the
    distinct values are stripped and checked (a 10-million-row id column holds a few hundred thousand)."""
    if column.null_count:
        column = pc.fill_null(pc.cast(column, pa.string()), "")
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    dictionary = column.chunk(0).dictionary
    # dictionary_encode gives every chunk of a column one dictionary (its buffers shared, so equals is immediate);
    # other dictionaries (a Parquet file's own) are unified.
    if not all(chunk.dictionary.equals(dictionary) for chunk in column.chunks[1:]):
        column = column.unify_dictionaries()
        dictionary = column.chunk(0).dictionary
    chunks = [chunk.indices.to_numpy() for chunk in column.chunks]
    values = pc.fill_null(pc.utf8_trim_whitespace(pc.cast(dictionary, pa.string())), "")
    if pc.count_distinct(values).as_py() < len(values):  # values that differed only in spaces become one
        merged = pc.dictionary_encode(values)
        return chunks, merged.dictionary, merged.indices.to_numpy()
    return chunks, values, None


def _gathered(table: np.ndarray | None, chunks: list[np.ndarray]) -> np.ndarray:
    """``table`` at each index of ``chunks`` (the indices themselves where ``table`` is None), as one array: a
    single pass, no intermediate copy."""
    if table is None:
        return np.concatenate(chunks)
    out = np.empty(sum(map(len, chunks)), dtype=table.dtype)
    at = 0
    for chunk in chunks:
        np.take(table, chunk, out=out[at:at + len(chunk)], mode="clip")  # clip: unchecked, unbuffered
        at += len(chunk)
    return out


def _distinct(column: pa.ChunkedArray, *, ordered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's index into the column's distinct stripped values, and those values (object array; null as "";
    sorted if ``ordered``), as ``_encoded`` finds them."""
    chunks, values, table = _encoded(column)
    values = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    if ordered:
        values, inverse = np.unique(values, return_inverse=True)
        table = inverse.astype(np.int32)[table] if table is not None else inverse.astype(np.int32)
    return _gathered(table, chunks), values


def _refuse(bad_values: np.ndarray, rows, name: str, message, fail) -> None:
    """Fail at the first row holding one of the distinct values flagged in ``bad_values``; ``rows``: each row's
    value index, or a function giving them; ``message``: text, or a function of the value's index."""
    if bad_values.any():
        rows = rows() if callable(rows) else rows
        row = int(np.flatnonzero(bad_values[rows])[0])
        fail(row, name, message if isinstance(message, str) else message(rows[row]))


def _id_codes(column: pa.ChunkedArray, name: str, fail, *, padding: bool) -> tuple[np.ndarray, np.ndarray | pa.Array]:
    """Each row's id as a code into the sorted distinct ids, and those ids: int64 when every id is a decimal
    integer, else text (kept in Arrow; ``_ids_at`` makes Python strings of those a caller needs). ``padding``:
    integer id 0 is reserved (items)."""
    if pa.types.is_integer(column.type):
        ids = column.to_numpy()
        if (ids < 0).any():
            fail(np.flatnonzero(ids < 0)[0], name, "integer ids must be non-negative")
        if padding and (ids == 0).any():
            fail(np.flatnonzero(ids == 0)[0], name, "item id 0 is reserved for padding")
        codes, uniques = pd.factorize(ids)
        order = id_order(np.asarray(uniques))
        return _rank(order)[codes], np.asarray(uniques)[order]
    chunks, text, table = _encoded(column)
    rows = partial(_gathered, table, chunks)  # each row's index into text, built only to locate a fault
    lengths = pc.utf8_length(text).to_numpy()
    _refuse(lengths == 0, rows, name, "empty id", fail)
    _refuse(lengths > MAX_ID_CHARS, rows, name, f"id longer than {MAX_ID_CHARS} characters", fail)
    control = pc.match_substring_regex(text, r"[\x00-\x1f\x7f]").to_numpy(zero_copy_only=False)
    _refuse(control, rows, name, lambda v: f"id {text[v].as_py()[:40]!r} holds a control character", fail)
    ids = typed_ids(text)
    if isinstance(ids, np.ndarray) and padding:
        _refuse(ids == 0, rows, name, "item id 0 is reserved for padding", fail)
    order = id_order(ids)
    codes = _gathered(_rank(order) if table is None else _rank(order)[table], chunks)
    return codes, ids[order] if isinstance(ids, np.ndarray) else ids.take(order)


def _rank(order: np.ndarray) -> np.ndarray:
    """The inverse permutation of ``order``: each value's place in it (int32)."""
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


def _ids_at(ids: np.ndarray | pa.Array, positions: np.ndarray) -> np.ndarray:
    """The ids (as ``_id_codes`` gives them) at ``positions``: int64, or an object array of Python strings."""
    if isinstance(ids, np.ndarray):
        return ids[positions]
    return np.asarray(ids.take(positions).to_numpy(zero_copy_only=False), dtype=object)


INTEGER_ID = r"^(0|[1-9][0-9]{0,17})$"
"""An id that is an integer: at most 18 digits, no leading zeros (zero-padded SKUs stay text, so "007" and "7"
remain two items)."""


def typed_ids(text: np.ndarray | pa.Array) -> np.ndarray | pa.Array:
    """Ids given as text (an object array or Arrow strings): int64 when every one is an integer (``INTEGER_ID``),
    else the text as given."""
    arrow = text if isinstance(text, pa.Array) else pa.array(text, pa.string())
    if pc.all(pc.match_substring_regex(arrow, INTEGER_ID)).as_py() is False:
        return text
    return pc.cast(arrow, pa.int64()).to_numpy(zero_copy_only=False, writable=True)


def sorted_ids(text: list[str]) -> np.ndarray:
    """Distinct ids given as text, typed (``typed_ids``) and in the order internal numbers follow."""
    ids = pd.unique(typed_ids(np.asarray(text, dtype=object)))
    return np.asarray(ids)[id_order(np.asarray(ids))]


def id_order(ids: np.ndarray | pa.Array) -> np.ndarray:
    """Indices sorting distinct ids: integers by value; text naturally, each leading run of digits compared as a
    number ("i2" before "i10")."""
    if isinstance(ids, np.ndarray) and ids.dtype != object:
        return np.argsort(ids, kind="stable")
    text = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    parts = pc.extract_regex(text, r"^(?P<prefix>\D*)(?P<digits>\d*)(?P<rest>(?s:.*))$")
    digits = pc.utf8_ltrim(parts.field("digits"), "0")
    width = pc.utf8_length(digits)
    if (pc.max(width).as_py() or 0) <= 18:  # digits of one width compare as their numbers (int64 sorts faster)
        digits = pc.cast(pc.if_else(pc.equal(width, 0), "0", digits), pa.int64())
    key = pa.table({"prefix": parts.field("prefix"), "width": width, "digits": digits, "rest": parts.field("rest"),
                    "id": text})
    return pc.sort_indices(key, sort_keys=[(name, "ascending") for name in key.column_names]).to_numpy()


def _padding(ids: np.ndarray | pa.Array) -> np.ndarray:
    return np.zeros(1, dtype=np.int64) if isinstance(ids, np.ndarray) else np.array([""], dtype=object)


def parse_times(values: list, schema: EventSchema, name: str) -> np.ndarray:
    """Unix seconds of request values: numbers as Unix seconds or milliseconds, text as a file's column is read
    (``schema.timestamp_unit``: ISO-8601 or Unix numbers); numbers and text may be mixed. A bad value is refused as
    ``name[i]`` (ValueError, one line)."""
    out = np.zeros(len(values), np.int64)
    numbers = [i for i, v in enumerate(values) if isinstance(v, int | float) and not isinstance(v, bool)]
    text = [i for i, v in enumerate(values) if isinstance(v, str)]
    if len(numbers) + len(text) != len(values):
        raise ValueError(f"{name}: expected Unix times or ISO-8601 text")
    for rows, unit in ((numbers, "auto" if schema.timestamp_unit == "iso" else schema.timestamp_unit),
                       (text, schema.timestamp_unit)):
        if rows:
            def fail(row: int, _column: str, message: str, rows=rows):
                raise ValueError(f"{name}[{rows[int(row)]}]: {message}")

            column = pa.chunked_array([pa.array([str(values[i]) for i in rows], pa.string())])
            out[rows] = _timestamps(column, EventSchema(timestamp=name, timestamp_unit=unit), fail)
    return out


def _timestamps(column: pa.ChunkedArray, schema: EventSchema, fail) -> np.ndarray:
    """Unix seconds (int64). Numbers are seconds or milliseconds (``timestamp_unit``, detected under "auto"),
    text is ISO-8601 (a zone given or UTC)."""
    name, unit = schema.timestamp, schema.timestamp_unit
    if pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("s", column.type.tz)).cast(pa.int64()).to_numpy()
    fast = _fast_timestamps(column, unit)
    if fast is not None:
        return fast
    # Slow path (values Arrow does not cast: spaces, mixed zone forms, faults to locate): pandas, row by row.
    text = pd.Series(_text(column), dtype=object)
    numeric = pd.to_numeric(text, errors="coerce") if unit != "iso" else pd.Series(np.nan, index=text.index)
    values = numeric.to_numpy(dtype=float, na_value=np.nan)
    is_number = np.isfinite(values) & (values >= 0)
    if unit in ("s", "ms") or (unit == "auto" and is_number.all()):
        iso = np.zeros(len(text), dtype=bool)
    else:
        parsed = pd.to_datetime(text.where(~is_number), format="ISO8601", utc=True, errors="coerce")
        iso = parsed.notna().to_numpy()
    # Under "auto" the column is read the way most of its values are written: one value of the other kind (a Unix
    # time among ISO times) or of neither is the fault, named at its own line.
    as_iso = unit == "iso" or (unit == "auto" and iso.sum() > is_number.sum())
    bad = ~iso if as_iso else ~is_number
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = text.iloc[row][:40]
        if unit == "auto" and (is_number if as_iso else iso)[row]:
            other = ("a Unix time among ISO-8601 timestamps" if as_iso else
                     "an ISO-8601 timestamp among Unix times")
            fail(row, name, f"{other}: {value!r} (a column holds one kind of time)")
        fail(row, name, f"not an ISO-8601 timestamp: {value!r}" if as_iso else
             f"not a Unix time{' or ISO-8601 timestamp' if unit == 'auto' else ''}: {value!r}")
    if as_iso:
        return parsed.dt.tz_convert(None).astype("datetime64[s]").astype(np.int64).to_numpy()
    return _unix_seconds(values, unit, lambda row: fail(
        row, name, f"Unix time {numeric.iloc[row]:g} is out of range (expected seconds or milliseconds since 1970)"))


def _fast_timestamps(column: pa.ChunkedArray, unit: str) -> np.ndarray | None:
    """Unix seconds by Arrow's own casts, or None where a value needs the slow path (which names faults)."""
    if unit != "iso" and column.num_chunks:
        for numeric in (pa.int64(), pa.float64()):
            try:
                values = pc.cast(column, numeric).to_numpy()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            if values.dtype.kind == "f" and not np.isfinite(values).all() or (values < 0).any():
                return None
            return _unix_seconds(values, unit, lambda row: None)
    if unit in ("iso", "auto"):
        for zone in ("UTC", None):  # every value with a zone, or none with one (read as UTC)
            try:
                return pc.cast(column, pa.timestamp("s", zone)).cast(pa.int64()).to_numpy()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    return None


def _unix_seconds(values: np.ndarray, unit: str, out_of_range) -> np.ndarray | None:
    """Seconds from numbers in seconds or milliseconds (``unit``; "auto": milliseconds from MS_FROM on)."""
    if unit == "ms" or (unit == "auto" and values.max() >= MS_FROM):
        values = values / 1000
    if (values >= MS_FROM).any():
        return out_of_range(int(np.flatnonzero(values >= MS_FROM)[0]))
    return values.astype(np.int64, copy=False)


def _merchant_codes(column: pa.ChunkedArray, name: str, fail) -> tuple[np.ndarray, list[str]]:
    """Each row's merchant as an index into the sorted merchant ids, and those ids."""
    rows, values = _distinct(column, ordered=True)
    _refuse(values == "", rows, name, "empty merchant id", fail)
    return rows, values.tolist()


def _raise(error: Exception):
    raise error


def _event_codes(column: pa.ChunkedArray, schema: EventSchema, fail) -> np.ndarray:
    """EVENT_TYPES index per row, -1 for events mapped to "drop"."""
    rows, names = _distinct(column)
    names = pd.Series(names, dtype=object).str.lower()
    codes = names.map(schema.stage())
    _refuse(codes.isna().to_numpy(), rows, schema.event_type,
            lambda v: f"unknown event type {names.iloc[v][:40]!r} (expected one of {', '.join(EVENT_TYPES)}, or map "
                      "it in [data.events])", fail)
    return codes.to_numpy(np.int8)[rows]


def _context(column: pa.ChunkedArray, name: str, fail) -> np.ndarray:
    """Numeric context stays numeric; text context (e.g. device) becomes category codes in sorted order."""
    try:
        values = pc.cast(column, pa.float64()) if column.null_count == 0 else None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = None
    if values is not None and pc.all(pc.is_finite(values)).as_py() is not False:
        return pc.cast(values, pa.float32()).to_numpy()  # rounded as numpy's astype rounds
    out = values.to_numpy() if values is not None else None
    if out is None:
        text = pd.Series(_text(column), dtype=object)
        numeric = pd.to_numeric(text, errors="coerce")
        if not numeric.notna().all():
            return _distinct(column, ordered=True)[0].astype(np.float32)  # codes of the sorted distinct values
        out = numeric.to_numpy(dtype=float)
    if not np.isfinite(out).all():
        fail(int(np.flatnonzero(~np.isfinite(out))[0]), name, "context value is not a finite number")
    return out.astype(np.float32)

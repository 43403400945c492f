"""Loaders for behaviour data files. Each returns a validated BehaviorData or raises DataError naming file/line/column.

Formats:
- ``events``: CSV or Parquet (common/events.py), columns ``user_id,item_id,timestamp`` plus optional
  ``event_type``, ``merchant_id`` and any extra (context) columns, under the shop's own names and event names where
  an ``EventSchema`` maps them; any string or integer ids. Timestamps are Unix seconds or milliseconds, or
  ISO-8601. Duplicate rows are dropped and rows are ordered by time within each user (stable, so equal timestamps
  keep file order).
- ``amazon-seq``: one line per user, ``user item item ...`` in time order (S3-Rec / ICLRec format), with an optional
  aligned timestamp file (``X_time.txt``) and item attributes (``X_item2attributes.json`` or
  ``X_item_attributes_named.tsv``), found next to ``X.txt`` when not given.

Item texts (public titles, for the text encoder): a TSV ``item_id<TAB>...<TAB>title`` given as ``texts`` or found
next to ``X.txt`` as ``X_item_titles.tsv``; an item's text is its title followed by its named attributes (brand and
categories from ``X_item_attributes_named.tsv`` or the attribute file, when they have names).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from .data import BehaviorData, ItemCatalog
from .errors import DataError
from .events import EventSchema, Ingested, load_events_counted, sorted_ids

FORMATS = ("events", "amazon-seq")
MAX_ID = 2**62
LIMITS = {  # what one merchant's file may hold before it is refused, not half-loaded; raise them by environment
    "FEDAUG_MAX_FILE_BYTES": 2 * 2**30,  # the whole file is parsed in memory
    "FEDAUG_MAX_LINE_CHARS": 2**24,  # 16 Mi characters: a user line of ~2 million items
    "FEDAUG_MAX_ITEMS": 50_000_000,  # distinct items: the model holds a row per item
}


def limit(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else LIMITS[name]


def check_file_size(path: Path) -> None:
    size, most = path.stat().st_size, limit("FEDAUG_MAX_FILE_BYTES")
    if size > most:
        raise DataError(path, f"file is {size:,} bytes, over the {most:,}-byte limit (FEDAUG_MAX_FILE_BYTES)")


def check_item_count(path: Path, n_items: int) -> None:
    most = limit("FEDAUG_MAX_ITEMS")
    if n_items > most:
        raise DataError(path, f"{n_items:,} distinct items, over the {most:,}-item limit (FEDAUG_MAX_ITEMS)")


def load(path, fmt: str | None = None, *, timestamps=None, attributes=None, texts=None,
         schema: EventSchema | None = None) -> BehaviorData:
    """Load behaviour data from ``path`` in format ``fmt`` (guessed from the suffix when None); ``schema``: an
    events file's column and event names."""
    return load_counted(path, fmt, timestamps=timestamps, attributes=attributes, texts=texts, schema=schema)[0]


def load_counted(path, fmt: str | None = None, *, timestamps=None, attributes=None, texts=None,
                 schema: EventSchema | None = None) -> tuple[BehaviorData, Ingested | None]:
    """``load``, and for an events file what loading it left out (dropped and duplicate events)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    fmt = fmt or ("amazon-seq" if path.suffix == ".txt" else "events")
    if fmt == "events":
        if timestamps is not None:
            raise DataError(timestamps, "a separate timestamp file only applies to the amazon-seq format")
        data, ingested = load_events_counted(path, schema, check_file=check_file_size)
        check_item_count(path, data.n_items)
        data = data if attributes is None else _attach_catalog(data, attributes)
        return (data if texts is None else attach_texts(data, Path(texts))), ingested
    if fmt == "amazon-seq":
        data = load_amazon_seq(path, timestamps=timestamps, attributes=attributes)
        text_path = Path(texts) if texts else _sibling(path, "_item_titles.tsv")
        if text_path is None:
            return data, None
        return attach_texts(data, text_path, _sibling(path, "_item_attributes_named.tsv")), None
    raise DataError(path, f"unknown format {fmt!r} (expected one of: {', '.join(FORMATS)})")


# ----------------------------------------------------------------------------------------------------------------
# text handling shared by the line formats


def read_text_lines(path: Path) -> list[str]:
    """Decode ``path`` as UTF-8 text; binary garbage and bad encodings are reported with their line."""
    check_file_size(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "file is empty")
    nul = raw.find(b"\x00")
    try:
        text = raw.decode("utf-8-sig")
        bad_utf8 = -1
    except UnicodeDecodeError as exc:
        bad_utf8 = exc.start
    if nul >= 0:  # NUL never occurs in text: call it binary, located at its first undecodable byte
        line, column = _position(raw, min(nul, bad_utf8) if bad_utf8 >= 0 else nul)
        raise DataError(path, "binary data, not a text file", line, column)
    if bad_utf8 >= 0:
        line, column = _position(raw, bad_utf8)
        raise DataError(path, "not valid UTF-8 text (wrong encoding?)", line, column)
    lines = text.splitlines()
    longest, most = max(map(len, lines), default=0), limit("FEDAUG_MAX_LINE_CHARS")
    if longest > most:
        line = next(n for n, text in enumerate(lines, start=1) if len(text) == longest)
        raise DataError(path, f"line is {longest:,} characters, over the {most:,} limit (FEDAUG_MAX_LINE_CHARS)", line)
    return lines


def _position(raw: bytes, offset: int) -> tuple[int, int]:
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return line, column


def _int_tokens(path: Path, line_no: int, line: str) -> list[int]:
    """Parse whitespace-separated non-negative integers, locating the first bad token by its character column."""
    values = []
    for match in re.finditer(r"\S+", line):
        token = match.group()
        if not token.isdigit() or not token.isascii():
            raise DataError(path, f"expected a non-negative integer, got {token[:40]!r}", line_no, match.start() + 1)
        value = int(token)
        if value >= MAX_ID:
            raise DataError(path, f"integer {token[:40]} is too large", line_no, match.start() + 1)
        values.append(value)
    return values


# ----------------------------------------------------------------------------------------------------------------
# amazon-seq


def load_amazon_seq(path, *, timestamps=None, attributes=None) -> BehaviorData:
    path = Path(path)
    user_ids, seqs = [], []
    seen = {}
    for line_no, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        values = _int_tokens(path, line_no, line)
        if len(values) < 2:
            raise DataError(path, "a line needs a user id followed by at least one item id", line_no, 1)
        if values[0] in seen:
            raise DataError(path, f"user {values[0]} already appeared on line {seen[values[0]]}", line_no, 1)
        seen[values[0]] = line_no
        user_ids.append(values[0])
        seqs.append(values[1:])
    if not seqs:
        raise DataError(path, "file has no user lines")

    raw_items = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    if raw_items.min() == 0:
        bad = next(i for i, s in enumerate(seqs) if 0 in s)
        raise DataError(path, "item id 0 is reserved for padding", _nth_nonblank_line(path, bad))
    unique, items = np.unique(raw_items, return_inverse=True)
    check_item_count(path, len(unique))
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    catalog = ItemCatalog(raw_ids=np.concatenate([[0], unique]))
    data = BehaviorData(
        items=items.astype(np.int64) + 1, offsets=offsets, catalog=catalog, user_ids=np.asarray(user_ids)
    )

    time_path = Path(timestamps) if timestamps else _sibling(path, "_time.txt")
    if time_path is not None:
        data = _attach_timestamps(data, time_path)
    attr_path = Path(attributes) if attributes else (
        _sibling(path, "_item2attributes.json") or _sibling(path, "_item_attributes_named.tsv")
    )
    if attr_path is not None:
        data = _attach_catalog(data, attr_path)
    return data


def _sibling(path: Path, suffix: str) -> Path | None:
    candidate = path.with_name(path.stem + suffix)
    return candidate if candidate.is_file() else None


def _nth_nonblank_line(path: Path, n: int) -> int:
    count = -1
    for line_no, line in enumerate(read_text_lines(path), start=1):
        count += bool(line.strip())
        if count == n:
            return line_no
    return 0


def _attach_timestamps(data: BehaviorData, path: Path) -> BehaviorData:
    rows = [(n, line) for n, line in enumerate(read_text_lines(path), start=1) if line.strip()]
    if len(rows) != data.n_users:
        raise DataError(path, f"has {len(rows)} user lines but the sequence file has {data.n_users}")
    stamps = []
    for user, (line_no, line) in enumerate(rows):
        values = _int_tokens(path, line_no, line)
        if values[0] != data.user_ids[user]:
            raise DataError(path, f"user {values[0]} does not match user {data.user_ids[user]} of the sequence file",
                            line_no, 1)
        if len(values) - 1 != data.lengths[user]:
            raise DataError(path, f"ragged line: {len(values) - 1} timestamps for {data.lengths[user]} items",
                            line_no)
        stamps.extend(values[1:])
    return replace(data, timestamps=np.asarray(stamps, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------------
# item attributes (public catalog data)


def _item_key(raw: str) -> str:
    """An item id as files are matched by: its text, stripped."""
    return raw.strip()


def id_index(raw_ids: np.ndarray) -> dict[str, int]:
    """Internal id of each raw id, keyed by its text (padding left out)."""
    return {str(raw): i for i, raw in enumerate(raw_ids.tolist()) if i > 0}


def _attach_catalog(data: BehaviorData, path) -> BehaviorData:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such attribute file")
    if path.suffix == ".json":
        by_raw_item, names = _read_attribute_json(path)
    else:
        by_raw_item, names = _read_attribute_tsv(path)
    raw_to_internal = id_index(data.catalog.raw_ids)
    attributes = [np.zeros(0, dtype=np.int64) for _ in range(data.n_items + 1)]
    for raw, attrs in by_raw_item.items():
        internal = raw_to_internal.get(raw)
        if internal is not None:
            attributes[internal] = np.asarray(sorted(set(attrs)), dtype=np.int64)
    category, category_names = _dominant_attribute(attributes, names)
    catalog = ItemCatalog(raw_ids=data.catalog.raw_ids, attributes=attributes, attribute_names=names,
                          category=category, category_names=category_names)
    return replace(data, catalog=catalog)


def attach_texts(data: BehaviorData, path: Path, named_attributes: Path | None = None) -> BehaviorData:
    """Give every catalog item its public text: the title from ``path`` (a TSV whose first column is ``item_id`` and
    which has a ``title`` or ``text`` column), then its attribute names (``named_attributes``, or the catalog's own
    names when they are real names)."""
    titles = _read_item_texts(path)
    raw_ids = data.catalog.raw_ids
    names: dict[str, list[str]] = {}
    if named_attributes is not None:
        by_raw, attribute_names = _read_attribute_tsv(named_attributes)
        names = {raw: [attribute_names[a] for a in attrs] for raw, attrs in by_raw.items()}
    elif data.catalog.attributes and data.catalog.attribute_names and not data.catalog.attribute_names[-1].startswith(
            "attr"):
        names = {str(raw): [data.catalog.attribute_names[a] for a in data.catalog.attributes[i]]
                 for i, raw in enumerate(raw_ids) if i > 0}
    texts = [""]
    for raw in map(str, raw_ids[1:]):
        parts = [titles.get(raw, "")] + [n for n in names.get(raw, []) if n and n != "Unknown"]
        texts.append(" | ".join(p for p in parts if p))
    return replace(data, catalog=replace(data.catalog, texts=texts))


def _read_item_texts(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(path, "no such item text file")
    lines = read_text_lines(path)
    header = lines[0].split("\t") if lines else []
    if not header or header[0] != "item_id":
        raise DataError(path, "header must start with 'item_id'", 1, 1)
    column = next((c for c in ("title", "text") if c in header), None)
    if column is None:
        raise DataError(path, f"header names no 'title' or 'text' column (found: {', '.join(header)})", 1)
    at = header.index(column)
    return {item: fields[at].strip() for item, fields in _item_rows(path, lines, header)}


def _item_rows(path: Path, lines: list[str], header: list[str]):
    """``(item id, fields)`` of every non-blank line after the header of an item-keyed TSV, each checked; ids as
    text (the data's ids, integer or not, are matched by their text)."""
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(path, f"ragged line: {len(fields)} fields, header has {len(header)}", line_no)
        item = _item_key(fields[0])
        if not item:
            raise DataError(path, "empty item id", line_no, "item_id")
        yield item, fields


def load_catalog(path) -> ItemCatalog:
    """The public item catalog every merchant and the aggregator share: an attribute file (TSV or JSON, as above)
    whose item ids are the whole catalog. Internal ids are the catalog's sorted raw ids, so every party that loads
    the same file numbers items identically (and their models have the same shapes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such catalog file")
    by_raw_item, names = _read_attribute_json(path) if path.suffix == ".json" else _read_attribute_tsv(path)
    if not by_raw_item:
        raise DataError(path, "the catalog lists no items")
    check_item_count(path, len(by_raw_item))
    raw_ids = sorted_ids(list(by_raw_item))
    if raw_ids.dtype != object and (raw_ids == 0).any():
        raise DataError(path, "item id 0 is reserved for padding", column="item_id")
    raw_ids = np.concatenate([np.array([0 if raw_ids.dtype != object else ""], dtype=raw_ids.dtype), raw_ids])
    if len(names) == 1:
        return ItemCatalog(raw_ids=raw_ids)
    attributes = [np.zeros(0, dtype=np.int64)] + [np.asarray(sorted(set(by_raw_item[str(raw)])), dtype=np.int64)
                                                  for raw in raw_ids[1:]]
    category, category_names = _dominant_attribute(attributes, names)
    return ItemCatalog(raw_ids=raw_ids, attributes=attributes, attribute_names=names, category=category,
                       category_names=category_names)


def align_to_catalog(data: BehaviorData, catalog: ItemCatalog, data_path, catalog_path) -> BehaviorData:
    """Renumber ``data``'s items into ``catalog``'s ids (matched by their text); an item the catalog lacks is an
    error naming it."""
    index = id_index(catalog.raw_ids)
    position = np.fromiter((index.get(str(raw), -1) for raw in data.catalog.raw_ids), dtype=np.int64,
                           count=len(data.catalog.raw_ids))
    position[0] = 0  # padding
    known = position >= 0
    if not known.all():
        missing = np.flatnonzero(~known)
        first = data.catalog.raw_ids[missing[0]]
        raise DataError(data_path, f"item {first} is not in the catalog {catalog_path} "
                                   f"({len(missing)} unknown item id{'s' * (len(missing) > 1)})", column="item_id")
    return replace(data, items=position[data.items], catalog=catalog)


def _read_attribute_json(path: Path) -> tuple[dict[str, list[int]], list[str]]:
    text = "\n".join(read_text_lines(path))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg}", exc.lineno, exc.colno) from None
    if not isinstance(obj, dict):
        raise DataError(path, "expected a JSON object mapping item id to a list of attribute ids", 1, 1)
    out: dict[str, list[int]] = {}
    for key, attrs in obj.items():
        if not _item_key(key):
            raise DataError(path, "empty item id", column=f"key {key[:40]!r}")
        if not isinstance(attrs, list) or not all(isinstance(a, int) and 0 < a < MAX_ID for a in attrs):
            raise DataError(path, "attributes must be a list of positive integers", column=f"key {key[:40]!r}")
        out[_item_key(key)] = attrs
    n_attr = max((max(a) for a in out.values() if a), default=0)
    return out, [""] + [f"attr{i}" for i in range(1, n_attr + 1)]


def _read_attribute_tsv(path: Path) -> tuple[dict[str, list[int]], list[str]]:
    lines = read_text_lines(path)
    header = lines[0].split("\t")
    if header[0] != "item_id" or len(header) < 2:
        raise DataError(path, "header must start with 'item_id' and name an attributes column", 1, 1)
    names, ids, out = [""], {}, {}
    for item, fields in _item_rows(path, lines, header):
        attrs = []
        for name in filter(None, fields[-1].split("|")):
            if name not in ids:
                ids[name] = len(names)
                names.append(name)
            attrs.append(ids[name])
        out[item] = attrs
    return out, names


def _dominant_attribute(attributes: list[np.ndarray], names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each item's category: its attribute shared by the most items (broad labels like 'Makeup' beat brands)."""
    freq = Counter(int(a) for attrs in attributes for a in attrs)
    category = np.zeros(len(attributes), dtype=np.int64)
    for item, attrs in enumerate(attributes):
        if len(attrs):
            category[item] = max(attrs, key=lambda a: (freq[int(a)], -int(a)))
    used = np.unique(category[category > 0])
    remap = np.zeros(len(names) + 1, dtype=np.int64)
    remap[used] = np.arange(1, len(used) + 1)
    return remap[category], [""] + [names[a] for a in used]

"""Loaders for behaviour data files. Each returns a validated BehaviorData or raises DataError naming file/line/column.

Formats:
- ``events``: CSV or Parquet (common/data/events.py), columns ``user_id,item_id,timestamp`` plus optional
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

The public item catalog (``load_catalog``, ``[data] catalog``): the JSON attribute format, or a TSV whose header
names its columns:
- ``item_id`` first: the shop's item ids; the catalog's items are exactly these.
- text columns: ``title`` and the other known text columns (``TEXT_COLUMNS``: title, text, brand, tags), or the
  columns ``[data] text_columns`` names, in that order; an item's text columns are joined by " | " into its
  title part, and its public text is that followed by its attribute names (as ``attach_texts`` builds it).
- ``attributes``: attribute names joined by '|'; a file without a column of that name takes its last column as
  the attributes unless that is a text column (the two-column ``item_id<TAB>attributes`` format).
Any other column is reported (a ``DataWarning`` naming the file and the columns), not silently dropped.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedaug.common.config import FORMATS
from fedaug.common.data import BehaviorData, ItemCatalog
from fedaug.common.data.events import EventSchema, Ingested, load_events_counted, sorted_ids
from fedaug.common.data.files import check_item_count, read_text_lines
from fedaug.common.errors import DataError, DataWarning

TEXT_COLUMNS = ("title", "text", "brand", "tags")
"""A catalog TSV's columns joined into each item's public text when ``[data] text_columns`` is not set."""
ATTRIBUTES_COLUMN = "attributes"
TEXT_SEPARATOR = " | "
MAX_ID = 2**62


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
        data, ingested = load_events_counted(path, schema)
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
    return replace(data, catalog=texts_from_file(data.catalog, path, named_attributes))


def texts_from_file(catalog: ItemCatalog, path: Path, named_attributes: Path | None = None) -> ItemCatalog:
    """``catalog`` with the texts ``attach_texts`` gives: titles from the TSV ``path``, then attribute names."""
    names = None
    if named_attributes is not None:
        by_raw, attribute_names = _read_attribute_tsv(named_attributes)
        names = {raw: [attribute_names[a] for a in attrs] for raw, attrs in by_raw.items()}
    return with_texts(catalog, _read_item_texts(Path(path)), names)


def with_texts(catalog: ItemCatalog, titles: dict[str, str], names: dict[str, list[str]] | None = None
               ) -> ItemCatalog:
    """``catalog`` with every item's public text: its title part (``titles``, by raw id as text), then its attribute
    names (``names`` by raw id, or the catalog's own names when they are real names, not ``attrN``), joined by
    " | "; empty parts and the name "Unknown" are left out."""
    if names is None:
        names = _own_attribute_names(catalog)
    raw_ids = list(map(str, catalog.raw_ids[1:]))
    item_titles = [""] + [titles.get(raw, "") for raw in raw_ids]
    texts = [""] + [_join([title, *_text_names(names.get(raw, []))])
                    for title, raw in zip(item_titles[1:], raw_ids, strict=True)]
    return replace(catalog, texts=texts, titles=item_titles)


def catalog_columns(catalog: ItemCatalog) -> list[tuple[str, str, list[str]]]:
    """What a written catalog TSV holds for each item so that ``load_catalog`` reads back its attributes and texts:
    ``(title, tags, attribute names)``. ``title`` is the item's title part; the attribute names are in the order its
    text shows them (the reader joins them in file order); ``tags``, whatever else its text holds that the attributes
    will not give back (e.g. the named brand and categories of data whose own attributes are anonymous ids).
    Exact unless an item's text ends with other names than its real attribute names."""
    names = catalog.attribute_names or [""]
    columns = []
    for i in range(1, len(catalog.raw_ids)):
        item_names = [names[a] for a in catalog.attributes[i]] if catalog.attributes else []
        if not catalog.texts:
            columns.append(("", "", item_names))
            continue
        text = catalog.texts[i]
        title = catalog.titles[i] if catalog.titles and text.startswith(catalog.titles[i]) else ""
        rest = text[len(title):].removeprefix(TEXT_SEPARATOR) if title else text
        shown = _text_names(item_names) if _real_names(names) else []
        parts = rest.split(TEXT_SEPARATOR) if rest else []
        if shown and sorted(parts[-len(shown):]) == sorted(shown):  # the text's own order, hidden names after
            item_names = parts[-len(shown):] + [n for n in item_names if n not in shown]
            rest = TEXT_SEPARATOR.join(parts[: -len(shown)])
        if not catalog.titles:
            title, rest = rest, ""
        columns.append((title, rest, item_names))
    return columns


def _own_attribute_names(catalog: ItemCatalog) -> dict[str, list[str]]:
    """Each item's attribute names, by raw id, where they are real names (not the JSON format's ``attrN``)."""
    if not catalog.attributes or not _real_names(catalog.attribute_names):
        return {}
    names = catalog.attribute_names
    return {str(raw): [names[a] for a in catalog.attributes[i]] for i, raw in enumerate(catalog.raw_ids) if i > 0}


def _real_names(names: list[str] | None) -> bool:
    """Attribute names that say something (not the JSON format's ``attrN``), worth putting in item texts."""
    return bool(names) and len(names) > 1 and not names[-1].startswith("attr")


def _text_names(names: list[str]) -> list[str]:
    return [n for n in names if n and n != "Unknown"]


def _join(parts: list[str]) -> str:
    return TEXT_SEPARATOR.join(p for p in parts if p)


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


def load_catalog(path, text_columns: tuple[str, ...] | None = None) -> ItemCatalog:
    """The public item catalog every merchant and the aggregator share: a JSON attribute file or a catalog TSV (its
    columns as the module docstring says) whose item ids are the whole catalog, with each item's public text where
    it has text columns (``text_columns``: which, in order; None: the known ones, ``TEXT_COLUMNS``). Internal ids
    are the catalog's sorted raw ids, so every party that loads the same file numbers items identically (and their
    models have the same shapes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such catalog file")
    titles = None
    if path.suffix == ".json":
        by_raw_item, names = _read_attribute_json(path)
    else:
        by_raw_item, names, titles = _read_catalog_tsv(path, text_columns)
    if not by_raw_item:
        raise DataError(path, "the catalog lists no items")
    check_item_count(path, len(by_raw_item))
    raw_ids = sorted_ids(list(by_raw_item))
    if raw_ids.dtype != object and (raw_ids == 0).any():
        raise DataError(path, "item id 0 is reserved for padding", column="item_id")
    raw_ids = np.concatenate([np.array([0 if raw_ids.dtype != object else ""], dtype=raw_ids.dtype), raw_ids])
    if len(names) == 1:
        catalog = ItemCatalog(raw_ids=raw_ids)
    else:
        attributes = [np.zeros(0, dtype=np.int64)] + [
            np.asarray(sorted(set(by_raw_item[str(raw)])), dtype=np.int64) for raw in raw_ids[1:]]
        category, category_names = _dominant_attribute(attributes, names)
        catalog = ItemCatalog(raw_ids=raw_ids, attributes=attributes, attribute_names=names, category=category,
                              category_names=category_names)
    if titles is None:
        return catalog
    in_file_order = {raw: [names[a] for a in attrs] for raw, attrs in by_raw_item.items()} if _real_names(names) else {}
    return with_texts(catalog, titles, in_file_order)


def _read_catalog_tsv(path: Path, text_columns: tuple[str, ...] | None
                      ) -> tuple[dict[str, list[int]], list[str], dict[str, str] | None]:
    """A catalog TSV's attributes (as ``_read_attribute_tsv``) and each item's title part (its text columns joined;
    None without text columns); a column it does not use is reported."""
    lines = read_text_lines(path)
    header = lines[0].split("\t")
    if header[0] != "item_id":
        raise DataError(path, "header must start with 'item_id'", 1, 1)
    for at, name in enumerate(header):
        if header.index(name) != at:
            raise DataError(path, f"column {name!r} appears twice in the header", 1, at + 1)
    if text_columns is None:
        texts = [at for at, name in enumerate(header) if at > 0 and name in TEXT_COLUMNS]
    else:
        for name in text_columns:
            if name not in header[1:]:
                raise DataError(path, f"no column {name!r} (data.text_columns; the header has: "
                                      f"{', '.join(header)})", 1)
        texts = [header.index(name) for name in text_columns]
    if ATTRIBUTES_COLUMN in header:
        attributes = header.index(ATTRIBUTES_COLUMN)
    else:  # the two-column format: its last column, whatever its name
        attributes = len(header) - 1 if len(header) > 1 and len(header) - 1 not in texts else None
    if attributes in texts:
        raise DataError(path, f"column {ATTRIBUTES_COLUMN!r} holds attributes, not text (data.text_columns)", 1,
                        attributes + 1)
    if attributes is None and not texts:
        raise DataError(path, "header names no attributes or text column after 'item_id'", 1)
    unused = [name for at, name in enumerate(header) if at > 0 and at != attributes and at not in texts]
    if unused:
        warnings.warn(f"{path}: column{'s' * (len(unused) > 1)} {', '.join(unused)} not used (text columns: "
                      f"{', '.join(text_columns or TEXT_COLUMNS)}, as [data] text_columns sets; attributes: "
                      f"{ATTRIBUTES_COLUMN!r})", DataWarning, stacklevel=3)
    names, ids, out, titles = [""], {}, {}, {}
    for item, fields in _item_rows(path, lines, header):
        attrs = []
        for name in filter(None, fields[attributes].split("|") if attributes is not None else ()):
            if name not in ids:
                ids[name] = len(names)
                names.append(name)
            attrs.append(ids[name])
        out[item] = attrs
        titles[item] = _join([fields[at].strip() for at in texts])
    return out, names, titles if texts else None


def align_to_catalog(data: BehaviorData, catalog: ItemCatalog, data_path, catalog_path) -> BehaviorData:
    """Renumber ``data``'s items into ``catalog``'s ids (matched by their text); an item the catalog lacks is an
    error naming it. The catalog's item texts are kept; a catalog without texts takes the data's, where it has them
    (an item the data does not hold gets an empty text)."""
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
    if not catalog.texts and data.catalog.texts:
        texts, titles = [""] * len(catalog.raw_ids), [""] * len(catalog.raw_ids)
        for old, new in enumerate(position.tolist()):
            texts[new] = data.catalog.texts[old]
            titles[new] = data.catalog.titles[old] if data.catalog.titles else ""
        catalog = replace(catalog, texts=texts, titles=titles if data.catalog.titles else None)
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

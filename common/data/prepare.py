"""The public Amazon review data (McAuley et al.; the 2014 and 2018 releases) as the files fedaug reads.

``prepare`` turns a reviews file (JSON lines: ``reviewerID``, ``asin``, ``unixReviewTime``, ``overall``) and its
metadata file (``asin``, ``title``, ``brand``, ``categories`` — the 2014 release writes Python literals, the 2018 one
JSON with a flat ``category`` list) into the ``amazon-seq`` layout every command loads (S3-Rec's preprocessing, as the
results' copy of Beauty was made):

- ``NAME.txt``: one line per user, ``user item item ...``, 1-based ids, each user's reviews in time order (ties in
  file order);
- ``NAME_time.txt``: the same lines with each review's Unix time;
- ``NAME_item_attributes_named.tsv``: ``item_id<TAB>asin<TAB>attributes`` — the brand and every category below the
  top level, joined by ``|``, only those at least ``attribute_core`` items share;
- ``NAME_item_titles.tsv``: ``item_id<TAB>asin<TAB>title`` — the public title (empty where the metadata has none).

Reviews with a rating of 0 or less are dropped, then users and items are cut to the k-core (repeatedly, until every
user and item has at least ``core`` reviews). Files may be gzipped (``.gz``).
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedaug.common.atomic import staged_directory
from fedaug.common.errors import DataError, FedaugError

KNOWN_COUNTS = {"reviews_Beauty_5": (22_363, 12_101, 198_502)}
"""(users, items, events) that a known reviews file gives with the defaults: Beauty 5-core (2014) is the data set
of every result under simulations/results."""

_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` wrote."""

    users: int
    items: int
    events: int
    attributes: int
    """Distinct attribute names kept (brands and categories)."""
    titled: int
    """Items whose metadata has a non-empty title."""
    files: tuple[Path, ...]
    expected: tuple[int, int, int] | None
    """(users, items, events) published for this reviews file at the 5-core, where known."""


def dataset_name(reviews: Path) -> str:
    """``reviews_Beauty_5.json.gz`` → ``Beauty``; ``All_Beauty_5.json`` (2018) → ``All_Beauty``."""
    stem = _stem(reviews)
    return re.sub(r"_\d+$", "", stem.removeprefix("reviews_")) or stem


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return name[: -len(".json")] if name.endswith(".json") else Path(name).stem


def _records(path: Path) -> Iterator[tuple[int, str]]:
    """Each non-blank line of a JSON-lines file (gzipped or not) with its line number."""
    if not path.is_file():
        raise DataError(path, "no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield number, line
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot be read: {exc}") from None


def _parse(path: Path, number: int, line: str) -> dict:
    """One record: JSON, or a Python literal (the 2014 metadata)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(path, "not a JSON object or Python dict literal", number) from None
    if not isinstance(record, dict):
        raise DataError(path, f"a record must be an object, not {type(record).__name__}", number)
    return record


def read_reviews(path: Path) -> list[tuple[str, str, int]]:
    """``(reviewerID, asin, unixReviewTime)`` of every review rated above 0, in file order."""
    reviews = []
    for number, line in _records(path):
        record = _parse(path, number, line)
        try:
            user, item, time = str(record["reviewerID"]), str(record["asin"]), int(record["unixReviewTime"])
            rating = float(record.get("overall", 1.0))
        except KeyError as exc:
            raise DataError(path, f"missing field {exc.args[0]!r}", number) from None
        except (TypeError, ValueError):
            raise DataError(path, "unixReviewTime must be an integer and overall a number", number) from None
        if rating > 0:
            reviews.append((user, item, time))
    if not reviews:
        raise DataError(path, "no reviews rated above 0")
    return reviews


def k_core(reviews: list[tuple[str, str, int]], core: int) -> list[tuple[str, str, int]]:
    """The reviews left once every user and item has at least ``core`` of them (cut repeatedly)."""
    while True:
        users = Counter(user for user, _, _ in reviews)
        items = Counter(item for _, item, _ in reviews)
        kept = [r for r in reviews if users[r[0]] >= core and items[r[1]] >= core]
        if len(kept) == len(reviews):
            return kept
        reviews = kept


def read_metadata(path: Path, asins: set[str]) -> dict[str, dict]:
    """The metadata record of each item in ``asins`` (other lines are skipped unparsed)."""
    found = {}
    for number, line in _records(path):
        match = _ASIN.search(line)
        if match is not None and match.group(1) not in asins:
            continue
        record = _parse(path, number, line)
        if "asin" not in record:
            raise DataError(path, "missing field 'asin'", number)
        if str(record["asin"]) in asins:
            found[str(record["asin"])] = record
    return found


def _categories(record: dict) -> list[str]:
    """The categories below the top level: 2014's ``categories`` (a list of paths), 2018's ``category`` (one path)."""
    paths = record.get("categories")
    if paths is None:
        paths = [record.get("category") or []]
    return [str(name) for path in paths if isinstance(path, list) for name in path[1:]]


def _clean(text) -> str:
    return " ".join(str(text or "").split())


def prepare(*, reviews: Path, meta: Path, out: Path, name: str | None = None, core: int = 5,
            attribute_core: int = 5) -> Prepared:
    """Write the ``amazon-seq`` files of one Amazon category into ``out`` (a new or empty directory).

    Args:
        reviews: the reviews file (``reviews_Beauty_5.json.gz``, or 2018's ``Beauty_5.json.gz``).
        meta: its metadata file (``meta_Beauty.json.gz``).
        out: the directory to write; nothing is left there if anything fails.
        name: the files' stem (default: from the reviews file, ``Beauty``).
        core: the k-core cut on users and items (5: the 5-core sets are already cut).
        attribute_core: an attribute name is kept when at least this many items have it.
    """
    if core < 1 or attribute_core < 1:
        raise FedaugError("--core and --attribute-core must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedaugError(f"--out: {out} exists and is not an empty directory")
    name = name or dataset_name(reviews)
    kept = k_core(read_reviews(reviews), core)
    if not kept:
        raise DataError(reviews, f"no user and item has {core} reviews (--core)")

    histories: dict[str, list[tuple[int, str]]] = {}
    for user, item, time in kept:
        histories.setdefault(user, []).append((time, item))
    item_ids: dict[str, int] = {}
    for history in histories.values():
        history.sort(key=lambda event: event[0])  # stable: ties keep file order
        for _, item in history:
            item_ids.setdefault(item, len(item_ids) + 1)

    metadata = read_metadata(meta, set(item_ids))
    names = {asin: list(dict.fromkeys(([_clean(record["brand"])] if _clean(record.get("brand")) else [])
                                      + [_clean(c) for c in _categories(record) if _clean(c)]))
             for asin, record in metadata.items()}
    shared = Counter(attribute for attributes in names.values() for attribute in attributes)
    kept_names = {attribute for attribute, count in shared.items() if count >= attribute_core}
    titles = {asin: _clean(record.get("title")) for asin, record in metadata.items()}

    with staged_directory(out) as staging:
        files = _write(staging, name, histories, item_ids, names, kept_names, titles)
    return Prepared(users=len(histories), items=len(item_ids), events=len(kept), attributes=len(kept_names),
                    titled=sum(bool(titles.get(asin)) for asin in item_ids),
                    files=tuple(out / f.name for f in files),
                    expected=KNOWN_COUNTS.get(_stem(reviews)) if core == 5 else None)


def _write(directory: Path, name: str, histories, item_ids, names, kept_names, titles) -> list[Path]:
    sequences, times = directory / f"{name}.txt", directory / f"{name}_time.txt"
    attributes = directory / f"{name}_item_attributes_named.tsv"
    title_file = directory / f"{name}_item_titles.tsv"
    with sequences.open("w") as seq, times.open("w") as stamps:
        for user, history in enumerate(histories.values(), start=1):
            seq.write(" ".join([str(user), *(str(item_ids[item]) for _, item in history)]) + "\n")
            stamps.write(" ".join([str(user), *(str(time) for time, _ in history)]) + "\n")
    with attributes.open("w") as attrs, title_file.open("w") as text:
        attrs.write("item_id\tasin\tattributes\n")
        text.write("item_id\tasin\ttitle\n")
        for asin, item in item_ids.items():
            kept = [attribute.replace("|", "/") for attribute in names.get(asin, []) if attribute in kept_names]
            attrs.write(f"{item}\t{asin}\t{'|'.join(kept)}\n")
            text.write(f"{item}\t{asin}\t{titles.get(asin, '')}\n")
    return [sequences, times, attributes, title_file]

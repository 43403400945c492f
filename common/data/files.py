"""A user's file, read within limits: its size, its longest line and its item count are refused past a limit
(raised by environment) before anything is half-loaded, and text is decoded as UTF-8 with binary data and bad
encodings located by line and column. Both line formats (common/data/loaders.py) and the events files
(common/data/events.py) read through here."""

from __future__ import annotations

import os
from pathlib import Path

from fedaug.common.errors import DataError

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

"""Writing behaviour data back out in the formats the loaders read: an events CSV per merchant and the public
catalog as a catalog TSV (ids, titles where the data has item texts, attributes). `fedaug synth` uses it to hand
trial merchants files of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.data import EVENT_TYPES, BehaviorData, ItemCatalog
from fedaug.common.data.loaders import catalog_columns
from fedaug.common.data.split import merchant_partitions

CATALOG_FILE = "catalog.tsv"


def events_frame(data: BehaviorData) -> pd.DataFrame:
    """One row per event with raw user and item ids (the events format of fedaug.common.data.loaders)."""
    users = data.event_user()
    frame = pd.DataFrame({"user_id": data.user_ids[users], "item_id": data.catalog.raw_ids[data.items]})
    frame["timestamp"] = data.timestamps if data.timestamps is not None else np.arange(len(users), dtype=np.int64)
    if data.event_type is not None:
        frame["event_type"] = np.asarray(EVENT_TYPES)[data.event_type]
    for name, values in data.context.items():
        frame[name] = values
    return frame


def write_events_csv(data: BehaviorData, path: Path) -> None:
    write_bytes_atomic(path, events_frame(data).to_csv(index=False).encode())


def write_catalog_tsv(catalog: ItemCatalog, path: Path) -> None:
    """``item_id<TAB>attributes`` (names joined by '|'), with a ``title`` column before the attributes when the
    catalog has item texts (and a ``tags`` column for text its attributes do not give back), so that
    fedaug.common.data.loaders.load_catalog reads back the same items, attributes and texts."""
    columns = catalog_columns(catalog)
    titles = bool(catalog.texts)
    tags = any(tag for _, tag, _ in columns)
    lines = ["\t".join(["item_id"] + ["title"] * titles + ["tags"] * tags + ["attributes"])]
    for raw, (title, tag, names) in zip(catalog.raw_ids[1:], columns, strict=True):
        fields = [str(raw)] + [_one_field(title)] * titles + [_one_field(tag)] * tags
        lines.append("\t".join(fields + ["|".join(names)]))
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


def _one_field(text: str) -> str:
    """``text`` as one TSV field: no tabs or line breaks."""
    return " ".join(text.replace("\t", " ").splitlines())


def write_merchant_files(data: BehaviorData, out: Path) -> list[Path]:
    """``out/catalog.tsv`` and one ``out/merchant-<i>.csv`` per merchant of ``data`` (1-based, in merchant order)."""
    out = Path(out)
    write_catalog_tsv(data.catalog, out / CATALOG_FILE)
    paths = [out / CATALOG_FILE]
    for i, part in enumerate(merchant_partitions(data), start=1):
        paths.append(out / f"merchant-{i}.csv")
        write_events_csv(part, paths[-1])
    return paths

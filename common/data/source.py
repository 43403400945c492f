"""[data] and [synthetic] made real: the configured data set, the public catalog and the events file's schema.
The settings are fedaug.common.config.DataSection and SyntheticSection; this is where they meet the files."""

from __future__ import annotations

from fedaug.common.config import DataSection, SyntheticSection
from fedaug.common.data import BehaviorData, ItemCatalog, catalog_only
from fedaug.common.data.events import EventSchema
from fedaug.common.data.loaders import align_to_catalog, load, load_catalog, texts_from_file
from fedaug.common.data.split import k_core
from fedaug.common.data.synthetic import generate
from fedaug.common.errors import ConfigError


def event_schema(section: DataSection) -> EventSchema:
    """Which of the events file's columns is what ([data.columns]) and what its event names mean ([data.events])."""
    columns = section.columns
    return EventSchema(user=columns.user, item=columns.item, timestamp=columns.timestamp,
                       event_type=columns.event_type, merchant=columns.merchant, context=columns.context,
                       timestamp_unit=columns.timestamp_unit, names=columns.names, events=dict(section.events))


def load_data(section: DataSection, synthetic: SyntheticSection | None = None) -> BehaviorData:
    """The configured data set (the embedded synthetic one, as ``synthetic`` describes it, when no path is given),
    k-core filtered."""
    if section.path is None:
        data = generate(synthetic or SyntheticSection())
    else:
        data = load(section.path, section.format, timestamps=section.timestamps, attributes=section.attributes,
                    texts=section.texts if section.catalog is None else None, schema=event_schema(section))
        if section.catalog is not None:
            data = align_to_catalog(data, public_catalog(section), section.path, section.catalog)
    return k_core(data, section.k_core)


def load_catalog_data(section: DataSection) -> BehaviorData:
    """The aggregator's view in deployment: the public catalog alone, no users (enough to build the model, and
    with item texts the public text prior)."""
    if section.catalog is None:
        raise ConfigError("data.catalog: the aggregator needs the public item catalog to build the model")
    return catalog_only(public_catalog(section))


def public_catalog(section: DataSection) -> ItemCatalog:
    """``catalog`` with its item texts: its own text columns, or else the titles of ``texts``."""
    catalog = load_catalog(section.catalog, section.text_columns)
    return catalog if catalog.texts or section.texts is None else texts_from_file(catalog, section.texts)

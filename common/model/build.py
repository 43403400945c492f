"""[model] made real for one data set: the SASRec config, the catalog's attribute table, the model, and the
side-feature rows training reads. The settings are fedaug.common.config.ModelSection; this is where they meet
the data and torch."""

from __future__ import annotations

import numpy as np
import torch

from fedaug.common.config import ModelSection
from fedaug.common.data import BehaviorData
from fedaug.common.data.split import LeaveOneOut
from fedaug.common.errors import ConfigError
from fedaug.common.model.sasrec import SASRec, SASRecConfig


def build(section: ModelSection, data: BehaviorData) -> tuple[SASRecConfig, torch.Tensor | None]:
    """The model config for ``data`` and, for catalog models, its item-attribute table (public data)."""
    catalog = data.catalog
    has_attributes = bool(catalog.attributes and catalog.attribute_names and len(catalog.attribute_names) > 1)
    if section.catalog is False or (section.catalog == "auto" and not has_attributes):
        return SASRecConfig.from_section(section, data.n_items), None
    if not has_attributes:
        raise ConfigError("model.catalog: the data set has no item attributes (give data.attributes or set "
                          "model.catalog = false)")
    n_attributes = len(catalog.attribute_names) - 1
    width = max(max((len(a) for a in catalog.attributes), default=1), 1)
    table = torch.zeros((catalog.n_items + 1, width), dtype=torch.long)
    for item, attributes in enumerate(catalog.attributes):
        table[item, : len(attributes)] = torch.as_tensor(attributes, dtype=torch.long)
    return SASRecConfig.from_section(section, data.n_items, n_attributes), table


def build_model(section: ModelSection, data: BehaviorData) -> SASRec:
    """A freshly initialised model for ``data`` (seed torch first for a reproducible one)."""
    return SASRec(*build(section, data))


def train_features(section: ModelSection, split: LeaveOneOut) -> list[np.ndarray] | None:
    """The training users' side-feature rows this model reads (None: it reads none)."""
    reads = SASRecConfig.from_section(section, 1).side_features
    return split.train_features(section.context_columns) if reads else None


def describe(section: ModelSection, data: BehaviorData) -> str:
    """The model as built for ``data``, in words (reports)."""
    if section.kind != "sasrec":
        return section.kind
    cfg = build(section, data)[0]
    items = [f"catalog attributes ({cfg.n_attributes})"] if cfg.n_attributes else []
    if cfg.id_dim:
        items.append(f"item tables {cfg.id_dim} wide{', shared by input and output' if cfg.tie_embeddings else ''}")
    side = [name for name, used in (("behaviour", cfg.behaviour), ("time", cfg.time_context)) if used]
    side += list(cfg.context_columns)
    if side:
        items.append(f"side vectors ({', '.join(side)})")
    return f"SASRec hidden {cfg.hidden}, {cfg.blocks} blocks, " + " + ".join(items)

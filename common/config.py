"""Run configuration as TOML, validated with pydantic; errors name the file and the key.

Later sections (augment, privacy, federation) add themselves here; the CLI flags override file values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import tomllib
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .augment import SEQUENCE_OPS, USES, AugmentSettings
from .data import BehaviorData, catalog_only
from .errors import ConfigError
from .loaders import FORMATS, align_to_catalog, load, load_catalog
from .model import LOSSES, SASRec, SASRecConfig
from .split import k_core
from .synthetic import SyntheticSpec, generate
from .training import TrainSettings


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(Section):
    path: Path | None = None
    """Behaviour data file; absent means the embedded synthetic data."""
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]
    timestamps: Path | None = None
    attributes: Path | None = None
    catalog: Path | None = None
    """Deployment: the public item catalog shared by every party (common.loaders.load_catalog); the data's items
    are numbered by it, so every merchant's model has the aggregator's shapes. Its attributes replace
    ``attributes``."""
    k_core: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_attribute_source(self):
        if self.catalog is not None and self.attributes is not None:
            raise ValueError("give data.catalog or data.attributes, not both (the catalog carries the attributes)")
        return self


class SyntheticSection(Section):
    users: int = Field(SyntheticSpec.users, ge=10)
    items: int = Field(SyntheticSpec.items, ge=20)
    categories: int = Field(SyntheticSpec.categories, ge=1)
    merchants: int = Field(SyntheticSpec.merchants, ge=1)
    mean_length: float = Field(SyntheticSpec.mean_length, ge=5)
    seed: int = 0

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(**self.model_dump())


class ModelSection(Section):
    kind: Literal["sasrec", "pop"] = "sasrec"
    hidden: int = Field(64, ge=4)
    blocks: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    max_len: int = Field(50, ge=2)
    ffn_mult: int = Field(1, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    loss: Literal[LOSSES] = "ce"  # type: ignore[valid-type]
    negatives: int = Field(128, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    tie_embeddings: bool = True
    """Non-private default: share input and output item tables. Private (Opacus) training needs it off."""
    item_dim: int | None = Field(None, ge=0)
    """Width of the learned per-item tables; default hidden; 0 = none (catalog attributes only)."""
    catalog: bool | Literal["auto"] = False
    """Use the public catalog's item attributes as item features (input vectors and output scores); "auto": when
    the data set has them."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.item_dim == 0 and self.catalog is not True:
            raise ValueError("item_dim = 0 (no per-item tables) needs catalog = true")
        if self.tie_embeddings and (self.catalog is not False or self.item_dim not in (None, self.hidden)):
            raise ValueError("tie_embeddings needs item_dim = hidden and catalog = false")
        return self

    def sasrec(self, n_items: int, n_attributes: int = 0) -> SASRecConfig:
        return SASRecConfig(n_items=n_items, n_attributes=n_attributes, **self.model_dump(exclude={"kind", "catalog"}))

    def build(self, data: BehaviorData) -> tuple[SASRecConfig, torch.Tensor | None]:
        """The model config for ``data`` and, for catalog models, its item-attribute table (public data)."""
        catalog = data.catalog
        has_attributes = bool(catalog.attributes and catalog.attribute_names and len(catalog.attribute_names) > 1)
        if self.catalog is False or (self.catalog == "auto" and not has_attributes):
            return self.sasrec(data.n_items), None
        if not has_attributes:
            raise ConfigError("model.catalog: the data set has no item attributes (give data.attributes or set "
                              "model.catalog = false)")
        n_attributes = len(catalog.attribute_names) - 1
        width = max(max((len(a) for a in catalog.attributes), default=1), 1)
        table = torch.zeros((catalog.n_items + 1, width), dtype=torch.long)
        for item, attributes in enumerate(catalog.attributes):
            table[item, : len(attributes)] = torch.as_tensor(attributes, dtype=torch.long)
        return self.sasrec(data.n_items, n_attributes), table

    def model(self, data: BehaviorData) -> SASRec:
        return SASRec(*self.build(data))


class TrainSection(Section):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(5, ge=1)
    min_improvement: float = Field(0.01, ge=0)
    eval_every: int = Field(1, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    seed: int = 0

    def settings(self) -> TrainSettings:
        return TrainSettings(**self.model_dump())


class AugmentSection(Section):
    """[augment]: local augmentation, applied afresh every round (see common/augment.py)."""

    enabled: bool = True
    views: int = Field(1, ge=0, le=8)
    use_as: Literal[USES] = "next-item"  # type: ignore[valid-type]
    contrastive_weight: float = Field(0.1, ge=0)
    contrastive_negatives: int = Field(4, ge=1, le=64)
    temperature: float = Field(0.5, gt=0)
    ops: tuple[Literal[SEQUENCE_OPS], ...] = SEQUENCE_OPS  # type: ignore[valid-type]
    crop_eta: float = Field(0.6, gt=0, le=1)
    mask_gamma: float = Field(0.3, ge=0, le=1)
    reorder_beta: float = Field(0.3, ge=0, le=1)
    substitute_rate: float = Field(0.2, ge=0, le=1)
    insert_rate: float = Field(0.2, ge=0, le=1)
    short_length: int = Field(4, ge=0)
    similar_k: int = Field(10, ge=1)
    window: int = Field(2, ge=1)
    attribute_sigma: float = Field(0.01, ge=0)

    def settings(self) -> AugmentSettings | None:
        if not self.enabled or (self.views == 0 and self.attribute_sigma == 0):
            return None
        return AugmentSettings(**self.model_dump())


class BaselineConfig(Section):
    data: DataSection = DataSection()
    synthetic: SyntheticSection = SyntheticSection()
    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()
    device: str = "auto"

    def load_data(self) -> BehaviorData:
        """The configured data set (the embedded synthetic one when no path is given), k-core filtered."""
        if self.data.path is None:
            data = generate(self.synthetic.spec())
        else:
            data = load(self.data.path, self.data.format, timestamps=self.data.timestamps,
                        attributes=self.data.attributes)
            if self.data.catalog is not None:
                data = align_to_catalog(data, load_catalog(self.data.catalog), self.data.path, self.data.catalog)
        return k_core(data, self.data.k_core)

    def load_catalog(self) -> BehaviorData:
        """The aggregator's view in deployment: the public catalog alone, no users (enough to build the model)."""
        if self.data.catalog is None:
            raise ConfigError("data.catalog: the aggregator needs the public item catalog to build the model")
        return catalog_only(load_catalog(self.data.catalog))


def load_config(path: Path | None, overrides: dict | None = None, schema: type[Section] = BaselineConfig):
    """Read TOML ``path`` (or defaults when None), apply dotted-key ``overrides`` and validate."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: key {key!r} must be a table")
        node[leaf] = value
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        where = (f"{path}: " if path is not None else "") + (f"key {key}: " if key else "")
        message = error["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}{message}") from None

"""Model bundles: one directory that holds everything needed to recommend with a trained (or public) scorer.

    DIR/card.json           what the model is: format, fedaug version, the scorer's structure and settings, the
                            catalog's content hash, what trained it and the privacy it was trained under
    DIR/weights.safetensors every tensor of the scorer (SASRec weights, text vectors, DP statistics)
    DIR/items.json          the public catalog: the shop's own item ids (internal id i is ids[i - 1]) and titles

A bundle is written to a sibling temporary directory and renamed into place, so a reader sees the old bundle or
the new one, never half of one. Loading recomputes the catalog hash and checks the format and that no newer
fedaug (major.minor) wrote it; a mismatch is refused in one line. The scorers a bundle holds are the ones runs
evaluate (common/model/evaluate.py, text_prior.py, dp_counts.py, fusion.py, popularity.py), so a bundle reproduces its
run's metrics exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from fedaug.common.atomic import staged_directory
from fedaug.common.data import ItemCatalog
from fedaug.common.data.events import EventSchema
from fedaug.common.errors import ConfigError
from fedaug.common.model.evaluate import SASRecScorer, Scorer
from fedaug.common.model.metrics import json_number
from fedaug.common.model.sasrec import SASRec, SASRecConfig
from fedaug.common.priors.dp_counts import PriorWithCounts
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text_prior import TextPrior

FORMAT = 1
"""Bundle layout version; a bundle of another format is refused."""
CARD, WEIGHTS, ITEMS = "card.json", "weights.safetensors", "items.json"
FILES = (CARD, ITEMS, WEIGHTS)
"""A bundle's files, in the order its hash reads them."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedaug")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class BundleCatalog:
    """The public catalog as a bundle keeps it: the shop's item ids and, where known, their texts (titles)."""

    ids: list[str]
    """Raw item id of internal id ``i`` at ``ids[i - 1]``."""
    titles: list[str] | None = None

    @classmethod
    def of(cls, catalog: ItemCatalog) -> BundleCatalog:
        return cls([str(raw) for raw in catalog.raw_ids[1:].tolist()],
                   list(catalog.texts[1:]) if catalog.texts else None)

    def content_hash(self) -> str:
        blob = json.dumps({"ids": self.ids, "titles": self.titles}, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class BundleCard:
    """``card.json``: everything about the bundle but its tensors and items."""

    scorer: dict
    """The scorer's structure (kind, settings, nested parts), rebuilt by ``load_bundle``."""
    catalog_hash: str
    items: int
    trained: dict = field(default_factory=dict)
    """What trained it: mode, data summary, rounds, merchants, which round's model."""
    privacy: dict | None = None
    """ε, δ, unit, accountant (None: trained without DP)."""
    metrics: dict = field(default_factory=dict)
    """The run's figures for this model (valid / test), for reference."""
    text_encoder: str | None = None
    """The sentence encoder that made the text vectors ("packaged" or a directory), for query encoding."""
    parts: dict = field(default_factory=dict)
    """What the model is made of (fedaug.common.priors.composite): each part — text prior, DP statistics, trained model
    — with its weight and settings, and how they were chosen."""
    data: dict | None = None
    """The shop's vocabulary the model was trained with ([data.columns] and [data.events]: column names, event
    names, timestamp unit; fedaug.common.data.events.EventSchema), which serving applies to histories (None: an older
    bundle, the default vocabulary)."""
    fedaug_version: str = field(default_factory=_version)
    format: int = FORMAT
    created: float = field(default_factory=time.time)

    def schema(self) -> EventSchema:
        """The event-file mapping the model was trained with (the default one for a bundle that carries none)."""
        if not self.data:
            return EventSchema()
        try:
            return EventSchema(**{name: tuple(value) if isinstance(value, list) else value
                                  for name, value in self.data.items()})
        except TypeError as exc:
            raise ConfigError(f"bundle card: malformed data mapping ({exc})") from None


@dataclass
class Bundle:
    card: BundleCard
    catalog: BundleCatalog
    scorer: Scorer
    path: Path | None = None


# scorer <-> (structure, tensors) ---------------------------------------------------------------------------------


def _describe(scorer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    def put(name: str, tensor) -> None:
        tensors[f"{prefix}{name}"] = torch.as_tensor(tensor).detach().cpu().clone().contiguous()  # tied: own copy

    if isinstance(scorer, Fused):
        return {"kind": "fused", "weight": json_number(scorer.weight),
                "model": _describe(scorer.model, f"{prefix}model.", tensors),
                "prior": _describe(scorer.prior, f"{prefix}prior.", tensors)}
    if isinstance(scorer, SASRecScorer):
        model = scorer.model
        for name, value in model.state_dict().items():
            put(f"weight.{name}", value)
        if hasattr(model, "item_attributes"):
            put("item_attributes", model.item_attributes)
        return {"kind": "sasrec", "config": dataclasses.asdict(model.cfg)}
    if isinstance(scorer, TextPrior):
        put("vectors", scorer.vectors)
        return {"kind": "text", "decay": scorer.decay, "window": scorer.window}
    if isinstance(scorer, PriorWithCounts):
        put("popularity", scorer.popularity)
        put("pairs", scorer.pairs)
        put("neighbours", scorer.neighbours)
        return {"kind": "text+statistics", "prior": _describe(scorer.prior, f"{prefix}prior.", tensors),
                "popularity_weight": scorer.popularity_weight, "pair_weight": scorer.pair_weight,
                "threshold": scorer.threshold, "popularity_threshold": scorer.popularity_threshold,
                "pair_window": scorer.pair_window}
    if isinstance(scorer, Popularity):
        put("counts", scorer.counts)
        return {"kind": "popularity"}
    raise TypeError(f"no bundle form for a {type(scorer).__name__} scorer")


def _rebuild(spec: dict, prefix: str, tensors: dict[str, torch.Tensor], device) -> Scorer:
    kind = spec.get("kind")
    if kind == "fused":
        return Fused(_rebuild(spec["model"], f"{prefix}model.", tensors, device),
                     _rebuild(spec["prior"], f"{prefix}prior.", tensors, device), float(spec["weight"]))
    if kind == "sasrec":
        config = SASRecConfig(**spec["config"])
        attributes = tensors.get(f"{prefix}item_attributes")
        model = SASRec(config, attributes)
        own = f"{prefix}weight."
        weights = {k.removeprefix(own): v for k, v in tensors.items() if k.startswith(own)}
        model.load_state_dict(weights)
        return SASRecScorer(model.to(device).eval(), device)
    if kind == "text":
        return TextPrior(tensors[f"{prefix}vectors"], decay=float(spec["decay"]), window=int(spec["window"]),
                         device=device)
    if kind == "text+statistics":
        prior = _rebuild(spec["prior"], f"{prefix}prior.", tensors, device)
        return PriorWithCounts(prior, tensors[f"{prefix}popularity"], tensors[f"{prefix}pairs"],
                               tensors[f"{prefix}neighbours"], popularity_weight=spec["popularity_weight"],
                               pair_weight=spec["pair_weight"], threshold=spec["threshold"],
                               popularity_threshold=spec.get("popularity_threshold", 0.0),  # older bundles: none
                               pair_window=spec["pair_window"])
    if kind == "popularity":
        return Popularity.restore(tensors[f"{prefix}counts"])
    raise ConfigError(f"bundle scorer: unknown kind {kind!r}")


# writing and loading ---------------------------------------------------------------------------------------------


def bundle_files(scorer: Scorer, catalog: ItemCatalog, *, trained: dict | None = None, privacy: dict | None = None,
                 metrics: dict | None = None, text_encoder: str | None = None, parts: dict | None = None,
                 schema: EventSchema | None = None) -> dict[str, bytes]:
    """The bundle of ``scorer`` over ``catalog`` as its files' bytes (what ``write_bundle`` writes, and what a
    federation sends its merchants); ``schema``: the event-file mapping the model was trained with."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _describe(scorer, "", tensors)
    items = BundleCatalog.of(catalog)
    card = BundleCard(scorer=structure, catalog_hash=items.content_hash(), items=len(items.ids),
                      trained=trained or {}, privacy=privacy, metrics=metrics or {}, text_encoder=text_encoder,
                      parts=parts or {}, data=None if schema is None else dataclasses.asdict(schema))
    return {WEIGHTS: save(tensors, metadata={"format": str(FORMAT)}),
            ITEMS: (json.dumps(dataclasses.asdict(items), ensure_ascii=False) + "\n").encode(),
            CARD: (json.dumps(dataclasses.asdict(card), indent=2, default=_plain) + "\n").encode()}


def write_bundle(directory, scorer: Scorer, catalog: ItemCatalog, **card) -> Path:
    """Write ``scorer`` over ``catalog`` as a bundle at ``directory`` (atomically replacing one already there);
    ``card``: the keyword arguments of ``bundle_files``."""
    return write_bundle_files(directory, bundle_files(scorer, catalog, **card))


def write_bundle_files(directory, files: dict[str, bytes]) -> Path:
    """Put a bundle's files in place atomically, after checking they load (a damaged bundle never replaces a good
    one)."""
    directory = Path(directory)
    if set(files) != {CARD, WEIGHTS, ITEMS}:
        raise ConfigError(f"{directory}: a bundle is exactly {CARD}, {WEIGHTS} and {ITEMS}, got {sorted(files)}")
    with staged_directory(directory) as staging:  # a reader mid-swap retries: see ``load_bundle``
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        load_bundle(staging)
    return directory


def bundle_bytes(directory) -> dict[str, bytes]:
    """A bundle's files as bytes (to copy it exactly: the same content hash)."""
    return {name: (Path(directory) / name).read_bytes() for name in (CARD, WEIGHTS, ITEMS)}


def bundle_hash(directory) -> str:
    """One content hash of a bundle's files (what two parties compare to know they hold the same model)."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(name.encode() + b"\0" + (Path(directory) / name).read_bytes())
    return digest.hexdigest()


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_card(directory) -> BundleCard:
    path = Path(directory) / CARD
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory}: not a fedaug model bundle (no {CARD})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable bundle card ({exc})") from None
    if raw.get("format") != FORMAT:
        raise ConfigError(f"{path}: bundle format {raw.get('format')!r}, this fedaug ({_version()}) reads format "
                          f"{FORMAT}")
    try:
        card = BundleCard(**raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: malformed bundle card ({exc})") from None
    if _newer(card.fedaug_version, _version()):
        raise ConfigError(f"{path}: written by fedaug {card.fedaug_version}, this is fedaug {_version()} "
                          "(upgrade fedaug to load it)")
    return card


def _newer(written: str, running: str) -> bool:
    """Was the bundle written by a newer release (major.minor) than the one running? Unknown versions pass."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(written).release[:2] > Version(running).release[:2]
    except InvalidVersion:
        return False


def load_bundle(directory, device="cpu", catalog: ItemCatalog | None = None) -> Bundle:
    """Load a bundle; refuse (one line, ConfigError) a wrong format, a catalog whose content does not match the
    card's hash, or — when ``catalog`` is given — a bundle made for another catalog."""
    directory = Path(directory)
    card = read_card(directory)
    try:
        items = BundleCatalog(**json.loads((directory / ITEMS).read_text()))
        tensors = load_file(str(directory / WEIGHTS))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"{directory}: unreadable bundle ({exc})") from None
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ConfigError(f"{directory / WEIGHTS}: unreadable weights ({exc})") from None
    if items.content_hash() != card.catalog_hash:
        raise ConfigError(f"{directory / ITEMS}: catalog hash {items.content_hash()[:12]} does not match the card's "
                          f"{card.catalog_hash[:12]} (the bundle was altered or is incomplete)")
    if catalog is not None and BundleCatalog.of(catalog).content_hash() != card.catalog_hash:
        raise ConfigError(f"{directory}: made for another catalog (hash {card.catalog_hash[:12]}, this catalog's "
                          f"{BundleCatalog.of(catalog).content_hash()[:12]})")
    try:
        scorer = _rebuild(card.scorer, "", tensors, device)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"{directory}: bundle weights do not fit its card ({exc})") from None
    return Bundle(card, items, scorer, directory)

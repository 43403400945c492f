"""A model bundle checked on someone's own data, locally: the bundle's test figures beside the public text prior's
and popularity's, and its paired per-user gain over the prior (what `fedaug evaluate` prints and what a merchant's
daemon writes when the federation's final model arrives; nothing leaves the machine, so no ε is spent).

The data is put on the bundle's catalog by the shop's raw item ids (``items.json``), so a file loaded without the
catalog is numbered as the bundle is; an item the bundle does not know is an error naming the item and the file
(dropping it would change histories and targets, and with them the figures). On the leave-one-out split the
figures are exactly those a run reports for the same scorer and data (common/model/evaluate.py ``tested``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedaug.common.config import DataPart, SyntheticPart, TextSection, load_config, read_toml
from fedaug.common.data import BehaviorData, ItemCatalog
from fedaug.common.data.loaders import align_to_catalog
from fedaug.common.data.split import MIN_EVALUABLE, leave_one_out
from fedaug.common.errors import FedaugError
from fedaug.common.model.evaluate import Scorer, Tested, tested
from fedaug.common.model.metrics import json_number, paired_gain
from fedaug.common.priors.dp_counts import PriorWithCounts
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import TextPrior, fit_text_prior
from fedaug.common.recommend.bundle import ITEMS, Bundle, BundleCatalog


class CheckConfig(DataPart, SyntheticPart):
    """`fedaug evaluate --config`: the [data] table (the file and its columns), [text] (a text prior from the data's
    item texts, for a bundle that holds none), [synthetic] and ``device``; other tables are not read."""


TABLES = ("data", "text", "synthetic", "device")
"""The top-level keys of a TOML that ``CheckConfig`` reads (a full run config can be given as it is)."""


@dataclass(frozen=True)
class ModelCheck:
    test: dict
    """The bundle's test metrics (``evaluate(scorer, split, "test")``: HR/NDCG@5/10/20, AUC, users)."""
    popularity: dict
    text_prior: dict | None
    """None: the bundle holds no text prior and none could be built from the data's texts."""
    gain_over_text_prior: dict | None
    """The bundle's paired per-user gain in test NDCG@10 over the text prior: gain, low, high (95 %), users."""
    bundle: dict
    """The card: scorer kind, what trained it, its privacy; and the bundle's path."""
    prior_source: str | None = None
    """Where the text prior came from: "bundle" (its own vectors, decay and window) or "data" (encoded here)."""

    def to_json(self) -> dict:
        gain = self.gain_over_text_prior
        return {"test": self.test, "text_prior": self.text_prior, "popularity": self.popularity,
                "gain_over_text_prior": None if gain is None else {k: json_number(v) for k, v in gain.items()},
                "text_prior_source": self.prior_source, "bundle": self.bundle}

    def lines(self) -> list[str]:
        """The check as a few plain lines (a merchant daemon's commentary)."""
        rows = [("model", self.test), ("text prior", self.text_prior), ("popularity", self.popularity)]
        out = [f"{name}: test NDCG@10 {m['ndcg@10']:.4f}  HR@10 {m['hr@10']:.4f}" for name, m in rows if m]
        out[0] += f"  ({self.test['users']:,} held-out users)"
        if self.gain_over_text_prior:
            out.append(f"gain over the text prior (NDCG@10 per user, 95 % interval): {gain_text(self)}")
        return out


def gain_text(check: ModelCheck) -> str:
    g = check.gain_over_text_prior
    return f"{g['gain']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}]" if g else "—"


def on_bundle_catalog(data: BehaviorData, bundle: Bundle, source: str | Path | None = None) -> BehaviorData:
    """``data`` numbered by the bundle's catalog, matched by the shop's raw item ids; a data item the bundle does not
    know is a DataError naming it and ``source`` (the data file). Data already on that catalog is returned as is."""
    if BundleCatalog.of(data.catalog).content_hash() == bundle.card.catalog_hash:
        return data
    ids, titles = bundle.catalog.ids, bundle.catalog.titles
    catalog = ItemCatalog(raw_ids=np.array(["", *ids], dtype=object), texts=["", *titles] if titles else None)
    where = Path(bundle.path) / ITEMS if bundle.path is not None else "the bundle's catalog"
    return align_to_catalog(data, catalog, source or "data", where)


def text_prior_of(scorer: Scorer) -> TextPrior | None:
    """The public text prior inside a bundle's scorer (the scorer itself, a fusion's prior, the prior under DP
    statistics), or None."""
    if isinstance(scorer, Fused):
        return text_prior_of(scorer.prior)
    if isinstance(scorer, PriorWithCounts):
        return text_prior_of(scorer.prior)
    return scorer if isinstance(scorer, TextPrior) else None


def check_model(bundle: Bundle, data: BehaviorData, *, text: TextSection | None = None, device="cpu",
                source: str | Path | None = None, on_stage: Callable[[str], None] | None = None) -> ModelCheck:
    """``bundle`` tested on ``data``'s held-out users (leave-one-out), beside the text prior — the bundle's own
    when it holds one, else encoded from the data's item texts with ``text`` when given — and popularity over the
    split's training events. ``source``: the data file, for errors."""
    stage = on_stage or (lambda _: None)
    data = on_bundle_catalog(data, bundle, source)
    split = leave_one_out(data)
    if not len(split.eval_users("test")):
        raise FedaugError(f"{source or 'data'}: no user has the {MIN_EVALUABLE} events a test needs (training "
                          "history, validation item, test item)")
    stage("model")
    model = tested(bundle.scorer, split)
    prior, prior_source = text_prior_of(bundle.scorer), "bundle"
    if prior is None and text is not None and data.catalog.texts:
        stage("text prior (encoding the item texts)")
        prior, _ = fit_text_prior(catalog_vectors(text, data, device, progress=False), split, decay=text.decay,
                                  window=text.window, device=device)
        prior_source = "data"
    prior_test = None
    if prior is not None:
        stage("text prior")
        prior_test = model if prior is bundle.scorer else tested(prior, split)
    stage("popularity")
    popularity = tested(Popularity(split.train), split)
    gain = (paired_gain(model.per_user["ndcg@10"], prior_test.per_user["ndcg@10"])
            if prior_test is not None else None)
    card = bundle.card
    return ModelCheck(test=_figures(model), popularity=_figures(popularity),
                      text_prior=None if prior_test is None else _figures(prior_test),
                      gain_over_text_prior=gain,
                      bundle={"kind": card.scorer.get("kind"), "trained": card.trained, "privacy": card.privacy,
                              "path": None if bundle.path is None else str(bundle.path)},
                      prior_source=prior_source if prior_test is not None else None)


def _figures(result: Tested) -> dict:
    """What ``evaluate(scorer, split, "test")`` returns, from the per-user figures already computed."""
    return result.all | {"users": result.users}


def read_check_config(path: Path | None, overrides: dict, flags: dict | None = None) -> CheckConfig:
    """``CheckConfig`` from the TOML at ``path`` (only its TABLES) with dotted ``overrides`` (None: not given)."""
    raw = {k: v for k, v in read_toml(path).items() if k in TABLES} if path is not None else {}
    return load_config(None, overrides, CheckConfig, flags=flags, where=str(path) if path else None, raw=raw)

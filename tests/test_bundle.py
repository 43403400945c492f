"""Model bundles: every scorer a run evaluates round-trips through a bundle with identical scores; damaged,
foreign or future bundles are refused in one line; a bundle is replaced atomically."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedaug.common.config import ModelSection, SyntheticSection
from fedaug.common.data.split import leave_one_out
from fedaug.common.data.synthetic import generate
from fedaug.common.errors import ConfigError
from fedaug.common.model.build import build_model
from fedaug.common.model.evaluate import evaluate, sasrec_scorer
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.dp_counts import PriorWithCounts, bounded_counts, noised, text_neighbours
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.recommend.bundle import (
    CARD,
    ITEMS,
    WEIGHTS,
    bundle_files,
    bundle_hash,
    load_bundle,
    write_bundle,
    write_bundle_files,
)
from tests.support import model_config


@pytest.fixture(scope="module")
def split():
    return leave_one_out(generate(SyntheticSection(users=120, items=60, titles=False)))


def _vectors(n_items: int) -> np.ndarray:
    vectors = np.random.default_rng(0).normal(size=(n_items + 1, 8)).astype(np.float32)
    vectors[0] = 0
    vectors[1:] /= np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    return vectors


def _scorers(split):
    torch.manual_seed(0)
    n = split.n_items
    model = SASRec(model_config(n, hidden=16, max_len=10, item_dim=8))
    sasrec = sasrec_scorer(model, "cpu")
    prior = TextPrior(_vectors(n), decay=0.25, window=5)
    neighbours = text_neighbours(prior.vectors.numpy(), 5)
    counts = noised(bounded_counts(split.train.sequences(), neighbours, max_items=4, max_pairs=2),
                    noise_multiplier=0.5, max_items=4, max_pairs=2, rng=np.random.default_rng(1))
    with_counts = PriorWithCounts.from_counts(prior, counts, neighbours, popularity_weight=0.1, pair_weight=0.3,
                                              threshold=1.0)
    catalog_model = build_model(ModelSection(hidden=16, max_len=10, catalog=True, tie_embeddings=False), split.train)
    return {"sasrec": sasrec, "sasrec+catalog": sasrec_scorer(catalog_model, "cpu"), "text": prior,
            "popularity": Popularity(split.train), "text+statistics": with_counts,
            "fused": Fused(sasrec, with_counts, 2.0), "fused+prior-alone": Fused(sasrec, with_counts, math.inf)}


@pytest.mark.parametrize("kind", ["sasrec", "sasrec+catalog", "text", "popularity", "text+statistics", "fused",
                                  "fused+prior-alone"])
def test_every_scorer_round_trips_with_identical_scores(split, tmp_path, kind):
    scorer = _scorers(split)[kind]
    path = write_bundle(tmp_path / "model", scorer, split.train.catalog, trained={"mode": "test"},
                        metrics={"test": evaluate(scorer, split, "test")})
    bundle = load_bundle(path)
    assert bundle.card.scorer["kind"] == kind.removesuffix("+catalog").removesuffix("+prior-alone")
    assert bundle.card.items == split.n_items
    histories, _ = split.eval_inputs("test")
    assert torch.equal(bundle.scorer(histories[:32]), scorer(histories[:32]))
    assert evaluate(bundle.scorer, split, "test") == bundle.card.metrics["test"]
    assert bundle.catalog.ids == [str(i) for i in split.train.catalog.raw_ids[1:].tolist()]


def test_damaged_foreign_and_future_bundles_are_refused(split, tmp_path):
    path = write_bundle(tmp_path / "model", _scorers(split)["text"], split.train.catalog)
    items = json.loads((path / ITEMS).read_text())
    items["ids"][0] = "someone-else"
    (path / ITEMS).write_text(json.dumps(items))
    with pytest.raises(ConfigError, match=r"items.json: catalog hash \w+ does not match the card's"):
        load_bundle(path)
    other = generate(SyntheticSection(users=50, items=40, titles=False)).catalog
    path = write_bundle(tmp_path / "model", _scorers(split)["text"], split.train.catalog)
    with pytest.raises(ConfigError, match="made for another catalog"):
        load_bundle(path, catalog=other)
    card = json.loads((path / CARD).read_text())
    (path / CARD).write_text(json.dumps(card | {"format": 99}))
    with pytest.raises(ConfigError, match="bundle format 99, this fedaug .* reads format 1"):
        load_bundle(path)
    (path / CARD).write_text(json.dumps(card | {"fedaug_version": "99.0.0"}))
    with pytest.raises(ConfigError, match=r"written by fedaug 99.0.0, this is fedaug .*upgrade"):
        load_bundle(path)
    with pytest.raises(ConfigError, match="not a fedaug model bundle"):
        load_bundle(tmp_path / "nothing")


def test_a_bundle_is_replaced_whole_or_not_at_all(split, tmp_path):
    scorers = _scorers(split)
    path = write_bundle(tmp_path / "model", scorers["text"], split.train.catalog)
    before = bundle_hash(path)
    files = bundle_files(scorers["sasrec"], split.train.catalog)
    with pytest.raises(ConfigError):
        write_bundle_files(path, files | {WEIGHTS: b"not safetensors"})
    assert bundle_hash(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    write_bundle_files(path, files)
    assert load_bundle(path).card.scorer["kind"] == "sasrec"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left aside

"""The public text prior: item texts found beside the data, the encoder loaded from a local directory (a tiny one
this test builds, and the packaged all-MiniLM-L6-v2 where installed), vectors cached by content, and the
history → text-similarity ranking of `fedaug baseline --model text`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedaug.common.data.loaders import load
from fedaug.common.errors import ConfigError, DataError
from fedaug.common.priors import text
from fedaug.common.priors.text_prior import TextPrior
from tests.support import fedaug, finish, tiny_encoder, write_amazon_set


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("tiny"))


def test_vectors_are_unit_cached_and_keyed_by_encoder_and_texts(encoder, tmp_path, monkeypatch):
    texts = ["", "red nail polish", "blue lipstick", ""]
    vectors = text.item_vectors(texts, encoder=encoder, cache_dir=tmp_path, progress=False)
    assert vectors.shape == (4, 16) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), [0, 1, 1, 0], atol=1e-5)  # padding, no text: zero
    assert len(list(tmp_path.glob("items-*.npy"))) == 1

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(text, "_encode", no_encoding)
    assert np.array_equal(text.item_vectors(texts, encoder=encoder, cache_dir=tmp_path), vectors)  # the cache
    with pytest.raises(AssertionError, match="encoded again"):  # other texts: another key
        text.item_vectors(["", "green shampoo"], encoder=encoder, cache_dir=tmp_path)
    (encoder / "extra.txt").write_text("a changed model directory")
    try:
        with pytest.raises(AssertionError, match="encoded again"):  # another encoder: another key
            text.item_vectors(texts, encoder=encoder, cache_dir=tmp_path)
    finally:
        (encoder / "extra.txt").unlink()


def test_a_directory_that_is_no_encoder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"text.encoder: .* is not a sentence-transformers model directory"):
        text.item_vectors(["", "x"], encoder=tmp_path, cache_dir=tmp_path)


def test_item_texts_are_found_beside_the_data(tmp_path):
    data = load(write_amazon_set(tmp_path))
    raw = {int(r): t for r, t in zip(data.catalog.raw_ids, data.catalog.texts, strict=True)}
    assert raw[1] == "red nail polish | brand | red" and raw[4] == "blue shampoo | brand | blue"
    assert data.catalog.texts[0] == ""


def test_a_bad_item_text_file_names_file_and_line(tmp_path):
    path = write_amazon_set(tmp_path)
    (tmp_path / "Shop_item_titles.tsv").write_text("item_id\tasin\ttitle\n1\tA1\tred\n \tA2\tblue\n")
    with pytest.raises(DataError, match=r"Shop_item_titles.tsv, line 3, column item_id: empty item id"):
        load(path)
    (tmp_path / "Shop_item_titles.tsv").write_text("item_id\tname\n1\tred\n")
    with pytest.raises(DataError, match=r"Shop_item_titles.tsv, line 1: header names no 'title' or 'text'"):
        load(path)


def test_the_prior_ranks_by_text_similarity_to_the_recent_history():
    vectors = np.zeros((5, 3), np.float32)
    vectors[1:] = [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1]]
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    last_only = TextPrior(vectors, decay=0.0)
    scores = last_only([np.array([1, 3]), np.array([3, 1])])
    assert scores[0, 4] > scores[0, 2] and scores[1, 2] > scores[1, 4]  # more like the last item
    blended = TextPrior(vectors, decay=1.0)([np.array([1, 3])])
    assert blended[0, 2] == pytest.approx(float(vectors[2] @ (vectors[1] + vectors[3])))


@pytest.mark.integration  # `fedaug baseline` as a process
def test_baseline_text_end_to_end(encoder, tmp_path):
    data = write_amazon_set(tmp_path)
    config = tmp_path / "text.toml"
    config.write_text(f'[text]\nencoder = "{encoder}"\ncache_dir = "{tmp_path / "cache"}"\n')
    out = tmp_path / "run"
    output = finish(fedaug("baseline", "--model", "text", "--data", str(data), "--config", str(config),
                           "--out", str(out)), 120)
    assert "text: test NDCG@10" in output, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["decay"] for row in metrics["history"]] == [0.0, 0.25, 0.5, 0.75]  # chosen on validation
    assert metrics["test"]["ndcg@10"] > 0 and metrics["test_users"] == 60
    assert metrics["config"]["model"]["kind"] == "text"


@pytest.mark.integration  # `fedaug baseline` as a process
def test_baseline_text_without_item_texts_fails_in_one_line(tmp_path):
    (tmp_path / "Bare.txt").write_text("1 1 2 3 4\n2 2 3 4 1\n")
    out = tmp_path / "run"
    output = finish(fedaug("baseline", "--model", "text", "--data", str(tmp_path / "Bare.txt"), "--out", str(out)),
                    60)
    assert "error: data.texts: the data set has no item texts" in output and not out.exists()


def test_the_packaged_encoder_knows_what_is_alike(tmp_path):
    texts = ["", "Red nail polish, glossy lacquer", "Crimson nail lacquer", "Beard oil for men"]
    vectors = text.item_vectors(texts, cache_dir=tmp_path, progress=False)
    assert vectors.shape == (4, 384)
    assert vectors[1] @ vectors[2] > vectors[1] @ vectors[3] + 0.2


@pytest.mark.slow
def test_a_federation_fuses_the_prior_and_the_merchants_dp_statistics(encoder, tmp_path):
    """On data with item texts a simulation collects every merchant's DP statistics once (ledgered under
    RUN/statistics after the selection's reservation, within the budget), hands out the global model fused with
    the prior at the weight the merchants' DP evaluation chose, and reports the text prior beside popularity."""
    import sqlite3

    data = write_amazon_set(tmp_path)
    config = tmp_path / "sim.toml"
    config.write_text(f'[text]\nencoder = "{encoder}"\ncache_dir = "{tmp_path / "cache"}"\n'
                      "[model]\nhidden = 16\nmax_len = 10\n[local]\nbatch_size = 8\n"
                      "[federation]\nstatistics_neighbours = 3\n")
    out = tmp_path / "run"
    output = finish(fedaug("simulate", "--data", str(data), "--config", str(config), "--merchants", "3",
                           "--rounds", "2", "--epsilon", "4", "--out", str(out)), 600)
    assert "federated: test NDCG@10" in output, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert "text prior" in metrics["baselines"] and "popularity" in metrics["baselines"]
    # The statistics of all three merchants, released once, are in what every round scores: the prior with them,
    # the model at the prior's weight ∞ (a private round measures no gain for it), so both rounds validate the same
    # composite, and it is not the text prior alone.
    statistics = metrics["parts"]["statistics"]
    assert metrics["selection"] == "private" and statistics["merchants"] == 3
    assert statistics["items_kept"] + statistics["pairs_kept"] > 0
    assert [r["fusion_weight"] for r in metrics["rounds"]] == ["inf", "inf"]
    composite = [r["valid"]["ndcg@10"] for r in metrics["rounds"]]
    assert composite[0] == composite[1] != metrics["baselines_valid"]["text prior"]["ndcg@10"]
    # The bundle's model weight is the one the merchants' DP evaluation chose, and the gain is over the text prior
    # reported beside it.
    assert metrics["parts"]["model"]["weight"] == metrics["parts"]["model"]["evaluation"]["weight"]
    assert metrics["gain_over_text"]["final"]["gain_over_text_prior"]["gain"] == pytest.approx(
        metrics["test"]["ndcg@10"] - metrics["baselines"]["text prior"]["ndcg@10"], abs=1e-12)
    for merchant in range(3):
        ledger = sqlite3.connect(out / "state" / f"merchant-{merchant}" / "privacy-ledger.sqlite")
        runs = [row[0] for row in ledger.execute("SELECT run_id FROM rounds ORDER BY id")]
        # the selection's reservation and the statistics first, then two DP-SGD rounds
        assert runs[0].endswith("/selection") and runs[1].endswith("/statistics") and len(runs) == 4
        assert list(ledger.execute("SELECT MAX(epsilon) FROM rounds"))[0][0] <= 4.0 * (1 + 1e-9)
    assert metrics["privacy"]["epsilon_max"] <= 4.0 * (1 + 1e-9)
    report = (out / "report.md").read_text()
    assert "| text prior |" in report and "(kept)" not in report  # a private run keeps no best round
    # The bundle is the tested scorer (the prior, the statistics and the model at the evaluation's weight).
    from fedaug.common.data.loaders import load
    from fedaug.common.recommend.recommender import Recommender
    from fedaug.simulations.serving_eval import reproduce_test

    # The final and the best round's figures come from their own weights (their scorers share no model).
    assert metrics["gain_over_text"]["final"]["test_ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-12)
    if metrics["best_round"] != 2 and metrics["selection"] != "private":  # a private run keeps no best round
        assert metrics["gain_over_text"]["best"]["test_ndcg@10"] == pytest.approx(metrics["best_test"]["ndcg@10"],
                                                                                   abs=1e-12)
    bundle = Recommender.load(out / "model", device="cpu")
    assert float(bundle.bundle.card.scorer["weight"]) == bundle.bundle.card.parts["model"]["evaluation"]["weight"]
    reproduced = reproduce_test(bundle, load(data))
    assert reproduced["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-12)
    interval = metrics["gain_over_text"]["final"]["gain_over_text_prior"]
    assert interval["low"] <= interval["gain"] <= interval["high"] and interval["users"] == 60
    assert "best" not in metrics["gain_over_text"]  # a private run keeps no best round: nothing chose one

"""Recommendations out of a bundle: the Python API (shop ids in and out, exclusions, explanations, search), the
batch CLI, and the HTTP service (validation in one line, micro-batching, a new bundle picked up mid-traffic; cold
start, search without a match, the body limit, offline /docs, response schemas, unknown fields, metric labels)."""

from __future__ import annotations

import csv
import json
import re
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from fedaug.common.data.events import EventSchema
from fedaug.common.data.loaders import load
from fedaug.common.errors import ConfigError
from fedaug.common.model.evaluate import sasrec_scorer
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.recommend.bundle import bundle_hash, write_bundle
from fedaug.common.recommend.recommender import Activity, Recommender, UnknownItems
from fedaug.serving.http import create_app
from tests.support import fedaug, finish, model_config, write_amazon_set


def _text_vectors(data) -> np.ndarray:
    """Hand-made unit vectors: the red items (1-3) along one axis, the blue ones (4-6) along another."""
    vectors = np.zeros((data.n_items + 1, 3), np.float32)
    for internal, text in enumerate(data.catalog.texts[1:], start=1):
        vectors[internal] = [1, 0, 0.1 * internal] if text.startswith("red") else [0, 1, 0.1 * internal]
    vectors[1:] /= np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    return vectors


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shop")
    data = load(write_amazon_set(directory))
    prior = write_bundle(directory / "text", TextPrior(_text_vectors(data), decay=0.0), data.catalog)
    torch.manual_seed(0)
    sasrec = write_bundle(directory / "sasrec", sasrec_scorer(SASRec(model_config(data.n_items, hidden=8,
                                                                                  max_len=5)), "cpu"), data.catalog)
    return directory, data, prior, sasrec


def test_recommendations_speak_shop_ids_exclude_the_history_and_say_why(shop):
    _, data, prior, _ = shop
    rec = Recommender.load(prior, device="cpu")
    red = [str(data.catalog.raw_ids[i]) for i in (1, 2)]
    top = rec.recommend(red, k=3, explain=True)
    assert [r.item for r in top][0] == str(data.catalog.raw_ids[3])  # the remaining red item first
    assert not set(red) & {r.item for r in top} and top[0].title.startswith("red")
    # The last item alone drives a decay-0 prior: leaving it out changes the score, the older one does not.
    because = {b.item: b.contribution for b in top[0].because}
    assert because[red[1]] != 0 and because[red[0]] == pytest.approx(0, abs=1e-6)
    assert [r.item for r in rec.recommend(red, k=6, exclude_seen=False)][:2] != [r.item for r in top][:2]
    with pytest.raises(UnknownItems, match="history: unknown item id.*'nope'"):
        rec.recommend([red[0], "nope"])
    many = rec.recommend_many([red, red[:1]], k=2)
    assert [r.item for r in many[0]] == [r.item for r in top[:2]] and len(many[1]) == 2


def test_search_alone_and_personalised(shop):
    _, data, prior, _ = shop
    rec = Recommender.load(prior, device="cpu")  # no encoder on the card: BM25 over the titles
    found = rec.search("blue shampoo", k=2)
    assert found[0].title.startswith("blue shampoo")
    blue_history = [str(data.catalog.raw_ids[5])]
    red_history = [str(data.catalog.raw_ids[1])]
    # "hair oil" matches a red and a blue item equally; the history decides which comes first.
    assert rec.recommend(blue_history, k=1, query="hair oil")[0].title.startswith("blue hair oil")
    assert rec.recommend(red_history, k=1, query="hair oil")[0].title.startswith("red hair oil")


@pytest.mark.integration  # `fedaug recommend` as a process
def test_batch_recommendations_write_one_row_per_user(shop, tmp_path):
    directory, data, prior, _ = shop
    out = tmp_path / "recs.csv"
    output = finish(fedaug("recommend", "--model", str(prior), "--users", str(directory / "Shop.txt"), "-k", "3",
                           "--out", str(out)), 120)
    assert f"{data.n_users} users" in output, output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == data.n_users and all(len(r["items"].split()) == 3 for r in rows)
    assert rows[0]["user"] == str(data.user_ids[0]) and rows[0]["unknown"] == "0"


@pytest.mark.integration  # `fedaug recommend` as a process
def test_the_cli_refuses_bad_requests_in_one_line(shop):
    _, _, prior, _ = shop
    output = finish(fedaug("recommend", "--model", str(prior), "--history", "1 nope"), 60)
    assert output.strip().splitlines()[-1] == "error: history: unknown item id(s) 'nope'"
    output = finish(fedaug("recommend", "--model", str(prior.parent / "missing"), "--history", "1"), 60)
    assert "error:" in output and "not a fedaug model bundle" in output


def test_http_validates_batches_and_picks_up_a_new_bundle(shop, tmp_path):
    _, data, prior, sasrec = shop
    served = tmp_path / "model"
    write_bundle(served, TextPrior(_text_vectors(data), decay=0.0), data.catalog)
    app = create_app(served, device="cpu", max_wait_ms=50, watch_seconds=0.2)
    ids = [str(i) for i in data.catalog.raw_ids[1:].tolist()]
    with TestClient(app) as client:
        assert client.get("/healthz").json()["kind"] == "text"
        for body, reason in [({"history": [ids[0], "nope"]}, "history: unknown item id(s) 'nope'"),
                             ({"history": [ids[0]], "k": 0}, "body.k: Input should be greater than or equal to 1"),
                             ({"history": [ids[0]] * 201}, "body.history: List should have at most 200 items")]:
            response = client.post("/v1/recommend", json=body)
            assert response.status_code == 422 and response.json()["detail"].startswith(reason), response.json()
        assert client.get("/v1/items/nope").status_code == 404
        assert client.get("/v1/items/" + ids[0]).json()["title"].startswith("red")
        assert client.get("/v1/search", params={"q": "blue shampoo", "k": 1}).json()["items"][0]["title"].startswith(
            "blue shampoo")
        # 16 concurrent requests share a handful of forward passes.
        service = app.state.service
        before = service.batches
        results = [None] * 16

        def ask(i):
            results[i] = client.post("/v1/recommend", json={"history": [ids[i % 6]], "k": 2}).status_code

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 16 and service.batches - before < 16
        # A new bundle written over the served one is picked up; requests keep succeeding meanwhile.
        old = client.get("/healthz").json()["model"]
        write_bundle(served, Recommender.load(sasrec, device="cpu").bundle.scorer, data.catalog)
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["model"] == old and time.monotonic() < deadline:
            assert client.post("/v1/recommend", json={"history": [ids[0]], "k": 2}).status_code == 200
        assert client.get("/healthz").json() | {} and client.get("/healthz").json()["kind"] == "sasrec"
        assert client.get("/healthz").json()["model"] == bundle_hash(served)[:16]
        page = client.get("/metrics").text
        assert 'fedaug_serve_requests_total{endpoint="/v1/recommend",status="200"}' in page
        assert "fedaug_serve_latency_seconds_bucket" in page and "fedaug_serve_model_info" in page
        assert "<ol id=\"results\">" in client.get("/").text


@pytest.fixture(scope="module")
def contextual(shop):
    """A bundle whose model reads behaviour and time context, its side layers large enough to matter."""
    directory, data, _, _ = shop
    torch.manual_seed(1)
    model = SASRec(model_config(data.n_items, hidden=8, max_len=5, behaviour=True, time_context=True))
    for table in (model.behaviour_emb, model.context_emb):
        torch.nn.init.normal_(table.weight, std=2.0)
    return write_bundle(directory / "contextual", sasrec_scorer(model.eval(), "cpu"), data.catalog), data, model


def test_a_served_model_reads_the_historys_events_and_the_requests_moment(contextual):
    path, data, model = contextual
    rec = Recommender.load(path, device="cpu")
    history = [str(data.catalog.raw_ids[i]) for i in (1, 4, 2)]
    monday_noon = 1_704_110_400
    plain = rec.recommend(history, k=6)
    carts = Activity(events=["cart"] * 3, timestamps=[monday_noon, monday_noon + 60, monday_noon + 120],
                     at=monday_noon + 180)
    night = Activity(events=["cart"] * 3, timestamps=carts.timestamps, at=monday_noon + 12 * 3600)
    scored = {name: [r.score for r in rec.recommend(history, k=6, activity=a)]
              for name, a in (("carts", carts), ("night", night))}
    assert scored["carts"] != [r.score for r in plain] and scored["night"] != scored["carts"]
    # The same scores as the model given the rows evaluation builds (history rows, then the moment's row)
    internal = rec.internal(history)
    expected = sasrec_scorer(model, "cpu")([internal], [carts.rows(3, 4)])[0]
    top = rec.recommend(history, k=6, activity=carts)
    assert [r.score for r in top] == pytest.approx([float(expected[rec.index[r.item]]) for r in top], abs=1e-5)
    with pytest.raises(ConfigError, match="events: 2 given for a history of 3 items"):
        rec.recommend(history, activity=Activity(events=["cart"] * 2))
    with pytest.raises(ConfigError, match="events: unknown event type 'basket'"):
        rec.recommend(history, activity=Activity(events=["cart", "basket", "view"]))
    # explanations leave an item out together with its event
    assert len(rec.recommend(history, k=2, explain=True, activity=carts)[0].because) == 3


def test_http_takes_events_and_times_and_refuses_misaligned_ones(contextual):
    path, data, _ = contextual
    history = [str(data.catalog.raw_ids[i]) for i in (1, 4)]
    with TestClient(create_app(path, device="cpu", batching=False)) as client:
        plain = client.post("/v1/recommend", json={"history": history, "k": 3})
        timed = client.post("/v1/recommend", json={"history": history, "k": 3, "events": ["view", "purchase"],
                                                   "timestamps": [1_704_110_400, 1_704_110_500], "at": 1_704_200_000})
        assert plain.status_code == timed.status_code == 200
        assert plain.json() != timed.json()
        bad = client.post("/v1/recommend", json={"history": history, "timestamps": [1]})
        assert bad.status_code == 422 and "timestamps: 1 given for a history of 2 items" in bad.text
        bad = client.post("/v1/recommend", json={"history": history, "events": ["view", "zap"]})
        assert bad.status_code == 422 and "unknown event type 'zap'" in bad.text


@pytest.fixture(scope="module")
def popular(shop):
    """A bundle that holds popularity (what a visitor without history is shown)."""
    directory, data, _, _ = shop
    return write_bundle(directory / "popular", Popularity(data), data.catalog), data


def test_a_new_visitor_gets_popular_items_or_plain_search_not_422(shop, popular):
    path, data = popular
    counts = np.bincount(data.items, minlength=data.n_items + 1)[1:]
    expected = [str(data.catalog.raw_ids[i + 1]) for i in np.argsort(-counts, kind="stable")[:3]]
    with TestClient(create_app(path, device="cpu", batching=False)) as client:
        response = client.post("/v1/recommend", json={"history": [], "k": 3})
        assert response.status_code == 200, response.text
        assert [r["item"] for r in response.json()["items"]] == expected
        assert [r["score"] for r in response.json()["items"]] == sorted(counts.tolist(), reverse=True)[:3]
    _, _, prior, _ = shop  # a text prior holds no popularity: nothing to show, said so; a query searches
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        response = client.post("/v1/recommend", json={})
        assert response.status_code == 200 and response.json()["items"] == []
        assert "no popularity" in response.json()["note"]
        found = client.post("/v1/recommend", json={"query": "blue shampoo", "k": 2}).json()["items"]
        assert found[0]["title"].startswith("blue shampoo")


def test_the_cli_searches_for_a_new_visitor(shop):
    from typer.testing import CliRunner

    from fedaug.cli import app

    _, _, prior, _ = shop
    result = CliRunner().invoke(app, ["recommend", "--model", str(prior), "--query", "lipstick", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found[0]["title"].startswith("red lipstick") and found[0]["score"] > 0


def test_search_without_a_match_returns_nothing_or_real_matches_only(shop):
    _, data, prior, _ = shop
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        nothing = client.get("/v1/search", params={"q": "gren tee"}).json()
        assert nothing["items"] == [] and nothing["note"] == "no item matches the query"
        blue = client.get("/v1/search", params={"q": "blue", "k": 10}).json()["items"]
        assert len(blue) == 3 and all(r["title"].startswith("blue") and r["score"] > 0 for r in blue)


def test_request_bodies_are_limited_and_errors_never_echo_long_input(shop):
    _, data, prior, _ = shop
    ids = [str(i) for i in data.catalog.raw_ids[1:].tolist()]
    with TestClient(create_app(prior, device="cpu", batching=False, max_body_bytes=2_000)) as client:
        big = {"history": [ids[0]], "query": "x" * 3_000}
        assert client.post("/v1/recommend", json=big).status_code == 413
        chunks = (b'{"history": ["' + b"1" * 1_000 + b'"', b', "query": "' + b"x" * 1_500 + b'"}')
        streamed = client.post("/v1/recommend", content=iter(chunks),
                               headers={"content-type": "application/json"})  # no Content-Length: counted
        assert streamed.status_code == 413 and "over 2,000 bytes" in streamed.json()["detail"]
        assert client.post("/v1/recommend", json={"history": [ids[0]]}).status_code == 200
        long_id = client.post("/v1/recommend", json={"history": ["z" * 1_500]})
        assert long_id.status_code == 422 and len(long_id.content) < 300, long_id.text
        unknown = client.post("/v1/recommend", json={"history": [ids[0], "q" * 200]})
        assert unknown.status_code == 422 and "qqq" in unknown.text and len(unknown.content) < 200, unknown.text


def test_docs_work_offline_from_the_apps_own_assets(shop):
    _, _, prior, _ = shop
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        html = client.get("/docs").text
        assert "SwaggerUIBundle" in html and "cdn" not in html and "https://" not in html
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        for asset in assets:
            assert asset.startswith("/"), asset
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 1_000, asset


def test_the_openapi_spec_has_response_schemas(shop):
    _, _, prior, _ = shop
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method, model in [("/v1/recommend", "post", "Ranking"), ("/v1/search", "get", "Ranking"),
                                ("/v1/items/{item_id}", "get", "CatalogItem"), ("/healthz", "get", "Health")]:
        schema = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}, (path, schema)
    assert paths["/v1/recommend"]["post"]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"}
    ranked = spec["components"]["schemas"]["Recommendation"]["properties"]
    assert {"item", "score", "title", "because"} <= set(ranked)
    assert set(spec["components"]["schemas"]["Because"]["properties"]) == {"item", "title", "contribution"}


def test_unknown_request_fields_are_refused_by_name(shop):
    _, data, prior, _ = shop
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        response = client.post("/v1/recommend", json={"history": [str(data.catalog.raw_ids[1])], "colour": "red"})
        assert response.status_code == 422
        assert response.json()["detail"] == "body.colour: Extra inputs are not permitted"


def test_metrics_label_docs_and_openapi_by_their_route(shop):
    _, _, prior, _ = shop
    with TestClient(create_app(prior, device="cpu", batching=False)) as client:
        for path in ("/docs", "/openapi.json", "/nowhere"):
            client.get(path)
        page = client.get("/metrics").text
    assert 'fedaug_serve_requests_total{endpoint="/docs",status="200"} 1.0' in page
    assert 'fedaug_serve_requests_total{endpoint="/openapi.json",status="200"} 1.0' in page
    assert 'fedaug_serve_requests_total{endpoint="unmatched",status="404"} 1.0' in page


def test_http_speaks_the_vocabulary_the_bundle_was_trained_with(contextual, tmp_path):
    """A bundle carries its [data.events] / timestamp unit: shop event names and ISO times give the same
    recommendations as the standard names and Unix seconds; an event mapped to drop leaves its item out."""
    _, data, model = contextual
    schema = EventSchema(events={"add_to_cart": "cart", "order": "purchase", "page_leave": "drop"})
    path = write_bundle(tmp_path / "shop", sasrec_scorer(model, "cpu"), data.catalog, schema=schema)
    history = [str(data.catalog.raw_ids[i]) for i in (1, 4, 2)]
    with TestClient(create_app(path, device="cpu", batching=False)) as client:
        health = client.get("/healthz").json()
        assert health["events"][:2] == ["add_to_cart", "order"] and "page_leave" not in health["events"]
        standard = client.post("/v1/recommend", json={
            "history": [history[0], history[2]], "events": ["view", "cart"],
            "timestamps": [1_704_110_400, 1_704_110_460], "at": 1_704_200_000}).json()["items"]
        shop = client.post("/v1/recommend", json={
            "history": history, "events": ["view", "page_leave", "Add_To_Cart"],
            "timestamps": ["2024-01-01T12:00:00Z", "2024-01-01T12:00:30Z", "2024-01-01T13:01:00+01:00"],
            "at": "2024-01-02T12:53:20Z"}).json()["items"]
        assert [(r["item"], r["score"]) for r in shop] == [(r["item"], pytest.approx(r["score"])) for r in standard]
        bad = client.post("/v1/recommend", json={"history": history[:1], "events": ["basket"]})
        assert bad.status_code == 422 and "events[0]: unknown event type 'basket'" in bad.text
        assert "add_to_cart" in bad.text
        bad = client.post("/v1/recommend", json={"history": history[:2], "timestamps": [1_704_110_400, "soon"]})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("timestamps[1]: not ")
        assert bad.json()["detail"].endswith("timestamp: 'soon'")
    assert Recommender.load(path, device="cpu").schema == schema  # and an old bundle: the default vocabulary
    card = json.loads((path / "card.json").read_text())
    del card["data"]
    (path / "card.json").write_text(json.dumps(card))
    assert Recommender.load(path, device="cpu").schema == EventSchema()
    with TestClient(create_app(path, device="cpu", batching=False)) as client:  # an old bundle: the standard names
        body = {"history": history[:1], "events": ["add_to_cart"]}
        assert client.post("/v1/recommend", json=body).status_code == 422
        assert client.post("/v1/recommend", json=body | {"events": ["cart"]}).status_code == 200
    with TestClient(create_app(path, device="cpu", batching=False, schema=schema)) as client:  # serve --config
        assert client.post("/v1/recommend", json=body).status_code == 200


@pytest.mark.integration  # `fedaug serve` as a process
def test_a_busy_port_fails_in_one_line_before_announcing_anything(shop):
    import socket

    _, _, prior, _ = shop
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = fedaug("serve", "--model", str(prior), "--port", str(port), "--device", "cpu")
        output = finish(process, 120)
    assert process.returncode == 1, output
    assert "serving" not in output and output.strip().count("\n") == 0, output
    assert output.startswith(f"error: --port: cannot listen on 127.0.0.1:{port} (") and "in use" in output

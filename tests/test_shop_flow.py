"""A merchant's first hour with ONE config: the shop's own export (``customer,sku,ts,action``, ISO times, its own
event names) is checked (`fedaug validate`), trained on alone (`fedaug local`), turned into recommendations for a
file of customers (`fedaug recommend --users`) and served over HTTP, each step in the shop's vocabulary, which the
model bundle carries from training to serving."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta

import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedaug.cli import app
from fedaug.serving.http import create_app
from tests.support import run_fedaug as fedaug  # the command as its own process: its own threads and warnings
from tests.support import tiny_encoder

TITLES = ["red nail polish", "red lipstick", "red hair oil", "red shampoo", "red brand polish",
          "blue shampoo", "blue nail polish", "blue hair oil", "blue lipstick", "blue brand oil",
          "green hair oil", "green shampoo", "green lipstick", "green nail polish", "green brand shampoo"]
ACTIONS = ["view", "view", "view", "add_to_cart", "order"]


def recommend(*args: str):
    """`fedaug recommend` in this process (typer's CliRunner): the model loads in a second, not a new process."""
    return CliRunner().invoke(app, ["recommend", *args])


def write_export(path, customers: range, seed: int) -> None:
    """A shop's event export: customers browse one colour family, add to cart and order; ISO times."""
    rng = np.random.default_rng(seed)
    start = datetime(2024, 3, 1, 9, tzinfo=UTC)
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["customer", "sku", "ts", "action"])
        for customer in customers:
            family = rng.integers(3)
            moment = start + timedelta(hours=int(rng.integers(0, 500)))
            for _ in range(int(rng.integers(4, 9))):
                moment += timedelta(minutes=int(rng.integers(1, 300)))
                sku = f"SKU-{family * 5 + int(rng.integers(5)) + 1:03d}"
                out.writerow([f"c{customer:04d}", sku, moment.isoformat().replace("+00:00", "Z"),
                              ACTIONS[int(rng.integers(len(ACTIONS)))]])


def test_a_shop_export_validates_trains_recommends_and_serves_in_its_own_vocabulary(tmp_path):
    export = tmp_path / "shop.csv"
    write_export(export, range(160), seed=0)
    (tmp_path / "titles.tsv").write_text("item_id\ttitle\n" + "".join(
        f"SKU-{i:03d}\t{title}\n" for i, title in enumerate(TITLES, start=1)))
    encoder = tiny_encoder(tmp_path)
    config = tmp_path / "shop.toml"
    config.write_text(f"""
[data]
path = "{export}"
texts = "{tmp_path / 'titles.tsv'}"
[data.columns]
user = "customer"
item = "sku"
timestamp = "ts"
event_type = "action"
[data.events]
add_to_cart = "cart"
order = "purchase"
[text]
encoder = "{encoder}"
cache_dir = "{tmp_path / 'cache'}"
[model]
hidden = 16
heads = 2
max_len = 10
[privacy]
epsilon = 8.0
[local]
rounds = 1
local_epochs = 1
batch_size = 48
""")
    checked = fedaug("validate", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "users" in checked.stdout and "cart" in checked.stdout and "purchase" in checked.stdout

    run = tmp_path / "run"
    trained = fedaug("local", "--config", str(config), "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    card = json.loads((run / "model" / "card.json").read_text())
    assert card["data"]["user"] == "customer" and card["data"]["timestamp"] == "ts"
    assert card["data"]["events"] == {"add_to_cart": "cart", "order": "purchase"}

    # Next week's export, same columns and names: recommendations per customer, no --config needed.
    new = tmp_path / "week2.csv"
    write_export(new, range(1000, 1030), seed=1)
    recs = tmp_path / "recs.csv"
    batch = recommend("--model", str(run / "model"), "--users", str(new), "-k", "3", "--out", str(recs))
    assert batch.exit_code == 0, batch.output
    rows = list(csv.DictReader(recs.open()))
    assert len(rows) == 30 and rows[0]["user"] == "c1000"
    assert all(len(r["items"].split()) == 3 and r["items"].startswith("SKU-") for r in rows)

    # An event name training never saw: one line, whose advice this command can take (--config [data.events]).
    with new.open("a") as handle:
        handle.write("c1000,SKU-001,2024-04-01T10:00:00Z,wishlist\n")
    refused = fedaug("recommend", "--model", str(run / "model"), "--users", str(new))
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "unknown event type 'wishlist'" in refused.stderr and "[data.events]" in refused.stderr
    assert "--config" in fedaug("recommend", "--help").stdout  # where [data.events] goes for this command
    (tmp_path / "more.toml").write_text(config.read_text().replace('order = "purchase"',
                                                                   'order = "purchase"\nwishlist = "favourite"'))
    mapped = recommend("--model", str(run / "model"), "--users", str(new), "--config", str(tmp_path / "more.toml"),
                       "--out", str(tmp_path / "recs2.csv"))
    assert mapped.exit_code == 0, mapped.output

    # A new visitor's search: no history needed, and no model-loading progress bars on the way.
    search = recommend("--model", str(run / "model"), "--query", "blue shampoo", "--json")
    assert search.exit_code == 0, search.output
    assert json.loads(search.stdout)[0]["title"].startswith("blue shampoo")
    assert "Loading weights" not in search.stderr and "%|" not in search.stderr, search.stderr

    # Over HTTP: the shop's event names and ISO times, the same answer as the standard names and Unix seconds.
    history = ["SKU-006", "SKU-007", "SKU-008"]
    times = ["2024-03-02T10:00:00Z", "2024-03-02T10:05:00+00:00", "2024-03-02T12:10:00+02:00"]
    unix = [int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()) for t in times]
    with TestClient(create_app(run / "model", device="cpu", batching=False)) as client:
        shop = client.post("/v1/recommend", json={"history": history, "events": ["view", "add_to_cart", "order"],
                                                  "timestamps": times, "at": "2024-03-02T10:30:00Z", "k": 5})
        standard = client.post("/v1/recommend", json={"history": history, "events": ["view", "cart", "purchase"],
                                                      "timestamps": unix, "at": unix[2] + 20 * 60, "k": 5})
        assert shop.status_code == standard.status_code == 200, shop.text
        assert shop.json()["items"] and shop.json() == standard.json()
        assert not set(history) & {r["item"] for r in shop.json()["items"]}
        visitor = client.post("/v1/recommend", json={"k": 5})
        assert visitor.status_code == 200 and (visitor.json()["items"] or visitor.json()["note"])

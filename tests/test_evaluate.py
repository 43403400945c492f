"""`fedaug evaluate` and the merchant's check of a received model (common/recommend/check.py, client/model_check.py):
the figures are exactly what ``evaluate()`` gives for the bundle's scorer on the same split, the data is put on the
bundle's catalog by raw item id, and bad input is one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedaug.common.config import SyntheticSection
from fedaug.common.data.source import load_data
from fedaug.common.data.split import leave_one_out
from fedaug.common.data.synthetic import generate
from fedaug.common.model.evaluate import evaluate, evaluate_per_user, sasrec_scorer
from fedaug.common.model.metrics import paired_gain
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.recommend.bundle import bundle_files, bundle_hash, write_bundle, write_bundle_files
from tests.support import model_config
from tests.support import run_fedaug as fedaug

SPEC = SyntheticSection(users=120, items=60, titles=False)


@pytest.fixture(scope="module")
def data():
    return generate(SPEC)


def _prior(n_items: int) -> TextPrior:
    vectors = np.random.default_rng(0).normal(size=(n_items + 1, 8)).astype(np.float32)
    vectors[0] = 0
    vectors[1:] /= np.linalg.norm(vectors[1:], axis=1, keepdims=True)
    return TextPrior(vectors, decay=0.25, window=5)


def _fused(n_items: int) -> Fused:
    torch.manual_seed(0)
    model = SASRec(model_config(n_items, hidden=16, max_len=10, item_dim=8))
    return Fused(sasrec_scorer(model, "cpu"), _prior(n_items), 1.0)


def _write_amazon(path: Path, data) -> Path:
    raw = data.catalog.raw_ids
    path.write_text("".join(f"{user} {' '.join(map(str, raw[data.sequence(u)].tolist()))}\n"
                            for u, user in enumerate(data.user_ids.tolist())))
    return path


def test_figures_equal_evaluate_on_a_file_numbered_by_raw_item_id(data, tmp_path):
    """The file lacks one item, so its own numbering shifts every item above it: only matching by raw id gives the
    bundle's numbering back, and with it exactly the figures ``evaluate`` gives."""
    fused = _fused(data.n_items)
    model = write_bundle(tmp_path / "model", fused, data.catalog, trained={"mode": "test"})
    gone = 7
    shop = data.select_events(data.items != gone)
    shop = shop.select_users(np.flatnonzero(shop.lengths > 0))
    _write_amazon(tmp_path / "shop.txt", shop)
    from fedaug.common.data.loaders import load

    assert load(tmp_path / "shop.txt").n_items == data.n_items - 1  # the file's own numbering is not the bundle's
    result = fedaug("-q", "evaluate", "--model", str(model), "--data", str(tmp_path / "shop.txt"), "--json",
                    "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    split = leave_one_out(shop)
    assert out["test"] == evaluate(fused, split, "test")
    assert out["text_prior"] == evaluate(fused.prior, split, "test")
    assert out["popularity"] == evaluate(Popularity(split.train), split, "test")
    expected = paired_gain(evaluate_per_user(fused, split, "test")["ndcg@10"],
                           evaluate_per_user(fused.prior, split, "test")["ndcg@10"])
    assert out["gain_over_text_prior"] == expected and expected["gain"] != 0
    assert out["text_prior_source"] == "bundle"
    assert out["bundle"]["kind"] == "fused" and out["bundle"]["trained"] == {"mode": "test"}
    assert out["bundle"]["privacy"] is None


def test_a_text_prior_bundle_gains_nothing_over_itself_and_prints_a_table(data, tmp_path):
    prior = _prior(data.n_items)
    model = write_bundle(tmp_path / "model", prior, data.catalog)
    (tmp_path / "small.toml").write_text("[synthetic]\nusers = 120\nitems = 60\n[model]\nhidden = 16\n")
    result = fedaug("-q", "evaluate", "--model", str(model), "--config", str(tmp_path / "small.toml"), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    split = leave_one_out(data)
    assert out["test"] == out["text_prior"] == evaluate(prior, split, "test")
    gain = out["gain_over_text_prior"]
    assert gain["gain"] == 0 and gain["low"] <= 0 <= gain["high"] and gain["users"] == out["test"]["users"] > 0
    table = fedaug("-q", "evaluate", "--model", str(model), "--config", str(tmp_path / "small.toml"))
    assert table.returncode == 0, table.stderr
    assert f"{out['test']['ndcg@10']:.4f}" in table.stdout and "popularity" in table.stdout
    assert "gain over the text prior" in table.stdout and "+0.0000 [+0.0000, +0.0000]" in table.stdout


def test_a_model_without_a_prior_has_no_gain(data, tmp_path):
    scorer = _fused(data.n_items).model
    model = write_bundle(tmp_path / "model", scorer, data.catalog)
    (tmp_path / "small.toml").write_text("[synthetic]\nusers = 120\nitems = 60\ntitles = false\n")
    result = fedaug("-q", "evaluate", "--model", str(model), "--config", str(tmp_path / "small.toml"), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["text_prior"] is None and out["gain_over_text_prior"] is None  # synthetic data without titles
    assert out["test"] == evaluate(scorer, leave_one_out(data), "test")


@pytest.mark.parametrize("case,fragment", [
    ("no bundle", "not a fedaug model bundle"),
    ("unknown item", "item 999 is not in the catalog"),
    ("no data", "no such file"),
    ("bad flag", "--device"),
])
def test_bad_input_is_one_line_and_exit_1(data, tmp_path, case, fragment):
    model = write_bundle(tmp_path / "model", _prior(data.n_items), data.catalog)
    _write_amazon(tmp_path / "shop.txt", data)
    with open(tmp_path / "shop.txt", "a") as shop:
        shop.write("100000 3 999 5\n")
    args = {"no bundle": ["--model", str(tmp_path / "nothing"), "--data", str(tmp_path / "shop.txt")],
            "unknown item": ["--model", str(model), "--data", str(tmp_path / "shop.txt")],
            "no data": ["--model", str(model), "--data", str(tmp_path / "nope.txt")],
            "bad flag": ["--model", str(model), "--device", "tpu"]}[case]
    result = fedaug("evaluate", *args, "--json")
    assert result.returncode == 1 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr, result.stderr
    if case == "unknown item":
        assert "shop.txt" in lines[0] and "items.json" in lines[0]


def test_the_merchant_checks_each_received_model_once_locally(data, tmp_path):
    """What the daemon does when the ClientApp stores the federation's final model in STATE/model."""
    from fedaug.client.model_check import MODEL_CHECK, ModelCheckWatcher, check_received_model, checked_hash

    state = tmp_path / "state"
    said: list[str] = []
    loads = []

    def load():
        loads.append(1)
        return data

    watcher = ModelCheckWatcher(state, load, said.append)
    assert watcher.poll() is None and check_received_model(state, data) is None  # nothing received yet
    fused = _fused(data.n_items)
    write_bundle_files(state / "model", bundle_files(fused, data.catalog, privacy={"epsilon": 3.0}))
    result = watcher.poll()
    split = leave_one_out(data)
    assert result is not None and result.test == evaluate(fused, split, "test")
    record = json.loads((state / MODEL_CHECK).read_text())
    assert record["bundle"]["hash"] == bundle_hash(state / "model") and record["bundle"]["privacy"] == {"epsilon": 3.0}
    assert record["test"] == evaluate(fused, split, "test")
    assert record["text_prior"] == evaluate(fused.prior, split, "test")
    assert any("model check: model: test NDCG@10" in line for line in said)
    assert any("gain over the text prior" in line for line in said)
    assert watcher.poll() is None and ModelCheckWatcher(state, load, said.append).poll() is None  # checked once
    assert len(loads) == 1
    with ModelCheckWatcher(state, load, said.append, interval=0.05):  # as the daemon runs it: in a thread
        write_bundle_files(state / "model", bundle_files(fused.prior, data.catalog))  # the next federation's model
        deadline = time.monotonic() + 60
        while checked_hash(state) != bundle_hash(state / "model") and time.monotonic() < deadline:
            time.sleep(0.05)
    record = json.loads((state / MODEL_CHECK).read_text())
    assert record["bundle"]["kind"] == "text" and record["test"] == evaluate(fused.prior, split, "test")
    assert len(loads) == 2


def test_the_merchant_daemon_checks_the_model_in_its_state_dir_on_its_own_data(tmp_path):
    """The daemon's watcher looks where the ClientApp stores the model and tests it on the merchant's file, numbered
    by the public catalog (as the ClientApp numbers it)."""
    from fedaug.client.daemon import MerchantDaemon, MerchantDaemonConfig
    from fedaug.client.model_check import MODEL_CHECK
    from fedaug.runtime.export import write_merchant_files

    write_merchant_files(generate(SyntheticSection(users=150, items=60, merchants=2)), tmp_path / "site")
    for name in ("ca.crt", "merchant-1.key"):
        (tmp_path / name).write_text("not checked here")
    config = MerchantDaemonConfig.model_validate({
        "merchant": {"state_dir": str(tmp_path / "state"), "root_certificate": str(tmp_path / "ca.crt"),
                     "private_key": str(tmp_path / "merchant-1.key")},
        "data": {"path": str(tmp_path / "site" / "merchant-1.csv"), "catalog": str(tmp_path / "site" / "catalog.tsv")},
        "device": "cpu"})
    own = load_data(config.data)
    prior = _prior(own.n_items)
    write_bundle(tmp_path / "state" / "model", prior, own.catalog)  # where client_app.store_model puts it
    said: list[str] = []
    result = MerchantDaemon(config, say=said.append).model_check().poll()
    split = leave_one_out(own)
    assert result is not None and result.test == evaluate(prior, split, "test")
    assert result.test["users"] == len(split.eval_users("test")) < 150  # the merchant's own users only
    assert json.loads((tmp_path / "state" / MODEL_CHECK).read_text())["gain_over_text_prior"]["gain"] == 0
    assert any("held-out users" in line for line in said)


def test_a_model_without_a_prior_is_compared_with_one_encoded_from_the_datas_texts(tmp_path):
    """--config with [text]: the data's item texts (here the bundle's titles) are encoded locally into a prior."""
    from fedaug.common.config import TextSection
    from fedaug.common.data.loaders import load
    from fedaug.common.priors.text_prior import fit_text_prior
    from tests.support import tiny_encoder, write_amazon_set

    shop = load(write_amazon_set(tmp_path))
    torch.manual_seed(0)
    scorer = sasrec_scorer(SASRec(model_config(shop.n_items, hidden=16, max_len=10, item_dim=8)), "cpu")
    model = write_bundle(tmp_path / "model", scorer, shop.catalog)
    encoder = tiny_encoder(tmp_path)
    (tmp_path / "text.toml").write_text(f'[text]\nencoder = "{encoder}"\ncache_dir = "{tmp_path / "cache"}"\n'
                                        "decay = 0.5\n")
    result = fedaug("-q", "evaluate", "--model", str(model), "--data", str(tmp_path / "Shop.txt"), "--config",
                    str(tmp_path / "text.toml"), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    split = leave_one_out(shop)
    text = TextSection(encoder=encoder, cache_dir=tmp_path / "cache", decay=0.5)
    prior, _ = fit_text_prior(catalog_vectors(text, shop, "cpu", progress=False), split, decay=0.5, window=text.window)
    assert out["text_prior_source"] == "data" and out["text_prior"] == evaluate(prior, split, "test")
    assert out["test"] == evaluate(scorer, split, "test")
    assert out["gain_over_text_prior"]["users"] == out["test"]["users"] == 60
    without = json.loads(fedaug("-q", "evaluate", "--model", str(model), "--data", str(tmp_path / "Shop.txt"),
                                "--json").stdout)
    assert without["text_prior"] is None and without["gain_over_text_prior"] is None  # no --config: none encoded

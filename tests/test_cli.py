"""The fedaug command line: the baseline end to end, and user errors as one line, exit 1, nothing written."""

import json
from pathlib import Path

import numpy as np
import pytest

from fedaug.common.data.source import load_data
from tests.support import health_server
from tests.support import run_fedaug as fedaug

KEYS = {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "auc"}


def test_baseline_pop_writes_metrics_in_the_documented_shape(tmp_path):
    result = fedaug("baseline", "--model", "pop", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["test"]) == KEYS and set(metrics["valid"]) == KEYS
    from fedaug.common.data.synthetic import generate

    assert metrics["data"] == generate().summary() and metrics["data"]["users"] == 3000
    assert metrics["mode"] == "baseline" and metrics["privacy"] is None
    assert metrics["epochs"] == 0 and metrics["seconds"] >= 0 and metrics["config"]["model"]["kind"] == "pop"


@pytest.mark.slow
def test_baseline_sasrec_on_events_csv(tmp_path):
    from fedaug.common.config import SyntheticSection
    from fedaug.common.data.synthetic import generate

    data = generate(SyntheticSection(users=300, items=150, titles=False))
    users = data.event_user()
    rows = zip(data.user_ids[users], data.items, data.timestamps, data.event_type, strict=True)
    lines = ["user_id,item_id,timestamp,event_type"] + [f"{u},{i},{t},{e}" for u, i, t, e in rows]
    (tmp_path / "events.csv").write_text("\n".join(lines))
    result = fedaug("-q", "baseline", "--data", str(tmp_path / "events.csv"), "--epochs", "2", "--out",
                    str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    # --quiet: no per-epoch lines ("epoch   1  loss ...", printed without it), only the result
    assert "loss" not in result.stderr and "test NDCG@10" in result.stderr, result.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["data"]["users"] == 300
    assert 0 < metrics["test"]["auc"] <= 1


def test_validate_reports_a_shops_log_and_exits_1_on_errors(tmp_path):
    """`fedaug validate`: the shop's columns and event names mapped by its config, the report (also as JSON),
    exit 0; items the catalog lacks and a malformed file: exit 1, one line each."""
    log = tmp_path / "shop.csv"
    log.write_text("customer,product,ts,action,channel\n"
                   "c1,SKU-1,2024-03-01T10:00:00+01:00,pv,web\nc1,SKU-2,2024-03-01T10:05:00+01:00,add_to_cart,web\n"
                   "c1,SKU-2,2024-03-01T10:05:00+01:00,add_to_cart,web\nc1,SKU-2,2024-03-02T08:00:00Z,buy,app\n"
                   "c2,SKU-1,2024-03-02T09:00:00Z,pv,app\nc2,SKU-3,2024-03-02T09:01:00Z,leave,app\n")
    config = tmp_path / "shop.toml"
    mapping = ('[data.columns]\nuser = "customer"\nitem = "product"\ntimestamp = "ts"\nevent_type = "action"\n'
               '[data.events]\npv = "view"\nadd_to_cart = "cart"\nbuy = "purchase"\nleave = "drop"\n')
    config.write_text(mapping)
    result = fedaug("validate", "--data", str(log), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "users" in result.stdout and "view 2, cart 1, purchase 1" in result.stdout
    report = json.loads(fedaug("validate", "--data", str(log), "--config", str(config), "--json").stdout)
    assert (report["users"], report["items"], report["events"]) == (2, 2, 4) and report["ok"]
    assert (report["dropped"], report["duplicates"], report["too_short"]) == (1, 1, 1)
    assert report["first_event"] == "2024-03-01T09:00:00Z" and report["context"] == ["channel"]
    (tmp_path / "catalog.tsv").write_text("item_id\tattributes\nSKU-1\tshoes\nSKU-3\tbags\n")
    config.write_text(f'[data]\ncatalog = "{tmp_path / "catalog.tsv"}"\n' + mapping)
    result = fedaug("validate", "--data", str(log), "--config", str(config), "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["unknown_catalog_items"] == 1
    assert result.stderr.strip().count("\n") == 0 and "1 item id not in the catalog" in result.stderr
    assert "'SKU-2'" in result.stderr
    result = fedaug("validate", "--data", str(log))  # the shop's names, unmapped
    assert result.returncode == 1 and "missing required column 'user_id'" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_taobao_userbehavior_log_trains_end_to_end(tmp_path):
    """Taobao's UserBehavior.csv layout — no header; user, item, category, behaviour (pv / fav / cart / buy),
    Unix time — mapped by a config, checked by `fedaug validate` and trained on by the baseline."""
    from fedaug.common.config import SyntheticSection
    from fedaug.common.data import EVENT_TYPES
    from fedaug.common.data.synthetic import generate

    data = generate(SyntheticSection(users=200, items=120, titles=False))
    taobao = {"view": "pv", "click": "pv", "favourite": "fav", "cart": "cart", "purchase": "buy"}
    users = data.event_user()
    rows = zip(data.user_ids[users], data.catalog.raw_ids[data.items], data.catalog.category[data.items],
               (taobao[EVENT_TYPES[e]] for e in data.event_type), data.timestamps, strict=True)
    (tmp_path / "UserBehavior.csv").write_text("".join(f"{u},{i},{c},{b},{t}\n" for u, i, c, b, t in rows))
    (tmp_path / "taobao.toml").write_text(
        f'[data]\npath = "{tmp_path / "UserBehavior.csv"}"\nformat = "events"\n'
        '[data.columns]\nnames = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]\n'
        'event_type = "behavior_type"\ncontext = []\n'
        '[data.events]\npv = "view"\nfav = "favourite"\ncart = "cart"\nbuy = "purchase"\n')
    report = fedaug("validate", "--config", str(tmp_path / "taobao.toml"), "--json")
    assert report.returncode == 0, report.stderr
    report = json.loads(report.stdout)
    assert report["users"] == 200 and report["events"] == data.n_interactions and report["context"] == []
    assert report["events_by_type"]["purchase"] == int((data.event_type == EVENT_TYPES.index("purchase")).sum())
    result = fedaug("baseline", "--model", "pop", "--config", str(tmp_path / "taobao.toml"), "--out",
                    str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["data"] == data.summary() | {"items": len(np.unique(data.items))}
    assert 0 < metrics["test"]["hr@10"] <= 1


@pytest.mark.parametrize("args,fragment", [
    (["--data", "{bad}"], "bad.csv, line 3, column timestamp"),
    (["--data", "{missing}"], "no such file"),
    (["--model", "gru"], "error: --model: "),
    (["--epochs", "0"], "error: --epochs: "),
    (["--device", "tpu"], "--device"),
    (["--config", "{config}"], "key train.lr"),
    (["--config", "{broken}"], "invalid TOML"),
])
def test_user_errors_are_one_line_with_no_output(tmp_path, args, fragment):
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\n1,2,100\n1,3,soon\n")
    (tmp_path / "config.toml").write_text("[train]\nlr = -1\n")
    (tmp_path / "broken.toml").write_text("[train\nlr = 1\n")
    paths = {"bad": tmp_path / "bad.csv", "missing": tmp_path / "nope.csv", "config": tmp_path / "config.toml",
             "broken": tmp_path / "broken.toml"}
    args = [a.format(**paths) for a in args]
    result = fedaug("baseline", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_help_keeps_toml_section_names_and_answers_to_h():
    """Help cites TOML tables ([aggregator], [federation], ...): printed as written, not eaten as markup."""
    for command, section in (("aggregator", "[aggregator]"), ("merchant", "[merchant]"), ("sweep", "[sweep]")):
        result = fedaug(command, "-h")
        assert result.returncode == 0 and section in result.stdout, result.stdout


def test_a_mistyped_command_or_flag_is_suggested_once():
    for args, suggestion in ((["locl"], "Did you mean 'local'?"),
                             (["local", "--epsilonn", "3"], "Did you mean '--epsilon'?")):
        result = fedaug(*args)
        assert result.returncode == 2 and result.stderr.count("Did you mean") == 1, result.stderr
        assert suggestion in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_flag_is_rejected(tmp_path):
    result = fedaug("baseline", "--nope", "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


LOCAL_CONFIG = """
[synthetic]
users = 300
items = 200
titles = false

[model]
hidden = 16
max_len = 20

[privacy]
epsilon = 2.0

[local]
rounds = 2
batch_size = 32
lr = 0.005
"""


@pytest.mark.slow
def test_local_private_run_reports_epsilon_within_budget_and_composes(tmp_path):
    (tmp_path / "merchant.toml").write_text(LOCAL_CONFIG)
    result = fedaug("local", "--config", str(tmp_path / "merchant.toml"), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert set(metrics["test"]) == KEYS and len(metrics["rounds"]) == 2
    privacy = metrics["privacy"]
    assert 1.9 < privacy["epsilon_max"] <= 2.0 and privacy["delta"] == pytest.approx(1 / 3000)
    assert privacy["epsilon_budget"] == 2.0 and metrics["mode"] == "merchant"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["rounds"][-1]["epsilon_max"] <= 2.0
    assert privacy["noise_multiplier"] > 0 and privacy["max_grad_norm"] == 1.0
    assert metrics["augment_views"] == 1
    # the same merchant (same state-dir) has spent its budget: the next run declines, with one line
    again = fedaug("local", "--config", str(tmp_path / "merchant.toml"), "--out", str(tmp_path / "o2"),
                   "--state-dir", str(tmp_path / "o" / "state"))
    assert again.returncode == 1 and "budget" in again.stderr and "Traceback" not in again.stderr
    assert not (tmp_path / "o2").exists()
    # a new --out (so a new, empty ledger) for the same users must not restart their budget from zero
    fresh = fedaug("local", "--config", str(tmp_path / "merchant.toml"), "--out", str(tmp_path / "o3"))
    assert fresh.returncode == 1 and "Traceback" not in fresh.stderr and not (tmp_path / "o3").exists()
    assert f"already trained on under {tmp_path / 'o' / 'state'} (2 DP rounds)" in " ".join(fresh.stderr.split())
    assert "--new-budget" in fresh.stderr and len(fresh.stderr.strip().splitlines()) == 1
    knowingly = fedaug("local", "--config", str(tmp_path / "merchant.toml"), "--out", str(tmp_path / "o3"),
                       "--new-budget")
    assert knowingly.returncode == 0, knowingly.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--epsilon", "-1"], "error: --epsilon: "),
    (["--grad-sample-mode", "fast"], "error: --grad-sample-mode: "),
    (["--epsilon", "abc"], "error: --epsilon: "),
    (["--delta", "0.5"], "privacy.delta: 0.5 must be below 1 / users"),  # refused before the ledger is made
])
def test_local_flag_errors(tmp_path, args, fragment):
    result = fedaug("local", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert fragment in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--strategy", "fedsgd"], "error: --strategy: "),
    (["--mode", "solo"], "error: --mode: "),
    (["--partition", "alphabetical"], "error: --partition: "),
    (["--merchants", "0"], "error: --merchants: "),
    (["--rounds", "0"], "error: --rounds: "),
    (["--data", "missing.csv"], "missing.csv"),
    (["--baseline", "nothing.json"], "--baseline: nothing.json: no such file"),
])
def test_simulate_flag_errors(tmp_path, args, fragment):
    result = fedaug("simulate", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,text,fragment", [
    # a section the role does not use: simulations have no [train] (that is `fedaug baseline`'s)
    ("simulate", "[train]\nepochs = 3\n", "key train: Extra inputs are not permitted"),
    ("simulate", "[local]\nrounds = 3\n", "key local.rounds: Extra inputs are not permitted"),
    # a loss the DP step does not support, caught before any training (it used to crash inside torch)
    ("local", "[model]\nloss = 'sampled'\n", "key model.loss: 'sampled' is not supported under DP"),
    ("simulate", "[model]\nloss = 'sampled'\n", "key model.loss: 'sampled' is not supported under DP"),
])
def test_configs_a_role_cannot_run_are_refused_naming_file_and_key(tmp_path, command, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = fedaug(command, "--config", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{path}: {fragment}" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_certs_and_synth_write_a_trial_site_once(tmp_path):
    assert fedaug("certs", "--out", "certs", "--merchants", "2", cwd=tmp_path).returncode == 0
    assert fedaug("synth", "--out", "data", "--merchants", "2", "--users", "100", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["catalog.tsv", "merchant-1.csv",
                                                                   "merchant-2.csv"]
    for args in (("certs", "--out", "certs"), ("synth", "--out", "data")):
        again = fedaug(*args, cwd=tmp_path)
        assert again.returncode == 1 and "Traceback" not in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1 and "not an empty directory" in again.stderr


def test_synth_cuts_a_real_data_set_into_merchants_and_a_catalog_with_titles(tmp_path):
    """`fedaug synth --data`: a real data set (sibling time, attribute and title files found as every command finds
    them) split by user as `fedaug simulate` splits it; each merchant's file with the catalog loads back to the same
    users, items, times and item texts."""
    from fedaug.common.config import DataSection
    from fedaug.common.data.loaders import load
    from fedaug.common.data.split import assign_merchants, merchant_partitions

    rng = np.random.default_rng(0)
    seqs = {user: rng.choice(np.arange(1, 31), size=rng.integers(3, 8), replace=False) for user in range(1, 13)}
    (tmp_path / "Toy.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in seqs.items()))
    (tmp_path / "Toy_time.txt").write_text("".join(f"{u} {' '.join(str(1000 * u + k) for k in range(len(s)))}\n"
                                                   for u, s in seqs.items()))
    (tmp_path / "Toy_item_attributes_named.tsv").write_text("item_id\tasin\tattributes\n" + "".join(
        f"{i}\tA{i}\tBrand{i % 4}|{'Nails' if i % 2 else 'Face'}\n" for i in range(1, 31)))
    (tmp_path / "Toy_item_titles.tsv").write_text("item_id\tasin\ttitle\n" + "".join(
        f"{i}\tA{i}\tProduct {i}, 0.5 oz\n" for i in range(1, 31) if i != 7))
    result = fedaug("synth", "--data", str(tmp_path / "Toy.txt"), "--format", "amazon-seq", "--merchants", "3",
                    "--seed", "4", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "12 users" in result.stderr and "with item titles" in result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["catalog.tsv", "merchant-1.csv", "merchant-2.csv",
                                                    "merchant-3.csv"]
    assert (out / "catalog.tsv").read_text().splitlines()[:2] == ["item_id\ttitle\tattributes",
                                                                 "1\tProduct 1, 0.5 oz\tBrand1|Nails"]
    data = load(tmp_path / "Toy.txt", "amazon-seq")
    text_of = dict(zip(data.catalog.raw_ids[1:].tolist(), data.catalog.texts[1:], strict=True))
    assert text_of[1] == "Product 1, 0.5 oz | Brand1 | Nails" and text_of[7] == "Brand3 | Nails"
    for i, expected in enumerate(merchant_partitions(assign_merchants(data, 3, "uniform", 4)), start=1):
        part = load_data(DataSection(path=out / f"merchant-{i}.csv", catalog=out / "catalog.tsv"))
        assert part.n_items == data.n_items
        assert dict(zip(part.catalog.raw_ids[1:].tolist(), part.catalog.texts[1:], strict=True)) == text_of
        assert part.user_ids.tolist() == expected.user_ids.tolist()
        for got, want in zip(part.sequences(), expected.sequences(), strict=True):
            assert part.catalog.raw_ids[got].tolist() == data.catalog.raw_ids[want].tolist()
        np.testing.assert_array_equal(part.timestamps, expected.timestamps)
    wrong = fedaug("synth", "--data", str(tmp_path / "Toy.txt"), "--users", "5", "--out", str(tmp_path / "o2"))
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "--users" in wrong.stderr
    assert not (tmp_path / "o2").exists()


def test_daemons_reject_bad_configs_before_starting_anything(tmp_path):
    (tmp_path / "agg.toml").write_text('[aggregator]\nmerchant_keys = ["k.pub"]\n[data]\ncatalog = "c.tsv"\n'
                                       '[federation]\nrounds = 0\n')
    result = fedaug("aggregator", "--config", "agg.toml", cwd=tmp_path)
    assert result.returncode == 1 and "agg.toml: key federation.rounds" in result.stderr
    (tmp_path / "m.toml").write_text('[merchant]\nroot_certificate = "nope.crt"\n[data]\npath = "d.csv"\n'
                                     'catalog = "c.tsv"\n')
    result = fedaug("merchant", "--config", "m.toml", cwd=tmp_path)
    assert result.returncode == 1 and "merchant.root_certificate: nope.crt not found" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg.toml", "m.toml"]  # nothing written


def test_status_shows_epsilon_per_merchant_and_run_and_the_federations_last_round(tmp_path):
    from fedaug.client.ledger import PrivacyLedger
    from fedaug.common.records import RoundRecord
    from fedaug.server.checkpoint import ServerState, save

    for i, rounds in ((1, 2), (2, 1)):
        ledger = PrivacyLedger(tmp_path / f"merchant-{i}")
        for r in range(1, rounds + 1):
            ledger.record("run-a", r, noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=1e-5)
        ledger.close()
    save(tmp_path / "server", ServerState(run_key="run-a", strategy="fedavg", round=2, best_round=1,
                                          history=[RoundRecord(round=1), RoundRecord(round=2, epsilon_max=3.5,
                                                                                     valid={"ndcg@10": 0.04})],
                                          merchants={"77": {"partition-id": -1, "epsilon": 3.5}}))
    result = fedaug("status", "--state-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (federation,) = report["federations"]
    assert (federation["round"], federation["best_round"], federation["valid_ndcg10"]) == (2, 1, 0.04)
    assert federation["merchants"] == {"node 77": 3.5} and federation["epsilon_max"] == 3.5
    ledgers = {Path(ledger["state_dir"]).name: ledger for ledger in report["ledgers"]}
    assert ledgers["merchant-1"]["rounds"] == 2 and ledgers["merchant-2"]["rounds"] == 1
    assert ledgers["merchant-1"]["epsilon"] > ledgers["merchant-2"]["epsilon"] > 0
    assert ledgers["merchant-1"]["runs"] == [{"run_id": "run-a", "rounds": 2, "last_round": 2,
                                              "epsilon_after": ledgers["merchant-1"]["epsilon"]}]
    table = fedaug("status", "--state-dir", str(tmp_path))
    assert table.returncode == 0 and "merchant-1" in table.stdout and "node 77" in table.stdout
    (tmp_path / "nothing").mkdir()
    empty = fedaug("status", "--state-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 1 and len(empty.stderr.strip().splitlines()) == 1


def test_flower_lines_print_once_and_without_colour_off_a_terminal(tmp_path):
    """Opacus' import-time logging.basicConfig made every Flower log line print twice (once date-stamped), and
    Flower coloured its level names into pipes and log files."""
    result = fedaug("simulate", "--rounds", "1", "--merchants", "2", "--epsilon", "0.05", "--out",
                    str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("every merchant declined for its privacy budget") == 1, result.stderr
    assert "\x1b[" not in result.stderr and ":WARNING:" not in result.stderr, result.stderr


# ---------------------------------------------------------------- errors and help


def test_help_prints_required_and_defaults_plainly_and_the_defaults_configs_give():
    """typer's "[required]" and "[default: 3]" are not rich-escaped into "\\[required]"; a default that comes from a
    config key is cited with the value the config models give it."""
    from fedaug.common.config import MerchantRunConfig

    wide = {"COLUMNS": "200"}
    synth = " ".join(fedaug("synth", "--help", env=wide).stdout.split())
    assert "[required]" in synth and "[default: 3]" in synth and "\\[" not in synth, synth
    local = fedaug("local", "--help", env=wide)
    assert local.returncode == 0 and "\\[" not in local.stdout
    text = " ".join(local.stdout.split())
    defaults = MerchantRunConfig()
    assert f"default: from [privacy] epsilon, {defaults.privacy.epsilon:g}." in text, text
    assert f"default: from [local] rounds, {defaults.local.rounds}." in text, text
    assert "default: from [privacy] delta, else 1 / (10 × the users who can be trained on" in text, text
    import typer

    from fedaug.cli import _cite_config_defaults, app

    group = typer.main.get_command(app)
    for name in group.commands:  # every key any command's help cites is a config key (else KeyError)
        _cite_config_defaults(group, [name, "--help"])
    assert "from [simulation] merchants, " in next(p.help for p in group.commands["simulate"].params
                                                   if p.name == "merchants")


def test_usage_errors_exit_2_and_what_the_data_says_exits_1(tmp_path):
    """Exit 2: the command line is wrong (flags that exclude each other, a missing flag); exit 1: the data is."""
    for args in (("synth", "--format", "events", "--out", str(tmp_path / "s")), ("health",),
                 ("local", "--trial", "--data", "x.csv", "--out", str(tmp_path / "t")), ("status",)):
        result = fedaug(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    (tmp_path / "bad.csv").write_text("user_id,item_id,timestamp\n1,2,100\n1,3,soon\n")
    result = fedaug("validate", "--data", str(tmp_path / "bad.csv"))
    assert result.returncode == 1 and "bad.csv, line 3, column timestamp" in result.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_validate_json_reports_errors_as_json_and_names_the_line_at_fault(tmp_path):
    """A Unix time at line 101 among ISO times is blamed there, and --json says so as JSON on stdout."""
    rows = [f"u{i % 7},i{i % 13},2024-03-01T10:{i % 60:02d}:00Z" for i in range(99)] + ["u1,i3,1709290000"]
    (tmp_path / "mixed.csv").write_text("\n".join(["user_id,item_id,timestamp", *rows]) + "\n")
    result = fedaug("validate", "--data", str(tmp_path / "mixed.csv"), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and len(report["errors"]) == 1
    assert "mixed.csv, line 101, column timestamp: a Unix time among ISO-8601 timestamps: '1709290000'" in \
        report["errors"][0]
    missing = fedaug("validate", "--json")  # a usage error is JSON too, and keeps its exit status
    assert missing.returncode == 2 and json.loads(missing.stdout)["ok"] is False


def test_validate_reports_held_out_ties_and_a_detected_delimiter(tmp_path):
    """A ';'-separated export reads as its comma twin and is said to be; users whose last event shares its time with
    the one before (file order decides their test target) are counted, in the table and the JSON."""
    rows = ["customer;sku;ts"]
    for user in range(10):
        times = ["2024-03-01T10:00:00Z", "2024-03-01T10:01:00Z", "2024-03-01T10:02:00Z",
                 "2024-03-01T10:02:00Z" if user < 4 else "2024-03-01T10:03:00Z"]
        rows += [f"c{user};S{user + k};{t}" for k, t in enumerate(times)]
    (tmp_path / "shop.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "shop.toml").write_text('[data.columns]\nuser = "customer"\nitem = "sku"\ntimestamp = "ts"\n')
    args = ("validate", "--data", str(tmp_path / "shop.csv"), "--config", str(tmp_path / "shop.toml"))
    report = json.loads(fedaug(*args, "--json").stdout)
    assert report["ok"] and report["delimiter"] == ";" and report["users"] == 10
    assert report["tied_test_targets"] == 4 and report["tied_test_share"] == 0.4
    table = fedaug(*args, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.replace("│", " ").split())
    assert "4 of 10 evaluated users (40%)" in text and "ties are kept in file order" in text, text
    assert "';' (detected from the first line)" in text


def test_status_shows_whole_paths_at_80_columns_and_one_format_for_delta(tmp_path):
    from fedaug.client.ledger import PrivacyLedger

    long = "merchant-with-a-rather-long-shop-name-0001"
    for name, delta in ((long, 9.9e-5), ("m2", 1e-4)):
        ledger = PrivacyLedger(tmp_path / "state" / name)
        ledger.record("run-a", 1, noise_multiplier=1.0, sample_rate=0.1, steps=20, delta=delta)
        ledger.close()
    result = fedaug("status", "--state-dir", str(tmp_path), env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    cells = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    column = "".join(cell[1].strip() for cell in cells)  # a narrow column folds the path over several lines
    assert f"state/{long}" in column and "…" not in result.stdout, result.stdout
    deltas = {cell[3].strip() for cell in cells} - {""}
    assert deltas == {"9.90e-05", "1.00e-04"}, result.stdout


def test_health_asks_the_address_the_daemons_config_gives_flower(tmp_path):
    config = tmp_path / "merchant.toml"
    with health_server() as (port, set_serving):
        config.write_text(f'[merchant]\nsuperlink = "agg:9092"\nhealth_address = "127.0.0.1:{port}"\n')
        set_serving(True)
        result = fedaug("health", "--config", str(config))
        assert result.returncode == 0 and f"127.0.0.1:{port}: serving" in result.stdout, result.stderr
        assert fedaug("health", "--address", f"127.0.0.1:{port}").returncode == 0
        set_serving(False)
        result = fedaug("health", "--config", str(config), "--timeout", "1")
        assert result.returncode == 1 and "is not serving" in result.stderr
    config.write_text('[merchant]\nsuperlink = "agg:9092"\n')
    result = fedaug("health", "--config", str(config))
    assert result.returncode == 1 and "key merchant.health_address is not set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_local_trial_spends_no_real_budget(tmp_path):
    """`fedaug local --trial`: the synthetic data (the config's [data] set aside), a temporary ledger, no entry in
    the machine's registry of spent budgets, said before training."""
    (tmp_path / "shop.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    (tmp_path / "trial.toml").write_text(f'[data]\npath = "{tmp_path / "shop.csv"}"\n' + LOCAL_CONFIG.replace(
        "epsilon = 2.0", "epsilon = 8.0").replace("rounds = 2", "rounds = 1"))
    home = tmp_path / "state-home"
    result = fedaug("local", "--trial", "--config", str(tmp_path / "trial.toml"), "--out", str(tmp_path / "out"),
                    env={"FEDAUG_STATE_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("trial: the embedded synthetic data (--config's [data] set aside)")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data"]["users"] == 300 and metrics["privacy"]["epsilon_max"] > 0
    assert not home.exists() and not (tmp_path / "out" / "state").exists()

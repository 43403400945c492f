"""`fedaug simulate` as a user runs it: real processes, Flower's simulation engine, our ServerApp and ClientApp."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from fedaug.common.config import FederationConfig, from_run_config
from fedaug.common.data.source import load_data
from fedaug.common.model.metrics import METRIC_NAMES
from fedaug.common.recommend.bundle import bundle_hash
from fedaug.common.recommend.recommender import Recommender
from fedaug.simulations.apps import SHARED_DATA
from fedaug.simulations.scenario import SimulationConfig
from tests.support import LIBRARY_NOTES, ROOT, SMALL
from tests.support import fedaug as _fedaug
from tests.support import finish as _finish


def test_pyproject_run_config_is_the_federation_default():
    """`flwr run .` reads these defaults: validated by the apps' own model, they are exactly its defaults."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedaug.server.server_app:app",
                                 "clientapp": "fedaug.client.client_app:app"}
    assert from_run_config(flatten_dict(app["config"])) == FederationConfig()
    assert "simulation" not in app["config"]  # simulation-only settings are not the production app's


def _stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves the local SuperLink it started running, detached, on fixed ports (a later run, say the next
    CI run, would find a stale one): stop ours, found by the log file under our FLWR_HOME."""
    import contextlib
    import signal
    import time

    marker = str(flwr_home / "local-superlink").encode()

    def ours(proc: Path) -> bool:
        try:
            command = (proc / "cmdline").read_bytes()  # empty once it exited (a zombie)
        except OSError:  # gone, or not ours to read
            return False
        return b"flower-superlink" in command and marker in command

    for sig in (signal.SIGTERM, signal.SIGKILL):  # it may sit out SIGTERM (seen here): then it is killed
        alive = [proc for proc in Path("/proc").iterdir() if proc.name.isdigit() and ours(proc)]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), sig)
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            alive = [proc for proc in alive if ours(proc)]
            time.sleep(0.2)
        if not alive:
            return


@pytest.mark.slow
def test_flwr_run_takes_the_same_nested_names(tmp_path):
    """`flwr run .` (Flower's own CLI and simulation) with run_config overrides named as in every TOML file."""
    import subprocess

    flwr = Path(sys.executable).parent / "flwr"
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(tmp_path / "flwr")}
    overrides = f'model.hidden=32 federation.rounds=1 federation.state_dir="{tmp_path / "state"}"'
    try:
        result = subprocess.run([str(flwr), "run", ".", "--stream", "--run-config", overrides], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        _stop_local_superlink(tmp_path / "flwr")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    notes = [note for note in LIBRARY_NOTES if note in result.stdout + result.stderr]
    assert not notes, (notes, (result.stdout + result.stderr)[-3000:])  # what users see: no library notes
    from fedaug.server import checkpoint

    state = checkpoint.load(tmp_path / "state")
    assert state is not None and state.round == 1 and state.arrays["ln_f.weight"].shape == (32,)
    assert state.history[0].participants >= 1
    assert state.history[0].valid is None  # private merchants keep metrics on their users off the wire


@pytest.mark.slow
def test_simulate_with_no_arguments_end_to_end(tmp_path):
    out = tmp_path / "run"
    process = _fedaug("simulate", "--out", str(out))
    output = _finish(process, timeout=600)
    assert process.returncode == 0, output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "federated" and len(metrics["rounds"]) == SimulationConfig().federation.rounds
    assert set(metrics["test"]) == {"hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "auc"}
    assert len(metrics["merchants"]) == 5 and all(0 < m["epsilon"] <= 8.0 for m in metrics["merchants"])
    assert sum(m["users"] for m in metrics["merchants"]) == metrics["data"]["users"]
    assert metrics["privacy"]["epsilon_max"] <= 8.0 and metrics["test"]["ndcg@10"] > 0
    assert "popularity" in metrics["baselines"] and metrics["seconds"] > 0
    for name in ("report.md", "ndcg_per_round.png", "epsilon_per_merchant.png", "merchant_ndcg.png"):
        assert (out / name).stat().st_size > 0, name
    assert "federated: test NDCG@10" in output  # the one-line summary
    assert "FutureWarning" not in output  # Ray's notices are not the user's to act on
    # The final model comes out as a bundle, and every merchant holds the aggregator's copy of it.
    final = bundle_hash(out / "state" / "model")
    assert [bundle_hash(out / "state" / f"merchant-{i}" / "model") for i in range(5)] == [final] * 5
    history = ["3", "17", "42"]
    shown = subprocess.run([sys.executable, "-m", "fedaug", "recommend", "--model", str(out / "model"), "--history",
                            " ".join(history), "-k", "10", "--explain", "--json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    cli = json.loads(shown.stdout)
    assert len(cli) == 10 and all({b["item"] for b in r["because"]} == set(history) for r in cli)
    api = Recommender.load(out / "model", device="cpu").recommend(history, k=10, explain=True)
    assert [r.item for r in api] == [r["item"] for r in cli] and not set(history) & {r.item for r in api}
    from fastapi.testclient import TestClient

    from fedaug.serving.http import create_app

    with TestClient(create_app(out / "model", device="cpu")) as client:
        served = client.post("/v1/recommend", json={"history": history, "k": 10, "explain": True}).json()
    assert [r["item"] for r in served["items"]] == [r.item for r in api]
    from fedaug.simulations.serving_eval import reproduce_test

    reproduced = reproduce_test(Recommender.load(out / "model", device="cpu"), load_data(SimulationConfig().data))
    assert reproduced["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-12)
    assert reproduced["hr@10"] == pytest.approx(metrics["test"]["hr@10"], abs=1e-12)
    table = _finish(_fedaug("recommend", "--model", str(out / "model"), "--history", " ".join(history), "--explain"),
                    timeout=120)
    assert table.count("│") > 40 and "because" in table  # the table: 10 rows, the history behind each


@pytest.mark.slow
def test_a_killed_simulation_resumes_without_losing_or_repeating_a_round(tmp_path):
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    out = tmp_path / "run"
    args = ("simulate", "--config", str(config), "--rounds", "4", "--out", str(out))
    log = out / "state" / "rounds.jsonl"
    process = _fedaug(*args)
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no second round logged:\n{_finish(process, 5)[-3000:]}")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the server, Ray and every merchant actor, mid-run
    process.communicate()
    done_before = len(log.read_text().splitlines())
    assert 2 <= done_before < 4

    resumed = _fedaug(*args)
    output = _finish(resumed, timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    rounds = [json.loads(line)["round"] for line in log.read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]  # none lost, none twice
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    for merchant in range(3):
        ledger = sqlite3.connect(out / "state" / f"merchant-{merchant}" / "privacy-ledger.sqlite")
        trained = [r for (r,) in ledger.execute("SELECT round FROM rounds ORDER BY id")]
        ledger.close()
        # Every round the merchant trained is in its ledger once: a round it had finished when the kill came is
        # resent after the resume, not retrained (client/replay.py); ε is never under-counted, never past budget.
        assert set(trained) == {1, 2, 3, 4} and len(trained) in (4, 5)
    assert all(m["epsilon"] <= 8.0 for m in metrics["merchants"])


TINY = SMALL.replace("users = 400", "users = 150").replace("items = 300", "items = 120")


@pytest.mark.parametrize("mode", ["local", "central"])
def test_local_and_central_modes_train_under_the_same_budget(tmp_path, mode):
    from fedaug.common.config import load_config
    from fedaug.simulations.simulate import run_simulate

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    config = load_config(path, {"simulation.mode": mode, "federation.rounds": 2, "privacy.epsilon": 3.0},
                         SimulationConfig)
    metrics = run_simulate(config, tmp_path / "out")
    assert metrics.mode == mode and len(metrics.rounds) == 2
    assert 0 < metrics.privacy.epsilon_max <= 3.0
    if mode == "local":
        assert len(metrics.merchants) == 3 and all(m.epsilon <= 3.0 for m in metrics.merchants)
        assert sum(m.users for m in metrics.merchants) == metrics.data["users"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics.to_json()
    assert (tmp_path / "out" / "report.md").read_text().startswith(f"# fedaug simulation: {mode}")


def test_a_nonprivate_federation_trains_the_central_recipe(tmp_path):
    """ε = inf: every merchant trains the central baseline's tied wide tables for several local epochs; the
    global model comes back whole (tied input and output tables stay one)."""
    from fedaug.common.config import load_config
    from fedaug.common.recommend.bundle import load_bundle
    from fedaug.simulations.simulate import run_simulate

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    config = load_config(path, {"federation.rounds": 1, "privacy.epsilon": "inf"}, SimulationConfig)
    assert config.model.tie_embeddings and config.local.local_epochs > 1
    metrics = run_simulate(config, tmp_path / "out")
    assert metrics.privacy.epsilon_max is None and len(metrics.rounds) == 1 and metrics.test["ndcg@10"] > 0
    model = load_bundle(tmp_path / "out" / "model").scorer.model
    assert model.out.weight is model.item_emb.weight
    report = (tmp_path / "out" / "report.md").read_text()
    assert "non-private (ε = inf)" in report and "max ε" not in report.split("## Privacy")[1].split("##")[0]
    assert "shared by input and output" in report  # the model as built, tied


def test_a_sweep_runs_its_grid_once_and_reports(tmp_path):
    from fedaug.common.errors import ConfigError
    from fedaug.simulations.sweep import load_sweep, run_sweep

    path = tmp_path / "sweep.toml"
    path.write_text(TINY + '\n[sweep]\nepsilon = [2, "inf"]\naugment = [true]\nmodes = ["central"]\n'
                    "[federation]\nrounds = 1\n")
    grid, base = load_sweep(path)
    with pytest.raises(ConfigError, match="no finished runs"):
        run_sweep(grid, base, tmp_path / "out", report_only=True)
    summary = run_sweep(grid, base, tmp_path / "out")
    assert [r["name"] for r in summary["runs"]] == ["central-eps2-aug", "central-epsinf-aug"]
    assert summary["runs"][1]["epsilon"] == "inf" and summary["runs"][0]["privacy"]["epsilon_max"] <= 2.0
    for name in ("sweep.json", "report.md", "privacy_utility.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "central-eps2-aug" / "state" / "pooled").is_dir()  # its ledger, in its own run dir
    stamp = (tmp_path / "out" / "central-eps2-aug" / "metrics.json").stat().st_mtime_ns
    run_sweep(grid, base, tmp_path / "out")  # finished runs are not run again
    assert (tmp_path / "out" / "central-eps2-aug" / "metrics.json").stat().st_mtime_ns == stamp
    (tmp_path / "out" / "central-epsinf-aug" / "metrics.json").unlink()
    partial = run_sweep(grid, base, tmp_path / "out", report_only=True)  # reports what finished, runs nothing
    assert [r["name"] for r in partial["runs"]] == ["central-eps2-aug"]
    assert partial["missing"] == ["central-epsinf-aug"] and not (tmp_path / "out" / "central-epsinf-aug" /
                                                                  "metrics.json").exists()
    assert "Not run yet: central-epsinf-aug" in (tmp_path / "out" / "report.md").read_text()


def test_a_sweep_draws_item_ids_and_text_prior_lines_with_cold_figures(tmp_path):
    """Runs fused with the text prior give two lines each (the model over item ids alone, and fused), the text
    prior and popularity are baselines, and the item-side table carries the cold-item figures."""
    from fedaug.simulations.sweep import load_sweep, run_sweep

    path = tmp_path / "sweep.toml"
    path.write_text(TINY + '\n[sweep]\nepsilon = [1, "inf"]\naugment = [true]\n')
    grid, base = load_sweep(path)

    def metrics(alone: float, fused: float) -> dict:
        def same(value: float) -> dict:
            return dict.fromkeys(METRIC_NAMES, value)

        return {"test": same(fused), "privacy": {"epsilon_max": 1.0}, "seconds": 1.0, "defence": "fedavg",
                "baselines": {"popularity": same(0.01), "text prior": same(0.03)}, "test_cold": same(fused / 2),
                "fusion": {"weight": 4.0, "model_test": same(alone), "model_test_cold": same(alone / 4)}}

    for name, alone, fused in (("federated-eps1-aug", 0.005, 0.031), ("federated-epsinf-aug", 0.02, 0.05)):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "metrics.json").write_text(json.dumps(metrics(alone, fused)))
    summary = run_sweep(grid, base, tmp_path / "out", report_only=True)
    assert set(summary["baselines"]) == {"popularity", "text prior"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| federated-eps1-aug | 0.0050 | 0.0310 | 4.0 | 0.0013 | 0.0155 |" in report
    assert "| federated-epsinf-aug | 0.0200 | 0.0500 | 4.0 | 0.0050 | 0.0250 |" in report


def test_sweep_config_errors_name_the_file_and_key(tmp_path):
    from fedaug.common.errors import ConfigError
    from fedaug.simulations.sweep import load_sweep

    path = tmp_path / "bad.toml"
    path.write_text('[sweep]\nepsilon = [0, 1]\n')
    with pytest.raises(ConfigError, match=r"bad.toml: key sweep.epsilon: every ε must be positive"):
        load_sweep(path)
    path.write_text('[sweep]\nmodes = ["galactic"]\n')
    with pytest.raises(ConfigError, match=r"bad.toml: key sweep.modes.0"):
        load_sweep(path)
    path.write_text('[federation]\nstrategy = "fedsgd"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: key federation.strategy"):
        load_sweep(path)


def test_reports_and_plots_say_what_the_run_was():
    """The report names the model as built (no catalog where the data has no attributes), says "non-private" for
    ε = inf, and identical ε curves are one line."""
    import numpy as np

    from fedaug.common.config import ModelSection, SyntheticSection
    from fedaug.common.data import ItemCatalog, from_sequences
    from fedaug.common.data.synthetic import generate
    from fedaug.common.model.build import describe
    from fedaug.common.records import MerchantRecord
    from fedaug.simulations.plots import epsilon_lines

    plain = from_sequences([np.array([1, 2, 3])], ItemCatalog(raw_ids=np.arange(4)))
    section = ModelSection(catalog="auto", item_dim=8, tie_embeddings=False)
    assert "catalog" not in describe(section, plain) and "item tables 8 wide" in describe(section, plain)
    assert "catalog attributes (" in describe(section, generate(SyntheticSection(users=60, items=50, seed=2)))
    same = [MerchantRecord(merchant=i, epsilon_by_round={"1": 4.0, "2": 7.9}) for i in range(10)]
    other = MerchantRecord(merchant=10, epsilon_by_round={"1": 8.0})
    assert [label for label, _ in epsilon_lines(same)] == ["all 10 merchants"]
    assert [label for label, _ in epsilon_lines([*same, other])] == ["10 merchants", "merchant-10"]


def test_the_side_vector_ablation_reports_each_variant_and_its_paired_gain(tmp_path):
    """python -m fedaug.simulations.experiments.side_vectors: runs per variant and seed, skipped when done, a paired
    gain from the runs' own bundles that matches their metrics."""
    from fedaug.simulations.experiments.side_vectors import run

    config = tmp_path / "tiny.toml"
    config.write_text("[synthetic]\nusers = 120\nitems = 60\ntitles = false\n\n[train]\nepochs = 1\n")
    report = run(config, tmp_path / "out", [0], ["none", "both"])
    assert "| none | 1 |" in report and "| both | 1 |" in report and "cart" in report
    gains = json.loads((tmp_path / "out" / "gains.json").read_text())
    tests = {v: json.loads((tmp_path / "out" / f"{v}-s0" / "metrics.json").read_text())["test"]["ndcg@10"]
             for v in ("none", "both")}
    assert gains["both"]["gain"] == pytest.approx(tests["both"] - tests["none"], abs=1e-6)
    stamp = (tmp_path / "out" / "both-s0" / "metrics.json").stat().st_mtime_ns
    run(config, tmp_path / "out", [0], ["none", "both"])  # nothing left to run
    assert (tmp_path / "out" / "both-s0" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_many_merchants_a_fraction_per_round_each_built_only_when_sampled(tmp_path):
    """200 registered merchants, 5 % trained and 5 % evaluated per round: each round trains exactly the ten
    Flower samples, and only merchants that were sampled trained or scored (the others were never built for a
    round); every merchant then receives the final model. Without central evaluation the rounds' figures come from
    the sampled merchants."""
    path = tmp_path / "many.toml"
    path.write_text(TINY.replace("users = 150", "users = 4000").replace("merchants = 3\n[local]",
                                                                         "merchants = 200\ncentral_evaluation = false"
                                                                         "\n[local]")
                    + "[federation]\nrounds = 2\nfraction_train = 0.05\nfraction_evaluate = 0.05\n")
    process = _fedaug("simulate", "--config", str(path), "--epsilon", "inf", "--out", str(tmp_path / "run"))
    output = _finish(process, timeout=900)
    assert process.returncode == 0, output[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["participants"] for r in rounds] == [10, 10] and metrics["merchants_total"] == 200
    assert all(r["federated_merchants"] == 10 and r["federated_valid"] for r in rounds)
    assert metrics["test"]["ndcg@10"] > 0  # the final model, tested on every user after the run
    worked = [set(r["work"]["seconds"]) for r in rounds]  # sampled to train, to evaluate, or both
    assert all(10 <= len(w) <= 20 for w in worked)
    state = tmp_path / "run" / "state"
    built = {p.parent.name for p in state.glob("merchant-*/rounds.jsonl")}
    assert built == set().union(*worked) and len(built) <= 40  # 200 registered; only the sampled ever worked
    assert len(list(state.glob("merchant-*/model"))) == 200  # and every merchant got the final model
    assert not (state / SHARED_DATA).exists()  # the data set the workers mapped lives as long as the run

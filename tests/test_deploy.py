"""Deployment faults with real processes: `fedaug aggregator` (flower-superlink, TLS, SuperNode authentication)
and `fedaug merchant` daemons (flower-supernode) on 127.0.0.1 with ephemeral ports, each test bounded in time."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedaug.client.ledger import PrivacyLedger
from fedaug.common.config import SyntheticSection
from fedaug.common.data.synthetic import generate
from fedaug.common.recommend.bundle import bundle_hash, load_bundle
from fedaug.runtime.certs import write_certificates
from fedaug.runtime.export import write_merchant_files
from fedaug.server import checkpoint
from tests.support import LIBRARY_NOTES, free_port

pytestmark = pytest.mark.slow

RECIPE = """
[data]
catalog = "{catalog}"

[model]
hidden = 16
blocks = 1
max_len = 20

[local]
batch_size = 256
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Certificates for 4 merchants (merchant-4 is never registered) and 3 merchants' data files."""
    root = tmp_path_factory.mktemp("site")
    write_certificates(root / "certs", merchants=4)
    write_merchant_files(generate(SyntheticSection(users=300, items=300, merchants=3, titles=False)), root / "data")
    return root



class Daemon:
    """A `fedaug` daemon in its own process group (so `kill -9` takes its Flower children with it)."""

    def __init__(self, workdir: Path, name: str, *args: str, by_path: bool = False):
        """``by_path``: started as systemd or cron would, as the venv's `fedaug` script by absolute path with no
        venv on PATH."""
        self.log = workdir / f"{name}.out"
        command, env = [sys.executable, "-m", "fedaug"], {**os.environ, "COLUMNS": "200"}
        if by_path:
            command, env["PATH"] = [str(Path(sys.executable).parent / "fedaug")], "/usr/bin:/bin"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([*command, *args], cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name} still running after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def stop(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()


def aggregator_config(site: Path, workdir: Path, port: int, rounds: int, keys: list[int], *,
                      health: str | None = None, **federation) -> Path:
    settings = {"rounds": rounds, "min_nodes": len(keys), "min_replies": 1, "round_timeout": 90.0} | federation
    lines = ["[aggregator]", f'address = "127.0.0.1:{port}"', f'control_address = "127.0.0.1:{free_port()}"',
             f'certificates = "{site / "certs"}"',
             "merchant_keys = [" + ", ".join(f'"{site / "certs" / f"merchant-{k}.pub"}"' for k in keys) + "]",
             f'state_dir = "{workdir / "aggregator"}"', "poll_seconds = 1.0"]
    lines += [f'health_address = "{health}"'] if health else []
    lines += ["", "[federation]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path = workdir / "aggregator.toml"
    path.write_text("\n".join(lines) + RECIPE.format(catalog=site / "data" / "catalog.tsv"))
    return path


def merchant_config(site: Path, workdir: Path, i: int, port: int, *, key: int | None = None,
                    root: Path | None = None, epsilon: float = 8.0, max_restarts: int | None = None,
                    health: str | None = None) -> Path:
    lines = ["[merchant]", f'superlink = "127.0.0.1:{port}"',
             f'root_certificate = "{root or site / "certs" / "ca.crt"}"',
             f'private_key = "{site / "certs" / f"merchant-{key or i}.key"}"',
             f'state_dir = "{workdir / f"merchant-{i}"}"', f"runtime_port = {free_port()}", "max_backoff = 4.0"]
    if max_restarts is not None:
        lines.append(f"max_restarts = {max_restarts}")
    if health is not None:
        lines.append(f'health_address = "{health}"')
    lines += ["", "[data]", f'path = "{site / "data" / f"merchant-{min(i, 3)}.csv"}"',
              f'catalog = "{site / "data" / "catalog.tsv"}"', "", "[privacy]", f"epsilon = {epsilon}"]
    path = workdir / f"merchant-{i}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


PROJECT = Path(__file__).resolve().parent.parent


def run_id(aggregator: Daemon) -> str:
    return aggregator.output().split("Submitted run ", 1)[1].split()[0]


def merchant_flwr(workdir: Path, port: int, ca: Path, *args: str) -> subprocess.CompletedProcess:
    """The Flower CLI as a merchant could run it: the aggregator's public address and the CA certificate."""
    home = workdir / "merchant-flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "aggregator"\n[superlink.aggregator]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "aggregator", "--format", "json"],
                          capture_output=True, text=True, timeout=120, cwd=workdir,
                          env={**os.environ, "FLWR_HOME": str(home), "NO_COLOR": "1"})


def operator_flwr(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The Flower CLI as the aggregator's own host runs it (its loopback connection)."""
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "fedaug", "--format", "json"],
                          capture_output=True, text=True, timeout=120, cwd=workdir,
                          env={**os.environ, "FLWR_HOME": str(workdir / "aggregator" / "flwr"), "NO_COLOR": "1"})


def wait_for(condition, timeout: float, what: str, *daemons: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for daemon in daemons:
            if daemon.process.poll() is not None:
                pytest.fail(f"{daemon.log.name} exited ({daemon.process.returncode}) while waiting for {what}:\n"
                            f"{daemon.output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(0.5)


def logged_rounds(workdir: Path) -> list[int]:
    log = workdir / "aggregator" / "server" / "rounds.jsonl"
    return [json.loads(line)["round"] for line in log.read_text().splitlines()] if log.exists() else []


def train_messages(workdir: Path, i: int) -> int:
    log = workdir / f"merchant-{i}" / "supernode.log"
    return log.read_text(errors="replace").count("Receiving: train message") if log.exists() else 0


def ledger_rounds(workdir: Path, i: int) -> list[tuple[str, int, float]]:
    db = sqlite3.connect(workdir / f"merchant-{i}" / "privacy-ledger.sqlite")
    try:
        return db.execute("SELECT run_id, round, epsilon FROM rounds ORDER BY id").fetchall()
    finally:
        db.close()


def node_ids(workdir: Path) -> dict[str, str]:
    return json.loads((workdir / "aggregator" / "merchants.json").read_text())


def scrape_while_running(url: str, daemon: Daemon, timeout: float) -> str:
    """The last /metrics page served before ``daemon`` exited ('' if none was)."""
    page, deadline = "", time.monotonic() + timeout
    while daemon.process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                page = response.read().decode()
        except OSError:
            pass
        time.sleep(0.5)
    return page


def test_unregistered_keys_and_wrong_root_certificates_are_refused(site, tmp_path):
    port, metrics_port = free_port(), free_port()
    aggregator = Daemon(tmp_path, "aggregator", "aggregator", "--config",
                        str(aggregator_config(site, tmp_path, port, rounds=1, keys=[1], metrics_port=metrics_port)))
    daemons = [aggregator]
    try:
        wait_for(lambda: (tmp_path / "aggregator" / "merchants.json").exists(), 120, "SuperLink", aggregator)
        wait_for(lambda: "Submitted run" in aggregator.output(), 120, "the run's submission", aggregator)

        # A merchant holds ca.crt and the public address: Flower's Control API must stay out of its reach.
        for attempt in (["ls"], ["stop", run_id(aggregator)], ["run", str(PROJECT)]):
            refused = merchant_flwr(tmp_path, port, site / "certs" / "ca.crt", *attempt)
            assert refused.returncode != 0 or '"success": false' in refused.stdout, (attempt, refused.stdout)
            assert "403" in refused.stdout + refused.stderr, (attempt, refused.stdout, refused.stderr)
        assert run_id(aggregator) in operator_flwr(tmp_path, "ls").stdout  # still there, still running

        stranger = Daemon(tmp_path, "stranger", "merchant", "--config",
                          str(merchant_config(site, tmp_path, 4, port, max_restarts=0)))
        assert stranger.wait(120) == 1
        assert "Failed to activate SuperNode" in stranger.output()
        superlink_log = (tmp_path / "aggregator" / "superlink.log").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in superlink_log

        write_certificates(tmp_path / "other-ca", merchants=0)
        impostor = Daemon(tmp_path, "impostor", "merchant", "--config",
                          str(merchant_config(site, tmp_path, 5, port, key=1, root=tmp_path / "other-ca" / "ca.crt",
                                              max_restarts=0)))
        assert impostor.wait(120) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in impostor.output()

        # The same key with the right root certificate joins, and the one-round run completes.
        merchant = Daemon(tmp_path, "merchant-1", "merchant", "--config",
                          str(merchant_config(site, tmp_path, 1, port)))
        daemons.append(merchant)
        scraped = scrape_while_running(f"http://127.0.0.1:{metrics_port}/metrics", aggregator, 300)
        assert aggregator.wait(60) == 0, aggregator.output()[-3000:]
        assert logged_rounds(tmp_path) == [1]
        assert "fedaug_round_participants" in scraped  # the ServerApp served Prometheus metrics while it ran
    finally:
        for daemon in daemons:
            daemon.stop()


def test_a_killed_merchant_rejoins_with_its_ledger_and_an_exhausted_one_declines(site, tmp_path):
    # Merchant 3 spent its whole budget in an earlier run: it must decline every round.
    spent = PrivacyLedger(tmp_path / "merchant-3")
    spent.record("an-earlier-run", 1, noise_multiplier=0.5, sample_rate=1.0, steps=200, delta=1e-5)
    spent.close()
    port = free_port()
    health = {"aggregator": f"127.0.0.1:{free_port()}", "merchant-2": f"127.0.0.1:{free_port()}"}
    aggregator = Daemon(tmp_path, "aggregator", "aggregator", "--config",
                        str(aggregator_config(site, tmp_path, port, rounds=3, keys=[1, 2, 3],
                                              health=health["aggregator"])))
    # Merchant 2 is started by absolute path without the venv on PATH (as systemd would): it must still train.
    merchants = {i: Daemon(tmp_path, f"merchant-{i}", "merchant", "--config",
                           str(merchant_config(site, tmp_path, i, port, epsilon=1.0 if i == 3 else 8.0,
                                               health=health["merchant-2"] if i == 2 else None)),
                           by_path=i == 2)
                 for i in (1, 2, 3)}
    restarted = None
    try:
        wait_for(lambda: train_messages(tmp_path, 1) >= 1, 400, "round 1 at merchant 1", aggregator)
        for name, address in health.items():  # what the containers' healthchecks run
            probe = subprocess.run([sys.executable, "-m", "fedaug", "health", "--address", address],
                                   capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0 and "serving" in probe.stdout, (name, probe.stderr)
        wait_for(lambda: train_messages(tmp_path, 1) >= 2, 400, "round 2 at merchant 1", aggregator)
        time.sleep(2)
        merchants[1].kill()  # kill -9, mid-round: its update for round 2 never arrives
        assert logged_rounds(tmp_path) == [1]
        restarted = Daemon(tmp_path, "merchant-1-again", "merchant", "--config",
                           str(tmp_path / "merchant-1.toml"))
        assert aggregator.wait(600) == 0, aggregator.output()[-3000:]
    finally:
        for daemon in [aggregator, restarted, *merchants.values()]:
            if daemon:
                daemon.stop()

    rounds = [json.loads(line) for line in (tmp_path / "aggregator" / "server" / "rounds.jsonl").read_text()
              .splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["failures"]["declined"] == 1 for r in rounds)  # merchant 3, every round
    assert rounds[0]["participants"] == 2 and rounds[1]["participants"] == 1 and rounds[2]["participants"] == 2
    assert rounds[1]["failures"]["missing"] + rounds[1]["failures"]["error"] == 1  # the killed merchant

    assert [(run, r) for run, r, _ in ledger_rounds(tmp_path, 3)] == [("an-earlier-run", 1)]  # nothing after
    assert [r for _, r, _ in ledger_rounds(tmp_path, 2)] == [1, 2, 3]  # the one started by absolute path
    said = merchants[2].output()  # a daemon says what it does, one line per round
    assert all(f"round {r}: trained in" in said for r in (1, 2, 3)) and "bytes sent" in said, said[-2000:]
    entries = ledger_rounds(tmp_path, 1)
    trained = [r for _, r, _ in entries]
    assert {1, 3} <= set(trained) and set(trained) <= {1, 2, 3}
    epsilons = [e for _, _, e in entries]
    assert epsilons == sorted(epsilons) and epsilons[-1] > epsilons[0]  # ε continued from the ledger, never reset
    metrics = json.loads((tmp_path / "aggregator" / "metrics.json").read_text())
    merchant_1 = next(m for m in metrics["merchants"] if str(m["node"]) == node_ids(tmp_path)["merchant-1"])
    assert merchant_1["epsilon"] == pytest.approx(epsilons[-1])  # what the server saw is the full composition
    assert merchant_1["epsilon"] <= 8.0
    # Every merchant, the exhausted and the restarted one too, ends holding the aggregator's final bundle.
    final = bundle_hash(tmp_path / "aggregator" / "server" / "model")
    assert [bundle_hash(tmp_path / f"merchant-{i}" / "model") for i in (1, 2, 3)] == [final] * 3
    assert load_bundle(tmp_path / "merchant-2" / "model").card.trained["rounds"] == 3


@pytest.fixture(scope="module")
def titled_site(tmp_path_factory) -> Path:
    """Like ``site``, with item titles in the public catalog: the federation releases DP statistics."""
    root = tmp_path_factory.mktemp("titled")
    write_certificates(root / "certs", merchants=3)
    write_merchant_files(generate(SyntheticSection(users=300, items=120, merchants=3)), root / "data")
    return root


def test_a_secure_sum_completes_when_a_merchant_is_killed_after_masking(titled_site, tmp_path):
    """Acceptance 3 with real processes: three merchant daemons release their statistics through SecAgg+; merchant
    3 is killed (kill -9) as soon as its masked vector has left it. The aggregator still unmasks the sum of all
    three — the two others' key shares remove merchant 3's masks. Merchant 3's daemon is then started again (as
    its service manager would: the federation waits for its three merchants), and the federation ends with every
    merchant holding the bundle, merchant 3's statistics paid for once."""
    port = free_port()
    config = aggregator_config(titled_site, tmp_path, port, rounds=1, keys=[1, 2, 3], round_timeout=120.0)
    aggregator = Daemon(tmp_path, "aggregator", "aggregator", "--config", str(config))
    merchants = {i: Daemon(tmp_path, f"merchant-{i}", "merchant", "--config",
                           str(merchant_config(titled_site, tmp_path, i, port))) for i in (1, 2, 3)}
    supernode = tmp_path / "merchant-3" / "supernode.log"

    def masked_vector_sent() -> bool:
        text = supernode.read_text(errors="replace") if supernode.exists() else ""
        _, sending, after = text.partition("Sending: query.secure_mask message")
        return bool(sending) and "Sent successfully" in after

    restarted = None
    try:
        wait_for(masked_vector_sent, 600, "merchant 3's masked vector", aggregator, merchants[3])
        merchants[3].kill()  # kill -9 of merchant 3's daemon and its SuperNode, before the unmask stage
        restarted = Daemon(tmp_path, "merchant-3-again", "merchant", "--config", str(tmp_path / "merchant-3.toml"))
        assert aggregator.wait(900) == 0, aggregator.output()[-3000:]
    finally:
        for daemon in [aggregator, restarted, *merchants.values()]:
            if daemon:
                daemon.stop()

    state = checkpoint.load(tmp_path / "aggregator" / "server")
    assert state.round == 1 and state.statistics_release["survivors"] == 3  # merchant 3's vector is in the sum
    bundle = load_bundle(tmp_path / "aggregator" / "server" / "model")
    release = bundle.card.parts["statistics"]["release"]
    assert (release["secure_aggregation"], release["noise"], release["merchants"], release["survivors"]) == (
        "SecAgg+", "pooled", 3, 3)
    assert bundle.card.privacy["secure_aggregation"]["assumes"]
    final = bundle_hash(tmp_path / "aggregator" / "server" / "model")
    assert [bundle_hash(tmp_path / f"merchant-{i}" / "model") for i in (1, 2, 3)] == [final] * 3
    for i in (1, 2, 3):  # each merchant's ledger holds its one pooled statistics release
        entries = ledger_rounds(tmp_path, i)
        assert [run.endswith("/statistics") for run, _, _ in entries].count(True) == 1
    assert "statistics counted and masked for a secure sum" in merchants[1].output()


def test_a_killed_aggregator_resumes_from_its_state_dir(site, tmp_path):
    port = free_port()
    # A merchant that was mid-training when the aggregator died retrains round 2 for the resumed one: on a loaded
    # machine that takes longer than the 90 s other tests allow, and the round must wait for it, not drop it.
    config = aggregator_config(site, tmp_path, port, rounds=2, keys=[1, 2, 3], round_timeout=400.0)
    aggregator = Daemon(tmp_path, "aggregator", "aggregator", "--config", str(config))
    merchants = [Daemon(tmp_path, f"merchant-{i}", "merchant", "--config",
                        str(merchant_config(site, tmp_path, i, port))) for i in (1, 2, 3)]
    resumed = None
    try:
        wait_for(lambda: logged_rounds(tmp_path) == [1] and train_messages(tmp_path, 1) >= 2, 400,
                 "round 2", aggregator)
        time.sleep(2)
        aggregator.kill()  # kill -9 of the aggregator, its SuperLink and ServerApp, mid-round 2
        resumed = Daemon(tmp_path, "aggregator-again", "aggregator", "--config", str(config))
        assert resumed.wait(600) == 0, resumed.output()[-3000:]
    finally:
        for daemon in [aggregator, resumed, *merchants]:
            if daemon:
                daemon.stop()

    assert logged_rounds(tmp_path) == [1, 2]  # none lost, none twice
    metrics = json.loads((tmp_path / "aggregator" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    # Merchants that had trained round 2 for the lost aggregator resend that update: nobody declines the replay.
    assert metrics["rounds"][1]["participants"] == 3, (metrics["rounds"][1]["failures"],
                                                       [m.output()[-1500:] for m in merchants])
    assert (tmp_path / "aggregator" / "server" / "checkpoint.npz").exists()
    run_keys = set()
    for i in (1, 2, 3):
        entries = ledger_rounds(tmp_path, i)
        run_keys |= {run for run, _, _ in entries}
        # Round 2 is paid for once: resent, not retrained (twice only if a kill fell between the ledger's commit
        # and the saved update, which over-counts, never under-counts).
        assert {r for _, r, _ in entries} == {1, 2} and len(entries) in (2, 3)
    assert run_keys == {metrics["run_key"]}  # the resumed run kept its key: the merchants' ε composes in one run


def test_the_readme_deployment_demo_hands_every_merchant_the_fused_model(tmp_path):
    """`bash scripts/deploy-demo.sh` as the README runs it: three merchant daemons and the aggregator on loopback
    (TLS, SuperNode authentication) over synthetic merchants whose public catalog carries titles, ε = 8. It exits
    0, every merchant holds the aggregator's bundle, which is the text prior with the merchants' DP statistics
    (and the trained model at the weight their federated DP evaluation chose), and each merchant checked it
    locally."""
    work = tmp_path / "demo"
    result = subprocess.run(["bash", str(PROJECT / "scripts" / "deploy-demo.sh"), str(work)], capture_output=True,
                            text=True, timeout=900, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "== demo OK" in result.stdout
    state = work / "state"
    expected = bundle_hash(state / "aggregator" / "server" / "model")
    bundle = load_bundle(state / "aggregator" / "server" / "model")
    assert bundle.card.scorer["kind"] == "fused" and bundle.card.scorer["prior"]["kind"] == "text+statistics"
    assert bundle.catalog.titles and all(bundle.catalog.titles)
    assert bundle.card.parts["model"]["evaluation"]["merchants"] == 3
    release = bundle.card.parts["statistics"]["release"]  # three merchants: the statistics went through SecAgg+
    assert (release["secure_aggregation"], release["noise"], release["survivors"]) == ("SecAgg+", "pooled", 3)
    for i in (1, 2, 3):
        assert bundle_hash(state / f"merchant-{i}" / "model") == expected
        check = json.loads((state / f"merchant-{i}" / "model-check.json").read_text())
        assert check["bundle"]["hash"] == expected and check["text_prior"] is not None
    assert "the model handed out" in result.stdout
    # What an operator reads: the daemons' consoles and Flower's SuperNode logs carry no library notes.
    logs = sorted(work.glob("merchant-*.log")) + sorted(state.glob("merchant-*/supernode.log"))
    assert len(logs) == 6
    noted = {log.name: [note for note in LIBRARY_NOTES if note in log.read_text()] for log in logs}
    assert not any(noted.values()), noted

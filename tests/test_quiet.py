"""What users see in their terminal carries no library notes: `fedaug local` (also with -q) and the merchant daemon
on small synthetic data, run as a user runs them, print none of the warnings that used to reach every log (the
project's pytest config filters none of them either). `flwr run .`'s output is checked by test_simulate's own run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedaug.client.daemon import KEY_PATIENCE, MerchantDaemon, MerchantDaemonConfig
from fedaug.client.trainer import AUTO_BATCH_STEPS, SAMPLE_RATE_WARNING, auto_batch_size
from tests.support import LIBRARY_NOTES, fedaug, finish, free_port, run_fedaug

SHOP = """
[synthetic]
users = 300
items = 200
[model]
hidden = 16
max_len = 20
"""


def _clean(output: str) -> None:
    seen = [note for note in LIBRARY_NOTES if note in output]
    assert not seen, f"{seen} in:\n{output[-3000:]}"


def test_fedaug_local_on_the_defaults_prints_no_warnings(tmp_path):
    """The README's defaults (synthetic items with titles, so the text prior's encoder runs too), one round."""
    config = tmp_path / "shop.toml"
    config.write_text(SHOP)
    output = finish(fedaug("local", "--config", str(config), "--rounds", "1", "--out", str(tmp_path / "run")),
                    timeout=600)
    assert "test NDCG@10" in output, output[-3000:]
    _clean(output)


def test_fedaug_local_quiet_on_a_shop_file_prints_no_warnings(tmp_path):
    made = run_fedaug("synth", "--out", str(tmp_path / "data"), "--merchants", "1", "--users", "250", timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    output = finish(fedaug("-q", "local", "--data", str(tmp_path / "data" / "merchant-1.csv"), "--epsilon", "8",
                           "--out", str(tmp_path / "run")), timeout=600)
    assert "test NDCG@10" in output, output[-3000:]
    _clean(output)


def _merchant(tmp_path: Path, port: int) -> Path:
    for command in (("certs", "--out", str(tmp_path / "certs"), "--merchants", "1"),
                    ("synth", "--out", str(tmp_path / "data"), "--merchants", "1", "--users", "200")):
        made = run_fedaug(*command, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
    config = tmp_path / "merchant-1.toml"
    config.write_text(f"""
[merchant]
superlink = "127.0.0.1:{port}"
root_certificate = "{tmp_path / 'certs' / 'ca.crt'}"
private_key = "{tmp_path / 'certs' / 'merchant-1.key'}"
state_dir = "{tmp_path / 'state'}"
runtime_port = {free_port()}
[data]
path = "{tmp_path / 'data' / 'merchant-1.csv'}"
catalog = "{tmp_path / 'data' / 'catalog.tsv'}"
""")
    return config


def test_the_merchant_daemon_shows_its_retries_towards_an_absent_aggregator(tmp_path):
    """Nothing listens at the aggregator's address: the console shows each retry with the address and the next
    delay (Flower writes them to supernode.log only), says where the DP noise comes from, and no warnings."""
    port = free_port()
    process = fedaug("merchant", "--config", str(_merchant(tmp_path, port)))
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if sum("not reachable" in seen for seen in lines) >= 2:
                break
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            rest, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            rest, _ = process.communicate()
    output = "".join(lines) + rest
    retries = [line for line in lines if "not reachable" in line]
    assert len(retries) >= 2, output[-3000:]
    assert all(f"127.0.0.1:{port}" in line and "next try in" in line for line in retries)
    assert "DP noise: torch's generator, seeded from OS entropy" in output
    _clean(output)


@pytest.fixture
def daemon(tmp_path):
    for name in ("ca.crt", "merchant-1.key"):
        (tmp_path / name).write_text("")
    config = MerchantDaemonConfig.model_validate({
        "merchant": {"superlink": "agg.example:9092", "root_certificate": str(tmp_path / "ca.crt"),
                     "private_key": str(tmp_path / "merchant-1.key"), "state_dir": str(tmp_path / "state")},
        "data": {"path": str(tmp_path / "events.csv"), "catalog": str(tmp_path / "catalog.tsv")}})
    said: list[str] = []
    return MerchantDaemon(config, say=said.append), said


def test_a_refusal_is_told_apart_by_how_long_it_lasts(daemon, tmp_path):
    """Flower's [code: 2004] says the same for "keys not registered yet" and "this key is not registered": a
    refusal within KEY_PATIENCE of the first is the aggregator not ready; past it, the key named to its operator."""
    merchant, _ = daemon
    reason = "[code: 2004] Failed to activate SuperNode."
    early = merchant.refusal(reason, refused_for=3.0)
    assert "does not accept this merchant yet" in early and "agg.example:9092" in early
    late = merchant.refusal(reason, refused_for=KEY_PATIENCE + 1)
    assert str(tmp_path / "merchant-1.pub") in late and "[aggregator] merchant_keys" in late
    assert merchant.refusal("[SSL: CERTIFICATE_VERIFY_FAILED]", refused_for=500.0) == "[SSL: CERTIFICATE_VERIFY_FAILED]"


def test_between_runs_the_daemon_waits_quietly_and_says_so(daemon):
    merchant, said = daemon
    retry = "WARNING : Connection attempt failed, retrying in 3.27 seconds"
    merchant.on_supernode_line(retry)
    assert said == ["aggregator agg.example:9092 not reachable; next try in 3.3 s"]
    merchant._on_model_check("final model received (state/model): testing it on your held-out users, locally")
    assert "Waiting for the aggregator's next run" in said[-1]
    waited = len(said)
    merchant.on_supernode_line(retry)  # the run is over: retries until the next run are not news
    assert len(said) == waited
    merchant.on_supernode_line("INFO : Connection successful after 2419.50 seconds and 130 tries.")
    assert said[-1] == "connected to the aggregator agg.example:9092 after 2420 s and 130 tries"
    merchant.on_supernode_line(retry)
    assert said[-1].startswith("aggregator agg.example:9092 not reachable")


@pytest.mark.parametrize("users", [2, 3, 211, 996, 1500, 2236, 22363])
def test_batch_size_auto_never_warns_on_any_merchant(users):
    """batch_size auto: at least AUTO_BATCH_STEPS Poisson steps an epoch wherever there are users for it; the
    tuned 1,024 stays where a merchant holds enough users (a tenth of Beauty's)."""
    batch = auto_batch_size(users, 1024)
    steps = -(-users // batch)
    assert batch >= 1 and (steps >= AUTO_BATCH_STEPS or batch == 1)
    assert users < 3 or 1 / steps < SAMPLE_RATE_WARNING
    assert auto_batch_size(22363 // 10, 1024) == 1024 and auto_batch_size(996, 1024) == 497

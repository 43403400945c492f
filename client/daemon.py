"""`fedaug merchant`: the merchant's long-lived daemon, Flower's own `flower-supernode` carrying our ClientApp.

It checks the merchant's data first, with the same loaders and one-line errors as every other command, numbered
by the public catalog the aggregator also holds; only then does it start the SuperNode: TLS verified against the
platform's root certificate, authenticated with the merchant's private key, its node_config pointing the
ClientApp at the data, the ledger's directory and the merchant's own budget. When the SuperNode exits (the
aggregator away too long, a crash) it is started again after a back-off that doubles up to ``max_backoff``.

The console says what the SuperNode only logs: each retry towards an unreachable aggregator with its next delay,
and why the aggregator refused this merchant (Flower's ``[code: 2004]``: not registered yet, or not at all).
The aggregator is one-shot per federation run: after a run's final model arrives, the daemon stays up and waits,
quietly, for the aggregator's next run (the SuperNode keeps retrying, logged in its log file only).

The training recipe (model, augmentation, local steps) arrives from the aggregator with each run; what stays here
is what is the merchant's own to decide: its data, its device and its privacy budget.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, model_validator

from fedaug.client.merchant import STATE_DIR
from fedaug.client.model_check import ModelCheckWatcher
from fedaug.client.round_log import RoundLogFollower
from fedaug.client.spent import claim
from fedaug.client.trainer import NOISE_SOURCE
from fedaug.common.config import BudgetSection, DataSection, Section, flatten
from fedaug.common.data.source import load_data
from fedaug.common.data.validate import DataReport, check_data
from fedaug.common.errors import ConfigError, FedaugError
from fedaug.runtime.processes import HostPort, LogFollower, flower_command, flower_error, start, stop

HEALTHY_SECONDS = 60.0
"""A SuperNode that ran this long before exiting was healthy: the back-off starts again from 1 s."""
KEY_PATIENCE = 120.0
"""An aggregator registers its merchants' keys within seconds of starting: refused ([code: 2004]) for longer than
this, the merchant's key is taken to be missing from its list."""
RETRY = re.compile(r"Connection attempt failed, retrying in ([0-9.]+) seconds")
CONNECTED = re.compile(r"Connection successful after ([0-9.]+) seconds and (\d+) tries")
NOT_ACTIVATED = "[code: 2004]"
"""Flower's answer when the SuperLink knows no node with this key, or counts its previous connection online."""


class MerchantSection(Section):
    """[merchant]: where the aggregator is, this merchant's credentials and state."""

    superlink: HostPort = "127.0.0.1:9092"
    """The aggregator's SuperLink (host:port); the host must be in its certificate."""
    root_certificate: Path = Path("certs/ca.crt")
    """The CA certificate the aggregator's certificate is checked against (`fedaug certs` writes ca.crt)."""
    private_key: Path = Path("certs/merchant-1.key")
    """This merchant's authentication key (OpenSSH, EC); its public half is registered at the aggregator."""
    state_dir: Path = Path("merchant-state")
    """The privacy ledger and Flower's files for this merchant; keep it across restarts (ε composes over it)."""
    runtime_port: int = Field(9094, gt=0, lt=65536)
    """Local port of the SuperNode's runtime API (its ClientApp processes talk to it): one per merchant on a host."""
    max_backoff: float = Field(60.0, gt=0)
    """Most seconds between SuperNode restarts (the wait doubles from 1)."""
    max_restarts: int | None = Field(None, ge=0)
    """Give up after this many SuperNode restarts (default: never)."""
    health_address: HostPort | None = None
    """host:port of the SuperNode's gRPC health service (no TLS: keep it on loopback), for `fedaug health` and
    container healthchecks; None: not started."""
    new_budget: bool = False
    """Start a new privacy ledger in ``state_dir`` although another ledger has spent budget on this data (refused
    otherwise: a new state-dir must not restart the budget of users already trained on)."""


class MerchantDaemonConfig(Section):
    merchant: MerchantSection = MerchantSection()
    data: DataSection = DataSection()
    privacy: BudgetSection = BudgetSection()
    """[privacy]: this merchant's own budget; clipping and the Opacus mode come with the aggregator's recipe."""
    device: str = "auto"

    @model_validator(mode="after")
    def _has_data(self):
        if self.data.path is None:
            raise ValueError("data.path: a merchant daemon trains on its own behaviour data file")
        if self.data.catalog is None:
            raise ValueError("data.catalog: the public item catalog the aggregator uses (it numbers the items)")
        return self

    def node_config(self) -> dict:
        """Flower node_config for the ClientApp (fedaug.client.merchant reads it): the same dotted names as this TOML,
        with absolute paths."""
        values = flatten(self.data.model_dump(), "data.") | flatten(self.privacy.model_dump(), "privacy.")
        values |= {"device": self.device, STATE_DIR: self.merchant.state_dir}
        return {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in values.items() if v is not None}


def node_config_arg(values: dict) -> str:
    """Flower's --node-config syntax: space-separated ``key=value`` with TOML values (strings double-quoted; its
    parser has no escapes, so a value may not contain a double quote)."""
    import json

    for key, value in values.items():
        if isinstance(value, str) and '"' in value:
            raise ConfigError(f"node_config {key}: {value!r} contains a double quote, which Flower cannot pass")
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


class MerchantDaemon:
    def __init__(self, config: MerchantDaemonConfig, say: Callable[[str], None] = print):
        self.config, self.say = config, say
        m = config.merchant
        for key, path in (("merchant.root_certificate", m.root_certificate), ("merchant.private_key", m.private_key)):
            if not path.is_file():
                raise ConfigError(f"{key}: {path} not found")
        self.state_dir = m.state_dir.resolve()
        self.log = self.state_dir / "supernode.log"
        self.process: subprocess.Popen | None = None
        self.between_runs = threading.Event()
        """Set once a run's final model has arrived, until the SuperNode reconnects: retries are not news then."""

    def validate_data(self) -> DataReport:
        """The data checked as `fedaug validate` checks it, with the loaders the ClientApp uses (DataError on a
        malformed file; FedaugError naming the first problem, e.g. items the catalog lacks)."""
        report = check_data(self.config.data)
        if not report.ok:
            raise FedaugError(report.errors[0])
        return report

    def command(self) -> list[str]:
        m = self.config.merchant
        return [flower_command("flower-supernode"), "--superlink", m.superlink,
                "--root-certificates", str(m.root_certificate.resolve()),
                "--auth-supernode-private-key", str(m.private_key.resolve()),
                "--node-config", node_config_arg(self.config.node_config()),
                "--port", str(m.runtime_port)] + (["--health-server-address", m.health_address]
                                                  if m.health_address else [])

    def model_check(self) -> ModelCheckWatcher:
        """Tests each final model the federation sends (STATE/model) on this merchant's own held-out users, beside
        the text prior and popularity: printed, and kept in STATE/model-check.json; nothing is sent."""
        data = self.config.data
        return ModelCheckWatcher(self.state_dir, functools.partial(load_data, data), self._on_model_check,
                                 device=self.config.device, source=data.path)

    def _on_model_check(self, line: str) -> None:
        """The watcher speaks only when a run's final model arrived: that run is over for this merchant."""
        self.say(line)
        if not self.between_runs.is_set() and not line.startswith("model check"):
            self.between_runs.set()
            limit = self.config.merchant.max_restarts
            bound = "" if limit is None else f"; at most {limit} SuperNode restarts ([merchant] max_restarts)"
            self.say(f"This federation run is over for this merchant. Waiting for the aggregator's next run "
                     f"(its operator starts it again, e.g. monthly{bound}); until it connects, retries are logged "
                     f"in {self.log} only.")

    def on_supernode_line(self, line: str) -> None:
        """What the console shows of the SuperNode's log: retries with their next delay, and reconnection."""
        superlink = self.config.merchant.superlink
        if retry := RETRY.search(line):
            if not self.between_runs.is_set():
                self.say(f"aggregator {superlink} not reachable; next try in {float(retry.group(1)):.1f} s")
        elif connected := CONNECTED.search(line):
            self.between_runs.clear()
            self.say(f"connected to the aggregator {superlink} after {float(connected.group(1)):.0f} s and "
                     f"{connected.group(2)} tries")
        elif "Giving up reconnection" in line:
            self.say(f"aggregator {superlink}: {line.split(':', 1)[-1].strip()}")

    def refusal(self, reason: str, refused_for: float) -> str:
        """The SuperNode's exit ``reason``, with Flower's [code: 2004] told apart by how long it has lasted:
        ``refused_for`` seconds since the first such exit in a row."""
        if NOT_ACTIVATED not in reason:
            return reason
        m = self.config.merchant
        if refused_for < KEY_PATIENCE:
            return (f"{reason}: the aggregator {m.superlink} is up but does not accept this merchant yet (it "
                    f"registers its merchants' keys once started; an earlier connection of this merchant stays "
                    f"online for a few heartbeats)")
        return (f"{reason}: the aggregator {m.superlink} has refused this merchant's key for {refused_for:.0f} s: "
                f"ask its operator to add {m.private_key.with_suffix('.pub')} to [aggregator] merchant_keys")

    def run(self) -> int:
        """Validate, then keep a SuperNode running until stopped (or ``max_restarts`` is used up); exit code."""
        report = self.validate_data()
        self.say(f"Data OK: {report.users} users, {report.items} items, {report.events} events"
                 f"{f', {report.too_short} users too short to evaluate' if report.too_short else ''}.")
        if self.config.privacy.epsilon != math.inf:
            claim(report.fingerprint, self.state_dir, new_budget=self.config.merchant.new_budget,
                  option="[merchant] new_budget = true")
        if self.config.privacy.epsilon != math.inf:
            self.say(f"{NOISE_SOURCE}.")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {"FLWR_HOME": str(self.state_dir / "flwr")}
        backoff, restarts, refused_since = 1.0, 0, None
        checker = self.model_check().start()  # the final model, when it arrives, tested on the merchant's own data
        try:
            while True:
                started, offset = time.monotonic(), self.log.stat().st_size if self.log.exists() else 0
                self.process = start(self.command(), self.log, env)
                self.say(f"SuperNode started (pid {self.process.pid}) towards {self.config.merchant.superlink}; "
                         f"log: {self.log}")
                with (RoundLogFollower(self.state_dir, self.say),  # one line per round the ClientApp answers
                      LogFollower(self.log, self.on_supernode_line, since=offset)):
                    code = self.process.wait()
                reason = flower_error(self.log, offset)
                if NOT_ACTIVATED in reason:
                    refused_since = refused_since or started
                else:
                    refused_since = None
                reason = self.refusal(reason, time.monotonic() - refused_since if refused_since else 0.0)
                limit = self.config.merchant.max_restarts
                if limit is not None and restarts >= limit:
                    self.say(f"SuperNode exited with code {code}: {reason}")
                    return code or 1
                healthy = time.monotonic() - started > HEALTHY_SECONDS
                backoff = 1.0 if healthy else min(backoff * 2, self.config.merchant.max_backoff)
                restarts += 1
                self.say(f"SuperNode exited with code {code} ({reason}); restarting in {backoff:.0f} s")
                time.sleep(backoff)
        finally:
            checker.stop()
            stop(self.process)

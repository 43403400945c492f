"""`fedaug aggregator`: the platform's aggregation service, made of Flower's own processes.

It starts `flower-superlink` on loopback (TLS on every API, SuperNode authentication on) and nginx on the public
address publishing its Fleet API alone (runtime/fleet_proxy.py), registers the merchants' public keys
with `flwr supernode register`, submits our app with `flwr run` (the Control API) and the federation's run_config,
follows the rounds the ServerApp logs, and, when the run ends, writes metrics.json and report.md next to the
checkpoint. Everything lives in ``state_dir``; started again with the same one, the SuperLink keeps its database
(registered merchants) and the ServerApp resumes from the checkpoint, so no round is lost or repeated.

state_dir layout: ``superlink.db`` + ``superlink.log`` (Flower), ``fleet-proxy/`` (nginx), ``flwr/`` (the Flower CLI's
home: its connection to this SuperLink), ``run-config.toml`` (what was submitted), ``server/`` (checkpoint.npz,
rounds.jsonl), ``merchants.json`` (registered key -> node id), ``server.log`` (the ServerApp's log of the last run),
and at the end ``metrics.json`` + ``report.md``.

Lifecycle: one federation run per start. When the run ends the aggregator stops its SuperLink (and /metrics) and
exits; the merchants' daemons stay up and wait for the next run. The next federation (a monthly retrain) is the same
command with a new ``state_dir``: a new model from round 1, the keys registered again from ``merchant_keys``; the
merchants' ledgers compose ε over every run, so each run spends more of their budgets.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w
from pydantic import Field, model_validator

from fedaug.common.atomic import write_bytes_atomic, write_json_atomic
from fedaug.common.config import (
    FEDERATED_DEFAULTS,
    NONPRIVATE_FEDERATED_DEFAULTS,
    Config,
    DataPart,
    FederationSection,
    RecipePart,
    Section,
    federation_config,
    to_run_config,
)
from fedaug.common.errors import ConfigError, FedaugError
from fedaug.common.records import OnRound, RunMetrics, federation_name, write_metrics
from fedaug.runtime.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from fedaug.runtime.fleet_proxy import start_fleet_proxy
from fedaug.runtime.processes import HostPort, flower_command, last_line, split_address, start, stop, wait_until
from fedaug.server import checkpoint
from fedaug.server.distribute import MODEL_DIR
from fedaug.server.monitor import RoundWatcher
from fedaug.server.summary import federation_summary, read_handed_out, render_deployment_report

CONNECTION = "fedaug"
"""Name of the Flower CLI connection to our SuperLink (in ``state_dir/flwr/config.toml``)."""
PROJECT_DIR = Path(__file__).resolve().parent.parent
"""The Flower app `flwr run` submits by default: this project (pyproject.toml with [tool.flwr.app])."""


class AggregatorSection(Section):
    """[aggregator]: where the SuperLink listens, its certificates, who may join, where state lives."""

    address: HostPort = "127.0.0.1:9092"
    """host:port merchants connect to (HTTPS; 0.0.0.0 for every interface): Flower's Fleet API only, published by
    nginx in front of the SuperLink (runtime/fleet_proxy.py); any other path is refused there."""
    control_address: HostPort = "127.0.0.1:9093"
    """Loopback host:port of the SuperLink itself (Fleet, Control and Runtime APIs, HTTPS): only this host reaches
    it, since Flower's Control API authenticates no one (whoever reaches it could stop or submit runs)."""
    certificates: Path = Path("certs")
    """Directory with ca.crt, server.crt and server.key (`fedaug certs`, or your CA's files under those names)."""
    merchant_keys: tuple[Path, ...] = ()
    """Public keys (OpenSSH, EC) of the merchants allowed to connect; any other SuperNode is refused."""
    state_dir: Path = Path("aggregator-state")
    """Flower's state (registered merchants), the server's checkpoint and round log, metrics.json and report.md;
    started again with the same directory, the run resumes from its checkpoint."""
    app: Path | None = None
    """The Flower app to run (a directory with pyproject.toml); default: the fedaug project itself."""
    startup_timeout: float = Field(90.0, gt=0)
    """Seconds for the SuperLink to answer after it starts."""
    poll_seconds: float = Field(2.0, gt=0)
    """How often (seconds) the run's status is checked."""
    health_address: HostPort | None = None
    """host:port of the SuperLink's gRPC health service (no TLS: keep it on loopback), for `fedaug health` and
    container healthchecks; None: not started."""


class AggregatorConfig(Config, DataPart, RecipePart):
    """The aggregator's TOML: [aggregator], [federation], the training recipe merchants receive ([model],
    [augment], [privacy] default budget, [local]) and [data] catalog — the public item catalog (no user data)."""

    defaults, nonprivate_defaults = FEDERATED_DEFAULTS, NONPRIVATE_FEDERATED_DEFAULTS
    federation: FederationSection = FederationSection()
    aggregator: AggregatorSection = AggregatorSection()

    @model_validator(mode="after")
    def _deployable(self):
        if self.data.catalog is None:
            raise ValueError("data.catalog: the aggregator needs the public item catalog (the model's items)")
        if not self.aggregator.merchant_keys:
            raise ValueError("aggregator.merchant_keys: list the merchants' public keys (with authentication on, "
                             "no other SuperNode can join)")
        if self.data.path is not None:
            raise ValueError("data.path: the aggregator holds no behaviour data (merchants keep theirs)")
        host, _ = split_address(self.aggregator.control_address)
        if not _loopback(host):
            raise ValueError(f"aggregator.control_address: {host} is not a loopback address (Flower's Control API "
                             "authenticates no one: keep the SuperLink on 127.0.0.1 or ::1)")
        if split_address(self.aggregator.control_address) == split_address(self.aggregator.address):
            raise ValueError("aggregator.control_address: must differ from aggregator.address (the public door)")
        if "state_dir" in self.federation.model_fields_set:
            raise ValueError("federation.state_dir: set aggregator.state_dir instead (the checkpoint lives under it)")
        return self


def _listening(address: tuple[str, int]) -> bool:
    host, port = address
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host,
                                       port), timeout=1.0):
            return True
    except OSError:
        return False


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Aggregator:
    """One aggregator service over ``config.aggregator.state_dir``; ``run()`` blocks until the federation ends."""

    def __init__(self, config: AggregatorConfig, on_round: OnRound | None = None,
                 say: Callable[[str], None] = print):
        self.config, self.on_round, self.say = config, on_round, say
        agg = config.aggregator
        self.state_dir = agg.state_dir.resolve()
        self.server_dir = self.state_dir / "server"
        self.flwr_home = self.state_dir / "flwr"
        self.log = self.state_dir / "superlink.log"
        self.public = split_address(agg.address, "aggregator.address")
        self.control = split_address(agg.control_address, "aggregator.control_address")
        self.certs = agg.certificates.resolve()
        self.app = (agg.app or PROJECT_DIR).resolve()
        self.superlink: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self._check_files()

    def _check_files(self) -> None:
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (self.certs / name).is_file():
                raise ConfigError(f"aggregator.certificates: {self.certs / name} not found (run `fedaug certs`)")
        for key in self.config.aggregator.merchant_keys:
            if not key.is_file():
                raise ConfigError(f"aggregator.merchant_keys: {key} not found")
            if "," in key.stem or "=" in key.stem:  # the key's name names the merchant in federation.merchant_names
                raise ConfigError(f"aggregator.merchant_keys: {key.name}: a key's name may not contain ',' or '='")
        if not (self.app / "pyproject.toml").is_file():
            raise ConfigError(f"aggregator.app: {self.app} has no pyproject.toml (not a Flower app)")

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> RunMetrics:
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rounds = self.config.federation.rounds
        try:
            self._start_superlink()
            self._register_merchants()
            state = checkpoint.load(self.server_dir)
            if state is not None and state.finished(rounds):
                self.say(f"The checkpoint in {self.server_dir} holds a finished "
                         f"{federation_name(state.run_key, state.flower_runs)} (round {state.round}"
                         f"{', every merchant budget spent' if state.budgets_spent else ''}).")
            else:
                self._run_federation(rounds, state)
        finally:
            stop(self.proxy)
            stop(self.superlink)
        state = checkpoint.load(self.server_dir)
        if state is None or not state.finished(rounds):
            done = 0 if state is None else state.round
            error = self._server_error()
            advice = "" if "starting again will not help" in error else "; start the aggregator again to resume"
            raise FedaugError(f"the run stopped after round {done} of {rounds}: {error} "
                              f"(server log: {self.state_dir / 'server.log'}){advice}")
        metrics = federation_summary(self.config, state, mode="deployed",
                                     seconds=round(time.monotonic() - started, 2), data={})
        metrics.config = self.config.model_dump(mode="json")
        metrics.merchant_keys = self._registered()
        if (self.server_dir / MODEL_DIR / "card.json").is_file():  # what every merchant received
            read_handed_out(metrics, self.server_dir / MODEL_DIR)
        write_metrics(self.state_dir, metrics)
        write_bytes_atomic(self.state_dir / "report.md", render_deployment_report(metrics).encode())
        self.say(f"This federation run is over; the aggregator stops here (one run per start) and the merchants' "
                 f"daemons wait for the next one. The next run (e.g. a monthly retrain): the same command with a new "
                 f"[aggregator] state_dir (this one, {self.state_dir}, stays finished).")
        return metrics

    def _run_federation(self, rounds: int, resumed: checkpoint.ServerState | None) -> None:
        federation = federation_config(self.config)
        federation = federation.model_copy(update={
            "federation": federation.federation.model_copy(update={
                "state_dir": self.server_dir,  # logs name merchants as this service does: by their key's name
                "merchant_names": tuple(f"{node}={name}" for name, node in self._registered().items())}),
            "data": federation.data.model_copy(update={"catalog": self.config.data.catalog.resolve()})})
        run_config = to_run_config(federation)
        config_file = self.state_dir / "run-config.toml"
        write_bytes_atomic(config_file, tomli_w.dumps(run_config).encode())
        reply = self._flwr("run", str(self.app), CONNECTION, "--run-config", str(config_file))
        run_id = str(reply["run-id"])
        which = ("a new federation (its key is made when the ServerApp starts)" if resumed is None else
                 f"{federation_name(resumed.run_key, resumed.flower_runs)}, resuming after round {resumed.round}")
        self.say(f"Submitted run {run_id} (Flower's run id) for {which}: {rounds} rounds, merchants connect to "
                 f"{self.config.aggregator.address}.")
        watcher = RoundWatcher(self.server_dir, rounds, self.on_round)
        watcher.start()
        try:
            status = self._wait_for_run(run_id)
        finally:
            watcher.stop()
            self._save_server_log(run_id)
        state = checkpoint.load(self.server_dir)
        self.say(f"{federation_name(state.run_key, state.flower_runs) if state else f'Flower run {run_id}'}: "
                 f"{status}.")

    def _wait_for_run(self, run_id: str) -> str:
        while True:
            if self.superlink.poll() is not None:
                raise FedaugError(f"the SuperLink exited with code {self.superlink.returncode} (see {self.log})")
            runs = self._flwr("ls", CONNECTION, "--run-id", run_id).get("runs", [])
            status = runs[0]["status"] if runs else "unknown"
            if status.startswith("finished"):
                return status
            time.sleep(self.config.aggregator.poll_seconds)

    # -- Flower's processes and CLI -------------------------------------------------------------------------------

    def _start_superlink(self) -> None:
        """The SuperLink on loopback, then nginx on the public address publishing its Fleet API only."""
        flwr_config = {"superlink": {"default": CONNECTION, CONNECTION: {
            "address": self.config.aggregator.control_address, "root-certificates": str(self.certs / CA_CERT)}}}
        write_bytes_atomic(self.flwr_home / "config.toml", tomli_w.dumps(flwr_config).encode())
        host, port = self.control
        command = [flower_command("flower-superlink"),
                   "--ssl-ca-certfile", str(self.certs / CA_CERT), "--ssl-certfile", str(self.certs / SERVER_CERT),
                   "--ssl-keyfile", str(self.certs / SERVER_KEY), "--enable-supernode-auth",
                   "--database", str(self.state_dir / "superlink.db"), "--host", host, "--port", str(port),
                   "--disable-runtime-dependency-installation"]
        if self.config.aggregator.health_address:
            command += ["--health-server-address", self.config.aggregator.health_address]
        self.superlink = start(command, self.log, self._env())
        wait_until(self._answers, self.config.aggregator.startup_timeout, "flower-superlink", self.superlink, self.log,
                   interval=1.0)
        proxy_dir = self.state_dir / "fleet-proxy"
        self.proxy = start_fleet_proxy(public=self.public, superlink=self.control, certificate=self.certs / SERVER_CERT,
                                       key=self.certs / SERVER_KEY, ca_certificate=self.certs / CA_CERT,
                                       workdir=proxy_dir)
        wait_until(lambda: _listening(self.public), self.config.aggregator.startup_timeout, "nginx (the Fleet proxy)",
                   self.proxy, proxy_dir / "error.log", interval=0.2)
        self.say(f"SuperLink up on {self.config.aggregator.control_address} (loopback); merchants reach its Fleet API "
                 f"only, at {self.config.aggregator.address} (TLS, SuperNode authentication on).")

    def _answers(self) -> bool:
        try:
            self._flwr("supernode", "list", CONNECTION)
            return True
        except FedaugError:
            return False

    def _register_merchants(self) -> None:
        registered = self._registered()
        for key in self.config.aggregator.merchant_keys:
            key = key.resolve()
            try:
                reply = self._flwr("supernode", "register", str(key), CONNECTION, "--name", key.stem)
                registered[key.stem] = str(reply["node-id"])
            except FedaugError as exc:
                if "already in use" not in str(exc):
                    raise
        write_json_atomic(self.state_dir / "merchants.json", registered)
        self.say(f"Merchants allowed to connect: {', '.join(sorted(registered)) or 'none'}.")

    def _registered(self) -> dict:
        path = self.state_dir / "merchants.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _flwr(self, *args: str) -> dict:
        """Run the Flower CLI with ``--format json`` against our SuperLink; its reply, or a one-line error."""
        result = self._flwr_cli(*args, "--format", "json", timeout=120)
        try:
            reply = json.loads(result.stdout[result.stdout.index("{"):])
        except ValueError:
            reply = {"success": False, "error-message": (result.stderr or result.stdout).strip()}
        if not reply.get("success", False):
            message = " ".join(str(reply.get("error-message", "no reply")).split())
            raise FedaugError(f"flwr {' '.join(args[:2])}: {message}")
        return reply

    def _flwr_cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """The Flower CLI against our SuperLink: our FLWR_HOME (its connection), run from the state dir."""
        return subprocess.run([flower_command("flwr"), *args], capture_output=True, text=True,
                              env={**self._env(), "NO_COLOR": "1"}, timeout=timeout, cwd=self.state_dir)

    def _env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def _save_server_log(self, run_id: str) -> None:
        try:
            result = self._flwr_cli("log", run_id, CONNECTION, "--show", timeout=60)
            write_bytes_atomic(self.state_dir / "server.log", (result.stdout + result.stderr).encode())
        except (subprocess.SubprocessError, OSError):
            pass  # the log is a convenience; the run's outcome is in the checkpoint

    def _server_error(self) -> str:
        for marker in ("Error", "error", "RoundFailed", "Exception"):
            line = last_line(self.state_dir / "server.log", marker)
            if line:
                return line
        return "no error in the ServerApp's log"

"""docker/: no Docker engine runs here, so the compose file, the Dockerfile and the configs they mount are checked
against each other and against the CLI: every command parses as `fedaug` parses it, every config validates, every
path a config names is inside a volume of its service, ports and host names line up."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath

import click
import pytest
import tomllib
import typer
import yaml
from setuptools import find_packages

from fedaug.cli import app
from fedaug.client.daemon import MerchantDaemonConfig
from fedaug.server.aggregator import AggregatorConfig
from tests.support import ROOT, setup_folders

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
MERCHANTS = [name for name in SERVICES if name.startswith("merchant-")]
CLI = typer.main.get_command(app)


def parse_cli(args: list[str]) -> tuple[str, dict]:
    """Parse ``fedaug ARGS`` exactly as the CLI would (unknown flags or missing values raise)."""
    name, *rest = args
    command = CLI.commands[name]
    with command.make_context(name, list(rest)) as context:
        return name, context.params


def entry_args(service: dict) -> list[str]:
    """The full `fedaug ...` argument list a service runs: the image target's ENTRYPOINT + the service command."""
    entrypoint = {"aggregator": ["aggregator"], "merchant": ["merchant"]}[service["build"]["target"]]
    return entrypoint + list(service["command"])


def mounts(service: dict) -> dict[PurePosixPath, str]:
    """Container path -> source (a named volume or a file under docker/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[PurePosixPath(target)] = source
    return out


def config_of(service: dict, schema):
    """The TOML a service's --config points at, read from the file mounted there, validated with ``schema``."""
    _, params = parse_cli(entry_args(service))
    source = mounts(service)[PurePosixPath(str(params["config"]))]
    path = (DOCKER / source).resolve()
    assert path.is_file(), f"{source} is mounted as the config but does not exist"
    return schema.model_validate(tomllib.loads(path.read_text()))


def assert_mounted(service: dict, path: Path, writable: bool = False) -> None:
    path = PurePosixPath(path)
    for volume in service.get("volumes", []):
        target = PurePosixPath(volume.split(":")[1])
        if path == target or target in path.parents:
            assert not (writable and volume.endswith(":ro")), f"{path} must be writable"
            return
    pytest.fail(f"{path} is not inside any volume of the service")


def test_every_service_and_volume_is_declared():
    assert {"trial-setup", "aggregator", "prometheus"} <= set(SERVICES) and len(MERCHANTS) == 3
    declared = set(COMPOSE["volumes"])
    for service in SERVICES.values():
        for source in mounts(service).values():
            assert source.startswith("./") or source in declared, source


def test_the_dockerfile_builds_both_targets_slim_non_root_and_pinned():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim AS base" in dockerfile
    targets = set(re.findall(r"^FROM base AS (\w+)", dockerfile, re.M))
    assert targets == {"aggregator", "merchant"}
    assert {s["build"]["target"] for s in SERVICES.values() if "build" in s} == targets
    assert re.search(r"^USER fedaug$", dockerfile, re.M) and "useradd" in dockerfile
    assert "torch==2.13.0" in dockerfile and "-c docker/constraints.txt" in dockerfile
    pins = dict(line.split("==") for line in (DOCKER / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    import flwr
    import opacus

    assert pins["flwr"] == flwr.__version__ and pins["opacus"] == opacus.__version__
    for folder in (*setup_folders(), "fedaug"):  # every package setup.py installs is in the image
        for package in ("", *(name.replace(".", "/") + "/" for name in find_packages(ROOT / folder))):
            assert re.search(rf"^COPY ({folder} {folder}|{folder}/{package}\*\.py {folder}/{package})$", dockerfile,
                             re.M), f"docker/Dockerfile copies no {folder}/{package}"
    for target in targets:  # ENTRYPOINT matches the CLI subcommand entry_args assumes
        block = dockerfile.split(f"FROM base AS {target}")[1].split("FROM ")[0]
        assert f'ENTRYPOINT ["fedaug", "{target}"]' in block


def setup_copies() -> dict[str, set[PurePosixPath]]:
    """What trial-setup hands each service: the volume it copies into -> the files it copies there."""
    setup = SERVICES["trial-setup"]
    copies: dict[str, set[PurePosixPath]] = {}
    for part in setup["command"][0].split(";"):
        words = shlex.split(part)
        if words and words[0] == "cp":
            *sources, target = (PurePosixPath(w) for w in words[1:])
            copies.setdefault(mounts(setup)[target], set()).update(sources)
    return copies


def test_trial_setup_runs_valid_fedaug_commands_into_its_volume():
    setup = SERVICES["trial-setup"]
    script = setup["command"][0]
    commands = [shlex.split(part.split("||")[1]) for part in script.split(";") if "fedaug" in part]
    parsed = dict(parse_cli(c[1:]) for c in commands)
    assert set(parsed) == {"certs", "synth"}
    assert "aggregator" in parsed["certs"]["host"]  # merchants reach the SuperLink by its service name
    assert parsed["certs"]["merchants"] == parsed["synth"]["merchants"] == len(MERCHANTS)
    for params in parsed.values():
        assert_mounted(setup, params["out"], writable=True)


def test_aggregator_config_ports_and_paths_are_consistent():
    service = SERVICES["aggregator"]
    config = config_of(service, AggregatorConfig)
    host, port = config.aggregator.address.rsplit(":", 1)
    assert host == "0.0.0.0"  # reachable from the merchants' containers
    published = {p.split(":")[1]: p.split(":")[0] for p in service["ports"]}
    assert port in published and str(config.federation.metrics_port) in published
    certs = config.aggregator.certificates
    for path in [certs / "ca.crt", certs / "server.crt", config.data.catalog, *config.aggregator.merchant_keys]:
        assert_mounted(service, path)
    assert_mounted(service, config.aggregator.state_dir, writable=True)
    assert len(config.aggregator.merchant_keys) == len(MERCHANTS)
    setup = dict(parse_cli(shlex.split(p.split("||")[1])[1:]) for p in SERVICES["trial-setup"]["command"][0]
                 .split(";") if "fedaug" in p)
    # Its volume holds copies of the setup's files, under the names its config expects.
    handed = {p.name: p for p in setup_copies()[mounts(service)[PurePosixPath("/secrets")]]}
    for path in [certs / "ca.crt", certs / "server.crt", certs / "server.key", *config.aggregator.merchant_keys]:
        assert handed[PurePosixPath(path).name].parent == PurePosixPath(setup["certs"]["out"])
    assert handed[PurePosixPath(config.data.catalog).name].parent == PurePosixPath(setup["synth"]["out"])

    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"aggregator:{config.federation.metrics_port}" in targets
    assert mounts(SERVICES["prometheus"])[PurePosixPath("/etc/prometheus/prometheus.yml")] == "./prometheus.yml"


@pytest.mark.parametrize("name", MERCHANTS)
def test_merchant_configs_reach_the_aggregator_with_their_own_key_and_state(name):
    service = SERVICES[name]
    config = config_of(service, MerchantDaemonConfig)
    aggregator = config_of(SERVICES["aggregator"], AggregatorConfig)
    host, port = config.merchant.superlink.rsplit(":", 1)
    assert host == "aggregator" and port == aggregator.aggregator.address.rsplit(":", 1)[1]
    assert "aggregator" in service["depends_on"]
    i = name.split("-")[1]
    assert config.merchant.private_key.name == f"merchant-{i}.key"
    assert PurePosixPath(config.merchant.private_key).with_suffix(".pub") in {
        PurePosixPath(k) for k in aggregator.aggregator.merchant_keys}  # its public key is registered
    assert config.data.catalog == aggregator.data.catalog
    for path in [config.merchant.root_certificate, config.merchant.private_key, config.data.path, config.data.catalog]:
        assert_mounted(service, path)
    assert_mounted(service, config.merchant.state_dir, writable=True)
    state_volume = mounts(service)[PurePosixPath(config.merchant.state_dir)]
    others = {mounts(SERVICES[m])[PurePosixPath("/state")] for m in MERCHANTS if m != name}
    assert state_volume not in others  # every merchant keeps its own ledger


def test_each_service_sees_only_its_own_secrets():
    """The shared trial volume (with the CA key) stays with trial-setup; each merchant gets the CA certificate,
    its own key and data, nobody else's; the aggregator no private key but its TLS one."""
    assert [name for name, service in SERVICES.items() if "trial" in mounts(service).values()] == ["trial-setup"]
    copies = setup_copies()
    for name in MERCHANTS:
        i = name.split("-")[1]
        volumes = set(mounts(SERVICES[name]).values())
        assert volumes == {f"./config/{name}.toml", f"{name}-secrets", f"{name}-state"}
        assert {p.name for p in copies[f"{name}-secrets"]} == {"ca.crt", f"merchant-{i}.key", "catalog.tsv",
                                                                f"merchant-{i}.csv"}
    handed = {p.name for p in copies["aggregator-secrets"]}
    assert not any(n.endswith(".key") for n in handed - {"server.key"}) and "ca.key" not in handed
    assert "chown -R 10001" in SERVICES["trial-setup"]["command"][0]  # the services' user can read them


def test_healthchecks_order_the_start_and_restarts_end_with_the_run():
    aggregator = config_of(SERVICES["aggregator"], AggregatorConfig)
    for name, address in [("aggregator", aggregator.aggregator.health_address),
                          *((m, config_of(SERVICES[m], MerchantDaemonConfig).merchant.health_address)
                            for m in MERCHANTS)]:
        check = SERVICES[name]["healthcheck"]["test"]
        command, params = parse_cli(check[2:])
        assert check[:2] == ["CMD", "fedaug"] and command == "health" and params["address"] == address
        assert address.startswith("127.0.0.1:")  # the health service has no TLS: loopback only
    for name in MERCHANTS:
        service = SERVICES[name]
        assert service["depends_on"]["aggregator"] == {"condition": "service_healthy"}
        assert re.fullmatch(r"on-failure:\d+", service["restart"])  # bounded: not forever after the run
        assert config_of(service, MerchantDaemonConfig).merchant.max_restarts is not None
    assert SERVICES["aggregator"]["restart"] == "on-failure"  # a finished run (exit 0) is not started again


def test_a_wrong_flag_in_a_service_command_would_be_caught():
    with pytest.raises(click.UsageError):
        parse_cli(["merchant", "--config", "/config/merchant.toml", "--no-such-flag"])


def exported_metrics() -> set[str]:
    """Every series name the code exports to Prometheus: the metrics server/monitor.py and serving/http.py declare,
    with the suffixes prometheus_client gives each kind (a counter's _total, a histogram's _bucket/_sum/_count)."""
    import ast

    suffixes = {"Gauge": [""], "Counter": ["_total", "_created"], "Summary": ["_sum", "_count", "_created"],
                "Histogram": ["_bucket", "_sum", "_count", "_created"], "Info": ["_info"]}
    names = set()
    for source in ("server/monitor.py", "serving/http.py"):
        tree = ast.parse((DOCKER.parent / source).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names |= {node.args[0].value + suffix for suffix in suffixes[node.func.id]}
    return names


def test_grafana_shows_the_dashboard_from_prometheus():
    grafana = SERVICES["grafana"]
    assert mounts(grafana) == {PurePosixPath("/etc/grafana/provisioning"): "./grafana/provisioning",
                               PurePosixPath("/var/lib/grafana/dashboards"): "./grafana/dashboards"}
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in SERVICES["prometheus"]["ports"]
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/fedaug.yaml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == ["/var/lib/grafana/dashboards"]
    dashboard = json.loads((DOCKER / "grafana/dashboards/fedaug.json").read_text())
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == "/var/lib/grafana/dashboards/fedaug.json"
    assert all(p["datasource"]["uid"] == source["uid"] for p in dashboard["panels"])


def test_the_dashboard_queries_only_metrics_the_code_exports():
    dashboard = json.loads((DOCKER / "grafana/dashboards/fedaug.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for query in queries for name in re.findall(r"\bfedaug_[a-z0-9_]+", query)}
    exported = exported_metrics()
    assert used and used <= exported, used - exported
    # what operators watch: rounds, participants, ε per merchant, bytes, round time, serving's requests and latency
    for name in ("fedaug_round", "fedaug_round_participants", "fedaug_merchant_epsilon", "fedaug_bytes_received_total",
                 "fedaug_round_seconds", "fedaug_serve_requests_total", "fedaug_serve_latency_seconds_bucket"):
        assert name in used, name


def test_prometheus_scrapes_the_aggregator_and_serving_where_they_listen():
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    aggregator = config_of(SERVICES["aggregator"], AggregatorConfig)
    assert targets["fedaug-aggregator"] == [f"aggregator:{aggregator.federation.metrics_port}"]
    serving = SERVICES["serving"]
    name, params = parse_cli(serving["entrypoint"][1:] + serving["command"])
    assert name == "serve" and params["host"] == "0.0.0.0"
    assert targets["fedaug-serving"] == [f"serving:{params['port']}"]
    assert mounts(serving)[PurePosixPath(str(params["model"])).parent] == "merchant-1-state"  # what merchant 1 received
    assert_mounted(SERVICES["merchant-1"], config_of(SERVICES["merchant-1"], MerchantDaemonConfig).merchant.state_dir,
                   writable=True)

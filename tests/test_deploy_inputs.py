"""What deployment is built from, without processes: certificates and keys, the shared catalog, merchant files,
the daemons' configs and the node_config they hand to Flower."""

from __future__ import annotations

import stat
import subprocess

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from fedaug.client.daemon import MerchantDaemonConfig, node_config_arg
from fedaug.common.config import ModelSection, SyntheticSection, load_config
from fedaug.common.data import catalog_only
from fedaug.common.data.loaders import align_to_catalog, load, load_catalog
from fedaug.common.data.source import load_data
from fedaug.common.data.split import merchant_partitions
from fedaug.common.data.synthetic import generate
from fedaug.common.errors import ConfigError, DataError, FedaugError
from fedaug.common.model.build import build_model
from fedaug.runtime.certs import write_certificates
from fedaug.runtime.export import write_merchant_files
from fedaug.server.aggregator import AggregatorConfig
from tests.support import health_server


def test_certificates_are_private_where_they_must_be_and_chain_to_the_ca(tmp_path):
    files = {p.name: p for p in write_certificates(tmp_path / "certs", merchants=2, hosts=("agg.example", "10.0.0.7"))}
    assert set(files) == {"ca.crt", "ca.key", "server.crt", "server.key", "merchant-1.key", "merchant-1.pub",
                          "merchant-2.key", "merchant-2.pub"}
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700
    for name, path in files.items():
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if name.endswith(".key") else 0o644), name
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(files["server.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "agg.example"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "::1", "10.0.0.7"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    # The merchant keys are what Flower's `flwr supernode register` and `flower-supernode` load.
    assert try_load_public_key(files["merchant-1.pub"])
    assert load_ssh_private_key(files["merchant-1.key"].read_bytes(), password=None)


def test_certificates_never_overwrite_and_reject_bad_hosts(tmp_path):
    write_certificates(tmp_path / "certs", merchants=1)
    before = sorted(p.read_bytes() for p in (tmp_path / "certs").iterdir())
    with pytest.raises(ConfigError, match="already exists"):
        write_certificates(tmp_path / "certs", merchants=1)
    assert sorted(p.read_bytes() for p in (tmp_path / "certs").iterdir()) == before
    with pytest.raises(ConfigError, match="--host"):
        write_certificates(tmp_path / "other", merchants=1, hosts=("http://bad host",))
    assert not (tmp_path / "other").exists() and [p.name for p in tmp_path.iterdir()] == ["certs"]


@pytest.fixture
def merchant_files(tmp_path):
    data = generate(SyntheticSection(users=200, items=150, merchants=3, titles=False))
    write_merchant_files(data, tmp_path)
    return data, tmp_path


def test_merchant_files_load_back_numbered_by_the_shared_catalog(merchant_files):
    data, root = merchant_files
    catalog = load_catalog(root / "catalog.tsv")
    assert catalog.n_items == data.n_items and catalog.attribute_names[1:] and len(catalog.attributes) == 151
    for i, expected in enumerate(merchant_partitions(data), start=1):
        own = load(root / f"merchant-{i}.csv")
        assert own.n_items < catalog.n_items  # numbered alone, a merchant's items would not match anyone's
        aligned = align_to_catalog(own, catalog, root / f"merchant-{i}.csv", root / "catalog.tsv")
        assert aligned.n_items == catalog.n_items
        by_user = dict(zip(expected.user_ids.tolist(), expected.sequences(), strict=True))
        for user, seq in zip(aligned.user_ids.tolist(), aligned.sequences(), strict=True):
            np.testing.assert_array_equal(catalog.raw_ids[seq], data.catalog.raw_ids[by_user[user]])


def test_the_aggregator_model_from_the_catalog_alone_matches_every_merchants(merchant_files):
    _, root = merchant_files
    section = ModelSection(tie_embeddings=False, catalog="auto", item_dim=8)
    catalog = load_catalog(root / "catalog.tsv")
    server = build_model(section, catalog_only(catalog)).state_dict()
    merchant = load_config(None, {"data.path": str(root / "merchant-2.csv"), "data.catalog": str(root / "catalog.tsv")})
    local = build_model(section, load_data(merchant.data)).state_dict()
    assert {k: v.shape for k, v in server.items()} == {k: v.shape for k, v in local.items()}


def test_catalog_errors_name_the_file_and_the_item(tmp_path, merchant_files):
    _, root = merchant_files
    (tmp_path / "empty.tsv").write_text("item_id\tattributes\n")
    (tmp_path / "zero.tsv").write_text("item_id\tattributes\n0\tx\n")
    for name, message in (("empty.tsv", "lists no items"), ("zero.tsv", "reserved for padding"),
                          ("missing.tsv", "no such catalog file")):
        with pytest.raises(DataError, match=message) as error:
            load_catalog(tmp_path / name)
        assert str(tmp_path / name) in str(error.value)
    (tmp_path / "m.csv").write_text("user_id,item_id,timestamp\n1,5,10\n1,987654,11\n")
    with pytest.raises(DataError, match=r"m\.csv, column item_id: item 987654 is not in the catalog"):
        load_data(load_config(None, {"data.path": str(tmp_path / "m.csv"),
                                     "data.catalog": str(root / "catalog.tsv")}).data)


def test_node_config_survives_flowers_parser_with_spaces_in_paths(tmp_path):
    config = MerchantDaemonConfig.model_validate({
        "merchant": {"state_dir": str(tmp_path / "my state")},
        "data": {"path": str(tmp_path / "shop data" / "events.csv"), "catalog": str(tmp_path / "catalog.tsv")},
        "privacy": {"epsilon": "inf", "delta": 1e-6}})
    values = config.node_config()
    assert parse_config_args([node_config_arg(values)]) == values
    assert values["privacy.epsilon"] == "inf" and values["merchant.state_dir"] == str(tmp_path / "my state")
    assert values["data.path"] == str(tmp_path / "shop data" / "events.csv")  # the TOML's own names, dotted
    with pytest.raises(ConfigError, match='node_config data.path: .* double quote'):
        node_config_arg(values | {"data.path": 'a"b'})


@pytest.mark.parametrize("toml, message", [
    ('[data]\ncatalog = "c.tsv"\n[merchant]\nsuperlink = "nohost"\n', "merchant.superlink: expected host:port"),
    ('[merchant]\nsuperlink = "h:1"\n', "data.path: a merchant daemon trains on its own"),
    ('[data]\npath = "d.csv"\n', "data.catalog: the public item catalog"),
    ('[data]\npath = "d.csv"\ncatalog = "c.tsv"\n[privacy]\nmax_grad_norm = 2\n', "privacy.max_grad_norm"),
])
def test_merchant_config_errors_name_the_key(tmp_path, toml, message):
    path = tmp_path / "merchant.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, None, MerchantDaemonConfig)
    assert str(error.value).startswith(str(path))


@pytest.mark.parametrize("toml, message", [
    ('[aggregator]\nmerchant_keys = ["k.pub"]\n', "data.catalog: the aggregator needs the public item catalog"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\n[data]\ncatalog = "c.tsv"\npath = "d.csv"\n', "data.path"),
    ('[data]\ncatalog = "c.tsv"\n', "aggregator.merchant_keys"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\n[data]\ncatalog = "c.tsv"\n[federation]\ncentral_eval = true\n',
     "central_eval"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\n[data]\ncatalog = "c.tsv"\n[federation]\nstate_dir = "s"\n',
     "aggregator.state_dir"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\naddress = "h:99999"\n[data]\ncatalog = "c.tsv"\n',
     "aggregator.address"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\ncontrol_address = "0.0.0.0:9093"\n[data]\ncatalog = "c.tsv"\n',
     "aggregator.control_address: 0.0.0.0 is not a loopback address"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\ncontrol_address = "10.1.2.3:9093"\n[data]\ncatalog = "c.tsv"\n',
     "aggregator.control_address: 10.1.2.3 is not a loopback"),
    ('[aggregator]\nmerchant_keys = ["k.pub"]\ncontrol_address = "127.0.0.1:9092"\n[data]\ncatalog = "c.tsv"\n',
     "aggregator.control_address: must differ from aggregator.address"),
])
def test_aggregator_config_errors_name_the_key(tmp_path, toml, message):
    path = tmp_path / "aggregator.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, None, AggregatorConfig)


@pytest.mark.integration  # a child process
def test_flowers_processes_find_their_siblings_without_the_venv_on_path(tmp_path, monkeypatch):
    """A daemon started by absolute path (systemd, cron) has no venv on PATH; the SuperNode it starts runs
    `flower-superexec` by name, so the children must get this Python's bin folder on PATH."""
    import sys
    from pathlib import Path

    from fedaug.runtime.processes import start

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    log = tmp_path / "child.log"
    start([sys.executable, "-c", "import shutil; print(shutil.which('flower-superexec'))"], log).wait(60)
    found = log.read_text().strip()
    assert found != "None" and Path(found).parent == Path(sys.executable).parent


@pytest.mark.integration  # a gRPC server
def test_the_health_probe_follows_the_grpc_health_service():
    """`fedaug health` (container healthchecks) asks Flower's gRPC health service; here a stand-in server."""
    from fedaug.runtime.health import serving

    with health_server() as (port, set_serving):
        set_serving(True)
        assert serving(f"127.0.0.1:{port}")
        set_serving(False)
        assert not serving(f"127.0.0.1:{port}")
    assert not serving(f"127.0.0.1:{port}", timeout=1.0)  # nobody there


@pytest.mark.integration  # nginx checks the config
def test_the_fleet_proxy_config_publishes_the_fleet_api_alone(tmp_path):
    """nginx accepts the config we write (`nginx -t`), which forwards /v1/fleet/ to the loopback SuperLink and
    answers every other path (the Control and Runtime APIs) with 403."""
    from fedaug.runtime.fleet_proxy import FLEET_PREFIX, nginx_command, render_config

    try:
        nginx = nginx_command()
    except FedaugError as exc:
        pytest.skip(str(exc))
    write_certificates(tmp_path / "certs", merchants=0)
    text = render_config(public=("0.0.0.0", 9092), superlink=("127.0.0.1", 9093),
                         certificate=tmp_path / "certs" / "server.crt", key=tmp_path / "certs" / "server.key",
                         ca_certificate=tmp_path / "certs" / "ca.crt", workdir=tmp_path / "proxy")
    locations = [line.split()[1] for line in text.splitlines() if line.strip().startswith("location ")]
    assert locations == [FLEET_PREFIX, "/"] and "proxy_pass https://127.0.0.1:9093;" in text
    assert text.split("location / {", 1)[1].split("}", 1)[0].count("return 403") == 1
    (tmp_path / "proxy" / "tmp").mkdir(parents=True)
    (tmp_path / "proxy" / "nginx.conf").write_text(text)
    check = subprocess.run([nginx, "-p", str(tmp_path / "proxy"), "-e", str(tmp_path / "proxy" / "error.log"),
                            "-c", str(tmp_path / "proxy" / "nginx.conf"), "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

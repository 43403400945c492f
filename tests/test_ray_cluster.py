"""`fedaug simulate` joining a running Ray cluster: a real two-node cluster on loopback (`ray start --head` plus a
second `ray start --address` with its own resources), merchants trained on both nodes, the same result as the run
on a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fedaug.server import checkpoint
from tests.support import ROOT, free_port

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(RAY is None, reason="the ray command line is not installed")]



def _cluster_processes(marker: str) -> list[int]:
    """Every process of the cluster whose session lives under ``marker`` (our own temp dir): never another
    Ray on this machine, as `ray stop` would."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_processes(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _cluster_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    """A head node and a second node, one CPU each, each with a resource naming it; both stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="fedaug-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{port}"
    try:
        for args in (["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                      '--resources={"fedaug_head": 1}'],
                     [f"--address={address}", '--resources={"fedaug_second": 1}']):
            started = subprocess.run([RAY, "start", "--num-cpus=1", "--disable-usage-stats", *args], env=env,
                                     capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield address
    finally:
        _stop(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _simulate(out: Path, *extra: str, ray_address_env: str | None = None) -> subprocess.CompletedProcess:
    # Non-private: DP noise comes from fresh OS entropy on purpose, so only a non-private run can be compared
    # exactly with another. One CPU per merchant in both runs, so every merchant trains on one thread.
    args = [sys.executable, "-m", "fedaug", "simulate", "--out", str(out), "--epsilon", "inf", "--merchants", "4",
            "--rounds", "2", "--client-cpus", "1", "--seed", "3", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    if ray_address_env:
        env["RAY_ADDRESS"] = ray_address_env
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def test_a_simulation_on_a_two_node_ray_cluster_uses_both_nodes_and_equals_the_local_run(two_node_cluster,
                                                                                         tmp_path):
    import ray

    on_cluster = _simulate(tmp_path / "cluster", "--ray-address", two_node_cluster)
    assert on_cluster.returncode == 0, on_cluster.stdout[-3000:] + on_cluster.stderr[-3000:]
    ray.init(address=two_node_cluster, include_dashboard=False, log_to_driver=False)
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert len(nodes) == 2 and {r.get("fedaug_head", 0) + r.get("fedaug_second", 0) for r in nodes.values()} == {1}

    metrics = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    used = {}
    for record in metrics["rounds"]:
        work = record["work"]
        assert work["lanes"] == 2 and len(work["seconds"]) == 4  # one merchant per node's CPU, all four worked
        used |= work["nodes"]
    # The workers' own node ids: every merchant's training ran on a node of this cluster, and both nodes ran some.
    assert set(used) == {f"merchant-{i}" for i in range(4)}
    assert set(used.values()) == set(nodes)
    assert "Merchants ran on 2 Ray nodes" in (tmp_path / "cluster" / "report.md").read_text()

    # Without ray_address the run starts its own Ray, even where RAY_ADDRESS names the cluster.
    local = _simulate(tmp_path / "local", ray_address_env=two_node_cluster)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    local_metrics = json.loads((tmp_path / "local" / "metrics.json").read_text())
    local_nodes = {node for r in local_metrics["rounds"] for node in r["work"]["nodes"].values()}
    assert len(local_nodes) == 1 and not local_nodes & set(nodes)
    assert local_metrics["test"] == metrics["test"]
    assert [r["valid"] for r in local_metrics["rounds"]] == [r["valid"] for r in metrics["rounds"]]
    a, b = (checkpoint.load(tmp_path / run / "state") for run in ("cluster", "local"))
    assert a.round == b.round == 2
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)


def test_an_unreachable_ray_address_is_a_one_line_error(tmp_path):
    result = _simulate(tmp_path / "nowhere", "--ray-address", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert not (tmp_path / "nowhere" / "metrics.json").exists()
    last = [line for line in result.stderr.strip().splitlines() if line.strip()][-1]
    assert "ray" in last.lower() and "127.0.0.1" in last, result.stderr[-3000:]

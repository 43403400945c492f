"""What every test module shares: thread limits, the unit / integration split, the Beauty data, a private registry
of spent budgets, and the task identity of a ServerApp process."""

import os
from pathlib import Path

import pytest
import torch

from tests.support import BEAUTY_DIR

torch.set_num_threads(min(2, os.cpu_count() or 1))

TESTS = Path(__file__).resolve().parent
INTEGRATION_MODULES = frozenset({
    "test_beauty.py",  # all of Amazon Beauty
    "test_browser.py",  # chromium against `fedaug serve`
    "test_cli.py",  # the command line as real processes
    "test_deploy.py",  # the aggregator and merchant daemons on loopback
    "test_evaluate.py",  # `fedaug evaluate` and the merchant daemon as processes
    "test_prepare.py",  # `fedaug prepare` as a process
    "test_quiet.py",  # what users' terminals show: real processes, a SuperLink
    "test_ray_cluster.py",  # a Ray cluster
    "test_shop_flow.py",  # a shop's whole path through the command line
    "test_simulate.py",  # Flower simulations
})
"""Test modules whose every test starts processes, servers, a browser, Ray or a Flower simulation. Elsewhere a test
is integration where it is marked ``slow`` or ``integration`` itself; every other test is a unit test."""
_MISSING = sorted(name for name in INTEGRATION_MODULES if not (TESTS / name).is_file())
if _MISSING:
    raise pytest.UsageError(f"tests/conftest.py: INTEGRATION_MODULES names missing modules: {', '.join(_MISSING)}")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test ``unit`` or ``integration`` (`pytest -m unit`, `pytest -m integration`)."""
    for item in items:
        integration = (item.path.name in INTEGRATION_MODULES or item.get_closest_marker("slow") is not None
                       or item.get_closest_marker("integration") is not None)
        item.add_marker("integration" if integration else "unit")


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    if not (BEAUTY_DIR / "Beauty.txt").is_file():
        pytest.skip(f"Amazon Beauty data not found at {BEAUTY_DIR} (expected ../shared/data/amazon-beauty)")
    return BEAUTY_DIR


@pytest.fixture(autouse=True)
def _own_privacy_registry(tmp_path_factory, monkeypatch):
    """Each test has its own registry of spent budgets (client/spent.py): tests train the same synthetic data in
    many folders, which a real merchant's machine would (rightly) refuse."""
    monkeypatch.setenv("FEDAUG_STATE_HOME", str(tmp_path_factory.mktemp("fedaug-state")))


@pytest.fixture
def as_if_inside_a_serverapp(monkeypatch):
    """Messages are created inside a ServerApp process, which sets its task identity (run, task, and the
    SuperLink's node id) before it builds one: tests that build Flower messages borrow that identity."""
    from fedaug.runtime.flower import SUPERLINK_NODE_ID, TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)

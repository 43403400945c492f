"""A simulation at scale: the driver writes the data set once and every worker maps it, so no worker generates or
loads the data set again, and a merchant built from the map is the one built from the data set itself."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedaug.client import merchant as client_merchant
from fedaug.client.merchant import NUM_PARTITIONS, PARTITION_ID, partitions
from fedaug.common.config import to_run_config
from fedaug.common.data import BehaviorData, synthetic
from fedaug.common.data import source as data_source
from fedaug.common.data.split import Merchants
from fedaug.common.errors import FedaugError
from fedaug.simulations import apps
from fedaug.simulations.scenario import SimulationConfig

N = 12


def _config(state_dir) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "synthetic": {"users": 600, "items": 120, "titles": False},
        "simulation": {"merchants": N, "partition": "category", "dirichlet_alpha": 0.3, "partition_seed": 5},
        "model": {"hidden": 16, "max_len": 20}, "federation": {"state_dir": str(state_dir)}})


def _context(config: SimulationConfig, pid: int) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={PARTITION_ID: pid, NUM_PARTITIONS: N},
                   state=RecordDict(), run_config=to_run_config(config))


def _same(a: BehaviorData, b: BehaviorData) -> None:
    for name in ("items", "offsets", "user_ids", "timestamps", "event_type", "merchant"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.context.keys() == b.context.keys()
    for name in a.context:
        assert a.context[name].dtype == b.context[name].dtype and np.array_equal(a.context[name], b.context[name])
    assert a.merchant_names == b.merchant_names and a.catalog.texts == b.catalog.texts
    assert np.array_equal(a.catalog.raw_ids, b.catalog.raw_ids)


def _file_of(array: np.ndarray):
    while isinstance(array, np.ndarray):
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def test_a_written_data_set_maps_back_to_the_same_merchants_sharing_the_file(tmp_path):
    merchants = partitions(_config(tmp_path), N, "category", 5, 0.3)
    merchants.write(tmp_path / "merchants.data")
    mapped = Merchants.mapped(tmp_path / "merchants.data")
    assert len(mapped) == len(merchants) == N
    for m in range(N):
        part = mapped.merchant_data(m)
        _same(part, merchants.merchant_data(m))
        assert part.items.flags.writeable and part.user_ids.flags.writeable  # a merchant's slice is its own copy
    for array in (mapped.data.items, mapped.data.offsets, mapped.data.merchant, *mapped.data.context.values()):
        assert isinstance(_file_of(array), mmap.mmap) and not array.flags.writeable
    # The public catalog stays inside the pickle: writable arrays, as torch reads them.
    assert mapped.data.catalog.raw_ids.flags.writeable and all(a.flags.writeable
                                                               for a in mapped.data.catalog.attributes)


def test_a_worker_builds_its_merchants_from_the_map_without_loading_the_data(tmp_path, monkeypatch):
    config = _config(tmp_path / "state")
    config.federation.state_dir.mkdir()
    merchants = partitions(config, N, "category", 5, 0.3)  # what a worker loaded for itself before
    expected = {pid: merchants.merchant_data(pid) for pid in (0, 4, 11)}
    merchants.write(config.federation.state_dir / apps.SHARED_DATA)
    partitions.cache_clear()  # a fresh worker: nothing of the data set in memory
    apps._mapped.cache_clear()

    def loads(*args, **kwargs):
        raise AssertionError("a worker loaded or generated the data set")

    for module, name in ((data_source, "load_data"), (data_source, "generate"), (synthetic, "generate"),
                         (client_merchant, "load_data")):
        monkeypatch.setattr(module, name, loads)
    maps = []
    monkeypatch.setattr(Merchants, "mapped", _counting(Merchants.mapped, maps))
    for pid, data in expected.items():
        merchant = apps.simulated_merchant(_context(config, pid))
        _same(merchant.split.full, data)
        assert merchant.partition_id == pid and merchant.state_dir == apps.merchant_dir(config, pid)
    assert maps == [config.federation.state_dir / apps.SHARED_DATA]  # once per worker, for every message

    # A later run's file (written again) is mapped again; none at all is a one-line error naming it.
    merchants.write(config.federation.state_dir / apps.SHARED_DATA)
    apps.simulated_merchant(_context(config, 3))
    assert len(maps) == 2
    (config.federation.state_dir / apps.SHARED_DATA).unlink()
    with pytest.raises(FedaugError, match=r"merchants\.data: the run's data set is missing"):
        apps.simulated_merchant(_context(config, 3))


def _counting(mapped, calls: list):
    def counted(path) -> Merchants:
        calls.append(path)
        return mapped(path)

    return counted

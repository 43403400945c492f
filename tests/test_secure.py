"""Secure statistics sums end to end in one process: the aggregator's driver (server/secure.py) and the merchants'
ClientApp handlers (client/secure.py) over a Grid that hands each message to the merchant's ClientApp and records
everything the aggregator receives. The protocol's own tests are tests/test_secagg.py; a deployed sum with real
processes is in tests/test_deploy.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedaug.common.errors import ConfigError
from tests.support import OfflineGrid

N_ITEMS, K = 60, 4
pytestmark = pytest.mark.usefixtures("as_if_inside_a_serverapp")


class ClientGrid(OfflineGrid):
    """Every node is a merchant whose ClientApp answers in this process; ``drop`` makes a node stop answering from
    a message type on (as if killed then); ``received`` is every reply's content, as the aggregator got it."""

    def __init__(self, merchants: dict, drop: dict[int, str] | None = None):
        from fedaug.client.client_app import client_app

        super().__init__(sorted(merchants))
        self.app = client_app(merchants=lambda context: merchants[context.node_id])
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in merchants}
        self.drop, self.dropped, self.received = dict(drop or {}), set(), []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if self.drop.get(node) == kind:
                self.dropped.add(node)
            if node in self.dropped:
                continue
            reply = self.app(message, self.contexts[node])
            self.received.append((kind, node, reply.content))
            replies.append(reply)
        return replies


def _merchants(count: int, epsilon: float, tmp_path, noise: str = "pooled") -> dict:
    from fedaug.client.merchant import build_merchant
    from fedaug.common.config import FederationConfig, SyntheticSection
    from fedaug.common.data.synthetic import generate

    config = FederationConfig.model_validate({"privacy": {"epsilon": epsilon, "noise": noise},
                                              "local": {"batch_size": 16}})
    return {100 + i: build_merchant(config, generate(SyntheticSection(users=90, items=N_ITEMS, titles=False,
                                                                      seed=i)), tmp_path / f"m{i}", i)
            for i in range(count)}


def _settings(tmp_path, **federation):
    from fedaug.common.config import FederationSection

    return FederationSection.model_validate({"state_dir": tmp_path / "server", "statistics_max_items": 3,
                                             "statistics_max_pairs": 2, "round_timeout": 60} | federation)


def _neighbours() -> np.ndarray:
    from fedaug.common.priors.dp_counts import text_neighbours

    return text_neighbours(np.random.default_rng(7).normal(size=(N_ITEMS + 1, 8)).astype(np.float32), K)


def _request(neighbours, run_key):
    from fedaug.common.protocol.messages import StatisticsRequest

    return StatisticsRequest(run_key=run_key, neighbours=neighbours, share=0.5, max_items=3, max_pairs=2)


def _exact(merchant, neighbours) -> np.ndarray:
    """The counts a merchant would release without noise, as the secure sum's vector."""
    from fedaug.common.priors.dp_counts import Statistics, bounded_counts, vector_of

    def counts(sequences):
        return bounded_counts(sequences, neighbours, max_items=3, max_pairs=2)

    return vector_of(Statistics(counts(merchant.trainer.sequences), counts(merchant.split.seen_sequences())))


def _everything(received) -> list[np.ndarray]:
    """Every array, number list and byte string the aggregator received, as integer vectors mod 2**32."""
    out = []
    for _, _, content in received:
        for record in content.values():
            values = (list(record.values()))
            for value in values:
                if isinstance(record, ArrayRecord):
                    out.append(value.numpy().astype(np.int64).ravel())
                elif isinstance(record, ConfigRecord) and isinstance(value, list) and value and isinstance(value[0],
                                                                                                         bytes):
                    out += [np.frombuffer(v[: len(v) // 4 * 4], np.uint32).astype(np.int64) for v in value]
    return [v % 2**32 for v in out]


def test_the_aggregator_receives_no_merchants_vector_and_unmasks_their_exact_sum(tmp_path):
    """Acceptance 2: everything the aggregator receives in the statistics release — public keys, ciphertexts,
    masked vectors, key shares — holds no merchant's vector (nor its negation), and the unmasked sum equals the
    plain sum exactly (counts need no quantisation: the step is 1)."""
    from fedaug.common.priors.dp_counts import vector_of
    from fedaug.server.statistics import collect_statistics

    merchants = _merchants(4, math.inf, tmp_path)
    neighbours = _neighbours()
    grid = ClientGrid(merchants)
    collected = collect_statistics(grid, _settings(tmp_path), neighbours, "run-1")
    vectors = [_exact(m, neighbours) for m in merchants.values()]
    assert np.array_equal(vector_of(collected.statistics), np.sum(vectors, axis=0))
    assert collected.merchants == 4 and collected.release["secure_aggregation"] == "SecAgg+"
    assert collected.release["noise"] == "none"
    seen = _everything(grid.received)
    masked = [content for kind, _, content in grid.received if kind == "query.secure_mask"]
    assert len(masked) == 4
    for vector in vectors:
        assert vector.any()
        for secret in (vector % 2**32, (-vector) % 2**32):
            for length in {len(v) for v in seen}:
                assert not any(np.array_equal(v, secret) for v in seen if len(v) == len(secret) == length)
            assert not any(len(v) == len(secret) and np.mean(v == secret) > 0.01 for v in seen)


def test_private_merchants_add_pooled_shares_that_the_ledger_accounts_as_one_release(tmp_path):
    """Each private merchant adds V/(M − T) of the one noise V its ledger asked for, ledgers the release as the
    Skellam of V (RDP), and the sum's noise is the survivors' shares added; with local noise each adds all of V."""
    from fedaug.client.ledger import SKELLAM
    from fedaug.common.priors.dp_counts import vector_of
    from fedaug.server.statistics import collect_statistics

    neighbours = _neighbours()
    results = {}
    for noise in ("pooled", "local"):
        merchants = _merchants(5, 8.0, tmp_path / noise, noise)
        settings = _settings(tmp_path / noise)
        collected = collect_statistics(ClientGrid(merchants), settings, neighbours, "run-1")
        how = collected.release
        assert (how["noise"], how["merchants"], how["survivors"], how["tolerated"]) == (noise, 5, 5, 1)
        pooled, summed = np.square(how["single_release_std"]), np.square(how["noise_std"])
        assert summed == pytest.approx(pooled * (5 / 4 if noise == "pooled" else 5), rel=1e-2)
        for merchant in merchants.values():
            entries = [e for e in merchant.trainer.ledger.entries() if e.run_id == "run-1/statistics"]
            assert [e.mechanism for e in entries] == [SKELLAM]
            reserved = settings.selection_share  # (the run's selection release is reserved first)
            share = reserved + (1 - reserved) * settings.statistics_share
            assert merchant.trainer.epsilon_spent() == pytest.approx(8.0 * share, rel=2e-3)
        residual = vector_of(collected.statistics) - np.sum([_exact(m, neighbours) for m in merchants.values()],
                                                           axis=0)
        n = N_ITEMS + 1
        pairs = residual[n: n + n * K].reshape(n, K)[1:]
        assert pairs.std() == pytest.approx(collected.statistics.fit.pair_std, rel=0.15)
        results[noise] = collected.statistics.fit.pair_std
    assert results["pooled"] == pytest.approx(results["local"] / 2)  # √(5/4) against √5 times one release


def test_a_merchant_killed_after_masking_leaves_a_sum_that_still_unmasks(tmp_path):
    """Acceptance 3 in one process: a merchant that masked and then went silent is still in the sum (the others'
    shares remove its mask); one that went silent before masking is left out (its pairwise masks removed with
    its reconstructed key); more dropouts than the threshold allows end the release with a warning, no sum."""
    from fedaug.common.priors.dp_counts import vector_of
    from fedaug.runtime.secagg import SecAggFailed
    from fedaug.server.secure import secure_sum
    from fedaug.server.statistics import collect_statistics

    merchants = _merchants(5, math.inf, tmp_path)
    neighbours = _neighbours()
    exact = {n: _exact(m, neighbours) for n, m in merchants.items()}
    after = ClientGrid(merchants, drop={101: "query.secure_unmask"})
    collected = collect_statistics(after, _settings(tmp_path / "a"), neighbours, "run-1")
    assert np.array_equal(vector_of(collected.statistics), np.sum(list(exact.values()), axis=0))
    before = ClientGrid(merchants, drop={102: "query.secure_mask"})
    collected = collect_statistics(before, _settings(tmp_path / "b"), neighbours, "run-2")
    assert collected.merchants == 4
    assert np.array_equal(vector_of(collected.statistics), np.sum([v for n, v in exact.items() if n != 102], axis=0))
    too_many = ClientGrid(merchants, drop={101: "query.secure_mask", 102: "query.secure_mask"})
    with pytest.raises(SecAggFailed, match=r"^mask: 3 of 5 merchants sent a masked vector; the noise shares need 4 "):
        secure_sum(too_many, _settings(tmp_path / "c"), _request(neighbours, "run-3"), length=len(exact[100]))
    collected = collect_statistics(ClientGrid(merchants, drop={101: "query.secure_mask", 102: "query.secure_mask"}),
                                   _settings(tmp_path / "d"), neighbours, "run-4")
    assert collected.statistics is None and collected.merchants == 0  # (logged: no statistics this run)


def test_secure_aggregation_is_refused_below_three_merchants_and_off_by_default_there(tmp_path):
    from fedaug.server.statistics import collect_statistics

    merchants = _merchants(2, math.inf, tmp_path)
    with pytest.raises(ConfigError, match="secure_aggregation = true needs at least 3 merchants; 2 connected"):
        collect_statistics(ClientGrid(merchants), _settings(tmp_path, secure_aggregation=True), _neighbours(), "r")
    collected = collect_statistics(ClientGrid(merchants), _settings(tmp_path), _neighbours(), "r")
    assert collected.merchants == 2 and collected.release["secure_aggregation"] is None


def test_a_merchant_takes_part_in_one_secure_statistics_sum_per_run(tmp_path):
    """A second sum of the same run, with other survivors, could tell one merchant's vector from the difference:
    private merchants decline it (non-private ones have nothing to protect)."""
    from fedaug.server.statistics import collect_statistics

    merchants = _merchants(3, 8.0, tmp_path)
    grid = ClientGrid(merchants)
    settings = _settings(tmp_path, secure_aggregation_dropouts=1)
    assert collect_statistics(grid, settings, _neighbours(), "run-1").merchants == 3
    again = collect_statistics(ClientGrid(merchants), settings, _neighbours(), "run-1")
    assert again.statistics is None


def test_the_selection_figures_leave_a_merchant_once_with_a_share_of_the_noise_it_reserved(tmp_path):
    """The secure selection release carries the noise reserved before round 1 (as a Skellam of at least its
    Gaussian's RDP, in quantised units), pooled among M − T; afterwards the figures never leave again, masked or
    not. A merchant whose ledger is not on RDP (no pooled statistics) refuses it."""
    from fedaug.client.ledger import BudgetExceeded
    from fedaug.client.releases import (
        release_selection,
        release_statistics,
        secure_selection,
        selection_noise,
        selection_variance,
    )
    from fedaug.common.priors import fusion_weights
    from fedaug.common.privacy.skellam import equivalent_noise_multiplier
    from fedaug.common.protocol.messages import SelectionRequest
    from fedaug.server.statistics import collect_statistics

    merchants = _merchants(3, 8.0, tmp_path)
    collect_statistics(ClientGrid(merchants), _settings(tmp_path), _neighbours(), "run-1")
    merchant = merchants[100]
    request = SelectionRequest(run_key="run-1", weights=fusion_weights.WEIGHTS, bundle={})
    variance = selection_variance(merchant.trainer, request)
    l1, l2 = fusion_weights.integer_sensitivities()
    reserved = selection_noise(merchant.trainer, "run-1")
    assert reserved > 0 and equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2) >= reserved
    exact = np.linspace(0.0, 40.0, fusion_weights.size())
    vector, share = secure_selection(merchant.trainer, request, exact, variance=variance, merchants=3, tolerated=1)
    assert share == pytest.approx(variance / 2) and vector.dtype == np.int64
    assert np.abs(vector - fusion_weights.quantised(exact)).max() < 8 * math.sqrt(share)
    with pytest.raises(BudgetExceeded, match="released its selection figures already"):
        selection_variance(merchant.trainer, request)
    with pytest.raises(BudgetExceeded, match="in a secure sum already"):
        release_selection(merchant.trainer, "run-1", exact, state_dir=tmp_path / "m0", weights=fusion_weights.WEIGHTS)

    plain = _merchants(1, 8.0, tmp_path / "plain")[100]
    release_statistics(plain.trainer, "run-2", _neighbours(), share=0.5, max_items=3, max_pairs=2,
                       state_dir=tmp_path / "plain" / "m0", serve_sequences=plain.split.seen_sequences(),
                       selection_share=0.05)
    with pytest.raises(BudgetExceeded, match="reserved as a Gaussian release"):
        selection_variance(plain.trainer, SelectionRequest(run_key="run-2", weights=fusion_weights.WEIGHTS,
                                                           bundle={}))

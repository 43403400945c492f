"""The aggregator's round loop against a scripted Grid: strategies, failures of every kind, bad updates, retries,
checkpoint and resume, central DP accounting and the metrics endpoint. (Real processes: tests/test_simulate.py.)"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from fedaug.common.config import STRATEGIES, FederationConfig, FederationSection, from_run_config
from fedaug.common.errors import ConfigError
from fedaug.common.protocol.messages import (
    EVALUATE,
    METRICS,
    TRAIN,
    EvaluateInstruction,
    EvaluateReply,
    TrainFigures,
    TrainInstruction,
    TrainReply,
    Update,
)
from fedaug.common.records import RoundRecord
from fedaug.server import checkpoint
from fedaug.server.federation import RoundFailed, run_federation
from fedaug.server.monitor import ROUND_LOG, Monitor
from fedaug.server.replies import sort_train_replies
from fedaug.server.strategies import WEIGHT, build_strategy
from tests.support import OfflineGrid, free_port

pytestmark = pytest.mark.usefixtures("as_if_inside_a_serverapp")  # messages built as a ServerApp builds them

MODEL = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


class ScriptedGrid(OfflineGrid):
    """Merchants whose behaviour is scripted per node: ok, private, error, decline, nan, shape, dtype or missing.

    An ok merchant with id n returns the global arrays + n (so aggregates are easy to predict) and reports n·10
    users; ``sent`` logs (round, node) for every training message.
    """

    def __init__(self, behaviours: dict[int, str]):
        super().__init__(behaviours)
        self.behaviours = dict(behaviours)
        self.sent: list[tuple[int, int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grids do when pushing
            node = msg.metadata.dst_node_id
            behaviour = self.behaviours[node]
            if msg.metadata.message_type == TRAIN:
                instruction = TrainInstruction.decode(msg.content)
                self.sent.append((instruction.server_round, node))
            if behaviour == "missing":
                continue
            if behaviour == "error":
                replies.append(Message(Error(code=0, reason="ClientApp raised"), reply_to=msg))
                continue
            if behaviour == "unavailable":  # the SuperLink answers for a node that stopped sending heartbeats
                reply = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1
                replies.append(reply)
                continue
            if msg.metadata.message_type == EVALUATE and behaviour == "private":
                replies.append(Message(EvaluateReply(withheld=True).encode(), reply_to=msg))
                continue
            if msg.metadata.message_type == EVALUATE:
                figures = {"valid": {"ndcg@10": 0.1 * node, "hr@10": 0.2}}
                if "test" in EvaluateInstruction.decode(msg.content).stages:
                    figures["test"] = {"ndcg@10": 0.05 * node, "hr@10": 0.1}
                answer = EvaluateReply(partition=node, users=10 * node, figures=figures)
                replies.append(Message(answer.encode(), reply_to=msg))
                continue
            if behaviour == "decline":
                replies.append(Message(TrainReply(epsilon=8.0, decline="budget spent").encode(), reply_to=msg))
                continue
            base = instruction.arrays
            arrays = {k: v.numpy() + node for k, v in base.items()}
            if behaviour == "nan":
                arrays["w"][0, 0] = np.nan
            elif behaviour == "shape":
                arrays["w"] = np.zeros((4, 2), np.float32)
            elif behaviour == "dtype":
                arrays["b"] = arrays["b"].astype(np.float64)
            figures = TrainFigures(users=10 * node, train_loss=1.0 / node, delta=0.0, noise_multiplier=0.0,
                                   seconds=0.0, augment_views=0)
            if behaviour == "private":  # what client/client_app.py sends for a DP round
                figures = None
            update = Update(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
            if instruction.compression != "none" and behaviour in ("ok", "badscale"):  # as the ClientApp encodes
                update = Update.of(arrays, base, instruction.compression)
                if behaviour == "badscale":
                    update = replace(update, scales=dict.fromkeys(update.scales, -1.0))
            answer = TrainReply(epsilon=0.5 * node, partition=node, update=update, figures=figures)
            replies.append(Message(answer.encode(), reply_to=msg))
        return replies


def _settings(tmp_path: Path, **overrides) -> FederationSection:
    return FederationSection(state_dir=tmp_path / "state", **overrides)


@pytest.mark.parametrize("name, cls", [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam),
                                       ("fedyogi", FedYogi), ("fedtrimmedavg", FedTrimmedAvg),
                                       ("fedmedian", FedMedian), ("krum", Krum), ("multikrum", MultiKrum)])
def test_every_configured_strategy_is_flowers_own(tmp_path, name, cls):
    strategy = build_strategy(_settings(tmp_path, strategy=name, byzantine=1), n_nodes=10)
    assert type(strategy) is cls
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum",
                               "multikrum"}


def test_strategy_parameters_and_central_dp_wrapper(tmp_path):
    prox = build_strategy(_settings(tmp_path, strategy="fedprox", proximal_mu=0.3), 4)
    assert prox.proximal_mu == 0.3
    multikrum = build_strategy(_settings(tmp_path, strategy="multikrum", byzantine=2), 10)
    assert multikrum.num_nodes_to_select == 8
    dp = build_strategy(_settings(tmp_path, central_dp=True, central_noise=1.5, central_clip=0.5), 4)
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping) and dp.accountant is not None
    assert dp.noise_multiplier == 1.5 and dp.clipping_norm == 0.5 and dp.num_sampled_clients == 4
    with pytest.raises(ConfigError, match="byzantine"):
        build_strategy(_settings(tmp_path, strategy="krum", byzantine=2), 5)


def _federation(run_config: dict) -> FederationSection:
    return from_run_config(run_config, FederationConfig).federation


def test_run_config_errors_name_the_key():
    federation = _federation({"federation.strategy": "fedmedian", "federation.rounds": 4,
                              "federation.central_delta": ""})
    assert federation.rounds == 4 and federation.strategy == "fedmedian" and federation.central_delta is None
    with pytest.raises(ConfigError, match="run_config: key federation.strategy"):
        _federation({"federation.strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="run_config: key federation.fraction_train"):
        _federation({"federation.fraction_train": 1.5})
    with pytest.raises(ConfigError, match="central_dp needs"):
        _federation({"federation.central_dp": True, "federation.strategy": "fedmedian"})
    with pytest.raises(ConfigError, match="run_config: key federation.rounds"):
        _federation({"federation.rounds": 0})


def test_bad_updates_are_rejected_with_a_reason():
    grid = ScriptedGrid({1: "ok", 2: "nan", 3: "shape", 4: "dtype", 5: "decline", 6: "error", 7: "missing"})
    strategy = FedAvg(min_available_nodes=1)
    arrays = ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = sort_train_replies(messages, grid.send_and_receive(messages), MODEL, uniform_weights=False)
    status = {node: m.status for node, m in replies.merchants.items()}
    assert status == {1: "ok", 2: "rejected", 3: "rejected", 4: "rejected", 5: "declined", 6: "error", 7: "missing"}
    reasons = {node: m.reason or "" for node, m in replies.merchants.items()}
    assert "NaN" in reasons[2] and "shape (4, 2)" in reasons[3] and "float64" in reasons[4]
    assert "budget" in reasons[5] and "raised" in reasons[6] and "timeout" in reasons[7]
    assert [r.metadata.src_node_id for r in replies.accepted] == [1]
    assert set(replies.accepted[0].content[METRICS]) == {WEIGHT}  # the one metric every strategy weighs by


@pytest.mark.parametrize("kind, ratio", [("fp16", 0.5), ("int8", 0.25)])
def test_compressed_updates_are_dequantised_before_checks_and_aggregation(tmp_path, kind, ratio):
    """The server asks for the round's compression, de-quantises what comes back and aggregates fp32 weights as
    from dense replies; the bytes it counts are what travelled. A compressed update that does not decode is
    rejected with the reason, like any bad update."""
    dense = run_federation(ScriptedGrid({1: "ok", 2: "ok"}), _settings(tmp_path / "dense", rounds=1), MODEL)
    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "badscale"} if kind == "int8" else {1: "ok", 2: "ok"})
    packed = run_federation(grid, _settings(tmp_path / kind, rounds=1, compression=kind), MODEL)
    for key in MODEL:  # each merchant's delta is a constant (its id): exact in both encodings
        np.testing.assert_array_equal(packed.arrays[key], dense.arrays[key])
        assert packed.arrays[key].dtype == np.float32
    entry = packed.history[0]
    assert entry.participants == 2
    header = dense.history[0].bytes_received - 2 * sum(v.nbytes for v in MODEL.values())  # Flower's per-array header
    scales = 4 * len(MODEL) * 2 if kind == "int8" else 0
    assert entry.bytes_received == 2 * ratio * sum(v.nbytes for v in MODEL.values()) + header + scales
    if kind == "int8":
        assert entry.problems == ["merchant-3: rejected (compression: array 'w' has no positive finite int8 scale)"]


def test_merchants_are_named_one_way_everywhere(tmp_path):
    """A registered name wins (the aggregator passes its keys' names), then merchant-N by simulation partition,
    then the node id: in round problems, the checkpoint and `fedaug status`."""
    from fedaug.server.checkpoint import federation_status

    grid = ScriptedGrid({1: "ok", 2: "ok", 5: "nan", 6: "missing"})
    state = run_federation(grid, _settings(tmp_path, rounds=1, min_replies=2, merchant_names=("6=shop-six",)),
                           MODEL)
    assert state.history[0].problems == ["merchant-5: rejected (array 'w' contains NaN or Inf)",
                                         "shop-six: missing (no reply before the round timeout)"]
    assert {m["name"] for m in state.merchants.values()} == {"merchant-1", "merchant-2", "merchant-5", "shop-six"}
    assert set(federation_status(tmp_path / "state").merchants) == {"merchant-1", "merchant-2", "merchant-5",
                                                                   "shop-six"}


def test_private_merchants_withhold_counts_loss_and_evaluation_and_weigh_equally(tmp_path):
    grid = ScriptedGrid({1: "private", 2: "ok", 3: "private"})
    state = run_federation(grid, _settings(tmp_path, rounds=1, min_replies=3), MODEL)
    # One merchant withheld its user count: the round weighs all three equally, (1 + 2 + 3) / 3 = 2.
    np.testing.assert_allclose(state.arrays["w"], np.full((3, 2), 2.0), rtol=1e-6)
    entry = state.history[0]
    assert entry.participants == 3 and entry.failures["rejected"] == 0
    assert entry.train_loss == pytest.approx(0.5)  # the one merchant that reported its loss
    assert entry.epsilon_max == pytest.approx(1.5)
    assert entry.federated_merchants == 1 and entry.federated_valid["ndcg@10"] == pytest.approx(0.2)
    assert "users" not in state.merchants["1"] and state.merchants["2"]["users"] == 20
    only_private = run_federation(ScriptedGrid({1: "private", 3: "private"}),
                                  _settings(tmp_path / "b", rounds=1, min_replies=2), MODEL)
    assert only_private.history[0].train_loss is None and only_private.history[0].federated_valid is None


def test_a_round_aggregates_what_arrived_and_logs_the_rest(tmp_path):
    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "error", 4: "decline", 5: "nan", 6: "missing", 7: "unavailable"})
    state = run_federation(grid, _settings(tmp_path, rounds=2, min_replies=2), MODEL)
    assert state.round == 2
    # FedAvg weighted by users (10, 20): each round adds (1·10 + 2·20) / 30.
    np.testing.assert_allclose(state.arrays["w"], np.full((3, 2), 2 * 50 / 30), rtol=1e-6)
    entry = state.history[0]
    assert entry.participants == 2
    assert entry.failures == {"error": 2, "declined": 1, "rejected": 1, "missing": 1}
    assert any("6: missing" in p for p in entry.problems) and any("5: rejected" in p for p in entry.problems)
    # Flower's own error for an unreachable node comes from the SuperLink, yet names the merchant it was sent to.
    assert any("7: error (Node Unavailable)" in p for p in entry.problems)
    assert entry.federated_merchants == 4  # all but the failing and the missing merchant evaluated
    assert entry.federated_test is None and state.history[1].federated_test is not None  # test: final round only
    # user-weighted: merchants 1, 2, 4, 5 with 10·n users each report valid NDCG@10 0.1·n
    assert entry.federated_valid["ndcg@10"] == pytest.approx(sum(0.1 * n * 10 * n for n in (1, 2, 4, 5)) / 120)
    assert entry.valid == entry.federated_valid  # no central evaluation attached: the federated one is it
    # ε is what merchants report spending, whether or not their update was used (ok 0.5, 1.0; declined 8; nan 2.5).
    assert entry.epsilon_max == 8.0 and entry.epsilon_mean == pytest.approx(3.0)
    log = (tmp_path / "state" / ROUND_LOG).read_text().splitlines()
    assert [json.loads(line)["round"] for line in log] == [1, 2]


def test_when_every_budget_is_spent_the_federation_ends_with_the_model_it_has(tmp_path):
    """Every merchant declining for its budget is not a failure to retry (it cannot change): the round keeps the
    global model, it is evaluated as the final one, and the federation ends there — also when resumed."""
    grid = ScriptedGrid({1: "ok", 2: "ok"})
    first = run_federation(grid, _settings(tmp_path, rounds=1, min_replies=2), MODEL)
    grid.behaviours.update({1: "decline", 2: "decline"})
    state = run_federation(grid, _settings(tmp_path, rounds=4, min_replies=2, retries=2), MODEL)
    assert state.round == 2 and state.budgets_spent and [r.round for r in state.history] == [1, 2]
    assert state.history[-1].budgets_spent and state.history[-1].participants == 0
    assert state.history[-1].federated_test is not None  # evaluated as the final model
    np.testing.assert_array_equal(state.arrays["w"], first.arrays["w"])
    assert [r for r, _ in grid.sent].count(2) == 2  # one attempt: asking again cannot help
    again = run_federation(grid, _settings(tmp_path, rounds=4, min_replies=2), MODEL)
    assert again.round == 2 and [r for r, _ in grid.sent].count(3) == 0
    assert checkpoint.load(tmp_path / "state").budgets_spent


def test_too_few_replies_retry_then_stop_cleanly_keeping_the_last_checkpoint(tmp_path):
    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "ok"})
    run_federation(grid, _settings(tmp_path, rounds=1, min_replies=2), MODEL)
    grid.behaviours.update({2: "missing", 3: "error"})
    with pytest.raises(RoundFailed, match="round 2: not aggregated in 3 attempts .*start again to resume"):
        run_federation(grid, _settings(tmp_path, rounds=3, min_replies=2, retries=2), MODEL)
    assert [r for r, _ in grid.sent].count(2) == 9  # three attempts at all three merchants
    assert checkpoint.load(tmp_path / "state").round == 1
    # Merchants whose budget is spent decline: starting again would only decline again, so it is not advised.
    grid.behaviours.update({2: "decline", 3: "decline"})
    with pytest.raises(RoundFailed, match="2 merchants declined .* starting again will not help") as failed:
        run_federation(grid, _settings(tmp_path, rounds=3, min_replies=2, retries=0), MODEL)
    assert "start again to resume" not in str(failed.value)


def test_resume_continues_after_the_last_checkpointed_round_with_strategy_state(tmp_path):
    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "ok"})
    settings = _settings(tmp_path, rounds=2, strategy="fedadam")
    first = run_federation(grid, settings, MODEL)
    saved = checkpoint.load(tmp_path / "state")
    assert saved.round == 2 and set(saved.strategy_state) == {"m_t", "v_t"}
    np.testing.assert_array_equal(saved.arrays["w"], first.arrays["w"])

    uninterrupted = ScriptedGrid({1: "ok", 2: "ok", 3: "ok"})
    reference = run_federation(uninterrupted, _settings(tmp_path / "ref", rounds=3, strategy="fedadam"), MODEL)
    resumed = run_federation(grid, settings.model_copy(update={"rounds": 3}), MODEL)
    assert [h.round for h in resumed.history] == [1, 2, 3]
    assert [r for r, _ in grid.sent] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # no round repeated, none lost
    np.testing.assert_allclose(resumed.arrays["w"], reference.arrays["w"], rtol=1e-6)  # moments were restored
    assert resumed.run_key == first.run_key
    # Nothing to do once every round is in: no message is sent.
    run_federation(grid, settings.model_copy(update={"rounds": 3}), MODEL)
    assert len(grid.sent) == 9


def test_a_federation_keeps_its_own_key_and_every_flower_run_it_ran_under(tmp_path):
    """One federation, two ids: its key (merchants' ledgers) and Flower's run id, one per start; output names both."""
    from fedaug.common.records import federation_name

    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "ok"})
    first = run_federation(grid, _settings(tmp_path, rounds=1), MODEL, flower_run=1111)
    resumed = run_federation(grid, _settings(tmp_path, rounds=2), MODEL, flower_run=2222)
    assert resumed.run_key == first.run_key and resumed.flower_runs == [1111, 2222]
    status = checkpoint.federation_status(tmp_path / "state")
    assert status.run_key == first.run_key and status.flower_runs == [1111, 2222]
    assert federation_name(status.run_key, status.flower_runs) == (f"federation {first.run_key[:12]}… "
                                                                   "(Flower runs 1111, 2222)")
    assert federation_name("run-a", [7]) == "federation run-a (Flower run 7)"


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    run_federation(ScriptedGrid({1: "ok"}), _settings(tmp_path, rounds=1), MODEL)
    with pytest.raises(ConfigError, match="fedavg run, this run is fedmedian"):
        run_federation(ScriptedGrid({1: "ok"}), _settings(tmp_path, rounds=2, strategy="fedmedian"), MODEL)
    with pytest.raises(ConfigError, match="different model"):
        run_federation(ScriptedGrid({1: "ok"}), _settings(tmp_path, rounds=2), {"w": np.zeros(3, np.float32)})


def test_central_dp_accounts_every_release_and_resumes_its_accountant(tmp_path):
    grid = ScriptedGrid({1: "ok", 2: "ok", 3: "ok", 4: "ok"})
    settings = _settings(tmp_path, rounds=2, central_dp=True, central_noise=2.0, central_clip=0.1)
    state = run_federation(grid, settings, MODEL)
    first, second = (h.central_epsilon for h in state.history)
    assert 0 < first < second
    resumed = run_federation(grid, settings.model_copy(update={"rounds": 3}), MODEL)
    assert resumed.history[-1].central_epsilon > second
    assert checkpoint.load(tmp_path / "state").accountant["compositions"][0]["count"] == 1
    # With a merchant missing, Flower's accountant cannot account the round: it is retried, then the run stops.
    grid.behaviours[4] = "missing"
    with pytest.raises(RoundFailed, match="central DP needs a reply from every sampled merchant"):
        run_federation(grid, settings.model_copy(update={"rounds": 4, "retries": 0}), MODEL)



@pytest.mark.integration  # an HTTP server on a port
def test_metrics_endpoint_answers(tmp_path):
    port = free_port()
    monitor = Monitor(tmp_path, port)
    try:
        entry = RoundRecord(round=3, participants=4, failures={"missing": 1}, bytes_received=1234,
                            valid={"ndcg@10": 0.05, "hr@10": 0.1}, train_loss=2.5, epsilon_max=4.0, epsilon_mean=3.0)
        monitor.record(entry, [entry])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        monitor.close()
    for line in ("fedaug_round 3.0", "fedaug_round_participants 4.0", 'fedaug_merchant_failures_total{kind="missing"} '
                 "1.0", "fedaug_global_ndcg_at_10 0.05", "fedaug_merchant_epsilon_max 4.0",
                 "fedaug_bytes_received_total 1234.0"):
        assert line in body, line


def test_the_best_validating_global_model_is_kept_across_a_resume(tmp_path):
    """Round 2 validates best: its arrays are kept (in the checkpoint, so a resume keeps them) and tested once the
    last round is in, beside the final model's test."""
    def evaluator(arrays, stages, statistics):
        after = round(float(arrays["w"][0, 0]) / (50 / 30))  # each round adds 50/30 (merchants 1 and 2)
        score = {1: 0.3, 2: 0.5, 3: 0.2, 4: 0.1}[after]
        metrics = {name: score for name in ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "auc")}
        out = {"valid": metrics | {"users": 5}}
        if "test" in stages:
            out["test"] = {k: v / 10 for k, v in metrics.items()} | {"users": 5}
        return out

    grid = ScriptedGrid({1: "ok", 2: "ok"})
    grid_settings = _settings(tmp_path, rounds=3, fraction_evaluate=0.0)
    state = run_federation(grid, grid_settings, MODEL, evaluator)
    assert state.best_round == 2 and state.best_arrays["w"][0, 0] == pytest.approx(2 * 50 / 30)
    assert state.best_test["ndcg@10"] == pytest.approx(0.05)  # round 2's model, tested after the last round
    assert state.history[-1].test["ndcg@10"] == pytest.approx(0.02)  # the final model's test is kept beside it
    resumed = run_federation(grid, grid_settings.model_copy(update={"rounds": 4}), MODEL, evaluator)
    # round 4 (0.1) does not replace it
    assert resumed.best_round == 2 and resumed.best_arrays["w"][0, 0] == pytest.approx(2 * 50 / 30)
    assert checkpoint.load(tmp_path / "state").best_round == 2


def test_a_rounds_engine_overhead_is_its_merchant_phases_beyond_the_merchants_own_work(tmp_path):
    """Phases are timed by the server; a simulation attaches the merchants' own work, which survives the round log
    and the checkpoint."""
    from fedaug.common.records import MerchantWork

    def work(server_round, run_key):
        return MerchantWork(seconds={"merchant-1": 0.02, "merchant-2": 0.01}, setup={"merchant-1": 0.001}, lanes=1)

    state = run_federation(ScriptedGrid({1: "ok", 2: "ok"}), _settings(tmp_path, rounds=1), MODEL,
                           merchant_work=work)
    entry = state.history[0]
    assert entry.train_seconds > 0 and entry.evaluate_seconds > 0 and entry.central_seconds is None
    assert entry.engine_seconds == pytest.approx(entry.train_seconds + entry.evaluate_seconds)
    assert entry.work.ideal() == pytest.approx(0.03)  # one lane: the total; two lanes: the busiest
    assert MerchantWork(seconds={"a": 2.0, "b": 1.0}, lanes=2).ideal() == 2.0
    assert entry.overhead == pytest.approx(entry.engine_seconds - 0.03)
    logged = RoundRecord.from_json(json.loads((tmp_path / "state" / ROUND_LOG).read_text().splitlines()[0]))
    assert logged.work == entry.work and checkpoint.load(tmp_path / "state").history[0].work == entry.work

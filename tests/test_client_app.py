"""The merchant ClientApp, called the way Flower calls it: train, evaluate, and declining past the budget."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedaug.client.client_app import app
from fedaug.client.merchant import merchant_for
from fedaug.common.config import from_run_config
from fedaug.common.errors import ConfigError
from fedaug.server.server_app import initial_model

RUN = {"federation.rounds": 2, "privacy.epsilon": 3.0, "local.batch_size": 64, "local.local_epochs": 1,
       "model.hidden": 16, "model.heads": 2, "model.max_len": 20, "augment.views": 1}


@pytest.fixture(autouse=True)
def _as_if_sent_by_a_serverapp(monkeypatch):
    """Messages are normally created inside a ServerApp process, which sets its task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _call(kind, arrays, context, server_round=1):
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})})
    return app(Message(content=content, dst_node_id=1, message_type=kind), context)


@pytest.mark.slow
def test_train_and_evaluate_round_trip_then_decline(tmp_path):
    run = RUN | {"federation.state_dir": str(tmp_path)}
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                      run_config=run)
    config = from_run_config(run)
    global_model = initial_model(config, config.load_data())  # as the ServerApp builds it: the federated recipe
    assert global_model.cfg.id_dim == 8 and global_model.cfg.n_attributes > 0
    arrays = global_model.state_dict()

    reply = _call(MessageType.TRAIN, arrays, context, 1)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    # A private round's reply carries the DP update and the ledger's ε, nothing else computed on the users:
    # no loss, no user count (the default δ = 1/(10·users) would tell it too), no noise multiplier, no timings.
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = reply.content["metrics"]
    assert dict(metrics) == {"declined": 0, "epsilon": metrics["epsilon"], "partition-id": 1}
    assert 0 < metrics["epsilon"] <= 3.0
    new = reply.content["arrays"].to_torch_state_dict()
    assert set(new) == set(arrays) and any(not torch.equal(new[k], arrays[k]) for k in arrays)
    assert (tmp_path / "merchant-1" / "privacy-ledger.sqlite").is_file()

    evaluation = _call(MessageType.EVALUATE, new, context)  # metrics on its users: outside its ε, withheld
    assert set(evaluation.content.keys()) == {"metrics"}
    assert dict(evaluation.content["metrics"]) == {"withheld": 1, "partition-id": 1}

    second = _call(MessageType.TRAIN, new, context, 2)
    assert second.content["metrics"]["declined"] == 0
    assert second.content["metrics"]["epsilon"] <= 3.0
    # The server lost round 2 (it crashed) and asks again from the same weights: the merchant resends the very
    # update it released, without training or paying for it again.
    ledger_rows = _ledger_rows(tmp_path / "merchant-1")
    again = _call(MessageType.TRAIN, new, context, 2)
    assert again.content["metrics"]["replayed"] == 1 and again.content["metrics"]["declined"] == 0
    assert again.content["metrics"]["epsilon"] == pytest.approx(second.content["metrics"]["epsilon"])
    first_arrays, second_arrays = (r.content["arrays"].to_torch_state_dict() for r in (second, again))
    assert all(torch.equal(first_arrays[k], second_arrays[k]) for k in first_arrays)
    assert _ledger_rows(tmp_path / "merchant-1") == ledger_rows
    third = _call(MessageType.TRAIN, new, context, 3)  # past the planned rounds: the budget is spent
    assert not third.has_error()
    assert third.content["metrics"]["declined"] == 1 and "arrays" not in third.content
    assert set(third.content["metrics"]) == {"declined", "epsilon", "partition-id"}
    assert "budget" in third.content["decline"]["reason"]
    # The merchant's own round log, which its daemon prints line by line (a replayed round is not a new one).
    from fedaug.client.round_log import RoundLogFollower

    said = []
    follower = RoundLogFollower(tmp_path / "merchant-1", said.append, since=0)  # from the start of the log
    follower.poll()
    assert [line.split(":")[0] for line in said] == ["round 1", "round 2", "round 3"]
    assert "trained in" in said[0] and "ε" in said[0] and "bytes sent" in said[0] and "declined" in said[2]


def test_a_non_private_merchant_reports_its_figures(tmp_path):
    """Without DP nothing is protected, so the loss, user count and evaluation metrics are sent (and weigh)."""
    run = RUN | {"privacy.epsilon": "inf", "federation.state_dir": str(tmp_path), "model.tie_embeddings": True}
    context = _context({"partition-id": 1, "num-partitions": 4}, run)
    config = from_run_config(run)
    arrays = initial_model(config, config.load_data()).state_dict()
    metrics = _call(MessageType.TRAIN, arrays, context).content["metrics"]
    assert metrics["num-examples"] == 750 and metrics["train_loss"] > 0 and metrics["epsilon"] == -1
    evaluation = _call(MessageType.EVALUATE, arrays, context).content["metrics"]
    assert evaluation["num-examples"] == 750 and "valid-ndcg@10" in evaluation and "withheld" not in evaluation


def _context(node_config, run_config=RUN):
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_node_without_data_or_partition_is_a_config_error():
    with pytest.raises(ConfigError, match="data.path"):
        merchant_for(_context({}))
    with pytest.raises(ConfigError, match="merchant.state_dir"):
        merchant_for(_context({"data.path": "x.csv"}))


def test_run_config_with_a_section_the_role_does_not_use_is_refused():
    with pytest.raises(ConfigError, match="run_config: key train: Extra inputs are not permitted"):
        merchant_for(_context({"partition-id": 0, "num-partitions": 2}, RUN | {"train.epochs": 7}))
    with pytest.raises(ConfigError, match="run_config: key local.rounds"):
        merchant_for(_context({"partition-id": 0, "num-partitions": 2}, RUN | {"local.rounds": 7}))


def test_a_deployed_merchant_keeps_its_own_data_and_budget(tmp_path):
    """node_config (the merchant's own TOML) overrides the recipe's budget; the aggregator's [data] never
    reaches a merchant."""
    from fedaug.common.data.synthetic import SyntheticSpec, generate
    from fedaug.runtime.export import write_merchant_files

    files = write_merchant_files(generate(SyntheticSpec(users=200, items=100, merchants=2)), tmp_path / "data")
    node = {"data.path": str(files[1]), "data.catalog": str(files[0]), "privacy.epsilon": 2.0,
            "merchant.state_dir": str(tmp_path / "state")}
    merchant = merchant_for(_context(node, RUN | {"data.path": "/aggregator/has/no/such.csv",
                                                  "data.catalog": str(files[0])}))
    assert merchant.trainer.privacy.epsilon == 2.0 and merchant.trainer.privacy.planned_rounds == 2
    assert merchant.partition_id == -1 and len(merchant.split.eval_users("test")) > 0


def _ledger_rows(state_dir):
    import sqlite3

    db = sqlite3.connect(state_dir / "privacy-ledger.sqlite")
    try:
        return db.execute("SELECT run_id, round, attempt, epsilon FROM rounds ORDER BY id").fetchall()
    finally:
        db.close()


def test_a_merchant_sends_its_update_as_the_server_asks_and_logs_its_own_work(tmp_path):
    """compression int8: the delta from the global model as int8 with a scale per tensor, which the server
    decodes to within one quantisation step of the dense update; the round log keeps the handler's own time."""
    from fedaug.client.round_log import read_rounds
    from fedaug.common.protocol.codec import INT8_LEVELS
    from fedaug.server.replies import sort_train_replies

    run = RUN | {"privacy.epsilon": "inf", "federation.state_dir": str(tmp_path), "model.tie_embeddings": True}
    context = _context({"partition-id": 1, "num-partitions": 4}, run)
    config = from_run_config(run)
    arrays = initial_model(config, config.load_data()).state_dict()
    replies = {}
    for kind in ("none", "int8"):
        msg = Message(content=RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(
            {"server-round": 1, "compression": kind})}), dst_node_id=1, message_type=MessageType.TRAIN)
        replies[kind] = (msg, app(msg, context))
    dense = replies["none"][1].content["arrays"].to_numpy_ndarrays()
    packed = replies["int8"][1]
    assert packed.content["compression"]["kind"] == "int8"
    assert {a.numpy().dtype.name for a in packed.content["arrays"].values()} == {"int8"}
    reference = {k: v.numpy() for k, v in arrays.items()}
    sorted_replies = sort_train_replies([replies["int8"][0]], [packed], reference, uniform_weights=False)
    assert len(sorted_replies.accepted) == 1, sorted_replies.problems()
    decoded = sorted_replies.accepted[0].content["arrays"]
    for (key, start), after in zip(reference.items(), dense, strict=True):
        step = max(float(abs(after - start).max()) / INT8_LEVELS, 1e-12)
        assert float(abs(decoded[key].numpy() - after).max()) <= step * 1.001, key
    dense_bytes = sum(len(a.data) for a in replies["none"][1].content["arrays"].values())
    assert sorted_replies.bytes_received < 0.3 * dense_bytes
    log = read_rounds(tmp_path / "merchant-1")
    assert [entry.bytes_sent for entry in log] == [dense_bytes, sorted_replies.bytes_received]
    assert all(entry.work_seconds >= entry.seconds > 0 for entry in log)
    _call(MessageType.EVALUATE, arrays, context)  # a non-private merchant scores the model: its own work too
    assert read_rounds(tmp_path / "merchant-1")[-1].stage == "evaluate"
    assert read_rounds(tmp_path / "merchant-1")[-1].work_seconds > 0

"""The merchant ClientApp, called the way Flower calls it: train, evaluate, and declining past the budget."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

from fedaug.client.client_app import app
from fedaug.client.merchant import merchant_for
from fedaug.common.config import from_run_config
from fedaug.common.data.source import load_data
from fedaug.common.errors import ConfigError
from fedaug.common.protocol.messages import (
    ARRAYS,
    DECLINED,
    EPSILON,
    METRICS,
    PARTITION,
    WITHHELD,
    EvaluateInstruction,
    EvaluateReply,
    TrainInstruction,
    TrainReply,
    strategy_arrays,
)
from fedaug.server.server_app import initial_model

pytestmark = pytest.mark.usefixtures("as_if_inside_a_serverapp")  # messages built as a ServerApp builds them

RUN = {"federation.rounds": 2, "privacy.epsilon": 3.0, "local.batch_size": 64, "local.local_epochs": 1,
       "model.hidden": 16, "model.heads": 2, "model.max_len": 20, "augment.views": 1}


def _call(kind, arrays, context, server_round=1):
    instruction = TrainInstruction if kind == MessageType.TRAIN else EvaluateInstruction
    content = instruction(ArrayRecord(arrays), server_round=server_round).encode()
    return app(Message(content=content, dst_node_id=1, message_type=kind), context)


@pytest.mark.slow
def test_train_and_evaluate_round_trip_then_decline(tmp_path):
    run = RUN | {"federation.state_dir": str(tmp_path)}
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                      run_config=run)
    config = from_run_config(run)
    # as the ServerApp builds it: the federated recipe
    global_model = initial_model(config, load_data(config.data, config.synthetic))
    assert global_model.cfg.id_dim == 8 and global_model.cfg.n_attributes > 0
    arrays = global_model.state_dict()

    reply = _call(MessageType.TRAIN, arrays, context, 1)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    # A private round's reply carries the DP update and the ledger's ε, nothing else computed on the users:
    # no loss, no user count (the default δ = 1/(10·users) would tell it too), no noise multiplier, no timings.
    assert set(reply.content.keys()) == {ARRAYS, METRICS}
    assert set(reply.content[METRICS]) == {DECLINED, EPSILON, PARTITION}
    answer = TrainReply.decode(reply.content)
    assert answer.partition == 1 and answer.figures is None and answer.decline is None
    assert 0 < answer.epsilon <= 3.0
    new = answer.update.arrays.to_torch_state_dict()
    assert set(new) == set(arrays) and any(not torch.equal(new[k], arrays[k]) for k in arrays)
    assert (tmp_path / "merchant-1" / "privacy-ledger.sqlite").is_file()

    evaluation = _call(MessageType.EVALUATE, new, context)  # metrics on its users: outside its ε, withheld
    assert set(evaluation.content.keys()) == {METRICS} and set(evaluation.content[METRICS]) == {WITHHELD, PARTITION}
    assert EvaluateReply.decode(evaluation.content) == EvaluateReply(partition=1, withheld=True)

    second = TrainReply.decode(_call(MessageType.TRAIN, new, context, 2).content)
    assert second.decline is None and second.epsilon <= 3.0
    # The server lost round 2 (it crashed) and asks again from the same weights: the merchant resends the very
    # update it released, without training or paying for it again.
    ledger_rows = _ledger_rows(tmp_path / "merchant-1")
    again = TrainReply.decode(_call(MessageType.TRAIN, new, context, 2).content)
    assert again.replayed and again.decline is None
    assert again.epsilon == pytest.approx(second.epsilon)
    first_arrays, second_arrays = (r.update.arrays.to_torch_state_dict() for r in (second, again))
    assert all(torch.equal(first_arrays[k], second_arrays[k]) for k in first_arrays)
    assert _ledger_rows(tmp_path / "merchant-1") == ledger_rows
    third = _call(MessageType.TRAIN, new, context, 3)  # past the planned rounds: the budget is spent
    assert not third.has_error()
    assert ARRAYS not in third.content and set(third.content[METRICS]) == {DECLINED, EPSILON, PARTITION}
    declined = TrainReply.decode(third.content)
    assert declined.update is None and "budget" in declined.decline
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
    arrays = initial_model(config, load_data(config.data, config.synthetic)).state_dict()
    answer = TrainReply.decode(_call(MessageType.TRAIN, arrays, context).content)
    assert answer.figures.users == 750 and answer.figures.train_loss > 0 and math.isinf(answer.epsilon)
    evaluation = EvaluateReply.decode(_call(MessageType.EVALUATE, arrays, context).content)
    assert evaluation.users == 750 and "ndcg@10" in evaluation.figures["valid"] and not evaluation.withheld


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
    from fedaug.common.config import SyntheticSection
    from fedaug.common.data.synthetic import generate
    from fedaug.runtime.export import write_merchant_files

    data = generate(SyntheticSection(users=200, items=100, merchants=2, titles=False))
    files = write_merchant_files(data, tmp_path / "data")
    node = {"data.path": str(files[1]), "data.catalog": str(files[0]), "privacy.epsilon": 2.0,
            "merchant.state_dir": str(tmp_path / "state")}
    merchant = merchant_for(_context(node, RUN | {"data.path": "/aggregator/has/no/such.csv",
                                                  "data.catalog": str(files[0])}))
    assert merchant.trainer.privacy.epsilon == 2.0 and merchant.trainer.rounds == 2
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
    arrays = initial_model(config, load_data(config.data, config.synthetic)).state_dict()
    replies = {}
    for kind in ("none", "int8"):
        msg = Message(content=TrainInstruction(ArrayRecord(arrays), server_round=1, compression=kind).encode(),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        replies[kind] = (msg, app(msg, context))
    dense_update = TrainReply.decode(replies["none"][1].content).update
    dense = dense_update.arrays.to_numpy_ndarrays()
    packed = replies["int8"][1]
    update = TrainReply.decode(packed.content).update
    assert update.compression == "int8" and set(update.scales) == set(arrays)
    assert {a.numpy().dtype.name for a in update.arrays.values()} == {"int8"}
    reference = {k: v.numpy() for k, v in arrays.items()}
    sorted_replies = sort_train_replies([replies["int8"][0]], [packed], reference, uniform_weights=False)
    assert len(sorted_replies.accepted) == 1, sorted_replies.problems()
    decoded = strategy_arrays(sorted_replies.accepted[0].content)
    for (key, start), after in zip(reference.items(), dense, strict=True):
        step = max(float(abs(after - start).max()) / INT8_LEVELS, 1e-12)
        assert float(abs(decoded[key].numpy() - after).max()) <= step * 1.001, key
    dense_bytes = dense_update.nbytes
    assert sorted_replies.bytes_received == update.nbytes < 0.3 * dense_bytes
    log = read_rounds(tmp_path / "merchant-1")
    assert [entry.bytes_sent for entry in log] == [dense_bytes, sorted_replies.bytes_received]
    assert all(entry.work_seconds >= entry.seconds > 0 for entry in log)
    _call(MessageType.EVALUATE, arrays, context)  # a non-private merchant scores the model: its own work too
    assert read_rounds(tmp_path / "merchant-1")[-1].stage == "evaluate"
    assert read_rounds(tmp_path / "merchant-1")[-1].work_seconds > 0

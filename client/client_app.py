"""The merchant's Flower ClientApp (Message API): ``train``, ``evaluate``, the ``query.statistics`` release, the
``query.selection`` release (federated DP evaluation of the candidate model's fusion weights) and ``query.model``,
the federation's final model.

A merchant whose budget cannot afford the round replies normally with ``declined = 1`` and no arrays, so the
server can tell a decline from a crash (which arrives as a Flower error reply). A private merchant sends only what
its ledger accounts for: the DP update, the noised statistics and its ε — no loss, user count or evaluation metrics
(README, "What crosses the wire"). ``app`` is what merchants run
(deployment, `flwr run .`); ``client_app`` builds the same handlers over another merchant source, with Flower mods
around training — how `fedaug simulate` attaches its simulation-only behaviour (simulations/apps.py).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedaug.client import replay
from fedaug.client.ledger import BudgetExceeded
from fedaug.client.merchant import Merchant, MerchantSource, merchant_for
from fedaug.client.releases import release_selection, release_statistics, selection_noise
from fedaug.client.round_log import MerchantRound, append_round
from fedaug.common.flower_logging import tame_flower_logging
from fedaug.common.memory import single_malloc_arena
from fedaug.common.model.evaluate import evaluate as evaluate_split
from fedaug.common.model.evaluate import sasrec_scorer
from fedaug.common.model.metrics import METRIC_NAMES
from fedaug.common.priors.fusion import Fused
from fedaug.common.priors.fusion_weights import figures
from fedaug.common.protocol.codec import COMPRESSIONS, Encoded, decode, encode
from fedaug.common.recommend.bundle import bundle_hash, load_bundle, write_bundle_files
from fedaug.common.records import WITHHELD
from fedaug.runtime.flower import Mod

STATISTICS = "statistics"
"""The query action (Flower message type ``query.statistics``) that asks for the DP collaborative statistics."""
SELECTION = "selection"
"""The query action (``query.selection``) that asks for this merchant's figures on the candidate fusion weights."""
MODEL = "model"
"""The query action (``query.model``) that hands over the federation's final model bundle (server/distribute.py)."""

single_malloc_arena()  # this process trains round after round: keep its RSS from creeping
tame_flower_logging()


def client_app(merchants: MerchantSource = merchant_for, train_mods: list[Mod] | None = None) -> ClientApp:
    """A ClientApp whose handlers find their merchant with ``merchants``; ``train_mods`` wrap training."""
    app = ClientApp()

    @app.train(mods=train_mods)
    def _train(msg: Message, context: Context) -> Message:
        started = time.monotonic()
        merchant = merchants(context)
        return train(msg, context, merchant, setup_seconds=time.monotonic() - started)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        started = time.monotonic()
        merchant = merchants(context)
        return evaluate(msg, merchant, setup_seconds=time.monotonic() - started)

    @app.query(STATISTICS)
    def _statistics(msg: Message, context: Context) -> Message:
        return statistics(msg, merchants(context))

    @app.query(SELECTION)
    def _selection(msg: Message, context: Context) -> Message:
        return select(msg, merchants(context))

    @app.query(MODEL)
    def _model(msg: Message, context: Context) -> Message:
        return store_model(msg, merchants(context))

    return app


def train(msg: Message, context: Context, merchant: Merchant, setup_seconds: float = 0.0) -> Message:
    """Train one round from the global model in ``msg`` (or resend the update of a round asked again); the reply
    carries the update as the server's round config asks (``compression``: common/protocol/codec.py)."""
    started = time.monotonic()
    global_arrays = msg.content["arrays"]
    model = merchant.model(global_arrays.to_torch_state_dict())
    config = msg.content["config"] if "config" in msg.content else {}
    server_round = int(config.get("server-round", 0))
    # The server's run key survives its restarts (Flower's run id does not): the ledger keys rounds by it.
    run_key = str(config.get("run-key", context.run_id))
    proximal_mu = float(config.get("proximal-mu", 0.0))
    compression = str(config.get("compression", "none"))
    if compression not in COMPRESSIONS:
        raise ValueError(f"round config: compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    replay_key = replay.digest(run_key, server_round, {k: a.data for k, a in global_arrays.items()},
                               {"proximal-mu": proximal_mu})
    cached = merchant.replays.get(replay_key) if merchant.replays else None
    if cached is not None:  # this exact round was trained and sent before (the server lost it): resend it, for free
        arrays, metrics = cached
        content = update_content(arrays, global_arrays, compression)
        content["metrics"] = MetricRecord(metrics | {"epsilon": _finite(merchant.trainer.epsilon_spent()),
                                                     "replayed": 1})
        return Message(content, reply_to=msg)
    try:
        result = merchant.trainer.train_round(model, run_id=run_key, round_=server_round, proximal_mu=proximal_mu)
    except BudgetExceeded as exc:
        spent = merchant.trainer.epsilon_spent()
        _log_round(merchant, server_round, run_key, declined=True, epsilon=spent, seconds=0.0, size=0,
                   work=time.monotonic() - started, setup=setup_seconds)
        content = RecordDict({
            "metrics": MetricRecord({"declined": 1, "epsilon": _finite(spent),
                                     "partition-id": merchant.partition_id}),
            "decline": ConfigRecord({"reason": str(exc)}),
        })
        return Message(content, reply_to=msg)
    sent = {"declined": 0, "epsilon": _finite(result.epsilon), "partition-id": merchant.partition_id}
    if not merchant.trainer.privacy.private:  # figures computed on the data, outside any accounting
        sent |= {"num-examples": result.num_examples, "train_loss": result.train_loss, "delta": result.delta,
                 "noise_multiplier": result.noise_multiplier, "seconds": result.seconds,
                 "augment_views": result.augment_views}
    metrics = MetricRecord(sent)
    update = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if merchant.replays:
        merchant.replays.put(replay_key, update, dict(metrics))
    content = update_content(update, global_arrays, compression)
    content["metrics"] = metrics
    _log_round(merchant, server_round, run_key, declined=False, epsilon=result.epsilon, seconds=result.seconds,
               size=_payload_bytes(content), work=time.monotonic() - started, setup=setup_seconds)
    return Message(content, reply_to=msg)


def update_content(update: dict[str, np.ndarray], global_arrays: ArrayRecord, compression: str) -> RecordDict:
    """The reply's ``arrays`` (and, compressed, its ``compression`` record: the kind and int8 scales)."""
    if compression == "none":
        return RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in update.items()})})
    encoded = encode(update, {k: a.numpy() for k, a in global_arrays.items()}, compression)
    keys = sorted(encoded.scales)
    return RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in encoded.arrays.items()}),
                       "compression": ConfigRecord({"kind": compression, "keys": keys,
                                                    "scales": [encoded.scales[k] for k in keys]})})


def sent_weights(content: RecordDict, global_arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The weights a reply built by ``update_content`` stands for (what the server will decode)."""
    arrays = {k: a.numpy() for k, a in content["arrays"].items()}
    if "compression" not in content:
        return arrays
    spec = content["compression"]
    encoded = Encoded(str(spec["kind"]), arrays, dict(zip(spec["keys"], spec["scales"], strict=True)))
    return decode(encoded, {k: a.numpy() for k, a in global_arrays.items()})


def _payload_bytes(content: RecordDict) -> int:
    """What the update costs on the wire, counted as the server counts it (server/replies.py)."""
    scales = content["compression"]["scales"] if "compression" in content else []
    return sum(len(a.data) for a in content["arrays"].values()) + 4 * len(scales)


def evaluate(msg: Message, merchant: Merchant, setup_seconds: float = 0.0) -> Message:
    """Score the global model in ``msg`` on this merchant's held-out users (the stages asked for). A private
    merchant withholds them: metrics over its users are outside its accounted ε."""
    started = time.monotonic()
    if merchant.trainer.privacy.private:
        return Message(RecordDict({"metrics": MetricRecord({WITHHELD: 1, "partition-id": merchant.partition_id})}),
                       reply_to=msg)
    model = merchant.model(msg.content["arrays"].to_torch_state_dict())
    scorer = sasrec_scorer(model, merchant.device)
    config = msg.content["config"] if "config" in msg.content else {}
    values, users = {}, 0
    for stage in config.get("stages", ["valid", "test"]):  # validation every round, test for the final model
        metrics = evaluate_split(scorer, merchant.split, stage)
        values |= {f"{stage}-{name}": metrics[name] for name in METRIC_NAMES}
        users = metrics["users"]
    _log_round(merchant, int(config.get("server-round", 0)), str(config.get("run-key", "")), declined=False,
               epsilon=math.inf, seconds=0.0, size=0, stage="evaluate", work=time.monotonic() - started,
               setup=setup_seconds)
    content = RecordDict({"metrics": MetricRecord(values | {"num-examples": users,
                                                            "partition-id": merchant.partition_id})})
    return Message(content, reply_to=msg)


def statistics(msg: Message, merchant: Merchant) -> Message:
    """Release this merchant's DP collaborative statistics for the run (client/releases.py)."""
    config = msg.content["config"]
    neighbours = msg.content["arrays"]["neighbours"].numpy()
    if neighbours.ndim != 2 or neighbours.shape[0] != merchant.model_config.n_items + 1:
        raise ValueError(f"statistics: a neighbour table of {merchant.model_config.n_items + 1} rows was expected, "
                         f"got shape {neighbours.shape}")
    if neighbours.min() < 0 or neighbours.max() > merchant.model_config.n_items:
        raise ValueError("statistics: the neighbour table names items outside the catalog")
    trainer = merchant.trainer
    try:
        released = release_statistics(trainer, str(config["run-key"]), neighbours.astype(np.int64),
                                      share=float(config["share"]), max_items=int(config["max-items"]),
                                      max_pairs=int(config["max-pairs"]),
                                      state_dir=trainer.ledger.path.parent if trainer.ledger else None,
                                      serve_sequences=merchant.split.seen_sequences(),
                                      selection_share=float(config.get("selection-share", 0.0)))
    except BudgetExceeded as exc:
        return Message(RecordDict({"metrics": MetricRecord({"declined": 1}),
                                   "decline": ConfigRecord({"reason": str(exc)})}), reply_to=msg)
    fit, serve = released.fit, released.serve
    content = RecordDict({
        "arrays": ArrayRecord({name: torch.from_numpy(values.astype(np.float32)) for name, values in (
            ("popularity", fit.popularity), ("pairs", fit.pairs),
            ("serve-popularity", serve.popularity), ("serve-pairs", serve.pairs))}),
        "metrics": MetricRecord({"declined": 0, "popularity-std": fit.popularity_std,
                                 "pair-std": fit.pair_std, "epsilon": _finite(trainer.epsilon_spent()),
                                 "partition-id": merchant.partition_id}),
    })
    return Message(content, reply_to=msg)


def select(msg: Message, merchant: Merchant) -> Message:
    """Score the server's candidate model (a bundle: the global model fused with the prior and the fit-count
    statistics) at every public fusion weight on this merchant's validation users, and release the summed figures
    through the Gaussian mechanism reserved for this run (common/priors/fusion_weights.py, client/releases.py)."""
    config = msg.content["config"]
    run_key = str(config["run-key"])
    weights = tuple(float(w) for w in config["weights"])
    if math.inf not in weights or len(set(weights)) != len(weights):
        raise ValueError("selection: the candidate weights must be distinct and include inf (the prior alone)")
    trainer = merchant.trainer
    if selection_noise(trainer, run_key) is None:
        return _declined(msg, merchant, f"run {run_key}: no selection release was reserved")
    files = {name: bytes(data) for name, data in msg.content["bundle"].items()}
    with tempfile.TemporaryDirectory(prefix="fedaug-candidate-") as folder:
        candidate = load_bundle(write_bundle_files(Path(folder) / "model", files), device=merchant.device).scorer
    if not isinstance(candidate, Fused) or candidate.prior is None:
        raise ValueError("selection: the candidate bundle is not a fused model")
    try:
        released, noise = release_selection(trainer, run_key,
                                            figures(candidate.model, candidate.prior, merchant.split, weights),
                                            state_dir=trainer.ledger.path.parent if trainer.ledger else None,
                                            weights=weights)
    except BudgetExceeded as exc:
        return _declined(msg, merchant, str(exc))
    content = RecordDict({"arrays": ArrayRecord({"selection": torch.from_numpy(released)}),
                          "metrics": MetricRecord({"declined": 0, "noise-multiplier": noise,
                                                   "epsilon": _finite(trainer.epsilon_spent()),
                                                   "partition-id": merchant.partition_id})})
    return Message(content, reply_to=msg)


def _declined(msg: Message, merchant: Merchant, reason: str) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"declined": 1, "partition-id": merchant.partition_id}),
                               "decline": ConfigRecord({"reason": reason})}), reply_to=msg)


def store_model(msg: Message, merchant: Merchant) -> Message:
    """Write the federation's final model bundle into this merchant's state directory (checked before it replaces
    an older one) and confirm with its content hash."""
    if merchant.state_dir is None:
        raise ValueError("model: this merchant has no state directory to keep the model in")
    files = {name: bytes(data) for name, data in msg.content["bundle"].items()}
    path = write_bundle_files(merchant.state_dir / "model", files)
    return Message(RecordDict({"bundle": ConfigRecord({"hash": bundle_hash(path)})}), reply_to=msg)


def _log_round(merchant: Merchant, server_round: int, run_key: str, *, declined: bool, epsilon: float,
               seconds: float, size: int, work: float, setup: float, stage: str = "train") -> None:
    """One line in the merchant's own round log (what its daemon prints), where it keeps state."""
    if merchant.state_dir is not None:
        append_round(merchant.state_dir, MerchantRound(round=server_round, run=run_key, declined=declined,
                                                       epsilon=None if math.isinf(epsilon) else float(epsilon),
                                                       seconds=round(seconds, 2), bytes_sent=size, stage=stage,
                                                       work_seconds=round(work, 3), setup_seconds=round(setup, 3)))


def _finite(epsilon: float) -> float:
    """MetricRecord carries finite floats; a non-private merchant reports ε as -1."""
    return -1.0 if math.isinf(epsilon) else float(epsilon)


app = client_app()

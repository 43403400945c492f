"""The merchant's Flower ClientApp (Message API): ``train``, ``evaluate``, the ``query.statistics`` release, the
``query.selection`` release (federated DP evaluation of the candidate model's fusion weights), ``query.model``,
the federation's final model, and the four stages of a secure sum (client/secure.py).

Every message is a typed record of common/protocol/messages.py. A merchant whose budget cannot afford the round
replies normally with a decline and no arrays, so the server can tell a decline from a crash (which arrives as a
Flower error reply). A private merchant sends only what its ledger accounts for: the DP update, the noised
statistics and its ε — no loss, user count or evaluation metrics (README, "What crosses the wire"). ``app`` is what
merchants run (deployment, `flwr run .`); ``client_app`` builds the same handlers over another merchant source,
with Flower mods around training — how `fedaug simulate` attaches its simulation-only behaviour (simulations/apps.py).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedaug.client import replay, secure
from fedaug.client.ledger import BudgetExceeded
from fedaug.client.merchant import Merchant, MerchantSource, merchant_for
from fedaug.client.releases import (
    candidate_figures,
    check_candidates,
    release_selection,
    release_statistics,
    selection_noise,
)
from fedaug.client.round_log import MerchantRound, append_round
from fedaug.common.flower_logging import tame_flower_logging
from fedaug.common.memory import single_malloc_arena
from fedaug.common.model.evaluate import evaluate as evaluate_split
from fedaug.common.model.evaluate import sasrec_scorer
from fedaug.common.model.metrics import METRIC_NAMES
from fedaug.common.protocol.messages import (
    MODEL,
    PROXIMAL_MU,
    SECURE_MASK,
    SECURE_SETUP,
    SECURE_SHARE,
    SECURE_UNMASK,
    SELECTION,
    STATISTICS,
    EvaluateInstruction,
    EvaluateReply,
    ModelDelivery,
    ModelReceipt,
    SelectionReply,
    SelectionRequest,
    StatisticsReply,
    StatisticsRequest,
    TrainFigures,
    TrainInstruction,
    TrainReply,
    Update,
    action,
)
from fedaug.common.recommend.bundle import bundle_hash, write_bundle_files
from fedaug.runtime.flower import Mod

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

    @app.query(action(STATISTICS))
    def _statistics(msg: Message, context: Context) -> Message:
        return statistics(msg, merchants(context))

    @app.query(action(SELECTION))
    def _selection(msg: Message, context: Context) -> Message:
        return select(msg, merchants(context))

    @app.query(action(MODEL))
    def _model(msg: Message, context: Context) -> Message:
        return store_model(msg, merchants(context))

    @app.query(action(SECURE_SETUP))
    def _secure_setup(msg: Message, context: Context) -> Message:
        return secure.setup(msg, context, merchants(context))

    @app.query(action(SECURE_SHARE))
    def _secure_share(msg: Message, context: Context) -> Message:
        return secure.share_keys(msg, context)

    @app.query(action(SECURE_MASK))
    def _secure_mask(msg: Message, context: Context) -> Message:
        return secure.mask(msg, context, merchants(context))

    @app.query(action(SECURE_UNMASK))
    def _secure_unmask(msg: Message, context: Context) -> Message:
        return secure.unmask(msg, context)

    return app


def train(msg: Message, context: Context, merchant: Merchant, setup_seconds: float = 0.0) -> Message:
    """Train one round from the global model in ``msg`` (or resend the update of a round asked again); the reply
    carries the update as the server's round config asks (``compression``: common/protocol/codec.py)."""
    started = time.monotonic()
    instruction = TrainInstruction.decode(msg.content)
    global_arrays = instruction.arrays
    model = merchant.model(global_arrays.to_torch_state_dict())
    server_round = instruction.server_round
    # The server's run key survives its restarts (Flower's run id does not): the ledger keys rounds by it.
    run_key = instruction.run_key if instruction.run_key is not None else str(context.run_id)
    replay_key = replay.digest(run_key, server_round, {k: a.data for k, a in global_arrays.items()},
                               {PROXIMAL_MU: instruction.proximal_mu})
    cached = merchant.replays.get(replay_key) if merchant.replays else None
    if cached is not None:  # this exact round was trained and sent before (the server lost it): resend it, for free
        arrays, figures = cached
        reply = TrainReply(epsilon=merchant.trainer.epsilon_spent(), partition=merchant.partition_id,
                           update=Update.of(arrays, global_arrays, instruction.compression),
                           figures=TrainFigures(**figures) if figures else None, replayed=True)
        return Message(reply.encode(), reply_to=msg)
    try:
        result = merchant.trainer.train_round(model, run_id=run_key, round_=server_round,
                                              proximal_mu=instruction.proximal_mu)
    except BudgetExceeded as exc:
        spent = merchant.trainer.epsilon_spent()
        _log_round(merchant, server_round, run_key, declined=True, epsilon=spent, seconds=0.0, size=0,
                   work=time.monotonic() - started, setup=setup_seconds)
        reply = TrainReply(epsilon=spent, partition=merchant.partition_id, decline=str(exc))
        return Message(reply.encode(), reply_to=msg)
    figures = None
    if not merchant.trainer.privacy.private:  # figures computed on the data, outside any accounting
        figures = TrainFigures(users=result.num_examples, train_loss=result.train_loss, delta=result.delta,
                               noise_multiplier=result.noise_multiplier, seconds=result.seconds,
                               augment_views=result.augment_views)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    if merchant.replays:
        merchant.replays.put(replay_key, weights, dataclasses.asdict(figures) if figures else None)
    update = Update.of(weights, global_arrays, instruction.compression)
    _log_round(merchant, server_round, run_key, declined=False, epsilon=result.epsilon, seconds=result.seconds,
               size=update.nbytes, work=time.monotonic() - started, setup=setup_seconds)
    reply = TrainReply(epsilon=result.epsilon, partition=merchant.partition_id, update=update, figures=figures)
    return Message(reply.encode(), reply_to=msg)


def evaluate(msg: Message, merchant: Merchant, setup_seconds: float = 0.0) -> Message:
    """Score the global model in ``msg`` on this merchant's held-out users (the stages asked for). A private
    merchant withholds them: metrics over its users are outside its accounted ε."""
    started = time.monotonic()
    if merchant.trainer.privacy.private:
        return Message(EvaluateReply(partition=merchant.partition_id, withheld=True).encode(), reply_to=msg)
    instruction = EvaluateInstruction.decode(msg.content)
    model = merchant.model(instruction.arrays.to_torch_state_dict())
    scorer = sasrec_scorer(model, merchant.device)
    figures, users = {}, 0
    for stage in instruction.stages:  # validation every round, test for the final model
        metrics = evaluate_split(scorer, merchant.split, stage)
        figures[stage] = {name: metrics[name] for name in METRIC_NAMES}
        users = metrics["users"]
    _log_round(merchant, instruction.server_round, instruction.run_key, declined=False, epsilon=math.inf,
               seconds=0.0, size=0, stage="evaluate", work=time.monotonic() - started, setup=setup_seconds)
    reply = EvaluateReply(partition=merchant.partition_id, users=users, figures=figures)
    return Message(reply.encode(), reply_to=msg)


def statistics(msg: Message, merchant: Merchant) -> Message:
    """Release this merchant's DP collaborative statistics for the run (client/releases.py)."""
    request = StatisticsRequest.decode(msg.content)
    check_candidates(request, merchant.model_config.n_items)
    trainer = merchant.trainer
    try:
        released = release_statistics(trainer, request.run_key, request.neighbours.astype(np.int64),
                                      share=request.share, max_items=request.max_items,
                                      max_pairs=request.max_pairs,
                                      state_dir=trainer.ledger.path.parent if trainer.ledger else None,
                                      serve_sequences=merchant.split.seen_sequences(),
                                      selection_share=request.selection_share)
    except BudgetExceeded as exc:
        return Message(StatisticsReply(decline=str(exc)).encode(), reply_to=msg)
    fit, serve = released.fit, released.serve
    reply = StatisticsReply(epsilon=trainer.epsilon_spent(), partition=merchant.partition_id,
                            fit_popularity=fit.popularity, fit_pairs=fit.pairs, serve_popularity=serve.popularity,
                            serve_pairs=serve.pairs, popularity_std=fit.popularity_std, pair_std=fit.pair_std)
    return Message(reply.encode(), reply_to=msg)


def select(msg: Message, merchant: Merchant) -> Message:
    """Score the server's candidate model (a bundle: the global model fused with the prior and the fit-count
    statistics) at every public fusion weight on this merchant's validation users, and release the summed figures
    through the Gaussian mechanism reserved for this run (common/priors/fusion_weights.py, client/releases.py)."""
    request = SelectionRequest.decode(msg.content)
    run_key, weights = request.run_key, request.weights
    trainer = merchant.trainer
    if selection_noise(trainer, run_key) is None:
        return _declined(msg, merchant, f"run {run_key}: no selection release was reserved")
    exact = candidate_figures(request, merchant.split, merchant.device)
    try:
        released, noise = release_selection(trainer, run_key, exact,
                                            state_dir=trainer.ledger.path.parent if trainer.ledger else None,
                                            weights=weights)
    except BudgetExceeded as exc:
        return _declined(msg, merchant, str(exc))
    reply = SelectionReply(epsilon=trainer.epsilon_spent(), partition=merchant.partition_id, figures=released,
                           noise_multiplier=noise)
    return Message(reply.encode(), reply_to=msg)


def _declined(msg: Message, merchant: Merchant, reason: str) -> Message:
    return Message(SelectionReply(partition=merchant.partition_id, decline=reason).encode(), reply_to=msg)


def store_model(msg: Message, merchant: Merchant) -> Message:
    """Write the federation's final model bundle into this merchant's state directory (checked before it replaces
    an older one) and confirm with its content hash."""
    if merchant.state_dir is None:
        raise ValueError("model: this merchant has no state directory to keep the model in")
    path = write_bundle_files(merchant.state_dir / "model", ModelDelivery.decode(msg.content).bundle)
    return Message(ModelReceipt(bundle_hash(path)).encode(), reply_to=msg)


def _log_round(merchant: Merchant, server_round: int, run_key: str, *, declined: bool, epsilon: float,
               seconds: float, size: int, work: float, setup: float, stage: str = "train") -> None:
    """One line in the merchant's own round log (what its daemon prints), where it keeps state."""
    if merchant.state_dir is not None:
        append_round(merchant.state_dir, MerchantRound(round=server_round, run=run_key, declined=declined,
                                                       epsilon=None if math.isinf(epsilon) else float(epsilon),
                                                       seconds=round(seconds, 2), bytes_sent=size, stage=stage,
                                                       work_seconds=round(work, 3), setup_seconds=round(setup, 3)))


app = client_app()

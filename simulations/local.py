"""One merchant training alone, with the client's own trainer: the local-only baseline a merchant tries first."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from client.spent import claim
from client.trainer import build_trainer
from common.config import MerchantRunConfig
from common.data import BehaviorData
from common.device import pick_device
from common.evaluate import evaluate, sasrec_scorer
from common.metrics import select
from common.records import OnRound, PrivacyRecord, RoundRecord, RunMetrics, write_metrics
from common.split import leave_one_out
from common.training import set_seed

from .bundles import MODEL, save_model
from .report import final_metrics


def run_local(config: MerchantRunConfig, out: Path | None, state_dir: Path, on_round: OnRound | None = None,
              on_step: Callable[[int, int], None] | None = None, data: BehaviorData | None = None,
              mode: str = "merchant", model_dir: Path | None = None, new_budget: bool | None = None) -> RunMetrics:
    """Train ``config.local.rounds`` rounds of local DP training on the whole data set (or ``data``, one
    merchant's part of it) as one merchant; the trained model's bundle goes to ``model_dir`` (default
    ``out/model`` when ``out`` is given).

    The privacy ledger in ``state_dir`` makes ε durable: running again with the same state-dir keeps composing.
    ``new_budget`` (a merchant's own data; None for a simulation's parts): whether a new ledger may start for data
    another ledger has already spent on (client.spent).
    """
    started = time.monotonic()
    device = pick_device(config.device)
    data = config.load_data() if data is None else data
    if new_budget is not None and config.privacy.private:
        claim(data.fingerprint(), state_dir, new_budget=new_budget)
    split = leave_one_out(data)
    trainer = build_trainer(config.recipe, split.train.sequences(), data.n_items, rounds=config.local.rounds,
                            seed=config.local.seed, state_dir=state_dir, device=device,
                            features=config.model.train_features(split))
    set_seed(config.local.seed)
    model = config.model.model(data)
    run_id = uuid.uuid4().hex
    history, result = [], None
    for round_ in range(1, config.local.rounds + 1):
        result = trainer.train_round(model, run_id, round_, on_step=on_step)
        valid = select(evaluate(sasrec_scorer(model, device), split, "valid"))
        history.append(RoundRecord(round=round_, train_loss=result.train_loss, epsilon_max=result.epsilon,
                                   epsilon_mean=result.epsilon, seconds=round(result.seconds, 2), valid=valid))
        if on_round:
            on_round(round_, config.local.rounds, history[-1])
    scorer = sasrec_scorer(model, device)
    metrics = final_metrics(mode, scorer, split, data, config, device,
                            config.local.rounds * config.local.local_epochs, started)
    private = trainer.privacy.private
    spent = trainer.epsilon_spent()
    metrics.privacy = PrivacyRecord(
        epsilon_budget=config.privacy.epsilon, epsilon_max=spent, epsilon_mean=spent, delta=trainer.delta,
        noise_multiplier=result.noise_multiplier, max_grad_norm=config.privacy.max_grad_norm if private else None,
        sample_rate=trainer.sample_rate, steps=trainer.steps_per_round * config.local.rounds,
        grad_sample_mode=config.privacy.grad_sample_mode if private else None)
    metrics.rounds = history
    metrics.augment_views = result.augment_views
    if trainer.ledger:
        trainer.ledger.close()
    if out is not None or model_dir is not None:  # first: metrics.json means a finished run
        save_model(model_dir or Path(out) / MODEL, scorer, data, metrics, config)
    if out is not None:
        write_metrics(out, metrics)
    return metrics

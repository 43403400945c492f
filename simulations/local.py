"""One merchant training alone, with the client's own trainer: the local-only baseline a merchant tries first."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from client.config import MerchantConfig
from client.ledger import PrivacyLedger
from client.trainer import LocalTrainer, RoundResult
from common.atomic import write_json_atomic
from common.data import BehaviorData
from common.device import pick_device
from common.evaluate import evaluate, sasrec_scorer
from common.split import leave_one_out
from common.training import set_seed

from .report import final_metrics, json_number


def run_local(config: MerchantConfig, out: Path | None, state_dir: Path,
              on_round: Callable[[int, RoundResult, dict], None] | None = None,
              on_step: Callable[[int, int], None] | None = None, data: BehaviorData | None = None) -> dict:
    """Train ``config.local.rounds`` rounds of local DP training on the whole data set (or ``data``, one
    merchant's part of it) as one merchant.

    The privacy ledger in ``state_dir`` makes ε durable: running again with the same state-dir keeps composing.
    """
    started = time.monotonic()
    device = pick_device(config.device)
    data = config.load_data() if data is None else data
    split = leave_one_out(data)
    privacy = config.privacy_settings()
    ledger = PrivacyLedger(state_dir) if privacy.private else None
    trainer = LocalTrainer(split.train.sequences(), data.n_items, privacy, config.local.settings(),
                           config.augment.settings(), ledger, device)
    set_seed(config.local.seed)
    model = config.model.model(data)
    run_id = uuid.uuid4().hex
    history, result = [], None
    for round_ in range(1, config.local.rounds + 1):
        result = trainer.train_round(model, run_id, round_, on_step=on_step)
        valid = evaluate(sasrec_scorer(model, device), split, "valid")
        history.append({"round": round_, "train_loss": result.train_loss, "epsilon": result.epsilon,
                        "seconds": result.seconds, "valid_ndcg@10": valid["ndcg@10"]})
        if on_round:
            on_round(round_, result, valid)
    metrics = final_metrics(sasrec_scorer(model, device), split, data, config, device,
                            config.local.rounds * config.local.local_epochs, started)
    metrics["privacy"] = {
        "epsilon": json_number(trainer.epsilon_spent()),
        "delta": trainer.delta,
        "noise_multiplier": result.noise_multiplier,
        "max_grad_norm": privacy.max_grad_norm if privacy.private else None,
        "sample_rate": trainer.sample_rate,
        "steps": trainer.steps_per_round * config.local.rounds,
        "grad_sample_mode": privacy.grad_sample_mode if privacy.private else None,
    }
    metrics["rounds"] = history
    metrics["augment_views"] = result.augment_views
    if ledger:
        ledger.close()
    if out is not None:
        write_json_atomic(Path(out) / "metrics.json", metrics)
    return metrics


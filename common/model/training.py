"""Non-private training of the sequential model with early stopping on validation NDCG@10.

The centralised baseline runs this on the whole data set; the merchant client's non-private rounds take the same
``train_step``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedaug.common.config import TrainSection
from fedaug.common.data.split import LeaveOneOut
from fedaug.common.model.batching import UserSamples
from fedaug.common.model.evaluate import evaluate, sasrec_scorer
from fedaug.common.model.sasrec import SASRec

SELECTION_METRIC = "ndcg@10"
MICRO_BATCH_TOKENS = 4096
"""Each batch runs as length-bucketed micro-batches of at most this many padded positions (about 2× faster on
Beauty than one batch padded to its longest user)."""


def train_step(model: SASRec, optimizer: torch.optim.Optimizer, samples: UserSamples, rows: np.ndarray, device,
               token_budget: int = MICRO_BATCH_TOKENS) -> float:
    """One optimiser step on users ``rows``: the mean next-item loss over all their targets, accumulated over
    length-bucketed micro-batches (the same gradient as one padded batch). Returns that loss."""
    optimizer.zero_grad(set_to_none=True)
    n_targets = max(int((samples.targets[rows] > 0).sum()), 1)
    contrastive = samples.contrastive
    total = 0.0
    for bucket in samples.micro_batches(rows, token_budget):
        inputs, targets = samples.batch(bucket, device)
        hidden = model.encode(inputs, samples.batch_side(bucket, device))
        loss = model.loss(inputs, targets, hidden=hidden, weights=samples.batch_weights(bucket, device)) * (
            int((targets > 0).sum()) / n_targets)
        if contrastive:
            infonce = model.contrastive_loss(hidden, samples.batch_view_lengths(bucket, device),
                                             contrastive.positives, contrastive.temperature)
            loss = loss + contrastive.weight * infonce.sum() / len(rows)
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


@dataclass
class FitResult:
    epochs: int
    best_epoch: int
    best_valid: dict
    history: list[dict] = field(default_factory=list)
    stopped_by: str = "epochs"


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def fit(
    model: SASRec,
    split: LeaveOneOut,
    settings: TrainSection,
    device: torch.device,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``split.train``; it ends holding the weights of its best validation epoch.

    ``on_step(epoch, step, steps_per_epoch, loss)`` and ``on_epoch(record)`` report progress to the caller.
    """
    set_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    cfg = model.cfg
    examples = UserSamples(split.train.sequences(), cfg.max_len, target_weights=cfg.target_weights,
                           features=split.train_features(cfg.context_columns) if cfg.side_features else None)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    deadline = time.monotonic() + 60 * settings.max_minutes if settings.max_minutes else float("inf")
    steps = max(1, -(-len(examples) // settings.batch_size))

    best_score, best_state, stale = -1.0, None, 0
    result = FitResult(epochs=0, best_epoch=0, best_valid={})
    for epoch in range(1, settings.epochs + 1):
        order = rng.permutation(len(examples))
        total, started = 0.0, time.monotonic()
        for step in range(steps):
            loss = train_step(model, optimizer, examples,
                              order[step * settings.batch_size : (step + 1) * settings.batch_size], device)
            total += loss
            if on_step:
                on_step(epoch, step + 1, steps, loss)
            if time.monotonic() > deadline:
                break
        result.epochs = epoch
        out_of_time = time.monotonic() > deadline
        if epoch % settings.eval_every and not out_of_time and epoch != settings.epochs:
            continue
        valid = evaluate(sasrec_scorer(model, device), split, "valid")
        record = {"epoch": epoch, "loss": total / (step + 1), "seconds": time.monotonic() - started, "valid": valid}
        result.history.append(record)
        score = valid[SELECTION_METRIC]
        stale = 0 if score > best_score * (1 + settings.min_improvement) else stale + 1
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
            result.best_epoch, result.best_valid = epoch, valid
        if on_epoch:
            on_epoch(record)
        if out_of_time:
            result.stopped_by = "time"
            break
        if stale >= settings.patience:
            result.stopped_by = "early-stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result

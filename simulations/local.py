"""One merchant training alone, with the client's own trainer: the local-only baseline a merchant tries first."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fedaug.client.ledger import ledger_status
from fedaug.client.releases import SELECTION, release_selection, release_statistics
from fedaug.client.spent import claim
from fedaug.client.trainer import build_trainer
from fedaug.common.config import FederationSection, MerchantRunConfig
from fedaug.common.data import BehaviorData
from fedaug.common.data.source import load_data
from fedaug.common.data.split import leave_one_out
from fedaug.common.model.build import build_model, train_features
from fedaug.common.model.device import pick_device
from fedaug.common.model.evaluate import evaluate, sasrec_scorer, tested
from fedaug.common.model.metrics import paired_gain, select
from fedaug.common.model.training import set_seed
from fedaug.common.priors import fusion_weights
from fedaug.common.priors.composite import compose, product_kind
from fedaug.common.priors.dp_counts import ReleaseRule, text_neighbours
from fedaug.common.priors.text_prior import TextPrior, public_text_prior
from fedaug.common.records import (
    FusionRecord,
    MerchantRecord,
    OnRound,
    PrivacyRecord,
    RoundRecord,
    RunMetrics,
    write_metrics,
)
from fedaug.simulations.bundles import MODEL, save_model
from fedaug.simulations.report import baselines, final_metrics, write_report

STATISTICS = FederationSection()
"""A merchant alone releases its statistics as a federation's merchants do (the [federation] defaults)."""


def evaluate_alone(trainer, run_id: str, trained, prior: TextPrior, released, neighbours, split,
                   state_dir: Path) -> dict:
    """A merchant alone chooses its model's weight as a federation does (common/priors/fusion_weights.py): the candidate
    (fit counts) scored at each public weight on its validation users, released through its reserved Gaussian
    mechanism, the choice made on the noised figures only."""
    candidate = ReleaseRule.from_section(STATISTICS).scorer(prior, released.fit, neighbours)
    vector, noise = release_selection(trainer, run_id, fusion_weights.figures(trained, candidate, split),
                                      weights=fusion_weights.WEIGHTS, state_dir=state_dir if trainer.ledger else None)
    return fusion_weights.choose(vector, noise * fusion_weights.sensitivity()) | {"merchants": 1}


def run_local(config: MerchantRunConfig, out: Path | None, state_dir: Path, on_round: OnRound | None = None,
              on_step: Callable[[int, int], None] | None = None, data: BehaviorData | None = None,
              mode: str = "merchant", model_dir: Path | None = None, new_budget: bool | None = None) -> RunMetrics:
    """Train ``config.local.rounds`` rounds of local DP training on the whole data set (or ``data``, one
    merchant's part of it) as one merchant; the trained model's bundle goes to ``model_dir`` (default
    ``out/model`` when ``out`` is given).

    The privacy ledger in ``state_dir`` makes ε durable: running again with the same state-dir keeps composing.
    ``new_budget`` (a merchant's own data; None for a simulation's parts): whether a new ledger may start for data
    another ledger has already spent on (fedaug.client.spent).
    """
    started = time.monotonic()
    device = pick_device(config.device)
    data = load_data(config.data, config.synthetic) if data is None else data
    if new_budget is not None and config.privacy.private:
        claim(data.fingerprint(), state_dir, new_budget=new_budget)
    split = leave_one_out(data)
    trainer = build_trainer(config.recipe, split.train.sequences(), data.n_items, rounds=config.local.rounds,
                            seed=config.local.seed, state_dir=state_dir, device=device,
                            features=train_features(config.model, split))
    set_seed(config.local.seed)
    model = build_model(config.model, data)
    run_id = uuid.uuid4().hex
    # The public prior and this merchant's own DP statistics, released (and ledgered) before training so DP-SGD
    # is calibrated for what is left: the same composition a federation hands out (fedaug.common.priors.composite).
    prior = public_text_prior(config.text, data, device) if config.text.fuse else None
    released, neighbours = None, None
    if prior is not None and STATISTICS.statistics is not False:
        neighbours = text_neighbours(prior.vectors.cpu().numpy(), STATISTICS.statistics_neighbours)
        released = release_statistics(trainer, run_id, neighbours, share=STATISTICS.statistics_share,
                                      max_items=STATISTICS.statistics_max_items,
                                      max_pairs=STATISTICS.statistics_max_pairs,
                                      state_dir=state_dir if trainer.ledger else None,
                                      serve_sequences=split.seen_sequences(),
                                      selection_share=STATISTICS.selection_share
                                      if STATISTICS.selection == "evaluated" else 0.0)
    history, result = [], None
    for round_ in range(1, config.local.rounds + 1):
        result = trainer.train_round(model, run_id, round_, on_step=on_step)
        valid = select(evaluate(sasrec_scorer(model, device), split, "valid"))
        history.append(RoundRecord(round=round_, train_loss=result.train_loss, epsilon_max=result.epsilon,
                                   epsilon_mean=result.epsilon, seconds=round(result.seconds, 2), valid=valid))
        if on_round:
            on_round(round_, config.local.rounds, history[-1])
    trained = sasrec_scorer(model, device)
    evaluation = None
    if released is not None and STATISTICS.selection == "evaluated":  # the same DP evaluation, alone
        evaluation = evaluate_alone(trainer, run_id, trained, prior, released, neighbours, split, state_dir)
    scorer, parts = compose(trained, prior, released.serve if released else None, neighbours,
                            ReleaseRule.from_section(STATISTICS), evaluation=evaluation, who="this merchant's")
    metrics = final_metrics(mode, scorer, split, data, config, device,
                            config.local.rounds * config.local.local_epochs, started)
    metrics.selection, metrics.parts, metrics.product = "private", parts, product_kind(scorer)
    metrics.run_key = run_id
    # beside it, on the same test users: what the merchant has without training
    references = baselines(split, prior)
    metrics.baselines, metrics.baselines_cold = references.test, references.cold
    metrics.baselines_valid = references.valid
    if prior is not None:
        alone = tested(trained, split)
        metrics.fusion = FusionRecord(weight=getattr(scorer, "weight", 1.0), tried=[], model_test=alone.all,
                                      model_valid=history[-1].valid if history else None,
                                      model_test_cold=alone.cold)
        ndcg = tested(scorer, split).per_user["ndcg@10"]
        metrics.gain_over_text = {"final": {"round": config.local.rounds, "test_ndcg@10": float(ndcg.mean()),
                                            "gain_over_text_prior": paired_gain(
                                                ndcg, references.prior.per_user["ndcg@10"])}}
    private = trainer.privacy.private
    spent = trainer.epsilon_spent()
    metrics.privacy = PrivacyRecord(
        epsilon_budget=config.privacy.epsilon, epsilon_max=spent, epsilon_mean=spent, delta=trainer.delta,
        noise_multiplier=result.noise_multiplier, max_grad_norm=config.privacy.max_grad_norm if private else None,
        sample_rate=trainer.sample_rate, steps=trainer.steps_per_round * config.local.rounds,
        grad_sample_mode=config.privacy.grad_sample_mode if private else None)
    metrics.rounds = history
    metrics.augment_views = result.augment_views
    if private:  # its ε release by release, as a federation's merchants are shown
        metrics.merchants = [MerchantRecord(
            merchant=-1, name="the pooled trainer" if mode == "central" else "this merchant", users=data.n_users,
            epsilon=spent, epsilon_by_round={str(h.round): h.epsilon_max for h in history},
            epsilon_releases=releases_before_training(state_dir, run_id))]
    if trainer.ledger:
        trainer.ledger.close()
    if out is not None or model_dir is not None:  # first: metrics.json means a finished run
        save_model(model_dir or Path(out) / MODEL, scorer, data, metrics, config, parts=parts)
    if out is not None:
        write_outputs(metrics, out)
    return metrics


def releases_before_training(state_dir: Path, run_key: str | None) -> dict[str, float]:
    """A merchant's ε after each of run ``run_key``'s releases before DP-SGD (the selection's reservation, the
    statistics), in ledger order, from its ledger in ``state_dir`` ({} without one)."""
    status = ledger_status(state_dir) if run_key else None
    if status is None:
        return {}
    return {run.run_id.rsplit("/", 1)[1]: run.epsilon_after for run in status.runs
            if run.run_id in (f"{run_key}/{SELECTION}", f"{run_key}/statistics")}


def write_outputs(metrics: RunMetrics, out: Path) -> None:
    """A finished run's files: its plots and report.md, then metrics.json, the mark of a finished run."""
    from fedaug.simulations.plots import write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(metrics, out, write_plots(metrics, out))
    write_metrics(out, metrics)

"""The centralised, non-private baseline: the reference every federated and private number is compared to."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fedaug.common.config import BaselineConfig
from fedaug.common.data.source import load_data
from fedaug.common.data.split import leave_one_out
from fedaug.common.model.build import build_model
from fedaug.common.model.device import pick_device
from fedaug.common.model.evaluate import evaluate, sasrec_scorer
from fedaug.common.model.metrics import select
from fedaug.common.model.training import fit, set_seed
from fedaug.common.priors.fusion import fit_fusion
from fedaug.common.priors.popularity import Popularity
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import TextPrior, fit_text_prior
from fedaug.common.records import FusionRecord, RunMetrics, write_metrics
from fedaug.simulations.bundles import MODEL, save_model
from fedaug.simulations.report import final_metrics, tested


def run_baseline(config: BaselineConfig, out: Path | None = None, on_step: Callable | None = None,
                 on_epoch: Callable | None = None) -> RunMetrics:
    """Train and evaluate the configured model on the whole data set; write ``out/metrics.json`` and the model
    bundle ``out/model`` when given.

    The output directory is only created once the run has succeeded, so a failed run leaves nothing behind.
    """
    started = time.monotonic()
    device = pick_device(config.device)
    data = load_data(config.data, config.synthetic)
    split = leave_one_out(data)
    if config.model.kind == "pop":
        scorer = Popularity(split.train)
        metrics = final_metrics("baseline", scorer, split, data, config, device, 0, started)
    elif config.model.kind == "text":
        scorer, tried = text_prior(config, data, split, device)
        metrics = final_metrics("baseline", scorer, split, data, config, device, 0, started)
        metrics.history = tried
    else:
        set_seed(config.train.seed)
        model = build_model(config.model, data)
        result = fit(model, split, config.train, device, on_step=on_step, on_epoch=on_epoch)
        scorer, fusion = sasrec_scorer(model, device), None
        if data.catalog.texts and config.text.fuse:  # the public prior beside the learned model, if it helps
            prior, _ = text_prior(config, data, split, device)
            fused, tried, _ = fit_fusion(scorer, prior, split)
            alone = tested(scorer, split)
            fusion = FusionRecord(weight=fused.weight, tried=tried, model_test=alone.all, model_test_cold=alone.cold,
                                  model_valid=select(evaluate(scorer, split, "valid")))
            scorer = fused
        metrics = final_metrics("baseline", scorer, split, data, config, device, result.epochs, started)
        metrics.fusion = fusion
        metrics.best_epoch, metrics.stopped_by = result.best_epoch, result.stopped_by
        metrics.history = [{"epoch": r["epoch"], "loss": r["loss"], "valid_ndcg@10": r["valid"]["ndcg@10"]}
                           for r in result.history]
    if out is not None:
        save_model(Path(out) / MODEL, scorer, data, metrics, config)  # first: metrics.json means a finished run
        write_metrics(out, metrics)
    return metrics


def text_prior(config, data, split, device, progress: bool = True) -> tuple[TextPrior, list[dict]]:
    """The public text prior of ``config``'s [text] table, its history weighting chosen on validation."""
    text = config.text
    return fit_text_prior(catalog_vectors(text, data, device, progress), split, decay=text.decay, window=text.window,
                          device=device)

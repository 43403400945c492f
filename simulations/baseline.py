"""The centralised, non-private baseline: the reference every federated and private number is compared to."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from common.atomic import write_json_atomic
from common.config import BaselineConfig
from common.device import pick_device
from common.evaluate import sasrec_scorer
from common.popularity import Popularity
from common.split import leave_one_out
from common.training import fit, set_seed

from .report import final_metrics


def run_baseline(config: BaselineConfig, out: Path | None = None, on_step: Callable | None = None,
                 on_epoch: Callable | None = None) -> dict:
    """Train and evaluate the configured model on the whole data set; write ``out/metrics.json`` when given.

    The output directory is only created once the run has succeeded, so a failed run leaves nothing behind.
    """
    started = time.monotonic()
    device = pick_device(config.device)
    data = config.load_data()
    split = leave_one_out(data)
    if config.model.kind == "pop":
        scorer, epochs, extra = Popularity(split.train), 0, {}
    else:
        set_seed(config.train.seed)
        model = config.model.model(data)
        result = fit(model, split, config.train.settings(), device, on_step=on_step, on_epoch=on_epoch)
        scorer, epochs = sasrec_scorer(model, device), result.epochs
        extra = {"best_epoch": result.best_epoch, "stopped_by": result.stopped_by,
                 "history": [{"epoch": r["epoch"], "loss": r["loss"], "valid_ndcg@10": r["valid"]["ndcg@10"]}
                             for r in result.history]}
    metrics = final_metrics(scorer, split, data, config, device, epochs, started) | extra
    if out is not None:
        write_json_atomic(Path(out) / "metrics.json", metrics)
    return metrics

"""The aggregator's Flower ServerApp (Message API). The same app runs in `fedaug simulate`, `flwr run .` and the
deployed SuperLink; everything it does is configured by Flower's run_config (see server.config)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.config import MerchantConfig, merchant_config_from
from common.data import BehaviorData
from common.device import pick_device
from common.errors import ConfigError
from common.evaluate import evaluate, sasrec_scorer
from common.memory import single_malloc_arena
from common.model import SASRec
from common.split import leave_one_out

from .config import federation_from
from .federation import Evaluator, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    single_malloc_arena()
    settings = federation_from(context.run_config)
    config = merchant_config_from(context.run_config)
    # Deployment: the aggregator holds only the public catalog; simulation: the whole data set (so it may also
    # score the global model centrally), numbered by a catalog when one is given.
    deployed = config.data.catalog is not None and config.data.path is None
    if deployed and settings.central_eval:
        raise ConfigError("run_config central-eval: needs the data set, which a deployed aggregator does not have")
    data = config.load_catalog() if deployed else config.load_data()
    model = initial_model(config, data, settings.seed)
    initial = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    evaluator = central_evaluator(config, data, model) if settings.central_eval else None
    run_federation(grid, settings, initial, evaluator)


def initial_model(config: MerchantConfig, data: BehaviorData, seed: int) -> SASRec:
    """The global model before round 1: the merchants' architecture over the catalog, seeded."""
    torch.manual_seed(seed)
    return config.model.model(data)


def central_evaluator(config: MerchantConfig, data: BehaviorData, model: SASRec) -> Evaluator:
    """Simulation only: score global arrays on every merchant's held-out users at once (the server has the data
    only because it is a simulation; the union of the merchants' users is the whole data set)."""
    split = leave_one_out(data)
    device = pick_device(config.device)
    model = model.to(device)

    def evaluate_global(arrays: dict[str, np.ndarray], stages: tuple[str, ...]) -> dict:
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        scorer = sasrec_scorer(model, device)
        return {stage: evaluate(scorer, split, stage) for stage in stages}

    return evaluate_global

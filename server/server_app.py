"""The aggregator's Flower ServerApp (Message API). The same app runs in `flwr run .`, the deployed SuperLink and
`fedaug simulate` (which attaches its central evaluation through ``server_app``); everything it does is configured
by Flower's run_config, validated as a fedaug.common.config.FederationConfig."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedaug.common.config import FederationConfig, from_run_config
from fedaug.common.data import BehaviorData
from fedaug.common.data.source import load_catalog_data, load_data
from fedaug.common.flower_logging import tame_flower_logging
from fedaug.common.memory import single_malloc_arena
from fedaug.common.model.build import build_model
from fedaug.common.model.device import pick_device
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.dp_counts import text_neighbours
from fedaug.common.priors.text import catalog_vectors
from fedaug.common.priors.text_prior import TextPrior, public_text_prior
from fedaug.server import checkpoint
from fedaug.server.distribute import distribute_model, final_bundle
from fedaug.server.federation import Evaluator, WorkReader, run_federation
from fedaug.server.selection import evaluate_candidates

EvaluatorFactory = Callable[[FederationConfig, BehaviorData, SASRec], Evaluator]
"""Builds a central evaluation from the run's config, data and initial model (simulations only)."""
WorkReaderFactory = Callable[[FederationConfig], WorkReader]
"""Builds the reader of the merchants' own work per round from the run's config (simulations only)."""


def server_app(schema: type[FederationConfig] = FederationConfig,
               central_evaluation: EvaluatorFactory | None = None,
               merchant_work: WorkReaderFactory | None = None) -> ServerApp:
    """A ServerApp validating run_config with ``schema``; ``central_evaluation`` scores the global model with
    the data set itself, and ``merchant_work`` reads the merchants' own time per round, which only a simulation's
    server can do (it hosts them)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        single_malloc_arena()
        tame_flower_logging()
        config = from_run_config(context.run_config, schema)
        # Deployment: the aggregator holds only the public catalog; otherwise (`flwr run .`, simulations) the
        # run's data set, numbered by a catalog when one is given, is there to build the model from.
        deployed = config.data.catalog is not None and config.data.path is None
        data = load_catalog_data(config.data) if deployed else load_data(config.data, config.synthetic)
        model = initial_model(config, data)
        initial = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        # The public parts of the model every merchant receives, built before round 1: a catalog without texts or
        # an encoder that does not load stops the run here, never after it as a model-alone bundle.
        prior = public_prior(config, data)
        neighbours = statistics_candidates(config, data, prior)
        evaluator = central_evaluation(config, data, model) if central_evaluation and not deployed else None
        state = run_federation(grid, config.federation, initial, evaluator, neighbours=neighbours,
                               merchant_work=merchant_work(config) if merchant_work and not deployed else None,
                               flower_run=context.run_id)
        if state.finished(config.federation.rounds):  # every merchant gets the final model
            settings = config.federation
            if (prior is not None and state.statistics is not None and settings.selection == "evaluated"
                    and state.selection is None):  # the model's weight: the merchants' federated DP evaluation
                candidate = final_bundle(model, state, data.catalog, config, prior=prior, neighbours=neighbours,
                                         candidate=True)
                state.selection = evaluate_candidates(grid, settings, state.run_key, candidate)
                checkpoint.save(settings.state_dir, state)
            files = final_bundle(model, state, data.catalog, config, prior=prior, neighbours=neighbours)
            distribute_model(grid, settings, files)

    return app


def public_prior(config: FederationConfig, data: BehaviorData) -> TextPrior | None:
    """The public text prior over the catalog's item texts, with its public history weighting (no validation
    chooses it), or None where the catalog has no texts, or [text] fuse and [federation] statistics are off."""
    statistics = config.federation.statistics
    if (not data.catalog.texts and statistics is not True) or (not config.text.fuse and statistics is False):
        return None
    return public_text_prior(config.text, data, pick_device(config.device), required=statistics is True)


def statistics_candidates(config: FederationConfig, data: BehaviorData, prior: TextPrior | None = None
                          ) -> np.ndarray | None:
    """The public candidate table for the merchants' DP statistics (each item's text neighbours), or None when the
    run releases none ([federation] statistics; "auto": where the catalog has item texts)."""
    settings = config.federation
    if settings.statistics is False or (settings.statistics == "auto" and not data.catalog.texts):
        return None
    vectors = (prior.vectors.cpu().numpy() if prior is not None
               else catalog_vectors(config.text, data, pick_device(config.device), progress=False))
    return text_neighbours(vectors, settings.statistics_neighbours)


def initial_model(config: FederationConfig, data: BehaviorData) -> SASRec:
    """The global model before round 1: the merchants' architecture over the catalog, seeded."""
    torch.manual_seed(config.federation.seed)
    return build_model(config.model, data)


app = server_app()

"""A merchant's one DP release of collaborative statistics (common/priors/dp_counts.py) for a federation.

Its users' bounded popularity and candidate-transition counts, over their training histories (``fit``) and over
the histories test sees (``serve``: each user's validation item included), noised by the Gaussian mechanism at a
share of the merchant's ε budget (the four releases together). The release is committed to the ledger (under
``RUN/statistics``, so the run's DP-SGD noise is calibrated for what is left) and saved before it leaves; a
repeated request for the same run resends the saved release instead of spending ε again.

Under secure aggregation (client/secure.py) the same counts go out masked in a secure sum instead
(``statistics_variances`` at its setup, ``secure_statistics`` at its mask stage): with integer Skellam noise, a share
of one pooled noise (``[privacy] noise = "pooled"``) or all of it, ledgered as one Skellam release. So can the
run's selection figures (``selection_variance``, ``secure_selection``), whose noise was reserved before round 1.
"""

from __future__ import annotations

import io
import math
import tempfile
from pathlib import Path

import numpy as np

from fedaug.client.ledger import (
    RELEASE_MAX_NOISE_MULTIPLIER,
    SKELLAM,
    BudgetExceeded,
    calibrate_noise,
    epsilon_of,
)
from fedaug.client.trainer import LocalTrainer
from fedaug.common.atomic import write_bytes_atomic
from fedaug.common.priors import fusion_weights
from fedaug.common.priors.dp_counts import (
    RELEASES,
    Counts,
    Statistics,
    bounded_counts,
    epsilon_history,
    noised,
    skellam_noised,
    vector_of,
)
from fedaug.common.priors.fusion import Fused
from fedaug.common.privacy.skellam import equivalent_noise_multiplier, share_variance, skellam_noise, variance_for
from fedaug.common.protocol.messages import SelectionRequest, StatisticsRequest
from fedaug.common.recommend.bundle import load_bundle, write_bundle_files


def release_statistics(trainer: LocalTrainer, run_key: str, neighbours: np.ndarray, *, share: float,
                       max_items: int, max_pairs: int, state_dir: Path | None,
                       serve_sequences: list[np.ndarray], selection_share: float = 0.0) -> Statistics:
    """The noised counts this merchant releases for run ``run_key`` (the saved ones if it released before).

    Args:
        trainer: the merchant's trainer: its users' training sequences, ledger, δ and budget.
        run_key: the federation's run key (ledger entries and the saved release are keyed by it).
        neighbours: the public candidate table ``[n_items + 1, k]`` the server sent.
        share: fraction of the budget left before this run that the release may spend.
        max_items, max_pairs: each user's contribution bounds (the sensitivity).
        state_dir: where the release is kept (None: a non-private merchant keeps nothing).
        serve_sequences: the users' histories as test sees them (LeaveOneOut.seen_sequences).
        selection_share: fraction of the budget left before this run that the run's federated DP evaluation
            (common/priors/fusion_weights.py) may spend; it is reserved here, first — ledgered now, released once
            after the last round — so DP-SGD is calibrated for what is left (0: the run evaluates nothing).
    """
    path = Path(state_dir) / f"statistics-{run_key}.npz" if state_dir is not None else None
    if path is not None and path.is_file():
        return _saved(path)
    fit = bounded_counts(trainer.sequences, neighbours, max_items=max_items, max_pairs=max_pairs)
    serve = bounded_counts(serve_sequences, neighbours, max_items=max_items, max_pairs=max_pairs)
    if not trainer.privacy.private:
        return Statistics(fit, serve)
    ledger, delta, budget = trainer.ledger, trainer.delta, trainer.privacy.epsilon
    if selection_share > 0:
        reserve_selection(trainer, run_key, selection_share)
    before = ledger.history()
    spent = epsilon_of(before, delta, ledger.rdp_only)
    target = spent + share * (budget - spent)
    noise = calibrate_noise(before, 1.0, RELEASES, delta, target, rdp_only=ledger.rdp_only)
    # Fresh OS entropy, never the run's seed: whoever knows a seeded noise can subtract it.
    rng = np.random.default_rng()
    released = Statistics(*(noised(c, noise_multiplier=noise, max_items=max_items, max_pairs=max_pairs, rng=rng)
                            for c in (fit, serve)))
    # The ledger entry first: a crash after it loses the release, never the accounting.
    for mechanism in epsilon_history(noise):
        ledger.record(f"{run_key}/statistics", 0, *mechanism, delta, budget)
    buffer = io.BytesIO()
    np.savez(buffer, popularity=released.fit.popularity, pairs=released.fit.pairs,
             serve_popularity=released.serve.popularity, serve_pairs=released.serve.pairs,
             popularity_std=released.fit.popularity_std, pair_std=released.fit.pair_std)
    write_bytes_atomic(path, buffer.getvalue())
    return released


def check_candidates(request: StatisticsRequest, n_items: int) -> None:
    """A statistics request's candidate table fits this merchant's catalog of ``n_items`` (ValueError: which way)."""
    neighbours = request.neighbours
    if neighbours.ndim != 2 or neighbours.shape[0] != n_items + 1:
        raise ValueError(f"statistics: a neighbour table of {n_items + 1} rows was expected, got shape "
                         f"{neighbours.shape}")
    if neighbours.min() < 0 or neighbours.max() > n_items:
        raise ValueError("statistics: the neighbour table names items outside the catalog")


def statistics_variances(trainer: LocalTrainer, run_key: str, request: StatisticsRequest) -> tuple[float, float]:
    """Setup of a secure statistics release: the Skellam variances (popularity, pairs) this merchant's ledger needs
    the *sum* to carry for the release to spend ``request.share`` of the budget left (0, 0: non-private). Reserves
    the run's selection release first, as ``release_statistics`` does; BudgetExceeded where the budget cannot
    afford the release, or where this run's statistics were released before (see ``secure_statistics``)."""
    if not trainer.privacy.private:
        return 0.0, 0.0
    _released_before(trainer, run_key)
    if request.selection_share > 0:
        reserve_selection(trainer, run_key, request.selection_share)
    ledger, delta, budget = trainer.ledger, trainer.delta, trainer.privacy.epsilon
    before = ledger.history()
    spent = epsilon_of(before, delta, rdp_only=True)
    # The pooled release is accounted by RDP alone (fedaug.common.privacy): so is what it is calibrated against.
    noise = calibrate_noise(before, 1.0, RELEASES, delta, spent + request.share * (budget - spent), rdp_only=True)
    return (variance_for(noise, l1=request.max_items, l2=math.sqrt(request.max_items)),
            variance_for(noise, l1=request.max_pairs, l2=math.sqrt(request.max_pairs)))


def secure_statistics(trainer: LocalTrainer, request: StatisticsRequest, serve_sequences: list[np.ndarray], *,
                      variances: tuple[float, float], merchants: int, tolerated: int
                      ) -> tuple[np.ndarray, tuple[float, float]]:
    """The integer vector this merchant masks in a secure statistics sum (``vector_of``) and the noise variances
    (popularity, pairs) it added.

    ``variances`` is what the sum must carry (the largest any merchant's ledger asked for at setup). A private
    merchant with pooled noise adds its share (``share_variance``: the M − T honest survivors carry it all), one
    with local noise adds all of it; either ledgers the release as the Skellam of ``variances`` (its RDP
    equivalent), before the vector leaves. A merchant takes part in one secure statistics sum per run: a second,
    with the same counts and other survivors, could tell one merchant's vector from the difference."""
    neighbours = request.neighbours.astype(np.int64)
    fit = bounded_counts(trainer.sequences, neighbours, max_items=request.max_items, max_pairs=request.max_pairs)
    serve = bounded_counts(serve_sequences, neighbours, max_items=request.max_items, max_pairs=request.max_pairs)
    if not trainer.privacy.private:
        return vector_of(Statistics(fit, serve)), (0.0, 0.0)
    _released_before(trainer, request.run_key)
    sensitivities = ((request.max_items, math.sqrt(request.max_items)),
                     (request.max_pairs, math.sqrt(request.max_pairs)))
    if min(variances) <= 0:
        raise BudgetExceeded(f"run {request.run_key}: the secure sum carries no noise; a private merchant sends no "
                             "exact counts")
    noise = min(equivalent_noise_multiplier(variance=v, l1=l1, l2=l2)
                for v, (l1, l2) in zip(variances, sensitivities, strict=True))
    shares = tuple(share_variance(v, merchants=merchants, tolerated=tolerated)
                   if trainer.privacy.noise == "pooled" else float(v) for v in variances)
    ledger = trainer.ledger
    for mechanism in epsilon_history(noise):  # first: a crash after it loses the release, never the accounting
        ledger.record(f"{request.run_key}/statistics", 0, *mechanism, trainer.delta, trainer.privacy.epsilon,
                      mechanism=SKELLAM)
    rng = np.random.default_rng()  # fresh OS entropy, never the run's seed
    noised_ = Statistics(*(skellam_noised(c, popularity_variance=shares[0], pair_variance=shares[1], rng=rng)
                           for c in (fit, serve)))
    return vector_of(noised_), shares


def _released_before(trainer: LocalTrainer, run_key: str) -> None:
    if any(e.run_id == f"{run_key}/statistics" for e in trainer.ledger.entries()):
        raise BudgetExceeded(f"run {run_key}: this merchant released its statistics already; it takes part in one "
                             "secure statistics sum per run")


def _saved(path: Path) -> Statistics:
    with np.load(path) as saved:
        stds = float(saved["popularity_std"]), float(saved["pair_std"])
        fit = Counts(saved["popularity"], saved["pairs"], *stds)
        # A release saved before serve counts existed: its fit counts serve too (no second release, no more ε).
        serve = Counts(saved["serve_popularity"], saved["serve_pairs"], *stds) if "serve_pairs" in saved else fit
    return Statistics(fit, serve)


SELECTION = "selection"
"""The ledger's name (``RUN/selection``) for a run's federated DP evaluation."""


def reserve_selection(trainer: LocalTrainer, run_key: str, share: float) -> float:
    """Ledger the run's one selection release now, at ``share`` of the budget left, and return its noise
    multiplier (one Gaussian release at sampling rate 1); a run that reserved before keeps its reservation."""
    reserved = selection_noise(trainer, run_key)
    if reserved is not None:
        return reserved
    ledger, delta, budget = trainer.ledger, trainer.delta, trainer.privacy.epsilon
    before = ledger.history()
    spent = epsilon_of(before, delta, ledger.rdp_only)
    noise = calibrate_noise(before, 1.0, 1, delta, spent + share * (budget - spent),
                            limit=RELEASE_MAX_NOISE_MULTIPLIER, rdp_only=ledger.rdp_only)
    ledger.record(f"{run_key}/{SELECTION}", 0, noise, 1.0, 1, delta, budget)
    return noise


def selection_noise(trainer: LocalTrainer, run_key: str) -> float | None:
    """The noise multiplier reserved for run ``run_key``'s selection release (0: a non-private merchant; None:
    none reserved)."""
    if not trainer.privacy.private:
        return 0.0
    entries = [e for e in trainer.ledger.entries() if e.run_id == f"{run_key}/{SELECTION}"]
    return entries[0].noise_multiplier if entries else None


def candidate_figures(request: SelectionRequest, split, device) -> np.ndarray:
    """This merchant's exact selection vector: the request's candidate bundle (a fused model) scored at each of its
    weights on ``split``'s validation users (common/priors/fusion_weights.py)."""
    weights = request.weights
    if math.inf not in weights or len(set(weights)) != len(weights):
        raise ValueError("selection: the candidate weights must be distinct and include inf (the prior alone)")
    with tempfile.TemporaryDirectory(prefix="fedaug-candidate-") as folder:
        candidate = load_bundle(write_bundle_files(Path(folder) / "model", request.bundle), device=device).scorer
    if not isinstance(candidate, Fused) or candidate.prior is None:
        raise ValueError("selection: the candidate bundle is not a fused model")
    return fusion_weights.figures(candidate.model, candidate.prior, split, weights)


def selection_variance(trainer: LocalTrainer, request: SelectionRequest) -> float:
    """Setup of a secure selection release: the Skellam variance (in ``fusion_weights.quantised`` units) the sum
    must carry for the noise this run reserved (``reserve_selection``) to hold; 0: non-private. BudgetExceeded
    where the run reserved none, or where this merchant released its figures for the run already."""
    noise = selection_noise(trainer, request.run_key)
    if noise is None:
        raise BudgetExceeded(f"run {request.run_key}: no selection release was reserved before training")
    if noise == 0:
        return 0.0
    if any(path.is_file() for path in _selection_paths(trainer, request.run_key)):
        raise BudgetExceeded(f"run {request.run_key}: this merchant released its selection figures already")
    if not trainer.ledger.rdp_only:  # (its pooled statistics put it there: a sum without them must not be Skellam)
        raise BudgetExceeded(f"run {request.run_key}: the selection was reserved as a Gaussian release, accounted by "
                             "PRV; a Skellam release needs the ledger on RDP (a pooled statistics release first)")
    l1, l2 = fusion_weights.integer_sensitivities(request.weights)
    return variance_for(noise, l1=l1, l2=l2)


def secure_selection(trainer: LocalTrainer, request: SelectionRequest, exact: np.ndarray, *, variance: float,
                     merchants: int, tolerated: int) -> tuple[np.ndarray, float]:
    """The integer vector this merchant masks in a secure selection sum and the noise variance it added: its
    ``quantised`` figures plus its share of the pooled Skellam noise (or all of it, under local noise). The noise
    was ledgered when the run reserved it; the release is kept, so that the run's figures leave this merchant
    once (a second sum with other survivors could tell its vector from the difference)."""
    vector = fusion_weights.quantised(exact)
    if not trainer.privacy.private:
        return vector, 0.0
    if selection_variance(trainer, request) > variance * (1 + 1e-9):
        raise BudgetExceeded(f"run {request.run_key}: the secure sum carries less noise than this merchant's "
                             "reserved selection release needs")
    share = (share_variance(variance, merchants=merchants, tolerated=tolerated) if trainer.privacy.noise == "pooled"
             else variance)
    released = vector + skellam_noise(vector.shape, variance=share, rng=np.random.default_rng())
    buffer = io.BytesIO()
    np.save(buffer, released)
    write_bytes_atomic(_selection_paths(trainer, request.run_key)[1], buffer.getvalue())
    return released, share


def _selection_paths(trainer: LocalTrainer, run_key: str) -> tuple[Path, Path]:
    """Where a run's selection release is kept: sent alone (resent on a repeated request), or masked in a secure
    sum (never sent again: it carries only a share of the noise)."""
    folder = trainer.ledger.path.parent
    return folder / f"{SELECTION}-{run_key}.npy", folder / f"{SELECTION}-{run_key}-secure.npy"


def release_selection(trainer: LocalTrainer, run_key: str, exact: np.ndarray, *, state_dir: Path | None,
                      weights: tuple[float, ...]) -> tuple[np.ndarray, float]:
    """The noised selection vector this merchant releases for run ``run_key`` (the saved one if it released
    before) and its noise multiplier; BudgetExceeded where the run reserved none."""
    noise = selection_noise(trainer, run_key)
    if noise is None:
        raise BudgetExceeded(f"run {run_key}: no selection release was reserved before training (its statistics "
                             "request carried no selection share)")
    path = Path(state_dir) / f"{SELECTION}-{run_key}.npy" if state_dir is not None else None
    if trainer.privacy.private and _selection_paths(trainer, run_key)[1].is_file():
        raise BudgetExceeded(f"run {run_key}: this merchant released its selection figures in a secure sum already")
    if path is not None and path.is_file():
        return np.load(path), noise
    released = fusion_weights.noised(exact, noise, weights)
    if path is not None:
        buffer = io.BytesIO()
        np.save(buffer, released)
        write_bytes_atomic(path, buffer.getvalue())
    return released, noise

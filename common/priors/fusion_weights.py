"""Federated DP evaluation: how much the trained model may weigh in the model every merchant receives.

The server proposes a small public grid of fusion weights (``WEIGHTS``; ∞ = the prior with the statistics alone,
the simpler choice). Each merchant scores every candidate on its own validation users and releases one vector
(``coordinates``): per candidate the sum of its users' NDCG@10, per finite candidate the sum of the squared
per-user differences to ∞ (so the server can judge the paired gain's spread), and its user count. One user moves
every coordinate by at most 1, so the vector's L2 sensitivity is sqrt(its length); the Gaussian mechanism adds
``noise_multiplier × sensitivity`` to each coordinate, accounted in the merchant's ledger as one release at
sampling rate 1. The server sums the vectors (post-processing) and keeps a finite weight only where its paired
gain over ∞ is above zero beyond both the users' spread and the known noise (``choose``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

WEIGHTS = (0.5, 2.0, 8.0, math.inf)
"""The public candidates: the trained model's weight beside the prior (∞: not used)."""
CONFIDENCE = 0.95


def size(weights: tuple[float, ...] = WEIGHTS) -> int:
    """Coordinates of one release: a sum per candidate, a squared-difference sum per finite one, the user count."""
    finite = sum(1 for w in weights if math.isfinite(w))
    return len(weights) + finite + 1


def sensitivity(weights: tuple[float, ...] = WEIGHTS) -> float:
    return math.sqrt(size(weights))


SCALE = 1024
"""A secure sum carries the vector as integers, ``round(SCALE × vector)`` per merchant: one user then moves each
coordinate by at most SCALE + 1 (its own at most 1, scaled, and the rounding of the merchant's sum at most 1)."""


def quantised(vector: np.ndarray) -> np.ndarray:
    """A merchant's exact vector as the integers it masks in a secure sum."""
    return np.round(np.asarray(vector, np.float64) * SCALE).astype(np.int64)


def integer_sensitivities(weights: tuple[float, ...] = WEIGHTS) -> tuple[float, float]:
    """(L1, L2) of one user's effect on a merchant's ``quantised`` vector."""
    return (SCALE + 1) * size(weights), (SCALE + 1) * sensitivity(weights)


def coordinates(per_user: dict[float, np.ndarray], weights: tuple[float, ...] = WEIGHTS) -> np.ndarray:
    """One merchant's exact vector from each candidate's per-user validation NDCG@10 (values in [0, 1])."""
    base = per_user[math.inf]
    sums = [float(per_user[w].sum()) for w in weights]
    squares = [float(((per_user[w] - base) ** 2).sum()) for w in weights if math.isfinite(w)]
    return np.asarray(sums + squares + [float(len(base))], dtype=np.float64)


def figures(model, prior, split, weights: tuple[float, ...] = WEIGHTS) -> np.ndarray:
    """One merchant's exact vector: ``model`` fused with ``prior`` at each weight, scored on ``split``'s validation
    users (fedaug.common.priors.fusion.fused_rows)."""
    from fedaug.common.priors.fusion import fused_rows

    rows = fused_rows(model, prior, split, weights, "valid")
    return coordinates({w: np.concatenate([r["ndcg@10"] for r in rows[w]]) for w in weights}, weights)


def noised(vector: np.ndarray, noise_multiplier: float, weights: tuple[float, ...] = WEIGHTS,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """The Gaussian mechanism on ``vector`` (std = noise multiplier × sensitivity); 0: exact (non-private)."""
    if noise_multiplier == 0:
        return vector.copy()
    rng = rng or np.random.default_rng()  # fresh entropy: whoever knows a seeded noise can subtract it
    return vector + rng.normal(0.0, noise_multiplier * sensitivity(weights), vector.shape)


def choose(total: np.ndarray, noise_std: float, weights: tuple[float, ...] = WEIGHTS) -> dict:
    """The weight the summed vectors support, and the figures behind it: a finite weight is kept only where the
    lower end of its paired gain's interval over ∞ (users' spread and the release noise together, widened for the
    number of finite candidates) is above zero; among those kept, the best. ``noise_std``: the summed vector's
    noise standard deviation per coordinate (public: from the merchants' noise multipliers)."""
    finite = [w for w in weights if math.isfinite(w)]
    n = len(weights)
    users = float(total[-1])
    sums = dict(zip(weights, total[:n], strict=True))
    squares = dict(zip(finite, total[n:n + len(finite)], strict=True))
    z = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2 / max(len(finite), 1))
    rows, best = [], math.inf
    for w in finite:
        if users < 2:
            rows.append({"weight": w, "gain": None, "low": None})
            continue
        gain = (sums[w] - sums[math.inf]) / users
        spread = max(squares[w] / users - gain ** 2, 0.0)
        error = math.sqrt(spread / users + 2 * noise_std ** 2 / users ** 2)
        rows.append({"weight": w, "valid_ndcg@10": sums[w] / users, "gain": gain, "low": gain - z * error})
    kept = [r for r in rows if r["low"] is not None and r["low"] > 0]
    if kept:
        best = max(kept, key=lambda r: r["gain"])["weight"]
    return {"weight": best, "users": users, "noise_std": noise_std,
            "prior_valid_ndcg@10": sums[math.inf] / users if users >= 1 else None, "candidates": rows}

"""Distributed Skellam noise for pooled releases, and what it costs in privacy.

Under ``[privacy] noise = "pooled"`` each merchant adds a *share* of one Skellam noise to the integer vector it masks
for secure aggregation (counts, quantised sums), so that the sum the aggregator unmasks carries the noise of a single
release (Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated Learning", NeurIPS 2021).
Independent Skellams sum to a Skellam, and integer noise survives the modular arithmetic of secure aggregation: the
guarantee holds on the very integers that are unmasked. It assumes that

- each user shops at one merchant (one user's whole contribution is in one merchant's vector, within ``l1``/``l2``);
- the aggregator follows the protocol (it unmasks only the sum of a round's surviving merchants);
- at most T of the M merchants collude or drop: each share is sized for the M − T honest survivors
  (``share_variance``), so their shares alone carry the pooled variance, whatever the others add or withhold.

Units: variances and sensitivities are those of the integers summed (a sum quantised at scale s has sensitivities
s·l1 and s·l2, and Gaussian-equivalent noise σ becomes variance s²σ²). The paper writes Sk(Δ, μ) for the Skellam of
mean Δ and *variance* μ (pmf e^{−μ}·I_{k−Δ}(μ): Poisson(μ/2) − Poisson(μ/2), shifted by Δ); ``variance`` here is that μ.
"""

from __future__ import annotations

import math

import numpy as np

from fedaug.common.errors import ConfigError


def skellam_noise(shape: int | tuple[int, ...], *, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of ``variance`` (Poisson(variance/2) − Poisson(variance/2)), as int64."""
    if not variance >= 0:
        raise ValueError(f"Skellam variance must be >= 0, got {variance}")
    mean = variance / 2
    return rng.poisson(mean, size=shape).astype(np.int64) - rng.poisson(mean, size=shape).astype(np.int64)


def share_variance(variance: float, *, merchants: int, tolerated: int) -> float:
    """Each merchant's share of the pooled ``variance``, sized so that any ``merchants`` − ``tolerated`` survivors
    carry it all: variance / (merchants − tolerated)."""
    if tolerated < 0 or tolerated >= merchants:
        raise ConfigError(f"pooled noise: {merchants} merchant(s) cannot tolerate {tolerated} colluding or dropped "
                          "(at least one must be honest and stay)")
    return variance / (merchants - tolerated)


def _check(variance: float, l1: float, l2: float) -> None:
    if not (variance > 0 and l2 > 0 and l1 >= l2):  # every vector has L1 norm >= L2 norm
        raise ValueError(f"Skellam accounting needs variance > 0 and l1 >= l2 > 0, got variance={variance}, "
                         f"l1={l1}, l2={l2}")


def rdp(alpha: float, *, variance: float, l1: float, l2: float) -> float:
    """The Skellam mechanism's Rényi-DP at order ``alpha`` >= 1: adding Sk(0, v) noise to every coordinate of an
    integer vector that one user moves by at most ``l1`` in L1 norm and ``l2`` in L2 norm is (α, ε(α))-RDP with

        ε(α) = α·l2²/(2v) + min(((2α − 1)·l2² + 6·l1) / (4v²), 3·l1 / (2v))

    (Agarwal et al. 2021, the multi-dimensional Skellam RDP theorem; the same constants as the authors' own accounting
    code, with μ = v the variance). The first term is the Gaussian mechanism's at the same variance; the second is
    the price of being discrete, O(1/v²). tests/test_privacy.py checks it against the exact Rényi divergence of
    shifted Skellams, at integer and fractional orders."""
    _check(variance, l1, l2)
    if alpha < 1:
        raise ValueError(f"Rényi order must be >= 1, got {alpha}")
    v = variance
    return alpha * l2**2 / (2 * v) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * v**2), 3 * l1 / (2 * v))


def rho(*, variance: float, l1: float, l2: float) -> float:
    """A ρ with rdp(α) <= ρ·α at every order α >= 1:

        ρ = l2²/(2v) + min(max(2·l2², l2² + 6·l1) / (4v²), 3·l1 / (2v)).

    Derivation: ((2α − 1)·l2² + 6·l1)/α = 2·l2² − (l2² − 6·l1)/α is monotone in α, so over α >= 1 it is at most
    its value at α = 1 or its limit as α → ∞, the max above; and 3·l1/(2v) <= α·3·l1/(2v). The min of two bounds
    on the second term is one too."""
    _check(variance, l1, l2)
    v = variance
    return l2**2 / (2 * v) + min(max(2 * l2**2, l2**2 + 6 * l1) / (4 * v**2), 3 * l1 / (2 * v))


def equivalent_noise_multiplier(*, variance: float, l1: float, l2: float) -> float:
    """1/√(2ρ): the Gaussian mechanism of this noise multiplier (sensitivity 1), whose RDP is α/(2z²) = ρ·α, is at
    least the Skellam's at every order. An RDP accountant may therefore compose the Skellam release as that Gaussian
    (at sample rate 1); a PLD or PRV accountant may not — the dominance holds in RDP only."""
    return 1 / math.sqrt(2 * rho(variance=variance, l1=l1, l2=l2))


def variance_for(noise_multiplier: float, *, l1: float, l2: float) -> float:
    """The smallest variance whose equivalent noise multiplier is >= ``noise_multiplier``.

    ρ(v) <= r = 1/(2z²) is solved on each branch of the min, each decreasing in v: l2²/(2v) + c/(4v²) = r (c the
    max in ``rho``) is the quadratic r·v² − (l2²/2)·v − c/4 = 0, and (l2² + 3·l1)/(2v) = r is linear; the smaller
    root is the answer."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise multiplier must be > 0, got {noise_multiplier}")
    _check(1.0, l1, l2)
    r = 1 / (2 * noise_multiplier**2)
    c = max(2 * l2**2, l2**2 + 6 * l1)
    quadratic = (l2**2 / 2 + math.sqrt(l2**4 / 4 + r * c)) / (2 * r)
    variance = min(quadratic, (l2**2 + 3 * l1) / (2 * r))
    while equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2) < noise_multiplier:  # rounding, an ulp or two
        variance = math.nextafter(variance, math.inf)
    return variance

"""Distributed Skellam noise: the RDP bound holds against the exact divergence of shifted Skellams, the equivalent
Gaussian dominates it at every order, and each merchant's noise share is what the accounting says (statistical
tests on drawn shares, fixed seed, level 1e-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from fedaug.common.errors import ConfigError
from fedaug.common.privacy.skellam import (
    equivalent_noise_multiplier,
    rdp,
    rho,
    share_variance,
    skellam_noise,
    variance_for,
)

LEVEL = 1e-3
ORDERS = (1.25, 1.5, 2, 3, 5, 8, 16, 32)
SENSITIVITIES = [(1, 1), (4, 2), (6, 6), (50, math.sqrt(50)), (3, math.sqrt(5))]
"""(l1, l2): one count, a user's 4 distinct transitions, one coordinate moved by 6 (l2² > 6·l1), 50 counts, (1, 2)."""


def exact_rdp(alpha: float, variance: float, shift: int) -> float:
    """D_α(Sk(shift, v) || Sk(0, v)), summed over the integers from scipy's Skellam pmfs, in log space."""
    half = int(shift + 15 * math.sqrt(variance) + 20 * alpha + 100)
    k = np.arange(-half, half + 1)
    log_p = stats.skellam.logpmf(k, variance / 2, variance / 2, loc=shift)
    log_q = stats.skellam.logpmf(k, variance / 2, variance / 2)
    kept = np.isfinite(log_p) & np.isfinite(log_q)  # past ~1e-300 the pmfs underflow
    terms = alpha * log_p[kept] + (1 - alpha) * log_q[kept]
    assert max(terms[0], terms[-1]) < terms.max() - 50, "the sum has not converged at its ends"
    return float(logsumexp(terms)) / (alpha - 1)


@pytest.mark.parametrize("variance", [0.5, 2, 8, 32, 128, 1024])
@pytest.mark.parametrize("shift", [1, 2, 3])
def test_the_rdp_bound_holds_against_the_exact_divergence(variance, shift):
    """A 1-D shift Δ has l1 = l2 = Δ. The bound is never below the exact Rényi divergence, at integer and
    fractional orders; once the variance is large against Δ², its Gaussian term dominates and it is tight."""
    for alpha in ORDERS:
        exact = exact_rdp(alpha, variance, shift)
        bound = rdp(alpha, variance=variance, l1=shift, l2=shift)
        assert exact <= bound * (1 + 1e-9), (alpha, exact, bound)
        if variance >= 100 * shift**2:
            assert bound <= 1.05 * exact, (alpha, exact, bound)
            assert bound == pytest.approx(alpha * shift**2 / (2 * variance), rel=0.05)


@pytest.mark.parametrize("l1, l2", SENSITIVITIES)
@pytest.mark.parametrize("variance", [0.3, 3, 30, 300, 3e4])
def test_the_equivalent_gaussian_dominates_at_every_order(l1, l2, variance):
    z = equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2)
    assert z == pytest.approx(1 / math.sqrt(2 * rho(variance=variance, l1=l1, l2=l2)))
    for alpha in [*np.linspace(1, 2, 21), *np.geomspace(2, 1e5, 200)]:
        assert rdp(alpha, variance=variance, l1=l1, l2=l2) <= alpha / (2 * z**2) * (1 + 1e-12)
    if variance >= 1e4:  # large noise: the Skellam costs about what a Gaussian of its variance does
        assert rho(variance=variance, l1=l1, l2=l2) <= 1.01 * l2**2 / (2 * variance)


@pytest.mark.parametrize("l1, l2", SENSITIVITIES)
def test_variance_for_is_the_smallest_variance_reaching_a_multiplier(l1, l2):
    last = 0.0
    for z in (0.05, 0.3, 0.7, 1.0, 3.0, 10.0, 100.0):
        variance = variance_for(z, l1=l1, l2=l2)
        assert equivalent_noise_multiplier(variance=variance, l1=l1, l2=l2) >= z
        assert equivalent_noise_multiplier(variance=variance * (1 - 1e-9), l1=l1, l2=l2) < z
        assert variance > last
        last = variance


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="3 merchant.* cannot tolerate 3"):
        share_variance(10.0, merchants=3, tolerated=3)
    with pytest.raises(ConfigError):
        share_variance(10.0, merchants=3, tolerated=-1)
    with pytest.raises(ValueError, match="l1 >= l2"):
        rdp(2, variance=10, l1=1, l2=2)
    with pytest.raises(ValueError, match="order"):
        rdp(0.5, variance=10, l1=1, l2=1)
    with pytest.raises(ValueError):
        variance_for(0.0, l1=1, l2=1)


def test_noise_is_integer_and_zero_variance_is_none():
    rng = np.random.default_rng(0)
    noise = skellam_noise((3, 4), variance=5.0, rng=rng)
    assert noise.dtype == np.int64 and noise.shape == (3, 4)
    assert not skellam_noise(7, variance=0.0, rng=rng).any()


MERCHANTS, TOLERATED, POOLED, SIZE = 10, 3, 300.0, 200_000


def variance_p(sample: np.ndarray, variance: float, alternative: str) -> float:
    """p-value that ``sample`` (mean 0 by symmetry) has ``variance``: a z-test on the mean square, whose variance
    for a Skellam is (v + 2v²)/n (its fourth cumulant is v, so E[X⁴] = v + 3v²)."""
    z = (np.mean(sample.astype(np.float64) ** 2) - variance) / math.sqrt((variance + 2 * variance**2) / sample.size)
    return {"less": stats.norm.cdf(z), "two-sided": 2 * stats.norm.sf(abs(z))}[alternative]


def skellam_fit_p(sample: np.ndarray, variance: float) -> float:
    """Chi-square goodness of fit to Sk(0, ``variance``): one bin per integer between the 1e-3 quantiles, one per
    tail (every bin expects >= 5 at this size)."""
    mu = variance / 2
    low, high = (int(q) for q in stats.skellam.ppf([1e-3, 1 - 1e-3], mu, mu))
    inside = sample[(sample >= low) & (sample <= high)] - low
    observed = [np.sum(sample < low), *np.bincount(inside, minlength=high - low + 1), np.sum(sample > high)]
    expected = np.array([stats.skellam.cdf(low - 1, mu, mu), *stats.skellam.pmf(np.arange(low, high + 1), mu, mu),
                         stats.skellam.sf(high, mu, mu)])
    assert expected.min() * sample.size >= 5
    return stats.chisquare(observed, expected * sample.size / expected.sum()).pvalue


def test_each_share_is_what_the_accounting_says_and_survivors_carry_the_pooled_noise():
    """7 honest of 10 merchants: each share has the share variance and is Skellam; whichever 3 drop, the survivors'
    sum has at least the pooled variance and is Skellam of it; with none dropped it has 10/7 of it."""
    rng = np.random.default_rng(32)
    share = share_variance(POOLED, merchants=MERCHANTS, tolerated=TOLERATED)
    assert share == POOLED / (MERCHANTS - TOLERATED)
    shares = [skellam_noise(SIZE, variance=share, rng=rng) for _ in range(MERCHANTS)]
    for noise in shares:
        assert variance_p(noise, share, "two-sided") > LEVEL
        assert skellam_fit_p(noise, share) > LEVEL
    survivors = sum(shares[i] for i in rng.choice(MERCHANTS, MERCHANTS - TOLERATED, replace=False))
    assert variance_p(survivors, POOLED, "less") > LEVEL
    assert skellam_fit_p(survivors, POOLED) > LEVEL
    everyone = sum(shares)
    assert variance_p(everyone, POOLED * MERCHANTS / (MERCHANTS - TOLERATED), "two-sided") > LEVEL


def test_shares_sized_for_every_merchant_are_caught_too_small_once_some_drop():
    """The tests above have the power to see a wrong share: sized for all 10 merchants, 7 survivors carry only
    7/10 of the pooled variance, and both tests reject it."""
    rng = np.random.default_rng(32)
    survivors = sum(skellam_noise(SIZE, variance=POOLED / MERCHANTS, rng=rng)
                    for _ in range(MERCHANTS - TOLERATED))
    assert variance_p(survivors, POOLED, "less") < LEVEL
    assert skellam_fit_p(survivors, POOLED) < LEVEL

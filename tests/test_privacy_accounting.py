"""Client-level DP accounting for Flower's DP wrappers (Google's dp-accounting, offline)."""

from __future__ import annotations

import math

import pytest
from scipy import optimize
from scipy.stats import norm

from feddifrc_core.aggregation import sample_partitions
from feddifrc_core.privacy_accounting import (
    effective_noise_multiplier,
    gaussian_epsilon,
    max_releases_per_client,
    noise_multiplier_for,
)


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8: the Gaussian mechanism of std sigma (sensitivity 1) is
    (eps, delta)-DP iff Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma) <= delta."""
    def excess(eps: float) -> float:
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)
    return float(optimize.brentq(excess, 0.0, 500.0, xtol=1e-12))


def test_rounds_without_sampling_compose_into_one_gaussian_of_the_known_epsilon():
    # 20 rounds at z = 1 are one Gaussian of std 1/sqrt(20): eps = 28.3735 at delta = 1e-5.
    exact = gaussian_epsilon(1.0, 20, 1e-5)
    assert exact == pytest.approx(analytic_gaussian_epsilon(1 / math.sqrt(20), 1e-5), rel=1e-9)
    assert exact == pytest.approx(28.3735, abs=1e-4)
    assert gaussian_epsilon(1.0, 20, 1e-5, method="pld") == pytest.approx(exact, rel=1e-3)
    rdp = gaussian_epsilon(1.0, 20, 1e-5, method="rdp")  # an upper bound, what Flower reports
    assert exact < rdp < 1.1 * exact


def test_secret_poisson_sampling_amplifies_and_the_calibration_inverts():
    full = gaussian_epsilon(1.1, 100, 1e-5, method="rdp")
    sampled = gaussian_epsilon(1.1, 100, 1e-5, sampling_rate=0.05, method="rdp")
    assert sampled < full / 10
    z = noise_multiplier_for(4.0, 1e-5, 13)
    assert gaussian_epsilon(z, 13, 1e-5) == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="no sampling amplification"):
        gaussian_epsilon(1.0, 10, 1e-5, sampling_rate=0.1)


def test_the_busiest_client_of_the_seeded_schedule_sets_the_releases():
    partitions, rounds = list(range(10)), 20
    counts = {p: 0 for p in partitions}
    for r in range(1, rounds + 1):
        for p in sample_partitions(partitions, 0.5, 2, 7, r):
            counts[p] += 1
    busiest = max_releases_per_client(partitions, 0.5, 2, 7, rounds)
    assert busiest == max(counts.values()) and 10 < busiest < rounds
    assert max_releases_per_client(partitions, 1.0, 2, 7, rounds) == rounds
    # A round with 4 of 5 sampled replies: the mean moves more per client.
    assert effective_noise_multiplier(1.0, 5, 4) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="replied <= sampled"):
        effective_noise_multiplier(1.0, 5, 6)


def test_rdp_is_what_flowers_own_accountant_reports():
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    config = PrivacyConfig(target_delta=1e-3, population_size=10,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    flower = RdpAccountant(config)  # what DifferentialPrivacy*FixedClipping(accountant=...) uses
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=5, population_size=10), 13)
    ours = gaussian_epsilon(1.0, 13, 1e-3, method="rdp")
    assert flower.get_privacy_spent().epsilon == pytest.approx(ours, rel=1e-12)
    assert gaussian_epsilon(1.0, 13, 1e-3) < ours  # the exact value is tighter

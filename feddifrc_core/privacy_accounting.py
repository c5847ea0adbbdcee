"""(epsilon, delta) of Flower's client-level DP wrappers, with Google's dp-accounting.

Flower's DP strategies (flwr 1.39, `flwr.serverapp.strategy.DifferentialPrivacy*`) release per
round the mean of m clipped client updates (L2 norm <= C) plus Gaussian noise of std z * C / m:
one Gaussian mechanism with noise multiplier z per round, for server-side and client-side fixed
clipping alike; adaptive clipping splits its noise between the update and the clipped-count query
so that the pair is again worth multiplier z (Andrew et al. 2021, Flower's
`compute_adaptive_noise_params`). What the rounds add up to depends on the sampling:
- the project samples clients with a seeded, public schedule (`aggregation.sample_partitions`):
  no amplification by sampling; a client's data is released in the rounds it takes part in, so
  the count that matters is the busiest client's (`max_releases_per_client`), and T Gaussians
  of multiplier z compose exactly into one of multiplier z / sqrt(T) (analytic, Balle & Wang 2018);
- with secret Poisson sampling of rate q the RDP or PLD accountants give the amplified epsilon.
A round in which only m' < m clients replied is worth multiplier z * m' / m (the mean of fewer
updates moves more per client): `effective_noise_multiplier`.

A run's report (`ReleaseLedger`) accounts what the wrappers did, round by round
(`release_multipliers`): the update's multiplier is its noise std over the sensitivity of the
mean it was added to, and the adaptive wrappers' clipped count is a second Gaussian mechanism.
Two ways in which flwr 1.39's adaptive wrappers are worth less than the z they are given:
- the noise std uses the clipping norm after the round's update (z_u * C_next / m) while the
  updates were clipped to the norm before it (sensitivity C / m'): a norm that shrinks leaves
  too little noise;
- the count is of 0/1 bits (sensitivity 1) with noise std sigma_b, where Andrew et al.'s split,
  z_u = (z^-2 - (2 sigma_b)^-2)^-1/2, assumes centred bits (sensitivity 1/2).
The run's epsilon is the busiest client's: the RDP composition of the mechanisms of the rounds it
took part in (what Flower's `RdpAccountant` reports for that sequence of Gaussian events).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from dp_accounting import dp_event, gaussian_mechanism
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from feddifrc_core.aggregation import sample_partitions

METHODS = ("exact", "rdp", "pld")


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float, *,
                     sampling_rate: float = 1.0, method: str = "exact") -> float:
    """Epsilon at `delta` after `releases` Gaussian mechanisms of `noise_multiplier` (noise std
    over L2 sensitivity), each on a secret Poisson sample of rate `sampling_rate` (1 = none).

    "exact": closed form, only without sampling; "rdp": Renyi DP (an upper bound, what Flower's
    `RdpAccountant` reports); "pld": privacy loss distributions (tighter, discretised).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier}")
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "exact":
        if sampling_rate != 1.0:
            raise ValueError("method 'exact' has no sampling amplification; use 'rdp' or 'pld'")
        return float(gaussian_mechanism.get_epsilon_gaussian(
            noise_multiplier / math.sqrt(releases), delta))
    event: dp_event.DpEvent = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    accountant = (rdp_privacy_accountant.RdpAccountant() if method == "rdp"
                  else pld_privacy_accountant.PLDAccountant())
    accountant.compose(dp_event.SelfComposedDpEvent(event, releases))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, releases: int) -> float:
    """The smallest z whose `releases` Gaussian mechanisms (no sampling) give (epsilon, delta)."""
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases}")
    return float(gaussian_mechanism.get_sigma_gaussian(epsilon, delta)) * math.sqrt(releases)


def effective_noise_multiplier(noise_multiplier: float, sampled: int, replied: int) -> float:
    """The multiplier a round is worth when `replied` of `sampled` clients made the mean."""
    if not 0 < replied <= sampled:
        raise ValueError(f"need 0 < replied <= sampled, got replied={replied}, sampled={sampled}")
    return noise_multiplier * replied / sampled


def max_releases_per_client(partition_ids: Sequence[int], fraction: float, min_nodes: int,
                            seed: int, num_rounds: int) -> int:
    """The most rounds any one client trains in under the run's seeded schedule (rounds 1..T):
    the number of releases to account for client-level DP with a public schedule."""
    counts = dict.fromkeys(partition_ids, 0)
    for server_round in range(1, num_rounds + 1):
        for p in sample_partitions(partition_ids, fraction, min_nodes, seed, server_round):
            counts[p] += 1
    return max(counts.values())


def composed_epsilon(noise_multipliers: Sequence[float], delta: float) -> float:
    """Epsilon at `delta` (RDP) after Gaussian mechanisms of these multipliers, in any order;
    infinite when one of them adds no noise."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not noise_multipliers:
        return 0.0
    if min(noise_multipliers) <= 0:
        return math.inf
    accountant = rdp_privacy_accountant.RdpAccountant()
    for z, count in sorted(Counter(float(z) for z in noise_multipliers).items()):
        accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), count))
    return float(accountant.get_epsilon(delta))


def release_multipliers(noise_multiplier: float, clipping_norm: float, noise_norm: float,
                        sampled: int, replied: int, count_stddev: float | None = None
                        ) -> tuple[float, ...]:
    """The Gaussian mechanisms (as noise std over sensitivity) of one noised mean of Flower's DP
    wrappers: the mean of `replied` updates clipped to `clipping_norm`, plus noise of std
    noise_multiplier * noise_norm / sampled (Flower's `compute_stdv`); with adaptive clipping
    also the count of clipped updates (0/1 bits) plus noise of std `count_stddev`."""
    if not 0 < replied <= sampled:
        raise ValueError(f"need 0 < replied <= sampled, got replied={replied}, sampled={sampled}")
    update = noise_multiplier * noise_norm * replied / (sampled * clipping_norm)
    return (update,) if count_stddev is None else (update, count_stddev)


@dataclass
class ReleaseLedger:
    """The noised means of a run: per client, the mechanisms of each one it was in."""

    releases: dict[int, list[tuple[float, ...]]] = field(default_factory=dict)

    def record(self, partitions: Iterable[int], multipliers: Sequence[float]) -> None:
        for p in partitions:
            self.releases.setdefault(int(p), []).append(tuple(float(z) for z in multipliers))

    def busiest(self) -> int:
        """The most releases any one client took part in."""
        return max((len(r) for r in self.releases.values()), default=0)

    def epsilon(self, delta: float) -> float:
        """The run's epsilon at `delta`: the largest of its clients' (client-level DP)."""
        distinct = {tuple(sorted(z for release in r for z in release))
                    for r in self.releases.values()}
        return max((composed_epsilon(r, delta) for r in distinct), default=0.0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Per client, its releases x their mechanisms (every release of a run has as many)."""
        return {f"releases.{p}": np.asarray(r, dtype=np.float64)
                for p, r in sorted(self.releases.items())}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ReleaseLedger:
        prefix = "releases."
        return cls({int(k[len(prefix):]): [tuple(float(z) for z in row)
                                           for row in np.atleast_2d(np.asarray(v))]
                    for k, v in arrays.items() if k.startswith(prefix)})

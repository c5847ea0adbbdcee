"""Statistics of seeded benchmark runs: mean and sd over seeds, paired differences, t-intervals.

Runs of two methods with the same seed share the partition, the client sampling and the initial
model, so a method's effect is the per-seed (paired) difference; its 95 % t-interval has n - 1
degrees of freedom. Kept free of the benchmarks' own types: plain numbers in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("mean_sd of no values")
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return (m, sd)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t-interval of the mean of `values` (at least 2 values)."""
    from scipy.stats import t

    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {len(values)}")
    m, sd = mean_sd(values)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * sd / math.sqrt(len(values))
    return (m - half, m + half)


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """`values[seed] - baseline[seed]` for the seeds both have."""
    return {seed: values[seed] - baseline[seed] for seed in sorted(values) if seed in baseline}


def fmt_mean_sd(pair: tuple[float, float] | None, signed: bool = False) -> str:
    if pair is None:
        return "-"
    return f"{pair[0]:+.2f} ± {pair[1]:.2f}" if signed else f"{pair[0]:.2f} ± {pair[1]:.2f}"


def fmt_interval(pair: tuple[float, float] | None) -> str:
    return "-" if pair is None else f"[{pair[0]:+.2f}, {pair[1]:+.2f}]"

"""Fixed-point encoding of named arrays for SecAgg+ secure summation (pure numpy, no Flower).

Flower's SecAgg+ (flwr 1.39, `SecAggPlusWorkflow` + `secaggplus_mod`) sums float vectors: each
client clips every value to [-c, c] (c = `secagg-clipping-range`) WITHOUT telling anyone,
quantizes [-c, c] onto the integers 0..Q (Q = `secagg-quantization-range`, stochastic rounding)
and masks them modulo 2**32; only the sum over the contributing clients is ever unmasked.

Contract of this module, so that nothing is clipped and the error is known:
- every array has a PUBLIC bound b (the same number on every client and on the server, fixed
  before any client encodes; never derived from one client's values). A client sends
  `x * c / b`; a value with |x| > b raises `ClippingError` (a silently clipped statistic would
  give a silently wrong basis or model). Bounds come from public facts (a count is at most the
  data set's size) or from a first secure round of magnitude octaves (`encode_octaves` ->
  secure sum -> `bounds_from_octaves`), which reveals only how many clients have their largest
  value in each power-of-two band, never which client.
- the server multiplies the sum by b / c. With n contributing clients the decoded sum differs
  from the exact sum by less than `sum_error_bound(b, n, Q) = 2 * n * b / Q` per value
  (stochastic rounding moves each value by less than one quantization step 2b/Q); integer
  arrays (counts) are rounded back, which is exact while that bound is below 0.5.
- the sum of n values in 0..Q must not wrap around the 2**32 modulus: n * Q < 2**32
  (`SecAggSettings.check`), else the sum is silently wrong. Q = 0 means "the largest power of two
  that cannot wrap for the sampled clients" (2**28 for 10 clients, 64x finer than Flower's 2**22).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# `secure-aggregation`: how the server sums the clients' uploads (server_app/secure_aggregator.py)
SECURE_AGGREGATIONS = ("none", "secaggplus")
MODULUS_RANGE = 2**32  # Flower's mask modulus (its masks are int64 draws below it)
INT32_LIMIT = 2**31  # Flower's stochastic rounding casts to int32
OCTAVES = np.arange(-60, 64)  # bands (2**(e-1), 2**e]: e = -60 also takes everything smaller


class ClippingError(ValueError):
    """A value is larger than its array's public bound: SecAgg+ would clip it silently."""


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ settings, with Flower's names (`secagg-*` keys) and Flower's int/float meaning.

    An int is a count; a float is a fraction: of the sampled clients for `num_shares`, of the
    shares for `reconstruction_threshold` (Flower's own rule, see `resolve`).
    """

    # 1.0: every sampled client is every other's neighbour (SecAgg's complete graph): with the
    # project's 5-10 clients per sum the masking cost is small and no subset can be isolated.
    num_shares: int | float = 1.0
    # Two thirds of a neighbourhood: always more than half (a server that lies about who
    # dropped out cannot collect both a client's mask seed and its key), the rest may drop out.
    reconstruction_threshold: int | float = 0.67
    clipping_range: float = 8.0  # Flower's default; the encoding scales into it (no precision cost)
    quantization_range: int = 0  # 0 = the largest power of two that cannot wrap (see module doc)

    def resolve(self, num_clients: int) -> tuple[int, int, int]:
        """(shares, threshold, neighbourhood size) as `SecAggPlusWorkflow` computes them for
        `num_clients` sampled clients (flwr 1.39: `_check_init_params` and `setup_stage`)."""
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and not isinstance(shares, bool) and shares == 1:
            shares = 1.0  # Flower reads the int 1 as "all"
        if isinstance(threshold, int) and not isinstance(threshold, bool) and threshold == 1:
            threshold = 1.0
        if isinstance(shares, float):
            k = round(shares * num_clients)
            if k < num_clients and k % 2 == 0:
                k += 1
            if k <= 2:
                k = num_clients
        else:
            k = int(shares)
        t = max(round(threshold * k), 2) if isinstance(threshold, float) else int(threshold)
        neighbourhood = min(2 * (k // 2) + 1, num_clients)  # offsets -k//2 .. k//2 in a ring
        return k, t, neighbourhood

    def quantization_for(self, num_clients: int) -> int:
        """Q for a sum over `num_clients` sampled clients (0 = the largest safe power of two)."""
        if self.quantization_range:
            return self.quantization_range
        return 1 << (((MODULUS_RANGE - 1) // max(num_clients, 1)).bit_length() - 1)

    def check(self, num_clients: int) -> None:
        """Raise ValueError (naming the setting, the expected and the received value) when these
        settings cannot work, or would not protect, for `num_clients` sampled clients."""
        problems = self.problems(num_clients)
        if problems:
            raise ValueError(f"secure aggregation over {num_clients} sampled clients: "
                             + "; ".join(problems))

    def value_problems(self) -> list[str]:
        """What is wrong with the values whatever the number of clients (checked when the run
        config is parsed)."""
        out: list[str] = []
        s, t = self.num_shares, self.reconstruction_threshold
        if isinstance(s, bool) or not isinstance(s, int | float) or s <= 0:
            out.append(f"secagg-num-shares must be an int >= 3 or a fraction in (0, 1], got {s!r}")
        elif isinstance(s, int) and s != 1 and s <= 2:
            out.append(f"secagg-num-shares as an int must be >= 3 (or 1 = all), got {s}")
        elif isinstance(s, float) and s > 1:
            out.append(f"secagg-num-shares as a fraction must be in (0, 1], got {s}")
        if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
            out.append(f"secagg-reconstruction-threshold must be an int >= 2 or a fraction in "
                       f"(0, 1], got {t!r}")
        elif isinstance(t, float) and t > 1:
            out.append(f"secagg-reconstruction-threshold as a fraction must be in (0, 1], got {t}")
        elif isinstance(s, int) and isinstance(t, int) and s != 1 and t != 1 and t >= s:
            out.append(f"secagg-reconstruction-threshold {t} must be below secagg-num-shares {s}")
        c, q = self.clipping_range, self.quantization_range
        if not (isinstance(c, int | float) and np.isfinite(c) and c > 0):
            out.append(f"secagg-clipping-range must be a positive number, got {c!r}")
        if isinstance(q, bool) or not isinstance(q, int) or q < 0:
            out.append(f"secagg-quantization-range must be an int >= 0 (0 = auto), got {q!r}")
        elif q >= INT32_LIMIT:
            out.append(f"secagg-quantization-range must be below 2**31 (Flower's rounding casts "
                       f"to int32), got {q}")
        return out

    def problems(self, num_clients: int) -> list[str]:
        """Everything that keeps these settings from working for `num_clients` sampled clients."""
        if num_clients < 2:
            return [f"needs at least 2 clients per sum (the sum of one client is its value), "
                    f"got {num_clients}; raise min-train-nodes / fraction-train"]
        out = self.value_problems()
        if out:
            return out
        s, q = self.num_shares, self.quantization_range
        if isinstance(s, int) and s != 1 and s % 2 == 0 and s != num_clients:
            # flwr 1.39 sends the even count to the clients but builds odd neighbourhoods:
            # every client fails in the key-sharing stage.
            out.append(f"secagg-num-shares as an int must be odd or equal to the {num_clients} "
                       f"sampled clients, got {s}")
        if q and q * num_clients >= MODULUS_RANGE:
            out.append(f"secagg-quantization-range {q} lets the sum of {num_clients} clients wrap "
                       f"around 2**32: use at most {(MODULUS_RANGE - 1) // num_clients}, or 0 "
                       "(auto)")
        if out:
            return out
        _, t_resolved, m = self.resolve(num_clients)
        if t_resolved > m:
            out.append(f"secagg-reconstruction-threshold {t_resolved} is larger than the {m} "
                       f"clients of a neighbourhood ({num_clients} sampled, secagg-num-shares "
                       f"{s}): no secret could ever be reconstructed")
        elif 2 * t_resolved <= m:
            out.append(f"secagg-reconstruction-threshold {t_resolved} must be more than half of "
                       f"the {m} clients of a neighbourhood, else a server that lies about "
                       "dropouts can unmask one client")
        return out


def encode(arrays: Mapping[str, np.ndarray], bounds: Mapping[str, float],
           clipping_range: float) -> dict[str, np.ndarray]:
    """Scale each array into [-c, c] by its public bound: x * c / b (float64).

    Raises `ClippingError` naming the array (not the value: the message reaches the server)
    when |x| > b, and ValueError for a missing bound or a non-finite value.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        x = np.asarray(value, dtype=np.float64)
        if name not in bounds:
            raise ValueError(f"no public bound for array '{name}'; bounds cover {sorted(bounds)[:8]}")
        bound = float(bounds[name])
        if not (np.isfinite(bound) and bound > 0):
            raise ValueError(f"the bound of '{name}' must be a positive number, got {bound}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"array '{name}' has non-finite values; it cannot be summed securely")
        if x.size and float(np.abs(x).max()) > bound:
            raise ClippingError(
                f"array '{name}' exceeds its public bound {bound:g}: SecAgg+ would clip it "
                "silently. Bounds from a magnitude round cover every client that took part in it; "
                "a public bound that is too small must be raised.")
        out[name] = x * (clipping_range / bound)
    return out


def decode(sums: Mapping[str, np.ndarray], bounds: Mapping[str, float], clipping_range: float,
           dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The inverse of `encode` applied to a sum: s * b / c, float64, or rounded to the array's
    integer dtype (from `dtypes`, e.g. counts) where one is given."""
    out: dict[str, np.ndarray] = {}
    for name, value in sums.items():
        x = np.asarray(value, dtype=np.float64) * (float(bounds[name]) / clipping_range)
        dtype = np.dtype((dtypes or {}).get(name, "float64"))
        out[name] = np.rint(x).astype(dtype) if np.issubdtype(dtype, np.integer) else x
    return out


def sum_error_bound(bound: float, num_clients: int, quantization_range: int) -> float:
    """Largest difference between a decoded secure sum and the exact sum, per value."""
    return 2.0 * num_clients * float(bound) / quantization_range


def check_integer_exact(bounds: Mapping[str, float], dtypes: Mapping[str, str], num_clients: int,
                        quantization_range: int) -> None:
    """Integer arrays (counts, the weights of FedAvg) must come back exactly: their error bound
    must stay below 0.5 so that rounding recovers the integer sum."""
    for name, dtype in dtypes.items():
        if np.issubdtype(np.dtype(dtype), np.integer) and name in bounds:
            err = sum_error_bound(bounds[name], num_clients, quantization_range)
            if err >= 0.5:
                raise ValueError(
                    f"integer array '{name}' (bound {bounds[name]:g}) would not be summed exactly "
                    f"over {num_clients} clients with secagg-quantization-range "
                    f"{quantization_range} (error up to {err:.3g}); raise it or use 0 (auto)")


# --- the magnitude round: public bounds from the clients' octaves, revealed only as counts -----
def encode_octaves(arrays: Mapping[str, np.ndarray], clipping_range: float) -> dict[str, np.ndarray]:
    """Per array a one-hot over `OCTAVES`: the band 2**(e-1) < max|x| <= 2**e of its largest value,
    already scaled for the secure sum (0 or c: exact on SecAgg+'s quantization grid).

    Summed over the clients this counts the clients per band; `bounds_from_octaves` takes the
    highest occupied band as everybody's bound. An all-zero array marks no band.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        x = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"array '{name}' has non-finite values; it cannot be summed securely")
        onehot = np.zeros(len(OCTAVES))
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > 0:
            exponent = int(np.frexp(peak)[1])  # peak = m * 2**e with 0.5 <= m < 1: peak < 2**e
            if exponent > OCTAVES[-1]:
                raise ValueError(f"array '{name}' has values above 2**{OCTAVES[-1]}")
            onehot[max(exponent, int(OCTAVES[0])) - int(OCTAVES[0])] = 1.0
        out[name] = onehot * clipping_range
    return out


def bounds_from_octaves(sums: Mapping[str, np.ndarray], clipping_range: float) -> dict[str, float]:
    """Public bounds from the secure sum of `encode_octaves`: 2**e of the highest band any client
    occupies (at most twice the largest value of all clients), 2**-60 where no client had one."""
    bounds: dict[str, float] = {}
    for name, value in sums.items():
        counts = np.rint(np.asarray(value, dtype=np.float64) / clipping_range)
        occupied = np.flatnonzero(counts > 0)
        exponent = int(OCTAVES[occupied[-1]]) if occupied.size else int(OCTAVES[0])
        bounds[name] = float(2.0**exponent)
    return bounds


def octave_counts(sums: Mapping[str, np.ndarray], clipping_range: float) -> dict[str, dict[int, int]]:
    """What the magnitude round reveals, per array: {e: number of clients in band e} (for logs
    and the privacy tests)."""
    out: dict[str, dict[int, int]] = {}
    for name, value in sums.items():
        counts = np.rint(np.asarray(value, dtype=np.float64) / clipping_range).astype(int)
        out[name] = {int(OCTAVES[i]): int(counts[i]) for i in np.flatnonzero(counts)}
    return out

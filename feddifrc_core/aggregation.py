"""The server's round arithmetic: which partitions train in a round, and how uploads merge.

Both are functions of (seed, round, partition) and of the replies in partition order only, so an
interrupted and resumed run computes exactly the same numbers. `combine` is the plain rule of the
server's one aggregation component (server_app/aggregator.py): every sum the server takes from
clients, model updates and set-up statistics alike, is a weighted mean or an exact sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# "mean": weighted by num-examples (models); "sum": exact sums (counts, sums, outer products)
Rule = Literal["mean", "sum"]


@dataclass(frozen=True)
class Upload:
    """One client's arrays for one stage, with its weight (num-examples)."""

    partition: int
    arrays: Mapping[str, np.ndarray]
    weight: float
    # the reply's metrics: Flower's adaptive clipping reads the client's norm bit there
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Gathered:
    """What a stage's replies combine to, as the server half of an algorithm receives it."""

    arrays: dict[str, np.ndarray]  # combined by the stage's rule
    clients: int
    metrics: dict[str, Any]  # the clients' metrics, merged by `aggregate_client_metrics`


def combine(uploads: Sequence[Upload], rule: Rule) -> dict[str, np.ndarray]:
    """The plain rule, over uploads in partition order."""
    arrays = [u.arrays for u in uploads]
    if rule == "mean":
        return weighted_average(arrays, [u.weight for u in uploads])
    if rule == "sum":
        return sum_arrays(arrays)
    raise ValueError(f"`rule` must be 'mean' or 'sum', got {rule!r}")


def sum_arrays(arrays: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per named array, the sum over clients in the given order (integers exactly, floats in
    float64), cast back to each array's dtype."""
    keys = _same_keys(arrays, "sum_arrays")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ref = np.asarray(arrays[0][key])
        acc = np.zeros(ref.shape, np.int64 if np.issubdtype(ref.dtype, np.integer) else np.float64)
        for client in arrays:
            acc += _same_shape(client, key, ref)
        out[key] = acc.astype(ref.dtype)
    return out


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg: sum_k w_k * x_k / sum_k w_k per named array, in the given order.

    Accumulates in float64 and casts back to each array's dtype (integer buffers such as
    BatchNorm's `num_batches_tracked` are rounded), so the result does not depend on float32
    rounding of partial sums.
    """
    if len(arrays) != len(weights):
        raise ValueError(f"weighted_average needs one weight per client, got {len(arrays)} "
                         f"array sets and {len(weights)} weights")
    keys = _same_keys(arrays, "weighted_average")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ref = np.asarray(arrays[0][key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for client, weight in zip(arrays, weights, strict=True):
            acc += _same_shape(client, key, ref).astype(np.float64) * (float(weight) / total)
        out[key] = np.rint(acc).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else acc.astype(ref.dtype)
    return out


def aggregate_client_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Client metrics of one stage: num-examples summed, *-seconds max (the slowest client
    bounds the round), everything else weighted by num-examples. An entry that already merges
    several clients (secure aggregation's) says how many in num-clients."""
    weights = np.asarray([float(m["num-examples"]) for m in metrics])
    out: dict[str, Any] = {"num-examples": int(weights.sum()),
                           "num-clients": sum(int(m.get("num-clients", 1)) for m in metrics)}
    keys = sorted({k for m in metrics for k in m} - {"num-examples", "num-clients"})
    for key in keys:
        values = [float(m[key]) for m in metrics if isinstance(m.get(key), (int, float))]
        if len(values) != len(metrics):
            continue  # a key only some clients report is not comparable
        if key.endswith("-seconds"):
            out[key] = max(values)
        else:
            out[key] = float(np.dot(weights, values) / weights.sum())
    return out


def _same_keys(arrays: Sequence[Mapping[str, np.ndarray]], what: str) -> list[str]:
    if len(arrays) == 0:
        raise ValueError(f"{what} needs at least one client")
    keys = list(arrays[0])
    for i, client in enumerate(arrays[1:], start=1):
        if list(client) != keys:
            raise ValueError(
                f"client {i} sent arrays {sorted(client)} but client 0 sent {sorted(keys)}; "
                "all clients must train the same model architecture"
            )
    return keys


def _same_shape(client: Mapping[str, np.ndarray], key: str, ref: np.ndarray) -> np.ndarray:
    value = np.asarray(client[key])
    if value.shape != ref.shape:
        raise ValueError(f"array '{key}' has shape {value.shape} on one client, {ref.shape} on another")
    return value


def num_sampled(num_nodes: int, fraction: float, min_nodes: int) -> int:
    """Clients per round: floor(fraction * nodes), at least `min_nodes` (Flower's FedAvg rule)."""
    if num_nodes < min_nodes:
        raise ValueError(
            f"only {num_nodes} nodes are connected but min-train-nodes is {min_nodes}; start more "
            "SuperNodes (num-supernodes in --federation-config) or lower min-train-nodes"
        )
    return min(num_nodes, max(int(num_nodes * fraction), min_nodes))


def sample_partitions(
    partition_ids: Sequence[int], fraction: float, min_nodes: int, seed: int, server_round: int
) -> list[int]:
    """The partitions that train in `server_round`, sorted; without replacement, seeded per round."""
    pool = sorted(set(int(p) for p in partition_ids))
    k = num_sampled(len(pool), fraction, min_nodes)
    # A stream of its own per (seed, round): sampling never depends on earlier rounds' RNG use.
    rng = np.random.default_rng([seed % 2**32, server_round, 0x5A3])
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))

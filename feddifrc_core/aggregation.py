"""The server's round arithmetic: which partitions train in a round, and how their models merge.

Both are functions of (seed, round, partition) and of the replies in partition order only, so an
interrupted and resumed run computes exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg: sum_k w_k * x_k / sum_k w_k per named array, in the given order.

    Accumulates in float64 and casts back to each array's dtype (integer buffers such as
    BatchNorm's `num_batches_tracked` are rounded), so the result does not depend on float32
    rounding of partial sums.
    """
    if len(arrays) == 0 or len(arrays) != len(weights):
        raise ValueError(
            f"weighted_average needs one weight per client and at least one client, got "
            f"{len(arrays)} array sets and {len(weights)} weights"
        )
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(arrays[0])
    for i, client in enumerate(arrays[1:], start=1):
        if list(client) != keys:
            raise ValueError(
                f"client {i} sent arrays {sorted(client)} but client 0 sent {sorted(keys)}; "
                "all clients must train the same model architecture"
            )
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ref = np.asarray(arrays[0][key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for client, weight in zip(arrays, weights, strict=True):
            value = np.asarray(client[key])
            if value.shape != ref.shape:
                raise ValueError(f"array '{key}' has shape {value.shape} on one client, {ref.shape} on another")
            acc += value.astype(np.float64) * (float(weight) / total)
        out[key] = np.rint(acc).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else acc.astype(ref.dtype)
    return out


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

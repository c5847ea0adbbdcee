"""The project's client uploads as named arrays for a secure sum, and back (pure numpy).

Every sum the server takes from clients, in the form SecAgg+ can add up (see secure_encoding):
- the model update: FedAvg's weighted mean sum_k n_k w_k / sum_k n_k, written as
  g + sum_k n_k (w_k - g) / sum_k n_k. Each client sends n_k * (w_k - g) per model array
  (`update.<name>`) and n_k (`num-examples`, an integer, summed exactly): the weights are never
  sent in plaintext, and a delta is far smaller than a weight, so the same quantization step is
  finer in the model's units.
- the projection statistics: per block the count, the sum and the upper triangle of the outer
  products (the matrix is symmetric: half the upload).
- the target sums (`target-count`, `target-sum`) are sent as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from feddifrc_core.projection import PcaStats

NUM_EXAMPLES = "num-examples"
UPDATE_PREFIX = "update."


def weighted_update(local: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray],
                    num_examples: int) -> dict[str, np.ndarray]:
    """One client's share of the weighted mean: n * (w - g) per array (float64; integer buffers
    such as BatchNorm's step counter stay int64) and n itself."""
    if sorted(local) != sorted(global_state):
        raise ValueError(f"the local model has arrays {sorted(local)[:6]}..., the global model "
                         f"{sorted(global_state)[:6]}...; both must be the same architecture")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    out: dict[str, np.ndarray] = {}
    for name, g in global_state.items():
        w = np.asarray(local[name])
        if w.shape != np.shape(g):
            raise ValueError(f"array '{name}' is {w.shape} locally but {np.shape(g)} globally")
        kind = np.int64 if np.issubdtype(w.dtype, np.integer) else np.float64
        out[UPDATE_PREFIX + name] = (w.astype(kind) - np.asarray(g).astype(kind)) * num_examples
    out[NUM_EXAMPLES] = np.array([num_examples], dtype=np.int64)
    return out


def apply_weighted_update(global_state: Mapping[str, np.ndarray],
                          sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The new global model from the secure sums of `weighted_update`: g + sum(n (w - g)) / sum(n),
    in each array's dtype (integer buffers rounded, as `aggregation.weighted_average` does)."""
    total = int(np.asarray(sums[NUM_EXAMPLES]).reshape(-1)[0])
    if total <= 0:
        raise ValueError(f"the clients' examples sum to {total}; a weighted mean needs a positive sum")
    missing = sorted(k for k in global_state if UPDATE_PREFIX + k not in sums)
    if missing:
        raise ValueError(f"the secure sum has no update for {missing[:6]}")
    out: dict[str, np.ndarray] = {}
    for name, g in global_state.items():
        ref = np.asarray(g)
        mean = ref.astype(np.float64) + np.asarray(sums[UPDATE_PREFIX + name], np.float64) / total
        out[name] = (np.rint(mean) if np.issubdtype(ref.dtype, np.integer) else mean).astype(ref.dtype)
    return out


def pca_upload(stats: Sequence[PcaStats], prefix: str = "stats") -> dict[str, np.ndarray]:
    """Block i -> `{prefix}.{i}.count` int64 [1], `.sum` [C], `.outer-triu` [C(C+1)/2] float64."""
    out: dict[str, np.ndarray] = {}
    for i, s in enumerate(stats):
        rows, cols = np.triu_indices(s.dim)
        out[f"{prefix}.{i}.count"] = np.array([s.count], dtype=np.int64)
        out[f"{prefix}.{i}.sum"] = np.asarray(s.sum, dtype=np.float64)
        out[f"{prefix}.{i}.outer-triu"] = np.asarray(s.outer, dtype=np.float64)[rows, cols]
    return out


def pca_from_sums(sums: Mapping[str, np.ndarray], prefix: str = "stats") -> list[PcaStats]:
    """The merged per-block statistics from the secure sum of every client's `pca_upload`."""
    stats: list[PcaStats] = []
    while f"{prefix}.{len(stats)}.count" in sums:
        i = len(stats)
        total = np.asarray(sums[f"{prefix}.{i}.sum"], dtype=np.float64)
        triu = np.asarray(sums[f"{prefix}.{i}.outer-triu"], dtype=np.float64)
        c = total.shape[0]
        if triu.shape != (c * (c + 1) // 2,):
            raise ValueError(f"block {i}: {triu.shape[0]} outer-product entries for a {c}-d sum")
        outer = np.zeros((c, c))
        outer[np.triu_indices(c)] = triu
        outer = outer + np.triu(outer, 1).T  # [C, C] symmetric
        count = int(np.asarray(sums[f"{prefix}.{i}.count"]).reshape(-1)[0])
        stats.append(PcaStats(count=count, sum=total, outer=outer))
    if not stats:
        raise ValueError(f"no '{prefix}.0.count' in the secure sum; got {sorted(sums)[:8]}")
    return stats

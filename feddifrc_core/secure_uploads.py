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

`secure_vector` / `from_secure_sums` do this for any client answer (the model or a set-up stage's
arrays, the algorithm's uploads, the example count and the training metrics), so that one secure
sum per stage gives the server exactly what the plain rules would (aggregation.combine and
aggregate_client_metrics), within the quantization error:
- rule "sum" (a set-up stage's statistics): the arrays as they are;
- rule "mean" (the model; the algorithm's uploads): n * (w - g) against the model g both sides
  hold, else n * x; the server divides by the summed n;
- metrics: n * m, divided by the summed n (the weighted mean the plain rule takes); a time
  (`*-seconds`) is summed and divided by the number of clients: a mean, where the plain rule
  takes the slowest client (a maximum cannot be computed from sums).
Every array keeps its dtype on the way back (integers are summed exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from feddifrc_core.projection import PcaStats

NUM_EXAMPLES = "num-examples"
NUM_CLIENTS = "num-clients"
UPDATE_PREFIX = "update."
ARRAYS_PREFIX, PAYLOAD_PREFIX, METRIC_PREFIX = "arrays.", "payload.", "metric."


def weighted_update(local: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray],
                    num_examples: int, prefix: str = UPDATE_PREFIX) -> dict[str, np.ndarray]:
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
        out[prefix + name] = (w.astype(kind) - np.asarray(g).astype(kind)) * num_examples
    out[NUM_EXAMPLES] = np.array([num_examples], dtype=np.int64)
    return out


def apply_weighted_update(global_state: Mapping[str, np.ndarray],
                          sums: Mapping[str, np.ndarray],
                          prefix: str = UPDATE_PREFIX) -> dict[str, np.ndarray]:
    """The new global model from the secure sums of `weighted_update`: g + sum(n (w - g)) / sum(n),
    in each array's dtype (integer buffers rounded, as `aggregation.weighted_average` does)."""
    total = int(np.asarray(sums[NUM_EXAMPLES]).reshape(-1)[0])
    if total <= 0:
        raise ValueError(f"the clients' examples sum to {total}; a weighted mean needs a positive sum")
    missing = sorted(k for k in global_state if prefix + k not in sums)
    if missing:
        raise ValueError(f"the secure sum has no update for {missing[:6]}")
    out: dict[str, np.ndarray] = {}
    for name, g in global_state.items():
        ref = np.asarray(g)
        mean = ref.astype(np.float64) + np.asarray(sums[prefix + name], np.float64) / total
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


# --- any client answer as one secure sum, and back ----------------------------------------------
def secure_vector(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float | int],
                  payload: Mapping[str, np.ndarray], rule: str,
                  reference: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """One client's answer as the named arrays of a secure sum, and each one's original dtype.

    `metrics` must hold num-examples (n, the weight); `reference` is the global model the
    client received (rule "mean" on the model: the update n * (w - g) is what it sends)."""
    if rule not in ("mean", "sum"):
        raise ValueError(f"`rule` must be 'mean' or 'sum', got {rule!r}")
    if NUM_EXAMPLES not in metrics:
        raise ValueError(f"the answer's metrics must hold {NUM_EXAMPLES!r}, got {sorted(metrics)}")
    n = int(metrics[NUM_EXAMPLES])
    # the shapes a plain reply's record carries (a 0-d array, BatchNorm's step count, as [1])
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload = {k: np.ascontiguousarray(v) for k, v in payload.items()}
    dtypes = {ARRAYS_PREFIX + k: str(v.dtype) for k, v in arrays.items()}
    out: dict[str, np.ndarray]
    if rule == "sum":
        out = {ARRAYS_PREFIX + k: np.asarray(v) for k, v in arrays.items()}
    elif reference is not None:
        out = weighted_update(arrays, reference, n, prefix=ARRAYS_PREFIX)
        del out[NUM_EXAMPLES]
    else:
        out = {ARRAYS_PREFIX + k: _weighted(v, n) for k, v in arrays.items()}
    for k, v in payload.items():
        out[PAYLOAD_PREFIX + k] = _weighted(v, n)
        dtypes[PAYLOAD_PREFIX + k] = str(np.asarray(v).dtype)
    for k, value in metrics.items():
        if k != NUM_EXAMPLES:
            out[METRIC_PREFIX + k] = np.array([float(value) * (1 if _is_time(k) else n)])
            dtypes[METRIC_PREFIX + k] = "float64"
    out[NUM_EXAMPLES] = np.array([n], dtype=np.int64)
    dtypes[NUM_EXAMPLES] = "int64"
    # Sorted by name: SecAgg+'s stochastic rounding draws array after array, so the same values
    # must come in the same order however the model's dict was ordered (a resumed run reads it
    # from a checkpoint) for a resumed run to round exactly as the uninterrupted one.
    return {k: out[k] for k in sorted(out)}, dtypes


def from_secure_sums(sums: Mapping[str, np.ndarray], dtypes: Mapping[str, str], rule: str,
                     num_clients: int, reference: Mapping[str, np.ndarray] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, payload, metrics) from the secure sum of `num_clients` clients' `secure_vector`:
    what `combine` by `rule` and `aggregate_client_metrics` give over the plain answers."""
    total = int(np.asarray(sums[NUM_EXAMPLES]).reshape(-1)[0])
    if total <= 0:
        raise ValueError(f"the clients' examples sum to {total}; the stage needs a positive sum")

    def part(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: np.asarray(v) for k, v in sums.items() if k.startswith(prefix)}

    arrays: dict[str, np.ndarray]
    if rule == "sum":
        arrays = {k: _cast(v, dtypes[ARRAYS_PREFIX + k]) for k, v in part(ARRAYS_PREFIX).items()}
    elif reference is not None:
        arrays = apply_weighted_update(reference, sums, prefix=ARRAYS_PREFIX)
    else:
        arrays = {k: _cast(v / total, dtypes[ARRAYS_PREFIX + k])
                  for k, v in part(ARRAYS_PREFIX).items()}
    payload = {k: _cast(v / total, dtypes[PAYLOAD_PREFIX + k])
               for k, v in part(PAYLOAD_PREFIX).items()}
    metrics: dict[str, Any] = {NUM_EXAMPLES: total, NUM_CLIENTS: num_clients}
    for k, v in part(METRIC_PREFIX).items():
        metrics[k] = float(v.reshape(-1)[0]) / (num_clients if _is_time(k) else total)
    return arrays, payload, metrics


def _is_time(metric: str) -> bool:
    return metric.endswith("-seconds")


def _weighted(value: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(value)
    return x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64) * n


def _cast(value: np.ndarray, dtype: str) -> np.ndarray:
    """Back to the client's dtype; integers rounded (as aggregation.weighted_average does)."""
    target = np.dtype(dtype)
    x = np.asarray(value)
    return (np.rint(x) if np.issubdtype(target, np.integer) else x).astype(target)

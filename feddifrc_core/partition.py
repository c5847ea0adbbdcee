"""Client partitions of a training set: reference Dirichlet, long tail, flwr Dirichlet, IID.

Every client recomputes the same partition from the seed and keeps its own part, so no index lists
travel. `build_partitions` returns one int64 index array per client; together they cover the chosen
samples exactly once (the long tail first drops samples, then the rest is covered exactly once).

The reference scheme follows the authors' `utils/sample_dirichlet.py` and
`utils/long_tailed_cifar10.py` (github hwang52/FedDifRC, commit c305f62) step by step, including
its random number stream, so that the same seed gives the same clients; the differences are listed
in `docs/data.md` (fewer than 5 clients allowed, bounded resampling, clear errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METHODS = ("dirichlet-reference", "flwr-dirichlet", "iid")
GROUP_SIZE = 5  # reference: clients are partitioned in groups of 5 ("n_auxi_workers")
# Resampling budget per group before the reference scheme gives up: 1e5 Dirichlet draws (a few
# seconds on a busy 2-core machine; 1e6 took 90 s there before an impossible setting was
# reported). 2 classes at alpha 0.05 succeed in ~1 of 300 redraws, 50,000 redraws are allowed.
MAX_DRAWS = 100_000


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    inferred = int(labels.max()) + 1
    if num_classes is None:
        num_classes = inferred
    elif num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but labels go up to {inferred - 1}")
    return labels.astype(np.int64, copy=False), int(num_classes)


def _check_clients(num_clients: int, num_samples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} is more than the {num_samples} samples to share; "
            "use fewer clients or more samples (train-samples=0 keeps the whole training set)"
        )


def _check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------------------------------
# long tail
# --------------------------------------------------------------------------------------------------
def long_tail_counts(num_samples: int, num_classes: int, imb_factor: float) -> list[int]:
    """Samples kept per class: floor((N / C) * imb_factor ** (c / (C - 1))), c = 0 .. C-1."""
    if not (0 < imb_factor <= 1):
        raise ValueError(f"imb_factor must be in (0, 1] (1 = balanced), got {imb_factor!r}")
    if num_classes == 1:
        return [num_samples]
    img_max = num_samples / num_classes
    return [int(img_max * imb_factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tail_indices(
    labels: np.ndarray, imb_factor: float, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices kept by the exponential long tail, class by class, each class in shuffled order.

    As the reference: each class's indices are shuffled (one RandomState(seed) stream, class 0
    first) and the first `long_tail_counts(N, C, imb)[c]` are kept; a class with fewer samples
    keeps all it has. The order matters for the reference Dirichlet scheme that follows, so the
    shuffle also happens for imb_factor = 1, which keeps EVERY sample (the reference would cut
    classes larger than N/C, a no-op on its balanced data sets but a silent loss on others).
    """
    labels, num_classes = _check_labels(labels, num_classes)
    counts = long_tail_counts(labels.size, num_classes, imb_factor)
    if imb_factor == 1.0:
        counts = [labels.size] * num_classes
    rng = np.random.RandomState(seed)
    kept = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)  # ascending, as the reference's classify_label
        rng.shuffle(idx)
        kept.append(idx[: counts[c]])
    return np.concatenate(kept).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# reference Dirichlet scheme
# --------------------------------------------------------------------------------------------------
def _group_bounds(num_samples: int, num_clients: int) -> list[tuple[int, int, int]]:
    """(start, stop, clients) of each group of the shuffled sample list, as the reference slices."""
    num_groups = math.ceil(num_clients / GROUP_SIZE)
    step = int(GROUP_SIZE / num_clients * num_samples)  # reference float expression, kept exact
    bounds, start, left = [], 0, num_clients
    for g in range(num_groups):
        stop = num_samples if g == num_groups - 1 else start + step
        bounds.append((start, stop, min(GROUP_SIZE, left)))
        start, left = start + step, left - GROUP_SIZE
    return bounds


def _split_group(
    members: np.ndarray,
    member_labels: np.ndarray,
    n: int,
    num_classes: int,
    alpha: float,
    rng: np.random.RandomState,
    max_attempts: int,
) -> list[np.ndarray]:
    """Dirichlet label proportions for the n clients of one group, resampled until each client
    holds at least half of its fair share (the reference's `while min_size < ...` loop)."""
    size = members.size
    fair = size / n
    threshold = int(0.50 * size / n)
    if threshold < 1:
        raise ValueError(
            f"a group of {n} clients holds only {size} samples; the reference Dirichlet scheme "
            f"needs at least {2 * n} (2 per client). Use fewer clients or more samples."
        )
    by_class = [members[member_labels == c] for c in range(num_classes)]  # keeps shuffled order
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        sizes = np.zeros(n, dtype=np.int64)
        for idx_class in by_class:
            # 1. one Dirichlet draw per class, also for classes absent from the group (RNG stream)
            proportions = rng.dirichlet(np.repeat(alpha, n))
            # 2. clients that already hold their fair share get nothing more of this class
            # (at tiny alpha the draw can be NaN; handled below, so no RuntimeWarning here)
            with np.errstate(invalid="ignore"):
                proportions = proportions * (sizes < fair)
            total = proportions.sum()
            if idx_class.size == 0:
                pieces = [idx_class[:0]] * n
            elif not (np.isfinite(total) and total > 0):
                # Degenerate draw (all gammas underflow at tiny alpha). The reference's NaN cast
                # gives the whole class to the last client on x86; do that explicitly.
                pieces = [idx_class[:0]] * (n - 1) + [idx_class]
            else:
                cuts = (np.cumsum(proportions / total) * idx_class.size).astype(int)[:-1]
                pieces = np.split(idx_class, cuts)
            for j, piece in enumerate(pieces):
                parts[j].append(piece)
                sizes[j] += piece.size
        if sizes.min() >= threshold:
            return [np.concatenate(p).astype(np.int64) for p in parts]
    raise ValueError(
        f"reference Dirichlet partition: after {max_attempts} redraws no split of a group of {n} "
        f"clients ({size} samples, {int((np.bincount(member_labels) > 0).sum())} classes) gave "
        f"every client at least {threshold} samples with alpha={alpha}. Increase dirichlet-alpha, "
        "use fewer clients or more samples."
    )


def reference_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    num_classes: int | None = None,
    max_attempts: int | None = None,
) -> list[np.ndarray]:
    """The reference label-skew scheme (positions into `labels`), equal sizes up to one sample.

    1. list the samples class by class (ascending position inside a class) and shuffle the list
       with RandomState(seed);
    2. cut it into consecutive groups of 5 clients (the last group takes the remaining clients);
    3. per group and class, split the class's samples by Dirichlet(alpha) proportions, skipping
       clients that already hold their fair share; redraw the whole group until every client
       holds at least half of its fair share (at most `max_attempts` redraws, default
       MAX_DRAWS // C, then ValueError);
    4. concatenate all clients' lists in order and cut them into `num_clients` consecutive
       chunks of equal size (the first N mod K chunks get one more).
    """
    labels, num_classes = _check_labels(labels, num_classes)
    _check_clients(num_clients, labels.size)
    alpha = _check_alpha(alpha)
    if max_attempts is None:
        max_attempts = max(1000, MAX_DRAWS // num_classes)
    rng = np.random.RandomState(seed)

    # 1. class-major list, shuffled jointly (same permutation as the reference's list of pairs)
    order = np.argsort(labels, kind="stable").astype(np.int64)
    rng.shuffle(order)

    # 2.-3. groups of 5 clients, Dirichlet proportions per group
    client_lists: list[np.ndarray] = []
    for start, stop, n in _group_bounds(labels.size, num_clients):
        members = order[start:stop]
        client_lists += _split_group(
            members, labels[members], n, num_classes, alpha, rng, max_attempts
        )

    # 4. rebalance: consecutive equal chunks of the concatenation
    flat = np.concatenate(client_lists)
    return [chunk.astype(np.int64) for chunk in np.array_split(flat, num_clients)]


# --------------------------------------------------------------------------------------------------
# alternatives
# --------------------------------------------------------------------------------------------------
def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded random permutation cut into `num_clients` near-equal parts."""
    _check_clients(num_clients, num_samples)
    perm = np.random.RandomState(seed).permutation(num_samples).astype(np.int64)
    return list(np.array_split(perm, num_clients))


def flwr_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_partition_size: int = 10
) -> list[np.ndarray]:
    """flwr-datasets' DirichletPartitioner (its own resampling, at most 10 tries, then ValueError).

    `min_partition_size` is capped at half the fair share so that small demo sets stay possible.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels, _ = _check_labels(labels, None)
    _check_clients(num_clients, labels.size)
    alpha = _check_alpha(alpha)
    table = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(labels.size))})
    min_size = min(min_partition_size, labels.size // (2 * num_clients))
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = table
    try:
        return [
            np.asarray(partitioner.load_partition(k)["idx"], dtype=np.int64)
            for k in range(num_clients)
        ]
    except ValueError as err:  # flwr-datasets gives up after 10 redraws, in its own words
        raise ValueError(
            f"flwr-dirichlet partition: no split of {labels.size} samples over {num_clients} "
            f"clients with alpha={alpha} gave every client at least {min_size} "
            f"samples ({err}). Increase dirichlet-alpha, use fewer clients or more samples."
        ) from None


def build_partitions(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    alpha: float,
    seed: int,
    imb_factor: float = 1.0,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """One index array (into `labels`) per client.

    `dirichlet-reference` always runs the reference pipeline (long tail with its per-class
    shuffle, then the grouped Dirichlet split); the other methods apply the long tail only
    when imb_factor < 1. Same arguments -> identical arrays.
    """
    labels, num_classes = _check_labels(labels, num_classes)
    if method not in METHODS:
        raise ValueError(f"partition method must be one of {list(METHODS)}, got {method!r}")
    if method == "iid" and imb_factor == 1.0:
        kept = np.arange(labels.size, dtype=np.int64)
    else:
        kept = long_tail_indices(labels, imb_factor, seed, num_classes)
    sub = labels[kept]
    if method == "dirichlet-reference":
        parts = reference_dirichlet(sub, num_clients, alpha, seed, num_classes)
    elif method == "flwr-dirichlet":
        if imb_factor == 1.0:
            kept, sub = np.arange(labels.size, dtype=np.int64), labels
        parts = flwr_dirichlet(sub, num_clients, alpha, seed)
    else:
        parts = iid_partition(sub.size, num_clients, seed)
    return [kept[p] for p in parts]


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------
def class_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Samples per client and class, int64 [K, C]."""
    labels = np.asarray(labels)
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        hist[k] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist


def format_histogram(
    hist: np.ndarray, class_names: Sequence[str] | None = None, max_columns: int = 20
) -> str:
    """A printable table: one row per client; all classes when C <= max_columns, else the top 3."""
    num_clients, num_classes = hist.shape
    totals = hist.sum(axis=1)
    lines = []
    if num_classes <= max_columns:
        names = [str(c) for c in range(num_classes)]
        if class_names is not None:
            names = [n[:6] for n in class_names]
        width = max(6, *(len(n) for n in names))
        lines.append(f"{'client':>6} {'total':>7} " + " ".join(f"{n:>{width}}" for n in names))
        for k in range(num_clients):
            cells = " ".join(f"{v:>{width}d}" for v in hist[k])
            lines.append(f"{k:>6d} {totals[k]:>7d} {cells}")
    else:
        lines.append(f"{'client':>6} {'total':>7} {'classes':>7}  largest classes (share)")
        for k in range(num_clients):
            top = np.argsort(-hist[k], kind="stable")[:3]
            desc = ", ".join(
                f"{class_names[c] if class_names is not None else c} "
                f"({hist[k, c] / max(totals[k], 1):.0%})"
                for c in top
                if hist[k, c] > 0
            )
            lines.append(f"{k:>6d} {totals[k]:>7d} {int((hist[k] > 0).sum()):>7d}  {desc}")
    return "\n".join(lines)

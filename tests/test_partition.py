"""Partitions: exact cover, seed stability, the reference algorithm on checked cases, errors."""

from __future__ import annotations

import numpy as np
import pytest

from feddifrc_core.partition import (
    METHODS,
    build_partitions,
    class_histogram,
    format_histogram,
    iid_partition,
    long_tail_counts,
    long_tail_indices,
    reference_dirichlet,
)


def _balanced_labels(n_per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).permutation(np.repeat(np.arange(num_classes), n_per_class))


def _as_lists(parts: list[np.ndarray]) -> list[list[int]]:
    return [p.tolist() for p in parts]


# Outputs of the authors' utils/sample_dirichlet.py + utils/long_tailed_cifar10.py (commit c305f62)
# with np.random.seed(seed) before the long tail, as their main script does. Checked by running
# that code on these inputs; labels are arange(N) % C.
# fmt: off
REFERENCE_CASES = [
    # (N, C, clients, alpha, seed, imb_factor, expected client lists)
    (20, 2, 5, 1.0, 0, 1.0,
     [[16, 0, 14, 2], [8, 12, 10, 15], [9, 7, 13, 5], [19, 1, 6, 18], [11, 4, 17, 3]]),
    (36, 3, 7, 0.5, 3, 1.0,
     [[13, 16, 25, 31, 26, 35], [32, 20, 7, 8, 34], [28, 29, 33, 18, 12], [3, 5, 11, 2, 0],
      [21, 4, 10, 19, 27], [30, 24, 15, 1, 9], [6, 22, 23, 17, 14]]),
    (60, 3, 5, 0.5, 1, 0.5,
     [[30, 4, 25, 49, 20, 8, 14, 23, 18], [15, 36, 6, 27, 39, 33, 12, 22, 40],
      [10, 28, 37, 58, 16, 54, 51, 48, 24], [9, 45, 42, 0, 56, 17, 3, 21, 57],
      [19, 46, 52, 1, 59, 35, 44, 38]]),
]
# fmt: on


@pytest.mark.parametrize("n,c,k,alpha,seed,imb,expected", REFERENCE_CASES)
def test_reference_dirichlet_reproduces_authors_code(n, c, k, alpha, seed, imb, expected):
    labels = np.arange(n) % c
    parts = build_partitions(labels, k, "dirichlet-reference", alpha, seed, imb_factor=imb)
    assert _as_lists(parts) == expected


def test_reference_groups_of_five_and_equal_sizes():
    # 12 clients -> groups of 5, 5 and 2; after rebalancing all sizes differ by at most one.
    labels = _balanced_labels(100, 10)
    parts = reference_dirichlet(labels, 12, alpha=0.1, seed=7)
    sizes = [p.size for p in parts]
    assert sorted(sizes, reverse=True) == sizes  # the first N mod K chunks are the larger ones
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == labels.size


def test_reference_huge_alpha_splits_every_class_evenly():
    # Dirichlet(1e6) proportions are ~1/5 each: before rebalancing each client gets N_c/5 of every
    # class up to the integer cuts (+-1); the rebalancing shifts chunk borders by a few samples.
    labels = _balanced_labels(50, 4)
    parts = reference_dirichlet(labels, 5, alpha=1e6, seed=0)
    hist = class_histogram(labels, parts, 4)
    assert hist.sum(axis=1).tolist() == [40] * 5
    assert np.abs(hist - 10).max() <= 3


def test_reference_groups_take_consecutive_slices_of_the_shuffled_list():
    # Steps 1, 2 and 4 by hand: with 10 clients the first group of 5 draws only from the first
    # half of the class-major list shuffled by RandomState(seed), and after rebalancing exactly
    # those samples end up in clients 0-4.
    labels = _balanced_labels(30, 4, seed=5)
    order = np.argsort(labels, kind="stable")
    np.random.RandomState(11).shuffle(order)
    parts = reference_dirichlet(labels, 10, alpha=0.3, seed=11)
    first_group = np.concatenate(parts[:5])
    assert sorted(first_group.tolist()) == sorted(order[:60].tolist())


def test_reference_small_alpha_is_skewed_but_every_client_keeps_half_its_share():
    labels = _balanced_labels(200, 10)
    parts = reference_dirichlet(labels, 10, alpha=0.05, seed=7)
    hist = class_histogram(labels, parts, 10)
    # label skew: the biggest class of a client holds a large share of its samples
    assert (hist.max(axis=1) / hist.sum(axis=1)).mean() > 0.4
    assert hist.sum(axis=1).min() >= 0.5 * labels.size / 10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("imb", [1.0, 0.3])
def test_partitions_cover_each_kept_sample_once_and_are_seed_stable(method, imb):
    labels = _balanced_labels(60, 10)
    parts = build_partitions(labels, 10, method, 0.5, seed=3, imb_factor=imb)
    flat = np.concatenate(parts)
    assert np.unique(flat).size == flat.size  # no sample twice
    expected = long_tail_counts(labels.size, 10, imb) if imb < 1 else [60] * 10
    assert np.bincount(labels[flat], minlength=10).tolist() == expected  # all kept samples present
    assert all(p.dtype == np.int64 for p in parts)
    again = build_partitions(labels, 10, method, 0.5, seed=3, imb_factor=imb)
    assert _as_lists(again) == _as_lists(parts)
    other = build_partitions(labels, 10, method, 0.5, seed=4, imb_factor=imb)
    assert _as_lists(other) != _as_lists(parts)


def test_long_tail_counts_hand_checked():
    # floor(100 * 0.1 ** (c / 9)) for c = 0..9
    assert long_tail_counts(1000, 10, 0.1) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert long_tail_counts(1000, 10, 1.0) == [100] * 10
    assert long_tail_counts(30, 1, 0.1) == [30]


def test_long_tail_indices_keep_counts_in_class_order():
    labels = _balanced_labels(100, 10)
    kept = long_tail_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[kept]).tolist() == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert np.all(np.diff(labels[kept]) >= 0)  # class-major, as the reference lists them
    assert not np.all(np.diff(kept[labels[kept] == 0]) > 0)  # shuffled inside a class
    # imb 1 keeps every sample, also of unequal classes
    uneven = np.array([0] * 7 + [1] * 3)
    assert sorted(long_tail_indices(uneven, 1.0, seed=0).tolist()) == list(range(10))


def test_iid_sizes():
    parts = iid_partition(103, 10, seed=0)
    assert [p.size for p in parts] == [11, 11, 11] + [10] * 7


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"num_clients": 41}, "more than the 40 samples"),
        ({"method": "pathological"}, "partition method must be one of"),
        ({"imb_factor": 0.0}, r"imb_factor must be in \(0, 1\]"),
        ({"imb_factor": 1.5}, r"imb_factor must be in \(0, 1\]"),
    ],
)
def test_impossible_settings_raise(kwargs, match):
    args = {"num_clients": 4, "method": "dirichlet-reference", "alpha": 0.5, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_partitions(np.arange(40) % 4, **args)


def test_reference_too_few_samples_per_group_raises():
    # 9 samples for 5 clients: the reference loop would not even run (and drop the samples)
    with pytest.raises(ValueError, match="needs at least 10"):
        reference_dirichlet(np.arange(9) % 3, 5, alpha=1.0, seed=0)


def test_reference_resampling_is_bounded():
    # one class, tiny alpha: a split giving every client >= 10% practically never comes
    with pytest.raises(ValueError, match="after 200 redraws"):
        reference_dirichlet(np.zeros(100, dtype=np.int64), 5, alpha=0.01, seed=0, max_attempts=200)


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="1-D"):
        build_partitions(np.zeros((2, 3), dtype=np.int64), 2, "iid", 1.0, 0)
    with pytest.raises(ValueError, match="integers"):
        build_partitions(np.zeros(4), 2, "iid", 1.0, 0)


def test_histogram_and_format():
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]
    hist = class_histogram(labels, parts, 3)
    assert hist.tolist() == [[1, 1, 0], [1, 0, 3]]
    text = format_histogram(hist, ("cat", "dog", "bird"))
    assert text.splitlines()[0].split() == ["client", "total", "cat", "dog", "bird"]
    assert text.splitlines()[2].split() == ["1", "4", "1", "0", "3"]
    wide = format_histogram(np.eye(2, 30, dtype=np.int64) * 5)
    assert "classes" in wide.splitlines()[0] and "0 (100%)" in wide.splitlines()[1]

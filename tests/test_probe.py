"""Linear probe and kNN: perfect on a separable toy set, chance on random labels."""

from __future__ import annotations

import math

import pytest
import torch

from feddifrc_core.probe import knn_accuracy, linear_probe_accuracy


def _clusters(n_per_class: int, seed: int, classes: int = 5, dim: int = 16):
    """Well separated Gaussian clusters (centres 10 apart, unit noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(classes, dim)  # [C, D]
    labels = torch.arange(classes).repeat_interleave(n_per_class)  # [N]
    return centres[labels] + torch.randn(labels.shape[0], dim, generator=g), labels


def test_separable_set_scores_perfectly() -> None:
    x_tr, y_tr = _clusters(40, seed=0)
    x_te, y_te = _clusters(20, seed=1)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te, seed=0) == 1.0
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=20) == 1.0


def test_random_labels_score_near_chance() -> None:
    g = torch.Generator().manual_seed(2)
    x_tr, x_te = torch.randn(800, 32, generator=g), torch.randn(800, 32, generator=g)
    y_tr, y_te = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (800,), generator=g)
    # chance = 0.25; the std of an 800-sample accuracy is ~0.015
    assert abs(linear_probe_accuracy(x_tr, y_tr, x_te, y_te, seed=0) - 0.25) < 0.06
    assert abs(knn_accuracy(x_tr, y_tr, x_te, y_te, k=20) - 0.25) < 0.06


def test_probe_is_deterministic() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 3, (200,), generator=g)
    a = linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:], seed=5)
    assert a == linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:], seed=5)


def test_knn_vote_is_weighted_by_similarity() -> None:
    # one very close class-0 neighbour (cos 1) outweighs two class-1 neighbours at cos 0.5:
    # e^(1/0.07) > 2 e^(0.5/0.07); a plain majority vote would say class 1
    s = math.sqrt(3) / 2
    train = torch.tensor([[1.0, 0.0], [0.5, s], [0.5, -s], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    test = torch.tensor([[2.0, 0.0]])  # cosine ignores the norm
    assert knn_accuracy(train, labels, test, torch.tensor([0]), k=3) == 1.0
    # with a soft temperature the two class-1 votes win (2 e^(0.5/10) > e^(1/10))
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=10.0) == 1.0


def test_knn_handles_k_larger_than_train_and_chunks() -> None:
    x_tr, y_tr = _clusters(3, seed=0)
    x_te, y_te = _clusters(10, seed=1)
    assert knn_accuracy(x_tr, y_tr, x_te, y_te, k=100, chunk_size=7) == pytest.approx(1.0)


def test_bad_inputs_are_clear_errors() -> None:
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="train_labels"):
        knn_accuracy(x, y[:5], x, y)
    with pytest.raises(ValueError, match="same dimension"):
        linear_probe_accuracy(x, y, torch.randn(10, 3), y)
    with pytest.raises(ValueError, match="`k`"):
        knn_accuracy(x, y, x, y, k=0)

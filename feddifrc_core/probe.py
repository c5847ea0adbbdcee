"""Evaluation of a frozen encoder by its features: linear probe and weighted kNN accuracy.

Used for the self-supervised algorithms (feddifrc-ssl, simclr), whose classifier head is never
trained: the server extracts features of a labelled train subset and of the test set and scores
them here. Both functions are deterministic.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def _check_pair(name: str, feats: torch.Tensor, labels: torch.Tensor) -> None:
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"`{name}_feats` must be a non-empty [N, D] tensor, got {tuple(feats.shape)}")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"`{name}_labels` must be [N={feats.shape[0]}] to match `{name}_feats`, got "
            f"{tuple(labels.shape)}"
        )


def _check_dims(train_feats: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train and test features must have the same dimension, got {train_feats.shape[1]} "
            f"and {test_feats.shape[1]}"
        )


def _check_probe_inputs(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
) -> None:
    _check_pair("train", train_feats, train_labels)
    _check_pair("test", test_feats, test_labels)
    _check_dims(train_feats, test_feats)


def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a multinomial logistic regression (L2, inverse strength `c`, lbfgs) fitted
    on standardised frozen train features. Standardisation statistics come from the train set."""
    scores = linear_probe_accuracies(train_feats, train_labels, {"test": (test_feats, test_labels)},
                                     seed=seed, c=c, max_iter=max_iter)
    return scores["test"]


def linear_probe_accuracies(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    evals: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """`linear_probe_accuracy` on several evaluation sets with ONE fit (test and validation score
    the same probe, as they score the same model)."""
    for name, (feats, labels) in evals.items():
        _check_probe_inputs(train_feats, train_labels, feats, labels)
        if not name:
            raise ValueError("`evals` needs a name for every evaluation set")
    if not c > 0:
        raise ValueError(f"`c` must be > 0, got {c!r}")
    x_train = train_feats.detach().cpu().double().numpy()
    y_train = train_labels.detach().cpu().numpy()
    ys = {name: labels.detach().cpu().numpy() for name, (_, labels) in evals.items()}
    if np.unique(y_train).size < 2:
        # A probe on one class predicts that class; LogisticRegression refuses to fit it.
        return {name: float(np.mean(y == y_train[0])) for name, y in ys.items()}
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # A probe that has not fully converged after max_iter is still a valid (lower) estimate.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    return {name: float(np.mean(clf.predict(scaler.transform(
        feats.detach().cpu().double().numpy())) == ys[name])) for name, (feats, _) in evals.items()}


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Weighted kNN accuracy with cosine similarity (InstDisc/DINO protocol): each of the k nearest
    train samples votes for its label with weight exp(cos / temperature)."""
    _check_probe_inputs(train_feats, train_labels, test_feats, test_labels)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    k = min(k, train_feats.shape[0])
    train_n = F.normalize(train_feats.detach().float().cpu(), dim=1)  # [N, D]
    test_n = F.normalize(test_feats.detach().float().cpu(), dim=1)  # [M, D]
    y_train = train_labels.detach().cpu().long()  # [N]
    y_test = test_labels.detach().cpu().long()  # [M]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for start in range(0, test_n.shape[0], chunk_size):
        sims = test_n[start:start + chunk_size] @ train_n.t()  # [m, N]
        top_sim, top_idx = sims.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()  # [m, k]
        votes = torch.zeros(sims.shape[0], num_classes)  # [m, C]
        votes.scatter_add_(1, y_train[top_idx], weights)
        correct += int((votes.argmax(dim=1) == y_test[start:start + chunk_size]).sum())
    return correct / test_n.shape[0]

"""Evaluation of a model: test loss and accuracy, penultimate features, and the server's central
evaluation of each global model (accuracy, or linear probe + kNN for label-free algorithms)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feddifrc_core.config import RunConfig, resolve_device
from feddifrc_core.datasets import ImageDataset, subsample
from feddifrc_core.models import load_state
from feddifrc_core.probe import knn_accuracy, linear_probe_accuracies
from feddifrc_core.run_setup import (
    build_global_model,
    load_eval_sets,
    load_train_set,
    make_transforms,
)
from feddifrc_core.training import EvalTransform, check_images, check_labels, scale_only


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy
    accuracy: float
    num_examples: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    transform: EvalTransform | None = None,
) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` (eval mode, no grad); restores the train mode."""
    device = torch.device(device)
    n = check_images(images)
    check_labels(labels, n, "evaluate")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    transform = transform or scale_only
    was_training = model.training
    model.to(device).eval()
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, n, batch_size):
        x = transform(images[start:start + batch_size].to(device))  # [B, C, H, W]
        y = labels[start:start + batch_size].to(device)  # [B]
        _, logits = model(x)  # [B, C]
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    return EvalResult(loss=float(loss_sum) / n, accuracy=float(correct) / n, num_examples=n)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    transform: EvalTransform | None = None,
) -> torch.Tensor:
    """Penultimate features [N, D] (float32, CPU) of `model` in eval mode, for probes and kNN."""
    device = torch.device(device)
    n = check_images(images)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    transform = transform or scale_only
    was_training = model.training
    model.to(device).eval()
    out = []
    for start in range(0, n, batch_size):
        feats, _ = model(transform(images[start:start + batch_size].to(device)))  # [B, D]
        out.append(feats.float().cpu())
    model.train(was_training)
    return torch.cat(out)  # [N, D]


class CentralEvaluator:
    """The server's evaluation of a global model state on the test set and, with
    `validation-samples`, on a disjoint validation set from the same split (keys `val-*`): the
    round a summary reports is chosen on validation and scored on test.

    Supervised algorithms: cross-entropy and accuracy of the model's own classifier. Label-free
    algorithms (feddifrc-ssl, simclr) never train the classifier head, so the encoder is judged
    by its frozen features instead: a linear probe and a weighted kNN, both fitted on a labelled
    subset of the training pool (`probe-train-samples`, stratified, seeded) and scored on the test
    (and validation) set. `test-accuracy` is then the linear-probe accuracy, so summaries and
    benchmarks read one key.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))
        self.test, self.validation = load_eval_sets(cfg)
        pool = load_train_set(cfg)
        _, self.transform = make_transforms(cfg, pool.images)
        self.model = build_global_model(cfg, pool.channels, pool.num_classes, pool.image_size)
        # Labels of the probe subset are read on the server only, never sent to a client.
        self.probe_train = (subsample(pool, cfg.probe_train_samples, cfg.seed)[0]
                            if cfg.algorithm_class.label_free else None)

    @property
    def eval_sets(self) -> dict[str, ImageDataset]:
        """Metric prefix -> data set: test, and val when the run holds out a validation set."""
        return {"test": self.test, **({"val": self.validation} if self.validation else {})}

    def __call__(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        load_state(self.model, state)
        if self.probe_train is not None:
            return self._probe()
        out: dict[str, float] = {}
        for prefix, ds in self.eval_sets.items():
            result = evaluate(self.model, ds.images, ds.labels, self.cfg.eval_batch_size,
                              self.device, transform=self.transform)
            out.update({f"{prefix}-loss": result.loss, f"{prefix}-accuracy": result.accuracy})
        return out

    def _probe(self) -> dict[str, float]:
        """Linear-probe and kNN accuracy of the frozen penultimate features."""
        assert self.probe_train is not None  # set in __init__ for label-free algorithms
        probe, bs, dev = self.probe_train, self.cfg.eval_batch_size, self.device
        train_feats = extract_features(self.model, probe.images, bs, dev, self.transform)  # [P, D]
        feats = {prefix: (extract_features(self.model, ds.images, bs, dev, self.transform),
                          ds.labels) for prefix, ds in self.eval_sets.items()}  # [M, D] each
        linear = linear_probe_accuracies(train_feats, probe.labels, feats, seed=self.cfg.seed)
        out: dict[str, float] = {"probe-train-examples": len(probe)}
        for prefix, (x, y) in feats.items():
            knn = knn_accuracy(train_feats, probe.labels, x, y)
            out.update({f"{prefix}-accuracy": linear[prefix],
                        f"{prefix}-probe-accuracy": linear[prefix],
                        f"{prefix}-knn-accuracy": float(knn)})
        return out

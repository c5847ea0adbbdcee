"""What every party builds from the run config: the data pools, this client's partition, the
transforms and the seeded global model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from feddifrc_core.algorithms import TrainTransform
from feddifrc_core.config import ConfigError, RunConfig
from feddifrc_core.datasets import ImageDataset, load_dataset, select_subset, subsample
from feddifrc_core.models import build_model
from feddifrc_core.partition import build_partitions
from feddifrc_core.training import EvalTransform
from feddifrc_core.transforms import TrainAugment


def set_torch_threads(threads: int) -> None:
    """Limit intra-op threads (0 = torch default); many clients share few cores in simulation."""
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _data_root(cfg: RunConfig, data_path: str = "") -> str | None:
    return (data_path or cfg.data_path) or None


def load_train_pool(cfg: RunConfig, data_path: str = "") -> tuple[ImageDataset, np.ndarray]:
    """The clients' training pool (the chosen subset, optionally a seeded stratified subsample)
    and each pool row's index in the full training split.

    Every client computes the same pool and partition from the seed, so no index lists travel.
    """
    ds = load_dataset(cfg.dataset, "train", _data_root(cfg, data_path))  # memoised per process
    ds, subset_rows = select_subset(ds, cfg.data_subset)
    ds, sample_rows = subsample(ds, cfg.train_samples, cfg.seed)
    return ds, subset_rows[sample_rows]


def load_train_set(cfg: RunConfig, data_path: str = "") -> ImageDataset:
    return load_train_pool(cfg, data_path)[0]


def load_test_set(cfg: RunConfig, data_path: str = "") -> ImageDataset:
    return load_eval_sets(cfg, data_path)[0]


def load_eval_sets(cfg: RunConfig, data_path: str = "") -> tuple[ImageDataset, ImageDataset | None]:
    """(test set, validation set or None), both from the test split and disjoint.

    The test set is the seeded, stratified `test-samples` subsample (unchanged by validation, so
    runs with and without it are scored on the same images); the validation set is a seeded,
    stratified `validation-samples` subsample of the images the test set leaves.
    """
    split = load_dataset(cfg.dataset, "test", _data_root(cfg, data_path))
    test, test_rows = subsample(split, cfg.test_samples, cfg.seed)
    if cfg.validation_samples == 0:
        return test, None
    rest = np.setdiff1d(np.arange(len(split)), test_rows)  # sorted rows the test set leaves
    if cfg.validation_samples > len(rest):
        raise ConfigError(
            f"validation-samples={cfg.validation_samples} + test-samples={cfg.test_samples} "
            f"exceed the {len(split)} images of {cfg.dataset}'s test split: lower one of them, "
            f"e.g. -c \"validation-samples={len(split) // 4} "
            f"test-samples={len(split) - len(split) // 4}\" or "
            "validation-samples=0 (validation is drawn from what the test subset leaves)"
        )
    validation, _ = subsample(split.subset(rest), cfg.validation_samples, cfg.seed)
    return test, validation


def client_indices(cfg: RunConfig, labels: np.ndarray, num_classes: int, partition_id: int,
                   num_partitions: int) -> np.ndarray:
    """This client's rows of the training pool (recomputed identically on every node)."""
    parts = build_partitions(labels, num_partitions, cfg.partition, cfg.dirichlet_alpha, cfg.seed,
                             imb_factor=cfg.imb_factor, num_classes=num_classes)
    return parts[partition_id]


def make_transforms(cfg: RunConfig, train_images: torch.Tensor
                    ) -> tuple[TrainTransform, EvalTransform]:
    """(train transform, eval transform) for the run's data set; `augment=false` = normalise only."""
    augment = TrainAugment.for_dataset(cfg.dataset, train_images)
    if cfg.augment:
        return augment, augment.eval
    return (lambda images, generator=None: augment.eval(images)), augment.eval


def build_global_model(cfg: RunConfig, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model every party builds; initialised from the run seed so all runs start equal. The
    algorithm names its alignment head (FedDifRC's `align-head`; none for the others)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, channels, num_classes, cfg.model_width, image_size=image_size,
                           align_head=cfg.new_algorithm().model_head())

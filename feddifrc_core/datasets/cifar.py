"""CIFAR-10 / CIFAR-100: the python pickle batch folders, downloaded (md5-checked) when missing."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from feddifrc_core import paths
from feddifrc_core.datasets.core import (
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    tidy_class_name,
)

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

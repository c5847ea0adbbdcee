"""Image trees: Tiny-ImageNet (tiny-imagenet-200) and <root>/<split>/<class>/<image> folders."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from feddifrc_core import paths
from feddifrc_core.datasets.core import (
    IMAGE_EXTENSIONS,
    IMAGE_FOLDER_FALLBACK_SIZE,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    tidy_class_name,
)


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

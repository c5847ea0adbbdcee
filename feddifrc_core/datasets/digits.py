"""scikit-learn's 8x8 digits, upscaled, with a fixed stratified 80/20 split."""

from __future__ import annotations

import numpy as np
import torch

from feddifrc_core.datasets.core import (
    DIGIT_CLASSES,
    DIGITS_TEST_FRACTION,
    ImageDataset,
)


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

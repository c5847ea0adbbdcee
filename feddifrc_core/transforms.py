"""Torch-only batch transforms on uint8 image batches [B, C, H, W] (no torchvision).

Training augmentation is pad + random crop (+ horizontal flip where mirrored images are still
the same class: not for digits), then normalisation with the data set's channel statistics.
All randomness comes from an explicit `torch.Generator`, so a seeded client repeats its batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Stats = tuple[tuple[float, ...], tuple[float, ...]]

# Per-channel (mean, std) in [0, 1] units. CIFAR and Tiny-ImageNet: the reference code's values;
# the others are measured on the training split (fashion-mnist, mnist: the full 60k; digits: the
# train split as `datasets.load_dataset("digits", "train")` builds it).
DATASET_STATS: dict[str, Stats] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3057,), (0.3241,)),
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# (padding of the random crop, horizontal flip) per data set: ~1/8 of the side as the reference's
# RandomCrop(32, padding=4); no flip for digits, whose mirror images are not digits.
AUGMENT_DEFAULTS: dict[str, tuple[int, bool]] = {
    "fashion-mnist": (2, True),
    "mnist": (2, False),
    "digits": (2, False),
    "cifar10": (4, True),
    "cifar100": (4, True),
    "tiny-imagenet": (8, True),
    "image-folder": (4, True),
}


def dataset_stats(name: str, images: torch.Tensor | None = None) -> Stats:
    """Channel (mean, std) of a named data set; image-folder (or unknown names) from `images`."""
    if name in DATASET_STATS:
        return DATASET_STATS[name]
    if images is None:
        raise ValueError(
            f"no stored channel statistics for dataset {name!r} (known: {sorted(DATASET_STATS)}); "
            "pass its training images to compute them"
        )
    return compute_stats(images)


def compute_stats(images: torch.Tensor) -> Stats:
    """Channel mean and std of a uint8 batch [N, C, H, W], in [0, 1] units."""
    _check_uint8(images, "images")
    x = (
        images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    )  # [C, N*H*W]
    std = x.std(dim=1).clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


def to_float(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std, on the images' device."""
    _check_uint8(images, "images")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(
            f"mean/std have {len(mean)}/{len(std)} channels but images have {images.shape[1]}"
        )
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - m) / s  # [B, C, H, W]


def random_crop_with_padding(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each side by `pad`, then crop the original size at a random offset per image."""
    if x.dim() != 4:
        raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 or x.shape[0] == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # [B, C, H+2p, W+2p]
    dev = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    left = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None]  # [B, 1, 1]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]


def random_hflip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    if x.dim() != 4:
        raise ValueError(f"x must be a batch [B, C, H, W], got shape {tuple(x.shape)}")
    dev = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(x.shape[0], generator=generator, device=dev) < p).to(x.device)  # [B]
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@dataclass(frozen=True)
class TrainAugment:
    """pad + random crop, optional flip, normalisation: uint8 [B, C, H, W] -> float32."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 4  # reference: RandomCrop(32, padding=4)
    flip: bool = True  # reference: RandomHorizontalFlip on CIFAR

    @classmethod
    def for_dataset(cls, name: str, images: torch.Tensor | None = None) -> TrainAugment:
        """The project's augmentation for a data set (AUGMENT_DEFAULTS, DATASET_STATS)."""
        if name not in AUGMENT_DEFAULTS:
            raise ValueError(
                f"no augmentation defaults for dataset {name!r}; use TrainAugment(...)"
            )
        pad, flip = AUGMENT_DEFAULTS[name]
        mean, std = dataset_stats(name, images)
        return cls(mean=mean, std=std, pad=pad, flip=flip)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        _check_uint8(images, "images")
        x = random_crop_with_padding(images, self.pad, generator)  # uint8: black padding
        if self.flip:
            x = random_hflip(x, generator)
        return to_float(x, self.mean, self.std)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time transform: normalisation only."""
        return to_float(images, self.mean, self.std)


def _check_uint8(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images)
        )
        raise ValueError(f"{what} must be a uint8 tensor [B, C, H, W], got {got}")

"""Local models. Every model's forward returns (features [B, D], logits [B, C]) and has
`feature_dim` = D: FedDifRC's losses act on the penultimate features, CE on the logits."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MODEL_NAMES = ("resnet10", "small-cnn")
ALIGN_HEADS = ("none", "linear", "mlp")
MIN_IMAGE_SIZE = 8  # ResNet-10 halves the size three times; below 8 px nothing is left to pool


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 conv) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet as the reference builds it: 3x3 stride-1 stem, no max-pool, four
    stages of widths (1, 2, 4, 8) x width with strides (1, 2, 2, 2), global average pool."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, in_channels=in_channels, width=width)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_planes = [], width
        for i, (blocks, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2), strict=True)):
            planes = width * 2**i
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 8 * width  # 512 for the reference width 64
        self.cls = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))  # [B, w, H, W]
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # [B, 8w, H/8, W/8]
        features = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [B, 8w]
        return features, self.cls(features)  # [B, 8w], [B, C]


def resnet10(num_classes: int, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-10: one BasicBlock per stage (the reference's backbone for CIFAR/Tiny-ImageNet)."""
    return ResNet((1, 1, 1, 1), num_classes, in_channels, width)


class SmallCNN(nn.Module):
    """A fast CPU model: three conv stages (width, 2w, 4w), global pool, a linear feature layer."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, width: int = 32, feature_dim: int = 128
    ) -> None:
        super().__init__()
        _check_positive(
            num_classes=num_classes, in_channels=in_channels, width=width, feature_dim=feature_dim
        )

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            stage(in_channels, width),
            nn.MaxPool2d(2),  # H/2
            stage(width, 2 * width),
            nn.MaxPool2d(2),  # H/4
            stage(2 * width, 4 * width),
        )
        self.fc = nn.Linear(4 * width, feature_dim)
        self.feature_dim = feature_dim
        self.cls = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)  # [B, 4w]
        features = F.relu(self.fc(out))  # [B, D]
        return features, self.cls(features)  # [B, D], [B, C]


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    width: int = 64,
    *,
    feature_dim: int = 128,
    image_size: int | None = None,
    align_head: str,
) -> nn.Module:
    """A model by config name. `width`: ResNet base width (features 8 * width) or SmallCNN's
    first conv width; `feature_dim`: SmallCNN only; `image_size` (optional) is checked;
    `align_head`: "linear" (D -> D) or "mlp" (D -> D -> D, ReLU between) adds a head on which
    the diffusion-alignment losses act; "none" aligns the penultimate features themselves."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model must be one of {list(MODEL_NAMES)}, got {name!r}")
    if align_head not in ALIGN_HEADS:
        raise ValueError(f"align_head must be one of {list(ALIGN_HEADS)}, got {align_head!r}")
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
    model: nn.Module
    if name == "resnet10":
        model = resnet10(num_classes, in_channels, width)
    else:
        model = SmallCNN(num_classes, in_channels, width, feature_dim)
    d = model.feature_dim
    # Post-ReLU features are non-negative while centred targets are signed: a cosine to a signed
    # target is capped at |h+|/|h|. A head (aggregated like every other weight, so all clients
    # share it; never used for classification) lets the aligned space reach any sign pattern.
    if align_head == "linear":
        model.align_head = nn.Linear(d, d)
    elif align_head == "mlp":  # SimCLR / REPA projection head
        model.align_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d))
    return model


def alignment_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The vectors the diffusion-alignment losses (TDCL, NDCR) compare: features through the
    model's alignment head when it has one, else the penultimate features themselves."""
    head = getattr(model, "align_head", None)
    return features if head is None else head(features)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


# --- model state as numpy arrays (what travels and what checkpoints hold) ---------------------
def load_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy numpy arrays into `model` (strict: a server/client architecture mismatch is an error)."""
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the received arrays do not fit the local model ({err}). Server and clients must use "
            "the same model, model-width and data set (class count, channels)"
        ) from None


def model_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# The models' buffers (BatchNorm's): statistics of the data the clients saw, not parameters that a
# gradient moves. A server optimiser (FedAvgM) must leave them at the clients' mean: momentum
# extrapolates a running variance below zero, and evaluation then gives NaN.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def is_running_statistic(key: str) -> bool:
    """Whether the model-state key `key` names a buffer (`RUNNING_STATISTICS`), not a parameter."""
    return key.rsplit(".", 1)[-1] in RUNNING_STATISTICS

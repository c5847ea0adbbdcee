"""The per-client diffusion targets that local training aligns features to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Array names of the spatial-norm-centred set-up (client <-> server): each client's target count and
# sum, and the federated mean target the server sends back with the bases.
TARGET_COUNT, TARGET_SUM, TARGET_OFFSET = "target-count", "target-sum", "target-offset"


@dataclass(frozen=True)
class DiffusionTargets:
    """Projected diffusion representations of one client's samples, in local sample order.

    Row i belongs to the client's i-th training sample (the order of its partition indices).
    """

    positive: torch.Tensor  # [N, D] under the true-class prompt (SSL: the "similar object" prompt)
    negatives: torch.Tensor  # [N, K, D] under K other prompts
    null: torch.Tensor  # [N, D] under the null prompt (SSL: "a photo of a visual object")

    def __post_init__(self) -> None:
        n, d = self.positive.shape
        if self.negatives.ndim != 3 or self.negatives.shape[0] != n or self.negatives.shape[2] != d:
            raise ValueError(f"negatives must be [N={n}, K, D={d}], got {tuple(self.negatives.shape)}")
        if tuple(self.null.shape) != (n, d):
            raise ValueError(f"null must be [N={n}, D={d}], got {tuple(self.null.shape)}")

    def __len__(self) -> int:
        return self.positive.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.positive.shape[1]

    def batch(self, rows: torch.Tensor, device: torch.device | str) -> DiffusionTargets:
        """The rows of one mini-batch, as float32 on `device`."""
        return DiffusionTargets(
            positive=self.positive[rows].to(device, torch.float32),
            negatives=self.negatives[rows].to(device, torch.float32),
            null=self.null[rows].to(device, torch.float32),
        )

"""How one UNet block's output map becomes a vector, inside the extractor's block hook.

Two reductions (METHOD.md, "Diffusion representation", step 6; docs/method.md, "Targets"):
- `MeanPool` ("mean-pool"): g x g spatial average, C_l * g^2 values; the shared projection is
  applied afterwards, so the cache keeps the unprojected pooled vectors.
- `SpatialNorm` ("spatial-norm", the authors' reduction): every spatial position's channel vector
  is centred and projected with the shared basis, then each component's root-mean-square over the
  positions is kept (the reference's L2 norm over positions divided by sqrt(positions)). The result
  is non-negative and does not depend on the sign of any basis column. The basis must exist before
  extraction, so its statistics come from a first pass (`PositionStats`) over the same images.

Each reduction maps hidden [N, C, h, w] -> [N, out_dim(C)] and describes itself for cache keys.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from feddifrc_core.projection import Basis, PcaStats

REDUCTIONS = ("mean-pool", "spatial-norm", "spatial-norm-centred")


class BlockReduction(Protocol):
    # False: a row-wise map, given the extractor's whole fixed-shape batch (padding rows dropped
    # afterwards); True: it accumulates over rows and is given the real rows only.
    accumulates: bool

    def out_dim(self, channels: int) -> int: ...

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, C, h, w] -> [N, out]

    def describe(self) -> dict[str, Any]: ...


class MeanPool:
    """g x g adaptive average pooling, flattened: [N, C, h, w] -> [N, C * g^2]."""

    accumulates = False

    def __init__(self, grid: int = 1) -> None:
        if int(grid) < 1:
            raise ValueError(f"`grid` must be >= 1, got {grid}")
        self.grid = int(grid)

    def out_dim(self, channels: int) -> int:
        return channels * self.grid**2

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(hidden.float(), self.grid).flatten(1)  # [N, C * g^2]

    def describe(self) -> dict[str, Any]:
        return {"kind": "mean-pool", "grid": self.grid}


class SpatialNorm:
    """Per-position projection with a shared basis, then the RMS of each component over positions."""

    accumulates = False

    def __init__(self, basis: Basis) -> None:
        self.basis = basis
        self._mean = torch.as_tensor(basis.mean, dtype=torch.float32)  # [C]
        self._components = torch.as_tensor(basis.components, dtype=torch.float32)  # [C, d]

    def out_dim(self, channels: int) -> int:
        if channels != self.basis.in_dim:
            raise ValueError(
                f"spatial-norm basis expects {self.basis.in_dim} channels, the block has {channels}"
            )
        return self.basis.out_dim

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float().flatten(2).transpose(1, 2)  # [N, h*w, C]
        mean = self._mean.to(x.device)
        comps = self._components.to(x.device)
        y = (x - mean) @ comps  # [N, h*w, d]
        return y.square().mean(dim=1).sqrt()  # [N, d], >= 0, sign-free per column

    def describe(self) -> dict[str, Any]:
        return {"kind": "spatial-norm", "basis_sha256": basis_sha256(self.basis)}


class PositionStats:
    """Accumulates count, sum and outer products of every position's channel vector (float64).

    Used as a reduction in the statistics pass: it returns no values ([N, 0]) and keeps the
    sufficient statistics of the federated per-position PCA in `stats`.
    """

    accumulates = True

    def __init__(self, channels: int) -> None:
        self.stats = PcaStats(0, np.zeros(channels), np.zeros((channels, channels)))

    def out_dim(self, channels: int) -> int:
        return 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.double().flatten(2).transpose(1, 2).reshape(-1, hidden.shape[1])  # [N*h*w, C]
        s = self.stats
        self.stats = PcaStats(
            count=s.count + int(x.shape[0]),
            sum=s.sum + x.sum(dim=0).cpu().numpy(),
            outer=s.outer + (x.T @ x).cpu().numpy(),
        )
        return hidden.new_zeros(hidden.shape[0], 0, dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": "position-stats"}


def basis_sha256(basis: Basis) -> str:
    """Content hash of a basis as it travels (float32): part of spatial-norm cache keys."""
    h = hashlib.sha256()
    for arr in (basis.mean, basis.components):
        a = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()

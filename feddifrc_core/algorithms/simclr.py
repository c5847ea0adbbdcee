"""SimCLR (Chen et al. 2020), federated: NT-Xent between two random augmentations of each image;
label-free, a baseline for feddifrc-ssl."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from feddifrc_core.algorithms.base import (
    Algorithm,
    AlgorithmParams,
    Batch,
    Parts,
    TrainTransform,
)
from feddifrc_core.losses import nt_xent
from feddifrc_core.options import option


@dataclass(frozen=True)
class SimCLRParams(AlgorithmParams):
    simclr_temperature: float = option(0.5, lo=0.0, lo_open=True, help="NT-Xent temperature")


class SimCLR(Algorithm):
    name = "simclr"
    Params = SimCLRParams
    params: SimCLRParams
    label_free = True

    def config_problem(self) -> str | None:
        if not self.cfg.augment:  # caught on the server instead of in every ClientApp of round 1
            return ("algorithm 'simclr' contrasts two random augmentations of each image; "
                    "with augment=false both views are identical: set augment=true")
        return None

    def check_inputs(self, model: nn.Module, num_samples: int,
                     transform: TrainTransform | None) -> None:
        if transform is None:
            raise ValueError("simclr contrasts two random augmentations: pass a random `transform`")
        if num_samples < 2:
            raise ValueError(f"simclr needs at least 2 samples, got {num_samples}")

    def batch_loss(self, model: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[Parts, torch.Tensor | None]:
        x2 = batch.transform(batch.images, batch.generator)  # [B, C, H, W] second view
        feats, _ = model(torch.cat([x, x2]))  # [2B, D]: one pass, shared BatchNorm statistics
        z1, z2 = feats.chunk(2)
        return {"ntxent": (1.0, nt_xent(z1, z2, self.params.simclr_temperature))}, None

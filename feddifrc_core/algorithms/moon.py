"""MOON (Li et al. 2021): cross-entropy + a contrastive term that pulls the local features toward
the global model's and away from this client's previous local model's."""

from __future__ import annotations

import torch
from torch import nn

from feddifrc_core.algorithms.base import Algorithm, Batch, Parts, frozen_copy
from feddifrc_core.losses import moon_loss
from feddifrc_core.targets import DiffusionTargets


class Moon(Algorithm):
    name = "moon"
    keeps_previous_model = True
    settings = ("moon_mu", "moon_temperature")

    def prepare(self, model: nn.Module, device: torch.device, targets: DiffusionTargets | None,
                global_model: nn.Module | None, previous_model: nn.Module | None) -> None:
        self.anchor = frozen_copy(global_model if global_model is not None else model, device)
        # No previous model (the client's first round) = the global model: the MOON term is then a
        # constant log 2 with zero gradient (MOON's code has no negative in its first round).
        self.previous = (frozen_copy(previous_model, device) if previous_model is not None
                         else self.anchor)

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        if not self.cfg.moon_mu > 0:
            return {}
        with torch.no_grad():
            z_g = self.anchor(x)[0]  # [B, D]
            z_p = self.previous(x)[0] if self.previous is not self.anchor else z_g  # [B, D]
        return {"moon": (self.cfg.moon_mu, moon_loss(z, z_g, z_p, self.cfg.moon_temperature))}

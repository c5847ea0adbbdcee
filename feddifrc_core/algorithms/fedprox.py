"""FedProx (Li et al. 2020): cross-entropy + mu/2 * ||w - w_global||^2 keeps the update near the
global model it started from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from feddifrc_core.algorithms.base import Algorithm, AlgorithmParams, Batch, Parts, frozen_copy
from feddifrc_core.losses import fedprox_term
from feddifrc_core.options import option


@dataclass(frozen=True)
class FedProxParams(AlgorithmParams):
    proximal_mu: float = option(0.01, lo=0.0, help="proximal weight mu (0 = FedAvg)")


class FedProx(Algorithm):
    name = "fedprox"
    Params = FedProxParams
    params: FedProxParams

    def prepare(self, model: nn.Module, device: torch.device, global_model: nn.Module | None
                ) -> None:
        # The anchor: the global model as it arrived (None = `model` before its first step).
        anchor = frozen_copy(global_model if global_model is not None else model, device)
        self.anchor_params = [p.detach() for p in anchor.parameters()]

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        mu = self.params.proximal_mu
        return {"prox": (mu, fedprox_term(model, self.anchor_params, 1.0))} if mu > 0 else {}

"""MOON (Li et al. 2021): cross-entropy + a contrastive term that pulls the local features toward
the global model's and away from this client's previous local model's.

The previous local model is kept on the client's disk (`caches.LocalModelStore`), one file per
round it trained in: simulation memory stays flat, and a resumed run reads exactly the model an
uninterrupted run would have used.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from feddifrc_core.algorithms.base import (
    Algorithm,
    AlgorithmParams,
    Arrays,
    Batch,
    ClientView,
    Parts,
    UpdateInfo,
    frozen_copy,
)
from feddifrc_core.caches import LocalModelStore
from feddifrc_core.losses import moon_loss
from feddifrc_core.models import load_state
from feddifrc_core.options import option


@dataclass(frozen=True)
class MoonParams(AlgorithmParams):
    moon_mu: float = option(1.0, lo=0.0, help="weight of the contrastive term (MOON paper: 1)")
    moon_temperature: float = option(0.5, lo=0.0, lo_open=True, help="MOON paper temperature")


class Moon(Algorithm):
    name = "moon"
    Params = MoonParams
    params: MoonParams
    previous_model: nn.Module | None = None  # this client's last local model (None: first round)

    # --- client half: the previous local model, on disk --------------------------------------------
    @staticmethod
    def store(client: ClientView, update: UpdateInfo) -> LocalModelStore:
        # keyed by run: a new run reusing a run-name never reads or prunes the older run's files
        run = f"{update.run_name}-{update.run_key}" if update.run_key else update.run_name
        return LocalModelStore(client.cache_dir / "local-models" / run, client.partition_id)

    def begin_update(self, client: ClientView, update: UpdateInfo, model: nn.Module) -> None:
        state = self.store(client, update).load_before(update.server_round)
        if state is not None:
            self.previous_model = copy.deepcopy(model)
            load_state(self.previous_model, state)

    def end_update(self, client: ClientView, update: UpdateInfo,
                   state: Mapping[str, np.ndarray]) -> Arrays:
        self.store(client, update).save(update.server_round, state)
        return {}

    # --- local training ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, device: torch.device, global_model: nn.Module | None
                ) -> None:
        self.anchor = frozen_copy(global_model if global_model is not None else model, device)
        # No previous model (the client's first round) = the global model: the MOON term is then a
        # constant log 2 with zero gradient (MOON's code has no negative in its first round).
        self.previous = (frozen_copy(self.previous_model, device)
                         if self.previous_model is not None else self.anchor)

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        if not self.params.moon_mu > 0:
            return {}
        with torch.no_grad():
            z_g = self.anchor(x)[0]  # [B, D]
            z_p = self.previous(x)[0] if self.previous is not self.anchor else z_g  # [B, D]
        return {"moon": (self.params.moon_mu,
                         moon_loss(z, z_g, z_p, self.params.moon_temperature))}

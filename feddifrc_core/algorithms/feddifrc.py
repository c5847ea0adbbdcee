"""FedDifRC (Wang et al., ICCV 2025): cross-entropy + TDCL + NDCR toward each client's diffusion
targets in one shared, frozen feature space (METHOD.md).

Server half: the shared basis. Every client uploads the sufficient statistics of its diffusion
features (count, sum, outer products); their exact sum gives the federated-PCA (or mean-centred
random) bases, which travel with every train message and are checkpointed. With
`reduction = "spatial-norm-centred"` a second stage sums the clients' projected targets, and the
federated mean target travels with the bases. Client half: answer those stages from the client's
cached representations, and train toward its targets through the model's alignment head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from feddifrc_core import projection
from feddifrc_core.algorithms.base import (
    Algorithm,
    AlgorithmParams,
    Arrays,
    Batch,
    ClientView,
    Federation,
    Parts,
    TrainTransform,
    UpdateInfo,
)
from feddifrc_core.losses import NDCR_KINDS, ndcr_loss, tdcl_loss
from feddifrc_core.models import ALIGN_HEADS, alignment_features
from feddifrc_core.options import option
from feddifrc_core.targets import TARGET_COUNT, TARGET_OFFSET, TARGET_SUM, DiffusionTargets

logger = logging.getLogger(__name__)

# The set-up stages (message `query.setup`, `stage` = one of these)
PROJECTION_STATS, TARGET_SUMS = "projection-stats", "target-sums"


@dataclass(frozen=True)
class FedDifRCParams(AlgorithmParams):
    lambda_tdcl: float = option(1.0, lo=0.0, help="weight of TDCL (reference 1); 0 switches it off")
    lambda_ndcr: float = option(1.0, lo=0.0, help="weight of NDCR (reference 1); 0 switches it off")
    tau: float = option(0.04, lo=0.0, lo_open=True, help="TDCL's InfoNCE temperature (reference)")
    ndcr_loss: str = option("l2", choices=NDCR_KINDS,
                            help="NDCR's distance: l2 of unit vectors (project decision, METHOD.md)")
    # The reference aligns the post-ReLU features z directly ("none"); "linear" / "mlp" add a
    # shared head (D -> D, or D -> D -> D with a ReLU as in SimCLR/REPA) on which the alignment
    # losses act, so z >= 0 can still match signed targets. "linear": chosen by a 3-seed training
    # comparison (docs/results.md, "Choice of the targets"; docs/method.md, "Targets").
    align_head: str = option("linear", choices=ALIGN_HEADS,
                             help="head the alignment losses act through")


class FedDifRC(Algorithm):
    name = "feddifrc"
    Params = FedDifRCParams
    params: FedDifRCParams
    uses_diffusion = True
    targets: DiffusionTargets | None = None  # this update's targets (begin_update)

    def model_head(self) -> str:
        return self.params.align_head

    # --- server half: the shared basis (state: "basis.*" arrays, + "target-offset") --------------
    def setup(self, federation: Federation, feature_dim: int) -> None:
        if self.state:  # restored from the checkpoint of a resumed run
            return
        cfg = self.cfg
        stats = federation.gather(PROJECTION_STATS, {}, rule="sum")
        merged = projection.arrays_to_stats(stats.arrays)  # the exact statistics of the union
        bases = projection.shared_bases(cfg.projection, feature_dim, [s.dim for s in merged],
                                        cfg.seed, merged)
        self.state = projection.bases_to_arrays(bases)
        logger.info("projection: %s (%s) from %d clients (slowest extraction %.1f s), output "
                    "dims %s", cfg.projection, cfg.reduction, stats.clients,
                    stats.metrics.get("setup-seconds", 0.0), [b.out_dim for b in bases])
        if cfg.reduction == "spatial-norm-centred":
            sums = federation.gather(TARGET_SUMS, self.state, rule="sum")
            count = int(sums.arrays[TARGET_COUNT].reshape(-1)[0])
            offset = sums.arrays[TARGET_SUM] / max(count, 1)  # [D] float64
            self.state[TARGET_OFFSET] = offset.astype(np.float32)
            logger.info("target mean from %d clients (%d vectors), norm %.3f", sums.clients,
                        count, float(np.linalg.norm(self.state[TARGET_OFFSET])))

    def train_payload(self) -> Arrays:
        return dict(self.state)

    # --- client half -----------------------------------------------------------------------------
    def answer(self, stage: str, client: ClientView, payload: Mapping[str, np.ndarray]) -> Arrays:
        if stage == PROJECTION_STATS:
            return client.diffusion.projection_stats()
        if stage == TARGET_SUMS:
            return client.diffusion.target_sum(payload)
        return super().answer(stage, client, payload)

    def begin_update(self, client: ClientView, update: UpdateInfo, model: nn.Module) -> None:
        # extracted on the first update of this client, then read from its feature cache
        feature_dim = cast(int, model.feature_dim)  # every project model has one
        self.targets = client.diffusion.targets(update.payload, feature_dim)

    # --- local training --------------------------------------------------------------------------
    def check_inputs(self, model: nn.Module, num_samples: int,
                     transform: TrainTransform | None) -> None:
        targets = self.targets
        if targets is None:
            raise ValueError(
                f"algorithm {self.name!r} needs the client's DiffusionTargets but none were given; "
                "extract them first (feature cache) or choose fedavg/fedprox/moon")
        if len(targets) != num_samples:
            raise ValueError(f"`targets` must have one row per image ({num_samples}), got "
                             f"{len(targets)}")
        model_dim = getattr(model, "feature_dim", targets.feature_dim)
        if targets.feature_dim != model_dim:
            raise ValueError(
                f"`targets` have {targets.feature_dim} dims but the model's features have "
                f"{model_dim}; project the diffusion features to the model's feature size")

    def prepare(self, model: nn.Module, device: torch.device, global_model: nn.Module | None
                ) -> None:
        assert self.targets is not None  # check_inputs refused an update without them
        self.on_device = DiffusionTargets(
            positive=self.targets.positive.to(device, torch.float32),  # [N, D]
            negatives=self.targets.negatives.to(device, torch.float32),  # [N, K, D]
            null=self.targets.null.to(device, torch.float32),  # [N, D]
        )

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        p, tgt, rows = self.params, self.on_device, batch.rows
        za = alignment_features(model, z)  # [B, D]: z, or the align head's output
        parts: Parts = {}
        if p.lambda_tdcl > 0:
            pos, neg = tgt.positive[rows], tgt.negatives[rows]  # [B, D], [B, K, D]
            parts["tdcl"] = (p.lambda_tdcl, tdcl_loss(za, pos, neg, p.tau))
        if p.lambda_ndcr > 0:
            parts["ndcr"] = (p.lambda_ndcr, ndcr_loss(za, tgt.null[rows], p.ndcr_loss))
        return parts

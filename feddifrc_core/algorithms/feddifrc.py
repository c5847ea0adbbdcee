"""FedDifRC (Wang et al., ICCV 2025): cross-entropy + TDCL + NDCR toward the client's diffusion
targets (METHOD.md). The targets come from the shared, frozen diffusion feature space."""

from __future__ import annotations

import torch
from torch import nn

from feddifrc_core.algorithms.base import Algorithm, Batch, Parts
from feddifrc_core.losses import ndcr_loss, tdcl_loss
from feddifrc_core.models import alignment_features
from feddifrc_core.targets import DiffusionTargets


class FedDifRC(Algorithm):
    name = "feddifrc"
    needs_targets = True
    settings = ("lambda_tdcl", "lambda_ndcr", "tau", "ndcr_loss", "neg_num")

    def prepare(self, model: nn.Module, device: torch.device, targets: DiffusionTargets | None,
                global_model: nn.Module | None, previous_model: nn.Module | None) -> None:
        assert targets is not None  # train_local checks targets for every needs_targets algorithm
        self.targets = DiffusionTargets(
            positive=targets.positive.to(device, torch.float32),  # [N, D]
            negatives=targets.negatives.to(device, torch.float32),  # [N, K, D]
            null=targets.null.to(device, torch.float32),  # [N, D]
        )

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        cfg, tgt, rows = self.cfg, self.targets, batch.rows
        za = alignment_features(model, z)  # [B, D]: z, or the align head's output
        parts: Parts = {}
        if cfg.lambda_tdcl > 0:
            pos, neg = tgt.positive[rows], tgt.negatives[rows]  # [B, D], [B, K, D]
            parts["tdcl"] = (cfg.lambda_tdcl, tdcl_loss(za, pos, neg, cfg.tau))
        if cfg.lambda_ndcr > 0:
            parts["ndcr"] = (cfg.lambda_ndcr, ndcr_loss(za, tgt.null[rows], cfg.ndcr_loss))
        return parts

"""FedAvg + knowledge distillation toward the diffusion teacher's zero-shot classifier (a control,
not in the paper): cross-entropy + kd-weight * T^2 KL(teacher || student) on the client's own
images, the teacher's logits computed once per image on the client (teacher_logits.py).

The control asks whether FedDifRC's gain is just the teacher's class knowledge (it was trained
on the labelled public half): this gives FedAvg that knowledge directly, through the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from feddifrc_core.algorithms.base import Algorithm, Batch, Parts
from feddifrc_core.losses import kd_loss


class FedAvgKD(Algorithm):
    name = "fedavg-kd"
    needs_teacher_logits = True
    settings = ("kd_weight", "kd_temperature", "zero_shot_timesteps", "zero_shot_draws")

    def prepare_teacher_logits(self, logits: torch.Tensor) -> None:
        self.teacher = logits  # [N, C] on the training device

    def batch_loss(self, model: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[Parts, torch.Tensor | None]:
        parts, logits = super().batch_loss(model, x, batch)  # cross-entropy
        assert logits is not None  # every project model has a classifier
        if self.cfg.kd_weight > 0:
            teacher = self.teacher[batch.rows]  # [B, C]
            parts["kd"] = (self.cfg.kd_weight, kd_loss(logits, teacher, self.cfg.kd_temperature))
        return parts, logits

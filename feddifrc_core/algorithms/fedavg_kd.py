"""FedAvg + knowledge distillation toward the diffusion teacher's zero-shot classifier (a control,
not in the paper): cross-entropy + kd-weight * T^2 KL(teacher || student) on the client's own
images, the teacher's logits computed once per image on the client (teacher_logits.py).

The control asks whether FedDifRC's gain is just the teacher's class knowledge (it was trained
on the labelled public half): this gives FedAvg that knowledge directly, through the logits.
Server half: FedAvg's. Client half: the logits of its images before each update (computed on the
first, then read from the client's disk), never sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from feddifrc_core.algorithms.base import (
    Algorithm,
    AlgorithmParams,
    Batch,
    ClientView,
    Parts,
    TrainTransform,
    UpdateInfo,
)
from feddifrc_core.losses import kd_loss
from feddifrc_core.options import int_list, option
from feddifrc_core.zero_shot import ZeroShotSettings


@dataclass(frozen=True)
class FedAvgKDParams(AlgorithmParams):
    kd_weight: float = option(
        1.0, lo=0.0, help="weight of the distillation term (the weight FedDifRC's two terms have)")
    # The classifier's own scale: its logits are -E||eps - eps_theta||^2, log-likelihood ratios
    # up to a constant (zero_shot.py), so T = 1 is calibrated (docs/results.md, "Controls").
    kd_temperature: float = option(1.0, lo=0.0, lo_open=True, help="distillation temperature T")
    # One UNet call of classes x timesteps x draws passes per image, ~0.1 s per pass set on 2
    # cores; the choice is measured on private images in docs/results.md ("Controls").
    zero_shot_timesteps: str = option(
        "500", help="the zero-shot classifier's timesteps, comma-separated, e.g. '100,500'")
    zero_shot_draws: int = option(1, lo=1, help="noise draws per timestep")

    @property
    def zero_shot_timestep_ids(self) -> tuple[int, ...]:
        return int_list(self.zero_shot_timesteps, "zero-shot-timesteps", "'500'", sort=False)

    def __post_init__(self) -> None:
        _ = self.zero_shot_timestep_ids  # a malformed list fails when the run config is parsed


class FedAvgKD(Algorithm):
    name = "fedavg-kd"
    Params = FedAvgKDParams
    params: FedAvgKDParams
    reads_teacher = True
    teacher: torch.Tensor | None = None  # [N, C] logits of this client's images (begin_update)

    # --- client half: the teacher's logits of this client's images -------------------------------
    def zero_shot_settings(self) -> ZeroShotSettings:
        p, cfg = self.params, self.cfg
        return ZeroShotSettings(timesteps=p.zero_shot_timestep_ids, draws=p.zero_shot_draws,
                                seed=cfg.seed, image_size=cfg.diffusion_image_size)

    def begin_update(self, client: ClientView, update: UpdateInfo, model: nn.Module) -> None:
        self.teacher = client.diffusion.teacher_logits(self.zero_shot_settings())

    # --- local training ----------------------------------------------------------------------------
    def check_inputs(self, model: nn.Module, num_samples: int,
                     transform: TrainTransform | None) -> None:
        logits = self.teacher
        if logits is None:
            raise ValueError(f"algorithm {self.name!r} distils the teacher's zero-shot logits but "
                             "none were given; compute them first (teacher_logits.py)")
        if logits.ndim != 2 or logits.shape[0] != num_samples or not torch.isfinite(logits).all():
            raise ValueError(f"the teacher logits must be finite [N={num_samples}, C], got shape "
                             f"{tuple(logits.shape)}")

    def prepare(self, model: nn.Module, device: torch.device, global_model: nn.Module | None
                ) -> None:
        assert self.teacher is not None  # check_inputs refused an update without them
        self.on_device = self.teacher.to(device, torch.float32)  # [N, C]

    def batch_loss(self, model: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[Parts, torch.Tensor | None]:
        parts, logits = super().batch_loss(model, x, batch)  # cross-entropy
        assert logits is not None  # every project model has a classifier
        if self.params.kd_weight > 0:
            teacher = self.on_device[batch.rows]  # [B, C]
            parts["kd"] = (self.params.kd_weight,
                           kd_loss(logits, teacher, self.params.kd_temperature))
        return parts, logits

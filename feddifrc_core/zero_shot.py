"""The diffusion teacher's zero-shot classifier: class logits of an image from denoising errors.

Li et al. 2023 ("Your diffusion model is secretly a zero-shot classifier"): the frozen denoiser
predicts the noise added to an image best under the prompt of its class. An image's logit for
class c is

    logit_c = - mean over (t, eps) of || target(x, eps, t) - unet(x_t, t, prompt_c) ||^2

(squared error summed over the UNet input's elements; target = eps for epsilon prediction, the
velocity for v prediction), over the given timesteps x `draws` noise draws each, with the same
noise for every prompt of an image (the prompts are compared on equal terms). softmax of the
logits is the classifier's posterior under a uniform prior, up to the ELBO's weighting.

Batch invariance: an image's passes (prompts x timesteps x draws) form one UNet call that holds
nothing else, and its noise comes from CPU generators seeded by (seed, sample id, draw). Its
logits are therefore the same bits whichever other images are computed with it, in any order, so
a value read from a cache equals a fresh one. The UNet runs in the backbone's weight dtype, also
where the extraction autocasts to bfloat16 (`diffusion-dtype` bfloat16-mixed): on a CPU the logits,
and the accuracies measured for them (docs/results.md), are float32's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.diffusion.extractor import to_model_pixels
from feddifrc_core.seeding import hashed_seed

NOISE_STREAM = "zero-shot"  # keeps these draws apart from the extractor's (seed, id, member)


@dataclass(frozen=True)
class ZeroShotSettings:
    """What determines the logits besides the backbone, the images and the prompts."""

    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)  # 5 stratified (the teacher probe's)
    draws: int = 1  # noise draws per timestep
    seed: int = 0
    image_size: int = 0  # 0 = the backbone's native input size

    def __post_init__(self) -> None:
        if not self.timesteps or any(int(t) < 0 for t in self.timesteps):
            raise ValueError(f"`timesteps` must be non-empty and >= 0, got {self.timesteps}")
        if int(self.draws) < 1:
            raise ValueError(f"`draws` must be >= 1, got {self.draws}")
        if int(self.image_size) < 0:
            raise ValueError(f"`image_size` must be >= 0 (0 = native), got {self.image_size}")

    @staticmethod
    def stratified(count: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
        """`count` timesteps at the centres of equal parts of the schedule."""
        return tuple(int((k + 0.5) * num_train_timesteps / count) for k in range(count))

    def fingerprint(self, backbone: DiffusionBackbone) -> dict[str, Any]:
        return {"timesteps": [int(t) for t in self.timesteps], "draws": self.draws,
                "seed": self.seed, "image_size": self.image_size or int(backbone.sample_size),
                "prediction": _prediction_type(backbone), "noise-stream": NOISE_STREAM}


def _prediction_type(backbone: DiffusionBackbone) -> str:
    return str(getattr(backbone.scheduler.config, "prediction_type", "epsilon"))


def image_noise(shape: Sequence[int], sample_id: int, settings: ZeroShotSettings) -> torch.Tensor:
    """[timesteps * draws, *shape] float32 noise of one image, pass j seeded by (seed, id, j)."""
    count = len(settings.timesteps) * settings.draws
    out = torch.empty((count, *shape), dtype=torch.float32)
    gen = torch.Generator(device="cpu")  # CPU: the same numbers on every device
    for j in range(count):
        gen.manual_seed(hashed_seed(settings.seed, int(sample_id), NOISE_STREAM, j))
        out[j] = torch.randn(tuple(shape), generator=gen)
    return out


@torch.no_grad()
def zero_shot_logits(backbone: DiffusionBackbone, images: torch.Tensor, sample_ids: Sequence[int],
                     prompts: Sequence[str], settings: ZeroShotSettings) -> torch.Tensor:
    """Class logits [N, P] float32 (CPU) of uint8 images [N, C, H, W] under `prompts`.

    `sample_ids` (one per image, e.g. its index in the data split) seed the noise.
    """
    n = int(images.shape[0])
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"`images` must be uint8 [N, C, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if len(sample_ids) != n:
        raise ValueError(f"`sample_ids` must have one id per image ({n}), got {len(sample_ids)}")
    if not prompts:
        raise ValueError("`prompts` must name at least one class")
    bb, num_p = backbone, len(prompts)
    num_t = int(bb.scheduler.config.num_train_timesteps)
    if max(settings.timesteps) >= num_t:
        raise ValueError(f"`timesteps` must be < {num_t} (the schedule's length), got "
                         f"{settings.timesteps}")
    steps = torch.tensor(settings.timesteps, dtype=torch.long).repeat_interleave(
        settings.draws)  # [J]: pass j = (timestep j // draws, draw j % draws)
    passes = int(steps.numel())
    embeds = bb.encode_prompts(list(prompts))  # [P, L, D]
    ctx = embeds.repeat_interleave(passes, dim=0)  # [P*J, L, D], prompt-major
    t_all = steps.repeat(num_p).to(bb.device)  # [P*J]
    size = settings.image_size or int(bb.sample_size)
    v_prediction = _prediction_type(bb) == "v_prediction"
    out = torch.empty((n, num_p), dtype=torch.float32)
    for row in range(n):
        # 1. the image in the UNet's input space, and its own seeded noise for every pass
        x = bb.encode_images(to_model_pixels(images[row:row + 1], size, bb.in_channels,
                                             bb.device, bb.dtype))  # [1, c, h, w]
        noise = image_noise(x.shape[1:], int(sample_ids[row]), settings).to(bb.device, bb.dtype)
        t = steps.to(bb.device)
        x_rep = x.expand(passes, *x.shape[1:])  # [J, c, h, w]
        noisy = bb.scheduler.add_noise(x_rep, noise, t)  # [J, c, h, w]
        target = bb.scheduler.get_velocity(x_rep, noise, t) if v_prediction else noise
        # 2. one UNet call with every prompt x pass of this image, nothing else
        pred = bb.unet(noisy.repeat(num_p, 1, 1, 1), t_all, encoder_hidden_states=ctx).sample
        err = (pred.float() - target.float().repeat(num_p, 1, 1, 1)).pow(2)  # [P*J, c, h, w]
        # 3. logit = - mean over passes of the summed squared error
        out[row] = -err.flatten(1).sum(dim=1).view(num_p, passes).mean(dim=1).cpu()
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Share of images whose largest logit is their label's."""
    y = torch.as_tensor(labels)
    return float((logits.argmax(dim=1) == y).float().mean())

"""The teacher's configuration: the UNet's constructor arguments, the diffusion schedule, the
optimisation. A shipped teacher.json stores it (`training`), so a model can be rebuilt from it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel

from feddifrc_core.diffusion.minilm import MINILM_DIM
from feddifrc_core.prompts import class_prompts


@dataclass(frozen=True)
class TeacherConfig:
    # --- architecture (the config *is* the UNet's constructor arguments) ---------------------
    image_size: int = 28  # native Fashion-MNIST size; 3 blocks = 2 down-samplings: 28/14/7
    in_channels: int = 1  # grey-scale pixel space, no VAE
    # 4.2M params (8 MB in fp16). 224 pooled channels fill the clients' 128 target dims (the
    # earlier 16/32/64 gave 112, so 16 target columns were zero); ~0.75 s/step on 2 free cores.
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_heads: int = 2
    norm_num_groups: int = 8  # 16 channels cannot take the default 32 groups
    cross_attention_dim: int = MINILM_DIM  # MiniLM token states are 384-d
    max_length: int = 16  # padded caption length (captions have <= 12 word pieces)
    # --- diffusion ------------------------------------------------------------------------------
    num_train_timesteps: int = 1000  # DDPM
    beta_schedule: str = "linear"  # DDPM's linear betas 1e-4 .. 0.02
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # --- data and captions -----------------------------------------------------------------------
    prompt_template: str = "a photo of a {}"  # the same template the federation uses
    caption_dropout: float = 0.1  # share of captions replaced by "" (trains the null prompt)
    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = 64
    lr: float = 1e-3  # AdamW; a small UNet tolerates a high rate after warm-up
    weight_decay: float = 1e-2
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% at `max_steps`
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA weights are what ships
    max_steps: int = 2808  # 6 epochs of the 30k public half (468 steps each)
    bf16_autocast: bool = True  # CPU bf16 matmuls/convs (AVX512-BF16): 35% less time per step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"`image_size` must be divisible by 2**(len(block_out_channels)-1) = "
                f"{2 ** (len(self.block_out_channels) - 1)}, got {self.image_size}."
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every entry of `block_out_channels` {self.block_out_channels} must be "
                f"divisible by `norm_num_groups` = {self.norm_num_groups}."
            )
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"`max_steps` and `batch_size` must be >= 1, got {self.max_steps}, "
                f"{self.batch_size}."
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TeacherConfig:
        return dataclasses.replace(self, **changes)


def config_from_info(info: dict[str, Any]) -> TeacherConfig:
    """The TeacherConfig a shipped teacher.json was trained with (its `training` section)."""
    names = {f.name for f in dataclasses.fields(TeacherConfig)}
    kwargs = {k: v for k, v in info["training"].items() if k in names}
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return TeacherConfig(**kwargs)


def build_unet(cfg: TeacherConfig) -> UNet2DConditionModel:
    """The teacher UNet; cross-attention only at the lowest resolution (16x16 costs 4-8x more)."""
    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_heads,  # diffusers' historical name for the head count
    )


def build_scheduler(cfg: TeacherConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def captions_for(class_names: tuple[str, ...] | list[str], template: str) -> list[str]:
    """Class captions followed by the empty (null) caption: index C is the dropped caption."""
    return class_prompts(list(class_names), template) + [""]


def lr_factor(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up, then cosine decay to 10% at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

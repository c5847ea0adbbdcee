"""`tiny-sd`: a seeded, SD-shaped pipeline built from configs, for offline tests and CPU demos.

Same structure as Stable Diffusion (4 down / 4 up UNet blocks with cross-attention, so up-blocks
"1,2,3" exist; an AutoencoderKL; a CLIPTextModel; the REAL CLIP tokenizer) but a few MB of random
weights. It is written with `save_pretrained` in the diffusers folder layout and always loaded back
through `sd.load_sd_backbone`, the exact `from_pretrained` path a real checkpoint takes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from feddifrc_core import paths
from feddifrc_core.diffusion.sd import SD_BLOCK_TYPES, SD_SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

TINY_SD_VERSION = "v2"  # bump when the configs below change, so stale folders are not reused
TINY_SD_SEED = 0
TINY_SAMPLE_SIZE = 32  # pixels; latent 8 x 8 (VAE factor 4) keeps CPU extraction fast

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": TINY_SAMPLE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    # up_blocks[i] output channels are block_out_channels reversed: 64, 64, 32, 32
    "block_out_channels": (32, 32, 64, 64),
    "attention_head_dim": 4,
    "cross_attention_dim": 64,
    **SD_BLOCK_TYPES,  # SD-shaped: the same block layout
    "norm_num_groups": 8,
    "use_linear_projection": True,
}
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "norm_num_groups": 8,
    "sample_size": TINY_SAMPLE_SIZE,
}
TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


def tiny_sd_dir(cache_dir: str | Path | None = None) -> Path:
    return paths.cache_dir(cache_dir or "") / "models" / f"tiny-sd-{TINY_SD_VERSION}"


def ensure_tiny_sd(cache_dir: str | Path | None = None) -> Path:
    """Build the tiny pipeline once under `cache_dir` (temp folder + rename); return its folder."""
    target = tiny_sd_dir(cache_dir)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_tiny_sd(tmp)
        try:
            tmp.rename(target)  # atomic; fails if a concurrent builder won the race
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the tiny SD pipeline in %s", target)
    return target


def build_tiny_sd(out_dir: str | Path, seed: int = TINY_SD_SEED) -> None:
    """Seeded tiny SD components, saved with save_pretrained (StableDiffusionPipeline layout)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel


    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG))
    from feddifrc_core.diffusion.tokenizer import load_clip_tokenizer  # heavy: transformers

    tokenizer = load_clip_tokenizer(out / ".tokenizer-src")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / ".tokenizer-src", ignore_errors=True)

"""Stable Diffusion (any diffusers SD 1.x / 2.x checkpoint) as a frozen `DiffusionBackbone`.

Components are loaded one by one with `from_pretrained` (no pipeline object): the UNet, the VAE
(only its encoder is kept: features never need decoding), the CLIP text encoder and tokenizer and
the noise scheduler. No safety checker is loaded: nothing is ever generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feddifrc_core import paths

logger = logging.getLogger(__name__)

DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1"


class VaeEncoder(nn.Module):
    """The encoder half of an AutoencoderKL: pixels [-1, 1] -> scaled latent mean.

    The posterior mean (not a sample) keeps the latent deterministic; the randomness DIFT needs
    comes from the seeded noise added afterwards.
    """

    def __init__(
        self,
        encoder: nn.Module,
        quant_conv: nn.Module | None,
        scaling_factor: float,
        shift_factor: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor or 0.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(pixels)  # [B, 2c, h, w]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]  # [B, c, h, w]
        latents: torch.Tensor = (mean - self.shift_factor) * self.scaling_factor
        return latents


class StableDiffusionBackbone:
    """VAE latents + CLIP prompt embeddings + a diffusers UNet, frozen on one device and dtype."""

    in_channels = 3

    def __init__(
        self,
        *,
        unet: Any,  # diffusers UNet2DConditionModel
        vae_encoder: VaeEncoder,
        text_encoder: Any,  # transformers CLIPTextModel
        tokenizer: Any,
        scheduler: Any,
        sample_size: int,
        device: torch.device,
        dtype: torch.dtype,
        identity: dict[str, Any],
    ) -> None:
        self.unet = _frozen(unet, device, dtype)
        self.vae_encoder = _frozen(vae_encoder, device, dtype)
        self.text_encoder = _frozen(text_encoder, device, dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.sample_size = int(sample_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self._identity = dict(identity)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"`pixels` must be [B, 3, H, W] in [-1, 1], got {tuple(pixels.shape)}")
        latents: torch.Tensor = self.vae_encoder(pixels.to(self.device, self.dtype))  # [B, 4, h, w]
        return latents

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a list of strings, got {prompts!r}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                mask = ids.attention_mask.to(self.device)
            states = self.text_encoder(ids.input_ids.to(self.device), attention_mask=mask)[
                0
            ]  # [P, L, D]
            for prompt, state in zip(missing, states, strict=True):
                self._prompt_cache[prompt] = state.to(self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts])  # [P, L, D]


def _frozen(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # Frozen teacher: eval() fixes dropout/normalisation, no grads saves memory and time.
    first = next(module.parameters())
    if first.dtype != dtype or first.device != torch.device(device):
        module = module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def load_sd_backbone(
    model: str, device: torch.device | str, dtype: torch.dtype, revision: str = "", kind: str = "sd"
) -> StableDiffusionBackbone:
    """Load an SD checkpoint (hub id or diffusers-layout folder) component by component."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(model).expanduser()
    is_local = local.is_dir()
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if not is_local and looks_like_path:
        raise ValueError(
            f"diffusion model folder {model!r} does not exist; pass an existing folder or a hub id"
        )
    source = str(local) if is_local else model
    kwargs: dict[str, Any] = {} if is_local or not revision else {"revision": revision}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **kwargs
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, **kwargs
        )
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        # DDPM's add_noise/alphas_cumprod are what DIFT uses; SD's DDIM/PNDM configs load into it.
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        if is_local:
            raise RuntimeError(
                f"{source} is not a complete diffusers Stable Diffusion folder (needs unet/, vae/, "
                f"text_encoder/, tokenizer/, scheduler/): {err}"
            ) from err
        raise RuntimeError(
            f"Could not load the diffusion model {model!r} from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Offline? On a machine with internet run "
            f"`hf download {model}` and either pass the downloaded folder as `diffusion-model`, "
            f"or copy the HF cache here and set HF_HUB_OFFLINE=1. Without any checkpoint use "
            f"diffusion-model=offline-teacher (bundled) or tiny-sd (random weights, tests)."
        ) from err
    # A tokenizer folder without tokenizer_config.json reports an "infinite" max length, which
    # overflows CLIP's 77-position table: cap it at the text encoder's table.
    max_positions = int(text_encoder.config.max_position_embeddings)
    if tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    vae_encoder = VaeEncoder(
        vae.encoder,
        vae.quant_conv,
        vae.config.scaling_factor,
        getattr(vae.config, "shift_factor", None),
    )
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)  # latent downsampling factor
    del vae  # the decoder is never needed
    identity = {"kind": kind, "model": model, "revision": revision}
    if not is_local:
        identity["commit"] = _hub_commit(model, revision)
    if is_local:
        identity["model"] = str(local.resolve())
        identity["content_sha256"] = folder_fingerprint(local)
    return StableDiffusionBackbone(
        unet=unet,
        vae_encoder=vae_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        sample_size=int(unet.config.sample_size) * vae_scale,
        device=torch.device(device),
        dtype=dtype,
        identity=identity,
    )


def _hub_commit(model: str, revision: str) -> str:
    """The commit of the hub snapshot just loaded (from the local HF cache path), or ""."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model, "unet/config.json", revision=revision or None)
    if isinstance(path, str):
        parts = Path(path).parts  # .../snapshots/<commit>/unet/config.json
        if len(parts) >= 4 and parts[-4] == "snapshots":
            return parts[-3]
    return ""


def folder_fingerprint(folder: Path, full_hash_limit: int = 64 << 20) -> str:
    """sha256 over every file's relative path, size and content.

    Files above `full_hash_limit` bytes (multi-GB weights) contribute their first and last 8 MiB
    instead of the whole content: a weight change that keeps size, head and tail is not detected,
    which is the price of not reading 5 GB at every start.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= full_hash_limit:
                digest.update(f.read())
            else:
                digest.update(f.read(8 << 20))
                f.seek(size - (8 << 20))
                digest.update(f.read())
    return digest.hexdigest()


# --- the full SD-2.1 (768-v) architecture with random weights, for speed measurements --------
# Values from the public stabilityai/stable-diffusion-2-1 configs (unet/vae/text_encoder/scheduler).
# SD's UNet layout: cross-attention in the first three down and last three up blocks.
SD_BLOCK_TYPES: dict[str, tuple[str, ...]] = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD21_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    **SD_BLOCK_TYPES,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD21_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
SD21_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "steps_offset": 1,
}


def random_sd21_backbone(
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> StableDiffusionBackbone:
    """SD-2.1's architecture with seeded random weights, identical on every machine.

    Modules are built on the meta device (no allocation, no default init) and then filled by
    `seeded_init` from one CPU generator: about 3x faster than the libraries' default init of
    1.3 B parameters and independent of the device the model ends up on.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
        vae: Any = AutoencoderKL(**SD21_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))
    vae_encoder = VaeEncoder(vae.encoder, vae.quant_conv, vae.config.scaling_factor)
    del vae  # the decoder is never materialised
    modules: tuple[Any, ...] = (unet, vae_encoder, text_encoder)
    for index, module in enumerate(modules):
        seeded_init(module, seed * 10 + index)
    from feddifrc_core.diffusion.tokenizer import load_clip_tokenizer  # heavy: transformers

    tokenizer = load_clip_tokenizer(tokenizer_dir or paths.cache_dir() / "clip-tokenizer")
    configs = json.dumps([SD21_UNET_CONFIG, SD21_VAE_CONFIG, SD21_TEXT_CONFIG], sort_keys=True)
    identity = {
        "kind": "sd21-random",
        "model": "sd21-random",
        "revision": "",
        "seed": seed,
        "config_sha256": hashlib.sha256(configs.encode()).hexdigest(),
    }
    return StableDiffusionBackbone(
        unet=unet,
        vae_encoder=vae_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**SD_SCHEDULER_CONFIG),
        sample_size=int(SD21_UNET_CONFIG["sample_size"]) * 8,
        device=torch.device(device),
        dtype=dtype,
        identity=identity,
    )


@torch.no_grad()
def seeded_init(module: nn.Module, seed: int) -> nn.Module:
    """Materialise a meta-device module on CPU with deterministic random weights.

    Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default bound for linear/conv), biases
    and norm shifts 0, norm scales 1; `position_ids` buffers are rebuilt. Other buffers are refused.
    """
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    for mod_name, mod in module.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            if isinstance(mod, norms):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias" or param.ndim < 2:
                param.zero_()
            else:
                fan_in = param[0].numel()
                bound = 1.0 / fan_in**0.5
                param.uniform_(-bound, bound, generator=gen)
        for name, buf in mod.named_buffers(recurse=False):
            if name != "position_ids":
                raise RuntimeError(f"seeded_init cannot rebuild buffer {mod_name}.{name}")
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return module

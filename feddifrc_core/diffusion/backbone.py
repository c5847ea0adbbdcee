"""What the extractor needs from a frozen text-to-image diffusion model, and how to load one.

Two families implement `DiffusionBackbone` and share one extraction path: Stable Diffusion
(`sd.py`: VAE latents, CLIP text; also the offline `tiny-sd` and the `sd21-random` speed model)
and the project's pixel-space offline teacher (`teacher_backbone.py`, MiniLM text).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from feddifrc_core.diffusion import sd, teacher_backbone, tiny

logger = logging.getLogger(__name__)

TINY_SD = "tiny-sd"
SD21_RANDOM = "sd21-random"
OFFLINE_TEACHER = "offline-teacher"


@runtime_checkable
class DiffusionBackbone(Protocol):
    """A frozen denoiser with a diffusers UNet, a noise scheduler and image/prompt encoders."""

    unet: Any  # diffusers UNet2DConditionModel; forward(sample, t, encoder_hidden_states)
    scheduler: Any  # diffusers scheduler with `alphas_cumprod` and `add_noise`
    sample_size: int  # native input size in pixels (SD 2.1: 768)
    in_channels: (
        int  # image channels `encode_images` expects (3 for SD; 1 possible for a pixel teacher)
    )
    device: torch.device
    dtype: torch.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], float [B, C, H, W] on `device` -> UNet input latents [B, c, h, w]."""
        ...

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt embeddings [P, L, D] in `dtype` on `device`; each prompt encoded once, cached."""
        ...

    def identity(self) -> dict[str, Any]:
        """JSON-able description for cache fingerprints: kind, model id, revision, content hash."""
        ...


# Loading a diffusion model costs seconds to minutes: one instance per process and setting.
_CACHE: dict[tuple[str, str, str, str, str], DiffusionBackbone] = {}
_LOCK = threading.Lock()


def load_backbone(
    spec: str,
    device: torch.device | str,
    dtype: torch.dtype,
    revision: str = "",
    cache_dir: str | None = None,
) -> DiffusionBackbone:
    """Load (or reuse) a frozen backbone.

    spec: "tiny-sd" (seeded tiny SD pipeline, built once under `cache_dir` and loaded back with
    `from_pretrained`), "sd21-random" (full SD-2.1 architecture, random weights, for speed
    measurements), "offline-teacher[:path]" (the project's pixel-space teacher) or any diffusers
    Stable Diffusion checkpoint: a hub id ("stabilityai/stable-diffusion-2-1") or a local folder.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"`spec` must name a diffusion model (tiny-sd, sd21-random, offline-teacher, a hub "
            f"id or a folder), got {spec!r}"
        )
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` must be a torch.dtype, got {dtype!r}")
    device = torch.device(device)
    key = (spec, str(device), str(dtype), revision, str(cache_dir or ""))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(spec, device, dtype, revision, cache_dir)
        return _CACHE[key]


def clear_backbone_cache() -> None:
    """Forget every loaded backbone (tests; freeing GPU memory between experiments)."""
    with _LOCK:
        _CACHE.clear()


def _load(
    spec: str, device: torch.device, dtype: torch.dtype, revision: str, cache_dir: str | None
) -> DiffusionBackbone:
    if spec == TINY_SD:
        return sd.load_sd_backbone(str(tiny.ensure_tiny_sd(cache_dir)), device, dtype, kind=TINY_SD)
    if spec == SD21_RANDOM:
        return sd.random_sd21_backbone(device, dtype)
    if spec == OFFLINE_TEACHER or spec.startswith(OFFLINE_TEACHER + ":"):
        path_or_name = spec.partition(":")[2] or OFFLINE_TEACHER
        return teacher_backbone.load_teacher_backbone(path_or_name, device, dtype)
    return sd.load_sd_backbone(spec, device, dtype, revision=revision)


DTYPES = ("auto", "float32", "float16", "bfloat16", "bfloat16-mixed")


@dataclass(frozen=True)
class Precision:
    """How the frozen backbone computes: the dtype its weights are loaded in, and the dtype of
    its convolutions and matmuls under autocast (None: all in `weights`)."""

    weights: torch.dtype
    autocast: torch.dtype | None = None


def cpu_has_native_bfloat16() -> bool:
    """True where the CPU computes bfloat16 dot products natively (x86 AVX512-BF16 or AMX); on
    other CPUs oneDNN emulates bfloat16, slower than float32 (AVX-512 alone is not enough)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probes
        return False


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """RunConfig `diffusion-dtype` -> Precision.

    auto = float16 on CUDA; on a CPU with native bfloat16 "bfloat16-mixed" (float32 weights and
    residual stream, bfloat16 convolutions and matmuls: about 1.6x float32's speed, features
    within ~0.4 % of float32's, docs/performance.md); float32 elsewhere.
    """
    device = torch.device(device)
    if name in ("", "auto"):
        if device.type == "cuda":
            return Precision(torch.float16)
        if device.type == "cpu" and cpu_has_native_bfloat16():
            return Precision(torch.float32, torch.bfloat16)
        return Precision(torch.float32)
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name == "bfloat16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    if name not in table:
        raise ValueError(f"`diffusion-dtype` must be one of {', '.join(DTYPES)}, got {name!r}")
    if device.type == "cpu" and table[name] == torch.float16:
        logger.warning(
            "float16 on CPU is slow and some kernels are missing; float32 is recommended"
        )
    return Precision(table[name])

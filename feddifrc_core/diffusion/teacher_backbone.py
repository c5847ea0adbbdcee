"""The project's offline teacher as a `DiffusionBackbone` (pixel space, MiniLM prompts).

The same extraction code path serves Stable Diffusion and this teacher: `encode_images` is the
identity up to padding (the teacher saw 28 px Fashion-MNIST padded with background to 32 px),
`encode_prompts` returns frozen MiniLM token states. The shipped folder (`models/fmnist-teacher`,
written by `feddifrc_core.teacher`) travels inside the Flower app bundle, so it is found relative
to the package, not the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from feddifrc_core.diffusion.minilm import encode_texts

OFFLINE_TEACHER = "offline-teacher"
DEFAULT_FOLDER = "fmnist-teacher"  # what "offline-teacher" resolves to
MODELS_ENV = "FEDDIFRC_MODELS_DIR"
TEACHER_JSON = "teacher.json"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
REQUIRED_KEYS = (
    "kind",
    "text_encoder",
    "text_max_length",
    "image_size",
    "pixel_size",
    "in_channels",
    "class_names",
    "recommended",
    "training",
    "data",
    "weights_sha256",
)


def models_dir() -> Path:
    """$FEDDIFRC_MODELS_DIR, else <project>/models next to this package."""
    env = os.environ.get(MODELS_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "models"


def _installed_project_models() -> Path | None:
    """<project>/models of an editable install (`pip install -e .`): a Flower app bundle holds
    only .py/.toml/.md/.json files, so inside one the weights must come from the node's install."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        text = distribution("feddifrc").read_text("direct_url.json")
    except (ImportError, PackageNotFoundError):
        return None
    if not text:
        return None
    url = json.loads(text).get("url", "")
    return Path(url.removeprefix("file://")) / "models" if url.startswith("file://") else None


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (TEACHER_JSON, "unet/config.json", WEIGHTS))


def resolve_teacher_path(path_or_name: str) -> Path:
    """ "offline-teacher" -> fmnist-teacher; a bare name is looked up in $FEDDIFRC_MODELS_DIR, in
    <project>/models next to the package, then in the editable install's models/; else a folder.

    A folder counts only with its weights (a Flower app bundle carries the JSON files but not the
    .safetensors, so its copy is skipped in favour of the node's own).
    """
    if not isinstance(path_or_name, str) or not path_or_name.strip():
        raise ValueError(
            f"`path_or_name` must be 'offline-teacher', a model name under models/ or a "
            f"folder, got {path_or_name!r}."
        )
    name = DEFAULT_FOLDER if path_or_name == OFFLINE_TEACHER else path_or_name
    given = Path(name).expanduser()
    if given.is_absolute() or os.sep in name or given.exists():
        candidates = [given]
    else:
        roots = [models_dir(), Path(__file__).resolve().parents[2] / "models"]
        roots.append(_installed_project_models() or roots[-1])
        candidates = list(dict.fromkeys(root / name for root in roots))
    for folder in candidates:
        if _is_complete(folder):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"No complete offline teacher {name!r} (needs {TEACHER_JSON}, unet/config.json and "
        f"{WEIGHTS}) in: {looked}. Train it with `make teacher`, or point ${MODELS_ENV} at the "
        f"folder that holds '{name}'."
    )


def read_teacher_info(folder: Path) -> dict[str, Any]:
    """teacher.json, checked for completeness."""
    info: dict[str, Any] = json.loads((Path(folder) / TEACHER_JSON).read_text())
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing or info.get("kind") != OFFLINE_TEACHER:
        raise ValueError(
            f"{folder / TEACHER_JSON} is incomplete (missing {missing}, kind "
            f"{info.get('kind')!r}); re-export it with `make teacher`."
        )
    return info


class TeacherBackbone:
    """Frozen pixel-space UNet + DDPM scheduler + MiniLM prompt encoder on one device/dtype."""

    def __init__(
        self,
        *,
        unet: Any,
        scheduler: Any,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        name: str,
    ) -> None:
        # Frozen teacher: its features are a fixed target space shared by every client.
        self.unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.info = info
        self.in_channels = int(info["in_channels"])
        self.sample_size = int(info["pixel_size"])  # images the extractor should hand over (28)
        self.model_size = int(info["image_size"])  # what the UNet runs at (32)
        self.text_max_length = int(info["text_max_length"])
        self.device = torch.device(device)
        self.dtype = dtype
        self._name = name
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def identity(self) -> dict[str, Any]:
        return {
            "kind": OFFLINE_TEACHER,
            "model_id": self._name,
            "revision": str(self.info["weights_sha256"])[:16],
            "text_encoder": self.info["text_encoder"],
            "image_size": self.model_size,
        }

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, C, H, W] -> UNet input [B, C, 32, 32] (pixel space: no encoder)."""
        if pixels.ndim != 4 or pixels.shape[1] != self.in_channels:
            raise ValueError(
                f"`pixels` must be [B, {self.in_channels}, H, W] in [-1, 1], got "
                f"{tuple(pixels.shape)}."
            )
        x = pixels.to(self.device, self.dtype)
        size, target = self.sample_size, self.model_size
        if tuple(x.shape[-2:]) != (size, size):  # as in training: first the native pixel size
            x = F.interpolate(
                x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            ).to(self.dtype)
        pad = target - size  # then background padding, as the teacher was trained
        return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """MiniLM token states [P, L, 384], each prompt encoded once per process and cached."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`prompts` must be a list of strings, got {prompts!r:.80}.")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            states = encode_texts(missing, max_length=self.text_max_length)  # [M, L, 384] fp32 CPU
            for prompt, state in zip(missing, states, strict=True):
                self._prompt_cache[prompt] = state.to(self.device, self.dtype)
        return torch.stack([self._prompt_cache[p] for p in prompts])  # [P, L, 384]


def load_teacher_backbone(
    path_or_name: str, device: torch.device | str, dtype: torch.dtype
) -> TeacherBackbone:
    """Load the shipped teacher ("offline-teacher" -> models/fmnist-teacher) or a folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` must be a torch.dtype, got {dtype!r}.")
    folder = resolve_teacher_path(path_or_name)
    info = read_teacher_info(folder)
    # 1. the weights must be the ones teacher.json describes (a truncated copy fails here)
    weights = folder / WEIGHTS
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    if sha != info["weights_sha256"]:
        raise RuntimeError(
            f"{weights} does not match {TEACHER_JSON} (sha256 {sha[:12]} != "
            f"{str(info['weights_sha256'])[:12]}); re-export with `make teacher`."
        )
    # 2. UNet (stored in fp16, upcast on load) and scheduler
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    name = OFFLINE_TEACHER if path_or_name == OFFLINE_TEACHER else folder.name
    return TeacherBackbone(
        unet=unet,
        scheduler=scheduler,
        info=info,
        device=torch.device(device),
        dtype=dtype,
        name=name,
    )

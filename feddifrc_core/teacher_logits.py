"""A client's zero-shot teacher logits, computed once and kept on its own disk.

The distillation control (algorithm `fedavg-kd`) needs the diffusion teacher's class logits for
every image a client holds; they never leave the client. They cost one UNet call per image
(`zero_shot.py`), so they are stored per image, in verified parts:

    <cache>/zero-shot/<model>-<fingerprint hash>/part-<hash of its ids>.safetensors
        sample-ids [n] int64, image-hashes [n] int64, logits [n, P] float32
        meta: the fingerprint (backbone identity, prompts, timesteps, draws, seed, size, dtype)

- A part is written atomically with a SHA-256 (checkpoint.save_arrays) after every chunk of
  images, so a killed computation resumes at the first image no part holds.
- On read every part is verified; a damaged one, or one with another fingerprint, is logged and
  ignored (its images are computed again). An image's row is used only if its content hash
  matches the client's image under that sample id.
- The logits of an image do not depend on which other images were computed with it (one UNet
  call per image, noise seeded per (seed, sample id, draw)): any partition of the same images,
  e.g. another Dirichlet alpha, reuses the rows bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_arrays
from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.feature_cache import fingerprint_sha256, safe_folder_name
from feddifrc_core.zero_shot import ZeroShotSettings, zero_shot_logits

logger = logging.getLogger(__name__)

FORMAT = 1
CHUNK_IMAGES = 64  # images per part: what a kill can cost, and the number of files


def image_hashes(images: torch.Tensor) -> np.ndarray:
    """[N] int64: the first 8 bytes of each image's SHA-256 (shape, dtype and pixels)."""
    out = np.empty(int(images.shape[0]), dtype=np.int64)
    for i, img in enumerate(images):
        x = img.contiguous().cpu()
        digest = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype}:".encode())
        digest.update(x.numpy().tobytes())
        out[i] = np.frombuffer(digest.digest()[:8], dtype=np.int64)[0]
    return out


def logits_fingerprint(backbone: DiffusionBackbone, prompts: Sequence[str],
                       settings: ZeroShotSettings) -> dict[str, Any]:
    return {"format": FORMAT, "backbone": backbone.identity(), "prompts": list(prompts),
            **settings.fingerprint(backbone), "dtype": str(backbone.dtype),
            "device": backbone.device.type}


def client_teacher_logits(backbone: DiffusionBackbone, images: torch.Tensor,
                          sample_ids: Sequence[int] | np.ndarray, prompts: Sequence[str],
                          settings: ZeroShotSettings, cache_dir: str | Path,
                          chunk_images: int = CHUNK_IMAGES) -> tuple[torch.Tensor, dict[str, Any]]:
    """(logits [N, P] float32 of the client's images, what was reused and computed).

    Images whose (sample id, content hash) a verified part holds are read back; the rest are
    computed in chunks, each chunk written as a new part before the next starts.
    """
    ids = np.asarray(sample_ids, dtype=np.int64)
    if ids.shape != (int(images.shape[0]),):
        raise ValueError(f"`sample_ids` must have one id per image ({images.shape[0]}), "
                         f"got shape {ids.shape}")
    if chunk_images < 1:
        raise ValueError(f"`chunk_images` must be >= 1, got {chunk_images}")
    fingerprint = logits_fingerprint(backbone, prompts, settings)
    key = fingerprint_sha256(fingerprint)
    name = safe_folder_name(str(backbone.identity().get("model_id", "model")), "model")
    folder = Path(cache_dir) / "zero-shot" / f"{name}-{key[:16]}"
    # 1. what verified parts already hold
    hashes = image_hashes(images)
    known = _read_parts(folder, fingerprint_sha256(_as_meta(fingerprint)))
    out = torch.empty((len(ids), len(prompts)), dtype=torch.float32)
    missing = []
    for row, (sid, h) in enumerate(zip(ids.tolist(), hashes.tolist(), strict=True)):
        hit = known.get(sid)
        if hit is not None and hit[0] == h:
            out[row] = torch.from_numpy(hit[1])
        else:
            missing.append(row)
    # 2. compute the rest, one part per chunk (a kill loses at most one chunk)
    t0 = time.perf_counter()
    for start in range(0, len(missing), chunk_images):
        rows = missing[start:start + chunk_images]
        logits = zero_shot_logits(backbone, images[rows], ids[rows].tolist(), prompts, settings)
        out[rows] = logits
        part_ids = ids[rows]
        part = folder / f"part-{hashlib.sha256(part_ids.tobytes()).hexdigest()[:16]}.safetensors"
        save_arrays(part, {"sample-ids": part_ids, "image-hashes": hashes[rows],
                           "logits": logits.numpy()}, {"fingerprint": _as_meta(fingerprint)})
    info = {"folder": str(folder), "reused": len(ids) - len(missing), "computed": len(missing),
            "seconds": round(time.perf_counter() - t0, 2)}
    return out, info


def _as_meta(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as a part's JSON meta reads back (lists, not tuples)."""
    import json

    return dict(json.loads(json.dumps(fingerprint, sort_keys=True, default=str)))


def _read_parts(folder: Path, fingerprint_key: str) -> dict[int, tuple[int, np.ndarray]]:
    """sample id -> (image hash, logits [P]) from every verified part of `folder`."""
    known: dict[int, tuple[int, np.ndarray]] = {}
    for path in sorted(folder.glob("part-*.safetensors")):
        try:
            part = load_arrays(path)
        except CheckpointError as err:
            logger.warning("zero-shot cache: %s; its images are computed again", err)
            continue
        if fingerprint_sha256(part.meta.get("fingerprint", {})) != fingerprint_key:
            logger.warning("zero-shot cache: %s has another fingerprint; ignored", path)
            continue
        for sid, h, row in zip(part.arrays["sample-ids"].tolist(),
                               part.arrays["image-hashes"].tolist(), part.arrays["logits"],
                               strict=True):
            known[int(sid)] = (int(h), np.asarray(row, dtype=np.float32))
    return known

"""What a pass costs and what the machine can do: FLOPs of one image-prompt pass as executed, and
the measured matrix-product rate the passes are compared with (CPU and GPU benchmarks share it)."""

from __future__ import annotations

import time

import torch

from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling_tflops(
    device: torch.device, dtype: torch.dtype, n: int = 0, repeats: int = 10
) -> float:
    """Measured TFLOP/s of an n^3 matrix product (GPU 8192, CPU 2048 by default); the best of
    `repeats` products, so a machine shared with other jobs still shows what it can do."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def flops_per_pass(
    ex: DiffusionFeatureExtractor, images: torch.Tensor, embeds: torch.Tensor
) -> float:
    """FLOPs of one image-prompt pass as executed (encoder share, early-stopped UNet, stages shared
    by an image's prompts counted once), counted on one full call of the extractor (`batch_size`
    images; fewer are padded to it)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = images[: ex.batch_size]
    counter = FlopCounterMode(display=False)
    with counter:
        ex.extract_batch(batch, list(range(len(batch))), embeds)
    return counter.get_total_flops() / (ex.batch_size * embeds.shape[0])

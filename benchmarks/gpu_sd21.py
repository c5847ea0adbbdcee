"""Throughput of the extractor on the full SD-2.1 architecture (random weights) on one GPU.

Measures image-prompt passes per second (one pass = one image under one prompt, the unit the
FedDifRC targets need) at 224 px in fp16 with B images x P prompts per UNet call, and the peak
GPU memory. Target: >= 300 passes/s on one H100. Finishes in a few minutes (most of it building
1.3 B random parameters on the CPU).

    python benchmarks/gpu_sd21.py                       # cuda, fp16, 224 px, 16 images x 11 prompts
    python benchmarks/gpu_sd21.py --batch-images 32     # larger UNet batches
    python benchmarks/gpu_sd21.py --tiny                # CPU smoke test with tiny-sd (seconds)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-images", type=int, default=16, help="images per UNet call")
    parser.add_argument("--prompts", type=int, default=11, help="prompts per image (C + 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test: tiny-sd on CPU, fp32, few iterations"
    )
    parser.add_argument("--cache-dir", default=None, help="where tiny-sd is built (--tiny)")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.dtype, args.image_size = "cpu", "float32", 0
        args.iters, args.warmup = min(args.iters, 3), 1
        torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny for a CPU smoke test")
    dtype = getattr(torch, args.dtype)

    # 1. backbone (seeded random SD-2.1 weights are built on the CPU, then moved)
    t0 = time.perf_counter()
    spec = "tiny-sd" if args.tiny else "sd21-random"
    backbone = load_backbone(spec, device, dtype, cache_dir=args.cache_dir)
    build_s = time.perf_counter() - t0
    ex = DiffusionFeatureExtractor(
        backbone,
        timestep=300,
        up_blocks=(1, 2, 3),
        image_size=args.image_size,
        batch_size=args.batch_images,
        seed=0,
    )

    # 2. inputs: uint8 images (CIFAR-sized, resized by the extractor) and encoded prompts
    b, p = args.batch_images, args.prompts
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, 32, 32), generator=gen, dtype=torch.uint8)
    prompts = [f"a photo of a class {i}" for i in range(p - 1)] + [""]
    embeds = backbone.encode_prompts(prompts)  # [P, L, D], once per run as in training
    ids = list(range(b))

    # 3. warm-up, then timed batches (each: resize, VAE, noise, one UNet call for B x P)
    for _ in range(args.warmup):
        ex.extract_batch(images, ids, embeds)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        feats = ex.extract_batch(images, ids, embeds)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    passes = b * p * args.iters
    result = {
        "model": spec,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "image_size": ex.image_size,
        "batch_images": b,
        "prompts": p,
        "unet_batch": b * p,
        "iters": args.iters,
        "build_s": round(build_s, 1),
        "passes_per_s": round(passes / seconds, 1),
        "images_per_s": round(b * args.iters / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "feature_shapes": [list(f.shape) for f in feats],
        "finite": all(bool(torch.isfinite(f).all()) for f in feats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

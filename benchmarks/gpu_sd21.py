"""Throughput of the extractor on the full SD-2.1 architecture (random weights) on one GPU.

Measures image-prompt passes per second (one pass = one image under one prompt, the unit the
FedDifRC targets need) at 224 px with B images x P prompts per UNet call, the peak GPU memory and
the fraction of the GPU's matrix peak that the passes use (FLOPs per pass counted once with
`torch.utils.flop_counter`; the ceiling is measured on the same GPU with a large matrix product).
The model is built once; every (variant, batch) pair is then timed and printed as one JSON line
(and appended to `--out`), so a run cut short still reports what it finished.

Variants: `eager` (what the extractor does today: fp16, SDPA attention), `channels-last` (UNet and
VAE encoder in NHWC memory format), `compile` (channels-last + `torch.compile` of the UNet's
ResNet and transformer blocks; the early-exit hooks stay outside the compiled code).

    python benchmarks/gpu_sd21.py                                  # eager, 16 images x 11 prompts
    python benchmarks/gpu_sd21.py --batch-images 16 64 --variants eager channels-last compile
    python benchmarks/gpu_sd21.py --tiny                           # CPU smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.compute_ceiling import flops_per_pass, matmul_ceiling_tflops, synchronize
from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor

VARIANTS = ("eager", "channels-last", "compile")
H100_DENSE_FP16_TFLOPS = 989.0  # H100 SXM datasheet, dense fp16/bf16 tensor cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--batch-images", type=int, nargs="+", default=[16], help="images per UNet call (a list)"
    )
    parser.add_argument("--prompts", type=int, default=11, help="prompts per image (C + 1)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager"],
        metavar="VARIANT[:B,B..]",
        help=f"in this order, from {', '.join(VARIANTS)}; ':64,128' gives that variant its own "
        "batch sizes (compile recompiles per size)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds: skip the remaining (variant, batch) pairs once this much has passed (0: none)",
    )
    parser.add_argument("--out", type=Path, default=None, help="append each JSON line here")
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test: tiny-sd on CPU, fp32, few iterations"
    )
    parser.add_argument("--cache-dir", default=None, help="where tiny-sd is built (--tiny)")
    args = parser.parse_args()
    if args.tiny:
        args.device, args.dtype, args.image_size = "cpu", "float32", 0
        args.iters, args.warmup = min(args.iters, 3), 1
        torch.set_num_threads(1)
    args.plan = []  # [(variant, [batch sizes])]
    for item in args.variants:
        name, _, sizes = item.partition(":")
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
        try:
            batches = [int(b) for b in sizes.split(",")] if sizes else list(args.batch_images)
        except ValueError:
            parser.error(f"batch sizes after ':' must be integers, got {item!r}")
        if min(batches) < 1:
            parser.error(f"batch sizes must be >= 1, got {item!r}")
        args.plan.append((name, batches))
    return args


def emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def apply_variant(backbone: Any, variant: str) -> str:
    """Put the backbone into `variant`'s form (cumulative: compile implies channels-last)."""
    if variant in ("channels-last", "compile"):
        backbone.unet.to(memory_format=torch.channels_last)
        backbone.vae_encoder.to(memory_format=torch.channels_last)
    if variant == "compile":
        import torch._dynamo as dynamo

        # One compiled graph per block class and input shape: SD-2.1 has a few dozen.
        dynamo.config.cache_size_limit = 256
        dynamo.config.accumulated_cache_size_limit = 4096
        compiled = 0
        for module in backbone.unet.modules():
            if type(module).__name__ in ("ResnetBlock2D", "Transformer2DModel"):
                module.compile()
                compiled += 1
        return f"{compiled} blocks compiled"
    return ""


def time_batches(
    ex: DiffusionFeatureExtractor,
    images: torch.Tensor,
    embeds: torch.Tensor,
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    device = ex.backbone.device
    ids = list(range(images.shape[0]))
    t0 = time.perf_counter()
    for _ in range(warmup):
        ex.extract_batch(images, ids, embeds)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        feats = ex.extract_batch(images, ids, embeds)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "warmup_s": round(warmup_s, 1),
        "seconds": seconds,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "features": [f.cpu() for f in feats],
        "feature_shapes": [list(f.shape) for f in feats],
        "finite": all(bool(torch.isfinite(f).all()) for f in feats),
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --tiny for a CPU smoke test")
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()

    # 1. backbone (seeded random SD-2.1 weights are built on the CPU, then moved)
    spec = "tiny-sd" if args.tiny else "sd21-random"
    backbone = load_backbone(spec, device, dtype, cache_dir=args.cache_dir)
    build_s = time.perf_counter() - started
    attention = sorted({type(p).__name__ for p in backbone.unet.attn_processors.values()})
    ex = DiffusionFeatureExtractor(
        backbone, timestep=300, up_blocks=(1, 2, 3), image_size=args.image_size, seed=0
    )

    # 2. inputs: uint8 images (CIFAR-sized, resized by the extractor), prompts encoded once
    gen = torch.Generator().manual_seed(0)
    largest = max(b for _, batches in args.plan for b in batches)
    all_images = torch.randint(0, 256, (largest, 3, 32, 32), generator=gen, dtype=torch.uint8)
    prompts = [f"a photo of a class {i}" for i in range(args.prompts - 1)] + [""]
    embeds = backbone.encode_prompts(prompts)  # [P, L, D]
    flops = flops_per_pass(ex, all_images, embeds)
    ceiling = round(matmul_ceiling_tflops(device, dtype), 1) if device.type == "cuda" else None
    emit(
        {
            "model": spec,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "image_size": ex.image_size,
            "build_s": round(build_s, 1),
            "attention": attention,
            "gflops_per_pass": round(flops / 1e9, 3),
            "matmul_ceiling_tflops": ceiling,
        },
        args.out,
    )

    # 3. every (variant, batch): warm-up (compiles), then timed batches
    reference: dict[int, list[torch.Tensor]] = {}  # first variant's features per batch size
    for variant, batches in args.plan:
        note = apply_variant(backbone, variant)
        for b in batches:
            elapsed = time.perf_counter() - started
            if args.time_budget and elapsed > args.time_budget:
                emit({"variant": variant, "batch_images": b, "skipped": "time budget"}, args.out)
                continue
            try:
                timing = time_batches(ex, all_images[:b], embeds, args.warmup, args.iters)
            except torch.OutOfMemoryError as exc:
                emit(
                    {"variant": variant, "batch_images": b, "error": f"OOM: {exc}"[:300]}, args.out
                )
                torch.cuda.empty_cache()
                continue
            passes_per_s = b * args.prompts * args.iters / timing.pop("seconds")
            feats = timing.pop("features")
            ref = reference.setdefault(b, feats)
            timing["max_abs_diff_vs_first_variant"] = max(
                float((f - r).abs().max()) for f, r in zip(feats, ref, strict=True)
            )
            achieved = passes_per_s * flops / 1e12
            emit(
                {
                    "variant": variant,
                    "note": note,
                    "batch_images": b,
                    "prompts": args.prompts,
                    "unet_batch": b * args.prompts,
                    "iters": args.iters,
                    "passes_per_s": round(passes_per_s, 1),
                    "images_per_s": round(passes_per_s / args.prompts, 1),
                    "tflops": round(achieved, 3),
                    "fraction_of_h100_peak": round(achieved / H100_DENSE_FP16_TFLOPS, 4),
                    "fraction_of_measured_matmul": round(achieved / ceiling, 3)
                    if ceiling
                    else None,
                    **timing,
                },
                args.out,
            )


if __name__ == "__main__":
    main()

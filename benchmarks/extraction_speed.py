"""Image-prompt passes per second: this extractor vs. a reference-style loop, same UNet.

Reference style (how a per-prompt DIFT loop is usually written): for every image and every prompt,
re-encode the prompt, VAE-encode the image, add the noise, run the FULL UNet at batch size 1 and
read the hooked up-block outputs. This project: prompts encoded once, one latent per image
reused by all its prompts, B images x P prompts per UNet call, the pass stopped after the last
needed block. Both compute the same features (same per-sample noise); the script checks that.

    .venv/bin/python benchmarks/extraction_speed.py                       # tiny-sd, 32 px, CPU
    .venv/bin/python benchmarks/extraction_speed.py --model sd21-random --image-size 64 \
        --images 2 --prompts 3                                           # the SD-2.1 architecture
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from feddifrc_core.diffusion.backbone import DiffusionBackbone, load_backbone, resolve_dtype
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor, to_model_pixels


def reference_loop(
    ex: DiffusionFeatureExtractor, images: torch.Tensor, prompts: list[str]
) -> list[torch.Tensor]:
    """One prompt per pass, prompt re-encoded per call, batch 1, full UNet pass."""
    bb: DiffusionBackbone = ex.backbone
    outs = [torch.empty(len(images), len(prompts), c) for c in ex.block_channels]
    captured: dict[int, torch.Tensor] = {}

    def make_hook(i: int) -> Callable[..., None]:
        def hook(_m: object, _inp: object, out: torch.Tensor) -> None:
            captured[i] = out.float().mean(dim=(2, 3))

        return hook

    handles = [bb.unet.up_blocks[i].register_forward_hook(make_hook(i)) for i in ex.up_blocks]
    t = torch.tensor([ex.timestep], device=bb.device)
    try:
        with torch.no_grad():
            for n in range(len(images)):
                for p, prompt in enumerate(prompts):
                    # backbones cache embeddings: drop the entry so every call re-encodes
                    getattr(bb, "_prompt_cache", {}).pop(prompt, None)
                    emb = bb.encode_prompts([prompt])  # [1, L, D]
                    px = to_model_pixels(
                        images[n : n + 1], ex.image_size, bb.in_channels, bb.device, bb.dtype
                    )
                    latent = bb.encode_images(px)  # [1, c, h, w]
                    noise = ex.noise(latent.shape[1:], [n], 0).to(bb.device, bb.dtype)
                    noisy = bb.scheduler.add_noise(latent, noise, t)
                    bb.unet(noisy, t, encoder_hidden_states=emb)  # full pass, output discarded
                    for k, i in enumerate(ex.up_blocks):
                        outs[k][n, p] = captured[i][0].cpu()
    finally:
        for h in handles:
            h.remove()
    return outs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny-sd", help="tiny-sd | sd21-random | SD folder/hub id"
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=11, help="C + 1 (10 classes + null)")
    parser.add_argument("--image-size", type=int, default=0, help="0 = the backbone's native size")
    parser.add_argument("--batch-size", type=int, default=16, help="images per UNet call (ours)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # 1. the shared backbone and inputs
    backbone = load_backbone(
        args.model, device, resolve_dtype("auto", device), cache_dir=args.cache_dir
    )
    ex = DiffusionFeatureExtractor(
        backbone,
        timestep=300,
        up_blocks=(1, 2, 3),
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=0,
    )
    channels = backbone.in_channels
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.images, channels, 28, 28), generator=gen, dtype=torch.uint8
    )
    prompts = [f"a photo of a class {i}" for i in range(args.prompts - 1)] + [""]
    ids = list(range(args.images))
    passes = args.images * args.prompts
    # warm-up both paths once (allocator, kernel selection) on one image
    ex.extract(images[:1], ids[:1], prompts[:2])
    reference_loop(ex, images[:1], prompts[:2])

    # 2. reference-style loop
    _sync(device)
    t0 = time.perf_counter()
    ref = reference_loop(ex, images, prompts)
    _sync(device)
    t_ref = time.perf_counter() - t0

    # 3. this extractor (prompt cache emptied so encoding is counted once)
    getattr(backbone, "_prompt_cache", {}).clear()
    _sync(device)
    t0 = time.perf_counter()
    ours = ex.extract(images, ids, prompts)
    _sync(device)
    t_ours = time.perf_counter() - t0

    max_diff = max(float((a - b).abs().max()) for a, b in zip(ref, ours, strict=True))
    scale = max(float(a.abs().max()) for a in ref)
    result = {
        "model": args.model,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "image_size": ex.image_size,
        "images": args.images,
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "reference_passes_per_s": round(passes / t_ref, 2),
        "ours_passes_per_s": round(passes / t_ours, 2),
        "speedup": round(t_ref / t_ours, 2),
        "reference_s": round(t_ref, 2),
        "ours_s": round(t_ours, 2),
        "max_abs_feature_diff": max_diff,
        "max_abs_feature": scale,
    }
    print(json.dumps(result))
    print(
        f"speed-up {t_ref / t_ours:.1f}x ({passes / t_ours:.1f} vs {passes / t_ref:.1f} "
        "image-prompt passes/s)"
    )
    if max_diff > 1e-3 * max(scale, 1.0):
        raise SystemExit(
            f"the two loops disagree (max |diff| {max_diff:.3g}): the comparison is invalid"
        )


if __name__ == "__main__":
    main()

"""CPU extraction throughput against the machine's ceiling, variant by variant, in one run.

What one client does once: image-prompt passes of the frozen teacher (default: the offline
teacher, 10 class prompts + the null prompt per image, t=50, up-blocks 0,1,2, 2x2 pooling, as the
benchmarks and the demo use it). In the same run this script
- counts the FLOPs of one pass as executed (`torch.utils.flop_counter`) for every variant,
- measures the machine's matmul ceiling (float32 and bfloat16 products of 2048^2 matrices),
- times every variant in interleaved rounds (a machine shared with other jobs slows all of them
  alike; the best round is reported beside the median),
- compares every variant's features with "today"'s (relative error per block, max |diff|).

Variants (`--variants`, each `NAME[:B,B,...]` with images per UNet call):
    today          the extractor before this benchmark's changes, as the demo ran it: float32,
                   64 images x 11 prompts per call, prompt-free stages run for every prompt
    fp32           float32, prompt-free stages once per image (conv_in, the first two down blocks)
    no-share       float32, prompt-free stages for every prompt (what sharing them saves)
    channels-last  fp32 with the UNet in NHWC memory format
    bf16-mixed     float32 weights, bfloat16 convolutions and matmuls (autocast)
    bf16           bfloat16 weights and activations
    compile        fp32 with torch.compile of the ResNet and transformer blocks (slow to build)
    reference      a per-prompt DIFT loop as usually written: for every image and prompt the
                   prompt re-encoded, the image encoded and noised, one full UNet call at batch 1

    .venv/bin/python benchmarks/extraction_speed.py                         # default variants
    .venv/bin/python benchmarks/extraction_speed.py --variants today fp32:4,8 compile:8
    .venv/bin/python benchmarks/extraction_speed.py --model tiny-sd --image-size 32  # SD-shaped
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.compute_ceiling import flops_per_pass, matmul_ceiling_tflops
from feddifrc_core.diffusion.backbone import DiffusionBackbone, load_backbone
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor, to_model_pixels
from feddifrc_core.diffusion.reduction import MeanPool
from feddifrc_core.projection import pca_bases, pca_stats, project, split_feature_dim
from feddifrc_core.provenance import git_revision

VARIANTS = ("today", "fp32", "no-share", "channels-last", "bf16-mixed", "bf16", "compile",
            "reference")
DEFAULT_PLAN = ("today", "fp32:4,8,16", "no-share:8", "channels-last:8", "bf16-mixed:4,8,16",
                "bf16:8")
TODAY_BATCH = 64  # the demo's extraction-batch-size before this benchmark


@dataclass
class Variant:
    name: str
    batch: int
    extractor: DiffusionFeatureExtractor
    channels_last: bool = False
    compiled: bool = False
    seconds: list[float] = field(default_factory=list)  # per round
    features: list[torch.Tensor] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} x{self.batch}"

    def compile_blocks(self) -> None:
        """torch.compile of the ResNet and transformer blocks (early-exit hooks stay eager)."""
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 256
        for module in self.extractor.backbone.unet.modules():
            if type(module).__name__ in ("ResnetBlock2D", "Transformer2DModel"):
                module.compile()

    def run(self, images: torch.Tensor, ids: list[int], prompts: list[str]) -> None:
        unet = self.extractor.backbone.unet
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        unet.to(memory_format=fmt)
        t0 = time.perf_counter()
        if self.name == "reference":
            self.features = reference_loop(self.extractor, images, ids, prompts)
        else:
            self.features = self.extractor.extract(images, ids, prompts)
        self.seconds.append(time.perf_counter() - t0)
        unet.to(memory_format=torch.contiguous_format)


def reference_loop(ex: DiffusionFeatureExtractor, images: torch.Tensor, ids: list[int],
                   prompts: list[str]) -> list[torch.Tensor]:
    """One prompt per pass, prompt re-encoded per call, batch 1, full UNet pass; the same noise
    and pooling as the extractor, so the features agree."""
    bb = ex.backbone
    pool = MeanPool(ex.pool_grid)
    outs = [torch.empty(len(images), len(prompts), d) for d in ex.out_dims()]
    captured: dict[int, torch.Tensor] = {}
    handles = [bb.unet.up_blocks[i].register_forward_hook(
        lambda _m, _i, out, i=i: captured.__setitem__(i, pool(out))) for i in ex.up_blocks]
    t = torch.tensor([ex.timestep], device=bb.device)
    try:
        with torch.no_grad():
            for n in range(len(images)):
                for p, prompt in enumerate(prompts):
                    getattr(bb, "_prompt_cache", {}).pop(prompt, None)  # re-encoded every time
                    emb = bb.encode_prompts([prompt])  # [1, L, D]
                    px = to_model_pixels(images[n : n + 1], ex.image_size, bb.in_channels,
                                         bb.device, bb.dtype)
                    latent = bb.encode_images(px)  # [1, c, h, w]
                    noise = ex.noise(latent.shape[1:], [ids[n]], 0).to(bb.device, bb.dtype)
                    bb.unet(bb.scheduler.add_noise(latent, noise, t), t, encoder_hidden_states=emb)
                    for k, i in enumerate(ex.up_blocks):
                        outs[k][n, p] = captured[i][0].cpu()
    finally:
        for h in handles:
            h.remove()
    return outs


def target_agreement(reference: list[torch.Tensor], feature_dim: int = 128
                     ) -> Callable[[list[torch.Tensor]], float]:
    """What the losses see: features as targets (the shared PCA basis fitted on `reference`,
    centred, projected to `feature_dim`); returns the smallest cosine between a variant's target
    and the reference target of the same (image, prompt)."""
    stats = [pca_stats(f.flatten(0, 1)) for f in reference]
    bases = pca_bases(stats, split_feature_dim(feature_dim, len(stats), [s.dim for s in stats]))
    ref = project([f.flatten(0, 1) for f in reference], bases)

    def min_cosine(features: list[torch.Tensor]) -> float:
        got = project([f.flatten(0, 1) for f in features], bases)
        return float(torch.nn.functional.cosine_similarity(got, ref, dim=1).min())

    return min_cosine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="offline-teacher", help="offline-teacher | tiny-sd | ...")
    parser.add_argument("--images", type=int, default=64, help="images per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--prompts", type=int, default=11, help="C + 1 (10 classes + null)")
    parser.add_argument("--timestep", type=int, default=50)
    parser.add_argument("--up-blocks", default="0,1,2")
    parser.add_argument("--pool-grid", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=0, help="0 = the backbone's native size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_PLAN),
                        metavar="NAME[:B,B..]", help=f"from {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--cache-dir", default=None, help="where tiny-sd is built")
    args = parser.parse_args()
    args.plan = []
    for item in args.variants:
        name, _, sizes = item.partition(":")
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}: choose from {', '.join(VARIANTS)}")
        try:
            default = {"today": TODAY_BATCH, "reference": 1}.get(name, 8)
            batches = [int(b) for b in sizes.split(",")] if sizes else [default]
        except ValueError:
            parser.error(f"batch sizes after ':' must be integers, got {item!r}")
        if min(batches) < 1:
            parser.error(f"batch sizes must be >= 1, got {item!r}")
        args.plan += [(name, b) for b in batches]
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be >= 1")
    if any(args.images % b for _, b in args.plan):
        parser.error(f"--images {args.images} must be a multiple of every batch size (a short "
                     "batch is padded to the full call shape, which would count padding as work)")
    return args


def build_variant(name: str, batch: int, backbones: dict[torch.dtype, DiffusionBackbone],
                  args: argparse.Namespace) -> Variant:
    bf16 = name == "bf16"
    settings = dict(timestep=args.timestep, up_blocks=[int(b) for b in args.up_blocks.split(",")],
                    image_size=args.image_size, batch_size=batch, seed=0, pool_grid=args.pool_grid)
    backbone = backbones[torch.bfloat16 if bf16 else torch.float32]
    if name == "compile":  # its own copy: compiling changes the modules in place
        backbone = copy.deepcopy(backbone)
    extractor = DiffusionFeatureExtractor(
        backbone, **settings,
        autocast=torch.bfloat16 if name == "bf16-mixed" else None,
        once_per_image=name not in ("today", "no-share", "reference"))
    return Variant(name, batch, extractor, channels_last=name == "channels-last",
                   compiled=name == "compile")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    names = {name for name, _ in args.plan}
    dtypes = [torch.float32] + ([torch.bfloat16] if "bf16" in names else [])
    backbones = {d: load_backbone(args.model, "cpu", d, cache_dir=args.cache_dir) for d in dtypes}
    # 1. inputs: real-looking uint8 images at the backbone's pixel size, prompts encoded once
    bb = backbones[torch.float32]
    gen = torch.Generator().manual_seed(0)
    size = bb.sample_size if args.model == "offline-teacher" else 28
    images = torch.randint(0, 256, (args.images, bb.in_channels, size, size), generator=gen,
                           dtype=torch.uint8)
    ids = list(range(args.images))
    prompts = [f"a photo of a class {i}" for i in range(args.prompts - 1)] + [""]
    embeds = bb.encode_prompts(prompts)
    variants = [build_variant(n, b, backbones, args) for n, b in args.plan]
    # 2. the ceiling and the FLOPs of a pass, measured in this run
    ceiling = {str(d).removeprefix("torch."): matmul_ceiling_tflops(torch.device("cpu"), d) * 1e3
               for d in (torch.float32, torch.bfloat16)}
    flops = {v.label: flops_per_pass(v.extractor, images, embeds.to(v.extractor.backbone.dtype))
             for v in variants}
    for v in variants:
        if v.compiled:
            v.compile_blocks()
    # 3. warm-up (kernel selection, compilation), then interleaved rounds
    warm: dict[str, float] = {}
    for v in variants:
        t0 = time.perf_counter()
        v.run(images[: v.batch], ids[: v.batch], prompts)
        warm[v.label] = time.perf_counter() - t0
        v.seconds.clear()
    for _ in range(args.rounds):
        for v in variants:
            v.run(images, ids, prompts)
    # 4. report
    today = next((v for v in variants if v.name == "today"), variants[0])
    agree = target_agreement(today.features)
    passes = args.images * args.prompts
    records = []
    for v in variants:
        per_s = [passes / s for s in v.seconds]
        best, median = max(per_s), statistics.median(per_s)
        gflop = flops[v.label] / 1e9
        ceil = ceiling["bfloat16" if v.name.startswith("bf16") else "float32"]
        rel = [float((f - r).norm() / r.norm()) for f, r in zip(v.features, today.features, strict=True)]
        records.append({
            "variant": v.name, "batch_images": v.batch, "unet_batch": v.batch * args.prompts,
            "passes_per_s_best": round(best, 1), "passes_per_s_median": round(median, 1),
            "speedup_vs_today": round(best / max(passes / s for s in today.seconds), 2),
            "gflops_per_pass": round(gflop, 4), "gflops_per_s": round(best * gflop, 1),
            "fraction_of_matmul_ceiling": round(best * gflop / ceil, 3),
            "max_rel_err_vs_today": max(rel),
            "max_abs_diff_vs_today": max(float((f - r).abs().max())
                                         for f, r in zip(v.features, today.features, strict=True)),
            "min_target_cosine_vs_today": round(agree(v.features), 6),
            "warmup_s": round(warm[v.label], 1),
        })
    head = {"model": args.model, "cpu": _cpu_name(), "threads": args.threads,
            "torch": torch.__version__, "images": args.images, "prompts": args.prompts,
            "rounds": args.rounds, "matmul_gflops_per_s": {k: round(c, 1) for k, c in ceiling.items()},
            "load_average": [round(x, 2) for x in _loadavg()], "git": git_revision(),
            "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started, 1)}
    lines = [json.dumps(head)] + [json.dumps(r) for r in records]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(table(head, records))


def table(head: dict[str, Any], records: list[dict[str, Any]]) -> str:
    ceil = head["matmul_gflops_per_s"]
    out = [f"matmul ceiling: float32 {ceil['float32']:.0f} GFLOP/s, bfloat16 {ceil['bfloat16']:.0f} "
           f"GFLOP/s ({head['cpu']}, {head['threads']} threads, load {head['load_average']})",
           "", "| variant | images x prompts | passes/s (best / median) | x today | GFLOP/pass | "
           "GFLOP/s | of ceiling | rel. err vs today | min target cos |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        out.append(
            f"| {r['variant']} | {r['batch_images']} x {head['prompts']} | "
            f"{r['passes_per_s_best']:.0f} / {r['passes_per_s_median']:.0f} | "
            f"{r['speedup_vs_today']:.2f} | {r['gflops_per_pass']:.3f} | {r['gflops_per_s']:.0f} | "
            f"{100 * r['fraction_of_matmul_ceiling']:.0f} % | {r['max_rel_err_vs_today']:.1e} | "
            f"{r['min_target_cosine_vs_today']:.5f} |")
    return "\n".join(out)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


if __name__ == "__main__":
    main()

"""Target quality: can the local model reach the diffusion targets, and do they contrast?

For every reduction (mean-pool, spatial-norm, spatial-norm-centred) and shared projection
(federated PCA, random centred with the federated mean), the clients' own extraction path
(`feddifrc_core.representations`) turns the offline teacher's up-block maps into D-dim targets
for a "fit" set of private training images (which also fits the bases, as one client would) and
for held-out test images. Columns, on the test images:

- probe / kNN: linear probe and cosine kNN of the null-prompt targets (fit -> test);
- reachable: mean over targets t of max_{z >= 0} cos(z, t) = |t+| / |t| (post-ReLU features);
- cross-image cos: mean cosine between two different images' null-prompt targets;
- true vs other prompt: mean cosine between an image's true-class target and its other-class ones;
- TDCL at ideal anchor: the TDCL loss (tau from the run config) when z IS the positive target
  (chance = log(1 + K));
- prompt contrast: (1 - true vs other) / (1 - cross-image cos): how far a wrong prompt moves a
  target, relative to how far apart two images' targets are.

    .venv/bin/python benchmarks/target_quality.py     # ~5 min on 2 cores

Writes <out>/target_quality.json and <out>/target_quality.md (default
benchmarks/results/target_quality).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from feddifrc_core.client_extraction import (
    extract_client_representations,
    extract_position_stats,
)
from feddifrc_core.config import RunConfig
from feddifrc_core.datasets import load_dataset, select_subset, subsample
from feddifrc_core.diffusion.backbone import load_backbone
from feddifrc_core.diffusion.reduction import REDUCTIONS
from feddifrc_core.losses import tdcl_loss
from feddifrc_core.probe import knn_accuracy, linear_probe_accuracy
from feddifrc_core.projection import PROJECTIONS, merge_all, shared_bases
from feddifrc_core.representations import RepresentationSettings
from feddifrc_core.targets import DiffusionTargets

ROOT = Path(__file__).resolve().parents[1]


def quality(fit: DiffusionTargets, test: DiffusionTargets, fit_labels: torch.Tensor,
            test_labels: torch.Tensor, tau: float, seed: int) -> dict[str, float]:
    """The columns of the table for one setting (see the module docstring)."""
    pos, neg, null = test.positive, test.negatives, test.null  # [N, D], [N, K, D], [N, D]
    every = torch.cat([pos, null])  # the anchors' targets: TDCL positives and NDCR targets
    reachable = (every.clamp(min=0).norm(dim=1) / every.norm(dim=1).clamp(min=1e-12)).mean()
    cross = cross_image_cos(null)
    true_other = torch.einsum("nd,nkd->nk", F.normalize(pos, dim=1), F.normalize(neg, dim=2)).mean()
    ideal = tdcl_loss(pos, pos, neg, tau)
    return {
        "probe": linear_probe_accuracy(fit.null, fit_labels, null, test_labels, seed=seed),
        "knn": knn_accuracy(fit.null, fit_labels, null, test_labels),
        "reachable-cos": float(reachable),
        "cross-image-cos": cross,
        "true-vs-other-cos": float(true_other),
        "tdcl-ideal": float(ideal),
        "tdcl-chance": math.log(1 + neg.shape[1]),
        "prompt-contrast": float((1 - true_other) / (1 - cross)),
    }


def cross_image_cos(x: torch.Tensor) -> float:
    """Mean cosine between the rows of x [N, D] of two different images (diagonal left out)."""
    unit = F.normalize(x, dim=1)
    gram = unit @ unit.T  # [N, N]
    n = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def pixel_row(fit_images: torch.Tensor, fit_labels: torch.Tensor, test_images: torch.Tensor,
              test_labels: torch.Tensor, seed: int) -> dict[str, float]:
    x_fit = fit_images.flatten(1).float() / 255
    x_test = test_images.flatten(1).float() / 255
    return {
        "probe": linear_probe_accuracy(x_fit, fit_labels, x_test, test_labels, seed=seed),
        "knn": knn_accuracy(x_fit, fit_labels, x_test, test_labels),
        "cross-image-cos": cross_image_cos(x_test),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "target_quality")
    p.add_argument("--fit-samples", type=int, default=2000, help="private training images")
    p.add_argument("--test-samples", type=int, default=1000, help="test images")
    p.add_argument("--feature-dim", type=int, default=128, help="D: small-cnn's feature size")
    p.add_argument("--diffusion-model", default="offline-teacher")
    p.add_argument("--timestep", type=int, default=50, help="teacher.json's recommendation")
    p.add_argument("--up-blocks", default="0,1,2")
    p.add_argument("--tau", type=float, default=0.04)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--reductions", default=",".join(REDUCTIONS), help="comma-separated")
    p.add_argument("--pool-grids", default="1", help="mean-pool's g x g grids, comma-separated")
    p.add_argument("--write-teacher-card", action="store_true",
                   help="record the first setting's probe against pixels in the offline "
                        "teacher's teacher.json and model card (its acceptance numbers)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "target_quality",
                   help="feature cache: each setting's targets are extracted once")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()

    # 1. data: fit on private training images (as one client would), report on test images
    train, _ = select_subset(load_dataset("fashion-mnist", "train"), "private")
    fit, fit_rows = subsample(train, args.fit_samples, args.seed)
    test, test_rows = subsample(load_dataset("fashion-mnist", "test"), args.test_samples, args.seed)
    backbone = load_backbone(args.diffusion_model, "cpu", torch.float32)
    reductions = [r for r in args.reductions.split(",") if r]
    unknown = sorted(set(reductions) - set(REDUCTIONS))
    if unknown:
        raise SystemExit(f"--reductions: unknown {unknown}; choose from {list(REDUCTIONS)}")
    grids = [int(g) for g in args.pool_grids.split(",")]
    # (reduction, grid) pairs: a pooling grid applies to mean-pool only
    variants = [(r, g) for r in reductions for g in (grids if r == "mean-pool" else [1])]
    # the run config's view (float32, the backbone's native size), one per variant
    settings = {v: RepresentationSettings.from_run_config(RunConfig(
        diffusion_timestep=args.timestep, up_blocks=args.up_blocks, diffusion_image_size=0,
        extraction_batch_size=64, seed=args.seed, dataset="fashion-mnist", reduction=v[0],
        pool_grid=v[1], diffusion_dtype="float32"), label_free=False) for v in variants}
    cache = args.cache_dir
    # test ids are offset so that their noise differs from the training images'
    fit_args = (fit.images, fit.labels, fit_rows, fit.class_names)
    test_args = (test.images, test.labels, test_rows + 10**6, test.class_names)

    rows: dict[str, dict[str, float]] = {
        "raw pixels": pixel_row(fit.images, fit.labels, test.images, test.labels, args.seed)}
    for reduction, grid in variants:
        s = settings[(reduction, grid)]
        # 2. the statistics for the shared basis, from the fit images
        if reduction == "mean-pool":
            fit_reps = extract_client_representations(backbone, *fit_args, s, cache, progress=False)
            stats = fit_reps.pca_stats()
        else:
            stats = extract_position_stats(backbone, *fit_args, s, cache)
        for projection in PROJECTIONS:
            bases = shared_bases(projection, args.feature_dim, [st.dim for st in stats],
                                 args.seed, merge_all([stats]))
            # 3. targets of both sets in the shared space (spatial-norm: projected in the hooks)
            kw: dict[str, Any] = {"progress": False}
            if reduction != "mean-pool":
                kw["bases"] = bases
                fit_reps = extract_client_representations(backbone, *fit_args, s, cache, **kw)
            test_reps = extract_client_representations(backbone, *test_args, s, cache, **kw)
            offset = None
            if reduction == "spatial-norm-centred":  # the federated mean target of the fit set
                count, total = fit_reps.target_sum(bases, args.feature_dim)
                offset = total / count
            fit_t = fit_reps.targets(bases, args.feature_dim, offset)
            test_t = test_reps.targets(bases, args.feature_dim, offset)
            name = f"{reduction}{f' {grid}x{grid}' if grid > 1 else ''} / {projection}"
            rows[name] = quality(fit_t, test_t, fit.labels, test.labels, args.tau, args.seed)
            print(f"{name}: {json.dumps({k: round(v, 3) for k, v in rows[name].items()})}",
                  flush=True)

    # 4. report
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"fit-samples": len(fit), "test-samples": len(test), "feature-dim": args.feature_dim,
            "diffusion-model": args.diffusion_model, "timestep": args.timestep,
            "alpha-bar": float(backbone.scheduler.alphas_cumprod[args.timestep]),
            "up-blocks": args.up_blocks, "tau": args.tau, "seed": args.seed,
            "seconds": round(time.time() - started, 1)}
    (args.out / "target_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = table(rows, meta)
    (args.out / "target_quality.md").write_text(md)
    print(md)
    if args.write_teacher_card:
        first = next(name for name in rows if name != "raw pixels")
        record_in_teacher_card(args.diffusion_model, first, rows[first], rows["raw pixels"], meta)
    return 0


def record_in_teacher_card(model: str, setting: str, row: dict[str, float],
                           pixels: dict[str, float], meta: dict[str, Any]) -> None:
    """Store the clients' target probe (`targets_probe`) in teacher.json and rewrite the card."""
    from feddifrc_core.checkpoint import atomic_write_text
    from feddifrc_core.diffusion.teacher_backbone import TEACHER_JSON, resolve_teacher_path
    from teacher.export import model_card

    folder = resolve_teacher_path(model.partition(":")[2] or "offline-teacher")
    info = json.loads((folder / TEACHER_JSON).read_text())
    info["targets_probe"] = {
        "setting": setting, "timestep": meta["timestep"], "up_blocks": meta["up-blocks"],
        "feature_dim": meta["feature-dim"], "fit_samples": meta["fit-samples"],
        "test_samples": meta["test-samples"], "linear": row["probe"], "knn": row["knn"],
        "pixels_linear": pixels["probe"], "pixels_knn": pixels["knn"],
        "source": "benchmarks/target_quality.py"}
    atomic_write_text(folder / TEACHER_JSON, json.dumps(info, indent=2) + "\n")
    atomic_write_text(folder / "README.md", model_card(info))
    print(f"Recorded the target probe of {setting!r} in {folder / TEACHER_JSON}")


def table(rows: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    cols = [("probe", "linear probe"), ("knn", "kNN"), ("reachable-cos", "reachable cos (z >= 0)"),
            ("cross-image-cos", "cross-image cos"), ("true-vs-other-cos", "true vs other prompt cos"),
            ("tdcl-ideal", "TDCL at ideal anchor"), ("prompt-contrast", "prompt contrast")]
    chance = next((r["tdcl-chance"] for r in rows.values() if "tdcl-chance" in r), float("nan"))
    lines = [
        f"Target quality on {meta['test-samples']} Fashion-MNIST test images (bases and probes fitted "
        f"on {meta['fit-samples']} private training images), {meta['diffusion-model']}, "
        f"t={meta['timestep']} (alpha_bar {meta['alpha-bar']:.3f}), up blocks {meta['up-blocks']}, "
        f"D={meta['feature-dim']}, tau={meta['tau']:g} (TDCL chance {chance:.2f}), seed {meta['seed']}.",
        "",
        "| reduction / projection | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, r in rows.items():
        cells = [f"{r[k]:.3f}" if k in r else "-" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

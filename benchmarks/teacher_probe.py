"""Is the offline teacher worth using? Probes of its features on the clients' PRIVATE images.

For a few timesteps t (noise level alpha_bar_t), the pooled up-block features of the frozen teacher
under the null prompt "" -- exactly what the federation's extractor computes -- are compared with
raw pixels and with the same architecture untrained: a linear probe (standardised logistic
regression) and a cosine kNN, fitted on private training images, selected on a disjoint private
validation set, reported on the test set. Plus zero-shot diffusion-classifier accuracy
(feddifrc_core/zero_shot.py): the class prompt whose denoising error is smallest, averaged over a
few stratified timesteps.

    python benchmarks/teacher_probe.py      # ~17 min on 2 cores shared with other jobs
    python benchmarks/teacher_probe.py --write-recommendation   # also updates teacher.json + card

Writes <out>/teacher_probe.json and <out>/teacher_probe.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core import zero_shot
from feddifrc_core.datasets import load_dataset, select_subset, subsample
from feddifrc_core.diffusion.extractor import (
    DiffusionFeatureExtractor,
    to_model_pixels,
)
from feddifrc_core.diffusion.teacher_backbone import (
    TEACHER_JSON,
    TeacherBackbone,
    load_teacher_backbone,
    resolve_teacher_path,
)
from feddifrc_core.probe import knn_accuracy
from feddifrc_core.prompts import class_prompts
from feddifrc_core.zero_shot import ZeroShotSettings, zero_shot_logits
from teacher.config import build_unet, config_from_info
from teacher.export import model_card, recommendation

ROOT = Path(__file__).resolve().parents[1]
BLOCK_SETS = ("0", "1", "2", "1,2", "0,1,2")  # globally pooled: what the extractor computes
BLOCK_SETS_2X2 = ("1,2", "0,1,2")  # 2x2 pooled: only to show what global pooling discards


def untrained_backbone(trained: TeacherBackbone, seed: int = 0) -> TeacherBackbone:
    """The same architecture with seeded random weights (the baseline the training must beat)."""
    cfg = config_from_info(trained.info)
    torch.manual_seed(seed)
    return TeacherBackbone(
        unet=build_unet(cfg),
        scheduler=trained.scheduler,
        info=trained.info,
        device=trained.device,
        dtype=trained.dtype,
        name="untrained",
    )


@torch.no_grad()
def null_prompt_features(
    bb: TeacherBackbone,
    images: torch.Tensor,
    ids: np.ndarray,
    timestep: int,
    batch_size: int,
    pools: tuple[int, ...] = (1, 2),
) -> dict[tuple[int, int], torch.Tensor]:
    """{(pool, block): [N, C_l * pool^2]} under "" (the federation's NDCR target) at `timestep`.

    Same steps and per-sample noise as DiffusionFeatureExtractor (pool 1 = its global mean; a test
    checks they agree), plus pool x pool average pooling to see what global pooling throws away.
    """
    blocks = tuple(range(len(bb.unet.up_blocks)))
    ex = DiffusionFeatureExtractor(bb, timestep=timestep, up_blocks=blocks, batch_size=batch_size)
    embed = bb.encode_prompts([""])  # [1, L, D]
    hidden: dict[int, torch.Tensor] = {}
    handles = [
        bb.unet.up_blocks[i].register_forward_hook(
            lambda _m, _i, out, i=i: hidden.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i in blocks
    ]
    chunks: dict[tuple[int, int], list[torch.Tensor]] = {(p, b): [] for p in pools for b in blocks}
    try:
        for start in range(0, len(images), batch_size):
            # 1. pixels -> UNet input, seeded per-sample noise at one timestep (as the extractor)
            x = bb.encode_images(
                to_model_pixels(
                    images[start : start + batch_size],
                    ex.image_size,
                    bb.in_channels,
                    bb.device,
                    bb.dtype,
                )
            )
            sid = [int(i) for i in ids[start : start + batch_size]]
            noise = ex.noise(x.shape[1:], sid, 0).to(bb.device, bb.dtype)
            t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=bb.device)
            # 2. one UNet pass under the null prompt; hooks keep every up block's output
            bb.unet(
                bb.scheduler.add_noise(x, noise, t),
                t,
                encoder_hidden_states=embed.expand(x.shape[0], -1, -1),
            )
            for p in pools:
                for b in blocks:
                    pooled = torch.nn.functional.adaptive_avg_pool2d(hidden[b].float(), p)
                    chunks[(p, b)].append(pooled.flatten(1).cpu())  # [B, C_l * p * p]
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in chunks.items()}


def block_set(feats: dict[tuple[int, int], torch.Tensor], pool: int, spec: str) -> torch.Tensor:
    return torch.cat([feats[(pool, int(b))] for b in spec.split(",")], dim=1)  # [N, sum dims]


def zero_shot_accuracy(
    bb: TeacherBackbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    sample_ids: np.ndarray,
    prompts: list[str],
    trials: int,
    seed: int = 0,
) -> float:
    """The diffusion classifier of feddifrc_core.zero_shot (the distillation control's teacher):
    argmax of the logits over `trials` stratified timesteps, one noise draw each, the same
    noise for every prompt of an image."""
    num_t = int(bb.scheduler.config.num_train_timesteps)
    settings = ZeroShotSettings(timesteps=ZeroShotSettings.stratified(trials, num_t), seed=seed)
    logits = zero_shot_logits(bb, images, [int(i) for i in sample_ids], prompts, settings)
    return zero_shot.accuracy(logits, labels)


def probe_scores(
    train: torch.Tensor,
    y_train: torch.Tensor,
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    """Linear probe (fitted ONCE, the protocol of feddifrc_core.probe) and 20-NN per eval split."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train = train.double().numpy()
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=1.0, max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is a (lower) estimate
        clf.fit(scaler.transform(x_train), y_train.numpy())
    out = {}
    for split, (x, y) in evals.items():
        pred = clf.predict(scaler.transform(x.double().numpy()))
        out[f"linear_{split}"] = float(np.mean(pred == y.numpy()))
        out[f"knn_{split}"] = knn_accuracy(train, y_train, x, y, k=20)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="offline-teacher")
    p.add_argument("--train-samples", type=int, default=1000, help="private images for fitting")
    p.add_argument(
        "--val-samples", type=int, default=500, help="disjoint private images: selection"
    )
    p.add_argument("--test-samples", type=int, default=1000, help="test images: reported numbers")
    p.add_argument("--timesteps", default="100,50,200,300")
    p.add_argument("--untrained-timesteps", default="100")
    p.add_argument("--zero-shot-samples", type=int, default=100)
    p.add_argument("--zero-shot-trials", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "teacher-probe"))
    p.add_argument(
        "--write-recommendation",
        action="store_true",
        help="store the chosen timestep/blocks in the teacher's teacher.json and card",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # 1. data: private train/val (disjoint, stratified) and a stratified test subset
    private, _ = select_subset(load_dataset("fashion-mnist", "train"), "private")
    drawn, drawn_idx = subsample(private, args.train_samples + args.val_samples, seed=1)
    order = np.random.RandomState(2).permutation(len(drawn))
    tr_sel, va_sel = order[: args.train_samples], order[args.train_samples :]
    test, test_idx = subsample(load_dataset("fashion-mnist", "test"), args.test_samples, seed=1)
    sets = {
        "train": (drawn.images[tr_sel], drawn.labels[tr_sel], drawn_idx[tr_sel]),
        "val": (drawn.images[va_sel], drawn.labels[va_sel], drawn_idx[va_sel]),
        "test": (test.images, test.labels, 10**6 + test_idx),
    }  # ids only seed the noise
    y = {k: v[1] for k, v in sets.items()}
    rows: list[dict[str, Any]] = []

    def add(
        model: str,
        t: int | None,
        alpha_bar: float | None,
        blocks: str,
        pool: int | None,
        feats: dict,
    ) -> None:
        scores = probe_scores(
            feats["train"], y["train"], {s: (feats[s], y[s]) for s in ("val", "test")}
        )
        rows.append(
            {
                "features": model,
                "timestep": t,
                "alpha_bar": alpha_bar,
                "blocks": blocks,
                "pool": pool,
                "dim": int(feats["train"].shape[1]),
                **scores,
            }
        )
        print(
            f"  {model:9s} t={t!s:>4} blocks={blocks:6s} pool={pool!s:4s} "
            + " ".join(f"{k}={v:.3f}" for k, v in scores.items()),
            flush=True,
        )

    # 2. raw pixels
    add(
        "pixels", None, None, "-", None, {k: v[0].flatten(1).float() / 255 for k, v in sets.items()}
    )
    # 3. trained and untrained teacher features at several noise levels
    bb = load_teacher_backbone(args.teacher, "cpu", torch.float32)
    models = [("teacher", bb, [int(t) for t in args.timesteps.split(",")])]
    if args.untrained_timesteps:
        models.append(
            (
                "untrained",
                untrained_backbone(bb),
                [int(t) for t in args.untrained_timesteps.split(",")],
            )
        )
    # 4. zero-shot diffusion classifier on test images (run after the first teacher timestep, so
    #    an interrupted run on a busy machine still has the headline numbers)
    prompts = class_prompts(list(test.class_names), "a photo of a {}")
    n_zs = min(args.zero_shot_samples, len(test))
    zs_sel = subsample(test, n_zs, seed=3)[1] if n_zs < len(test) else np.arange(len(test))
    zs = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, backbone, steps in models:
        for step in steps:
            per = {
                k: null_prompt_features(backbone, v[0], v[2], step, args.batch_size)
                for k, v in sets.items()
            }
            ab = round(float(backbone.scheduler.alphas_cumprod[step]), 4)
            for pool, specs in ((1, BLOCK_SETS), (2, BLOCK_SETS_2X2)):
                for spec in specs:
                    add(
                        name,
                        step,
                        ab,
                        spec,
                        pool,
                        {k: block_set(f, pool, spec) for k, f in per.items()},
                    )
            if zs is None:
                zs = zero_shot_accuracy(
                    bb, test.images[zs_sel], test.labels[zs_sel], sets["test"][2][zs_sel],
                    prompts, args.zero_shot_trials,
                )
                print(
                    f"  zero-shot diffusion classifier: {zs:.3f} on {n_zs} test images", flush=True
                )
            partial = {"rows": rows, "zero_shot": zs, "seconds": round(time.time() - t0, 1)}
            (out / "teacher_probe.partial.json").write_text(json.dumps(partial, indent=2) + "\n")
    # 5. choose by validation linear-probe accuracy among what the extractor can compute
    # (the extractor's `pool-grid`: 1 = global mean, 2 = 2x2); ties go to the better validation
    # kNN (the cosine geometry TDCL and NDCR align to), then to fewer dims
    cands = [r for r in rows if r["features"] == "teacher"]
    best = max(cands, key=lambda r: (r["linear_val"], r["knn_val"], -r["dim"]))
    result = {
        "teacher": args.teacher,
        "teacher_identity": bb.identity(),
        "rows": rows,
        "zero_shot": {"accuracy": zs, "samples": n_zs, "trials": args.zero_shot_trials},
        "best": best,
        "settings": vars(args),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "teacher_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "teacher_probe.md").write_text(markdown(result))
    print(markdown(result))
    # 6. optionally record the choice in the shipped teacher (json + card, not the weights)
    if args.write_recommendation:
        folder = resolve_teacher_path(args.teacher)
        info = json.loads((folder / TEACHER_JSON).read_text())
        rec = recommendation(
            config_from_info(info),
            best["timestep"],
            best["blocks"],
            f"benchmarks/teacher_probe.py: best validation linear probe, then kNN "
            f"({best['linear_test']:.3f} test vs pixels {rows[0]['linear_test']:.3f})",
        )
        info["recommended"] = {**rec, "pool_grid": int(best["pool"])}
        info["probe"] = {
            "zero_shot_accuracy": zs,
            "zero_shot_samples": n_zs,
            "linear_probe_test": best["linear_test"],
            "pixels_linear_probe_test": rows[0]["linear_test"],
        }
        (folder / TEACHER_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(info))
        print(f"Recorded {rec} in {folder / TEACHER_JSON}")
    return 0


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Linear probe / 20-NN accuracy on pooled up-block features under the null prompt "
        f"(pool 1x1 = the extractor's global mean; 2x2 shows what finer pooling adds), "
        f"fitted on {s['train_samples']} private images, selected on {s['val_samples']} other "
        f"private images, reported on {s['test_samples']} test images.",
        "",
        "| features | t | alpha_bar_t | up blocks | pool | dim | linear val | linear test | kNN val "
        "| kNN test |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ab = "-" if r["alpha_bar"] is None else f"{r['alpha_bar']:.3f}"
        pool = "-" if r["pool"] is None else f"{r['pool']}x{r['pool']}"
        lines.append(
            f"| {r['features']} | {r['timestep'] if r['timestep'] is not None else '-'} | {ab} "
            f"| {r['blocks']} | {pool} | {r['dim']} | {r['linear_val']:.3f} "
            f"| {r['linear_test']:.3f} | {r['knn_val']:.3f} | {r['knn_test']:.3f} |"
        )
    zs, b = result["zero_shot"], result["best"]
    lines += [
        "",
        f"Zero-shot diffusion classifier (10 class prompts, {zs['trials']} stratified "
        f"timesteps, {zs['samples']} test images): **{zs['accuracy']:.3f}**.",
        "",
        f"Best by validation: t={b['timestep']} (alpha_bar {b['alpha_bar']:.3f}), up blocks "
        f'"{b["blocks"]}": linear test {b["linear_test"]:.3f}, kNN test {b["knn_test"]:.3f}.',
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

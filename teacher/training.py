"""The teacher's training loop: deterministic, resumable from a verified checkpoint.

The checkpoint (weights, EMA, AdamW moments, the noise generator, the loss history) is one file
written by the project's checkpoint module: atomic, SHA-256 verified on read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_arrays
from feddifrc_core.diffusion.minilm import encode_texts
from teacher.config import TeacherConfig, build_scheduler, build_unet, captions_for, lr_factor

CHECKPOINT = "checkpoint.safetensors"
_KIND = "offline-teacher-training"


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


# --- checkpoint: arrays under unet./ema./optimizer./generator/history, the rest in meta ----------
def save_checkpoint(
    state: TrainState, cfg: TeacherConfig, path: Path, extra: dict[str, Any]
) -> None:
    arrays: dict[str, np.ndarray] = {}
    for prefix, module in (("unet", state.unet), ("ema", state.ema)):
        arrays.update({f"{prefix}.{k}": v.detach().numpy() for k, v in module.state_dict().items()})
    opt = state.optimizer.state_dict()
    for index, slots in opt["state"].items():
        for slot, value in slots.items():  # AdamW: step, exp_avg, exp_avg_sq
            arrays[f"optimizer.{index}.{slot}"] = value.detach().reshape(-1).numpy()
    arrays["generator"] = state.generator.get_state().numpy()
    arrays["history"] = np.asarray(state.history, dtype=np.float64).reshape(-1, 3)
    meta = {"kind": _KIND, "config": cfg.to_json(), "step": state.step,
            "seconds": state.seconds, "extra": extra, "param_groups": opt["param_groups"]}
    save_arrays(path, arrays, meta)


def load_checkpoint_state(path: Path, cfg: TeacherConfig) -> TrainState:
    ckpt = load_arrays(path)  # verified; CheckpointError names the damaged file
    meta = ckpt.meta
    if meta.get("kind") != _KIND:
        raise CheckpointError(f"{path} is not a teacher-training checkpoint")
    if meta.get("config") != json.loads(json.dumps(cfg.to_json())):  # tuples come back as lists
        raise RuntimeError(
            f"Checkpoint {path} was written for another configuration "
            f"({meta.get('config')}); delete it or use another --work-dir."
        )
    state = init_state(cfg)
    for prefix, module in (("unet", state.unet), ("ema", state.ema)):
        module.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.group(prefix).items()})
    template = state.optimizer.state_dict()  # the shapes of a fresh AdamW's slots
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, flat in ckpt.group("optimizer").items():
        position, slot = name.split(".")
        shape = () if slot == "step" else params[int(position)].shape  # flattened on save
        slots.setdefault(int(position), {})[slot] = torch.from_numpy(flat).reshape(shape)
    groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
    state.optimizer.load_state_dict({**template, "state": slots, "param_groups": groups})
    state.generator.set_state(torch.from_numpy(ckpt.arrays["generator"].copy()))
    state.step, state.seconds = int(meta["step"]), float(meta["seconds"])
    state.history = [(int(s), float(loss), float(lr)) for s, loss, lr in ckpt.arrays["history"]]
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
    (resumable) without changing the learning-rate schedule, which is laid out for `max_steps`.
    `context` ([C+1, L, D], class captions then "") skips MiniLM (tests).
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
    alphas_cumprod = build_scheduler(cfg).alphas_cumprod  # [T]

    # 2. fresh state or resume
    ckpt_path = work_dir / CHECKPOINT if work_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint_state(ckpt_path, cfg)
    else:
        state = init_state(cfg)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch
    state.unet.train()
    start, last_ckpt = time.monotonic(), time.monotonic()
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress, desc="teacher",
               dynamic_ncols=True)
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
        lr = cfg.lr * lr_factor(state.step, cfg)
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

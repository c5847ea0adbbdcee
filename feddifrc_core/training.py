"""One client's local update, the same loop for every algorithm (algorithms/, one file each).

`train_local` runs SGD over seeded shuffles of the client's data; the algorithm object (made from
the run config, `RunConfig.new_algorithm`) supplies the loss of each mini-batch. It never changes the global RNG state of the caller
and, on CPU, gives bit-identical results for the same inputs and seed.

Transforms: a train transform is called as `transform(images_uint8 [B, C, H, W], generator)` with
the batch on the training device and a CPU `torch.Generator`; it returns float [B, C, H, W] on the
same device. It must draw its random numbers from that generator (on the CPU), so augmentations
are the same whichever device trains. An eval transform is called as `transform(images_uint8)`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from feddifrc_core.algorithms import (
    Algorithm,
    Batch,
    TrainTransform,
    algorithm_names,
    get_algorithm,
)
from feddifrc_core.divergence import DivergedError, describe, nonfinite_tensors

EvalTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean total loss over the last local epoch
    accuracy: float  # train accuracy over the last epoch; 0.0 for the label-free algorithms
    num_examples: int  # local samples (the FedAvg weight), not samples x epochs
    seconds: float
    metrics: dict[str, float]  # last-epoch means: loss, accuracy and the unweighted loss parts
    epochs: tuple[dict[str, float], ...] = ()  # the same means for every epoch, in order


def scale_only(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fallback transform: uint8 -> float in [0, 1], no augmentation."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def check_images(images: torch.Tensor) -> int:
    """The sample count of a [N, C, H, W] tensor with N >= 1 (ValueError otherwise)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a [N, C, H, W] tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("`images` is empty: a client needs at least one sample")
    return int(images.shape[0])


def check_labels(labels: torch.Tensor | None, n: int, algorithm: str) -> None:
    """int64 labels [N] (ValueError naming the label-free choices when they are missing)."""
    if labels is None:
        label_free = [a for a in algorithm_names() if get_algorithm(a).label_free]
        raise ValueError(
            f"algorithm {algorithm!r} trains with labels but `labels` is None; pass the int64 "
            f"labels [N={n}] or choose a label-free algorithm ({', '.join(label_free)})"
        )
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"`labels` must be [N={n}], got shape {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"`labels` must be int64, got {labels.dtype}; use labels.long()")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of one seeded epoch. A trailing batch of one sample after full batches is
    dropped: BatchNorm cannot train on it and NT-Xent needs two images."""
    perm = torch.randperm(n, generator=generator)  # [N] on CPU: device-independent order
    for start in range(0, n, batch_size):
        rows = perm[start:start + batch_size]
        if rows.numel() == 1 and start > 0 and batch_size > 1:
            continue
        yield rows


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    algorithm: Algorithm,
    device: torch.device | str,
    transform: TrainTransform | None = None,
    global_model: nn.Module | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> TrainResult:
    """Train `model` in place on one client's data with `algorithm`.

    Args:
        model: forward(x) -> (features [B, D], logits [B, C]); holds the global weights on entry.
        images: uint8 [N, C, H, W] (the client's samples, in the row order of its targets).
        labels: int64 [N]; None for the label-free algorithms, which never read it.
        algorithm: the run's algorithm with what this update trains with (`begin_update`: e.g.
            FedDifRC's targets, MOON's previous model); its `cfg` gives the optimiser and epochs.
        transform: train transform (see module doc); None = scale to [0, 1], no augmentation.
        global_model: FedProx/MOON anchor; None = a frozen copy of `model` as it enters.
        seed: shuffling, augmentation and dropout of this update; None = the run seed.
    """
    # 1. validate inputs; labels are not looked at in the label-free algorithms
    cfg = algorithm.cfg
    seed = cfg.seed if seed is None else seed
    device = torch.device(device)
    n = check_images(images)
    if not algorithm.label_free:
        check_labels(labels, n, algorithm.name)
    algorithm.check_inputs(model, n, transform)
    transform = transform or scale_only

    # 2. move the whole client set to the device once: per step only index gathers remain
    model.to(device).train()
    images_d = images.to(device)  # [N, C, H, W] uint8
    labels_d = None if algorithm.label_free or labels is None else labels.to(device)  # [N]
    algorithm.prepare(model, device, global_model)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
    )
    gen = torch.Generator().manual_seed(seed)  # shuffling and augmentation, CPU-side

    # 3. epochs over seeded shuffles; sums stay on the device (no sync per step)
    steps_per_epoch = math.ceil(n / cfg.batch_size) - int(n > cfg.batch_size
                                                          and n % cfg.batch_size == 1)
    bar = tqdm(total=cfg.local_epochs * steps_per_epoch, desc=f"train {algorithm.name}",
               disable=not progress, leave=False)
    history: list[dict[str, float]] = []
    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)  # dropout and any other global-RNG use inside the model
        for epoch in range(cfg.local_epochs):
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device)
            seen = 0
            for rows_cpu in _batches(n, cfg.batch_size, gen):
                rows = rows_cpu.to(device)  # [B]
                batch = Batch(rows=rows, images=images_d[rows],
                              labels=labels_d[rows] if labels_d is not None else None,
                              generator=gen, transform=transform)
                x = transform(batch.images, gen)  # [B, C, H, W] float
                parts, logits = algorithm.batch_loss(model, x, batch)
                total = _weighted_sum(parts)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                b = rows.numel()
                seen += b
                for key, value in {"loss": total.detach(), **{k: v.detach() for k, (_, v)
                                                             in parts.items()}}.items():
                    sums[key] = sums.get(key, 0.0) + value * b
                if logits is not None and batch.labels is not None:  # label-free: no accuracy
                    correct += (logits.detach().argmax(dim=1) == batch.labels).sum()
                bar.update(1)
            means = {key: float(value) / seen for key, value in sums.items()}
            means["accuracy"] = 0.0 if algorithm.label_free else float(correct) / seen
            # The loss can stay finite (4e22 at lr=1e6) while the weights are already inf/NaN:
            # check both, once per epoch, so a client never sends a diverged model.
            bad = nonfinite_tensors(model)
            if not math.isfinite(means["loss"]) or bad:
                what = (f"NaN or inf in {describe(bad, len(model.state_dict()), 'tensors')}"
                        if bad else f"the local loss became {means['loss']}")
                raise DivergedError(
                    f"{algorithm.name}: training diverged in epoch {epoch + 1} ({what}); "
                    f"lower `lr` (now {cfg.lr}) or check the inputs and targets for NaN/inf"
                )
            history.append(means)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
    bar.close()
    last = history[-1]
    return TrainResult(
        loss=last["loss"],
        accuracy=last["accuracy"],
        num_examples=n,
        seconds=time.perf_counter() - start_time,
        metrics=dict(last),
        epochs=tuple(history),
    )


def _weighted_sum(parts: dict[str, tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_k w_k * part_k in insertion order (the order fixes the float rounding)."""
    weighted = [w * v for w, v in parts.values()]
    total = weighted[0]
    for term in weighted[1:]:
        total = total + term
    return total

"""Local training and evaluation for every algorithm (FedAvg, FedProx, MOON, FedDifRC, SSL).

`train_local` is one client's local update: SGD over seeded shuffles of the client's data with the
loss of the chosen algorithm. It never changes the global RNG state of the caller and, on CPU,
gives bit-identical results for the same inputs and seed.

Transforms: a train transform is called as `transform(images_uint8 [B, C, H, W], generator)` with
the batch on the training device and a CPU `torch.Generator`; it returns float [B, C, H, W] on the
same device. It must draw its random numbers from that generator (on the CPU), so augmentations
are the same whichever device trains. An eval transform is called as `transform(images_uint8)`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from feddifrc_core.config import ALGORITHMS, SSL_ALGORITHMS, RunConfig
from feddifrc_core.losses import NDCR_KINDS, fedprox_term, moon_loss, ndcr_loss, nt_xent, tdcl_loss
from feddifrc_core.models import alignment_features
from feddifrc_core.targets import DiffusionTargets

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
EvalTransform = Callable[[torch.Tensor], torch.Tensor]

TARGET_ALGORITHMS = ("feddifrc", "feddifrc-ssl")


@dataclass(frozen=True)
class TrainSettings:
    """Everything one local update needs; built from the run config, reseeded per round/client."""

    algorithm: str = "fedavg"
    local_epochs: int = 1
    batch_size: int = 64  # paper: 64
    lr: float = 0.01  # paper: SGD 0.01
    momentum: float = 0.9  # paper: 0.9
    weight_decay: float = 1e-5  # paper: 1e-5 on CIFAR-10
    seed: int = 0  # shuffling, augmentation and dropout of this update
    proximal_mu: float = 0.01  # FedProx
    moon_mu: float = 1.0  # MOON
    moon_temperature: float = 0.5  # MOON
    lambda_tdcl: float = 1.0  # FedDifRC; 0 skips the term
    lambda_ndcr: float = 1.0  # FedDifRC; 0 skips the term
    tau: float = 0.04  # TDCL temperature (reference)
    ndcr_loss: str = "l2"  # l2 | kl | l2-raw (METHOD.md)
    simclr_temperature: float = 0.5  # SimCLR NT-Xent

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"`algorithm` must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        if self.ndcr_loss not in NDCR_KINDS:
            raise ValueError(f"`ndcr_loss` must be one of {list(NDCR_KINDS)}, got {self.ndcr_loss!r}")
        for name in ("local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "tau", "moon_temperature", "simclr_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "proximal_mu", "moon_mu", "lambda_tdcl",
                     "lambda_ndcr"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if self.algorithm == "feddifrc-ssl" and self.lambda_tdcl == 0 and self.lambda_ndcr == 0:
            raise ValueError(
                "feddifrc-ssl has no cross-entropy: `lambda_tdcl` and `lambda_ndcr` cannot both be 0"
            )

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> TrainSettings:
        """The settings named in the run config (seed = the run seed; see `derive_seed`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(cfg, name) for name in names})

    @property
    def needs_labels(self) -> bool:
        return self.algorithm not in SSL_ALGORITHMS

    @property
    def needs_targets(self) -> bool:
        return self.algorithm in TARGET_ALGORITHMS


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean total loss over the last local epoch
    accuracy: float  # train accuracy over the last epoch; 0.0 for the label-free algorithms
    num_examples: int  # local samples (the FedAvg weight), not samples x epochs
    seconds: float
    metrics: dict[str, float]  # last-epoch means: loss, accuracy and the unweighted loss parts
    epochs: tuple[dict[str, float], ...] = ()  # the same means for every epoch, in order


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy
    accuracy: float
    num_examples: int


def derive_seed(seed: int, *keys: int) -> int:
    """A seed for one (round, client, ...) from the run seed; independent streams per key tuple."""
    words = [int(k) % 2**32 for k in (seed, *keys)]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _scale_only(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fallback transform: uint8 -> float in [0, 1], no augmentation."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _check_images(images: torch.Tensor) -> int:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"`images` must be a [N, C, H, W] tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("`images` is empty: a client needs at least one sample")
    return int(images.shape[0])


def _check_labels(labels: torch.Tensor | None, n: int, algorithm: str) -> None:
    if labels is None:
        raise ValueError(
            f"algorithm {algorithm!r} trains with labels but `labels` is None; pass the int64 "
            f"labels [N={n}] or choose a label-free algorithm ({', '.join(SSL_ALGORITHMS)})"
        )
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"`labels` must be [N={n}], got shape {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"`labels` must be int64, got {labels.dtype}; use labels.long()")


def _frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A detached eval-mode copy: the reference point of FedProx/MOON must not train."""
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen


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
    settings: TrainSettings,
    device: torch.device | str,
    transform: TrainTransform | None = None,
    targets: DiffusionTargets | None = None,
    global_model: nn.Module | None = None,
    previous_model: nn.Module | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train `model` in place on one client's data with `settings.algorithm`.

    Args:
        model: forward(x) -> (features [B, D], logits [B, C]); holds the global weights on entry.
        images: uint8 [N, C, H, W] (the client's samples, in the row order of `targets`).
        labels: int64 [N]; None for feddifrc-ssl and simclr, which never read it.
        transform: train transform (see module doc); None = scale to [0, 1], no augmentation.
        targets: diffusion targets, required by feddifrc and feddifrc-ssl.
        global_model: FedProx/MOON anchor; None = a frozen copy of `model` as it enters.
        previous_model: MOON's previous local model of this client; None (its first round) = the
            global model: the MOON term is then a constant log 2 with zero gradient (MOON's code
            has no negative in its first round: the same update).
    """
    # 1. validate inputs; labels are not looked at in the label-free algorithms
    s = settings
    device = torch.device(device)
    n = _check_images(images)
    if s.needs_labels:
        _check_labels(labels, n, s.algorithm)
    if s.needs_targets:
        if targets is None:
            raise ValueError(
                f"algorithm {s.algorithm!r} needs the client's DiffusionTargets but `targets` is None; "
                "extract them first (feature cache) or choose fedavg/fedprox/moon"
            )
        if len(targets) != n:
            raise ValueError(f"`targets` must have one row per image ({n}), got {len(targets)}")
        model_dim = getattr(model, "feature_dim", targets.feature_dim)
        if targets.feature_dim != model_dim:
            raise ValueError(
                f"`targets` have {targets.feature_dim} dims but the model's features have "
                f"{model_dim}; project the diffusion features to the model's feature size"
            )
    if s.algorithm == "simclr" and transform is None:
        raise ValueError("simclr contrasts two random augmentations: pass a random `transform`")
    if s.algorithm == "simclr" and n < 2:
        raise ValueError(f"simclr needs at least 2 samples, got {n}")
    transform = transform or _scale_only

    # 2. move the whole client set to the device once: per step only index gathers remain
    model.to(device).train()
    images_d = images.to(device)  # [N, C, H, W] uint8
    labels_d = labels.to(device) if (s.needs_labels and labels is not None) else None  # [N]
    tgt = None
    if s.needs_targets and targets is not None:
        tgt = DiffusionTargets(
            positive=targets.positive.to(device, torch.float32),  # [N, D]
            negatives=targets.negatives.to(device, torch.float32),  # [N, K, D]
            null=targets.null.to(device, torch.float32),  # [N, D]
        )
    anchor = None
    if s.algorithm in ("fedprox", "moon"):
        anchor = _frozen_copy(global_model if global_model is not None else model, device)
    prev = _frozen_copy(previous_model, device) if (
        s.algorithm == "moon" and previous_model is not None) else anchor
    anchor_params = [p.detach() for p in anchor.parameters()] if anchor is not None else []
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
    )

    gen = torch.Generator().manual_seed(s.seed)  # shuffling and augmentation, CPU-side

    # 3. the loss of one step: total and the unweighted parts (for the metrics)
    def step_loss(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                               torch.Tensor | None]:
        parts: dict[str, tuple[float, torch.Tensor]] = {}
        logits = None
        if s.algorithm == "simclr":
            x2 = transform(images_d[rows], gen)  # [B, C, H, W] second view
            feats, _ = model(torch.cat([x, x2]))  # [2B, D]: one pass, shared BatchNorm statistics
            z1, z2 = feats.chunk(2)
            parts["ntxent"] = (1.0, nt_xent(z1, z2, s.simclr_temperature))
        else:
            z, logits = model(x)  # [B, D], [B, C]
            if labels_d is not None:
                parts["ce"] = (1.0, F.cross_entropy(logits, labels_d[rows]))
            if s.algorithm == "fedprox" and s.proximal_mu > 0:
                parts["prox"] = (s.proximal_mu, fedprox_term(model, anchor_params, 1.0))
            if s.algorithm == "moon" and s.moon_mu > 0:
                assert anchor is not None and prev is not None  # set in step 2 for moon
                with torch.no_grad():
                    z_g = anchor(x)[0]  # [B, D]
                    z_p = prev(x)[0] if prev is not anchor else z_g  # [B, D]
                parts["moon"] = (s.moon_mu, moon_loss(z, z_g, z_p, s.moon_temperature))
            if tgt is not None:
                za = alignment_features(model, z)  # [B, D]
                if s.lambda_tdcl > 0:
                    pos, neg = tgt.positive[rows], tgt.negatives[rows]  # [B, D], [B, K, D]
                    parts["tdcl"] = (s.lambda_tdcl, tdcl_loss(za, pos, neg, s.tau))
                if s.lambda_ndcr > 0:
                    parts["ndcr"] = (s.lambda_ndcr, ndcr_loss(za, tgt.null[rows], s.ndcr_loss))
        weighted = [w * v for w, v in parts.values()]
        total = weighted[0]
        for term in weighted[1:]:
            total = total + term
        logits = logits if labels_d is not None else None  # label-free: no accuracy to count
        return total, {k: v.detach() for k, (_, v) in parts.items()}, logits

    # 4. epochs over seeded shuffles; sums stay on the device (no sync per step)
    steps_per_epoch = math.ceil(n / s.batch_size) - int(n > s.batch_size and n % s.batch_size == 1)
    bar = tqdm(total=s.local_epochs * steps_per_epoch, desc=f"train {s.algorithm}",
               disable=not progress, leave=False)
    history: list[dict[str, float]] = []
    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(s.seed)  # dropout and any other global-RNG use inside the model
        for epoch in range(s.local_epochs):
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device)
            seen = 0
            for rows_cpu in _batches(n, s.batch_size, gen):
                rows = rows_cpu.to(device)  # [B]
                x = transform(images_d[rows], gen)  # [B, C, H, W] float
                total, parts, logits = step_loss(x, rows)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                b = rows.numel()
                seen += b
                for key, value in {"loss": total.detach(), **parts}.items():
                    sums[key] = sums.get(key, 0.0) + value * b
                if logits is not None and labels_d is not None:
                    correct += (logits.detach().argmax(dim=1) == labels_d[rows]).sum()
                bar.update(1)
            means = {key: float(value) / seen for key, value in sums.items()}
            means["accuracy"] = float(correct) / seen if s.needs_labels else 0.0
            if not math.isfinite(means["loss"]):
                raise RuntimeError(
                    f"{s.algorithm}: the local loss became {means['loss']} in epoch {epoch + 1}; "
                    f"lower `lr` (now {s.lr}) or check the inputs and targets for NaN/inf"
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    transform: EvalTransform | None = None,
) -> EvalResult:
    """Mean cross-entropy and accuracy of `model` (eval mode, no grad); restores the train mode."""
    device = torch.device(device)
    n = _check_images(images)
    _check_labels(labels, n, "evaluate")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    transform = transform or _scale_only
    was_training = model.training
    model.to(device).eval()
    loss_sum = torch.zeros((), device=device)  # float32: MPS has no float64
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, n, batch_size):
        x = transform(images[start:start + batch_size].to(device))  # [B, C, H, W]
        y = labels[start:start + batch_size].to(device)  # [B]
        _, logits = model(x)  # [B, C]
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    return EvalResult(loss=float(loss_sum) / n, accuracy=float(correct) / n, num_examples=n)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    transform: EvalTransform | None = None,
) -> torch.Tensor:
    """Penultimate features [N, D] (float32, CPU) of `model` in eval mode, for probes and kNN."""
    device = torch.device(device)
    n = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    transform = transform or _scale_only
    was_training = model.training
    model.to(device).eval()
    out = []
    for start in range(0, n, batch_size):
        feats, _ = model(transform(images[start:start + batch_size].to(device)))  # [B, D]
        out.append(feats.float().cpu())
    model.train(was_training)
    return torch.cat(out)  # [N, D]

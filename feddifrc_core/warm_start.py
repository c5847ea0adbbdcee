"""The global model a run starts from: seeded random weights, or a warm start trained centrally
on the labelled PUBLIC half of the training split.

FedDifRC's teacher was trained on that public half (30,000 labelled Fashion-MNIST images with
class-name captions); the baselines never see it. `init-model = "public-supervised"` gives any
algorithm the same data as a control: the server, which owns the global model, trains the
seeded initial model on it with cross-entropy before round 0 (the clients' private half is never
read). The result depends only on its fingerprint (data, model, optimiser settings, seed, torch
version), so it is computed once, written atomically with a checksum under
`<cache-dir>/warm-start/` and reused, verified, by every run with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_arrays
from feddifrc_core.config import RunConfig
from feddifrc_core.datasets import ImageDataset, load_dataset, select_subset
from feddifrc_core.feature_cache import fingerprint_sha256, safe_folder_name, tensor_sha256
from feddifrc_core.models import model_state
from feddifrc_core.run_setup import build_global_model, load_train_set, make_transforms
from feddifrc_core.seeding import seedsequence_seed
from feddifrc_core.training import train_local
from feddifrc_core.transforms import TrainAugment

logger = logging.getLogger(__name__)

FORMAT = 1
WARM_STREAM = 0x5741524D  # "WARM": the pretraining's seed stream, apart from every client's


def initial_state(cfg: RunConfig, model: nn.Module, cache_dir: str | Path | None = None,
                  device: torch.device | str = "cpu") -> tuple[dict[str, np.ndarray], str]:
    """(the state round 0 starts from, a line for the log): `model` as built (seeded) for
    `init-model = "random"`, or with the public-supervised warm start copied into every weight
    it has.

    `model` is the run's global model (it may carry an alignment head; the warm start has none:
    the head keeps its seeded initialisation, so warm-started runs of every algorithm share the
    same encoder and classifier). `model` itself is not changed.
    """
    state = model_state(model)
    if cfg.init_model == "random":
        return state, f"seeded initialisation (seed {cfg.seed})"
    warm, note = public_supervised_state(cfg, cache_dir, device)
    missing = sorted(set(warm) - set(state))
    # sizes, not shapes: a stored scalar (BatchNorm's step count) reads back as shape (1,)
    wrong = sorted(k for k in set(warm) & set(state) if warm[k].size != state[k].size)
    if missing or wrong:
        raise ValueError(f"the warm start does not fit the global model (missing {missing}, "
                         f"other shapes {wrong}); model, model-width and data set must match")
    kept = sorted(set(state) - set(warm))
    note += f"; seeded initialisation kept for {kept}" if kept else ""
    return {k: (warm[k].reshape(v.shape).copy() if k in warm else v)
            for k, v in state.items()}, note


def public_supervised_state(cfg: RunConfig, cache_dir: str | Path | None = None,
                            device: torch.device | str = "cpu") -> tuple[dict[str, np.ndarray], str]:
    """(the headless model of the run trained on the public half, what happened); cached: see
    the module doc."""
    # 1. data and transforms: the public half, with the clients' normalisation and augmentation
    public = public_training_set(cfg)
    pool_images = load_train_set(cfg).images  # the clients' pool sets the normalisation
    train_transform, _ = make_transforms(cfg, pool_images)
    base_cfg = cfg.replace(algorithm="fedavg", local_epochs=cfg.init_epochs)  # CE only, no head
    model = build_global_model(base_cfg, public.channels, public.num_classes, public.image_size)
    fingerprint: dict[str, object] = {
        "format": FORMAT, "dataset": cfg.dataset, "subset": "public",
        "images-sha256": tensor_sha256(public.images), "labels-sha256": tensor_sha256(public.labels),
        "model": cfg.model, "model-width": cfg.model_width, "seed": cfg.seed,
        "epochs": cfg.init_epochs, "lr": cfg.lr, "momentum": cfg.momentum,
        "weight-decay": cfg.weight_decay, "batch-size": cfg.batch_size, "augment": cfg.augment,
        "transform": dataclasses.asdict(TrainAugment.for_dataset(cfg.dataset, pool_images)),
        "torch": torch.__version__, "device": torch.device(device).type,
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # as the file's meta reads back (no tuples)
    key = fingerprint_sha256(fingerprint)
    root = Path(cache_dir) if cache_dir is not None else cfg.resolved_cache_dir()
    path = root / "warm-start" / f"{safe_folder_name(cfg.model, 'model')}-{key[:16]}.safetensors"
    # 2. reuse a verified earlier result with the same fingerprint
    cached = _read(path, fingerprint)
    if cached is not None:
        return cached, (f"warm start {path} (verified; {len(public)} public images, "
                        f"{cfg.init_epochs} epochs)")
    # 3. train the seeded initial model centrally on the public half (deterministic on CPU)
    t0 = time.perf_counter()
    result = train_local(model, public.images, public.labels, base_cfg.new_algorithm(), device,
                         transform=train_transform, seed=seedsequence_seed(cfg.seed, WARM_STREAM))
    seconds = time.perf_counter() - t0
    state = model_state(model)
    save_arrays(path, state, {"fingerprint": fingerprint, "train-accuracy": result.accuracy,
                              "train-loss": result.loss, "seconds": round(seconds, 1),
                              "epochs": [dict(e) for e in result.epochs]})
    return state, (f"warm start trained on {len(public)} public images, {cfg.init_epochs} epochs "
                   f"in {seconds:.1f} s (last-epoch train accuracy {result.accuracy:.4f}); "
                   f"saved {path}")


def public_training_set(cfg: RunConfig) -> ImageDataset:
    """The public half of the run's training split (never a client's: data-subset is private)."""
    split = load_dataset(cfg.dataset, "train", cfg.data_path or None)
    return select_subset(split, "public")[0]


def _read(path: Path, fingerprint: Mapping[str, object]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        found = load_arrays(path)
    except CheckpointError as err:
        logger.warning("warm start: %s; it is trained again", err)
        return None
    if found.meta.get("fingerprint") != dict(fingerprint):
        logger.warning("warm start: %s was made with other settings; it is trained again", path)
        return None
    return found.arrays

"""One client inside a ClientApp process: its data, its diffusion representations, its update.

Built from the run config and the node config only, so any process can rebuild it: the partition
is recomputed from the seed, the data set and the backbone come from per-process caches, the
representations from the client's on-disk feature cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from feddifrc_core import client_extraction as extraction
from feddifrc_core import representations as rep
from feddifrc_core.caches import LocalModelStore, ProcessCache
from feddifrc_core.config import NodeConfig, RunConfig, resolve_device
from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.diffusion.reduction import basis_sha256
from feddifrc_core.projection import Basis, arrays_to_bases, stats_to_arrays
from feddifrc_core.prompts import class_prompts
from feddifrc_core.run_setup import (
    build_global_model,
    client_indices,
    load_state,
    load_train_pool,
    make_transforms,
    model_state,
    set_torch_threads,
)
from feddifrc_core.seeding import seedsequence_seed
from feddifrc_core.targets import TARGET_COUNT, TARGET_OFFSET, TARGET_SUM, DiffusionTargets
from feddifrc_core.teacher_logits import client_teacher_logits
from feddifrc_core.training import train_local
from feddifrc_core.zero_shot import ZeroShotSettings

log = logging.getLogger(__name__)

# (images, labels or None, sample ids, class names): one client's inputs to the extraction.
ExtractionData = tuple[torch.Tensor, torch.Tensor | None, np.ndarray, tuple[str, ...]]


@dataclass(frozen=True)
class LocalUpdate:
    state: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]  # train-loss, train-accuracy (supervised), *-seconds, loss parts


class ClientSession:
    """One client's data, transforms and diffusion representations, memoised per process."""

    _sessions = ProcessCache(max_items=4)

    @classmethod
    def get(cls, cfg: RunConfig, node: NodeConfig) -> ClientSession:
        return cls._sessions.get((cfg, node), lambda: cls(cfg, node))

    def __init__(self, cfg: RunConfig, node: NodeConfig) -> None:
        # 1. device and threads (a node's own device setting wins)
        self.cfg, self.node = cfg, node
        self.device = torch.device(resolve_device(node.device or cfg.device))
        set_torch_threads(cfg.torch_threads)
        self.cache_dir = Path(node.cache_dir).expanduser() if node.cache_dir else cfg.resolved_cache_dir()
        # 2. this client's samples
        pool, global_rows = load_train_pool(cfg, node.data_path)
        rows = client_indices(cfg, pool.labels.numpy(), pool.num_classes, node.partition_id,
                              node.num_partitions)
        self.data = pool.subset(rows)
        self.sample_ids = global_rows[rows]  # indices in the full split: noise seeds, cache keys
        self.shape = (pool.channels, pool.num_classes, pool.image_size)
        self.train_transform, _ = make_transforms(cfg, pool.images)
        # (hashes of the bases they were projected with, the representations); None = not yet
        self._representations: tuple[tuple[str, ...], rep.ClientRepresentations] | None = None
        self._teacher_logits: torch.Tensor | None = None  # [N, C], distillation control only

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def check_class_names(self, expected: Sequence[str] | None) -> None:
        """Refuse to train when this node's data set names its classes unlike the server's: the
        class prompts (and the labels' meaning) would silently differ from the global model's."""
        if expected is None or tuple(expected) == tuple(self.data.class_names):
            return
        raise ValueError(
            f"class names of this node's data set {list(self.data.class_names)} differ from the "
            f"server's {list(expected)}; give the node the same data set (data-path in its node "
            "config) with the same class folders/names as the server"
        )

    # --- diffusion representations -------------------------------------------------------------
    def _extraction_inputs(self) -> tuple[DiffusionBackbone, ExtractionData,
                                          rep.RepresentationSettings]:
        backbone = rep.backbone_from_config(self.cfg, self.device, self.cache_dir)  # per process
        # feddifrc-ssl: prompts come from the SSL vocabulary, never from this client's labels
        labels = self.data.labels if self.cfg.algorithm_class.needs_labels else None
        data = (self.data.images, labels, self.sample_ids, self.data.class_names)
        return backbone, data, rep.RepresentationSettings.from_run_config(self.cfg, self.device)

    def representations(self, bases: Sequence[Basis] | None = None) -> rep.ClientRepresentations:
        """Extracted once per process and basis (and cached on disk by the feature cache).

        mean-pool representations do not depend on the bases; spatial-norm ones are projected
        with them inside the extractor and need them."""
        projected = self.cfg.reduction != "mean-pool"
        key = tuple(basis_sha256(b) for b in bases or ()) if projected else ()
        if self._representations is None or self._representations[0] != key:
            backbone, data, settings = self._extraction_inputs()
            reps = extraction.extract_client_representations(
                backbone, *data, settings, cache_dir=self.cache_dir / "representations",
                bases=bases if projected else None)
            self._representations = (key, reps)
        return self._representations[1]

    def projection_stats(self) -> dict[str, np.ndarray]:
        """Sufficient statistics for the shared basis: of the pooled vectors (mean-pool) or of
        every spatial position's channel vector (spatial-norm, a first extraction pass)."""
        if self.cfg.reduction == "mean-pool":
            return stats_to_arrays(self.representations().pca_stats())
        backbone, data, settings = self._extraction_inputs()
        return stats_to_arrays(extraction.extract_position_stats(
            backbone, *data, settings, cache_dir=self.cache_dir / "representations"))

    def target_sum(self, projection: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Count and sum of this client's targets in the shared space (spatial-norm-centred);
        the space's size is the bases' total output size."""
        bases = self._bases(projection)
        feature_dim = sum(b.out_dim for b in bases)
        count, total = self.representations(bases).target_sum(bases, feature_dim)
        return {TARGET_COUNT: np.array([count], dtype=np.int64), TARGET_SUM: total}

    def targets(self, projection: Mapping[str, np.ndarray] | None, feature_dim: int
                ) -> DiffusionTargets:
        bases = self._bases(projection)
        offset = None if projection is None else projection.get(TARGET_OFFSET)
        return self.representations(bases).targets(bases, feature_dim, offset)

    def teacher_logits(self) -> torch.Tensor:
        """The teacher's zero-shot class logits [N, C] of this client's images: computed once per
        image and kept on this node's disk (never sent anywhere), memoised per process."""
        if self._teacher_logits is None:
            cfg = self.cfg
            backbone = rep.backbone_from_config(cfg, self.device, self.cache_dir)  # per process
            settings = ZeroShotSettings(timesteps=cfg.zero_shot_timestep_ids,
                                        draws=cfg.zero_shot_draws, seed=cfg.seed,
                                        image_size=cfg.diffusion_image_size)
            prompts = class_prompts(self.data.class_names, cfg.prompt_template)
            self._teacher_logits, info = client_teacher_logits(
                backbone, self.data.images, self.sample_ids, prompts, settings, self.cache_dir)
            log.info("partition %d: teacher logits of %d images (%d reused, %d computed in "
                     "%.1f s) in %s", self.node.partition_id, len(self.data), info["reused"],
                     info["computed"], info["seconds"], info["folder"])
        return self._teacher_logits

    @staticmethod
    def _bases(projection: Mapping[str, np.ndarray] | None) -> list[Basis]:
        if not projection:
            raise ValueError("the message carries no projection bases; the server must run the "
                             "projection set-up before round 1")
        return arrays_to_bases(dict(projection))

    # --- local training ------------------------------------------------------------------------
    def train(self, global_state: Mapping[str, np.ndarray], server_round: int, run_name: str,
              projection: Mapping[str, np.ndarray] | None = None, run_key: str = ""
              ) -> LocalUpdate:
        cfg, pid, algorithm = self.cfg, self.node.partition_id, self.cfg.algorithm_class
        # 1. the global model
        model = build_global_model(cfg, *self.shape)
        load_state(model, global_state)
        # 2. diffusion targets (extracted on first need, then reused every round)
        t0 = time.perf_counter()
        feature_dim = cast(int, model.feature_dim)  # every project model has one
        targets = self.targets(projection, feature_dim) if algorithm.needs_targets else None
        teacher = self.teacher_logits() if algorithm.needs_teacher_logits else None
        extract_seconds = time.perf_counter() - t0
        # 3. (MOON) this client's previous local model, from disk (survives restarts)
        # keyed by run: a new run reusing a run-name never reads or prunes the older run's files
        store = LocalModelStore(
            self.cache_dir / "local-models" / (f"{run_name}-{run_key}" if run_key else run_name), pid)
        previous = None
        if algorithm.keeps_previous_model and (prev_state := store.load_before(server_round)) is not None:
            previous = build_global_model(cfg, *self.shape)
            load_state(previous, prev_state)
        # 4. train with this round's seed for this client
        labels = self.data.labels if algorithm.needs_labels else None
        result = train_local(model, self.data.images, labels, cfg, self.device,
                             transform=self.train_transform, targets=targets,
                             previous_model=previous, teacher_logits=teacher,
                             seed=seedsequence_seed(cfg.seed, server_round, pid))
        state = model_state(model)
        if algorithm.keeps_previous_model:
            store.save(server_round, state)
        metrics = {f"train-{k}" if not k.startswith("train-") else k: float(v)
                   for k, v in result.metrics.items()}
        metrics.update({"train-loss": result.loss, "train-accuracy": result.accuracy,
                        "extract-seconds": extract_seconds, "train-seconds": result.seconds})
        if labels is None:  # label-free training counts no accuracy: report none, not a 0.0
            del metrics["train-accuracy"]
        return LocalUpdate(state=state, num_examples=result.num_examples, metrics=metrics)

"""One client inside a ClientApp process: its data, transforms and the run's algorithm's work.

Built from the run config and the node config only, so any process can rebuild it: the partition
is recomputed from the seed, the data set and the backbone come from per-process caches, the
representations from the client's on-disk feature cache. What an algorithm does on a client (its
set-up answers, what an update trains with, what it keeps for later rounds) is in its file; the
session hands it a `ClientView` of itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feddifrc_core.algorithms import ClientView, UpdateInfo
from feddifrc_core.caches import ProcessCache
from feddifrc_core.client_diffusion import ClientDiffusion
from feddifrc_core.config import NodeConfig, RunConfig, resolve_device
from feddifrc_core.models import load_state, model_state
from feddifrc_core.run_setup import (
    build_global_model,
    client_indices,
    load_train_pool,
    make_transforms,
    set_torch_threads,
)
from feddifrc_core.seeding import seedsequence_seed
from feddifrc_core.training import train_local


@dataclass(frozen=True)
class LocalUpdate:
    state: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]  # train-loss, train-accuracy (supervised), *-seconds, loss parts
    uploads: dict[str, np.ndarray]  # the algorithm's arrays beside the model (`end_update`)


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
        cache_dir = Path(node.cache_dir).expanduser() if node.cache_dir else cfg.resolved_cache_dir()
        # 2. this client's samples
        pool, global_rows = load_train_pool(cfg, node.data_path)
        rows = client_indices(cfg, pool.labels.numpy(), pool.num_classes, node.partition_id,
                              node.num_partitions)
        self.data = pool.subset(rows)
        self.shape = (pool.channels, pool.num_classes, pool.image_size)
        self.train_transform, _ = make_transforms(cfg, pool.images)
        # 3. what the algorithm may use: sample ids = indices in the full split (noise seeds,
        # cache keys); the representations are extracted only when an algorithm asks for them
        diffusion = ClientDiffusion(cfg, self.data, global_rows[rows], self.device, cache_dir,
                                    label_free=cfg.algorithm_class.label_free)
        self.view = ClientView(node.partition_id, cache_dir, diffusion)

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

    def answer(self, stage: str, payload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This client's upload for a set-up stage of the run's algorithm."""
        return self.cfg.new_algorithm().answer(stage, self.view, payload)

    def train(self, global_state: Mapping[str, np.ndarray], update: UpdateInfo) -> LocalUpdate:
        cfg, algorithm = self.cfg, self.cfg.new_algorithm()
        # 1. the global model
        model = build_global_model(cfg, *self.shape)
        load_state(model, global_state)
        # 2. what the algorithm trains with (FedDifRC: targets, extracted on first need, then
        # read from the feature cache; MOON: this client's previous local model, from disk)
        t0 = time.perf_counter()
        algorithm.begin_update(self.view, update, model)
        extract_seconds = time.perf_counter() - t0
        # 3. train with this round's seed for this client
        labels = None if algorithm.label_free else self.data.labels
        result = train_local(model, self.data.images, labels, algorithm, self.device,
                             transform=self.train_transform,
                             seed=seedsequence_seed(cfg.seed, update.server_round,
                                                    self.node.partition_id))
        state = model_state(model)
        uploads = algorithm.end_update(self.view, update, state)
        metrics = {f"train-{k}" if not k.startswith("train-") else k: float(v)
                   for k, v in result.metrics.items()}
        metrics.update({"train-loss": result.loss, "train-accuracy": result.accuracy,
                        "extract-seconds": extract_seconds, "train-seconds": result.seconds})
        if labels is None:  # label-free training counts no accuracy: report none, not a 0.0
            del metrics["train-accuracy"]
        return LocalUpdate(state=state, num_examples=result.num_examples, metrics=metrics,
                           uploads=uploads)

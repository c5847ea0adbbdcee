"""Pure helpers the Flower apps call: aggregation, seeded sampling, per-process caches, client state.

Everything that makes a run reproducible lives here: which partitions train in a round and the
seed each client trains with are functions of (seed, round, partition) only, and the aggregation
sums in partition order, so an interrupted and resumed run computes exactly the same numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from feddifrc_core.checkpoint import atomic_write_bytes

T = TypeVar("T")

# Array names of the spatial-norm-centred set-up: each client's target count and sum, and the
# federated mean target the server sends back with the bases.
TARGET_COUNT, TARGET_SUM, TARGET_OFFSET = "target-count", "target-sum", "target-offset"


# --- aggregation -----------------------------------------------------------------------------------
def weighted_average(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """FedAvg: sum_k w_k * x_k / sum_k w_k per named array, in the given order.

    Accumulates in float64 and casts back to each array's dtype (integer buffers such as
    BatchNorm's `num_batches_tracked` are rounded), so the result does not depend on float32
    rounding of partial sums.
    """
    if len(arrays) == 0 or len(arrays) != len(weights):
        raise ValueError(
            f"weighted_average needs one weight per client and at least one client, got "
            f"{len(arrays)} array sets and {len(weights)} weights"
        )
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(arrays[0])
    for i, client in enumerate(arrays[1:], start=1):
        if list(client) != keys:
            raise ValueError(
                f"client {i} sent arrays {sorted(client)} but client 0 sent {sorted(keys)}; "
                "all clients must train the same model architecture"
            )
    out: dict[str, np.ndarray] = {}
    for key in keys:
        ref = np.asarray(arrays[0][key])
        acc = np.zeros(ref.shape, dtype=np.float64)
        for client, weight in zip(arrays, weights, strict=True):
            value = np.asarray(client[key])
            if value.shape != ref.shape:
                raise ValueError(f"array '{key}' has shape {value.shape} on one client, {ref.shape} on another")
            acc += value.astype(np.float64) * (float(weight) / total)
        out[key] = np.rint(acc).astype(ref.dtype) if np.issubdtype(ref.dtype, np.integer) else acc.astype(ref.dtype)
    return out


# --- seeded sampling -------------------------------------------------------------------------------
def num_sampled(num_nodes: int, fraction: float, min_nodes: int) -> int:
    """Clients per round: floor(fraction * nodes), at least `min_nodes` (Flower's FedAvg rule)."""
    if num_nodes < min_nodes:
        raise ValueError(
            f"only {num_nodes} nodes are connected but min-train-nodes is {min_nodes}; start more "
            "SuperNodes (num-supernodes in --federation-config) or lower min-train-nodes"
        )
    return min(num_nodes, max(int(num_nodes * fraction), min_nodes))


def sample_partitions(
    partition_ids: Sequence[int], fraction: float, min_nodes: int, seed: int, server_round: int
) -> list[int]:
    """The partitions that train in `server_round`, sorted; without replacement, seeded per round."""
    pool = sorted(set(int(p) for p in partition_ids))
    k = num_sampled(len(pool), fraction, min_nodes)
    # A stream of its own per (seed, round): sampling never depends on earlier rounds' RNG use.
    rng = np.random.default_rng([seed % 2**32, server_round, 0x5A3])
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))


# --- per-process caches ----------------------------------------------------------------------------
class ProcessCache:
    """A small keyed memo for expensive per-process objects (data set, diffusion backbone).

    Simulation runs many ClientApp calls in one worker process: loading the backbone or the data
    set once per process keeps memory flat in the number of clients. `max_items` bounds it so a
    process that serves several configurations does not keep them all.
    """

    def __init__(self, max_items: int = 2) -> None:
        self.max_items = max_items
        self._items: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, factory: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                value = self._items.pop(key)
                self._items[key] = value  # most recently used last
                return value
        value = factory()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.max_items:
                self._items.pop(next(iter(self._items)))
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# --- per-client state that must survive rounds (MOON's previous local model) -----------------------
class LocalModelStore:
    """Each client's last local model, on disk, tagged with the round that produced it.

    MOON contrasts against the client's previous local model. Keeping it on disk (not in memory)
    keeps simulation memory flat and survives a restart; tagging files with the round lets a
    resumed run pick exactly the model an uninterrupted run would have used.
    """

    def __init__(self, folder: str | Path, partition_id: int) -> None:
        self.folder = Path(folder)
        self.partition_id = partition_id

    def _path(self, server_round: int) -> Path:
        return self.folder / f"client-{self.partition_id:05d}-round-{server_round:04d}.safetensors"

    def load_before(self, server_round: int) -> dict[str, np.ndarray] | None:
        """The newest stored model from a round < `server_round`, or None (first participation)."""
        from feddifrc_core.checkpoint import CheckpointError, load_checkpoint

        prefix = f"client-{self.partition_id:05d}-round-"
        rounds = sorted(
            (int(p.name[len(prefix):len(prefix) + 4]), p)
            for p in self.folder.glob(prefix + "*.safetensors")
        )
        for r, path in reversed(rounds):
            if r >= server_round:
                continue
            try:
                return load_checkpoint(path).arrays
            except CheckpointError:
                continue  # damaged by a kill: fall back to an older one
        return None

    def save(self, server_round: int, state: Mapping[str, np.ndarray], keep: int = 3) -> None:
        """Store this round's local model; keep the newest `keep` files (resume needs the one before)."""
        from feddifrc_core.checkpoint import save_checkpoint

        save_checkpoint(self._path(server_round), state, {"round": server_round})
        prefix = f"client-{self.partition_id:05d}-round-"
        stored = sorted(self.folder.glob(prefix + "*.safetensors"))
        for old in stored[:-keep]:
            old.unlink(missing_ok=True)


__all__ = [
    "LocalModelStore",
    "ProcessCache",
    "atomic_write_bytes",
    "from_flower_arrays",
    "to_flower_arrays",
    "num_sampled",
    "sample_partitions",
    "weighted_average",
]


# --- data, model and evaluation as the apps need them -----------------------------------------------
def set_torch_threads(threads: int) -> None:
    """Limit intra-op threads (0 = torch default); many clients share few cores in simulation."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _data_root(cfg: Any, data_path: str = "") -> str | None:
    return (data_path or cfg.data_path) or None


def load_train_pool(cfg: Any, data_path: str = "") -> tuple[Any, np.ndarray]:
    """The clients' training pool (the chosen subset, optionally a seeded stratified subsample)
    and each pool row's index in the full training split.

    Every client computes the same pool and partition from the seed, so no index lists travel.
    """
    from feddifrc_core.datasets import load_dataset, select_subset, subsample

    ds = load_dataset(cfg.dataset, "train", _data_root(cfg, data_path))  # memoised per process
    ds, subset_rows = select_subset(ds, cfg.data_subset)
    ds, sample_rows = subsample(ds, cfg.train_samples, cfg.seed)
    return ds, subset_rows[sample_rows]


def load_train_set(cfg: Any, data_path: str = "") -> Any:
    return load_train_pool(cfg, data_path)[0]


def load_test_set(cfg: Any, data_path: str = "") -> Any:
    from feddifrc_core.datasets import load_dataset, subsample

    ds = load_dataset(cfg.dataset, "test", _data_root(cfg, data_path))
    ds, _ = subsample(ds, cfg.test_samples, cfg.seed)
    return ds


def client_indices(cfg: Any, labels: np.ndarray, num_classes: int, partition_id: int,
                   num_partitions: int) -> np.ndarray:
    """This client's rows of the training pool (recomputed identically on every node)."""
    from feddifrc_core.partition import build_partitions

    parts = build_partitions(labels, num_partitions, cfg.partition, cfg.dirichlet_alpha, cfg.seed,
                             imb_factor=cfg.imb_factor, num_classes=num_classes)
    return parts[partition_id]


def make_transforms(cfg: Any, train_images: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(train transform, eval transform) for the run's data set; `augment=false` = normalise only."""
    from feddifrc_core.transforms import TrainAugment

    augment = TrainAugment.for_dataset(cfg.dataset, train_images)
    if cfg.augment:
        return augment, augment.eval
    return (lambda images, generator=None: augment.eval(images)), augment.eval


def build_global_model(cfg: Any, channels: int, num_classes: int, image_size: int) -> Any:
    """The model every party builds; initialised from the run seed so all runs start equal."""
    import torch

    from feddifrc_core.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # align-head linear/mlp adds the shared head the alignment losses act on (docs/method.md)
        return build_model(cfg.model, channels, num_classes, cfg.model_width, image_size=image_size,
                           align_head=getattr(cfg, "align_head", "none"))


def load_state(model: Any, state: Mapping[str, np.ndarray]) -> None:
    """Copy numpy arrays into `model` (strict: a server/client architecture mismatch is an error)."""
    import torch

    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the received arrays do not fit the local model ({err}). Server and clients must use "
            "the same model, model-width and data set (class count, channels)"
        ) from None


def model_state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


class CentralEvaluator:
    """The server's test-set evaluation of a global model state.

    Supervised algorithms: cross-entropy and accuracy of the model's own classifier. Label-free
    algorithms (feddifrc-ssl, simclr) never train the classifier head, so the encoder is judged
    by its frozen features instead: a linear probe and a weighted kNN, both fitted on a labelled
    subset of the training pool (`probe-train-samples`, stratified, seeded) and scored on the test
    set. `test-accuracy` is then the linear-probe accuracy, so summaries and benchmarks read one key.
    """

    def __init__(self, cfg: Any) -> None:
        import torch

        from feddifrc_core.config import resolve_device
        from feddifrc_core.datasets import subsample

        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))
        self.test = load_test_set(cfg)
        pool = load_train_set(cfg)
        _, self.transform = make_transforms(cfg, pool.images)
        self.model = build_global_model(cfg, pool.channels, pool.num_classes, pool.image_size)
        # Labels of the probe subset are read on the server only, never sent to a client.
        self.probe_train = (subsample(pool, cfg.probe_train_samples, cfg.seed)[0]
                            if cfg.is_self_supervised else None)

    def __call__(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        from feddifrc_core.training import evaluate

        load_state(self.model, state)
        if self.probe_train is not None:
            return self._probe()
        result = evaluate(self.model, self.test.images, self.test.labels, self.cfg.eval_batch_size,
                          self.device, transform=self.transform)
        return {"test-loss": result.loss, "test-accuracy": result.accuracy}

    def _probe(self) -> dict[str, float]:
        """Linear-probe and kNN test accuracy of the frozen penultimate features."""
        from feddifrc_core.probe import knn_accuracy, linear_probe_accuracy
        from feddifrc_core.training import extract_features

        assert self.probe_train is not None  # set in __init__ for label-free algorithms
        probe, bs, dev = self.probe_train, self.cfg.eval_batch_size, self.device
        train_feats = extract_features(self.model, probe.images, bs, dev, self.transform)  # [P, D]
        test_feats = extract_features(self.model, self.test.images, bs, dev, self.transform)  # [M, D]
        linear = linear_probe_accuracy(train_feats, probe.labels, test_feats, self.test.labels,
                                       seed=self.cfg.seed)
        knn = knn_accuracy(train_feats, probe.labels, test_feats, self.test.labels)
        return {"test-accuracy": float(linear), "test-probe-accuracy": float(linear),
                "test-knn-accuracy": float(knn), "probe-train-examples": len(probe)}


# --- one client inside a ClientApp process ----------------------------------------------------------
@dataclass(frozen=True)
class LocalUpdate:
    state: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]  # train-loss, train-accuracy (supervised), *-seconds, loss parts


class ClientSession:
    """One client's data, transforms and diffusion representations, memoised per process.

    Built from the run config and the node config only: the partition is recomputed from the
    seed, the data set comes from the per-process data cache, the backbone from the per-process
    backbone cache, the representations from the client's on-disk feature cache.
    """

    _sessions = ProcessCache(max_items=4)

    @classmethod
    def get(cls, cfg: Any, node: Any) -> ClientSession:
        return cls._sessions.get((cfg, node), lambda: cls(cfg, node))

    def __init__(self, cfg: Any, node: Any) -> None:
        import torch

        from feddifrc_core.config import resolve_device

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
        self._representations: tuple[tuple[str, ...], Any] | None = None  # (bases hashes, reps)

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
    def _extraction_inputs(self) -> tuple[Any, tuple[Any, ...], Any]:
        from feddifrc_core import representations as rep

        backbone = rep.backbone_from_config(self.cfg, self.device, self.cache_dir)  # per process
        # feddifrc-ssl: prompts come from the SSL vocabulary, never from this client's labels
        labels = None if self.cfg.is_self_supervised else self.data.labels
        data = (self.data.images, labels, self.sample_ids, self.data.class_names)
        return backbone, data, rep.RepresentationSettings.from_run_config(self.cfg)

    def representations(self, bases: Sequence[Any] | None = None) -> Any:
        """Extracted once per process and basis (and cached on disk by the feature cache).

        mean-pool representations do not depend on the bases; spatial-norm ones are projected
        with them inside the extractor and need them."""
        from feddifrc_core import representations as rep
        from feddifrc_core.diffusion.reduction import basis_sha256

        projected = self.cfg.reduction != "mean-pool"
        key = tuple(basis_sha256(b) for b in bases or ()) if projected else ()
        if self._representations is None or self._representations[0] != key:
            backbone, data, settings = self._extraction_inputs()
            reps = rep.extract_client_representations(
                backbone, *data, settings, cache_dir=self.cache_dir / "representations",
                progress=False, bases=bases if projected else None)
            self._representations = (key, reps)
        return self._representations[1]

    def projection_stats(self) -> dict[str, np.ndarray]:
        """Sufficient statistics for the shared basis: of the pooled vectors (mean-pool) or of
        every spatial position's channel vector (spatial-norm, a first extraction pass)."""
        from feddifrc_core import representations as rep
        from feddifrc_core.projection import stats_to_arrays

        if self.cfg.reduction == "mean-pool":
            return stats_to_arrays(self.representations().pca_stats())
        backbone, data, settings = self._extraction_inputs()
        return stats_to_arrays(rep.extract_position_stats(
            backbone, *data, settings, cache_dir=self.cache_dir / "representations"))

    def target_sum(self, projection: Mapping[str, np.ndarray], feature_dim: int
                   ) -> dict[str, np.ndarray]:
        """Count and sum of this client's targets in the shared space (spatial-norm-centred)."""
        bases = self._bases(projection)
        count, total = self.representations(bases).target_sum(bases, feature_dim)
        return {TARGET_COUNT: np.array([count], dtype=np.int64), TARGET_SUM: total}

    def targets(self, projection: Mapping[str, np.ndarray] | None, feature_dim: int) -> Any:
        bases = self._bases(projection)
        offset = None if projection is None else projection.get(TARGET_OFFSET)
        return self.representations(bases).targets(bases, feature_dim, offset)

    @staticmethod
    def _bases(projection: Mapping[str, np.ndarray] | None) -> list[Any]:
        from feddifrc_core import projection as proj

        if not projection:
            raise ValueError("the message carries no projection bases; the server must run the "
                             "projection set-up before round 1")
        return proj.arrays_to_bases(dict(projection))

    # --- local training ------------------------------------------------------------------------
    def train(self, global_state: Mapping[str, np.ndarray], server_round: int, run_name: str,
              projection: Mapping[str, np.ndarray] | None = None, run_key: str = ""
              ) -> LocalUpdate:
        import dataclasses

        from feddifrc_core.training import TrainSettings, derive_seed, train_local

        cfg, pid = self.cfg, self.node.partition_id
        # 1. the global model
        model = build_global_model(cfg, *self.shape)
        load_state(model, global_state)
        # 2. diffusion targets (extracted on first need, then reused every round)
        t0 = time.perf_counter()
        targets = self.targets(projection, model.feature_dim) if cfg.uses_diffusion else None
        extract_seconds = time.perf_counter() - t0
        # 3. MOON: this client's previous local model, from disk (survives restarts)
        # keyed by run: a new run reusing a run-name never reads or prunes the older run's files
        store = LocalModelStore(
            self.cache_dir / "local-models" / (f"{run_name}-{run_key}" if run_key else run_name), pid)
        previous = None
        if cfg.algorithm == "moon" and (prev_state := store.load_before(server_round)) is not None:
            previous = build_global_model(cfg, *self.shape)
            load_state(previous, prev_state)
        # 4. train with this round's seed for this client
        settings = dataclasses.replace(TrainSettings.from_run_config(cfg),
                                       seed=derive_seed(cfg.seed, server_round, pid))
        labels = None if cfg.is_self_supervised else self.data.labels
        result = train_local(model, self.data.images, labels, settings, self.device,
                             transform=self.train_transform, targets=targets,
                             previous_model=previous)
        state = model_state(model)
        if cfg.algorithm == "moon":
            store.save(server_round, state)
        metrics = {f"train-{k}" if not k.startswith("train-") else k: float(v)
                   for k, v in result.metrics.items()}
        metrics.update({"train-loss": result.loss, "train-accuracy": result.accuracy,
                        "extract-seconds": extract_seconds, "train-seconds": result.seconds})
        if labels is None:  # label-free training counts no accuracy: report none, not a 0.0
            del metrics["train-accuracy"]
        return LocalUpdate(state=state, num_examples=result.num_examples, metrics=metrics)


def from_flower_arrays(record: Any) -> dict[str, np.ndarray]:
    """An ArrayRecord -> numpy arrays by name."""
    return {k: v.numpy() for k, v in record.items()}


def to_flower_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy arrays -> Flower `Array`s for an ArrayRecord."""
    from flwr.app import Array

    return {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}

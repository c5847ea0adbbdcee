"""Typed, frozen run and node configuration, parsed once at the Flower edge.

Every knob of the method has a field here. Dataclass defaults are the paper's / reference code's
values (the comment says why); `pyproject.toml` `[tool.flwr.app.config]` carries the offline demo
values and must list exactly the same keys (kebab-case of the field names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from feddifrc_core import paths
from feddifrc_core.algorithms import Algorithm, algorithm_names, get_algorithm
from feddifrc_core.datasets import DATASET_NAMES
from feddifrc_core.losses import NDCR_KINDS
from feddifrc_core.models import MODEL_NAMES
from feddifrc_core.partition import METHODS as PARTITION_METHODS
from feddifrc_core.projection import PROJECTIONS

# Run-config keys that say where and how fast a run goes, not what it computes: changing one
# keeps a run the same run (a resumed run may change them; benchmark records leave them out of
# their configuration hash).
BOOKKEEPING_KEYS = frozenset({
    "output-dir", "run-name", "resume", "cache-dir", "data-path", "device", "torch-threads",
    "eval-batch-size", "round-timeout", "setup-timeout"})
# What a resumed run may change besides: more rounds, and the nodes it waits for.
RESUMABLE_KEYS = BOOKKEEPING_KEYS | {"num-rounds", "min-available-nodes"}


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _opt(default: Any, *, choices: tuple[Any, ...] = (), lo: float | None = None,
         hi: float | None = None, lo_open: bool = False) -> Any:
    """A config field with its validation rule kept beside its default."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class RunConfig:
    # --- federation -------------------------------------------------------------------------
    seed: int = _opt(7)  # reference seed
    num_rounds: int = _opt(50, lo=1)  # paper: 50 communication rounds
    fraction_train: float = _opt(0.5, lo=0.0, hi=1.0, lo_open=True)  # paper: 5 of 10 clients per round
    min_train_nodes: int = _opt(2, lo=1)  # below this many replies a round fails loudly
    min_available_nodes: int = _opt(2, lo=1)
    round_timeout: float = _opt(3600.0, lo=1.0)  # seconds a round waits for replies
    # Set-up stages (node discovery, the one-time extraction for the projection) give up only
    # after this many seconds without any client replying: clients queued behind others (fewer
    # parallel slots than clients) keep the stage alive, so a slower machine takes longer but
    # does not fail. Per-client budget, like round-timeout (server_app/progress_wait.py).
    setup_timeout: float = _opt(3600.0, lo=1.0)
    eval_every: int = _opt(1, lo=1)  # central test evaluation period in rounds
    eval_batch_size: int = _opt(512, lo=1)
    output_dir: str = _opt("")  # "" -> $FEDDIFRC_RUNS_DIR or ./runs
    run_name: str = _opt("")  # "" -> <algorithm>-<dataset>-<timestamp>
    resume: bool = _opt(False)  # continue the named run from its last complete round
    device: str = _opt("auto")  # auto | cpu | cuda | cuda:N; a node's `device` overrides it
    torch_threads: int = _opt(0, lo=0)  # 0 = torch default; simulation sets it per client
    # --- data -------------------------------------------------------------------------------
    dataset: str = _opt("cifar10", choices=DATASET_NAMES)  # paper's headline data set
    data_path: str = _opt("")  # "" -> the data set's standard location; a node's `data-path` overrides
    data_subset: str = _opt("all", choices=("all", "private"))  # private = half not seen by the teacher
    train_samples: int = _opt(0, lo=0)  # 0 = all; a seeded subsample keeps CPU demos short
    test_samples: int = _opt(0, lo=0)  # 0 = whole test set
    # Images of the test split held out for model selection (the round a summary reports), drawn
    # stratified and seeded from what the test subset leaves: disjoint from it. 0 = none, as in
    # the paper (it reports on the whole test set and picks its best round there).
    validation_samples: int = _opt(0, lo=0)
    partition: str = _opt("dirichlet-reference", choices=PARTITION_METHODS)
    dirichlet_alpha: float = _opt(0.05, lo=0.0, lo_open=True)  # README example of the reference code
    imb_factor: float = _opt(1.0, lo=0.0, hi=1.0, lo_open=True)  # 1 = balanced; reference example 0.1
    augment: bool = _opt(True)  # pad+crop (+flip where it suits the data)
    # --- local model and optimiser ------------------------------------------------------------
    model: str = _opt("resnet10", choices=MODEL_NAMES)  # paper backbone for CIFAR
    model_width: int = _opt(64, lo=1)  # ResNet-10 base width 64 -> 512-d features
    # The reference aligns the post-ReLU features z directly ("none"); "linear" / "mlp" add a
    # shared head (D -> D, or D -> D -> D with a ReLU as in SimCLR/REPA) on which the alignment
    # losses act, so z >= 0 can still match signed targets. "linear": chosen by a 3-seed training
    # comparison (docs/results.md, "Choice of the targets"; docs/method.md, "Targets").
    align_head: str = _opt("linear", choices=("none", "linear", "mlp"))
    # The global model the server starts from: "random" = seeded initialisation (the paper);
    # "public-supervised" = that model trained centrally by the server on the labelled public half
    # of the training split (data-subset 'private' only: the clients never hold it), a control
    # that gives any algorithm the data the diffusion teacher saw (feddifrc_core/warm_start.py).
    init_model: str = _opt("random", choices=("random", "public-supervised"))
    # Epochs of that central training (SGD with lr / momentum / weight-decay / batch-size, the
    # run's augmentation): a few minutes for the small CNN on 2 cores (docs/results.md).
    init_epochs: int = _opt(3, lo=1)
    local_epochs: int = _opt(10, lo=1)  # paper: 10 local epochs
    batch_size: int = _opt(64, lo=1)  # paper: 64
    lr: float = _opt(0.01, lo=0.0, lo_open=True)  # paper: SGD 0.01
    momentum: float = _opt(0.9, lo=0.0, hi=1.0)  # paper: 0.9
    weight_decay: float = _opt(1e-5, lo=0.0)  # paper: 1e-5 on CIFAR-10
    # --- algorithm ----------------------------------------------------------------------------
    algorithm: str = _opt("feddifrc", choices=algorithm_names())  # algorithms/, one file each
    proximal_mu: float = _opt(0.01, lo=0.0)  # FedProx proximal weight
    moon_mu: float = _opt(1.0, lo=0.0)  # MOON contrastive weight
    moon_temperature: float = _opt(0.5, lo=0.0, lo_open=True)  # MOON paper temperature
    lambda_tdcl: float = _opt(1.0, lo=0.0)  # reference weight of TDCL; 0 switches it off
    lambda_ndcr: float = _opt(1.0, lo=0.0)  # reference weight of NDCR; 0 switches it off
    tau: float = _opt(0.04, lo=0.0, lo_open=True)  # reference InfoNCE temperature
    ndcr_loss: str = _opt("l2", choices=NDCR_KINDS)  # project decision (METHOD.md)
    neg_num: int = _opt(10, lo=1)  # reference: 10 negative class prompts per sample
    # fedavg-kd (a control, not in the paper): CE + kd-weight * T^2 * KL(teacher || student) at
    # temperature T toward the diffusion teacher's zero-shot class logits on the client's images.
    kd_weight: float = _opt(1.0, lo=0.0)  # the weight FedDifRC's two terms have (reference 1)
    kd_temperature: float = _opt(1.0, lo=0.0, lo_open=True)  # the classifier's own scale: logits
    # are -E||eps - eps_theta||^2, log-likelihood ratios up to a constant (zero_shot.py)
    # The zero-shot classifier's timesteps and noise draws per timestep (zero_shot.py): one UNet
    # call of classes x timesteps x draws passes per image, ~0.1 s per pass set on 2 cores; the
    # choice is measured on private images in docs/results.md ("Controls").
    zero_shot_timesteps: str = _opt("500")
    zero_shot_draws: int = _opt(1, lo=1)
    # --- diffusion representations -------------------------------------------------------------
    diffusion_model: str = _opt("stabilityai/stable-diffusion-2-1")  # or a folder, offline-teacher, tiny-sd
    diffusion_revision: str = _opt("")  # hub revision; "" = default branch
    diffusion_timestep: int = _opt(300, lo=0, hi=999)  # paper: t=300 best for SD 2.1
    diffusion_image_size: int = _opt(224, lo=0)  # reference: 224; 0 = the backbone's native size
    up_blocks: str = _opt("1,2,3")  # decoder blocks whose outputs are kept
    ensemble_size: int = _opt(1, lo=1)  # noise draws averaged per image
    # Spatial pooling of each block before the projection: 1 = global mean (one vector per block);
    # g > 1 keeps a g x g layout (C_l * g^2 values), which small backbones need (docs/results.md).
    pool_grid: int = _opt(1, lo=1, hi=8)
    # How a block's map becomes a target (diffusion/reduction.py): "mean-pool" then the shared
    # projection, or the authors' "spatial-norm" (per-position projection, RMS over positions;
    # "-centred" also removes the federated mean target). Chosen by measurement: docs/method.md.
    reduction: str = _opt("mean-pool", choices=("mean-pool", "spatial-norm", "spatial-norm-centred"))
    # Images per UNet call (x prompts). Every call has this shape (short batches are padded), so
    # it is part of the features' cache key: GPUs want 16+, CPUs 4-8 (docs/performance.md).
    extraction_batch_size: int = _opt(16, lo=1)
    # auto: float16 on CUDA, bfloat16-mixed on a CPU with native bfloat16, else float32
    # (diffusion/backbone.py, resolve_precision).
    diffusion_dtype: str = _opt(
        "auto", choices=("auto", "float32", "float16", "bfloat16", "bfloat16-mixed"))
    projection: str = _opt("federated-pca", choices=PROJECTIONS)  # shared basis
    prompt_template: str = _opt("a photo of a {}")  # paper prompt
    cache_dir: str = _opt("")  # "" -> $FEDDIFRC_CACHE_DIR or ~/.cache/feddifrc
    # --- self-supervised variant ---------------------------------------------------------------
    ssl_positive_prompt: str = _opt("a photo of a similar object")  # paper
    ssl_null_prompt: str = _opt("a photo of a visual object")  # paper
    ssl_vocabulary: str = _opt("tiny-imagenet")  # negative prompt vocabulary (file name or path)
    simclr_temperature: float = _opt(0.5, lo=0.0, lo_open=True)
    probe_train_samples: int = _opt(5000, lo=1)  # labelled samples for the server's linear probe

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run_config (kebab-case keys); every problem raises ConfigError."""
        return _from_mapping(cls, run_config, what="run config")

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (inverse of `from_flower`)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with some fields changed (snake_case names)."""
        merged = {**self.to_flower(), **{k.replace("_", "-"): v for k, v in changes.items()}}
        return RunConfig.from_flower(merged)

    # --- derived values --------------------------------------------------------------------------
    @property
    def up_block_ids(self) -> tuple[int, ...]:
        return _parse_up_blocks(self.up_blocks)

    @property
    def zero_shot_timestep_ids(self) -> tuple[int, ...]:
        return _parse_int_list(self.zero_shot_timesteps, "zero-shot-timesteps", "'500'", sort=False)

    @property
    def algorithm_class(self) -> type[Algorithm]:
        """The registered class of `algorithm` (its flags and local-training hooks)."""
        return get_algorithm(self.algorithm)

    @property
    def uses_diffusion(self) -> bool:
        return self.algorithm_class.needs_targets

    @property
    def is_self_supervised(self) -> bool:
        return not self.algorithm_class.needs_labels

    def resolved_output_dir(self) -> Path:
        return paths.runs_dir(self.output_dir)

    def resolved_cache_dir(self) -> Path:
        return paths.cache_dir(self.cache_dir)

    def __post_init__(self) -> None:
        _parse_up_blocks(self.up_blocks)
        _ = self.zero_shot_timestep_ids
        if "{}" not in self.prompt_template:
            raise ConfigError(
                f"prompt-template must contain '{{}}' where the class name goes, got {self.prompt_template!r}"
            )
        if self.reduction != "mean-pool" and self.pool_grid != 1:
            raise ConfigError(
                f"pool-grid={self.pool_grid} applies to reduction 'mean-pool' only; "
                f"reduction {self.reduction!r} keeps every position: set pool-grid=1"
            )
        if self.validation_samples > 0 and self.test_samples == 0:
            raise ConfigError(
                f"validation-samples={self.validation_samples} needs images the test subset "
                "leaves, but test-samples=0 takes the whole test split: set test-samples to at "
                "most the split's size minus validation-samples, or validation-samples=0"
            )
        if self.init_model == "public-supervised" and self.data_subset != "private":
            raise ConfigError(
                f"init-model='public-supervised' trains on the public half of the training split, "
                f"which the clients also hold with data-subset={self.data_subset!r}: set "
                "data-subset='private' (or init-model='random')"
            )
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                f"min-available-nodes ({self.min_available_nodes}) must be >= min-train-nodes "
                f"({self.min_train_nodes})"
            )
        # Caught here, on the server, instead of in every ClientApp of round 1.
        problem = self.algorithm_class.config_problem(self)
        if problem:
            raise ConfigError(problem)


@dataclass(frozen=True)
class NodeConfig:
    """Per-node settings: simulation gives partition-id/num-partitions; deployment adds the rest."""

    partition_id: int = _opt(0, lo=0)
    num_partitions: int = _opt(1, lo=1)
    data_path: str = _opt("")  # overrides the run's data-path on this node
    device: str = _opt("")  # overrides the run's device on this node
    cache_dir: str = _opt("")  # overrides the run's cache-dir on this node

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        cfg = _from_mapping(cls, node_config, what="node config", coerce_strings=True)
        if cfg.partition_id >= cfg.num_partitions:
            raise ConfigError(
                f"node config: partition-id must be < num-partitions ({cfg.num_partitions}), "
                f"got {cfg.partition_id}"
            )
        return cfg


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else is checked and returned."""
    if requested in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} was requested but no CUDA device is available; use 'cpu'")
    if requested != "cpu" and not requested.startswith(("cuda", "mps")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return requested


def _parse_up_blocks(text: str) -> tuple[int, ...]:
    return _parse_int_list(text, "up-blocks", "'1,2,3'")


def _parse_int_list(text: str, key: str, example: str, sort: bool = True) -> tuple[int, ...]:
    """Comma-separated distinct non-negative integers (sorted unless `sort` is False)."""
    try:
        ids = tuple(int(part) for part in str(text).split(",") if part.strip() != "")
    except ValueError:
        raise ConfigError(f"{key} must be comma-separated integers like {example}, got {text!r}") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{key} must be distinct non-negative integers like {example}, got {text!r}")
    return tuple(sorted(ids)) if sort else ids


def _coerce(key: str, value: Any, expected: type, what: str, coerce_strings: bool) -> Any:
    if coerce_strings and isinstance(value, str) and expected is not str:
        text = value.strip()
        try:
            if expected is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            return expected(text)
        except ValueError:
            raise ConfigError(f"{what}: '{key}' expects {expected.__name__}, got {value!r}") from None
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: '{key}' expects true/false, got {value!r} ({type(value).__name__})")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what}: '{key}' expects an integer, got {value!r} ({type(value).__name__})")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what}: '{key}' expects a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: '{key}' expects a string, got {value!r} ({type(value).__name__})")
    return value


C = TypeVar("C", RunConfig, NodeConfig)


def _from_mapping(cls: type[C], raw: Mapping[str, Any], *, what: str, coerce_strings: bool = False) -> C:
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}; known keys are {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = fields[key]
        expected = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
        value = _coerce(key, value, expected, what, coerce_strings)
        meta = f.metadata
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{what}: '{key}' must be one of {list(meta['choices'])}, got {value!r}")
        lo, hi = meta["lo"], meta["hi"]
        if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
            bound = f"> {lo}" if meta["lo_open"] else f">= {lo}"
            raise ConfigError(f"{what}: '{key}' must be {bound}, got {value!r}")
        if hi is not None and value > hi:
            raise ConfigError(f"{what}: '{key}' must be <= {hi}, got {value!r}")
        values[f.name] = value
    return cls(**values)

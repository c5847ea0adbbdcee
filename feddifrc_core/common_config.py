"""The settings every party and every algorithm reads: federation, data, model, optimiser and the
diffusion representations, with the paper's / reference code's values as defaults.

An algorithm's own parameters live in its file (`algorithms/<name>.py`); `config.RunConfig` is
this class plus the chosen algorithm and every algorithm's parameters, parsed once at the edge.
Algorithms see this part only, so they import it without importing the registry that lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from feddifrc_core import paths
from feddifrc_core.aggregation import num_sampled
from feddifrc_core.datasets import DATASET_NAMES
from feddifrc_core.differential_privacy import MODES as DP_MODES
from feddifrc_core.differential_privacy import config_problem as dp_config_problem
from feddifrc_core.diffusion.backbone import DTYPES
from feddifrc_core.diffusion.reduction import REDUCTIONS
from feddifrc_core.models import MODEL_NAMES
from feddifrc_core.options import ConfigError, int_list
from feddifrc_core.options import option as _opt
from feddifrc_core.partition import METHODS as PARTITION_METHODS
from feddifrc_core.projection import PROJECTIONS
from feddifrc_core.robust_aggregation import AGGREGATORS, aggregator_problem
from feddifrc_core.secure_encoding import SECURE_AGGREGATIONS, SecAggSettings

_SECAGG = SecAggSettings()  # the SecAgg+ defaults, with their reasons

# Run-config keys that say where and how fast a run goes, not what it computes: changing one
# keeps a run the same run (a resumed run may change them; benchmark records leave them out of
# their configuration hash).
BOOKKEEPING_KEYS = frozenset({
    "output-dir", "run-name", "resume", "cache-dir", "data-path", "device", "torch-threads",
    "eval-batch-size", "round-timeout", "setup-timeout"})
# What a resumed run may change besides: more rounds, and the nodes it waits for.
RESUMABLE_KEYS = BOOKKEEPING_KEYS | {"num-rounds", "min-available-nodes"}
# Where round 0's global model comes from (`init-model`, warm_start.py).
INIT_MODELS = ("random", "public-supervised")


@dataclass(frozen=True)
class CommonConfig:
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
    # --- how the server combines the model updates (docs/privacy.md, "Robust aggregation") ------
    # fedavg = the weighted mean (the paper's); the others are Flower's robust rules, unweighted,
    # which read each client's update (so not with secure aggregation)
    aggregator: str = _opt("fedavg", choices=AGGREGATORS)
    # Flower's Krum/Bulyan name: attackers per round to tolerate (0 = Flower's default); Krum and
    # Bulyan compute with it, and min-train-nodes is checked against it for every aggregator
    num_malicious_nodes: int = _opt(0, lo=0)
    # Flower's FedTrimmedAvg `beta` (and default): the fraction cut from each tail, in [0, 0.5)
    trimmed_avg_beta: float = _opt(0.2, lo=0.0, hi=0.5, hi_open=True)
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
    # The global model the server starts from, whatever the algorithm: "random" = seeded
    # initialisation (the paper); "public-supervised" = that model trained centrally by the server
    # on the labelled public half of the training split (data-subset 'private' only: the clients
    # never hold it), a control that gives any algorithm the data the diffusion teacher saw
    # (feddifrc_core/warm_start.py).
    init_model: str = _opt("random", choices=INIT_MODELS)
    # Epochs of that central training (SGD with lr / momentum / weight-decay / batch-size, the
    # run's augmentation): a few minutes for the small CNN on 2 cores (docs/results.md).
    init_epochs: int = _opt(3, lo=1)
    local_epochs: int = _opt(10, lo=1)  # paper: 10 local epochs
    batch_size: int = _opt(64, lo=1)  # paper: 64
    lr: float = _opt(0.01, lo=0.0, lo_open=True)  # paper: SGD 0.01
    momentum: float = _opt(0.9, lo=0.0, hi=1.0)  # paper: 0.9
    weight_decay: float = _opt(1e-5, lo=0.0)  # paper: 1e-5 on CIFAR-10
    # --- diffusion representations (the algorithms that align to them) -------------------------
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
    reduction: str = _opt("mean-pool", choices=REDUCTIONS)
    # Images per UNet call (x prompts). Every call has this shape (short batches are padded), so
    # it is part of the features' cache key: GPUs want 16+, CPUs 4-8 (docs/performance.md).
    extraction_batch_size: int = _opt(16, lo=1)
    # auto: float16 on CUDA, bfloat16-mixed on a CPU with native bfloat16, else float32
    # (diffusion/backbone.py, resolve_precision).
    diffusion_dtype: str = _opt("auto", choices=DTYPES)
    projection: str = _opt("federated-pca", choices=PROJECTIONS)  # shared basis
    prompt_template: str = _opt("a photo of a {}")  # paper prompt
    neg_num: int = _opt(10, lo=1)  # reference: 10 negative class prompts per sample
    cache_dir: str = _opt("")  # "" -> $FEDDIFRC_CACHE_DIR or ~/.cache/feddifrc
    # --- label-free algorithms ---------------------------------------------------------------
    ssl_positive_prompt: str = _opt("a photo of a similar object")  # paper
    ssl_null_prompt: str = _opt("a photo of a visual object")  # paper
    ssl_vocabulary: str = _opt("tiny-imagenet")  # negative prompt vocabulary (file name or path)
    probe_train_samples: int = _opt(5000, lo=1)  # labelled samples for the server's linear probe
    # --- differential privacy of the model updates (Flower's wrappers and mods; docs/privacy.md) --
    # Off as in the paper. Clipping on the server (it sees each update) or on the client (Flower's
    # mod; pairs with secure aggregation), at a fixed norm or one that follows a quantile.
    differential_privacy: str = _opt("none", choices=DP_MODES)
    # z: Gaussian noise of std z * C / m on the mean of the m sampled clients' clipped updates;
    # Flower recommends >= 1 for strong privacy, 0 clips without noise (no guarantee)
    dp_noise_multiplier: float = _opt(1.0, lo=0.0)
    # C: the L2 norm each client's update (local model - global model) is clipped to; the
    # adaptive modes start from it (Flower's initial_clipping_norm)
    dp_clipping_norm: float = _opt(1.0, lo=0.0, lo_open=True)
    # Adaptive modes, Flower's names and defaults (Andrew et al. 2021): the share of updates to
    # clip, the step of the geometric update of C, and the noise std of the clipped count
    # (0 = Flower's default, clients per round / 20; it must exceed z / 2)
    dp_target_clipped_quantile: float = _opt(0.5, lo=0.0, hi=1.0)
    dp_clip_norm_lr: float = _opt(0.2, lo=0.0, lo_open=True)
    dp_clipped_count_stddev: float = _opt(0.0, lo=0.0)
    # the delta at which each run reports its epsilon; client-level, so below 1 / clients
    dp_delta: float = _opt(1e-5, lo=0.0, lo_open=True, hi=1.0)
    # --- privacy of the uploads (docs/privacy.md) --------------------------------------------
    # "none": every client's upload reaches the server in clear; "secaggplus": Flower's SecAgg+,
    # the server learns only the sums (projection statistics, target sums, example-weighted model
    # updates, example counts and training metrics: server_app/secure_aggregator.py).
    secure_aggregation: str = _opt("none", choices=SECURE_AGGREGATIONS)
    # Flower's SecAgg+ settings, with Flower's names and meaning: a value <= 1 is a fraction, a
    # whole number > 1 a count. Defaults and their reasons: secure_encoding.SecAggSettings.
    secagg_num_shares: float = _opt(float(_SECAGG.num_shares), lo=0.0, lo_open=True)
    secagg_reconstruction_threshold: float = _opt(float(_SECAGG.reconstruction_threshold),
                                                  lo=0.0, lo_open=True)
    secagg_clipping_range: float = _opt(_SECAGG.clipping_range, lo=0.0, lo_open=True)
    secagg_quantization_range: int = _opt(_SECAGG.quantization_range, lo=0, hi=2**31 - 1)

    # --- derived values --------------------------------------------------------------------------
    @property
    def up_block_ids(self) -> tuple[int, ...]:
        return _parse_up_blocks(self.up_blocks)

    def resolved_output_dir(self) -> Path:
        return paths.runs_dir(self.output_dir)

    def resolved_cache_dir(self) -> Path:
        return paths.cache_dir(self.cache_dir)

    @property
    def secagg_settings(self) -> SecAggSettings:
        """The secagg-* keys as Flower reads them: an int is a count, a float a fraction."""
        return SecAggSettings(_count_or_fraction(self.secagg_num_shares),
                              _count_or_fraction(self.secagg_reconstruction_threshold),
                              self.secagg_clipping_range, self.secagg_quantization_range)

    def check_secure_aggregation(self, num_nodes: int) -> None:
        """ConfigError when SecAgg+ cannot work with `num_nodes` connected nodes: the set-up
        stages sum over every node, a training round over the clients it samples."""
        if self.secure_aggregation == "none":
            return
        per_round = num_sampled(num_nodes, self.fraction_train, self.min_train_nodes)
        for n, what in ((num_nodes, f"the set-up stages (all {num_nodes} nodes)"),
                        (per_round, f"a training round ({per_round} of {num_nodes} nodes, "
                                    "fraction-train / min-train-nodes)")):
            problems = self.secagg_settings.problems(n)
            if problems:
                raise ConfigError(f"secure-aggregation='secaggplus' over {what}: "
                                  + "; ".join(problems))

    def __post_init__(self) -> None:
        _parse_up_blocks(self.up_blocks)
        if "{}" not in self.prompt_template:
            raise ConfigError(
                f"prompt-template must contain '{{}}' where the class name goes, got {self.prompt_template!r}"
            )
        if self.reduction != "mean-pool" and self.pool_grid != 1:
            raise ConfigError(
                f"pool-grid={self.pool_grid} applies to reduction 'mean-pool' only; "
                f"reduction {self.reduction!r} keeps every position: set pool-grid=1"
            )
        problem = (aggregator_problem(self.aggregator, self.num_malicious_nodes,
                                      self.trimmed_avg_beta, self.min_train_nodes,
                                      secure_aggregation=self.secure_aggregation)
                   or dp_config_problem(self))
        if problem:
            raise ConfigError(problem)
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
        for key in ("secagg-num-shares", "secagg-reconstruction-threshold"):
            value = getattr(self, key.replace("-", "_"))
            if value > 1 and not float(value).is_integer():
                raise ConfigError(f"'{key}' must be a fraction in (0, 1] or a whole number of "
                                  f"clients, got {value!r}")
        problems = self.secagg_settings.value_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        if self.secure_aggregation != "none" and self.min_train_nodes < 2:
            raise ConfigError(
                f"secure-aggregation={self.secure_aggregation!r} needs 'min-train-nodes' >= 2 "
                f"(a sum over one client is that client's upload), got {self.min_train_nodes}")
        if self.min_available_nodes < self.min_train_nodes:
            raise ConfigError(
                f"min-available-nodes ({self.min_available_nodes}) must be >= min-train-nodes "
                f"({self.min_train_nodes})"
            )


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else is checked and returned."""
    if requested in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} was requested but no CUDA device is available; use 'cpu'")
    if requested != "cpu" and not requested.startswith(("cuda", "mps")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    return requested


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention for SecAgg+ sizes: a whole number > 1 counts clients, else a fraction."""
    return int(value) if value > 1 else float(value)


def _parse_up_blocks(text: str) -> tuple[int, ...]:
    return int_list(text, "up-blocks", "'1,2,3'")

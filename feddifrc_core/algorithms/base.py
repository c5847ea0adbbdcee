"""What the federation asks of an algorithm, both halves, and the registry that finds one by name.

An algorithm is one file in this package: a subclass of `Algorithm` that sets `name`, declares its
own parameters (`Params`, a dataclass of `options.option` fields: default, bounds, help) and
overrides the hooks it needs. Defining the class registers it; `feddifrc_core.algorithms` imports
every module of the package, so the run config's keys and choice list, the apps, the benchmarks and
the tests' parametrisations all see a new algorithm without another edit (docs/architecture.md,
"Adding an algorithm").

One object serves one party: the ServerApp makes one per run (`setup`, `train_payload`,
`aggregate`, the state it checkpoints); a ClientApp makes one per message (`answer` for set-up
stages; `begin_update`, the training hooks and `end_update` for a local update). Every default
below is FedAvg's: an algorithm overrides only what differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feddifrc_core.aggregation import Gathered, Rule
from feddifrc_core.common_config import CommonConfig

if TYPE_CHECKING:  # the session builds it; an algorithm only calls it
    from feddifrc_core.client_diffusion import ClientDiffusion

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Arrays = dict[str, np.ndarray]
# Loss parts of one mini-batch: name -> (weight, unweighted value). The total is the weighted sum
# in insertion order; the unweighted values become the metrics `train-<name>`.
Parts = dict[str, tuple[float, torch.Tensor]]


@dataclass(frozen=True)
class AlgorithmParams:
    """An algorithm's own parameters: a frozen dataclass of `option(...)` fields, each a
    kebab-case run-config key (with a line in `pyproject.toml`)."""


@dataclass(frozen=True)
class NoParams(AlgorithmParams):
    """For algorithms without parameters of their own."""


class Federation(Protocol):
    """What the server half of an algorithm may ask of the federation during its set-up."""

    def gather(self, stage: str, payload: Mapping[str, np.ndarray], rule: Rule) -> Gathered:
        """Send `stage` with `payload` to every client; their replies combined by `rule` (the
        one aggregation component of the server: plain sums and means today)."""
        ...


@dataclass(frozen=True)
class ClientView:
    """What the client half of an algorithm may use of its ClientSession."""

    partition_id: int
    cache_dir: Path  # this node's cache folder (feature cache, per-client state on disk)
    diffusion: ClientDiffusion  # this client's diffusion representations, extracted on first use


@dataclass(frozen=True)
class UpdateInfo:
    """One local update as the server asked for it."""

    server_round: int
    run_name: str
    run_key: str  # unique per run, kept on resume ("" for checkpoints from before it existed)
    payload: Mapping[str, np.ndarray]  # the server half's `train_payload`


@dataclass(frozen=True)
class Batch:
    """One mini-batch as an algorithm sees it (everything on the training device)."""

    rows: torch.Tensor  # [B] rows of the client's set
    images: torch.Tensor  # [B, C, H, W] uint8, before the transform (a second view draws from it)
    labels: torch.Tensor | None  # [B] int64; None for label-free algorithms
    generator: torch.Generator  # the update's CPU generator (augmentations)
    transform: TrainTransform


class Algorithm:
    """FedAvg: plain supervised training (cross-entropy) and the weighted mean of the models."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[AlgorithmParams]] = NoParams
    label_free: ClassVar[bool] = False  # True: labels are never read (judged by probe and kNN)
    uses_diffusion: ClassVar[bool] = False  # reads the diffusion settings (backbone, extraction)
    # runs the diffusion teacher but extracts no representations (its zero-shot logits): of the
    # diffusion settings only the backbone's apply (model, image size, dtype, prompt template)
    reads_teacher: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            registered = _REGISTRY.get(cls.name)
            if registered is not None and _where(registered) != _where(cls):  # a reload is fine
                raise ValueError(f"algorithm name {cls.name!r} is taken by {_where(registered)}")
            _REGISTRY[cls.name] = cls

    def __init__(self, cfg: CommonConfig, params: AlgorithmParams) -> None:
        if not isinstance(params, self.Params):
            raise TypeError(f"{self.name} takes {self.Params.__name__}, got {type(params).__name__}")
        self.cfg = cfg
        self.params = params
        self.state: Arrays = {}  # server half: what `server_state` checkpoints

    # --- the run, on every party ---------------------------------------------------------------
    def config_problem(self) -> str | None:
        """A cross-field rule of this algorithm that the run config breaks (raised as a
        ConfigError when the config is parsed), or None."""
        return None

    def model_head(self) -> str:
        """The alignment head of the model every party builds (`models.ALIGN_HEADS`)."""
        return "none"

    # --- server half: one object per run in the ServerApp ----------------------------------------
    def setup(self, federation: Federation, feature_dim: int) -> None:
        """Set-up stages before round 1, in a new run and when resuming (where `state` came back
        from the checkpoint and may already hold what the set-up makes)."""

    def train_payload(self) -> Arrays:
        """Arrays sent to every client with the global model (the client's `UpdateInfo.payload`)."""
        return {}

    def aggregate(self, current: Arrays, mean: Arrays, uploads: Arrays,
                  server_round: int) -> Arrays:
        """The next global model from the current one, the clients' weighted mean model and the
        weighted mean of their `end_update` uploads."""
        return mean

    def server_state(self) -> Arrays:
        """What the server half keeps between rounds (saved with every checkpoint)."""
        return dict(self.state)

    def load_server_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.state = {k: np.asarray(v) for k, v in arrays.items()}

    # --- client half: one object per message in a ClientApp --------------------------------------
    def answer(self, stage: str, client: ClientView, payload: Mapping[str, np.ndarray]) -> Arrays:
        """This client's upload for one of the server half's set-up stages."""
        raise ValueError(f"algorithm {self.name!r} has no set-up stage {stage!r}")

    def begin_update(self, client: ClientView, update: UpdateInfo, model: nn.Module) -> None:
        """Fetch what this update trains with (targets, stored models) before `train_local`."""

    def end_update(self, client: ClientView, update: UpdateInfo,
                   state: Mapping[str, np.ndarray]) -> Arrays:
        """After training (`state`: the local model): store what later rounds need; return arrays
        to upload beside the model (averaged like it, handed to `aggregate`)."""
        return {}

    # --- local training: `train_local` calls these, in this order -------------------------------
    def check_inputs(self, model: nn.Module, num_samples: int,
                     transform: TrainTransform | None) -> None:
        """Refuse inputs this algorithm cannot train on (ValueError naming the argument)."""

    def prepare(self, model: nn.Module, device: torch.device, global_model: nn.Module | None
                ) -> None:
        """Called once per update, after `model` moved to `device` and before the first step."""

    def batch_loss(self, model: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[Parts, torch.Tensor | None]:
        """The loss parts of one step and the logits (None: no accuracy to count)."""
        z, logits = model(x)  # [B, D], [B, C]
        parts: Parts = {}
        if batch.labels is not None:
            parts["ce"] = (1.0, F.cross_entropy(logits, batch.labels))
        parts.update(self.extra_terms(model, x, z, batch))
        return parts, logits

    def extra_terms(self, model: nn.Module, x: torch.Tensor, z: torch.Tensor,
                    batch: Batch) -> Parts:
        """Terms added to the cross-entropy (FedProx, MOON, FedDifRC override this)."""
        return {}


_REGISTRY: dict[str, type[Algorithm]] = {}


def get_algorithm(name: str) -> type[Algorithm]:
    """The registered algorithm class called `name` (ValueError listing the choices otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"`algorithm` must be one of {list(_REGISTRY)}, got {name!r}") from None


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm, in registration order."""
    return tuple(_REGISTRY)


def params_classes() -> tuple[type[AlgorithmParams], ...]:
    """The registered algorithms' parameter classes, each once, in registration order."""
    return tuple(dict.fromkeys(cls.Params for cls in _REGISTRY.values()))


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A detached eval-mode copy: a reference model (FedProx/MOON anchor) must not train."""
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen

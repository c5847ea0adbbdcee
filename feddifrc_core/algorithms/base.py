"""What local training asks of an algorithm, and the registry that finds an algorithm by name.

An algorithm is one file in this package: a subclass of `Algorithm` that sets `name`. Defining the
class registers it, and `feddifrc_core.algorithms` imports every module of the package, so the
config's choice list, the client session, the server, the benchmarks and the tests' parametrisations
all see a new algorithm without another edit (docs/architecture.md, "Adding an algorithm").

`train_local` (training.py) owns the loop: seeded shuffles, the optimiser, metrics, RNG isolation.
An algorithm only says what it needs (the flags) and what one mini-batch costs (`batch_loss`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from feddifrc_core.targets import DiffusionTargets

if TYPE_CHECKING:  # the config imports the registry for its choice list; no import back at runtime
    from feddifrc_core.config import RunConfig

TrainTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
# Loss parts of one mini-batch: name -> (weight, unweighted value). The total is the weighted sum
# in insertion order; the unweighted values become the metrics `train-<name>`.
Parts = dict[str, tuple[float, torch.Tensor]]


@dataclass(frozen=True)
class Batch:
    """One mini-batch as an algorithm sees it (everything on the training device)."""

    rows: torch.Tensor  # [B] rows of the client's set
    images: torch.Tensor  # [B, C, H, W] uint8, before the transform (a second view draws from it)
    labels: torch.Tensor | None  # [B] int64; None for label-free algorithms
    generator: torch.Generator  # the update's CPU generator (augmentations)
    transform: TrainTransform


class Algorithm:
    """Plain supervised training (cross-entropy); subclasses add or replace loss terms."""

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = True  # False: labels are never read (label-free algorithms)
    needs_targets: ClassVar[bool] = False  # the client's DiffusionTargets (diffusion extraction)
    keeps_previous_model: ClassVar[bool] = False  # the client's last local model is stored per round
    # the diffusion teacher's zero-shot class logits of the client's images (teacher_logits.py)
    needs_teacher_logits: ClassVar[bool] = False
    # RunConfig fields only this algorithm reads (their defaults and validation stay in RunConfig:
    # one place for every knob); benchmarks keep other methods' configs free of them.
    settings: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            registered = _REGISTRY.get(cls.name)
            if registered is not None and _where(registered) != _where(cls):  # a reload is fine
                raise ValueError(f"algorithm name {cls.name!r} is taken by {_where(registered)}")
            _REGISTRY[cls.name] = cls

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    # --- checks ----------------------------------------------------------------------------------
    @classmethod
    def config_problem(cls, cfg: RunConfig) -> str | None:
        """A cross-field rule of this algorithm that `cfg` breaks (RunConfig raises it), or None."""
        return None

    def check_inputs(self, num_samples: int, transform: TrainTransform | None) -> None:
        """Refuse inputs this algorithm cannot train on (ValueError naming the argument)."""

    # --- hooks of one local update -----------------------------------------------------------------
    def prepare(self, model: nn.Module, device: torch.device, targets: DiffusionTargets | None,
                global_model: nn.Module | None, previous_model: nn.Module | None) -> None:
        """Called once per update, after `model` moved to `device` and before the first step."""

    def prepare_teacher_logits(self, logits: torch.Tensor) -> None:
        """Called after `prepare` with [N, C] logits on the device (needs_teacher_logits only)."""

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


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A detached eval-mode copy: a reference model (FedProx/MOON anchor) must not train."""
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen

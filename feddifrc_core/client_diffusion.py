"""One client's diffusion representations and the targets made from them, for the algorithms that
align to the diffusion model (FedDifRC and its variants), and the teacher's zero-shot logits of
its images (the distillation control, fedavg-kd).

Built cheaply with the ClientSession; the backbone is loaded and the representations extracted on
first need (then read from the verified on-disk feature cache, and kept per process and basis).
The arrays it answers with are the set-up uploads of `algorithms/feddifrc.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from feddifrc_core import client_extraction as extraction
from feddifrc_core import representations as rep
from feddifrc_core.common_config import CommonConfig
from feddifrc_core.datasets import ImageDataset
from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.diffusion.reduction import basis_sha256
from feddifrc_core.projection import Basis, arrays_to_bases, stats_to_arrays
from feddifrc_core.prompts import class_prompts
from feddifrc_core.targets import TARGET_COUNT, TARGET_OFFSET, TARGET_SUM, DiffusionTargets
from feddifrc_core.teacher_logits import client_teacher_logits
from feddifrc_core.zero_shot import ZeroShotSettings

logger = logging.getLogger(__name__)

# backbone, images uint8 [N, C, H, W], labels [N] or None, sample ids [N], class names, settings
ExtractionInputs = tuple[DiffusionBackbone, torch.Tensor, torch.Tensor | None, np.ndarray,
                         tuple[str, ...], rep.RepresentationSettings]


class ClientDiffusion:
    """One client's representations under the run's diffusion settings."""

    def __init__(self, cfg: CommonConfig, data: ImageDataset, sample_ids: np.ndarray,
                 device: torch.device, cache_dir: Path, label_free: bool) -> None:
        self.cfg, self.data, self.sample_ids = cfg, data, sample_ids
        self.device, self.label_free = device, label_free
        self.cache_dir = cache_dir  # the backbone's downloads; representations in a subfolder
        # (hashes of the bases they were projected with, the representations); None = not yet
        self._representations: tuple[tuple[str, ...], rep.ClientRepresentations] | None = None
        self._teacher_logits: dict[ZeroShotSettings, torch.Tensor] = {}  # [N, C] by settings

    def _inputs(self) -> ExtractionInputs:
        """The extraction passes' shared arguments (the backbone is cached per process)."""
        backbone = rep.backbone_from_config(self.cfg, self.device, self.cache_dir)
        # label-free algorithms: prompts come from the SSL vocabulary, never from the labels
        labels = None if self.label_free else self.data.labels
        settings = rep.RepresentationSettings.from_run_config(self.cfg, self.label_free,
                                                              self.device)
        return (backbone, self.data.images, labels, self.sample_ids, self.data.class_names,
                settings)

    def representations(self, bases: Sequence[Basis] | None = None) -> rep.ClientRepresentations:
        """Extracted once per process and basis (and cached on disk by the feature cache).

        mean-pool representations do not depend on the bases; spatial-norm ones are projected
        with them inside the extractor and need them."""
        projected = self.cfg.reduction != "mean-pool"
        key = tuple(basis_sha256(b) for b in bases or ()) if projected else ()
        if self._representations is None or self._representations[0] != key:
            reps = extraction.extract_client_representations(
                *self._inputs(), cache_dir=self.cache_dir / "representations",
                bases=bases if projected else None)
            self._representations = (key, reps)
        return self._representations[1]

    def projection_stats(self) -> dict[str, np.ndarray]:
        """Sufficient statistics for the shared basis: of the pooled vectors (mean-pool) or of
        every spatial position's channel vector (spatial-norm, a first extraction pass)."""
        if self.cfg.reduction == "mean-pool":
            return stats_to_arrays(self.representations().pca_stats())
        return stats_to_arrays(extraction.extract_position_stats(
            *self._inputs(), cache_dir=self.cache_dir / "representations"))

    def target_sum(self, payload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Count and sum of this client's targets in the shared space (spatial-norm-centred);
        the space's size is the bases' total output size."""
        bases = _bases(payload)
        feature_dim = sum(b.out_dim for b in bases)
        count, total = self.representations(bases).target_sum(bases, feature_dim)
        return {TARGET_COUNT: np.array([count], dtype=np.int64), TARGET_SUM: total}

    def targets(self, payload: Mapping[str, np.ndarray], feature_dim: int) -> DiffusionTargets:
        """This client's targets in the shared space the payload's bases span, less the
        federated mean target where the payload carries one."""
        bases = _bases(payload)
        return self.representations(bases).targets(bases, feature_dim, payload.get(TARGET_OFFSET))

    def teacher_logits(self, settings: ZeroShotSettings) -> torch.Tensor:
        """The teacher's zero-shot class logits [N, C] of this client's images: computed once per
        image and kept on this node's disk (never sent anywhere), memoised per process."""
        if settings not in self._teacher_logits:
            backbone = rep.backbone_from_config(self.cfg, self.device, self.cache_dir)
            prompts = class_prompts(self.data.class_names, self.cfg.prompt_template)
            logits, info = client_teacher_logits(backbone, self.data.images, self.sample_ids,
                                                 prompts, settings, self.cache_dir)
            logger.info("teacher logits of %d images (%d reused, %d computed in %.1f s) in %s",
                        len(self.data), info["reused"], info["computed"], info["seconds"],
                        info["folder"])
            self._teacher_logits[settings] = logits
        return self._teacher_logits[settings]


def _bases(payload: Mapping[str, np.ndarray]) -> list[Basis]:
    if not payload:
        raise ValueError("the message carries no projection bases; the server must run the "
                         "projection set-up before round 1")
    return arrays_to_bases(dict(payload))

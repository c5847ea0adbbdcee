"""A client's diffusion representations: extracted once from its own data, cached, reused.

The ClientApp calls `client_extraction.extract_client_representations(...)` (cheap after the first
time: the cache is verified and loaded), then `.pca_stats()` for the federated-PCA set-up and
`.targets(bases, feature_dim)` for training.

Which prompts are stored per image (documented choice):
- "all" layout: every class prompt + the null prompt for every image, when C + 1 <= 12 (the
  paper's CIFAR-10 / Fashion-MNIST setting: C - 1 <= neg-num means every other class is a
  negative anyway, so nothing is wasted and the UNet batch has a fixed prompt set);
- "needed" layout: only [true class, K negatives, null] per image otherwise (CIFAR-100:
  12 instead of 101 prompts per image) and always for the self-supervised variant
  ([positive, K vocabulary negatives, null]).
How each block's map becomes a vector is the `reduction` (diffusion/reduction.py):
- "mean-pool": the pooled, unprojected per-block features are cached (fp16); the projection is
  applied on top, so changing or re-computing the shared bases never invalidates the cache;
  `.pca_stats()` gives the federated-PCA statistics of the pooled vectors.
- "spatial-norm" (the authors' reduction): a first pass gives the per-position statistics
  (`extract_position_stats`, cached as one small verified file); with the shared bases, a second
  pass projects every position and keeps the RMS over positions, so only the D-dim targets are
  cached (the cache key includes the bases' hashes). "spatial-norm-centred" extracts the same and
  subtracts the federated mean target (`.target_stats()`, an offset sent with the bases).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core.common_config import CommonConfig
from feddifrc_core.diffusion.backbone import DiffusionBackbone, load_backbone, resolve_precision
from feddifrc_core.diffusion.reduction import basis_sha256
from feddifrc_core.projection import (
    Basis,
    PcaStats,
    merge_stats,
    pca_stats,
    project,
)
from feddifrc_core.targets import DiffusionTargets

logger = logging.getLogger(__name__)

# bump when the stored layout or its meaning changes; 2: one UNet call shape (batch
# invariance), prompt-free stages once per image
REPRESENTATION_FORMAT = 2
ALL_PROMPTS_MAX = 12  # store every class prompt when C + 1 is at most this


@dataclass(frozen=True)
class RepresentationSettings:
    """What determines a client's representations (beside backbone and data): a view of the run
    config (`from_run_config`), whose fields carry the defaults and their reasons."""

    timestep: int
    up_blocks: tuple[int, ...]
    image_size: int  # 0 = the backbone's native size
    ensemble_size: int  # noise draws averaged per image
    pool_grid: int  # g x g spatial average pooling per block (1 = global mean; mean-pool only)
    reduction: str  # "mean-pool" or the authors' "spatial-norm" (+ "-centred"); see module doc
    extraction_batch_size: int  # images per UNet call (x prompts): the one call shape, in the key
    autocast: str  # "" or "bfloat16"/"float16": mixed precision over float32 weights
    neg_num: int  # negative prompts per sample
    prompt_template: str
    seed: int  # noise and negative draws
    dataset: str  # data set name, part of the fingerprint and the cache file name
    label_free: bool  # prompts from the SSL vocabulary, labels never read
    ssl_positive_prompt: str
    ssl_null_prompt: str
    ssl_vocabulary: str
    all_prompts_max: int = ALL_PROMPTS_MAX
    chunk_images: int = 512  # images per cache chunk: the unit of resumption

    @classmethod
    def from_run_config(cls, cfg: CommonConfig, label_free: bool,
                        device: torch.device | str = "cpu") -> RepresentationSettings:
        """The view of `cfg` that extraction reads; `label_free` is the run algorithm's."""
        autocast = resolve_precision(cfg.diffusion_dtype, device).autocast
        return cls(
            timestep=cfg.diffusion_timestep,
            up_blocks=cfg.up_block_ids,
            image_size=cfg.diffusion_image_size,
            ensemble_size=cfg.ensemble_size,
            pool_grid=cfg.pool_grid,
            reduction=cfg.reduction,
            extraction_batch_size=cfg.extraction_batch_size,
            autocast="" if autocast is None else str(autocast).removeprefix("torch."),
            neg_num=cfg.neg_num,
            prompt_template=cfg.prompt_template,
            seed=cfg.seed,
            dataset=cfg.dataset,
            label_free=label_free,
            ssl_positive_prompt=cfg.ssl_positive_prompt,
            ssl_null_prompt=cfg.ssl_null_prompt,
            ssl_vocabulary=cfg.ssl_vocabulary,
        )


def backbone_from_config(
    cfg: CommonConfig, device: torch.device | str, cache_dir: str | Path | None = None
) -> DiffusionBackbone:
    """The (per-process cached) backbone a run config asks for, on `device`."""
    dtype = resolve_precision(cfg.diffusion_dtype, device).weights
    root = cache_dir if cache_dir is not None else cfg.resolved_cache_dir()
    return load_backbone(
        cfg.diffusion_model, device, dtype, revision=cfg.diffusion_revision, cache_dir=str(root)
    )


@dataclass(frozen=True)
class ClientRepresentations:
    """Per-block diffusion features of one client's samples (row i = local sample i).

    mean-pool: pooled, unprojected [N, P, C_l]; spatial-norm: already projected with the shared
    bases whose hashes `bases_sha256` lists, [N, P, d_l].
    """

    features: tuple[torch.Tensor, ...]  # per block [N, P, C_l | d_l] float16 on CPU
    prompts: tuple[str, ...]  # prompt list that prompt_ids index
    prompt_ids: torch.Tensor  # [N, P] which prompt each stored column was computed under
    positive_cols: torch.Tensor  # [N] column of the positive (true class / SSL positive prompt)
    negative_cols: torch.Tensor  # [N, K] columns of the negatives
    null_cols: torch.Tensor  # [N] column of the null prompt
    up_blocks: tuple[int, ...]
    alpha_bar: float  # kept-signal fraction at the timestep used
    fingerprint: dict[str, Any] = field(repr=False)
    cache_dir: Path | None = None
    from_cache: bool = False  # True when nothing had to be extracted
    seconds: float = 0.0  # wall time of extraction (or of loading)
    bases_sha256: tuple[str, ...] = ()  # spatial-norm: the bases projected with; () = unprojected

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(int(f.shape[-1]) for f in self.features)

    @property
    def projected(self) -> bool:
        return bool(self.bases_sha256)

    def pca_stats(self, chunk_rows: int = 4096) -> list[PcaStats]:
        """Per block: statistics over every stored pooled feature vector (all rows, all columns)."""
        if self.projected:
            raise ValueError(
                "spatial-norm representations are already projected; their basis comes from "
                "extract_position_stats"
            )
        out = []
        for feats in self.features:
            flat = feats.reshape(-1, feats.shape[-1])  # [N*P, C_l]
            stats = pca_stats(flat[:0])
            for start in range(0, flat.shape[0], chunk_rows):
                stats = merge_stats(stats, pca_stats(flat[start : start + chunk_rows]))
            out.append(stats)
        return out

    def projected_all(
        self, bases: Sequence[Basis], feature_dim: int, chunk_rows: int = 2048
    ) -> torch.Tensor:
        """Every stored (image, prompt) vector in the shared space: [N, P, D] float32."""
        dims = [b.out_dim for b in bases]
        if len(bases) != len(self.features):
            raise ValueError(
                f"got {len(bases)} bases for {len(self.features)} blocks {self.up_blocks}"
            )
        if sum(dims) != feature_dim:
            raise ValueError(
                f"bases project to {sum(dims)} dims ({dims}) but the model's feature size is "
                f"{feature_dim}; "
                f"build them with split_feature_dim({feature_dim}, {len(bases)})"
            )
        if self.projected:
            if tuple(basis_sha256(b) for b in bases) != self.bases_sha256:
                raise ValueError(
                    "these spatial-norm representations were projected with other bases than the "
                    "ones given; extract them again with the current bases"
                )
            return torch.cat([f.float() for f in self.features], dim=-1)  # [N, P, D]
        n, p = self.prompt_ids.shape
        projected = torch.empty(n, p, feature_dim)
        for start in range(0, n, chunk_rows):
            part = slice(start, start + chunk_rows)
            projected[part] = project([f[part] for f in self.features], bases)  # [n, P, D]
        return projected

    def target_sum(self, bases: Sequence[Basis], feature_dim: int) -> tuple[int, np.ndarray]:
        """Count and sum [D] (float64) of every stored vector in the shared space: the server's
        merged mean is the shared component that spatial-norm-centred removes."""
        flat = self.projected_all(bases, feature_dim).reshape(-1, feature_dim).double()
        return int(flat.shape[0]), flat.sum(0).numpy()

    def targets(
        self,
        bases: Sequence[Basis],
        feature_dim: int,
        offset: np.ndarray | None = None,
    ) -> DiffusionTargets:
        """Project with the shared bases, subtract `offset` [D] (spatial-norm-centred: the
        federated mean target), pick positive / negatives / null per sample (float32)."""
        projected = self.projected_all(bases, feature_dim)  # [N, P, D]
        if offset is not None:
            if tuple(np.shape(offset)) != (feature_dim,):
                raise ValueError(f"`offset` must be [{feature_dim}], got {np.shape(offset)}")
            projected -= torch.as_tensor(np.asarray(offset), dtype=torch.float32)
        rows = torch.arange(len(self))
        return DiffusionTargets(
            positive=projected[rows, self.positive_cols],  # [N, D]
            negatives=projected[rows[:, None], self.negative_cols],  # [N, K, D]
            null=projected[rows, self.null_cols],  # [N, D]
        )

"""One client's extraction passes: which prompts each image needs, the per-position statistics
(spatial-norm's first pass) and the representations themselves, verified and cached on disk.

Layouts and reductions are explained in `representations.py`, which holds the settings and the
`ClientRepresentations` these functions return.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddifrc_core.checkpoint import CheckpointError, load_arrays, save_arrays
from feddifrc_core.diffusion.backbone import DiffusionBackbone
from feddifrc_core.diffusion.extractor import DiffusionFeatureExtractor
from feddifrc_core.diffusion.reduction import (
    BlockReduction,
    PositionStats,
    SpatialNorm,
)
from feddifrc_core.feature_cache import FeatureCache, fingerprint_sha256, tensor_sha256
from feddifrc_core.progress import ProgressLog
from feddifrc_core.projection import (
    Basis,
    PcaStats,
    arrays_to_stats,
    stats_to_arrays,
)
from feddifrc_core.prompts import (
    NULL_PROMPT,
    class_prompts,
    draw_per_sample,
    load_vocabulary,
    sample_negatives,
)
from feddifrc_core.representations import (
    REPRESENTATION_FORMAT,
    ClientRepresentations,
    RepresentationSettings,
)
from feddifrc_core.row_store import RowStore, image_digests

logger = logging.getLogger(__name__)


def _layout(
    labels: torch.Tensor, ids: torch.Tensor, class_names: Sequence[str], s: RepresentationSettings
) -> tuple[list[str], str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt list, layout name, prompt_ids [N, P] and the positive / negative / null columns."""
    n = len(ids)
    if s.label_free:
        vocab = class_prompts(load_vocabulary(s.ssl_vocabulary), s.prompt_template)
        prompts = [*vocab, s.ssl_positive_prompt, s.ssl_null_prompt]
        k = min(s.neg_num, len(vocab))
        negatives = draw_per_sample(ids, len(vocab), k, s.seed, stream="ssl-negatives")  # [N, K]
        positive = torch.full((n, 1), len(vocab))
        null = torch.full((n, 1), len(vocab) + 1)
        layout = "needed"
    else:
        num_classes = len(class_names)
        prompts = [*class_prompts(class_names, s.prompt_template), NULL_PROMPT]
        negatives = sample_negatives(
            labels, num_classes, s.neg_num, s.seed, sample_ids=ids
        )  # [N, K]
        k = negatives.shape[1]
        positive, null = labels[:, None], torch.full((n, 1), num_classes)
        layout = "all" if num_classes + 1 <= s.all_prompts_max else "needed"
        if layout == "all":
            prompt_ids = torch.arange(num_classes + 1).expand(n, -1).contiguous()
            return (
                prompts,
                layout,
                prompt_ids,
                labels.clone(),
                negatives,
                torch.full((n,), num_classes),
            )
    prompt_ids = torch.cat([positive, negatives, null], dim=1)  # [N, 1 + K + 1]
    cols = torch.arange(1, k + 1).expand(n, -1).contiguous()
    return (
        prompts,
        layout,
        prompt_ids,
        torch.zeros(n, dtype=torch.long),
        cols,
        torch.full((n,), k + 1),
    )


@dataclass(frozen=True)
class _Job:
    """Validated inputs, the extractor and the prompt layout shared by both extraction passes."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    ids: torch.Tensor  # [N] global indices
    extractor: DiffusionFeatureExtractor
    prompts: list[str]
    layout: str
    prompt_ids: torch.Tensor  # [N, P]
    positive_cols: torch.Tensor
    negative_cols: torch.Tensor
    null_cols: torch.Tensor
    fingerprint: dict[str, Any]  # what the features depend on, beside the reduction

    @property
    def prefix(self) -> str:
        return f"{self.fingerprint['dataset'] or 'data'}-n{self.fingerprint['num_samples']}"


def _prepare(
    backbone: DiffusionBackbone,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None,
    sample_ids: Sequence[int] | torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    settings: RepresentationSettings,
) -> _Job:
    # 1. inputs
    images_t = torch.as_tensor(images)
    n = images_t.shape[0] if images_t.ndim == 4 else -1
    if images_t.dtype != torch.uint8 or n < 0:
        raise ValueError(
            f"`images` must be uint8 [N, C, H, W], got {images_t.dtype} {tuple(images_t.shape)}"
        )
    ids = torch.as_tensor(np.array(sample_ids, dtype=np.int64)).reshape(-1)  # a writable copy
    if len(ids) != n:
        raise ValueError(f"`sample_ids` must have one global index per image ({n}), got {len(ids)}")
    if settings.label_free:
        labels_t = torch.zeros(n, dtype=torch.long)
    else:
        if labels is None:
            raise ValueError("`labels` are required unless settings.label_free is True")
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if len(labels_t) != n:
            raise ValueError(f"`labels` must have one entry per image ({n}), got {len(labels_t)}")
    extractor = DiffusionFeatureExtractor(
        backbone,
        timestep=settings.timestep,
        up_blocks=settings.up_blocks,
        image_size=settings.image_size,
        ensemble_size=settings.ensemble_size,
        batch_size=settings.extraction_batch_size,
        seed=settings.seed,
        pool_grid=settings.pool_grid,
        autocast=getattr(torch, settings.autocast) if settings.autocast else None,
    )
    # 2. prompts each image needs
    prompts, layout, prompt_ids, pos_cols, neg_cols, null_cols = _layout(
        labels_t, ids, class_names, settings
    )
    # 3. fingerprint: everything the stored numbers depend on
    fingerprint = {
        "format": REPRESENTATION_FORMAT,
        "backbone": backbone.identity(),
        "dtype": str(backbone.dtype),
        "extractor": extractor.describe(),
        "layout": layout,
        "prompts": prompts,
        "neg_num": settings.neg_num,
        "dataset": settings.dataset,
        "num_samples": n,
        "sample_ids_sha256": tensor_sha256(ids),
        "labels_sha256": tensor_sha256(labels_t),
        "prompt_ids_sha256": tensor_sha256(prompt_ids),
        "images_sha256": tensor_sha256(images_t),
    }
    return _Job(images_t, ids, extractor, prompts, layout, prompt_ids, pos_cols, neg_cols,
                null_cols, fingerprint)


# The two passes take the same inputs on purpose (one client's data and settings): their
# parameter lists are a deliberate repeat, both validated once by `_prepare`.
def extract_position_stats(
    backbone: DiffusionBackbone,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None,
    sample_ids: Sequence[int] | torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    settings: RepresentationSettings,
    cache_dir: str | Path | None,
) -> list[PcaStats]:
    """spatial-norm, first pass: per block, the statistics of every spatial position's channel
    vector over all stored (image, prompt) pairs, for the federated per-position PCA.

    Cached as one verified file per fingerprint under `cache_dir` (None = no cache).
    """
    job = _prepare(backbone, images, labels, sample_ids, class_names, settings)
    key = fingerprint_sha256({**job.fingerprint, "reduction": {"kind": "position-stats"}})
    path = None if cache_dir is None else Path(cache_dir) / f"{job.prefix}-stats-{key[:16]}.safetensors"
    if path is not None and path.is_file():
        try:
            return arrays_to_stats(load_arrays(path).arrays)
        except CheckpointError as err:
            logger.warning("recomputing position statistics: %s", err)
    t0 = time.perf_counter()
    accumulators = [PositionStats(c) for c in job.extractor.raw_channels]
    bar = ProgressLog(logger, "position statistics", len(job.ids))
    job.extractor.extract(job.images, job.ids.tolist(), job.prompts, job.prompt_ids,
                          progress=bar.update, reductions=accumulators)
    stats = [a.stats for a in accumulators]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_arrays(path, stats_to_arrays(stats), {"fingerprint": key})
    logger.info("position statistics of %d images in %.1fs", len(job.ids), time.perf_counter() - t0)
    return stats


def extract_client_representations(
    backbone: DiffusionBackbone,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | None,
    sample_ids: Sequence[int] | torch.Tensor | np.ndarray,
    class_names: Sequence[str],
    settings: RepresentationSettings,
    cache_dir: str | Path | None,
    progress: bool = True,
    bases: Sequence[Basis] | None = None,
) -> ClientRepresentations:
    """Extract (or load from the verified cache) this client's representations.

    images: uint8 [N, C, H, W] in local order; labels: int [N] (ignored, may be None, in SSL mode);
    sample_ids: global data-set indices [N] (seed the noise and negatives, part of the fingerprint);
    cache_dir: folder for feature caches, may be shared by clients: each client and setting
    gets its own `<dataset>-n<N>-<fingerprint hash>/` subfolder (None = no cache);
    bases: the shared bases, required by the spatial-norm reductions (projected inside the hooks).
    """
    t0 = time.perf_counter()
    job = _prepare(backbone, images, labels, sample_ids, class_names, settings)
    extractor, prompt_ids, n = job.extractor, job.prompt_ids, len(job.ids)
    fingerprint = dict(job.fingerprint)
    reductions: list[BlockReduction] | None = None
    bases_sha: tuple[str, ...] = ()
    if settings.reduction != "mean-pool":  # mean-pool: no reduction entry
        if bases is None:
            raise ValueError(f"reduction {settings.reduction!r} needs the shared bases (`bases`)")
        reductions = [SpatialNorm(b) for b in bases]
        extractor.out_dims(reductions)  # checks bases against the blocks' channels
        bases_sha = tuple(r.describe()["basis_sha256"] for r in reductions)
        fingerprint["reduction"] = {"kind": "spatial-norm", "bases_sha256": list(bases_sha)}
    num_cols = prompt_ids.shape[1]
    spec: dict[str, tuple[tuple[int, ...], str]] = {
        f"block{b}": ((num_cols, d), "float16")
        for b, d in zip(extractor.up_blocks, extractor.out_dims(reductions), strict=True)
    }
    spec["prompt_ids"] = ((num_cols,), "int64")
    # 4. extraction of the missing chunks (all of them without a cache); with a cache, rows that
    # another partition of the same images already extracted are reused (`row_store.py`)
    chunk = max(1, settings.chunk_images)
    block_names = [f"block{b}" for b in extractor.up_blocks]
    rows: RowStore | None = None
    if cache_dir is None:
        cache = None
        missing = list(range(-(-n // chunk)))
        collected: dict[int, dict[str, torch.Tensor]] = {}
    else:
        cache = FeatureCache(Path(cache_dir), job.prefix, fingerprint, n, chunk, spec)
        missing = cache.open()
        rows = RowStore(Path(cache_dir), fingerprint, block_names)
    reused = 0
    if missing:
        done = n - sum(min(chunk, n - i * chunk) for i in missing)
        bar = ProgressLog(logger, "diffusion features", n, initial=done,
                          interval=30.0 if progress else float("inf"))
        for index in missing:
            start, stop = index * chunk, min(index * chunk + chunk, n)
            tensors, stored_rows = _chunk_features(
                job, reductions, rows, start, stop, block_names, bar
            )
            reused += stored_rows
            for name, t in tensors.items():
                if t.is_floating_point() and not torch.isfinite(t.half()).all():
                    raise RuntimeError(
                        f"non-finite diffusion features in {name} (rows {start}-{stop})"
                    )
            if cache is not None:
                cache.write_chunk(index, tensors)
            else:
                collected[index] = {
                    k: v.to(torch.float16 if v.is_floating_point() else v.dtype)
                    for k, v in tensors.items()
                }
    # 5. load (verified) and assemble
    if cache is not None:
        stored = cache.load()
    else:
        stored = {
            name: torch.cat([collected[i][name] for i in sorted(collected)])
            if collected
            else torch.empty((0, *shape), dtype=getattr(torch, dt))
            for name, (shape, dt) in spec.items()
        }
    if not torch.equal(stored["prompt_ids"], prompt_ids):
        raise RuntimeError(
            "cached prompt ids differ from the recomputed ones although fingerprints match"
        )
    if rows is not None and not missing:  # a cache from before rows were shared: share it now
        rows.add_missing(job.ids, image_digests(job.images), prompt_ids, stored)
    seconds = time.perf_counter() - t0
    if missing:
        logger.info(
            "diffusion features: %d images x %d prompts in %.1fs (%.1f img/s; %d rows reused "
            "from other partitions)",
            n,
            num_cols,
            seconds,
            n / max(seconds, 1e-9),
            reused,
        )
    return ClientRepresentations(
        features=tuple(stored[f"block{b}"] for b in extractor.up_blocks),
        prompts=tuple(job.prompts),
        prompt_ids=prompt_ids,
        positive_cols=job.positive_cols,
        negative_cols=job.negative_cols,
        null_cols=job.null_cols,
        up_blocks=extractor.up_blocks,
        alpha_bar=extractor.alpha_bar,
        fingerprint=fingerprint,
        cache_dir=None if cache is None else cache.dir,
        from_cache=not missing,
        seconds=seconds,
        bases_sha256=bases_sha,
    )


def _chunk_features(
    job: _Job,
    reductions: list[BlockReduction] | None,
    rows: RowStore | None,
    start: int,
    stop: int,
    block_names: list[str],
    progress: ProgressLog,
) -> tuple[dict[str, torch.Tensor], int]:
    """Rows start:stop of every block (+ prompt ids): stored rows reused, the others extracted
    (and stored for other partitions). Returns the tensors and how many rows were reused."""
    ids, prompt_ids = job.ids[start:stop], job.prompt_ids[start:stop]
    digests = None if rows is None else image_digests(job.images[start:stop])
    stored = {} if rows is None or digests is None else rows.lookup(ids, digests, prompt_ids)
    todo = [i for i in range(stop - start) if i not in stored]
    progress.skip(len(stored))  # reused rows: done, but not part of the extraction rate
    dims = job.extractor.out_dims(reductions)
    out = {
        name: torch.empty(stop - start, prompt_ids.shape[1], d)
        for name, d in zip(block_names, dims, strict=True)
    }
    for i, row in stored.items():
        for name in block_names:
            out[name][i] = row[name].float()
    if todo:
        take = torch.tensor(todo) + start
        feats = job.extractor.extract(
            job.images[take],
            job.ids[take].tolist(),
            job.prompts,
            job.prompt_ids[take],
            progress=progress.update,
            reductions=reductions,
        )
        fresh = dict(zip(block_names, feats, strict=True))
        for name in block_names:
            out[name][todo] = fresh[name]
        if rows is not None and digests is not None:
            rows.add(job.ids[take], digests[todo], job.prompt_ids[take], fresh)
    return {**out, "prompt_ids": prompt_ids}, len(stored)
